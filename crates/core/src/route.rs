//! Routing an outbox row to a Kafka record, with Debezium Outbox EventRouter
//! semantics and defaults so users recognise them: topic
//! `outbox.event.${routedByValue}` (the `aggregatetype` column), key =
//! `aggregateid`, value = `payload`, header `id`.
//!
//! Each outbox table has a [`RouteSpec`] (the `[outbox]` section is the
//! default route; `[[outbox.route]]` entries override it per table). The
//! [`crate::outbox::OutboxFilter`] reads the columns a route needs
//! ([`RouteSpec::columns`]) into an [`OutboxRow`]; the [`Router`] turns the row
//! into an [`OutboxEvent`]: topic, key, value (as-is, JSON-expanded, in an
//! envelope, or a tombstone), record timestamp, partition and headers.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use walcast_pgoutput::{Lsn, PgTimestamp};

use crate::config::TableName;
use crate::dead_letter::{Reason, Rejected};
use crate::error::{Error, Result};

/// The placeholder replaced by the routing column's value.
pub const ROUTED_BY_VALUE: &str = "${routedByValue}";
/// Debezium's default `route.topic.regex`.
pub const DEFAULT_TOPIC_REGEX: &str = "(?<routedByValue>.*)";

/// The header that carries the event id (consumers deduplicate on it).
pub const HEADER_ID: &str = "id";
/// The header that carries the event type.
pub const HEADER_TYPE: &str = "type";

/// Type OIDs the router interprets.
pub mod oid {
    /// `bool`
    pub const BOOL: u32 = 16;
    /// `bytea`
    pub const BYTEA: u32 = 17;
    /// `int8`
    pub const INT8: u32 = 20;
    /// `int2`
    pub const INT2: u32 = 21;
    /// `int4`
    pub const INT4: u32 = 23;
    /// `json`
    pub const JSON: u32 = 114;
    /// `float4`
    pub const FLOAT4: u32 = 700;
    /// `float8`
    pub const FLOAT8: u32 = 701;
    /// `timestamp`
    pub const TIMESTAMP: u32 = 1114;
    /// `timestamptz`
    pub const TIMESTAMPTZ: u32 = 1184;
    /// `jsonb`
    pub const JSONB: u32 = 3802;
}

/// A parsed topic template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    prefix: String,
    suffix: Option<String>,
}

/// `s` with the characters that mean something in a regular expression
/// escaped (topic names only have `.` among them).
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if ".^$|()[]{}*+?\\".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn valid_topic_chars(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

fn valid_topic(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= 249
        && valid_topic_chars(topic)
        && topic != "."
        && topic != ".."
}

impl TopicTemplate {
    /// Parses a template: literal topic characters (`[a-zA-Z0-9._-]`) with at
    /// most one `${routedByValue}`.
    ///
    /// # Errors
    /// An operator error naming `outbox.topic`.
    pub fn parse(template: &str) -> Result<Self> {
        Self::parse_for("outbox.topic", template)
    }

    /// As [`TopicTemplate::parse`], naming `option` in the error.
    ///
    /// # Errors
    /// An operator error naming `option`.
    pub fn parse_for(option: &str, template: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::operator(format!("{option} = {template:?} is not a valid topic template: {why}"))
                .with_hint("use letters, digits, '.', '_', '-' and at most one ${routedByValue}, e.g. outbox.event.${routedByValue}")
        };
        let (prefix, suffix) = match template.split_once(ROUTED_BY_VALUE) {
            Some((p, s)) => (p, Some(s)),
            None => (template, None),
        };
        for part in [Some(prefix), suffix].into_iter().flatten() {
            if !valid_topic_chars(part) {
                return Err(bad("it has characters Kafka does not allow in topic names"));
            }
        }
        if suffix.is_none() && prefix.is_empty() {
            return Err(bad("it is empty"));
        }
        if template.len() > 249 {
            return Err(bad("it is longer than 249 characters"));
        }
        Ok(TopicTemplate {
            prefix: prefix.to_string(),
            suffix: suffix.map(str::to_string),
        })
    }

    /// Whether the template uses the routing value (otherwise it is a fixed topic).
    pub fn uses_routed_value(&self) -> bool {
        self.suffix.is_some()
    }

    /// The topic for a routing value.
    ///
    /// # Errors
    /// A permanent error when the result is not a valid topic name.
    pub fn render(&self, routed_by: &str) -> Result<String> {
        let topic = match &self.suffix {
            None => self.prefix.clone(),
            Some(s) => format!("{}{routed_by}{s}", self.prefix),
        };
        if !valid_topic(&topic) {
            return Err(Error::permanent(format!(
                "routing value {routed_by:?} gives the topic name {topic:?}, which Kafka does not allow"
            ))
            .with_hint("fix the row's routing column (letters, digits, '.', '_', '-') or change the topic template"));
        }
        Ok(topic)
    }

    /// A regular expression (not anchored) that matches every topic this
    /// template renders, for subscribing to them (`walcast tail`).
    pub fn pattern(&self) -> String {
        match &self.suffix {
            None => regex_escape(&self.prefix),
            Some(s) => format!("{}.*{}", regex_escape(&self.prefix), regex_escape(s)),
        }
    }

    /// Whether `topic` is one this template can render (for finding the
    /// outbox topics that already exist in a cluster).
    pub fn matches(&self, topic: &str) -> bool {
        match &self.suffix {
            None => topic == self.prefix,
            Some(s) => {
                topic.len() >= self.prefix.len() + s.len()
                    && topic.starts_with(&self.prefix)
                    && topic.ends_with(s.as_str())
            }
        }
    }
}

/// How a route names the topic: Debezium's `route.topic.regex` applied to the
/// `route.by.field` value (the whole value must match, as Kafka Connect's
/// RegexRouter does), replaced by `route.topic.replacement`. A value the
/// regex does not match is the topic itself (RegexRouter leaves it unchanged).
#[derive(Debug, Clone)]
pub enum TopicRule {
    /// The default regex: the replacement is a template with at most one
    /// `${routedByValue}` (or a fixed topic without it).
    Template(TopicTemplate),
    /// A custom regex.
    Regex {
        /// The regex, anchored at both ends.
        regex: regex::Regex,
        /// The replacement (`$name`, `${name}`, `$1` refer to groups).
        replacement: String,
    },
}

impl TopicRule {
    /// Builds the rule from Debezium's two options; `option` names the
    /// route in errors.
    ///
    /// # Errors
    /// An operator error for an invalid regex or replacement.
    pub fn new(option: &str, regex: &str, replacement: &str) -> Result<Self> {
        if regex == DEFAULT_TOPIC_REGEX {
            if let Ok(t) =
                TopicTemplate::parse_for(&format!("{option}.route_topic_replacement"), replacement)
            {
                return Ok(TopicRule::Template(t));
            }
        }
        let re = regex::Regex::new(&format!("^(?:{regex})$")).map_err(|e| {
            Error::operator(format!("{option}.route_topic_regex = {regex:?} is not a valid regular expression: {e}"))
                .with_hint("write it in the syntax of Java's java.util.regex (named groups as (?<name>...)); the whole routing value must match")
        })?;
        let literal: String = {
            // Group references removed; what is left must be topic characters.
            let refs = regex::Regex::new(r"\$(\{[A-Za-z0-9_]+\}|[A-Za-z0-9_]+)").expect("valid");
            refs.replace_all(replacement, "").into_owned()
        };
        if !valid_topic_chars(&literal) || replacement.len() > 249 {
            return Err(Error::operator(format!(
                "{option}.route_topic_replacement = {replacement:?} is not a valid topic replacement"
            ))
            .with_hint("use letters, digits, '.', '_', '-' and group references such as ${routedByValue} or $1"));
        }
        if replacement.is_empty() {
            return Err(Error::operator(format!(
                "{option}.route_topic_replacement is empty"
            )));
        }
        Ok(TopicRule::Regex {
            regex: re,
            replacement: replacement.to_string(),
        })
    }

    /// Whether the topic depends on the routing column.
    pub fn uses_routed_value(&self) -> bool {
        match self {
            TopicRule::Template(t) => t.uses_routed_value(),
            TopicRule::Regex { .. } => true,
        }
    }

