//! `walcast config from-debezium`: converts a Debezium PostgreSQL connector
//! with the Outbox EventRouter (a Kafka Connect `.properties` file, or the
//! connector's JSON as the Connect REST API takes it) into a walcast TOML
//! configuration. Every option is either mapped, known to have no effect on
//! what reaches Kafka, or refused by name: a conversion never silently
//! changes what consumers see.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Reads Java properties text: `key=value`, `key: value` or `key value`,
/// `#`/`!` comments, backslash line continuations and escapes.
pub fn parse_properties(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut logical = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if logical.is_empty()
            && (trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with('!'))
        {
            continue;
        }
        // A line ending in an odd number of backslashes continues.
        let trailing = trimmed.len() - trimmed.trim_end_matches('\\').len();
        if trailing % 2 == 1 && lines.peek().is_some() {
            logical.push_str(&trimmed[..trimmed.len() - 1]);
            continue;
        }
        logical.push_str(trimmed);
        let (k, v) = split_property(&logical);
        out.insert(unescape(&k), unescape(v.trim_start()));
        logical.clear();
    }
    out
}

fn split_property(line: &str) -> (String, &str) {
    let mut key = String::new();
    let mut chars = line.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                key.push('\\');
                if let Some((_, n)) = chars.next() {
                    key.push(n);
                }
            }
            '=' | ':' => return (key, &line[i + 1..]),
            c if c.is_whitespace() => {
                let rest = line[i..].trim_start();
                let rest = rest
                    .strip_prefix('=')
                    .or_else(|| rest.strip_prefix(':'))
                    .unwrap_or(rest);
                return (key, rest);
            }
            c => key.push(c),
        }
    }
    (key, "")
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('f') => out.push('\u{c}'),
            Some('u') => {
                let hex: String = chars.by_ref().take(4).collect();
                if let Some(ch) = u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
                    out.push(ch);
                }
            }
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

/// Reads a connector definition: JSON (`{"name": …, "config": {…}}` or the
/// bare config object) or properties text.
pub fn parse_connector(text: &str) -> Result<BTreeMap<String, String>, String> {
    let t = text.trim_start();
    if !t.starts_with('{') {
        return Ok(parse_properties(text));
    }
    let v: serde_json::Value = serde_json::from_str(t)
        .map_err(|e| format!("the file looks like JSON but is not valid JSON: {e}"))?;
    let obj = v
        .get("config")
        .unwrap_or(&v)
        .as_object()
        .ok_or("the JSON is not an object (expected {\"name\": ..., \"config\": {...}})")?;
    let mut out = BTreeMap::new();
    if let Some(name) = v.get("name").and_then(|n| n.as_str()) {
        out.insert("name".to_string(), name.to_string());
    }
    for (k, v) in obj {
        let s = match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        out.insert(k.clone(), s);
    }
    Ok(out)
}

const POSTGRES_CONNECTOR: &str = "io.debezium.connector.postgresql.PostgresConnector";
const EVENT_ROUTER: &str = "io.debezium.transforms.outbox.EventRouter";

