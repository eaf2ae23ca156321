//! Parity with Debezium itself (issue 12, "Prove it"): the same outbox rows
//! go through Kafka Connect + the Debezium PostgreSQL connector + the Outbox
//! EventRouter, and through walcast, with equivalent configurations; the
//! records are compared field by field: topic, partition, key, value,
//! headers, timestamp type.
//!
//! One Connect worker (standalone) runs one connector per case. Both systems
//! write the same topics, one after the other: Debezium first (its slots are
//! created when its connectors start, before the rows are written), then
//! walcast from slots created before the rows; the records of a topic before
//! Debezium's count are Debezium's. Every difference found is compared with
//! [`KNOWN_DIFFERENCES`]: a new difference, or a listed one that is gone,
//! fails the test, so the list (and the README's "Differences from
//! Debezium") stays true.
//!
//! A case is a table entry ([`cases`]). Gated: the Debezium jars come from
//! `scripts/dev debezium-libs` (Maven, cached); when they cannot be resolved
//! the test says so and passes, unless `WALCAST_PARITY=require`
//! (`scripts/dev parity`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context as _, Result};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use walcast_tests::kafka::create_topics;
use walcast_tests::pg::TestDb;
use walcast_tests::process::{Walcast, WalcastConfig};
use walcast_tests::TestEnv;

use crate::common::bin;

/// Column names of an outbox table.
#[derive(Debug, Clone, Copy)]
struct Cols {
    id: &'static str,
    aggregatetype: &'static str,
    aggregateid: &'static str,
    r#type: &'static str,
    payload: &'static str,
}

const DEFAULT_COLS: Cols = Cols {
    id: "id",
    aggregatetype: "aggregatetype",
    aggregateid: "aggregateid",
    r#type: "type",
    payload: "payload",
};

/// Which payloads a case's rows carry.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Payloads {
    /// JSON objects, arrays and a JSON string.
    Any,
    /// JSON objects and arrays only (what JSON expansion takes).
    Containers,
    /// Some NULL and some empty ('') payloads among them (tombstones).
    WithEmpty,
}