    /// The topic for a routing value.
    ///
    /// # Errors
    /// A permanent error when the result is not a valid topic name.
    pub fn render(&self, routed_by: &str) -> Result<String> {
        match self {
            TopicRule::Template(t) => t.render(routed_by),
            TopicRule::Regex { regex, replacement } => {
                let topic = match regex.captures(routed_by) {
                    Some(caps) => {
                        let mut out = String::new();
                        caps.expand(replacement, &mut out);
                        out
                    }
                    None => routed_by.to_string(),
                };
                if !valid_topic(&topic) {
                    return Err(Error::permanent(format!(
                        "routing value {routed_by:?} gives the topic name {topic:?}, which Kafka does not allow"
                    ))
                    .with_hint("fix the row's routing column or the route's route_topic_regex / route_topic_replacement"));
                }
                Ok(topic)
            }
        }
    }

    /// A regular expression (not anchored) that matches every topic this
    /// rule renders from a routing value its regex matches: each group
    /// reference of the replacement becomes `.*`. (A value the regex does
    /// not match is the topic itself: any name, not covered.)
    pub fn pattern(&self) -> String {
        match self {
            TopicRule::Template(t) => t.pattern(),
            TopicRule::Regex { replacement, .. } => {
                let refs =
                    regex::Regex::new(r"\$(\{[A-Za-z0-9_]+\}|[A-Za-z0-9_]+)").expect("valid");
                let mut out = String::new();
                let mut last = 0;
                for m in refs.find_iter(replacement) {
                    out.push_str(&regex_escape(&replacement[last..m.start()]));
                    out.push_str(".*");
                    last = m.end();
                }
                out.push_str(&regex_escape(&replacement[last..]));
                out
            }
        }
    }

    /// Whether `topic` may be one this rule renders (for reading the limits
    /// of existing topics; a regex rule matches every topic that starts with
    /// the replacement's literal prefix).
    pub fn matches(&self, topic: &str) -> bool {
        match self {
            TopicRule::Template(t) => t.matches(topic),
            TopicRule::Regex { replacement, .. } => {
                let prefix = replacement.split('$').next().unwrap_or_default();
                topic.starts_with(prefix)
            }
        }
    }
}

/// Something that tells whether walcast may produce to a topic (for
/// reading the limits of the outbox topics that already exist).
pub trait TopicMatcher: Send + Sync {
    /// Whether `topic` may receive outbox events.
    fn may_render(&self, topic: &str) -> bool;
}

impl TopicMatcher for TopicTemplate {
    fn may_render(&self, topic: &str) -> bool {
        self.matches(topic)
    }
}

/// What to do with an UPDATE or DELETE of an outbox table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OpBehavior {
    /// Skip it, counted in `walcast_events_skipped_total{reason}`.
    Ignore,
    /// Skip it, counted, with a warning naming the table and LSN.
    #[default]
    Warn,
    /// Stop (exit 3) before the slot passes it.
    Stop,
}

/// Where an additional column goes (Debezium `table.fields.additional.placement`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// A record header with this name.
    Header(Arc<str>),
    /// A field of the JSON envelope with this name.
    Envelope(String),
    /// The record's partition number (an integer column).
    Partition,
}

/// One additional column and its placement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdditionalField {
    /// Column name.
    pub column: String,
    /// Placement.
    pub placement: Placement,
}

/// Parses Debezium's `table.fields.additional.placement`:
/// `column:header[:alias],column:envelope[:alias],column:partition`.
///
/// # Errors
/// An operator error naming `option` and the entry.
pub fn parse_additional_placement(option: &str, spec: &str) -> Result<Vec<AdditionalField>> {
    let mut out = Vec::new();
    for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let parts: Vec<&str> = entry.split(':').map(str::trim).collect();
        let bad = |why: &str| {
            Error::operator(format!("{option}: entry {entry:?} is not valid: {why}"))
                .with_hint("write column:header[:alias], column:envelope[:alias] or column:partition, separated by commas")
        };
        if parts.len() < 2 || parts.len() > 3 || parts[0].is_empty() {
            return Err(bad("expected column:placement[:alias]"));
        }
        let alias = parts.get(2).copied().unwrap_or(parts[0]);
        if alias.is_empty() {
            return Err(bad("the alias is empty"));
        }
        let placement = match parts[1].to_ascii_lowercase().as_str() {
            "header" => Placement::Header(Arc::from(alias)),
            "envelope" => {
                if alias == "payload" {
                    return Err(bad(
                        "the envelope field \"payload\" holds the payload itself",
                    ));
                }
                Placement::Envelope(alias.to_string())
            }
            "partition" => {
                if parts.len() == 3 {
                    return Err(bad("a partition placement takes no alias"));
                }
                Placement::Partition
            }
            other => return Err(bad(&format!("unknown placement {other:?}"))),
        };
        out.push(AdditionalField {
            column: parts[0].to_string(),
            placement,
        });
    }
    if out
        .iter()
        .filter(|f| f.placement == Placement::Partition)
        .count()
        > 1
    {
        return Err(Error::operator(format!(
            "{option}: more than one column is placed as the partition"
        )));
    }
    Ok(out)
}

/// Header names (`[outbox.headers]`); `None` leaves that header out.
#[derive(Debug, Clone)]
pub struct HeaderNames {
    /// Event id (always sent; delivery rule 9).
    pub id: Arc<str>,
    /// Event type.
    pub event_type: Option<Arc<str>>,
    /// Schema version (`table_field_event_schema_version`).
    pub schema_version: Option<Arc<str>>,
    /// Commit LSN of the source transaction.
    pub source_lsn: Option<Arc<str>>,
    /// Commit time of the source transaction (RFC 3339, UTC, microseconds).
    pub commit_time: Option<Arc<str>>,
    /// W3C `traceparent` from the tracing column.
    pub traceparent: Option<Arc<str>>,
    /// W3C `tracestate` from the tracing column.
    pub tracestate: Option<Arc<str>>,
    /// Correlation id from its column.
    pub correlation_id: Option<Arc<str>>,
}

impl Default for HeaderNames {
    fn default() -> Self {
        HeaderNames {
            id: Arc::from(HEADER_ID),
            event_type: Some(Arc::from(HEADER_TYPE)),
            schema_version: Some(Arc::from("schema_version")),
            source_lsn: Some(Arc::from("walcast.source.lsn")),
            commit_time: Some(Arc::from("walcast.commit.time")),
            traceparent: Some(Arc::from("traceparent")),
            tracestate: Some(Arc::from("tracestate")),
            correlation_id: Some(Arc::from("correlation_id")),
        }
    }
}

/// How one outbox table's rows become records.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    /// How the route is named in messages (`outbox` or `outbox.route[public.t]`).
    pub option: String,
    /// Event id column (`id` header).
    pub id: String,
    /// Record key column.
    pub key: String,
    /// Payload column.
    pub payload: String,
    /// Routing column (`route_by_field`), needed when the topic rule uses it.
    pub route_by: String,
    /// Event type column; optional in the table unless `type_required`.
    pub event_type: Option<String>,
    /// Whether the event type column must exist.
    pub type_required: bool,
    /// Record timestamp column.
    pub timestamp: Option<String>,
    /// Schema version column.
    pub schema_version: Option<String>,
    /// Tracing span context column (`traceparent`, or Java properties with
    /// `traceparent=` and `tracestate=` lines as Debezium writes them).
    pub tracing: Option<String>,
    /// Correlation id column.
    pub correlation_id: Option<String>,
    /// Additional columns.
    pub additional: Vec<AdditionalField>,
    /// Topic rule.
    pub topic: TopicRule,
    /// Expand a JSON payload (Debezium `table.expand.json.payload`).
    pub expand_json: bool,
    /// NULL or blank payload → tombstone (Debezium `route.tombstone.on.empty.payload`).
    pub tombstone_on_empty: bool,
    /// UPDATE behaviour (Debezium `table.op.invalid.behavior`).
    pub on_update: OpBehavior,
    /// DELETE behaviour.
    pub on_delete: OpBehavior,
    /// What happens to a row that can never be published.
    pub on_permanent_error: OnPermanentError,
}

/// A route's policy for events that can never be published (its
/// `on_permanent_error` and `dead_letter_topic`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum OnPermanentError {
    /// The pipeline's (`pipeline.on_permanent_error`).
    #[default]
    Inherit,
    /// Stop at the event.
    Stop,
    /// Deliver the event's dead-letter record to this topic instead.
    DeadLetter(Arc<str>),
}

impl OnPermanentError {
    /// The dead-letter topic under this policy, `pipeline` being the
    /// pipeline's (`None`: stop).
    pub fn topic(&self, pipeline: Option<&Arc<str>>) -> Option<Arc<str>> {
        match self {
            OnPermanentError::Inherit => pipeline.cloned(),
            OnPermanentError::Stop => None,
            OnPermanentError::DeadLetter(t) => Some(t.clone()),
        }
    }
}