/// Options that do not change what reaches Kafka under walcast, with why.
const NO_EFFECT: &[(&str, &str)] = &[
    ("name", "the connector's name"),
    ("tasks.max", "the PostgreSQL connector runs one task"),
    (
        "topic.prefix",
        "names Debezium's own topics; the EventRouter routes outbox records",
    ),
    (
        "database.server.name",
        "names Debezium's own topics (before 2.0)",
    ),
    (
        "include.schema.changes",
        "not used by the PostgreSQL connector",
    ),
    (
        "tombstones.on.delete",
        "the EventRouter drops DELETE events",
    ),
    (
        "provide.transaction.metadata",
        "walcast writes no transaction topic; false is the default",
    ),
    (
        "skipped.operations",
        "walcast's publication carries INSERTs only",
    ),
    ("schema.include.list", "table.include.list names the tables"),
    ("errors.log.enable", "walcast logs every error"),
    (
        "errors.log.include.messages",
        "walcast names the row in its errors",
    ),
    (
        "errors.retry.timeout",
        "walcast retries retryable errors with backoff",
    ),
    (
        "errors.retry.delay.max.ms",
        "see pipeline.restart_backoff_max_ms",
    ),
    ("key.converter.schemas.enable", "checked with key.converter"),
    (
        "value.converter.schemas.enable",
        "checked with value.converter",
    ),
    (
        "header.converter",
        "walcast writes header values as their text (SimpleHeaderConverter's form)",
    ),
    ("transforms", "checked: one EventRouter"),
    (
        "decimal.handling.mode",
        "applies to envelope fields of numeric columns only; walcast writes them as strings",
    ),
    ("time.precision.mode", "walcast reads timestamps itself"),
    ("slot.drop.on.stop", "checked: walcast never drops its slot"),
    (
        "poll.interval.ms",
        "how often Debezium's task polls its queue: latency only",
    ),
    (
        "extended.headers.enabled",
        "Debezium's __debezium.context.* headers (connector name, task, run id): walcast writes none (README, Differences from Debezium)",
    ),
];