/// One configuration, run through both systems. walcast's configuration is
/// `walcast config from-debezium` applied to the case's connector
/// properties (its `[outbox]` part; connection settings are the test's).
#[derive(Debug, Clone)]
struct Case {
    name: &'static str,
    tables: Vec<&'static str>,
    cols: Cols,
    /// Hash-partitioned tables (two partitions, one of them sub-partitioned).
    partitioned: bool,
    /// Type of the payload column (jsonb, json, text, bytea).
    payload_type: &'static str,
    payloads: Payloads,
    /// The topic of a routed value (aggregate type).
    topic: fn(&str) -> String,
    /// EventRouter properties (without the `transforms.outbox.` prefix).
    debezium: Vec<(&'static str, String)>,
    /// Connector properties that replace the harness's (later keys win),
    /// e.g. `value.converter` for JSON expansion.
    connector: Vec<(&'static str, &'static str)>,
    /// The record timestamp comes from a column: compared by value (else
    /// only its type: both stamp a time of their own).
    timestamp_column: bool,
}

impl Case {
    /// The values are JSON written by Kafka Connect's JsonConverter.
    fn json_value(&self) -> bool {
        self.connector
            .iter()
            .any(|(k, v)| *k == "value.converter" && v.ends_with("JsonConverter"))
    }
}

const JSON_CONVERTER: [(&str, &str); 2] = [
    (
        "value.converter",
        "org.apache.kafka.connect.json.JsonConverter",
    ),
    ("value.converter.schemas.enable", "false"),
];

fn cases() -> Vec<Case> {
    let custom = Cols {
        id: "event_id",
        aggregatetype: "stream",
        aggregateid: "entity_id",
        r#type: "kind",
        payload: "body",
    };
    let type_header = || {
        vec![(
            "table.fields.additional.placement",
            "type:header:type".to_string(),
        )]
    };
    let default = Case {
        name: "default",
        tables: vec!["public.outbox"],
        cols: DEFAULT_COLS,
        partitioned: false,
        payload_type: "jsonb",
        payloads: Payloads::Any,
        topic: |a| format!("outbox.event.{a}"),
        debezium: vec![],
        connector: vec![],
        timestamp_column: false,
    };
    let mut v = vec![
        // Both systems' defaults.
        default.clone(),
        // The same with Debezium's default context headers left on.
        Case {
            name: "default_context_headers",
            debezium: type_header(),
            connector: vec![("extended.headers.enabled", "true")],
            ..default.clone()
        },
        // A custom routing column and topic template, every column renamed;
        // the type as a header.
        Case {
            name: "custom_columns",
            tables: vec!["public.events"],
            cols: custom,
            topic: |a| format!("events.{a}.v1"),
            debezium: vec![
                ("table.field.event.id", "event_id".into()),
                ("table.field.event.key", "entity_id".into()),
                ("table.field.event.payload", "body".into()),
                ("route.by.field", "stream".into()),
                (
                    "route.topic.replacement",
                    "events.${routedByValue}.v1".into(),
                ),
                (
                    "table.fields.additional.placement",
                    "kind:header:type".into(),
                ),
            ],
            ..default.clone()
        },
        // Two outbox tables of one shape in one database. (One EventRouter
        // gives every table of a connector the same shape: tables of
        // different shapes need several transforms with predicates, which
        // walcast config from-debezium refuses; walcast's own per-table
        // routes are tested in routing.rs.)
        Case {
            name: "several_tables",
            tables: vec!["public.outbox", "sales.outbox"],
            debezium: type_header(),
            ..default.clone()
        },
        // A partitioned outbox (published via its root).
        Case {
            name: "partitioned",
            partitioned: true,
            debezium: type_header(),
            ..default.clone()
        },
        // Additional columns as headers and as envelope fields.
        Case {
            name: "header_and_envelope",
            debezium: vec![(
                "table.fields.additional.placement",
                "type:header:type,aggregatetype:header,shard:header:shard,type:envelope:eventType,shard:envelope,aggregatetype:envelope:aggType".into(),
            )],
            connector: JSON_CONVERTER.to_vec(),
            ..default.clone()
        },
        // JSON expansion of the payload.
        Case {
            name: "expand_json",
            payloads: Payloads::Containers,
            debezium: vec![
                ("table.expand.json.payload", "true".into()),
                ("table.fields.additional.placement", "type:header:type".into()),
            ],
            connector: JSON_CONVERTER.to_vec(),
            ..default.clone()
        },
        // JSON expansion inside an envelope.
        Case {
            name: "expand_json_envelope",
            payloads: Payloads::Containers,
            debezium: vec![
                ("table.expand.json.payload", "true".into()),
                (
                    "table.fields.additional.placement",
                    "type:envelope:eventType".into(),
                ),
            ],
            connector: JSON_CONVERTER.to_vec(),
            ..default.clone()
        },
        // The record timestamp from a column (epoch milliseconds).
        Case {
            name: "timestamp_column",
            debezium: vec![
                ("table.field.event.timestamp", "created_at".into()),
                ("table.fields.additional.placement", "type:header:type".into()),
            ],
            timestamp_column: true,
            ..default.clone()
        },
        // NULL and empty payloads with tombstones on.
        Case {
            name: "tombstones",
            payload_type: "text",
            payloads: Payloads::WithEmpty,
            debezium: vec![
                ("route.tombstone.on.empty.payload", "true".into()),
                ("table.fields.additional.placement", "type:header:type".into()),
            ],
            ..default.clone()
        },
        // A routing regex with named groups.
        Case {
            name: "topic_regex",
            topic: |a| {
                let (head, rest) = a.split_at(if a.starts_with("Order") { 5 } else { 7 });
                format!("regex.{rest}.{head}")
            },
            debezium: vec![
                (
                    "route.topic.regex",
                    "(?<routedByValue>Order|Payment)(?<rest>.*)".into(),
                ),
                (
                    "route.topic.replacement",
                    "regex.${rest}.${routedByValue}".into(),
                ),
                ("table.fields.additional.placement", "type:header:type".into()),
            ],
            ..default.clone()
        },
        // The partition from a column.
        Case {
            name: "partition_column",
            debezium: vec![(
                "table.fields.additional.placement",
                "type:header:type,shard:partition".into(),
            )],
            ..default.clone()
        },
    ];
    // The payload column's other types, with the type as a header as above.
    let custom_columns = v[2].clone();
    assert_eq!(custom_columns.name, "custom_columns");
    for (name, ty) in [
        ("payload_json", "json"),
        ("payload_text", "text"),
        ("payload_bytea", "bytea"),
    ] {
        let mut c = custom_columns.clone();
        c.name = name;
        c.payload_type = ty;
        if ty == "bytea" {
            // StringConverter writes a ByteBuffer's toString(); a Debezium
            // user with a bytea payload uses the ByteArrayConverter.
            c.connector = vec![(
                "value.converter",
                "org.apache.kafka.connect.converters.ByteArrayConverter",
            )];
        }
        v.push(c);
    }
    v
}

/// Differences found, by (cases, field), with the reason. Each one is in the
/// README's "Differences from Debezium". The test prints the values.
const KNOWN_DIFFERENCES: &[(&[&str], &str, &str)] = &[
    // A NULL additional field placed as a header: Debezium writes the header
    // with a null value, walcast leaves the header out.
    (
        &[
            "default_context_headers",
            "custom_columns",
            "several_tables",
            "partitioned",
            "header_and_envelope",
            "expand_json",
            "timestamp_column",
            "tombstones",
            "topic_regex",
            "partition_column",
            "payload_json",
            "payload_text",
            "payload_bytea",
        ],
        "header type",
        "NULL type: Debezium writes a null header, walcast none",
    ),
    (
        &[
            "custom_columns",
            "several_tables",
            "partitioned",
            "header_and_envelope",
            "expand_json",
            "timestamp_column",
            "tombstones",
            "topic_regex",
            "partition_column",
            "payload_json",
            "payload_text",
            "payload_bytea",
        ],
        "header names",
        "NULL type: Debezium writes a null header, walcast none",
    ),
    // JSON expansion: Debezium infers a Kafka Connect schema from the JSON
    // and leaves out every field whose value is null (`"o":{"k":null}` ->
    // `"o":{}`); walcast keeps the payload's fields as they are.
    (
        &["expand_json", "expand_json_envelope"],
        "value",
        "Debezium's JSON expansion drops null fields",
    ),
    // ... and writes numbers as Java reads them (`2.50` -> `2.5`); walcast
    // keeps PostgreSQL's spelling. Equal as JSON values apart from the above.
    (
        &["expand_json", "expand_json_envelope"],
        "value text",
        "number spelling (and the null fields above)",
    ),
    // Debezium's default `extended.headers.enabled=true` puts four context
    // headers ahead of the EventRouter's; walcast has no such headers.
    (
        &["default_context_headers"],
        "header names",
        "Debezium's context headers",
    ),
    (
        &["default_context_headers"],
        "header __debezium.context.connectorLogicalName",
        "Debezium's context headers",
    ),
    (
        &["default_context_headers"],
        "header __debezium.context.connectorName",
        "Debezium's context headers",
    ),
    (
        &["default_context_headers"],
        "header __debezium.context.runId",
        "Debezium's context headers",
    ),
    (
        &["default_context_headers"],
        "header __debezium.context.taskId",
        "Debezium's context headers",
    ),
];

const PARTITIONS: i32 = 3;
const ROWS_PER_CASE: usize = 24;

fn ddl(case: &Case, table: &str) -> String {
    let c = case.cols;
    let cols = format!(
        "{id} uuid NOT NULL, {agg} varchar(255) NOT NULL, {key} varchar(255) NOT NULL, {ty} varchar(255), {payload} {payload_type}, shard integer, created_at timestamp, PRIMARY KEY ({id})",
        id = c.id,
        agg = c.aggregatetype,
        key = c.aggregateid,
        ty = c.r#type,
        payload = c.payload,
        payload_type = case.payload_type,
    );
    let schema = table.split('.').next().unwrap_or("public");
    let mut s = format!("CREATE SCHEMA IF NOT EXISTS {schema}; ");
    if case.partitioned {
        let base = table.replace('.', "_");
        s.push_str(&format!(
            "CREATE TABLE {table} ({cols}) PARTITION BY HASH ({id});
             CREATE TABLE {base}_p0 PARTITION OF {table} FOR VALUES WITH (MODULUS 2, REMAINDER 0);
             CREATE TABLE {base}_p1 PARTITION OF {table} FOR VALUES WITH (MODULUS 2, REMAINDER 1) PARTITION BY HASH ({id});
             CREATE TABLE {base}_p1a PARTITION OF {base}_p1 FOR VALUES WITH (MODULUS 2, REMAINDER 0);
             CREATE TABLE {base}_p1b PARTITION OF {base}_p1 FOR VALUES WITH (MODULUS 2, REMAINDER 1);",
            id = c.id
        ));
    } else {
        s.push_str(&format!("CREATE TABLE {table} ({cols});"));
    }
    s
}

/// A case's database, the walcast slot (created before any row) and the
/// Debezium slot name (its connector creates it).
struct Prepared {
    case: Case,
    db: TestDb,
    dbz_slot: String,
    dbz_publication: String,
    /// Routed values (aggregate types) of this run.
    aggs: Vec<String>,
}

impl Prepared {
    fn topics(&self) -> Vec<String> {
        self.aggs.iter().map(|a| (self.case.topic)(a)).collect()
    }
}

fn connector_properties(env: &TestEnv, p: &Prepared) -> String {
    let mut s = format!(
        "name=parity-{name}
connector.class=io.debezium.connector.postgresql.PostgresConnector
tasks.max=1
plugin.name=pgoutput
database.hostname={host}
database.port={port}
database.user={user}
database.password={password}
database.dbname={db}
topic.prefix=parity_{name}
slot.name={slot}
publication.name={publication}
publication.autocreate.mode=disabled
snapshot.mode=no_data
table.include.list={tables}
tombstones.on.delete=false
poll.interval.ms=50
extended.headers.enabled=false
transforms=outbox
transforms.outbox.type=io.debezium.transforms.outbox.EventRouter
",
        name = p.case.name,
        host = env.pg_host,
        port = p.db.port,
        user = env.admin_user,
        password = env.admin_password,
        db = p.db.name,
        slot = p.dbz_slot,
        publication = p.dbz_publication,
        tables = p.case.tables.join(","),
    );
    for (k, v) in &p.case.debezium {
        s.push_str(&format!("transforms.outbox.{k}={v}\n"));
    }
    for (k, v) in &p.case.connector {
        s.push_str(&format!("{k}={v}\n"));
    }
    s
}

fn worker_properties(env: &TestEnv, dir: &Path) -> String {
    format!(
        "bootstrap.servers={}
key.converter=org.apache.kafka.connect.storage.StringConverter
value.converter=org.apache.kafka.connect.storage.StringConverter
offset.storage.file.filename={}
offset.flush.interval.ms=1000
listeners=http://127.0.0.1:0
plugin.discovery=service_load
",
        env.kafka_bootstrap,
        dir.join("connect.offsets").display()
    )
}

const LOG4J: &str = "status = error
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = out
";

/// The Debezium jars, or why there are none.
fn debezium_libs(env: &TestEnv) -> Result<String> {
    // Resolving from an empty Maven cache takes about a minute here; give up
    // (and skip) after WALCAST_PARITY_RESOLVE_TIMEOUT_S (default 300).
    let secs = std::env::var("WALCAST_PARITY_RESOLVE_TIMEOUT_S").unwrap_or_else(|_| "300".into());
    let out = Command::new("timeout")
        .arg(&secs)
        .arg(env.repo.join("scripts/dev"))
        .arg("debezium-libs")
        .output()
        .context("running scripts/dev debezium-libs")?;
    ensure!(
        out.status.code() != Some(124),
        "scripts/dev debezium-libs did not finish within {secs} s (WALCAST_PARITY_RESOLVE_TIMEOUT_S)"
    );
    ensure!(
        out.status.success(),
        "scripts/dev debezium-libs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// One record as both systems are compared on.
#[derive(Debug, Clone)]
struct Rec {
    topic: String,
    partition: i32,
    key: Option<String>,
    value: Option<String>,
    /// Values as text; `None` = a null header value.
    headers: Vec<(String, Option<String>)>,
    timestamp: rdkafka::Timestamp,
}

impl Rec {
    fn id(&self) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == "id")
            .and_then(|(_, v)| v.as_deref())
    }
}

fn consumer(env: &TestEnv, topics: &[String]) -> Result<BaseConsumer> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &env.kafka_bootstrap)
        .set("group.id", format!("parity-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(t, p, Offset::Beginning)?;
        }
    }
    c.assign(&tpl)?;
    Ok(c)
}