/// What kind of value a column must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    /// Any type (sent in its text form; `bytea` as its bytes).
    Any,
    /// `timestamp`, `timestamptz` or an integer of milliseconds since the epoch.
    Timestamp,
    /// An integer type.
    Integer,
}

/// A column a route reads.
#[derive(Debug, Clone)]
pub struct ColumnNeed {
    /// The option that names it (for errors).
    pub option: String,
    /// The column name.
    pub column: String,
    /// Whether the table must have it.
    pub required: bool,
    /// What it must hold.
    pub kind: ColumnKind,
}

/// Slot positions in [`OutboxRow::values`] (then the additional columns).
pub mod slot {
    /// Event id.
    pub const ID: usize = 0;
    /// Key.
    pub const KEY: usize = 1;
    /// Payload.
    pub const PAYLOAD: usize = 2;
    /// Routing column.
    pub const ROUTE_BY: usize = 3;
    /// Event type.
    pub const TYPE: usize = 4;
    /// Timestamp.
    pub const TIMESTAMP: usize = 5;
    /// Schema version.
    pub const SCHEMA_VERSION: usize = 6;
    /// Tracing span context.
    pub const TRACING: usize = 7;
    /// Correlation id.
    pub const CORRELATION: usize = 8;
    /// First additional column.
    pub const ADDITIONAL: usize = 9;
}

impl RouteSpec {
    /// The default route with the given column names and topic rule
    /// (`[outbox]`, no additional columns).
    pub fn legacy(columns: &crate::config::OutboxColumns, topic: TopicRule) -> Self {
        RouteSpec {
            option: "outbox".into(),
            id: columns.id.clone(),
            key: columns.aggregateid.clone(),
            payload: columns.payload.clone(),
            route_by: columns.aggregatetype.clone(),
            event_type: Some(columns.r#type.clone()),
            type_required: false,
            timestamp: None,
            schema_version: None,
            tracing: None,
            correlation_id: None,
            additional: Vec::new(),
            topic,
            expand_json: false,
            tombstone_on_empty: false,
            on_update: OpBehavior::Warn,
            on_delete: OpBehavior::Ignore,
            on_permanent_error: OnPermanentError::Inherit,
        }
    }

    /// The columns this route reads, by slot (see [`slot`]).
    pub fn columns(&self) -> Vec<Option<ColumnNeed>> {
        let o = &self.option;
        let need = |opt: &str, col: &str, required: bool, kind: ColumnKind| {
            Some(ColumnNeed {
                option: format!("{o}.{opt}"),
                column: col.to_string(),
                required,
                kind,
            })
        };
        let legacy = o == "outbox";
        let name = |legacy_name: &str, route_name: &str| {
            if legacy {
                format!("columns.{legacy_name}")
            } else {
                route_name.to_string()
            }
        };
        let mut v = vec![
            need(
                &name("id", "table_field_event_id"),
                &self.id,
                true,
                ColumnKind::Any,
            ),
            need(
                &name("aggregateid", "table_field_event_key"),
                &self.key,
                true,
                ColumnKind::Any,
            ),
            need(
                &name("payload", "table_field_event_payload"),
                &self.payload,
                true,
                ColumnKind::Any,
            ),
            if self.topic.uses_routed_value() {
                need(
                    &name("aggregatetype", "route_by_field"),
                    &self.route_by,
                    true,
                    ColumnKind::Any,
                )
            } else {
                None
            },
            self.event_type.as_ref().and_then(|c| {
                need(
                    &name("type", "table_field_event_type"),
                    c,
                    self.type_required,
                    ColumnKind::Any,
                )
            }),
            self.timestamp.as_ref().and_then(|c| {
                need(
                    "table_field_event_timestamp",
                    c,
                    true,
                    ColumnKind::Timestamp,
                )
            }),
            self.schema_version.as_ref().and_then(|c| {
                need(
                    "table_field_event_schema_version",
                    c,
                    true,
                    ColumnKind::Integer,
                )
            }),
            self.tracing
                .as_ref()
                .and_then(|c| need("tracing_span_context_field", c, true, ColumnKind::Any)),
            self.correlation_id
                .as_ref()
                .and_then(|c| need("correlation_id_field", c, true, ColumnKind::Any)),
        ];
        for f in &self.additional {
            let kind = if f.placement == Placement::Partition {
                ColumnKind::Integer
            } else {
                ColumnKind::Any
            };
            v.push(need(
                "table_fields_additional_placement",
                &f.column,
                true,
                kind,
            ));
        }
        v
    }

    /// The columns the table must have: `(option, column)`.
    pub fn required_columns(&self) -> Vec<(String, String)> {
        self.columns()
            .into_iter()
            .flatten()
            .filter(|c| c.required)
            .map(|c| (c.option, c.column))
            .collect()
    }
}

/// What a table-less outbox message's record value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MessageValue {
    /// The envelope's `payload` (as an outbox row's payload column).
    #[default]
    Payload,
    /// The whole `walcast.v1.Envelope` in protobuf form, with `source` filled in.
    Envelope,
}

/// How transactional logical decoding messages with one prefix become
/// records (the table-less outbox; content: `walcast.v1.Envelope`, protobuf
/// or JSON, see docs/envelope.md).
#[derive(Debug, Clone)]
pub struct MessageRoute {
    /// How the route is named in messages (`outbox.message_route[prefix]`).
    pub option: String,
    /// The message prefix (exact match).
    pub prefix: String,
    /// Topic rule over the envelope's `aggregate_type`.
    pub topic: TopicRule,
    /// Empty payload → tombstone.
    pub tombstone_on_empty: bool,
    /// What the record value is.
    pub value: MessageValue,
    /// What happens to a message that can never be published.
    pub on_permanent_error: OnPermanentError,
}

/// Every route, and which table uses which.
#[derive(Debug, Clone)]
pub struct Routes {
    /// The routes; index 0 is the default route (`[outbox]`).
    pub specs: Arc<[RouteSpec]>,
    /// Each outbox table with its route's index.
    pub tables: Vec<(TableName, usize)>,
    /// Table-less outbox routes, by prefix.
    pub messages: Arc<[MessageRoute]>,
}

impl Routes {
    /// One route for all `tables`.
    pub fn single(spec: RouteSpec, tables: impl IntoIterator<Item = TableName>) -> Self {
        Routes {
            specs: Arc::from(vec![spec]),
            tables: tables.into_iter().map(|t| (t, 0)).collect(),
            messages: Arc::from(Vec::new()),
        }
    }

    /// The columns each table must have: `(table, [(option, column)])`.
    pub fn required_columns(&self) -> Vec<(TableName, Vec<(String, String)>)> {
        self.tables
            .iter()
            .map(|(t, i)| (t.clone(), self.specs[*i].required_columns()))
            .collect()
    }

    /// Each outbox table's key column (the record key; a key-hash split of
    /// `[[pipelines]]` hashes it).
    pub fn key_columns(&self) -> Vec<(TableName, String)> {
        self.tables
            .iter()
            .map(|(t, i)| (t.clone(), self.specs[*i].key.clone()))
            .collect()
    }
}

impl Routes {
    /// An anchored regular expression that matches every topic the routes in
    /// use render (each table's route and each message route), for
    /// subscribing to them (`walcast tail`), in the syntax both librdkafka
    /// (POSIX extended, no `(?:`) and the `regex` crate read: `^(a|b)$`.
    pub fn topics_regex(&self) -> String {
        let mut patterns: Vec<String> = Vec::new();
        let used = self
            .specs
            .iter()
            .enumerate()
            .filter(|(i, _)| self.tables.iter().any(|(_, r)| r == i))
            .map(|(_, s)| s.topic.pattern())
            .chain(self.messages.iter().map(|m| m.topic.pattern()));
        for p in used {
            if !patterns.contains(&p) {
                patterns.push(p);
            }
        }
        format!("^({})$", patterns.join("|"))
    }
}

impl TopicMatcher for Routes {
    /// Whether `topic` may be rendered by a route (see [`TopicRule::matches`]).
    fn may_render(&self, topic: &str) -> bool {
        self.tables
            .iter()
            .any(|(_, i)| self.specs[*i].topic.matches(topic))
            || self.messages.iter().any(|m| m.topic.matches(topic))
    }
}

/// One column value of a row: its bytes (text form; `bytea` decoded) and type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cell {
    /// The value.
    pub bytes: Bytes,
    /// The column's type OID.
    pub type_oid: u32,
}