/// EventRouter options (after `transforms.<name>.`) mapped to route keys.
const ROUTER_STRING: &[(&str, &str)] = &[
    ("table.field.event.id", "table_field_event_id"),
    ("table.field.event.key", "table_field_event_key"),
    ("table.field.event.type", "table_field_event_type"),
    ("table.field.event.timestamp", "table_field_event_timestamp"),
    ("table.field.event.payload", "table_field_event_payload"),
    ("table.field.payload", "table_field_event_payload"),
    (
        "table.field.event.schema.version",
        "table_field_event_schema_version",
    ),
    (
        "table.field.schema.version",
        "table_field_event_schema_version",
    ),
    (
        "table.fields.additional.placement",
        "table_fields_additional_placement",
    ),
    ("route.by.field", "route_by_field"),
    ("route.topic.regex", "route_topic_regex"),
    ("route.topic.replacement", "route_topic_replacement"),
    ("tracing.span.context.field", "tracing_span_context_field"),
];
const ROUTER_BOOL: &[(&str, &str)] = &[
    ("table.expand.json.payload", "table_expand_json_payload"),
    (
        "route.tombstone.on.empty.payload",
        "route_tombstone_on_empty_payload",
    ),
];
const ROUTER_NO_EFFECT: &[&str] = &[
    "type",
    "tracing.operation.name",
    "tracing.with.context.field.only",
];

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Converts a connector definition into walcast TOML, or returns one line
/// per option walcast does not support (the option and why).
///
/// # Errors
/// The unsupported options, each named with the reason.
pub fn convert(props: &BTreeMap<String, String>) -> Result<String, Vec<String>> {
    let mut problems = Vec::new();
    let mut used: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    let get = |k: &str, used: &mut std::collections::BTreeSet<String>| {
        used.insert(k.to_string());
        props.get(k).map(|v| v.trim().to_string())
    };
    let truthy = |v: &str| v.eq_ignore_ascii_case("true");

    match get("connector.class", &mut used).as_deref() {
        Some(POSTGRES_CONNECTOR) | Some("PostgresConnector") => {}
        Some(other) => problems.push(format!("connector.class = {other}: walcast reads PostgreSQL only ({POSTGRES_CONNECTOR})")),
        None => problems.push("connector.class is missing: expected io.debezium.connector.postgresql.PostgresConnector".into()),
    }
    if let Some(p) = get("plugin.name", &mut used) {
        if p != "pgoutput" {
            problems.push(format!("plugin.name = {p}: walcast decodes pgoutput only; its slot must be a pgoutput slot"));
        }
    }
    if let Some(t) = get("tasks.max", &mut used) {
        if t != "1" {
            problems.push(format!(
                "tasks.max = {t}: the PostgreSQL connector (and walcast) use one task"
            ));
        }
    }
    let mut create_publication = true;
    if let Some(m) = get("publication.autocreate.mode", &mut used) {
        match m.as_str() {
            "filtered" => {}
            "disabled" => create_publication = false,
            other => problems.push(format!(
                "publication.autocreate.mode = {other}: walcast's publication carries exactly the outbox tables (use filtered or disabled)"
            )),
        }
    }
    if let Some(s) = get("snapshot.mode", &mut used) {
        if !["never", "no_data", "nodata", "initial"].contains(&s.as_str()) {
            problems.push(format!(
                "snapshot.mode = {s}: walcast never snapshots outbox tables (it relays from the slot's position; outbox rows are events, not state)"
            ));
        }
    }
    if let Some(d) = get("slot.drop.on.stop", &mut used) {
        if truthy(&d) {
            problems.push("slot.drop.on.stop = true: walcast never drops its slot (a dropped slot loses events)".into());
        }
    }
    if let Some(t) = get("errors.tolerance", &mut used) {
        if t != "none" {
            problems.push(format!(
                "errors.tolerance = {t}: walcast never skips a record it cannot publish; it stops at it (pipeline.on_permanent_error)"
            ));
        }
    }
    if get("heartbeat.action.query", &mut used).is_some() {
        problems.push("heartbeat.action.query: walcast's heartbeat is a logical decoding message it writes itself (postgres.heartbeat_interval_ms)".into());
    }

    // Tables.
    let mut tables = Vec::new();
    let include =
        get("table.include.list", &mut used).or_else(|| get("table.whitelist", &mut used));
    match include {
        None => problems
            .push("table.include.list is missing: walcast needs the outbox tables by name".into()),
        Some(list) => {
            for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                let name = entry.replace("\\.", ".");
                if name.chars().any(|c| "*+?[](){}|^$\\".contains(c)) {
                    problems.push(format!(
                        "table.include.list entry {entry:?} is a regular expression: walcast needs each outbox table by name"
                    ));
                } else if name.split('.').count() != 2 {
                    problems.push(format!(
                        "table.include.list entry {entry:?}: write it as schema.table"
                    ));
                } else {
                    tables.push(name);
                }
            }
        }
    }

    // The EventRouter transform.
    let transforms: Vec<String> = get("transforms", &mut used)
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let mut router: Option<String> = None;
    for t in &transforms {
        let ty = get(&format!("transforms.{t}.type"), &mut used).unwrap_or_default();
        if ty == EVENT_ROUTER && router.is_none() {
            router = Some(t.clone());
        } else if ty == EVENT_ROUTER {
            problems.push(format!(
                "transforms.{t}: a second EventRouter; walcast applies one per table"
            ));
        } else {
            problems.push(format!("transforms.{t}.type = {ty}: walcast applies only the Outbox EventRouter ({EVENT_ROUTER})"));
        }
    }
    if router.is_none() {
        problems.push(format!("no transform of type {EVENT_ROUTER}: walcast relays outbox tables through the EventRouter's rules"));
    }
    let mut route = String::new();
    let mut expand = false;
    let mut envelope = false;
    if let Some(name) = &router {
        let prefix = format!("transforms.{name}.");
        for (k, v) in props.range(prefix.clone()..) {
            let Some(opt) = k.strip_prefix(&prefix) else {
                break;
            };
            used.insert(k.clone());
            let v = v.trim();
            if let Some((_, key)) = ROUTER_STRING.iter().find(|(d, _)| *d == opt) {
                if *key == "table_fields_additional_placement" {
                    envelope = v.split(',').any(|e| {
                        e.split(':')
                            .nth(1)
                            .is_some_and(|p| p.trim().eq_ignore_ascii_case("envelope"))
                    });
                }
                let _ = writeln!(route, "{key} = {}", toml_str(v));
            } else if let Some((_, key)) = ROUTER_BOOL.iter().find(|(d, _)| *d == opt) {
                if *key == "table_expand_json_payload" {
                    expand = truthy(v);
                }
                let _ = writeln!(route, "{key} = {}", truthy(v));
            } else if opt == "table.op.invalid.behavior" || opt == "debezium.op.invalid.behavior" {
                let b = match v {
                    "warn" | "error" => "warn",
                    "fatal" => "stop",
                    other => {
                        problems.push(format!("{k} = {other}: expected warn, error or fatal"));
                        "warn"
                    }
                };
                let _ = writeln!(route, "table_op_invalid_behavior = {}", toml_str(b));
            } else if opt == "table.field.payload.id" {
                let key = props
                    .get(&format!("{prefix}table.field.event.key"))
                    .map_or("aggregateid", String::as_str);
                if v != key {
                    problems.push(format!(
                        "{k} = {v}: a fallback key column; walcast keys every record by table.field.event.key and stops at a NULL key"
                    ));
                }
            } else if opt == "table.json.payload.null.behavior" {
                if v != "ignore" {
                    problems.push(format!(
                        "{k} = {v}: walcast keeps JSON nulls as they are (ignore)"
                    ));
                }
            } else if ROUTER_NO_EFFECT.contains(&opt) {
            } else if opt.starts_with("predicate") || opt == "negate" {
                problems.push(format!("{k}: walcast applies the EventRouter to every row of the outbox tables (no predicates)"));
            } else {
                problems.push(format!("{k}: not an EventRouter option walcast knows"));
            }
        }
    }

    // Converters: walcast writes what StringConverter/ByteArrayConverter
    // write for a plain payload, and JsonConverter (schemas off) for JSON.
    let key_conv = get("key.converter", &mut used);
    if let Some(k) = &key_conv {
        if !k.ends_with("StringConverter")
            && !k.ends_with("ByteArrayConverter")
            && !k.ends_with("ByteBufferConverter")
        {
            problems.push(format!(
                "key.converter = {k}: walcast writes the key column's text as the key (what StringConverter writes)"
            ));
        }
    }
    let value_conv = get("value.converter", &mut used);
    let schemas = get("value.converter.schemas.enable", &mut used).is_none_or(|s| truthy(&s));
    match value_conv.as_deref() {
        None => {}
        Some(v) if v.ends_with("JsonConverter") => {
            if schemas {
                problems.push(format!(
                    "value.converter = {v} with schemas.enable = true: walcast writes no Kafka Connect schema (set value.converter.schemas.enable=false in Debezium first, or expect the schema envelope to go)"
                ));
            } else if !expand && !envelope {
                problems.push(format!(
                    "value.converter = {v} without table.expand.json.payload or envelope fields: Debezium writes the payload as a JSON string literal, walcast writes it as it is"
                ));
            }
        }
        Some(v)
            if v.ends_with("StringConverter")
                || v.ends_with("ByteArrayConverter")
                || v.ends_with("ByteBufferConverter") =>
        {
            let json = expand || envelope;
            json.then(|| {
                problems.push(format!(
                    "value.converter = {v} with JSON expansion or envelope fields: walcast writes those as JSON (JsonConverter with schemas.enable=false)"
                ))
            });
        }
        Some(v) => problems.push(format!(
            "value.converter = {v}: walcast writes JSON or the payload as it is, not this format"
        )),
    }

    // PostgreSQL connection.
    let host = get("database.hostname", &mut used);
    let db = get("database.dbname", &mut used);
    let user = get("database.user", &mut used);
    for (k, v) in [
        ("database.hostname", &host),
        ("database.dbname", &db),
        ("database.user", &user),
    ] {
        if v.is_none() {
            problems.push(format!("{k} is missing"));
        }
    }
    let password_given = get("database.password", &mut used).is_some();
    let sslmode = get("database.sslmode", &mut used);
    if let Some(m) = &sslmode {
        if !["disable", "require", "verify-ca", "verify-full"].contains(&m.as_str()) {
            problems.push(format!(
                "database.sslmode = {m}: walcast takes disable, require, verify-ca or verify-full (never a silent fallback to plaintext)"
            ));
        }
    }

    let port = get("database.port", &mut used);
    let root_cert = get("database.sslrootcert", &mut used);
    let slot = get("slot.name", &mut used).unwrap_or_else(|| "debezium".into());
    let publication =
        get("publication.name", &mut used).unwrap_or_else(|| "dbz_publication".into());
    let heartbeat = get("heartbeat.interval.ms", &mut used);

    for k in props.keys() {
        if used.contains(k) || NO_EFFECT.iter().any(|(n, _)| n == k) {
            continue;
        }
        problems.push(format!("{k}: walcast has no equivalent option"));
    }
    if !problems.is_empty() {
        return Err(problems);
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Converted by `walcast config from-debezium` from connector {:?}.",
        props.get("name").map_or("", String::as_str)
    );
    let _ = writeln!(
        out,
        "# Review kafka.bootstrap_servers and the password before use.\n"
    );
    let _ = writeln!(out, "[postgres]");
    let _ = writeln!(
        out,
        "host = {}",
        toml_str(host.as_deref().unwrap_or_default())
    );
    if let Some(p) = &port {
        let _ = writeln!(out, "port = {p}");
    }
    let _ = writeln!(
        out,
        "database = {}",
        toml_str(db.as_deref().unwrap_or_default())
    );
    let _ = writeln!(
        out,
        "user = {}",
        toml_str(user.as_deref().unwrap_or_default())
    );
    if password_given {
        let _ = writeln!(
            out,
            "# password: not copied; set WALCAST_POSTGRES__PASSWORD or password_file"
        );
    }
    if let Some(m) = &sslmode {
        let _ = writeln!(out, "sslmode = {}", toml_str(m));
    }
    if let Some(c) = &root_cert {
        let _ = writeln!(out, "ssl_root_cert = {}", toml_str(c));
    }
    let _ = writeln!(out, "slot = {}", toml_str(&slot));
    let _ = writeln!(out, "publication = {}", toml_str(&publication));
    let _ = writeln!(out, "create_publication = {create_publication}");
    if let Some(h) = &heartbeat {
        let _ = writeln!(out, "heartbeat_interval_ms = {h}");
    }
    let _ = writeln!(
        out,
        "\n[outbox]\ntables = []   # the routes below name the outbox tables"
    );
    let _ = writeln!(out, "\n[outbox.headers]\ntype = \"\"   # Debezium sends no type header (use a column:header placement)");
    // walcast's source headers are on by default; Debezium's records have
    // none, and a converted config reproduces Debezium's records.
    let _ = writeln!(
        out,
        "source_lsn = \"\"   # walcast.source.lsn: off, as Debezium sends no such header\ncommit_time = \"\"   # walcast.commit.time: off, likewise"
    );
    let _ = writeln!(out, "\n[kafka]\nbootstrap_servers = \"CHANGE-ME:9092\"   # the Connect worker's bootstrap.servers");
    for t in &tables {
        let _ = writeln!(out, "\n[[outbox.route]]\ntable = {}\n{route}", toml_str(t));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONNECTOR: &str = r#"
# The outbox connector
name=orders-outbox
connector.class=io.debezium.connector.postgresql.PostgresConnector
tasks.max=1
plugin.name=pgoutput
database.hostname=db.internal
database.port=5432
database.user=debezium
database.password=secret
database.dbname=orders
topic.prefix=orders
slot.name=orders_outbox
publication.name=orders_pub
publication.autocreate.mode=filtered
snapshot.mode=never
table.include.list=public.outbox,sales\\.outbox
key.converter=org.apache.kafka.connect.storage.StringConverter
value.converter=org.apache.kafka.connect.json.JsonConverter
value.converter.schemas.enable=false
transforms=outbox
transforms.outbox.type=io.debezium.transforms.outbox.EventRouter
transforms.outbox.table.field.event.key=aggregate_id
transforms.outbox.route.by.field=topic
transforms.outbox.route.topic.replacement=${routedByValue}
transforms.outbox.table.fields.additional.placement=type:header:eventType,\
  type:envelope:eventType
transforms.outbox.table.expand.json.payload=true
transforms.outbox.table.op.invalid.behavior=fatal
poll.interval.ms=50
extended.headers.enabled=true
"#;

    #[test]
    fn a_supported_connector_converts_to_a_valid_config() {
        let toml_text = convert(&parse_properties(CONNECTOR)).unwrap();
        let cfg = walcast_core::config::Config::from_toml(&toml_text)
            .unwrap_or_else(|e| panic!("{e}\n{toml_text}"));
        assert_eq!(cfg.postgres.host, "db.internal");
        assert_eq!(cfg.postgres.slot, "orders_outbox");
        assert_eq!(cfg.postgres.publication, "orders_pub");
        assert!(
            !toml_text.contains("secret"),
            "the password is never copied"
        );
        let tables: Vec<String> = cfg
            .outbox_tables()
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(tables, ["public.outbox", "sales.outbox"]);
        let r = &cfg.outbox.routes[0];
        assert_eq!(r.table_field_event_key, "aggregate_id");
        assert_eq!(r.route_by_field, "topic");
        assert_eq!(r.route_topic_replacement, "${routedByValue}");
        assert_eq!(
            r.table_fields_additional_placement,
            "type:header:eventType,type:envelope:eventType"
        );
        assert!(r.table_expand_json_payload);
        assert_eq!(
            r.table_op_invalid_behavior,
            walcast_core::route::OpBehavior::Stop
        );
        assert_eq!(cfg.outbox.headers.r#type, "");
        // Debezium sends no source headers: a converted config has them off.
        assert_eq!(cfg.outbox.headers.source_lsn, "");
        assert_eq!(cfg.outbox.headers.commit_time, "");
        cfg.routes().unwrap();
    }

    #[test]
    fn unsupported_options_are_each_named() {
        let text = format!(
            "{CONNECTOR}\nsnapshot.mode=always\ntransforms.outbox.table.field.payload.id=other\nmessage.key.columns=x\ndatabase.sslmode=prefer\nerrors.tolerance=all\n"
        );
        let problems = convert(&parse_properties(&text)).unwrap_err();
        let all = problems.join("\n");
        for needle in [
            "snapshot.mode = always",
            "table.field.payload.id",
            "message.key.columns",
            "database.sslmode = prefer",
            "errors.tolerance = all",
        ] {
            assert!(all.contains(needle), "{needle} not named in:\n{all}");
        }
        assert_eq!(problems.len(), 5, "{all}");
        // Schemas in the value, a regex table list, another transform.
        let text = CONNECTOR
            .replace("value.converter.schemas.enable=false", "value.converter.schemas.enable=true")
            .replace("public.outbox,sales\\\\.outbox", "public\\\\.outbox.*")
            .replace("transforms=outbox", "transforms=outbox,unwrap\ntransforms.unwrap.type=io.debezium.transforms.ExtractNewRecordState");
        let all = convert(&parse_properties(&text)).unwrap_err().join("\n");
        for needle in [
            "schemas.enable = true",
            "regular expression",
            "transforms.unwrap.type",
        ] {
            assert!(all.contains(needle), "{needle} not named in:\n{all}");
        }
    }

    #[test]
    fn json_connector_definitions_are_read() {
        let json = r#"{"name": "o", "config": {"connector.class": "io.debezium.connector.postgresql.PostgresConnector",
            "database.hostname": "h", "database.dbname": "d", "database.user": "u", "table.include.list": "public.outbox",
            "transforms": "outbox", "transforms.outbox.type": "io.debezium.transforms.outbox.EventRouter",
            "value.converter": "org.apache.kafka.connect.storage.StringConverter", "tasks.max": 1}}"#;
        let props = parse_connector(json).unwrap();
        assert_eq!(props.get("tasks.max").map(String::as_str), Some("1"));
        let toml_text = convert(&props).unwrap();
        let cfg = walcast_core::config::Config::from_toml(&toml_text).unwrap();
        assert_eq!(
            cfg.outbox.routes[0].route_topic_replacement,
            "outbox.event.${routedByValue}"
        );
    }

    #[test]
    fn properties_syntax() {
        let p = parse_properties("a = 1\nb:2\nc 3\n! note\nd=x\\\n  y\ne=\\u0041\\=\n");
        assert_eq!(p["a"], "1");
        assert_eq!(p["b"], "2");
        assert_eq!(p["c"], "3");
        assert_eq!(p["d"], "xy");
        assert_eq!(p["e"], "A=");
    }
}