fn read(c: &BaseConsumer, out: &mut Vec<Rec>, n: usize, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while out.len() < n && Instant::now() < deadline {
        let Some(m) = c.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m?;
        let text = |b: Option<&[u8]>| b.map(|b| String::from_utf8_lossy(b).into_owned());
        out.push(Rec {
            topic: m.topic().to_string(),
            partition: m.partition(),
            key: text(m.key()),
            value: text(m.payload()),
            headers: m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_string(), text(h.value)))
                        .collect()
                })
                .unwrap_or_default(),
            timestamp: m.timestamp(),
        });
    }
    Ok(())
}

/// `walcast config from-debezium FILE`, parsed.
fn from_debezium(file: &Path) -> Result<toml::Table> {
    let out = Command::new(bin())
        .args(["config", "from-debezium"])
        .arg(file)
        .output()?;
    ensure!(
        out.status.success(),
        "walcast config from-debezium {} failed ({}):\n{}",
        file.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    toml::from_str(&text).with_context(|| format!("the converted config:\n{text}"))
}

/// JSON text in a canonical form (keys sorted, numbers as f64 where they
/// have a fraction or exponent), or the text itself when it is not JSON.
fn canonical_json(s: &str) -> String {
    fn canon(v: serde_json::Value) -> serde_json::Value {
        use serde_json::Value;
        match v {
            Value::Object(m) => Value::Object(m.into_iter().map(|(k, v)| (k, canon(v))).collect()),
            Value::Array(a) => Value::Array(a.into_iter().map(canon).collect()),
            Value::Number(n) if n.is_f64() => n
                .as_f64()
                .and_then(serde_json::Number::from_f64)
                .map_or(Value::Null, Value::Number),
            v => v,
        }
    }
    match serde_json::from_str::<serde_json::Value>(s) {
        // serde_json's map is sorted by key (no preserve_order).
        Ok(v) => canon(v).to_string(),
        Err(_) => s.to_string(),
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}

/// Copies the Connect worker's log next to the test's other output
/// (`target/parity-connect.log`) when the run ends, to read after a failure.
struct KeepLog(std::path::PathBuf);

impl Drop for KeepLog {
    fn drop(&mut self) {
        let to = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/parity-connect.log");
        let _ = std::fs::copy(&self.0, to);
    }
}

/// Stops the Connect worker (our child) when the test ends, also on failure.
struct Connect(Child);

impl Drop for Connect {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_and_walcast_write_the_same_records() -> Result<()> {
    let env = TestEnv::get();
    let require = std::env::var("WALCAST_PARITY").is_ok_and(|v| v == "require");
    let libs = match debezium_libs(env) {
        Ok(l) => l,
        Err(e) if !require => {
            eprintln!(
                "parity: SKIPPED, no Debezium jars ({e:#}); scripts/dev parity requires them"
            );
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let _g = env.shared().await;
    let mut prepared = Vec::new();
    let result = run(env, &libs, &mut prepared).await;
    // Also after a failure: the slots (walcast's and Debezium's) and databases.
    for p in prepared {
        cleanup(env, p).await;
    }
    result
}

async fn cleanup(env: &TestEnv, p: Prepared) {
    if let Ok(c) = p.db.admin(env).await {
        for _ in 0..100 {
            let r = c
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active",
                    &[&p.dbz_slot],
                )
                .await;
            let left = c
                .query_opt(
                    "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
                    &[&p.dbz_slot],
                )
                .await;
            if r.is_ok() && matches!(left, Ok(None)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let name = p.case.name;
    if let Err(e) = p.db.drop(env).await {
        eprintln!("parity: cleaning up case {name}: {e:#}");
    }
}

async fn run(env: &TestEnv, libs: &str, prepared: &mut Vec<Prepared>) -> Result<()> {
    let started = Instant::now();
    let nonce = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let dir = tempfile::tempdir()?;

    // Databases, tables, publications, walcast's slots, topics.
    for case in cases() {
        let db = TestDb::create_on(env, env.pg_port, &format!("par_{}", case.name), false).await?;
        let c = db.admin(env).await?;
        for t in &case.tables {
            c.batch_execute(&ddl(&case, t))
                .await
                .with_context(|| format!("DDL of {t}"))?;
        }
        let dbz_publication = format!("dbz_{}", db.publication);
        c.batch_execute(&format!(
            "CREATE PUBLICATION {wp} FOR TABLE {t} WITH (publish = 'insert', publish_via_partition_root = true);
             CREATE PUBLICATION {dp} FOR TABLE {t} WITH (publish_via_partition_root = true);",
            wp = db.publication,
            dp = dbz_publication,
            t = case.tables.join(", ")
        ))
        .await?;
        c.query_one(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&db.slot],
        )
        .await?;
        let aggs = vec![format!("Order{nonce}"), format!("Payment{nonce}")];
        prepared.push(Prepared {
            dbz_slot: format!("dbz_{}", db.slot),
            dbz_publication,
            case,
            db,
            aggs,
        });
    }
    let topics: Vec<String> = prepared
        .iter()
        .flat_map(Prepared::topics)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    create_topics(&env.kafka_bootstrap, &topic_refs, PARTITIONS).await?;

    // One Connect worker, one connector per case.
    let worker = dir.path().join("worker.properties");
    std::fs::write(&worker, worker_properties(env, dir.path()))?;
    let log4j = dir.path().join("log4j2.properties");
    std::fs::write(&log4j, LOG4J)?;
    // The java scripts/dev uses (java_bin in scripts/env/lib/common.sh).
    let java = std::env::var_os("JAVA_HOME")
        .map(|h| Path::new(&h).join("bin/java"))
        .filter(|j| j.exists())
        .unwrap_or_else(|| "java".into());
    let mut cmd = Command::new(java);
    cmd.args(["-Xms128m", "-Xmx768m"])
        .arg(format!("-Dlog4j2.configurationFile={}", log4j.display()))
        .arg("-cp")
        .arg(format!("{libs}/*"))
        .arg("org.apache.kafka.connect.cli.ConnectStandalone")
        .arg(&worker);
    for p in prepared.iter() {
        let f = dir.path().join(format!("{}.properties", p.case.name));
        std::fs::write(&f, connector_properties(env, p))?;
        cmd.arg(f);
    }
    let connect_log = dir.path().join("connect.log");
    let log = std::fs::File::create(&connect_log)?;
    cmd.stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null());
    let mut connect = Connect(cmd.spawn().context("starting Kafka Connect (java)")?);
    let log_tail = || {
        let t = std::fs::read_to_string(&connect_log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        let mut problems: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| {
                (l.contains("ERROR") || l.contains("WARN") || l.contains("Exception"))
                    && !l.contains("is already mapped")
            })
            .collect();
        problems.dedup();
        problems.truncate(40);
        format!(
            "warnings and errors:\n{}\nlast lines:\n{}",
            problems.join("\n"),
            lines[lines.len().saturating_sub(20)..].join("\n")
        )
    };
    // Streaming = its slot is active.
    let deadline = Instant::now() + Duration::from_secs(180);
    for p in prepared.iter() {
        let c = p.db.admin(env).await?;
        loop {
            let active = c
                .query_opt(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                    &[&p.dbz_slot],
                )
                .await?
                .is_some_and(|r| r.get::<_, bool>(0));
            if active {
                break;
            }
            if let Some(st) = connect.0.try_wait()? {
                bail!("Kafka Connect exited ({st}):\n{}", log_tail());
            }
            if Instant::now() > deadline {
                bail!(
                    "Debezium connector {} did not start streaming:\n{}",
                    p.case.name,
                    log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let connect_ready = started.elapsed();
    let _keep_log = KeepLog(connect_log.clone());

    // The rows: per case, transactions of 1-5 rows over 5 keys and two
    // routed values; some without a type; JSON payloads of several shapes.
    let mut expected: HashMap<String, (&'static str, i64)> = HashMap::new();
    for p in prepared.iter() {
        let c = p.db.admin(env).await?;
        let cols = p.case.cols;
        let mut i = 0;
        while i < ROWS_PER_CASE {
            let n = 1 + i % 5;
            let mut sql = String::from("BEGIN;");
            for j in i..(i + n).min(ROWS_PER_CASE) {
                let id = uuid::Uuid::new_v4().to_string();
                let table = p.case.tables[j % p.case.tables.len()];
                let ty = if j % 7 == 3 {
                    "NULL".to_string()
                } else {
                    format!("'Event{}'", j % 3)
                };
                let payload = match (j % 4, p.case.payloads) {
                    // Debezium expands objects with homogeneous arrays
                    // only: "Field is not a homogenous array (1 x 2.5)"; a
                    // top-level array stops its task ("Not a struct schema:
                    // Schema{ARRAY}", then "Invalid type for ARRAY").
                    (0, Payloads::Containers) => format!(
                        r#"'{{"n": {j}, "text": "grüße \"q\"", "nested": {{"a": [1.5, 2.50], "o": {{"k": null}}}}}}'"#
                    ),
                    (0, _) => format!(
                        r#"'{{"n": {j}, "text": "grüße \"q\"", "nested": {{"a": [1, 2.50, null]}}}}'"#
                    ),
                    (1, Payloads::Containers) => r#"'{"list": [1, 2, 3]}'"#.to_string(),
                    (1, _) => "'[1, 2, 3]'".to_string(),
                    (2, Payloads::Any) => r#"'"just a string"'"#.to_string(),
                    (2, Payloads::Containers) => {
                        r#"'{"s": "just a string", "b": true, "f": -0.5e3}'"#.to_string()
                    }
                    (2, Payloads::WithEmpty) => "NULL".to_string(),
                    (_, Payloads::WithEmpty) if j % 8 == 3 => "''".to_string(),
                    _ => "'{}'".to_string(),
                };
                let payload = if p.case.payload_type == "bytea" && payload != "NULL" {
                    format!("convert_to({payload}, 'UTF8')")
                } else {
                    payload
                };
                // Spread over 20 s before now, with a fraction of a
                // millisecond (rounded or truncated, it shows).
                let created_at = format!(
                    "to_timestamp({}.000789) AT TIME ZONE 'UTC'",
                    now_ms() / 1000 - 20 + j as i64
                );
                sql.push_str(&format!(
                    "INSERT INTO {table} ({}, {}, {}, {}, {}, shard, created_at) VALUES ('{id}', '{}', 'key-{}', {ty}, {payload}, {}, {created_at});",
                    cols.id, cols.aggregatetype, cols.aggregateid, cols.r#type, cols.payload,
                    p.aggs[j % 2],
                    j % 5,
                    j % 3,
                ));
                expected.insert(id, (p.case.name, now_ms()));
            }
            sql.push_str("COMMIT;");
            c.batch_execute(&sql).await?;
            i += n;
        }
    }
    let total = expected.len();

    // Debezium's records.
    let reader = consumer(env, &topics)?;
    let mut dbz = Vec::new();
    read(&reader, &mut dbz, total, Duration::from_secs(120))?;
    ensure!(
        dbz.len() == total,
        "Debezium delivered {} of {total} records:\n{}",
        dbz.len(),
        log_tail()
    );
    let debezium_done = started.elapsed();
    drop(connect);
    read(&reader, &mut dbz, total + 1, Duration::from_secs(2))?;
    ensure!(
        dbz.len() == total,
        "Debezium delivered more than {total} records"
    );

    // walcast's, one process per case.
    let mut procs = Vec::new();
    for p in prepared.iter() {
        let state = dir.path().join(format!("walcast-{}", p.case.name));
        std::fs::create_dir_all(&state)?;
        // The connector's own properties through the converter: its
        // [outbox] part with the test's connection settings.
        let converted = from_debezium(&dir.path().join(format!("{}.properties", p.case.name)))?;
        // Its connection settings name Debezium's slot and publication;
        // walcast runs on its own (the rows are read twice).
        let pg = converted.get("postgres").and_then(|v| v.as_table());
        let setting = |k: &str| pg.and_then(|t| t.get(k)).map(ToString::to_string);
        ensure!(
            setting("database") == Some(format!("{:?}", p.db.name))
                && setting("slot") == Some(format!("{:?}", p.dbz_slot))
                && setting("publication") == Some(format!("{:?}", p.dbz_publication))
                && setting("create_publication").as_deref() == Some("false"),
            "case {}: the converted [postgres] does not name the connector's database, slot and publication: {pg:?}",
            p.case.name
        );
        let mut base: toml::Table =
            toml::from_str(&WalcastConfig::for_db(env, &p.db, &state).toml)?;
        let outbox = converted
            .get("outbox")
            .cloned()
            .context("the converted config has no [outbox]")?;
        base.insert("outbox".into(), outbox);
        let cfg = WalcastConfig {
            toml: toml::to_string(&base)?,
        };
        let mut w = Walcast::start(&bin(), &state, &cfg)?;
        w.wait_streaming()?;
        procs.push(w);
    }
    let mut wal = Vec::new();
    read(&reader, &mut wal, total, Duration::from_secs(120))?;
    let walcast_done = started.elapsed();
    for w in &procs {
        w.terminate()?;
    }
    let logs: String = procs
        .iter()
        .map(Walcast::log_text)
        .collect::<Vec<_>>()
        .join("\n");
    ensure!(
        wal.len() == total,
        "walcast delivered {} of {total} records:\n{logs}",
        wal.len()
    );

    // Compare.
    let by_id = |recs: &[Rec]| -> Result<HashMap<String, Rec>> {
        recs.iter()
            .map(|r| {
                Ok((
                    r.id().context("a record without an id header")?.to_string(),
                    r.clone(),
                ))
            })
            .collect()
    };
    // Per case and partition, the order of the events (each consumer reads
    // a partition in offset order; cases share topics, and the order of two
    // databases' events is nobody's contract).
    let order = |recs: &[Rec]| {
        let mut o: BTreeMap<(&str, String, i32), Vec<String>> = BTreeMap::new();
        for r in recs {
            let id = r.id().unwrap_or_default().to_string();
            let case = expected.get(&id).map_or("?", |e| e.0);
            o.entry((case, r.topic.clone(), r.partition))
                .or_default()
                .push(id);
        }
        o
    };
    let (dbz_order, wal_order) = (order(&dbz), order(&wal));
    let (dbz, wal) = (by_id(&dbz)?, by_id(&wal)?);
    // (case, field) -> the smallest (debezium, walcast) example, and how many events
    let mut diffs: BTreeMap<(&str, String), (String, String, usize)> = BTreeMap::new();
    let cases_by_name: HashMap<&str, Case> = prepared
        .iter()
        .map(|p| (p.case.name, p.case.clone()))
        .collect();
    let mut delays: BTreeMap<&str, (Vec<i64>, Vec<i64>)> = BTreeMap::new();
    for (id, (case, written_ms)) in &expected {
        let d = dbz.get(id).with_context(|| format!("Debezium lost {id}"))?;
        let w = wal.get(id).with_context(|| format!("walcast lost {id}"))?;
        let mut diff = |field: String, dv: String, wv: String| {
            if dv != wv {
                let e = diffs
                    .entry((case, field))
                    .or_insert((dv.clone(), wv.clone(), 0));
                if (&dv, &wv) < (&e.0, &e.1) {
                    (e.0, e.1) = (dv, wv);
                }
                e.2 += 1;
            }
        };
        diff("topic".into(), d.topic.clone(), w.topic.clone());
        diff(
            "partition".into(),
            d.partition.to_string(),
            w.partition.to_string(),
        );
        diff("key".into(), format!("{:?}", d.key), format!("{:?}", w.key));
        let cases_by_name: &HashMap<&str, Case> = &cases_by_name;
        let json = cases_by_name.get(case).is_some_and(Case::json_value);
        if json {
            // JsonConverter's output against walcast's: as JSON values
            // (key order, spacing and number spelling aside), and the text.
            let canon = |v: &Option<String>| format!("{:?}", v.as_deref().map(canonical_json));
            diff("value".into(), canon(&d.value), canon(&w.value));
            diff(
                "value text".into(),
                format!("{:?}", d.value),
                format!("{:?}", w.value),
            );
        } else {
            diff(
                "value".into(),
                format!("{:?}", d.value),
                format!("{:?}", w.value),
            );
        }
        let names = |r: &Rec| r.headers.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
        diff(
            "header names".into(),
            format!("{:?}", names(d)),
            format!("{:?}", names(w)),
        );
        let all: BTreeSet<&String> = d.headers.iter().chain(&w.headers).map(|(k, _)| k).collect();
        for k in all {
            let get = |r: &Rec| {
                r.headers
                    .iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v.clone().unwrap_or_else(|| "<null>".into()))
                    .unwrap_or_else(|| "<absent>".into())
            };
            diff(format!("header {k}"), get(d), get(w));
        }
        let kind = |t: rdkafka::Timestamp| match t {
            rdkafka::Timestamp::CreateTime(_) => "CreateTime",
            rdkafka::Timestamp::LogAppendTime(_) => "LogAppendTime",
            rdkafka::Timestamp::NotAvailable => "none",
        };
        diff(
            "timestamp type".into(),
            kind(d.timestamp).into(),
            kind(w.timestamp).into(),
        );
        if cases_by_name.get(case).is_some_and(|c| c.timestamp_column) {
            diff(
                "timestamp".into(),
                format!("{:?}", d.timestamp.to_millis()),
                format!("{:?}", w.timestamp.to_millis()),
            );
        }
        let e = delays.entry(case).or_default();
        e.0.push(d.timestamp.to_millis().unwrap_or(0) - written_ms);
        e.1.push(w.timestamp.to_millis().unwrap_or(0) - written_ms);
    }
    for ((case, topic, partition), ids) in &dbz_order {
        let theirs = wal_order
            .get(&(*case, topic.clone(), *partition))
            .cloned()
            .unwrap_or_default();
        if *ids != theirs {
            diffs.insert(
                (case, "order within a partition".into()),
                (
                    format!("{topic}/{partition}: {ids:?}"),
                    format!("{theirs:?}"),
                    ids.len(),
                ),
            );
        }
    }
    let mut report = String::new();
    for ((case, field), (dv, wv, n)) in &diffs {
        report.push_str(&format!("| {case} | {field} | `{dv}` | `{wv}` | {n} |\n"));
    }
    eprintln!(
        "parity: {total} events in {} cases; Connect streaming after {:.1}s, Debezium done after {:.1}s, walcast done after {:.1}s",
        prepared.len(),
        connect_ready.as_secs_f64(),
        debezium_done.as_secs_f64(),
        walcast_done.as_secs_f64()
    );
    for (case, (d, w)) in &delays {
        eprintln!(
            "parity: {case}: record timestamp - insert time: Debezium {}..{} ms, walcast {}..{} ms (walcast ran after Debezium)",
            d.iter().min().unwrap_or(&0),
            d.iter().max().unwrap_or(&0),
            w.iter().min().unwrap_or(&0),
            w.iter().max().unwrap_or(&0)
        );
    }
    eprintln!("parity: differences (case | field | Debezium | walcast | events):\n{report}");
    let _ = std::io::stderr().flush();
    let found: BTreeSet<(String, String)> = diffs
        .keys()
        .map(|(c, f)| (c.to_string(), f.clone()))
        .collect();
    let known: BTreeSet<(String, String)> = KNOWN_DIFFERENCES
        .iter()
        .flat_map(|(cs, f, _)| cs.iter().map(move |c| (c.to_string(), f.to_string())))
        .collect();
    let new: Vec<_> = found.difference(&known).collect();
    let gone: Vec<_> = known.difference(&found).collect();
    ensure!(
        new.is_empty() && gone.is_empty(),
        "parity with Debezium changed.\nnew differences: {new:#?}\nlisted differences no longer seen: {gone:#?}"
    );
    Ok(())
}