/// The columns one route reads of one row, by slot (see [`slot`]); `None`
/// is SQL NULL or a column the route does not read.
#[derive(Debug, Clone, Default)]
pub struct OutboxRow {
    /// Index of the route in [`Routes::specs`].
    pub route: usize,
    /// Values by slot.
    pub values: Vec<Option<Cell>>,
}

impl OutboxRow {
    fn take(&mut self, slot: usize) -> Option<Cell> {
        self.values.get_mut(slot).and_then(Option::take)
    }
}

/// One record header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Name.
    pub name: Arc<str>,
    /// Value.
    pub value: Bytes,
}

/// An event ready for Kafka.
#[derive(Debug, Clone)]
pub struct OutboxEvent {
    /// Destination topic.
    pub topic: Arc<str>,
    /// Record key (the aggregate id).
    pub key: Bytes,
    /// Record value (empty for a tombstone).
    pub payload: Bytes,
    /// A tombstone: the record has no value (NULL), not an empty one.
    pub tombstone: bool,
    /// Record headers, the event id first.
    pub headers: Vec<Header>,
    /// The record timestamp (ms since the Unix epoch); `None`: the producer's clock.
    pub timestamp_ms: Option<i64>,
    /// The partition, when a column chooses it; `None`: by key.
    pub partition: Option<i32>,
    /// Commit LSN of the source transaction (for diagnostics and dead letters).
    pub source_lsn: Lsn,
    /// The outbox table, `schema.table`.
    pub table: Arc<str>,
    /// The W3C `traceparent` of the request that wrote the row, when the
    /// outbox has such a column: the transaction's span links to it.
    pub traceparent: Option<Bytes>,
    /// The W3C `tracestate` that goes with `traceparent`, when present.
    pub tracestate: Option<Bytes>,
    /// The correlation id, when the outbox has such a column: a field of the
    /// event's log lines.
    pub correlation_id: Option<Bytes>,
}

impl OutboxEvent {
    /// An event with the given essentials (no timestamp, partition or trace data).
    pub fn new(
        topic: Arc<str>,
        key: Bytes,
        payload: Bytes,
        headers: Vec<Header>,
        source_lsn: Lsn,
        table: Arc<str>,
    ) -> Self {
        OutboxEvent {
            topic,
            key,
            payload,
            tombstone: false,
            headers,
            timestamp_ms: None,
            partition: None,
            source_lsn,
            table,
            traceparent: None,
            tracestate: None,
            correlation_id: None,
        }
    }

    /// Bytes this event occupies in flight (key + value + headers), for flow control.
    pub fn size_bytes(&self) -> u64 {
        let headers: usize = self
            .headers
            .iter()
            .map(|h| h.name.len() + h.value.len())
            .sum();
        (self.key.len() + self.payload.len() + headers + self.topic.len()) as u64
    }

    /// The event id header's value (the first header).
    pub fn event_id(&self) -> &[u8] {
        self.headers
            .first()
            .map(|h| &h.value[..])
            .unwrap_or_default()
    }
}

/// Turns outbox rows into events.
#[derive(Debug)]
pub struct Router {
    specs: Arc<[RouteSpec]>,
    messages: Arc<[MessageRoute]>,
    message_topics: Vec<HashMap<Bytes, Arc<str>>>,
    headers: HeaderNames,
    topics: Vec<HashMap<Bytes, Arc<str>>>,
    tracing_warned: bool,
    /// The source-LSN and commit-time header values of the last transaction:
    /// every event of a transaction carries the same ones.
    lsn_header: Option<(Lsn, Bytes)>,
    time_header: Option<(i64, Bytes)>,
}

fn text(b: &[u8]) -> Option<&str> {
    std::str::from_utf8(b).ok()
}

impl Router {
    /// A router with one default route rendering `template` (the
    /// `[outbox]` columns' defaults) and the default header names.
    pub fn new(template: TopicTemplate) -> Self {
        let spec = RouteSpec::legacy(
            &crate::config::OutboxColumns::default(),
            TopicRule::Template(template),
        );
        Self::with_routes(&Routes::single(spec, []), HeaderNames::default())
    }

    /// A router for `routes` (the filter must be built from the same routes).
    pub fn with_routes(routes: &Routes, headers: HeaderNames) -> Self {
        Router {
            specs: routes.specs.clone(),
            messages: routes.messages.clone(),
            message_topics: vec![HashMap::new(); routes.messages.len()],
            topics: vec![HashMap::new(); routes.specs.len()],
            headers,
            tracing_warned: false,
            lsn_header: None,
            time_header: None,
        }
    }

    /// Routes one row from `table`, of a transaction committed at
    /// `source_lsn` and `commit_time_micros` (microseconds since 2000-01-01).
    ///
    /// # Errors
    /// A permanent error (the row can never be published as it is) when a
    /// required column is NULL, the topic would be invalid, the payload is
    /// not JSON but must be expanded, or the timestamp or partition column
    /// holds no usable value. The message names the table, the event id and
    /// the LSN so the row can be found; a [`Rejected`] is attached for the
    /// dead-letter policy.
    pub fn route(
        &mut self,
        table: &Arc<str>,
        source_lsn: Lsn,
        commit_time_micros: i64,
        mut row: OutboxRow,
    ) -> Result<OutboxEvent> {
        let specs = self.specs.clone();
        let spec = specs.get(row.route).ok_or_else(|| {
            Error::permanent(format!(
                "row of {table} names route {} which does not exist",
                row.route
            ))
        })?;
        let id = row.take(slot::ID).map(|c| c.bytes);
        let key = row.take(slot::KEY).map(|c| c.bytes);
        let payload = row.take(slot::PAYLOAD);
        // The id as text only when an error needs it.
        let id_for_errors = id.clone();
        let id_text = || {
            id_for_errors
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_else(|| "NULL".into())
        };
        let mut headers: Vec<Header> = Vec::with_capacity(8);
        if let Some(id) = &id {
            headers.push(Header {
                name: self.headers.id.clone(),
                value: id.clone(),
            });
        }
        // The event type right after the id (the order of the headers), and
        // before any check, so a dead-letter record of a refused row keeps it.
        if let (Some(name), Some(t)) = (&self.headers.event_type, row.take(slot::TYPE)) {
            headers.push(Header {
                name: name.clone(),
                value: t.bytes,
            });
        }
        let payload_bytes = payload.as_ref().map(|c| c.bytes.clone());
        let unroutable = |reason: Reason, what: &str, headers: &[Header]| {
            let id_text = id_text();
            Error::permanent(format!(
                "outbox row in {table} (id {id_text}, commit LSN {source_lsn}) cannot be published: {what}"
            ))
            .with_hint("walcast stops here without moving the slot past this row: fix the writer, then remove or repair the row's effects (for example by accepting the gap with a new slot) and restart; or set pipeline.on_permanent_error = \"dead-letter\"")
            .with_rejected(Rejected {
                reason,
                topic: None,
                key: key.clone(),
                value: payload_bytes.clone(),
                headers: headers.to_vec(),
                table: table.clone(),
                source_lsn,
            })
            .with_event(id_text.as_bytes(), None)
        };
        let Some(id) = id else {
            return Err(unroutable(
                Reason::NullId,
                &format!("its {} column is NULL (the event id)", spec.id),
                &headers,
            ));
        };
        let _ = id;
        let Some(key_bytes) = key.clone() else {
            return Err(unroutable(
                Reason::NullKey,
                &format!(
                    "its {} column is NULL (the record key keeps one aggregate's events in order)",
                    spec.key
                ),
                &headers,
            ));
        };
        // Topic.
        let topic = if spec.topic.uses_routed_value() {
            let Some(routed_by) = row.take(slot::ROUTE_BY).map(|c| c.bytes) else {
                return Err(unroutable(
                    Reason::Unroutable,
                    &format!(
                        "its {} column is NULL (it selects the topic)",
                        spec.route_by
                    ),
                    &headers,
                ));
            };
            let cache = &mut self.topics[row.route];
            match cache.get(&routed_by) {
                Some(t) => t.clone(),
                None => {
                    let Some(value) = text(&routed_by) else {
                        return Err(unroutable(
                            Reason::Unroutable,
                            &format!("its routing column {:?} is not valid UTF-8", spec.route_by),
                            &headers,
                        ));
                    };
                    let topic: Arc<str> = match spec.topic.render(value) {
                        Ok(t) => Arc::from(t),
                        Err(e) => {
                            return Err(unroutable(Reason::InvalidTopic, e.message(), &headers))
                        }
                    };
                    if cache.len() > 10_000 {
                        cache.clear();
                    }
                    cache.insert(routed_by, topic.clone());
                    topic
                }
            }
        } else {
            let cache = &mut self.topics[row.route];
            match cache.get(&Bytes::new()) {
                Some(t) => t.clone(),
                None => {
                    let t: Arc<str> = match spec.topic.render("") {
                        Ok(t) => Arc::from(t),
                        Err(e) => {
                            return Err(unroutable(Reason::InvalidTopic, e.message(), &headers))
                        }
                    };
                    cache.insert(Bytes::new(), t.clone());
                    t
                }
            }
        };
        // Additional headers, envelope fields, partition.
        let mut envelope: Vec<(&str, Option<Cell>)> = Vec::new();
        let mut partition = None;
        for (i, f) in spec.additional.iter().enumerate() {
            let cell = row.take(slot::ADDITIONAL + i);
            match &f.placement {
                Placement::Header(name) => {
                    if let Some(c) = cell {
                        headers.push(Header {
                            name: name.clone(),
                            value: c.bytes,
                        });
                    }
                }
                Placement::Envelope(alias) => envelope.push((alias.as_str(), cell)),
                Placement::Partition => {
                    let p = cell
                        .as_ref()
                        .and_then(|c| text(&c.bytes))
                        .and_then(|s| s.parse::<i32>().ok())
                        .filter(|p| *p >= 0);
                    match p {
                        Some(p) => partition = Some(p),
                        None => {
                            return Err(unroutable(
                    Reason::Unroutable,
                                &format!(
                                    "its partition column {:?} is {} (a partition number is an integer from 0)",
                                    f.column,
                                    cell.as_ref()
                                        .map(|c| format!("{:?}", String::from_utf8_lossy(&c.bytes)))
                                        .unwrap_or_else(|| "NULL".into())
                                ),
                                &headers,
                            ))
                        }
                    }
                }
            }
        }
        if let (Some(name), Some(v)) =
            (&self.headers.schema_version, row.take(slot::SCHEMA_VERSION))
        {
            headers.push(Header {
                name: name.clone(),
                value: v.bytes,
            });
        }
        if let Some(name) = &self.headers.source_lsn {
            headers.push(Header {
                name: name.clone(),
                value: match &self.lsn_header {
                    Some((lsn, v)) if *lsn == source_lsn => v.clone(),
                    _ => {
                        let v = Bytes::from(source_lsn.to_string());
                        self.lsn_header = Some((source_lsn, v.clone()));
                        v
                    }
                },
            });
        }
        if let Some(name) = &self.headers.commit_time {
            headers.push(Header {
                name: name.clone(),
                value: match &self.time_header {
                    Some((t, v)) if *t == commit_time_micros => v.clone(),
                    _ => {
                        let v = Bytes::from(rfc3339(commit_time_micros));
                        self.time_header = Some((commit_time_micros, v.clone()));
                        v
                    }
                },
            });
        }
        let (traceparent, tracestate) = match row.take(slot::TRACING) {
            Some(c) => match trace_context(&c.bytes) {
                Some(tc) => tc,
                None => {
                    if !self.tracing_warned {
                        self.tracing_warned = true;
                        tracing::warn!(table = %table, "the tracing column of an outbox row holds no W3C traceparent; the record is sent without trace headers (logged once)");
                    }
                    (None, None)
                }
            },
            None => (None, None),
        };
        for (name, v) in [
            (&self.headers.traceparent, &traceparent),
            (&self.headers.tracestate, &tracestate),
        ] {
            if let (Some(name), Some(v)) = (name, v) {
                headers.push(Header {
                    name: name.clone(),
                    value: v.clone(),
                });
            }
        }
        let correlation_id = row.take(slot::CORRELATION).map(|c| c.bytes);
        if let (Some(name), Some(v)) = (&self.headers.correlation_id, &correlation_id) {
            headers.push(Header {
                name: name.clone(),
                value: v.clone(),
            });
        }
        // Timestamp.
        let timestamp_ms = match row.take(slot::TIMESTAMP) {
            Some(c) => match timestamp_ms(&c) {
                Some(ms) => ms,
                None => {
                    return Err(unroutable(Reason::InvalidRecord,
                        &format!(
                            "its timestamp column {:?} holds {:?}, which is not a usable record timestamp",
                            spec.timestamp.as_deref().unwrap_or_default(),
                            String::from_utf8_lossy(&c.bytes)
                        ),
                        &headers,
                    ))
                }
            },
            None => PgTimestamp::from_pg_micros(commit_time_micros)
                .to_unix_micros()
                .map_or(0, |us| us.div_euclid(1000)),
        };
        // Value.
        let blank = payload
            .as_ref()
            .is_none_or(|c| c.bytes.iter().all(u8::is_ascii_whitespace));
        let (value, tombstone) = if blank && spec.tombstone_on_empty {
            (Bytes::new(), true)
        } else {
            let Some(p) = payload else {
                return Err(unroutable(
                Reason::NullPayload,
                    &format!("its {} column is NULL (the payload; set route_tombstone_on_empty_payload = true to send a tombstone)", spec.payload),
                    &headers,
                ));
            };
            let expanded = if spec.expand_json {
                match compact_json(&p.bytes) {
                    Some(j) => Some(j),
                    None => {
                        return Err(unroutable(Reason::PayloadExpansion,
                            "its payload is not a JSON object or array, but the route expands JSON payloads (table_expand_json_payload)",
                            &headers,
                        ))
                    }
                }
            } else {
                None
            };
            if envelope.is_empty() {
                (expanded.map(Bytes::from).unwrap_or(p.bytes), false)
            } else {
                let mut out = String::with_capacity(p.bytes.len() + 64);
                out.push_str("{\"payload\":");
                match expanded {
                    Some(j) => out.push_str(&j),
                    None => out.push_str(&json_value(&p)),
                }
                for (alias, cell) in &envelope {
                    out.push(',');
                    out.push_str(&serde_json::to_string(alias).unwrap_or_default());
                    out.push(':');
                    match cell {
                        Some(c) => out.push_str(&json_value(c)),
                        None => out.push_str("null"),
                    }
                }
                out.push('}');
                (Bytes::from(out), false)
            }
        };
        Ok(OutboxEvent {
            topic,
            key: key_bytes,
            payload: value,
            tombstone,
            headers,
            timestamp_ms: Some(timestamp_ms),
            partition,
            source_lsn,
            table: table.clone(),
            traceparent,
            tracestate,
            correlation_id,
        })
    }
}

impl Router {
    /// The table-less outbox route for a message prefix, if any.
    pub fn message_route(&self, prefix: &str) -> Option<usize> {
        self.messages.iter().position(|m| m.prefix == prefix)
    }

    /// The policy for rows that can never be published of the route at
    /// `index` of [`Routes::specs`] ([`OutboxRow::route`]).
    pub fn row_policy(&self, index: usize) -> &OnPermanentError {
        self.specs
            .get(index)
            .map_or(&OnPermanentError::Inherit, |s| &s.on_permanent_error)
    }

    /// The policy for messages that can never be published of the message
    /// route at `index` ([`Router::message_route`]).
    pub fn message_policy(&self, index: usize) -> &OnPermanentError {
        self.messages
            .get(index)
            .map_or(&OnPermanentError::Inherit, |m| &m.on_permanent_error)
    }

    /// Every dead-letter topic a route names itself (not inherited).
    pub fn dead_letter_topics(&self) -> Vec<Arc<str>> {
        let mut out: Vec<Arc<str>> = Vec::new();
        let all = self
            .specs
            .iter()
            .map(|s| &s.on_permanent_error)
            .chain(self.messages.iter().map(|m| &m.on_permanent_error));
        for p in all {
            if let OnPermanentError::DeadLetter(t) = p {
                if !out.contains(t) {
                    out.push(t.clone());
                }
            }
        }
        out
    }

    /// Routes a transactional logical decoding message (the table-less
    /// outbox) read at `lsn` in transaction `xid`, committed at `commit_lsn`
    /// and `commit_time_micros` (since 2000-01-01).
    ///
    /// # Errors
    /// A permanent error naming the prefix and LSN when the content is not a
    /// `walcast.v1.Envelope` with an event id, has no `aggregate_id` (the
    /// key), or routes to an invalid topic; a [`Rejected`] is attached.
    pub fn route_message(
        &mut self,
        route: usize,
        lsn: Lsn,
        commit_lsn: Lsn,
        xid: u32,
        commit_time_micros: i64,
        content: &Bytes,
    ) -> Result<OutboxEvent> {
        let m = self.messages[route].clone();
        let origin: Arc<str> = Arc::from(format!("pg_logical_emit_message prefix {:?}", m.prefix));
        let id_name = self.headers.id.clone();
        let fail = |reason: Reason, what: String, env: Option<&walcast_envelope::Envelope>| {
            let headers = env
                .map(|e| {
                    vec![Header {
                        name: id_name.clone(),
                        value: Bytes::from(e.event_id.clone()),
                    }]
                })
                .unwrap_or_default();
            Error::permanent(format!(
                "transactional message with prefix {:?} at LSN {lsn} (transaction {xid}, commit LSN {commit_lsn}) cannot be published: {what}",
                m.prefix
            ))
            .with_hint("walcast stops here without moving the slot past this transaction: fix the writer (the content is a walcast.v1.Envelope, see docs/envelope.md), then accept the gap or repair and restart")
            .with_rejected(Rejected {
                reason,
                topic: None,
                key: env.map(|e| Bytes::from(e.aggregate_id.clone())),
                value: Some(content.clone()),
                headers,
                table: origin.clone(),
                source_lsn: commit_lsn,
            })
        };
        let env = walcast_envelope::decode_message_content(content)
            .map_err(|e| fail(Reason::InvalidRecord, e.to_string(), None))?;
        if env.aggregate_id.is_empty() {
            return Err(fail(
                Reason::NullKey,
                "its aggregate_id (the record key, which keeps one aggregate's events in order) is empty".into(),
                Some(&env),
            ));
        }
        let topic = if m.topic.uses_routed_value() {
            if env.aggregate_type.is_empty() {
                return Err(fail(
                    Reason::Unroutable,
                    "its aggregate_type (it selects the topic) is empty".into(),
                    Some(&env),
                ));
            }
            let k = Bytes::from(env.aggregate_type.clone());
            match self.message_topics[route].get(&k) {
                Some(t) => t.clone(),
                None => {
                    let t: Arc<str> =
                        Arc::from(m.topic.render(&env.aggregate_type).map_err(|e| {
                            fail(Reason::InvalidTopic, e.message().to_string(), Some(&env))
                        })?);
                    if self.message_topics[route].len() > 10_000 {
                        self.message_topics[route].clear();
                    }
                    self.message_topics[route].insert(k, t.clone());
                    t
                }
            }
        } else {
            Arc::from(
                m.topic
                    .render("")
                    .map_err(|e| fail(Reason::InvalidTopic, e.message().to_string(), Some(&env)))?,
            )
        };
        let h = &self.headers;
        let mut headers = vec![Header {
            name: h.id.clone(),
            value: Bytes::from(env.event_id.clone()),
        }];
        let mut push = |name: &Option<Arc<str>>, v: &str| {
            if let Some(name) = name {
                if !v.is_empty() {
                    headers.push(Header {
                        name: name.clone(),
                        value: Bytes::copy_from_slice(v.as_bytes()),
                    });
                }
            }
        };
        push(&h.event_type, &env.event_type);
        for eh in &env.headers {
            headers.push(Header {
                name: Arc::from(eh.key.as_str()),
                value: Bytes::from(eh.value.clone()),
            });
        }
        let mut push = |name: &Option<Arc<str>>, v: &str| {
            if let Some(name) = name {
                if !v.is_empty() {
                    headers.push(Header {
                        name: name.clone(),
                        value: Bytes::copy_from_slice(v.as_bytes()),
                    });
                }
            }
        };
        push(&h.schema_version, &env.schema_version);
        push(&h.source_lsn, &commit_lsn.to_string());
        push(&h.commit_time, &rfc3339(commit_time_micros));
        push(&h.traceparent, &env.traceparent);
        push(&h.tracestate, &env.tracestate);
        push(&h.correlation_id, &env.correlation_id);
        let commit_unix_micros = PgTimestamp::from_pg_micros(commit_time_micros)
            .to_unix_micros()
            .unwrap_or(0);
        let timestamp_ms = if env.timestamp_unix_micros > 0 {
            env.timestamp_unix_micros / 1000
        } else {
            commit_unix_micros.div_euclid(1000)
        };
        let opt = |s: &str| Some(Bytes::copy_from_slice(s.as_bytes())).filter(|b| !b.is_empty());
        let (traceparent, tracestate, correlation_id) = (
            opt(&env.traceparent),
            opt(&env.tracestate),
            opt(&env.correlation_id),
        );
        let key = Bytes::from(env.aggregate_id.clone());
        let (payload, tombstone) = match m.value {
            MessageValue::Payload => {
                let blank = env.payload.iter().all(u8::is_ascii_whitespace);
                if blank && m.tombstone_on_empty {
                    (Bytes::new(), true)
                } else {
                    (Bytes::from(env.payload), false)
                }
            }
            MessageValue::Envelope => {
                let mut env = env;
                env.source = Some(walcast_envelope::SourcePosition {
                    lsn: u64::from(lsn),
                    xid,
                    commit_time_unix_micros: commit_unix_micros,
                    commit_lsn: u64::from(commit_lsn),
                });
                (Bytes::from(walcast_envelope::encode(&env)), false)
            }
        };
        Ok(OutboxEvent {
            topic,
            key,
            payload,
            tombstone,
            headers,
            timestamp_ms: Some(timestamp_ms),
            partition: None,
            source_lsn: commit_lsn,
            table: origin,
            traceparent,
            tracestate,
            correlation_id,
        })
    }
}

/// A column's value as JSON in an envelope: numbers and booleans as such,
/// everything else (including `json`/`jsonb`, as Debezium's `Json` type) as a
/// string.
fn json_value(c: &Cell) -> String {
    let s = String::from_utf8_lossy(&c.bytes);
    match c.type_oid {
        oid::INT2 | oid::INT4 | oid::INT8 => s.into_owned(),
        oid::FLOAT4 | oid::FLOAT8 if s.parse::<f64>().is_ok_and(f64::is_finite) => s.into_owned(),
        oid::BOOL => if s == "t" { "true" } else { "false" }.to_string(),
        _ => serde_json::to_string(&s).unwrap_or_default(),
    }
}

/// Validates a JSON object or array (as Debezium expands only those) and
/// returns it without insignificant whitespace, members in their order.
pub fn compact_json(bytes: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(bytes).ok()?;
    let t = s.trim_start();
    if !(t.starts_with('{') || t.starts_with('[')) {
        return None;
    }
    serde_json::from_str::<serde::de::IgnoredAny>(s).ok()?;
    let mut out = String::with_capacity(s.len());
    let mut in_string = false;
    let mut escaped = false;
    for ch in s.chars() {
        if in_string {
            out.push(ch);
            if escaped {
                escaped = false;
            } else if ch == '\\' {
                escaped = true;
            } else if ch == '"' {
                in_string = false;
            }
        } else if ch == '"' {
            in_string = true;
            out.push(ch);
        } else if !matches!(ch, ' ' | '\t' | '\n' | '\r') {
            out.push(ch);
        }
    }
    Some(out)
}

/// The record timestamp a timestamp column holds (ms since the Unix epoch).
fn timestamp_ms(c: &Cell) -> Option<i64> {
    let s = text(&c.bytes)?;
    match c.type_oid {
        oid::INT2 | oid::INT4 | oid::INT8 => s.parse::<i64>().ok().filter(|v| *v >= 0),
        oid::TIMESTAMP | oid::TIMESTAMPTZ => {
            let ts = PgTimestamp::parse_iso(s, c.type_oid == oid::TIMESTAMPTZ)?;
            ts.to_unix_micros()
                .map(|us| us.div_euclid(1000))
                .filter(|ms| *ms >= 0)
        }
        _ => None,
    }
}

/// `traceparent` and `tracestate` from a tracing column: a bare W3C
/// `traceparent`, or Java properties text with `traceparent=` and
/// `tracestate=` lines (what Debezium's tracing support writes).
fn trace_context(b: &[u8]) -> Option<(Option<Bytes>, Option<Bytes>)> {
    let s = text(b)?.trim();
    let valid = |tp: &str| {
        let parts: Vec<&str> = tp.split('-').collect();
        parts.len() >= 4
            && parts[0].len() == 2
            && parts[1].len() == 32
            && parts[2].len() == 16
            && parts[3].len() == 2
            && parts
                .iter()
                .all(|p| p.bytes().all(|c| c.is_ascii_hexdigit()))
    };
    if valid(s) {
        return Some((Some(Bytes::copy_from_slice(s.as_bytes())), None));
    }
    let mut parent = None;
    let mut state = None;
    for line in s.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        if let Some((k, v)) = line.split_once(['=', ':']) {
            match k.trim() {
                "traceparent" if valid(v.trim()) => {
                    parent = Some(Bytes::copy_from_slice(v.trim().as_bytes()))
                }
                "tracestate" if !v.trim().is_empty() => {
                    state = Some(Bytes::copy_from_slice(v.trim().as_bytes()))
                }
                _ => {}
            }
        }
    }
    parent.map(|p| (Some(p), state))
}

/// The civil date (year, month, day) of a day count since 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
pub(crate) fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// RFC 3339 in UTC with microseconds: `2024-05-06T07:08:09.123456Z`.
pub fn rfc3339(pg_micros: i64) -> String {
    let ts = PgTimestamp::from_pg_micros(pg_micros);
    let Some(us) = ts.to_unix_micros() else {
        return ts.to_string();
    };
    let secs = us.div_euclid(1_000_000);
    let frac = us.rem_euclid(1_000_000);
    let in_day = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{frac:06}Z",
        in_day / 3600,
        in_day / 60 % 60,
        in_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_times_are_rfc3339_utc_with_microseconds() {
        // PostgreSQL counts from 2000-01-01; 946_684_800 s separate the epochs.
        let pg = |unix_us: i64| unix_us - 946_684_800_000_000;
        assert_eq!(rfc3339(pg(0)), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339(pg(1_709_251_199_123_456)),
            "2024-02-29T23:59:59.123456Z"
        );
        assert_eq!(rfc3339(0), "2000-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339(pg(-1)), "1969-12-31T23:59:59.999999Z");
    }

    fn cell(s: &str) -> Option<Cell> {
        Some(Cell {
            bytes: Bytes::copy_from_slice(s.as_bytes()),
            type_oid: 25,
        })
    }

    fn typed(s: &str, type_oid: u32) -> Option<Cell> {
        Some(Cell {
            bytes: Bytes::copy_from_slice(s.as_bytes()),
            type_oid,
        })
    }

    fn row(agg: &str) -> OutboxRow {
        let mut values = vec![None; slot::ADDITIONAL];
        values[slot::ID] = cell("0b0e5b3e-1");
        values[slot::ROUTE_BY] = cell(agg);
        values[slot::KEY] = cell("order-1");
        values[slot::TYPE] = cell("OrderCreated");
        values[slot::PAYLOAD] = typed("{\"a\": 1}", oid::JSONB);
        OutboxRow { route: 0, values }
    }

    fn spec() -> RouteSpec {
        RouteSpec::legacy(
            &crate::config::OutboxColumns::default(),
            TopicRule::new(
                "outbox.route[t]",
                DEFAULT_TOPIC_REGEX,
                "outbox.event.${routedByValue}",
            )
            .unwrap(),
        )
    }

    fn router(spec: RouteSpec) -> Router {
        Router::with_routes(&Routes::single(spec, []), HeaderNames::default())
    }

    const T: i64 = 1_000_000; // 2000-01-01T00:00:01Z

    #[test]
    fn debezium_defaults() {
        let mut r = Router::new(TopicTemplate::parse("outbox.event.${routedByValue}").unwrap());
        let t: Arc<str> = Arc::from("public.outbox");
        let e = r.route(&t, Lsn::from(7), T, row("Order")).unwrap();
        assert_eq!(&*e.topic, "outbox.event.Order");
        assert_eq!(&e.key[..], b"order-1");
        assert_eq!(&e.payload[..], b"{\"a\": 1}");
        assert_eq!(e.event_id(), b"0b0e5b3e-1");
        assert_eq!(&*e.headers[0].name, "id");
        assert_eq!(&*e.headers[1].name, "type");
        assert_eq!(&e.headers[1].value[..], b"OrderCreated");
        let h = |n: &str| {
            e.headers
                .iter()
                .find(|h| &*h.name == n)
                .map(|h| String::from_utf8_lossy(&h.value).into_owned())
        };
        assert_eq!(h("walcast.source.lsn").as_deref(), Some("0/7"));
        assert_eq!(
            h("walcast.commit.time").as_deref(),
            Some("2000-01-01T00:00:01.000000Z")
        );
        assert_eq!(e.timestamp_ms, Some(946_684_801_000));
        assert!(!e.tombstone);
        assert_eq!(e.partition, None);
    }

    #[test]
    fn unroutable_rows_are_permanent_errors_naming_the_row() {
        let mut r = Router::new(TopicTemplate::parse("outbox.event.${routedByValue}").unwrap());
        let t: Arc<str> = Arc::from("public.outbox");
        let err = r.route(&t, Lsn::from(7), T, row("bad topic!")).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Permanent);
        assert!(err.to_string().contains("0b0e5b3e-1"), "{err}");
        // The error carries the row for a dead-letter record.
        let u = err.rejected().expect("dead-letter details attached");
        assert_eq!(u.reason, Reason::InvalidTopic);
        assert_eq!(u.key.as_deref(), Some(&b"order-1"[..]));
        assert_eq!(u.value.as_deref(), Some(&b"{\"a\": 1}"[..]));
        assert_eq!(u.headers[0].value, Bytes::from_static(b"0b0e5b3e-1"));
        assert_eq!(u.event_id(), Some(&b"0b0e5b3e-1"[..]));
        let mut nul = row("x");
        nul.values[slot::KEY] = None;
        let err = r.route(&t, Lsn::from(7), T, nul).unwrap_err();
        assert!(err.to_string().contains("aggregateid"), "{err}");
        assert_eq!(err.rejected().map(|r| r.reason), Some(Reason::NullKey));
        let mut nul = row("x");
        nul.values[slot::PAYLOAD] = None;
        let err = r.route(&t, Lsn::from(7), T, nul).unwrap_err();
        assert_eq!(err.rejected().map(|r| r.reason), Some(Reason::NullPayload));
    }

    #[test]
    fn regex_routing_follows_kafka_connects_regex_router() {
        let mut s = spec();
        s.topic = TopicRule::new("r", "(?<kind>[a-z]+)\\.(?<id>.*)", "events-${kind}").unwrap();
        let mut r = router(s);
        let t: Arc<str> = Arc::from("public.outbox");
        let e = r.route(&t, Lsn::from(7), T, row("order.123")).unwrap();
        assert_eq!(&*e.topic, "events-order");
        // No match: the routing value itself is the topic.
        let e = r.route(&t, Lsn::from(7), T, row("Payment")).unwrap();
        assert_eq!(&*e.topic, "Payment");
        assert!(TopicRule::new("r", "(", "x").is_err());
        assert!(TopicRule::new("r", "(.*)", "bad topic $1").is_err());
        // A fixed topic needs no routing column.
        let mut s = spec();
        s.topic = TopicRule::new("r", DEFAULT_TOPIC_REGEX, "all-events").unwrap();
        assert!(s.columns()[slot::ROUTE_BY].is_none());
        let mut r = router(s);
        let mut nul = row("x");
        nul.values[slot::ROUTE_BY] = None;
        assert_eq!(
            &*r.route(&t, Lsn::from(7), T, nul).unwrap().topic,
            "all-events"
        );
    }

    #[test]
    fn placements_envelope_expansion_tombstones_timestamps() {
        let mut s = spec();
        s.additional = parse_additional_placement(
            "p",
            "type:header:eventType, type:envelope:eventType,version:envelope, part:partition",
        )
        .unwrap();
        s.expand_json = true;
        s.timestamp = Some("created".into());
        let mut r = router(s.clone());
        let t: Arc<str> = Arc::from("public.outbox");
        let mut rw = row("Order");
        rw.values[slot::TIMESTAMP] = typed("2024-05-06 07:08:09.123456+00", oid::TIMESTAMPTZ);
        rw.values.push(cell("OrderCreated"));
        rw.values.push(cell("OrderCreated"));
        rw.values.push(typed("3", oid::INT4));
        rw.values.push(typed("2", oid::INT4));
        let e = r.route(&t, Lsn::from(7), T, rw).unwrap();
        assert_eq!(
            std::str::from_utf8(&e.payload).unwrap(),
            r#"{"payload":{"a":1},"eventType":"OrderCreated","version":3}"#
        );
        assert_eq!(e.partition, Some(2));
        assert_eq!(e.timestamp_ms, Some(1_714_979_289_123));
        assert!(e.headers.iter().any(|h| &*h.name == "eventType"));
        // Not JSON but expanded: unroutable.
        let mut rw = row("Order");
        rw.values[slot::PAYLOAD] = cell("plain");
        rw.values.extend([
            cell("x"),
            cell("x"),
            typed("3", oid::INT4),
            typed("0", oid::INT4),
        ]);
        let err = r.route(&t, Lsn::from(7), T, rw).unwrap_err();
        assert!(
            err.to_string().contains("table_expand_json_payload"),
            "{err}"
        );
        // Negative partition: unroutable.
        let mut rw = row("Order");
        rw.values.extend([
            cell("x"),
            cell("x"),
            typed("3", oid::INT4),
            typed("-1", oid::INT4),
        ]);
        assert!(r
            .route(&t, Lsn::from(7), T, rw)
            .unwrap_err()
            .to_string()
            .contains("partition"));
        // Tombstones.
        let mut s = spec();
        s.tombstone_on_empty = true;
        let mut r = router(s);
        let mut rw = row("Order");
        rw.values[slot::PAYLOAD] = None;
        assert!(r.route(&t, Lsn::from(7), T, rw).unwrap().tombstone);
        let mut rw = row("Order");
        rw.values[slot::PAYLOAD] = cell("  ");
        assert!(r.route(&t, Lsn::from(7), T, rw).unwrap().tombstone);
    }

    #[test]
    fn trace_context_and_correlation_headers() {
        let mut s = spec();
        s.tracing = Some("tracingspancontext".into());
        s.correlation_id = Some("corr".into());
        let mut r = router(s);
        let t: Arc<str> = Arc::from("public.outbox");
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let mut rw = row("Order");
        rw.values[slot::TRACING] = cell(&format!(
            "#Mon Jan 01\ntraceparent={tp}\ntracestate=congo=t61rcWkgMzE\n"
        ));
        rw.values[slot::CORRELATION] = cell("req-42");
        let e = r.route(&t, Lsn::from(7), T, rw).unwrap();
        let h = |n: &str| {
            e.headers
                .iter()
                .find(|h| &*h.name == n)
                .map(|h| h.value.clone())
        };
        assert_eq!(h("traceparent").as_deref(), Some(tp.as_bytes()));
        assert_eq!(h("tracestate").as_deref(), Some(&b"congo=t61rcWkgMzE"[..]));
        assert_eq!(h("correlation_id").as_deref(), Some(&b"req-42"[..]));
        assert_eq!(e.traceparent.as_deref(), Some(tp.as_bytes()));
        let mut rw = row("Order");
        rw.values[slot::TRACING] = cell(tp);
        let e = r.route(&t, Lsn::from(7), T, rw).unwrap();
        assert_eq!(e.traceparent.as_deref(), Some(tp.as_bytes()));
        assert_eq!(e.tracestate, None);
    }

    #[test]
    fn the_topics_regex_covers_every_route_in_use() {
        let rule =
            |replacement: &str| TopicRule::new("r", DEFAULT_TOPIC_REGEX, replacement).unwrap();
        let mut fixed = spec();
        fixed.topic = rule("orders.v1");
        let mut by_regex = spec();
        by_regex.topic =
            TopicRule::new("r", "(?<kind>[a-z]+)-(?<region>.*)", "pay.${kind}.$region").unwrap();
        let mut unused = spec();
        unused.topic = rule("never.used");
        let t = |s: &str| TableName::parse(s).unwrap();
        let routes = Routes {
            specs: Arc::from(vec![spec(), fixed, by_regex, unused]),
            tables: vec![
                (t("public.outbox"), 0),
                (t("public.orders"), 1),
                (t("public.pay"), 2),
            ],
            messages: Arc::from(vec![MessageRoute {
                option: "m".into(),
                prefix: "app".into(),
                topic: rule("app.${routedByValue}.events"),
                tombstone_on_empty: false,
                value: MessageValue::Payload,
                on_permanent_error: OnPermanentError::Inherit,
            }]),
        };
        let text = routes.topics_regex();
        let re = regex::Regex::new(&text).unwrap();
        for topic in [
            "outbox.event.Order",
            "orders.v1",
            "pay.card.eu-west",
            "app.Order.events",
        ] {
            assert!(re.is_match(topic), "{text} should match {topic}");
        }
        for topic in [
            "never.used",
            "orders.v1x",
            "ordersxv1",
            "xorders.v1",
            "outbox_event.Order",
            "app.Order.eventsx",
            "walcast.state",
        ] {
            assert!(!re.is_match(topic), "{text} should not match {topic}");
        }
    }

    #[test]
    fn table_less_messages_become_events() {
        let mut routes = Routes::single(spec(), []);
        routes.messages = Arc::from(vec![MessageRoute {
            option: "m".into(),
            prefix: "walcast".into(),
            topic: TopicRule::new("m", DEFAULT_TOPIC_REGEX, "ev.${routedByValue}").unwrap(),
            tombstone_on_empty: false,
            value: MessageValue::Payload,
            on_permanent_error: OnPermanentError::Inherit,
        }]);
        let mut r = Router::with_routes(&routes, HeaderNames::default());
        assert_eq!(r.message_route("walcast"), Some(0));
        assert_eq!(r.message_route("other"), None);
        let content = Bytes::from_static(
            br#"{"event_id": "e1", "aggregate_type": "order", "aggregate_id": "o-1", "event_type": "Created", "payload": {"a": 1}}"#,
        );
        let e = r
            .route_message(0, Lsn::from(5), Lsn::from(9), 7, T, &content)
            .unwrap();
        assert_eq!(&*e.topic, "ev.order");
        assert_eq!(&e.key[..], b"o-1");
        assert_eq!(&e.payload[..], br#"{"a": 1}"#);
        assert_eq!(e.event_id(), b"e1");
        assert_eq!(e.timestamp_ms, Some(946_684_801_000));
        let bad = Bytes::from_static(br#"{"event_id": "e2", "aggregate_type": "order"}"#);
        let err = r
            .route_message(0, Lsn::from(5), Lsn::from(9), 7, T, &bad)
            .unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Permanent);
        assert!(err.to_string().contains("aggregate_id"), "{err}");
        let u = err.rejected().expect("dead-letter details attached");
        assert_eq!(u.reason, Reason::NullKey);
        assert_eq!(u.value.as_ref(), Some(&bad));
        let err = r
            .route_message(
                0,
                Lsn::from(5),
                Lsn::from(9),
                7,
                T,
                &Bytes::from_static(b"{nope"),
            )
            .unwrap_err();
        assert!(err.to_string().contains("prefix \"walcast\""), "{err}");
    }

    #[test]
    fn placement_specs_are_validated() {
        assert!(parse_additional_placement("p", "a").is_err());
        assert!(parse_additional_placement("p", "a:somewhere").is_err());
        assert!(parse_additional_placement("p", "a:partition,b:partition").is_err());
        assert!(parse_additional_placement("p", "a:envelope:payload").is_err());
        assert_eq!(parse_additional_placement("p", "").unwrap(), vec![]);
        let v = parse_additional_placement("p", "a:header").unwrap();
        assert_eq!(v[0].placement, Placement::Header(Arc::from("a")));
    }

    #[test]
    fn compact_json_keeps_strings() {
        assert_eq!(
            compact_json(b"{\"a b\": [1, 2], \"c\": \"x \\\" y\"}").as_deref(),
            Some("{\"a b\":[1,2],\"c\":\"x \\\" y\"}")
        );
        assert_eq!(compact_json(b"\"str\""), None);
        assert_eq!(compact_json(b"{bad"), None);
    }

    #[test]
    fn templates_are_validated() {
        assert!(TopicTemplate::parse("fixed-topic").is_ok());
        assert!(TopicTemplate::parse("a ${routedByValue}").is_err());
        assert!(TopicTemplate::parse("${other}").is_err());
        assert!(TopicTemplate::parse("").is_err());
        let t = TopicTemplate::parse("${routedByValue}.events").unwrap();
        assert_eq!(t.render("Order").unwrap(), "Order.events");
        assert!(t.matches("Order.events"));
        assert!(!t.matches("Order.events2"));
        let t = TopicTemplate::parse("outbox.event.${routedByValue}").unwrap();
        assert!(t.matches("outbox.event.Payment"));
        assert!(!t.matches("outbox.other"));
        let t = TopicTemplate::parse("fixed-topic").unwrap();
        assert!(t.matches("fixed-topic"));
        assert!(!t.matches("fixed-topic-2"));
    }
}
