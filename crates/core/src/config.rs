//! walcast's configuration: one TOML file, `WALCAST_<SECTION>__<KEY>` environment
//! overrides, and `--set section.key=value` command-line overrides, in that order.
//!
//! Unknown keys are rejected, every value is validated before any I/O, and units
//! are part of option names (`_ms`, `_bytes`). Secrets are never printed: the
//! [`Secret`] type redacts itself in `Debug`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The source database and its replication slot.
    pub postgres: PostgresConfig,
    /// Which tables are outboxes and how rows become records.
    #[serde(default)]
    pub outbox: OutboxConfig,
    /// The Kafka cluster and producer settings.
    pub kafka: KafkaConfig,
    /// Flow control, restarts, state.
    #[serde(default)]
    pub pipeline: PipelineConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The Prometheus endpoint and health checks (off unless `listen` is set).
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// OpenTelemetry traces (off unless `otlp_endpoint` is set).
    #[serde(default)]
    pub tracing: TracingConfig,
    /// `[[pipelines]]`: several pipelines in one process, each with its own
    /// slot and publication over its own outbox tables. Empty (the default):
    /// one pipeline on `postgres.slot` and `postgres.publication`. See
    /// [`Config::pipeline_configs`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pipelines: Vec<SlotPipelineConfig>,
}

/// `[[pipelines]]`: one pipeline of several in one process. Each has its own
/// replication slot (one walsender decoding in parallel with the others),
/// publication, Kafka producer, in-flight window (`[pipeline]`'s limits
/// apply to each) and slot record; they share the process, the metrics
/// endpoint and the configuration of everything else. Events of one table
/// keep their order: a table belongs to exactly one pipeline.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SlotPipelineConfig {
    /// The pipeline's replication slot (`[a-z0-9_]`, at most 63 bytes; also
    /// its name in metrics, the `pipeline` label).
    pub slot: String,
    /// The pipeline's publication (`[a-z0-9_]`, at most 63 bytes).
    pub publication: String,
    /// The outbox tables this pipeline relays (`schema.table`): a subset of
    /// `outbox.tables` and the `[[outbox.route]]` tables. Every outbox table
    /// belongs to exactly one pipeline.
    pub tables: Vec<String>,
    /// This pipeline also relays the table-less events of
    /// `[[outbox.message_route]]` (exactly one pipeline must when there are
    /// message routes: every slot receives every logical decoding message,
    /// and only one may publish them).
    #[serde(default)]
    pub messages: bool,
    /// Split `tables` by the hash of their key column over several
    /// pipelines: this pipeline relays the rows whose key hashes to
    /// `hash_remainder` modulo `hash_modulus` (its publication filters the
    /// rows; PostgreSQL 15 or newer). The entries that list a table with a
    /// modulus must have the same modulus and together every remainder
    /// `0..hash_modulus` exactly once. Unset: whole tables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_modulus: Option<u32>,
    /// This pipeline's share of the key hash (`0..hash_modulus`); see
    /// `hash_modulus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_remainder: Option<u32>,
}

impl SlotPipelineConfig {
    /// This entry's key-hash share, checked (`at` names the entry in errors).
    ///
    /// # Errors
    /// An operator error when only one of `hash_modulus` and
    /// `hash_remainder` is set, or they are out of range.
    pub fn key_hash(&self, at: &str) -> Result<Option<KeyHash>> {
        match (self.hash_modulus, self.hash_remainder) {
            (None, None) => Ok(None),
            (Some(modulus), Some(remainder)) => {
                if !(2..=MAX_HASH_MODULUS).contains(&modulus) {
                    return Err(Error::operator(format!(
                        "{at}.hash_modulus = {modulus} is out of range (2 to {MAX_HASH_MODULUS})"
                    ))
                    .with_hint("split a table over 2 to 64 pipelines, or remove hash_modulus and hash_remainder to relay whole tables"));
                }
                if remainder >= modulus {
                    return Err(Error::operator(format!(
                        "{at}.hash_remainder = {remainder} is not below hash_modulus = {modulus}"
                    ))
                    .with_hint(format!("use a remainder from 0 to {}", modulus - 1)));
                }
                Ok(Some(KeyHash { modulus, remainder }))
            }
            _ => Err(Error::operator(format!(
                "{at} sets only one of hash_modulus and hash_remainder"
            ))
            .with_hint("set both (this pipeline relays the rows whose key hashes to hash_remainder modulo hash_modulus) or neither")),
        }
    }
}

/// A table split by key hash must be covered by one entry per remainder
/// `0..modulus`, all with the same modulus: otherwise some keys' rows would
/// be relayed by no pipeline, or by two.
fn check_key_hash_cover(t: &TableName, entries: &[(usize, Option<KeyHash>)]) -> Result<()> {
    let shares: Vec<(usize, KeyHash)> = entries
        .iter()
        .filter_map(|(i, h)| h.map(|h| (*i, h)))
        .collect();
    let Some((first, h0)) = shares.first().copied() else {
        return Ok(());
    };
    let fix = "the entries that split a table need the same hash_modulus and one entry for each hash_remainder from 0 to hash_modulus - 1";
    if let Some((i, h)) = shares.iter().find(|(_, h)| h.modulus != h0.modulus) {
        return Err(Error::operator(format!(
            "{t} is split with hash_modulus = {} in pipelines[{first}] and {} in pipelines[{i}]",
            h0.modulus, h.modulus
        ))
        .with_hint(fix));
    }
    let mut seen = vec![None; h0.modulus as usize];
    for (i, h) in &shares {
        if let Some(j) = seen[h.remainder as usize].replace(*i) {
            return Err(Error::operator(format!(
                "{t} has hash_remainder = {} in pipelines[{j}] and in pipelines[{i}]: both would relay those rows",
                h.remainder
            ))
            .with_hint(fix));
        }
    }
    let missing: Vec<String> = (0..h0.modulus)
        .filter(|r| seen[*r as usize].is_none())
        .map(|r| r.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(Error::operator(format!(
            "{t} is split with hash_modulus = {} but no entry has hash_remainder = {}: those rows would never be relayed",
            h0.modulus,
            missing.join(", ")
        ))
        .with_hint(fix));
    }
    Ok(())
}

/// `[tracing]`: OpenTelemetry traces, one span per relayed transaction,
/// exported over OTLP/HTTP (protobuf). Off unless `otlp_endpoint` is set.
/// Best effort: spans are queued (at most `max_queued_spans`) and exported by
/// a background thread; when the collector is slow or down, spans are
/// dropped and walcast logs a warning. Events never wait for traces.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// The collector's OTLP/HTTP base URL, for example
    /// `"http://127.0.0.1:4318"`; walcast posts to `<endpoint>/v1/traces`
    /// (kept as given when it already ends with `/v1/traces`). Plain `http`
    /// only. Unset: no traces.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// The `service.name` resource attribute.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// How long one export request may take before it is abandoned (its
    /// spans are dropped).
    #[serde(default = "default_export_timeout_ms")]
    pub export_timeout_ms: u64,
    /// Finished spans waiting for export; beyond it new spans are dropped.
    #[serde(default = "default_max_queued_spans")]
    pub max_queued_spans: u64,
    /// How often the queue is exported (sooner when a batch of 512 is full).
    #[serde(default = "default_export_interval_ms")]
    pub export_interval_ms: u64,
}

impl TracingConfig {
    /// The URL spans are posted to, `None` when traces are off. Call after
    /// [`Config::validate`].
    pub fn traces_url(&self) -> Option<String> {
        let e = self.otlp_endpoint.as_deref()?.trim_end_matches('/');
        Some(if e.ends_with("/v1/traces") {
            e.to_string()
        } else {
            format!("{e}/v1/traces")
        })
    }

    fn validate(&self) -> Result<()> {
        if let Some(endpoint) = &self.otlp_endpoint {
            let rest = endpoint.strip_prefix("http://").ok_or_else(|| {
                let hint = if endpoint.starts_with("https://") {
                    "this build exports over plain HTTP only: send spans to a local OpenTelemetry Collector or agent (http://127.0.0.1:4318) and let it forward them over TLS"
                } else {
                    "set it to the collector's OTLP/HTTP address, for example \"http://127.0.0.1:4318\""
                };
                Error::operator(format!(
                    "tracing.otlp_endpoint = {endpoint:?} is not an http:// URL"
                ))
                .with_hint(hint)
            })?;
            let authority = rest.split('/').next().unwrap_or_default();
            if authority.is_empty()
                || authority.contains('@')
                || authority.contains(char::is_whitespace)
                || endpoint.contains(['?', '#'])
            {
                return Err(Error::operator(format!(
                    "tracing.otlp_endpoint = {endpoint:?} has no usable host (or carries credentials, a query or a fragment)"
                ))
                .with_hint("set it to http://HOST:PORT of the collector's OTLP/HTTP receiver, for example \"http://127.0.0.1:4318\""));
            }
        }
        if self.service_name.trim().is_empty() {
            return Err(Error::operator("tracing.service_name is empty"));
        }
        if self.export_timeout_ms == 0 || self.export_interval_ms == 0 {
            return Err(Error::operator(
                "tracing.export_timeout_ms and tracing.export_interval_ms must be positive",
            ));
        }
        if !(1..=1_000_000).contains(&self.max_queued_spans) {
            return Err(Error::operator(format!(
                "tracing.max_queued_spans = {} is out of range",
                self.max_queued_spans
            ))
            .with_hint("use 1 to 1000000 (default 2048)"));
        }
        Ok(())
    }
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            otlp_endpoint: None,
            service_name: default_service_name(),
            export_timeout_ms: default_export_timeout_ms(),
            max_queued_spans: default_max_queued_spans(),
            export_interval_ms: default_export_interval_ms(),
        }
    }
}

fn default_service_name() -> String {
    "walcast".into()
}
fn default_export_timeout_ms() -> u64 {
    5_000
}
fn default_max_queued_spans() -> u64 {
    2_048
}
fn default_export_interval_ms() -> u64 {
    1_000
}

/// `[metrics]`: one HTTP listener serving `/metrics` (Prometheus text
/// format), `/healthz` and `/readyz`. Off unless `listen` is set.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `host:port` to listen on, for example `"127.0.0.1:9187"`. Unset: no listener.
    #[serde(default)]
    pub listen: Option<String>,
    /// `/readyz` answers 503 when events have been in flight this long
    /// without a delivery report.
    #[serde(default = "default_ready_stall_ms")]
    pub ready_stall_ms: u64,
}

/// A secret value: redacted in `Debug` and never logged.
#[derive(Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself; call only where it is handed to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// TLS mode for both Postgres connections. `prefer` is deliberately absent:
/// asking for TLS and silently getting plaintext is not an option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Plaintext.
    #[default]
    Disable,
    /// TLS, server certificate not verified.
    Require,
    /// TLS, certificate chain verified against `ssl_root_cert` (or system roots).
    VerifyCa,
    /// TLS, chain and host name verified.
    VerifyFull,
}

/// `[postgres]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Host name or IP address.
    pub host: String,
    /// Port.
    #[serde(default = "default_pg_port")]
    pub port: u16,
    /// Database holding the outbox tables.
    pub database: String,
    /// Role with the `REPLICATION` attribute.
    pub user: String,
    /// Password (prefer `password_file` or the `WALCAST_POSTGRES__PASSWORD` env var).
    #[serde(default)]
    pub password: Option<Secret>,
    /// File whose first line is the password.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// TLS mode.
    #[serde(default)]
    pub sslmode: SslMode,
    /// CA bundle (PEM) for `verify-ca`/`verify-full`.
    #[serde(default)]
    pub ssl_root_cert: Option<PathBuf>,
    /// Replication slot name (`[a-z0-9_]`, at most 63 bytes).
    #[serde(default = "default_slot")]
    pub slot: String,
    /// Publication name (`[a-z0-9_]`, at most 63 bytes).
    #[serde(default = "default_publication")]
    pub publication: String,
    /// Create the slot when it does not exist (never after positions were
    /// confirmed on a slot that then disappeared).
    #[serde(default = "default_true")]
    pub create_slot: bool,
    /// Create the publication (`publish = 'insert'`, only the outbox tables)
    /// when it does not exist. Needs ownership of the tables.
    #[serde(default = "default_true")]
    pub create_publication: bool,
    /// Connect timeout.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Maximum delay before a newly confirmed LSN is reported to the server.
    #[serde(default = "default_status_interval_ms")]
    pub status_interval_ms: u64,
    /// How long to wait for a slot that another connection holds before failing.
    #[serde(default = "default_slot_wait_timeout_ms")]
    pub slot_wait_timeout_ms: u64,
    /// How often walcast checks, on a short session of its own, that each
    /// outbox table is still the table its publication holds (a table
    /// renamed and replaced while walcast runs stops it). `0` turns it off.
    #[serde(default = "default_catalog_check_interval_ms")]
    pub catalog_check_interval_ms: u64,
    /// `application_name` of walcast's sessions.
    #[serde(default = "default_application_name")]
    pub application_name: String,
    /// How often walcast writes a heartbeat into the outbox database (a
    /// non-transactional logical decoding message,
    /// `pg_logical_emit_message(false, 'walcast.heartbeat', '')`), so the
    /// slot advances while the outbox is quiet and other databases of the
    /// server write WAL. `0` turns it off.
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// Stream large transactions while they are written (pgoutput protocol
    /// version 2, `streaming 'on'`; PostgreSQL 14 or newer). Postgres then
    /// sends a transaction that outgrows its `logical_decoding_work_mem`
    /// before it commits; walcast holds it (in memory up to
    /// `stream_memory_bytes`, then in a spill file in the state directory)
    /// and publishes it at its commit, with the same ordering and
    /// acknowledgement rules. Off: Postgres holds the transaction until it
    /// commits (spilling it to its own disk) and sends it then.
    #[serde(default)]
    pub streaming: bool,
    /// With `streaming`: the memory for changes of streamed transactions
    /// that have not committed yet (all of them together); more goes to a
    /// spill file per transaction. Default 16 MiB.
    #[serde(default = "default_stream_memory_bytes")]
    pub stream_memory_bytes: u64,
    /// Not a configuration key: the key-hash share of a `[[pipelines]]`
    /// entry with `hash_modulus`/`hash_remainder`, set by
    /// [`Config::pipeline_configs`]. When set, the publication filters each
    /// outbox table to the rows whose key hashes to this share.
    #[serde(skip)]
    pub key_hash: Option<KeyHash>,
}

/// One share of a key-hash split (`[[pipelines]]` `hash_modulus` and
/// `hash_remainder`): the rows whose key column hashes to `remainder` modulo
/// `modulus`. Every key's rows fall into exactly one share, so each key keeps
/// its order within one pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyHash {
    /// How many shares the tables are split into (2 to [`MAX_HASH_MODULUS`]).
    pub modulus: u32,
    /// This share (`0..modulus`).
    pub remainder: u32,
}

/// The largest `hash_modulus`: each share is a slot and a WAL sender that
/// decodes all of the WAL.
pub const MAX_HASH_MODULUS: u32 = 64;

/// `[outbox]`: the outbox tables and the default route (how their rows
/// become records); `[[outbox.route]]` entries override it per table.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    /// Schema-qualified outbox tables (`schema.table`; `table` alone means
    /// `public.table`) that use the default route. The tables of
    /// `[[outbox.route]]` entries are outbox tables too. Empty (the default)
    /// with no routes means `["public.outbox"]`.
    #[serde(default)]
    pub tables: Vec<String>,
    /// Column names (Debezium EventRouter defaults).
    #[serde(default)]
    pub columns: OutboxColumns,
    /// Topic template; `${routedByValue}` is the `aggregatetype` column's value.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// The default route's UPDATE behaviour (Debezium `table.op.invalid.behavior`).
    #[serde(default)]
    pub table_op_invalid_behavior: crate::route::OpBehavior,
    /// The default route's DELETE behaviour (deleting outbox rows after
    /// they were written is the usual cleanup, so `ignore` by default).
    #[serde(default = "default_delete_behavior")]
    pub table_op_delete_behavior: crate::route::OpBehavior,
    /// Record header names.
    #[serde(default)]
    pub headers: HeadersConfig,
    /// Per-table routes (Debezium EventRouter options in snake case).
    #[serde(default, rename = "route", skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteConfig>,
    /// Table-less outbox routes: transactional logical decoding messages
    /// by prefix.
    #[serde(
        default,
        rename = "message_route",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub message_routes: Vec<MessageRouteConfig>,
}

/// `[[outbox.message_route]]`: transactional
/// `pg_logical_emit_message(true, prefix, content)` messages with this prefix
/// are events; the content is a `walcast.v1.Envelope` (protobuf or JSON, see
/// docs/envelope.md).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MessageRouteConfig {
    /// The prefix (exact match).
    pub prefix: String,
    /// Regex over the envelope's `aggregate_type` (the whole value must match).
    #[serde(default = "default_topic_regex")]
    pub route_topic_regex: String,
    /// The topic; group references such as `${routedByValue}` are replaced.
    #[serde(default = "default_topic")]
    pub route_topic_replacement: String,
    /// An empty or blank payload → tombstone.
    #[serde(default)]
    pub route_tombstone_on_empty_payload: bool,
    /// The record value: `payload` (the envelope's payload) or `envelope`
    /// (the whole envelope, protobuf, with its source position filled in).
    #[serde(default)]
    pub value: crate::route::MessageValue,
    /// This prefix's policy for messages that can never be published
    /// (`stop` or `dead-letter`); unset: `pipeline.on_permanent_error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_permanent_error: Option<PermanentErrorPolicy>,
    /// This prefix's dead-letter topic; unset: `pipeline.dead_letter_topic`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_topic: Option<String>,
}

/// `[outbox.headers]`: the names of the headers walcast puts on every
/// record. An empty name leaves that header out (not for `id`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeadersConfig {
    /// Event id (delivery rule 9). Default `id` (Debezium's).
    #[serde(default = "h_id")]
    pub id: String,
    /// Event type (the type column). Default `type`.
    #[serde(default = "h_type")]
    pub r#type: String,
    /// Schema version (`table_field_event_schema_version`). Default `schema_version`.
    #[serde(default = "h_schema_version")]
    pub schema_version: String,
    /// Commit LSN of the source transaction. Default `walcast.source.lsn`.
    #[serde(default = "h_source_lsn")]
    pub source_lsn: String,
    /// Commit time of the source transaction (RFC 3339 UTC). Default `walcast.commit.time`.
    #[serde(default = "h_commit_time")]
    pub commit_time: String,
    /// W3C trace parent. Default `traceparent`.
    #[serde(default = "h_traceparent")]
    pub traceparent: String,
    /// W3C trace state. Default `tracestate`.
    #[serde(default = "h_tracestate")]
    pub tracestate: String,
    /// Correlation id. Default `correlation_id`.
    #[serde(default = "h_correlation_id")]
    pub correlation_id: String,
}

/// `[[outbox.route]]`: how one outbox table's rows become records. Option
/// names are Debezium's Outbox EventRouter options with `.` replaced by `_`
/// (`table.field.event.id` is `table_field_event_id`), with the same defaults.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The outbox table (`schema.table`).
    pub table: String,
    /// Event id column (`id` header).
    #[serde(default = "col_id")]
    pub table_field_event_id: String,
    /// Record key column.
    #[serde(default = "col_aggregateid")]
    pub table_field_event_key: String,
    /// Event type column (`type` header when the table has it; set "" for none).
    #[serde(default = "col_type")]
    pub table_field_event_type: String,
    /// Record timestamp column (`timestamp`, `timestamptz` or bigint ms);
    /// unset: the transaction's commit time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_field_event_timestamp: Option<String>,
    /// Payload column.
    #[serde(default = "col_payload")]
    pub table_field_event_payload: String,
    /// Schema version column (integer), sent in the schema version header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_field_event_schema_version: Option<String>,
    /// `column:header[:alias],column:envelope[:alias],column:partition`.
    #[serde(default)]
    pub table_fields_additional_placement: String,
    /// Expand a JSON payload into the record value (or the envelope).
    #[serde(default)]
    pub table_expand_json_payload: bool,
    /// UPDATE behaviour: `warn` (default), `ignore` or `stop`.
    #[serde(default)]
    pub table_op_invalid_behavior: crate::route::OpBehavior,
    /// DELETE behaviour: `ignore` (default), `warn` or `stop`.
    #[serde(default = "default_delete_behavior")]
    pub table_op_delete_behavior: crate::route::OpBehavior,
    /// The column whose value routes the event.
    #[serde(default = "col_aggregatetype")]
    pub route_by_field: String,
    /// Regex over the routing value (the whole value must match).
    #[serde(default = "default_topic_regex")]
    pub route_topic_regex: String,
    /// The topic; group references such as `${routedByValue}` are replaced.
    #[serde(default = "default_topic")]
    pub route_topic_replacement: String,
    /// NULL or blank payload → tombstone (a record without value).
    #[serde(default)]
    pub route_tombstone_on_empty_payload: bool,
    /// Column with the W3C trace context (a `traceparent`, or Java
    /// properties with `traceparent=`/`tracestate=` as Debezium writes them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing_span_context_field: Option<String>,
    /// Column with a correlation id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id_field: Option<String>,
    /// This table's policy for events that can never be published (`stop`
    /// or `dead-letter`); unset: `pipeline.on_permanent_error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_permanent_error: Option<PermanentErrorPolicy>,
    /// This table's dead-letter topic; unset: `pipeline.dead_letter_topic`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_topic: Option<String>,
}

/// `[outbox.columns]`: which column plays which part.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxColumns {
    /// Unique event id, sent in the `id` header (required).
    #[serde(default = "col_id")]
    pub id: String,
    /// Routes the event to a topic (required).
    #[serde(default = "col_aggregatetype")]
    pub aggregatetype: String,
    /// Record key: keeps one aggregate's events in order (required).
    #[serde(default = "col_aggregateid")]
    pub aggregateid: String,
    /// Event type, sent in the `type` header (optional column).
    #[serde(default = "col_type")]
    pub r#type: String,
    /// Record value (required).
    #[serde(default = "col_payload")]
    pub payload: String,
}

/// `[kafka]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `host:port[,host:port…]`
    pub bootstrap_servers: String,
    /// `none`, `gzip`, `snappy`, `lz4` or `zstd`.
    #[serde(default = "default_compression")]
    pub compression: String,
    /// Producer batching delay.
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
    /// How long walcast waits with events in flight and no delivery report
    /// before the pipeline restarts from the slot. (librdkafka itself retries
    /// without a message timeout: its own would let later events of a
    /// partition overtake the timed-out ones.)
    #[serde(default = "default_delivery_timeout_ms")]
    pub delivery_timeout_ms: u64,
    /// Log a warning (once per stall) when events have been in flight this
    /// long without a delivery report.
    #[serde(default = "default_blocked_warning_ms")]
    pub blocked_warning_ms: u64,
    /// Extra librdkafka properties passed through as given (for example
    /// `"security.protocol" = "SASL_SSL"`). Settings walcast's guarantees
    /// depend on cannot be overridden.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

/// What to do with an event that can never be published as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PermanentErrorPolicy {
    /// Stop without moving the slot past the event (default).
    #[default]
    Stop,
    /// Deliver the event to `pipeline.dead_letter_topic` instead (its key,
    /// value and headers plus `walcast.error.*` headers), then go on. The
    /// slot passes the row only once the dead-letter record is acknowledged.
    DeadLetter,
}

impl PermanentErrorPolicy {
    /// The name used in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            PermanentErrorPolicy::Stop => "stop",
            PermanentErrorPolicy::DeadLetter => "dead-letter",
        }
    }
}

/// `[pipeline]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// At most this many events handed to Kafka and not yet acknowledged.
    #[serde(default = "default_max_in_flight_events")]
    pub max_in_flight_events: u64,
    /// At most this many bytes (key + value + headers) in flight.
    #[serde(default = "default_max_in_flight_bytes")]
    pub max_in_flight_bytes: u64,
    /// The largest row change (one pgoutput message: the row's columns in
    /// text form) walcast accepts from the replication stream. It is checked
    /// before the row is buffered; a larger row stops walcast (exit 3) without
    /// moving the slot past it. It also sizes the replication read-ahead (see
    /// README: Memory).
    #[serde(default = "default_max_row_bytes")]
    pub max_row_bytes: u64,
    /// On SIGTERM/SIGINT, how long to wait for outstanding deliveries.
    #[serde(default = "default_shutdown_timeout_ms")]
    pub shutdown_timeout_ms: u64,
    /// First backoff after a retryable failure.
    #[serde(default = "default_backoff_initial_ms")]
    pub restart_backoff_initial_ms: u64,
    /// Backoff ceiling.
    #[serde(default = "default_backoff_max_ms")]
    pub restart_backoff_max_ms: u64,
    /// Where walcast keeps the local copy of its slot record (delivery rule
    /// 5). Unset: `$STATE_DIRECTORY` (systemd), else
    /// `$XDG_STATE_HOME/walcast`, else `$HOME/.local/state/walcast` (see
    /// [`Config::state_dir`]). A relative path is resolved against the
    /// working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// The compacted Kafka topic that holds the second copy of the slot
    /// record, so it survives the loss of the state directory. walcast
    /// creates it (compacted) when it is missing.
    #[serde(default = "default_state_topic")]
    pub state_topic: String,
    /// Policy for events that can never be published.
    #[serde(default)]
    pub on_permanent_error: PermanentErrorPolicy,
    /// The topic that receives the events that can never be published when
    /// `on_permanent_error = "dead-letter"` (required then, refused
    /// otherwise). walcast creates it when it is missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_topic: Option<String>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter such as `info` or `walcast=debug,info`.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// `text` or `json`.
    #[serde(default)]
    pub format: LogFormat,
}

fn default_pg_port() -> u16 {
    5432
}
fn default_slot() -> String {
    "walcast".into()
}
fn default_publication() -> String {
    "walcast_outbox".into()
}
fn default_true() -> bool {
    true
}
fn default_connect_timeout_ms() -> u64 {
    10_000
}
fn default_status_interval_ms() -> u64 {
    1_000
}
fn default_slot_wait_timeout_ms() -> u64 {
    30_000
}
fn default_catalog_check_interval_ms() -> u64 {
    10_000
}
fn default_heartbeat_interval_ms() -> u64 {
    10_000
}
fn default_stream_memory_bytes() -> u64 {
    16 * 1024 * 1024
}
fn default_blocked_warning_ms() -> u64 {
    10_000
}
fn default_ready_stall_ms() -> u64 {
    30_000
}
fn default_application_name() -> String {
    "walcast".into()
}
fn default_topic() -> String {
    "outbox.event.${routedByValue}".into()
}
fn default_topic_regex() -> String {
    crate::route::DEFAULT_TOPIC_REGEX.into()
}
fn default_delete_behavior() -> crate::route::OpBehavior {
    crate::route::OpBehavior::Ignore
}
fn h_id() -> String {
    "id".into()
}
fn h_type() -> String {
    "type".into()
}
fn h_schema_version() -> String {
    "schema_version".into()
}
fn h_source_lsn() -> String {
    "walcast.source.lsn".into()
}
fn h_commit_time() -> String {
    "walcast.commit.time".into()
}
fn h_traceparent() -> String {
    "traceparent".into()
}
fn h_tracestate() -> String {
    "tracestate".into()
}
fn h_correlation_id() -> String {
    "correlation_id".into()
}
fn col_id() -> String {
    "id".into()
}
fn col_aggregatetype() -> String {
    "aggregatetype".into()
}
fn col_aggregateid() -> String {
    "aggregateid".into()
}
fn col_type() -> String {
    "type".into()
}
fn col_payload() -> String {
    "payload".into()
}
fn default_compression() -> String {
    "lz4".into()
}
fn default_linger_ms() -> u64 {
    5
}
fn default_delivery_timeout_ms() -> u64 {
    120_000
}
fn default_max_in_flight_events() -> u64 {
    10_000
}
fn default_max_in_flight_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_max_row_bytes() -> u64 {
    2 * 1024 * 1024
}
fn default_shutdown_timeout_ms() -> u64 {
    30_000
}
fn default_backoff_initial_ms() -> u64 {
    500
}
fn default_backoff_max_ms() -> u64 {
    30_000
}
fn default_state_topic() -> String {
    "walcast.state".into()
}
fn default_log_level() -> String {
    "info".into()
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            tables: Vec::new(),
            columns: OutboxColumns::default(),
            topic: default_topic(),
            table_op_invalid_behavior: crate::route::OpBehavior::default(),
            table_op_delete_behavior: default_delete_behavior(),
            headers: HeadersConfig::default(),
            routes: Vec::new(),
            message_routes: Vec::new(),
        }
    }
}

impl Default for HeadersConfig {
    fn default() -> Self {
        HeadersConfig {
            id: h_id(),
            r#type: h_type(),
            schema_version: h_schema_version(),
            source_lsn: h_source_lsn(),
            commit_time: h_commit_time(),
            traceparent: h_traceparent(),
            tracestate: h_tracestate(),
            correlation_id: h_correlation_id(),
        }
    }
}

impl Default for OutboxColumns {
    fn default() -> Self {
        OutboxColumns {
            id: col_id(),
            aggregatetype: col_aggregatetype(),
            aggregateid: col_aggregateid(),
            r#type: col_type(),
            payload: col_payload(),
        }
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            max_in_flight_events: default_max_in_flight_events(),
            max_in_flight_bytes: default_max_in_flight_bytes(),
            max_row_bytes: default_max_row_bytes(),
            shutdown_timeout_ms: default_shutdown_timeout_ms(),
            restart_backoff_initial_ms: default_backoff_initial_ms(),
            restart_backoff_max_ms: default_backoff_max_ms(),
            state_dir: None,
            state_topic: default_state_topic(),
            on_permanent_error: PermanentErrorPolicy::default(),
            dead_letter_topic: None,
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: None,
            ready_stall_ms: default_ready_stall_ms(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: default_log_level(),
            format: LogFormat::default(),
        }
    }
}

/// The prefix of environment overrides: `WALCAST_<SECTION>__<KEY>`, for
/// example `WALCAST_POSTGRES__PASSWORD` or `WALCAST_PIPELINE__MAX_IN_FLIGHT_EVENTS`.
/// Nested tables use more `__`: `WALCAST_OUTBOX__COLUMNS__PAYLOAD`.
pub const ENV_PREFIX: &str = "WALCAST_";

/// A schema-qualified table name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    /// Schema.
    pub schema: String,
    /// Table.
    pub name: String,
}

impl TableName {
    /// Parses `schema.table` or `table` (meaning `public.table`). Each part
    /// is the name as the catalog has it (`billing.EventLog`, case kept), or
    /// SQL-quoted (`billing."EventLog"`, `""` for a quote inside), which also
    /// allows a dot inside a name.
    ///
    /// # Errors
    /// An operator error when the name is empty, has more than one dot
    /// outside quotes, or a quoted part is not closed or is followed by more
    /// than a dot.
    pub fn parse(s: &str) -> Result<Self> {
        let invalid = || {
            Error::operator(format!("outbox table {s:?} is not a valid name")).with_hint(
                "write it as schema.table, with the names as the catalog has them (public.outbox, billing.EventLog) or SQL-quoted (billing.\"EventLog\")",
            )
        };
        let mut parts: Vec<String> = vec![String::new()];
        let mut chars = s.chars().peekable();
        // Whether the current part is quoted; `Some(true)` while inside its quotes.
        let mut quoted: Option<bool> = None;
        while let Some(c) = chars.next() {
            let part = parts.last_mut().expect("at least one part");
            match (quoted, c) {
                (Some(true), '"') if chars.peek() == Some(&'"') => {
                    chars.next();
                    part.push('"');
                }
                (Some(true), '"') => quoted = Some(false),
                (Some(true), c) => part.push(c),
                (None, '"') if part.is_empty() => quoted = Some(true),
                (Some(false) | None, '.') => {
                    parts.push(String::new());
                    quoted = None;
                }
                // Unquoted: taken as it is, a quote inside included.
                (None, c) => part.push(c),
                _ => return Err(invalid()),
            }
        }
        if quoted == Some(true) {
            return Err(invalid());
        }
        let (schema, name) = match parts.as_slice() {
            [t] => ("public".to_string(), t.clone()),
            [s, t] => (s.clone(), t.clone()),
            _ => return Err(invalid()),
        };
        if schema.is_empty() || name.is_empty() {
            return Err(invalid());
        }
        Ok(TableName { schema, name })
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// Checks a slot or publication name: `[a-z0-9_]`, 1 to 63 bytes.
///
/// # Errors
/// An operator error naming the option.
pub fn validate_pg_name(option: &str, value: &str) -> Result<()> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(
            Error::operator(format!("{option} = {value:?} is not a valid name")).with_hint(
                format!(
                    "use 1 to 63 characters of lower-case letters, digits and '_' for {option}"
                ),
            ),
        )
    }
}

impl Config {
    /// Loads `path` (if given), applies environment overrides from `env`
    /// (pairs of name and value; pass `std::env::vars()`), then `--set`
    /// overrides (`section.key=value`), and validates the result.
    ///
    /// # Errors
    /// An operator error naming the file, variable or key at fault.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        sets: &[String],
    ) -> Result<Config> {
        let mut table = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| {
                    Error::operator(format!("cannot read config file {}", p.display()))
                        .with_source(e)
                        .with_hint("pass an existing file with --config")
                })?;
                toml::from_str::<toml::Table>(&text).map_err(|e| {
                    Error::operator(format!("config file {} is not valid TOML", p.display()))
                        .with_source(e)
                })?
            }
            None => toml::Table::new(),
        };
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.contains("__"))
            .collect();
        env.sort();
        for (k, v) in env {
            let path: Vec<String> = k[ENV_PREFIX.len()..]
                .split("__")
                .map(|s| s.to_ascii_lowercase())
                .collect();
            set_path(&mut table, &path, &v, &format!("environment variable {k}"))?;
        }
        for s in sets {
            let (k, v) = s.split_once('=').ok_or_else(|| {
                Error::operator(format!("--set {s:?} has no '='"))
                    .with_hint("write --set section.key=value, e.g. --set kafka.linger_ms=10")
            })?;
            let path: Vec<String> = k.trim().split('.').map(str::to_string).collect();
            set_path(&mut table, &path, v.trim(), &format!("--set {k}"))?;
        }
        let config: Config = Config::deserialize(toml::Value::Table(table)).map_err(|e| {
            let where_ = path
                .map(|p| format!(" (file {})", p.display()))
                .unwrap_or_default();
            Error::operator(format!("invalid configuration{where_}: {}", e.message())).with_hint(
                "see the configuration reference in README.md; unknown keys are rejected",
            )
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Parses a TOML document (no overrides) and validates it.
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn from_toml(text: &str) -> Result<Config> {
        let table = toml::from_str::<toml::Table>(text)
            .map_err(|e| Error::operator("configuration is not valid TOML").with_source(e))?;
        let config: Config = Config::deserialize(toml::Value::Table(table)).map_err(|e| {
            Error::operator(format!("invalid configuration: {}", e.message())).with_hint(
                "see the configuration reference in README.md; unknown keys are rejected",
            )
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The resolved password: `password`, else the first line of `password_file`.
    ///
    /// # Errors
    /// An operator error when the file cannot be read.
    pub fn postgres_password(&self) -> Result<Option<Secret>> {
        if let Some(p) = &self.postgres.password {
            return Ok(Some(p.clone()));
        }
        match &self.postgres.password_file {
            None => Ok(None),
            Some(f) => {
                let text = std::fs::read_to_string(f).map_err(|e| {
                    Error::operator(format!(
                        "cannot read postgres.password_file {}",
                        f.display()
                    ))
                    .with_source(e)
                })?;
                Ok(Some(Secret::new(
                    text.lines().next().unwrap_or("").to_string(),
                )))
            }
        }
    }

    /// The outbox tables, parsed: `outbox.tables` (default `public.outbox`
    /// when there are no routes), then the routes' tables.
    ///
    /// # Errors
    /// As [`TableName::parse`].
    pub fn outbox_tables(&self) -> Result<Vec<TableName>> {
        Ok(self.routes()?.tables.into_iter().map(|(t, _)| t).collect())
    }

    /// Every route and which table uses which (index 0: the `[outbox]` route).
    ///
    /// # Errors
    /// An operator error naming the option at fault.
    pub fn routes(&self) -> Result<crate::route::Routes> {
        use crate::route::{parse_additional_placement, RouteSpec, TopicRule};
        let o = &self.outbox;
        let mut default = RouteSpec::legacy(
            &o.columns,
            TopicRule::Template(crate::route::TopicTemplate::parse(&o.topic)?),
        );
        default.on_update = o.table_op_invalid_behavior;
        default.on_delete = o.table_op_delete_behavior;
        let mut specs = vec![default];
        let mut tables = Vec::new();
        let listed: Vec<&String> = if o.tables.is_empty() && o.routes.is_empty() {
            Vec::new()
        } else {
            o.tables.iter().collect()
        };
        if o.tables.is_empty() && o.routes.is_empty() {
            tables.push((TableName::parse("public.outbox")?, 0));
        }
        for t in listed {
            tables.push((TableName::parse(t)?, 0));
        }
        for r in &o.routes {
            let table = TableName::parse(&r.table)?;
            let option = format!("outbox.route[{table}]");
            let nonempty = |name: &str, v: &str| -> Result<()> {
                if v.trim().is_empty() {
                    Err(Error::operator(format!("{option}.{name} is empty")))
                } else {
                    Ok(())
                }
            };
            nonempty("table_field_event_id", &r.table_field_event_id)?;
            nonempty("table_field_event_key", &r.table_field_event_key)?;
            nonempty("table_field_event_payload", &r.table_field_event_payload)?;
            nonempty("route_by_field", &r.route_by_field)?;
            let opt = |v: &Option<String>| v.as_ref().filter(|s| !s.trim().is_empty()).cloned();
            let spec = RouteSpec {
                id: r.table_field_event_id.clone(),
                key: r.table_field_event_key.clone(),
                payload: r.table_field_event_payload.clone(),
                route_by: r.route_by_field.clone(),
                event_type: Some(r.table_field_event_type.clone()).filter(|s| !s.trim().is_empty()),
                type_required: false,
                timestamp: opt(&r.table_field_event_timestamp),
                schema_version: opt(&r.table_field_event_schema_version),
                tracing: opt(&r.tracing_span_context_field),
                correlation_id: opt(&r.correlation_id_field),
                additional: parse_additional_placement(
                    &format!("{option}.table_fields_additional_placement"),
                    &r.table_fields_additional_placement,
                )?,
                topic: TopicRule::new(&option, &r.route_topic_regex, &r.route_topic_replacement)?,
                expand_json: r.table_expand_json_payload,
                tombstone_on_empty: r.route_tombstone_on_empty_payload,
                on_update: r.table_op_invalid_behavior,
                on_delete: r.table_op_delete_behavior,
                on_permanent_error: self.route_policy(
                    &option,
                    r.on_permanent_error,
                    r.dead_letter_topic.as_deref(),
                )?,
                option,
            };
            if let Some((_, i)) = tables.iter().find(|(t, _)| *t == table) {
                return Err(Error::operator(if *i == 0 {
                    format!("outbox table {table} is listed in outbox.tables and has an [[outbox.route]]")
                } else {
                    format!("outbox table {table} has two [[outbox.route]] entries")
                })
                .with_hint("give each outbox table exactly one route: remove it from outbox.tables, or merge the routes"));
            }
            tables.push((table, specs.len()));
            specs.push(spec);
        }
        let mut messages: Vec<crate::route::MessageRoute> = Vec::new();
        for m in &o.message_routes {
            let option = format!("outbox.message_route[{:?}]", m.prefix);
            if m.prefix.is_empty() {
                return Err(Error::operator("outbox.message_route: prefix is empty")
                    .with_hint("give the prefix the application passes to pg_logical_emit_message(true, prefix, content)"));
            }
            if m.prefix.starts_with("walcast.heartbeat") {
                return Err(Error::operator(format!(
                    "{option}: the prefix walcast.heartbeat is walcast's own"
                )));
            }
            if messages.iter().any(|x| x.prefix == m.prefix) {
                return Err(Error::operator(format!("{option} is configured twice")));
            }
            messages.push(crate::route::MessageRoute {
                topic: TopicRule::new(&option, &m.route_topic_regex, &m.route_topic_replacement)?,
                prefix: m.prefix.clone(),
                tombstone_on_empty: m.route_tombstone_on_empty_payload,
                value: m.value,
                on_permanent_error: self.route_policy(
                    &option,
                    m.on_permanent_error,
                    m.dead_letter_topic.as_deref(),
                )?,
                option,
            });
        }
        let routes = crate::route::Routes {
            specs: std::sync::Arc::from(specs),
            tables,
            messages: std::sync::Arc::from(messages),
        };
        self.check_dead_letter_topics(&routes)?;
        Ok(routes)
    }

    /// A route's policy for events that can never be published, from its
    /// `on_permanent_error` and `dead_letter_topic` (`option` names the
    /// route). Unset, the pipeline's applies; `dead-letter` without a topic
    /// of its own uses `pipeline.dead_letter_topic`.
    fn route_policy(
        &self,
        option: &str,
        policy: Option<PermanentErrorPolicy>,
        topic: Option<&str>,
    ) -> Result<crate::route::OnPermanentError> {
        use crate::route::OnPermanentError;
        let p = &self.pipeline;
        match (policy.unwrap_or(p.on_permanent_error), topic) {
            (PermanentErrorPolicy::Stop, Some(t)) => Err(Error::operator(format!(
                "{option}.dead_letter_topic = {t:?} is set but the route's on_permanent_error is \"stop\"{}, so it would never be used",
                if policy.is_none() { " (from pipeline.on_permanent_error)" } else { "" }
            ))
            .with_hint(format!("set {option}.on_permanent_error = \"dead-letter\" to use it, or remove {option}.dead_letter_topic"))),
            (PermanentErrorPolicy::Stop, None) if policy.is_none() => Ok(OnPermanentError::Inherit),
            (PermanentErrorPolicy::Stop, None) => Ok(OnPermanentError::Stop),
            (PermanentErrorPolicy::DeadLetter, Some(t)) => {
                Ok(OnPermanentError::DeadLetter(std::sync::Arc::from(t)))
            }
            (PermanentErrorPolicy::DeadLetter, None) if policy.is_none() => {
                Ok(OnPermanentError::Inherit)
            }
            (PermanentErrorPolicy::DeadLetter, None) => match &p.dead_letter_topic {
                Some(t) => Ok(OnPermanentError::DeadLetter(std::sync::Arc::from(t.as_str()))),
                None => Err(Error::operator(format!(
                    "{option}.on_permanent_error = \"dead-letter\" needs {option}.dead_letter_topic (or pipeline.dead_letter_topic)"
                ))
                .with_hint(format!("set {option}.dead_letter_topic to the topic that receives this route's events that can never be published (for example \"walcast.dead-letter\"), or use on_permanent_error = \"stop\""))),
            },
        }
    }

    /// The routes' dead-letter topics: `(option, topic, own)` for each route
    /// under the dead-letter policy, `own` when the route names the topic
    /// itself (else it is `pipeline.dead_letter_topic`).
    fn route_dead_letter_topics(
        &self,
        routes: &crate::route::Routes,
    ) -> Vec<(String, std::sync::Arc<str>, bool)> {
        use crate::route::OnPermanentError;
        // specs[0] is the [outbox] route; specs[i + 1] is outbox.routes[i].
        let own = self
            .outbox
            .routes
            .iter()
            .map(|r| r.dead_letter_topic.is_some())
            .zip(
                routes
                    .specs
                    .iter()
                    .skip(1)
                    .map(|s| (&s.option, &s.on_permanent_error)),
            )
            .chain(
                self.outbox
                    .message_routes
                    .iter()
                    .map(|m| m.dead_letter_topic.is_some())
                    .zip(
                        routes
                            .messages
                            .iter()
                            .map(|m| (&m.option, &m.on_permanent_error)),
                    ),
            );
        let mut out = Vec::new();
        for (own_topic, (option, policy)) in own {
            if let OnPermanentError::DeadLetter(t) = policy {
                out.push((option.clone(), t.clone(), own_topic));
            }
        }
        out
    }

    /// Every dead-letter topic in use, each with the option that names it
    /// (`pipeline.dead_letter_topic`, `outbox.route[t].dead_letter_topic`):
    /// the pipeline's under its dead-letter policy, and each route's.
    ///
    /// # Errors
    /// As [`Config::routes`].
    pub fn dead_letter_topics(&self) -> Result<Vec<(String, String)>> {
        let routes = self.routes()?;
        let p = &self.pipeline;
        let mut out: Vec<(String, String)> = Vec::new();
        let mut add = |topic: &str, option: String| {
            if !out.iter().any(|(t, _)| t == topic) {
                out.push((topic.to_string(), option));
            }
        };
        if let (PermanentErrorPolicy::DeadLetter, Some(t)) =
            (p.on_permanent_error, &p.dead_letter_topic)
        {
            add(t, "pipeline.dead_letter_topic".into());
        }
        for (option, t, own) in self.route_dead_letter_topics(&routes) {
            add(
                &t,
                if own {
                    format!("{option}.dead_letter_topic")
                } else {
                    "pipeline.dead_letter_topic".into()
                },
            );
        }
        Ok(out)
    }

    /// Checks the pipeline's dead-letter settings and every dead-letter
    /// topic: a valid name, not the state topic, and not a topic that an
    /// outbox route in use can route events to.
    fn check_dead_letter_topics(&self, routes: &crate::route::Routes) -> Result<()> {
        use crate::route::TopicRule;
        let p = &self.pipeline;
        let inherited = self
            .outbox
            .routes
            .iter()
            .map(|r| (r.on_permanent_error, &r.dead_letter_topic))
            .chain(
                self.outbox
                    .message_routes
                    .iter()
                    .map(|m| (m.on_permanent_error, &m.dead_letter_topic)),
            )
            .any(|(policy, topic)| {
                policy == Some(PermanentErrorPolicy::DeadLetter) && topic.is_none()
            });
        match (p.on_permanent_error, &p.dead_letter_topic) {
            (PermanentErrorPolicy::DeadLetter, None) => {
                return Err(Error::operator(
                    "pipeline.on_permanent_error = \"dead-letter\" needs pipeline.dead_letter_topic",
                )
                .with_hint("set pipeline.dead_letter_topic to the topic that receives the events that can never be published (for example \"walcast.dead-letter\"), or use on_permanent_error = \"stop\""));
            }
            (PermanentErrorPolicy::Stop, Some(t)) if !inherited => {
                return Err(Error::operator(format!(
                    "pipeline.dead_letter_topic = {t:?} is set but pipeline.on_permanent_error is \"stop\" and no route with on_permanent_error = \"dead-letter\" lacks a dead_letter_topic of its own, so it would never be used"
                ))
                .with_hint("set pipeline.on_permanent_error = \"dead-letter\" to use it, or remove pipeline.dead_letter_topic"));
            }
            _ => {}
        }
        let mut topics: Vec<(String, std::sync::Arc<str>)> = Vec::new();
        if let Some(t) = &p.dead_letter_topic {
            topics.push((
                "pipeline.dead_letter_topic".into(),
                std::sync::Arc::from(t.as_str()),
            ));
        }
        for (option, t, own) in self.route_dead_letter_topics(routes) {
            if own {
                topics.push((format!("{option}.dead_letter_topic"), t));
            }
        }
        // The topics the routes in use can render, with the option that says so.
        let mut rules: Vec<(String, &TopicRule)> = Vec::new();
        for (i, spec) in routes.specs.iter().enumerate() {
            if routes.tables.iter().any(|(_, r)| *r == i) {
                let option = if i == 0 {
                    format!("outbox.topic = {:?}", self.outbox.topic)
                } else {
                    format!("{}.route_topic_replacement", spec.option)
                };
                rules.push((option, &spec.topic));
            }
        }
        for m in routes.messages.iter() {
            rules.push((format!("{}.route_topic_replacement", m.option), &m.topic));
        }
        for (option, t) in &topics {
            validate_topic_name(option, t)?;
            if **t == *p.state_topic {
                return Err(Error::operator(format!(
                    "{option} and pipeline.state_topic are both {t:?}"
                ))
                .with_hint("the state topic is compacted and holds walcast's slot records: give the dead-letter topic its own name"));
            }
            for (rule_option, rule) in &rules {
                let known = match rule {
                    TopicRule::Template(tpl) => tpl.matches(t),
                    // A replacement without group references is a fixed
                    // topic; other regex routes' topics depend on the rows.
                    TopicRule::Regex { replacement, .. } => {
                        !replacement.contains('$') && replacement.as_str() == &**t
                    }
                };
                if known {
                    return Err(Error::operator(format!(
                        "{option} = {t:?} is a topic {rule_option} can route events to"
                    ))
                    .with_hint("give the dead-letter topic a name outside the outbox topics, so dead letters never mix with events"));
                }
            }
        }
        Ok(())
    }

    /// The record header names (`[outbox.headers]`).
    pub fn header_names(&self) -> crate::route::HeaderNames {
        let h = &self.outbox.headers;
        let name = |s: &str| Some(std::sync::Arc::<str>::from(s)).filter(|s| !s.is_empty());
        crate::route::HeaderNames {
            id: std::sync::Arc::from(h.id.as_str()),
            event_type: name(&h.r#type),
            schema_version: name(&h.schema_version),
            source_lsn: name(&h.source_lsn),
            commit_time: name(&h.commit_time),
            traceparent: name(&h.traceparent),
            tracestate: name(&h.tracestate),
            correlation_id: name(&h.correlation_id),
        }
    }

    /// Checks every value; runs before any I/O.
    ///
    /// # Errors
    /// An operator error naming the option and the fix.
    pub fn validate(&self) -> Result<()> {
        let pg = &self.postgres;
        if pg.host.trim().is_empty() {
            return Err(Error::operator("postgres.host is empty")
                .with_hint("set postgres.host to the database server's address"));
        }
        if pg.database.is_empty() || pg.user.is_empty() {
            return Err(Error::operator(
                "postgres.database and postgres.user must be set",
            ));
        }
        if pg.password.is_some() && pg.password_file.is_some() {
            return Err(Error::operator(
                "both postgres.password and postgres.password_file are set",
            )
            .with_hint("keep one of them"));
        }
        validate_pg_name("postgres.slot", &pg.slot)?;
        validate_pg_name("postgres.publication", &pg.publication)?;
        if pg.sslmode == SslMode::Disable && pg.ssl_root_cert.is_some() {
            return Err(Error::operator(
                "postgres.ssl_root_cert is set but postgres.sslmode is disable",
            )
            .with_hint("set postgres.sslmode = \"verify-full\" (or remove ssl_root_cert)"));
        }
        if pg.sslmode == SslMode::VerifyFull && pg.host.parse::<std::net::IpAddr>().is_ok() {
            return Err(Error::operator(format!(
                "postgres.sslmode = verify-full checks the server's host name, but postgres.host = {:?} is an IP address",
                pg.host
            ))
            .with_hint("set postgres.host to the DNS name in the server certificate, or use sslmode = \"verify-ca\""));
        }
        if pg.status_interval_ms == 0 || pg.connect_timeout_ms == 0 {
            return Err(Error::operator(
                "postgres.status_interval_ms and postgres.connect_timeout_ms must be positive",
            ));
        }
        if pg.streaming && pg.stream_memory_bytes == 0 {
            return Err(Error::operator(
                "postgres.stream_memory_bytes = 0: streamed transactions need some memory before they spill",
            )
            .with_hint("leave it unset (16 MiB) or set a positive number of bytes"));
        }
        let tables = self.outbox_tables()?;
        if tables.is_empty() {
            return Err(Error::operator("outbox.tables is empty")
                .with_hint("list at least one table, e.g. tables = [\"public.outbox\"]"));
        }
        let mut seen = std::collections::HashSet::new();
        for t in &tables {
            if !seen.insert(t.clone()) {
                return Err(Error::operator(format!("outbox.tables lists {t} twice")));
            }
        }
        let c = &self.outbox.columns;
        for (opt, v) in [
            ("outbox.columns.id", &c.id),
            ("outbox.columns.aggregatetype", &c.aggregatetype),
            ("outbox.columns.aggregateid", &c.aggregateid),
            ("outbox.columns.type", &c.r#type),
            ("outbox.columns.payload", &c.payload),
        ] {
            if v.is_empty() {
                return Err(Error::operator(format!("{opt} is empty")));
            }
        }
        crate::route::TopicTemplate::parse(&self.outbox.topic)?;
        let h = &self.outbox.headers;
        if h.id.is_empty() {
            return Err(Error::operator("outbox.headers.id is empty")
                .with_hint("every record carries its event id (consumers deduplicate on it); name the header, default \"id\""));
        }
        let mut names = std::collections::HashSet::new();
        for n in [
            &h.id,
            &h.r#type,
            &h.schema_version,
            &h.source_lsn,
            &h.commit_time,
            &h.traceparent,
            &h.tracestate,
            &h.correlation_id,
        ] {
            if !n.is_empty() && !names.insert(n.as_str()) {
                return Err(Error::operator(format!(
                    "outbox.headers names the header {n:?} twice"
                )));
            }
        }
        let k = &self.kafka;
        if k.bootstrap_servers.trim().is_empty() {
            return Err(Error::operator("kafka.bootstrap_servers is empty")
                .with_hint("set it to host:port of one or more brokers"));
        }
        if !["none", "gzip", "snappy", "lz4", "zstd"].contains(&k.compression.as_str()) {
            return Err(Error::operator(format!(
                "kafka.compression = {:?} is not supported",
                k.compression
            ))
            .with_hint("use one of none, gzip, snappy, lz4, zstd"));
        }
        if k.delivery_timeout_ms == 0 || k.blocked_warning_ms == 0 {
            return Err(Error::operator(
                "kafka.delivery_timeout_ms and kafka.blocked_warning_ms must be positive",
            ));
        }
        for (key, value) in &k.properties {
            check_kafka_property(key, value)?;
        }
        let p = &self.pipeline;
        if p.max_in_flight_events == 0 || p.max_in_flight_bytes == 0 {
            return Err(Error::operator(
                "pipeline.max_in_flight_events and pipeline.max_in_flight_bytes must be positive",
            ));
        }
        if p.max_row_bytes < 1024
            || p.max_row_bytes > p.max_in_flight_bytes
            || p.max_row_bytes > 1 << 30
        {
            return Err(Error::operator(format!(
                "pipeline.max_row_bytes = {} must be at least 1024, at most pipeline.max_in_flight_bytes ({}) and at most 1 GiB",
                p.max_row_bytes, p.max_in_flight_bytes
            ))
            .with_hint("a row must fit in the in-flight window; raise max_in_flight_bytes or lower max_row_bytes"));
        }
        let m = &self.metrics;
        if let Some(listen) = &m.listen {
            if listen.parse::<std::net::SocketAddr>().is_err() {
                return Err(Error::operator(format!(
                    "metrics.listen = {listen:?} is not an address and port"
                ))
                .with_hint("write it as host:port with an IP address, for example \"127.0.0.1:9187\" or \"0.0.0.0:9187\""));
            }
        }
        if m.ready_stall_ms == 0 {
            return Err(Error::operator("metrics.ready_stall_ms must be positive"));
        }
        self.tracing.validate()?;
        if p.restart_backoff_initial_ms == 0
            || p.restart_backoff_max_ms < p.restart_backoff_initial_ms
        {
            return Err(Error::operator(
                "pipeline.restart_backoff_initial_ms must be positive and at most restart_backoff_max_ms",
            ));
        }
        validate_topic_name("pipeline.state_topic", &p.state_topic)?;
        if p.state_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return Err(Error::operator("pipeline.state_dir is empty")
                .with_hint("remove it to use the default, or set a persistent directory"));
        }
        self.pipeline_configs()?;
        Ok(())
    }

    /// The configuration of each pipeline this process runs: itself when
    /// `[[pipelines]]` is empty; otherwise one per entry, with that entry's
    /// slot and publication, only that entry's outbox tables (and their
    /// routes), and the message routes only on the entry with `messages`.
    /// Everything else is shared.
    ///
    /// # Errors
    /// An operator error naming the entry at fault: an invalid or repeated
    /// slot or publication, a table that is no outbox table, in no pipeline
    /// or in two, an entry with no tables, message routes on no entry or on
    /// two, or `postgres.slot`/`postgres.publication` set beside
    /// `[[pipelines]]` (they would be ignored).
    pub fn pipeline_configs(&self) -> Result<Vec<Config>> {
        if self.pipelines.is_empty() {
            return Ok(vec![self.clone()]);
        }
        let fix = "every outbox table (outbox.tables and the [[outbox.route]] tables) belongs to exactly one [[pipelines]] entry";
        if self.postgres.slot != default_slot()
            || self.postgres.publication != default_publication()
        {
            return Err(Error::operator(
                "postgres.slot or postgres.publication is set beside [[pipelines]], which name their own slots and publications",
            )
            .with_hint("remove postgres.slot and postgres.publication; set slot and publication in each [[pipelines]] entry"));
        }
        let all = self.outbox_tables()?;
        // Each table's entries, with their key-hash share.
        let mut owners: BTreeMap<TableName, Vec<(usize, Option<KeyHash>)>> = BTreeMap::new();
        let mut slots = std::collections::HashSet::new();
        let mut publications = std::collections::HashSet::new();
        for (i, p) in self.pipelines.iter().enumerate() {
            let at = format!("pipelines[{i}]");
            validate_pg_name(&format!("{at}.slot"), &p.slot)?;
            validate_pg_name(&format!("{at}.publication"), &p.publication)?;
            if !slots.insert(p.slot.as_str()) {
                return Err(Error::operator(format!(
                    "{at}.slot = {:?} is the slot of another pipeline",
                    p.slot
                ))
                .with_hint("give every pipeline its own slot: one slot is one stream"));
            }
            if !publications.insert(p.publication.as_str()) {
                return Err(Error::operator(format!(
                    "{at}.publication = {:?} is the publication of another pipeline",
                    p.publication
                ))
                .with_hint("give every pipeline its own publication, holding only its tables"));
            }
            if p.tables.is_empty() {
                return Err(Error::operator(format!("{at}.tables is empty")).with_hint(
                    "list the outbox tables this pipeline relays, or remove the entry",
                ));
            }
            let share = p.key_hash(&at)?;
            for t in &p.tables {
                let t = TableName::parse(t)?;
                if !all.contains(&t) {
                    return Err(Error::operator(format!(
                        "{at}.tables lists {t}, which is not an outbox table"
                    ))
                    .with_hint(format!("add it to outbox.tables (or an [[outbox.route]]), or remove it here; {fix}")));
                }
                let entries = owners.entry(t.clone()).or_default();
                if entries.iter().any(|(j, _)| *j == i) {
                    return Err(Error::operator(format!("{at}.tables lists {t} twice"))
                        .with_hint("list each table once"));
                }
                if let Some((j, other)) = entries.first() {
                    if share.is_none() || other.is_none() {
                        return Err(Error::operator(format!(
                            "{t} is in pipelines[{j}].tables and in {at}.tables"
                        ))
                        .with_hint(format!(
                            "{fix}: one table's events keep their order only on one slot (or split it by key hash: hash_modulus and hash_remainder on every entry that lists it)"
                        )));
                    }
                }
                entries.push((i, share));
            }
        }
        if let Some(t) = all.iter().find(|t| !owners.contains_key(*t)) {
            return Err(Error::operator(format!(
                "outbox table {t} is in no [[pipelines]] entry: its events would never be relayed"
            ))
            .with_hint(fix));
        }
        for (t, entries) in &owners {
            check_key_hash_cover(t, entries)?;
        }
        let with_messages: Vec<usize> = (0..self.pipelines.len())
            .filter(|&i| self.pipelines[i].messages)
            .collect();
        let has_message_routes = !self.outbox.message_routes.is_empty();
        match (has_message_routes, with_messages.as_slice()) {
            (true, []) => {
                return Err(Error::operator(
                    "[[outbox.message_route]] is set but no [[pipelines]] entry has messages = true: its events would never be relayed",
                )
                .with_hint("set messages = true on exactly one pipeline"))
            }
            (true, [_]) => {}
            (true, [..]) => {
                return Err(Error::operator(format!(
                    "messages = true on {} pipelines: each would publish every table-less event",
                    with_messages.len()
                ))
                .with_hint("set messages = true on exactly one pipeline"))
            }
            (false, [i, ..]) => {
                return Err(Error::operator(format!(
                    "pipelines[{i}].messages = true, but there is no [[outbox.message_route]]"
                ))
                .with_hint("remove messages = true, or add the message routes"))
            }
            (false, []) => {}
        }
        let mut out = Vec::with_capacity(self.pipelines.len());
        for p in &self.pipelines {
            let mine: Vec<TableName> = p
                .tables
                .iter()
                .map(|t| TableName::parse(t))
                .collect::<Result<_>>()?;
            let mut c = self.clone();
            c.pipelines = Vec::new();
            c.postgres.slot = p.slot.clone();
            c.postgres.publication = p.publication.clone();
            c.postgres.key_hash = p.key_hash("")?;
            let default_tables: Vec<TableName> =
                if self.outbox.tables.is_empty() && self.outbox.routes.is_empty() {
                    vec![TableName::parse("public.outbox")?]
                } else {
                    self.outbox
                        .tables
                        .iter()
                        .map(|t| TableName::parse(t))
                        .collect::<Result<_>>()?
                };
            c.outbox.tables = default_tables
                .into_iter()
                .filter(|t| mine.contains(t))
                .map(|t| t.to_string())
                .collect();
            let mut routes = Vec::new();
            for r in &self.outbox.routes {
                if mine.contains(&TableName::parse(&r.table)?) {
                    routes.push(r.clone());
                }
            }
            c.outbox.routes = routes;
            if !p.messages {
                c.outbox.message_routes = Vec::new();
            }
            out.push(c);
        }
        Ok(out)
    }

    /// The state directory: `pipeline.state_dir` when set (a relative path
    /// is resolved against the working directory), else `$STATE_DIRECTORY`
    /// (set by systemd's `StateDirectory=`; the first of a `:`-separated
    /// list), else `$XDG_STATE_HOME/walcast`, else `$HOME/.local/state/walcast`.
    /// `env` looks a variable up (pass `|k| std::env::var_os(k)`).
    ///
    /// # Errors
    /// An operator error when nothing above gives a directory.
    pub fn state_dir(&self, env: impl Fn(&str) -> Option<std::ffi::OsString>) -> Result<PathBuf> {
        let non_empty = |k: &str| env(k).filter(|v| !v.is_empty());
        let dir = if let Some(d) = &self.pipeline.state_dir {
            d.clone()
        } else if let Some(d) = non_empty("STATE_DIRECTORY") {
            let first = d
                .to_string_lossy()
                .split(':')
                .next()
                .unwrap_or_default()
                .to_string();
            PathBuf::from(first)
        } else if let Some(d) = non_empty("XDG_STATE_HOME") {
            PathBuf::from(d).join("walcast")
        } else if let Some(h) = non_empty("HOME") {
            PathBuf::from(h).join(".local/state/walcast")
        } else {
            return Err(Error::operator(
                "no state directory: pipeline.state_dir is unset and neither STATE_DIRECTORY, XDG_STATE_HOME nor HOME is set",
            )
            .with_hint("set pipeline.state_dir to a persistent, writable directory"));
        };
        if dir.is_absolute() {
            return Ok(dir);
        }
        let cwd = std::env::current_dir().map_err(|e| {
            Error::operator(format!(
                "pipeline.state_dir {} is relative and the working directory is unknown",
                dir.display()
            ))
            .with_source(e)
            .with_hint("set pipeline.state_dir to an absolute path")
        })?;
        Ok(cwd.join(dir))
    }
}

/// Checks a Kafka topic name: 1 to 249 characters of `[a-zA-Z0-9._-]`, not `.` or `..`.
///
/// # Errors
/// An operator error naming the option.
pub fn validate_topic_name(option: &str, value: &str) -> Result<()> {
    let ok = !value.is_empty()
        && value.len() <= 249
        && value != "."
        && value != ".."
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::operator(format!(
            "{option} = {value:?} is not a valid Kafka topic name"
        ))
        .with_hint("use 1 to 249 characters of letters, digits, '.', '_' and '-'"))
    }
}

/// A group of librdkafka properties walcast sets itself because its
/// guarantees depend on them: why, and what to use instead.
struct Protected {
    keys: &'static [&'static str],
    why: &'static str,
    instead: &'static str,
}

/// librdkafka properties that `kafka.properties` may not set (aliases included).
const PROTECTED_KAFKA_PROPERTIES: &[Protected] = &[
    Protected {
        keys: &["enable.idempotence", "acks", "request.required.acks"],
        why: "walcast confirms a position only after an idempotent acks=all write; anything weaker can lose acknowledged events or reorder them on a retry",
        instead: "remove it: walcast always uses enable.idempotence=true and acks=all",
    },
    Protected {
        keys: &["enable.gapless.guarantee"],
        why: "walcast sets it to true: without it, after a record fails for good the producer skips it and delivers the partition's later records, which then land in Kafka ahead of it",
        instead: "remove it",
    },
    Protected {
        keys: &["retries", "message.send.max.retries"],
        why: "walcast lets the producer retry without limit (librdkafka's default); a retry limit turns a broker outage into failed records and a stopped producer",
        instead: "remove it; kafka.delivery_timeout_ms bounds how long walcast waits for Kafka before it restarts from the slot",
    },
    Protected {
        keys: &["max.in.flight.requests.per.connection", "max.in.flight"],
        why: "the idempotent producer keeps a partition's order only with at most 5 requests in flight, and walcast relies on that order",
        instead: "remove it (librdkafka's default of 5 is the idempotent maximum)",
    },
    Protected {
        keys: &["message.timeout.ms", "delivery.timeout.ms"],
        why: "a message timeout inside the producer lets the later records of a partition overtake the timed-out ones",
        instead: "use kafka.delivery_timeout_ms",
    },
    Protected {
        keys: &["queue.buffering.max.messages", "queue.buffering.max.kbytes"],
        why: "walcast sizes the producer's queue from its in-flight bounds so that the queue is never the tighter limit",
        instead: "set pipeline.max_in_flight_events and pipeline.max_in_flight_bytes",
    },
    Protected {
        keys: &["queuing.strategy"],
        why: "anything but fifo sends newer records first",
        instead: "remove it",
    },
    Protected {
        keys: &["delivery.report.only.error"],
        why: "walcast confirms a position only on a successful delivery report",
        instead: "remove it",
    },
    Protected {
        keys: &["partitioner"],
        why: "events are partitioned like the Java client does (murmur2_random) so that one aggregate's events stay in one partition, in order",
        instead: "remove it",
    },
    Protected {
        keys: &["transactional.id"],
        why: "walcast's producer is idempotent, not transactional",
        instead: "remove it",
    },
    Protected {
        keys: &["compression.type", "compression.codec"],
        why: "walcast sets it from its own option",
        instead: "use kafka.compression",
    },
    Protected {
        keys: &["linger.ms", "queue.buffering.max.ms"],
        why: "walcast sets it from its own option",
        instead: "use kafka.linger_ms",
    },
    Protected {
        keys: &["bootstrap.servers", "metadata.broker.list"],
        why: "walcast sets it from its own option",
        instead: "use kafka.bootstrap_servers",
    },
];

/// librdkafka size properties walcast reads itself (the record size check and
/// the batch size cap): they must be plain byte counts.
const NUMERIC_KAFKA_PROPERTIES: &[(&str, u64, u64)] = &[
    ("message.max.bytes", 1_000, 1_000_000_000),
    ("batch.size", 1, 2_147_483_647),
];

/// Checks one `kafka.properties` entry.
///
/// # Errors
/// An operator error saying why the key cannot be set and what to use
/// instead, or that a size walcast reads is not a byte count.
fn check_kafka_property(key: &str, value: &str) -> Result<()> {
    if let Some(p) = PROTECTED_KAFKA_PROPERTIES
        .iter()
        .find(|p| p.keys.contains(&key))
    {
        return Err(
            Error::operator(format!("kafka.properties.{key:?} cannot be set: {}", p.why))
                .with_hint(p.instead),
        );
    }
    if let Some((_, min, max)) = NUMERIC_KAFKA_PROPERTIES.iter().find(|(k, _, _)| *k == key) {
        let ok = value
            .trim()
            .parse::<u64>()
            .is_ok_and(|v| (*min..=*max).contains(&v));
        if !ok {
            return Err(Error::operator(format!(
                "kafka.properties.{key:?} = {value:?} is not a byte count from {min} to {max}"
            ))
            .with_hint("write it as a plain number of bytes, for example \"5000000\""));
        }
    }
    Ok(())
}

fn set_path(table: &mut toml::Table, path: &[String], raw: &str, origin: &str) -> Result<()> {
    let (last, parents) = match path.split_last() {
        Some(x) if path.iter().all(|p| !p.is_empty()) => x,
        _ => {
            return Err(Error::operator(format!(
                "{origin} does not name a configuration key"
            )))
        }
    };
    let mut cur = table;
    for p in parents {
        let entry = cur
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| Error::operator(format!("{origin}: {p} is not a section")))?;
    }
    cur.insert(last.clone(), parse_scalar(raw));
    Ok(())
}

/// An override's value: TOML scalar or array when it parses as one, else a string.
fn parse_scalar(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => match t.remove("v") {
            Some(v @ (toml::Value::Table(_) | toml::Value::Datetime(_))) => {
                let _ = v;
                toml::Value::String(raw.to_string())
            }
            Some(v) => v,
            None => toml::Value::String(raw.to_string()),
        },
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
        [postgres]
        host = "127.0.0.1"
        database = "app"
        user = "walcast"
        password = "s3cret"
        [kafka]
        bootstrap_servers = "127.0.0.1:9092"
    "#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_toml(MIN).unwrap();
        assert_eq!(c.postgres.port, 5432);
        assert_eq!(c.postgres.slot, "walcast");
        assert_eq!(
            c.outbox_tables().unwrap(),
            vec![TableName::parse("public.outbox").unwrap()]
        );
        assert_eq!(c.outbox.topic, "outbox.event.${routedByValue}");
        assert_eq!(c.pipeline.max_in_flight_events, 10_000);
        assert_eq!(c.kafka.compression, "lz4");
        assert_eq!(c.metrics.listen, None, "metrics are off by default");
        assert_eq!(
            c.postgres.heartbeat_interval_ms, 10_000,
            "heartbeats are on"
        );
    }

    const PIPELINES: &str = r#"
        [outbox]
        tables = ["public.outbox", "billing.outbox"]
        [[outbox.route]]
        table = "public.orders_outbox"
        route_topic_replacement = "orders"
        [[outbox.message_route]]
        prefix = "walcast"
        [[pipelines]]
        slot = "walcast_a"
        publication = "walcast_a"
        tables = ["public.outbox", "public.orders_outbox"]
        [[pipelines]]
        slot = "walcast_b"
        publication = "walcast_b"
        tables = ["billing.outbox"]
        messages = true
    "#;

    #[test]
    fn pipelines_split_the_tables_and_the_message_routes() {
        let c = Config::from_toml(&format!("{MIN}\n{PIPELINES}")).unwrap();
        let split = c.pipeline_configs().unwrap();
        assert_eq!(split.len(), 2);
        let tables = |c: &Config| -> Vec<String> {
            c.outbox_tables()
                .unwrap()
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        let (a, b) = (&split[0], &split[1]);
        assert_eq!(
            (a.postgres.slot.as_str(), a.postgres.publication.as_str()),
            ("walcast_a", "walcast_a")
        );
        assert_eq!(tables(a), ["public.outbox", "public.orders_outbox"]);
        assert_eq!(a.outbox.routes.len(), 1);
        assert!(a.outbox.message_routes.is_empty(), "only b relays messages");
        assert_eq!(b.postgres.slot, "walcast_b");
        assert_eq!(tables(b), ["billing.outbox"]);
        assert!(b.outbox.routes.is_empty());
        assert_eq!(b.outbox.message_routes.len(), 1);
        for p in &split {
            assert!(p.pipelines.is_empty());
            p.validate().unwrap();
        }
        // Without [[pipelines]]: the configuration itself.
        let one = Config::from_toml(MIN).unwrap().pipeline_configs().unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].postgres.slot, "walcast");
        // The default outbox table can be given to a pipeline.
        let c = Config::from_toml(&format!(
            "{MIN}\n[[pipelines]]\nslot = \"a\"\npublication = \"a\"\ntables = [\"outbox\"]\n"
        ))
        .unwrap();
        assert_eq!(tables(&c.pipeline_configs().unwrap()[0]), ["public.outbox"]);
    }

    #[test]
    fn pipelines_that_would_lose_or_repeat_events_are_refused() {
        let bad = |edit: &dyn Fn(&str) -> String, needle: &str| {
            let text = edit(&format!("{MIN}\n{PIPELINES}"));
            let err = Config::from_toml(&text).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle:?} not in {err:?}\n{text}");
        };
        // A table in two pipelines, or in none.
        bad(
            &|t| {
                t.replace(
                    r#"tables = ["billing.outbox"]"#,
                    r#"tables = ["public.outbox"]"#,
                )
            },
            "public.outbox is in pipelines[0].tables and in pipelines[1].tables",
        );
        bad(
            &|t| {
                t.replace(
                    r#"tables = ["public.outbox", "public.orders_outbox"]"#,
                    r#"tables = ["public.outbox"]"#,
                )
            },
            "outbox table public.orders_outbox is in no [[pipelines]] entry",
        );
        bad(
            &|t| {
                t.replace(
                    r#"tables = ["billing.outbox"]"#,
                    r#"tables = ["billing.outbox", "x.y"]"#,
                )
            },
            "pipelines[1].tables lists x.y, which is not an outbox table",
        );
        bad(
            &|t| t.replace(r#"tables = ["billing.outbox"]"#, "tables = []"),
            "pipelines[1].tables is empty",
        );
        // Table-less events on no slot, or on two.
        bad(
            &|t| t.replace("messages = true", ""),
            "no [[pipelines]] entry has messages = true",
        );
        bad(
            &|t| {
                t.replace(
                    r#"slot = "walcast_a""#,
                    "slot = \"walcast_a\"\nmessages = true",
                )
            },
            "messages = true on 2 pipelines",
        );
        bad(
            &|t| t.replace("[[outbox.message_route]]\n        prefix = \"walcast\"", ""),
            "pipelines[1].messages = true, but there is no [[outbox.message_route]]",
        );
        // One slot or publication for two pipelines.
        bad(
            &|t| t.replace(r#"slot = "walcast_b""#, r#"slot = "walcast_a""#),
            "pipelines[1].slot = \"walcast_a\" is the slot of another pipeline",
        );
        bad(
            &|t| {
                t.replace(
                    r#"publication = "walcast_b""#,
                    r#"publication = "walcast_a""#,
                )
            },
            "is the publication of another pipeline",
        );
        bad(
            &|t| t.replace(r#"slot = "walcast_b""#, r#"slot = "Walcast-B""#),
            "pipelines[1].slot",
        );
        // postgres.slot beside [[pipelines]] would be ignored.
        bad(
            &|t| t.replace("user = \"walcast\"", "user = \"walcast\"\nslot = \"other\""),
            "postgres.slot or postgres.publication is set beside [[pipelines]]",
        );
        // Unknown keys in an entry are refused like everywhere else.
        bad(
            &|t| t.replace("messages = true", "messages = true\nlsot = \"x\""),
            "unknown field",
        );
    }

    /// One table split by key hash over three pipelines.
    fn hash_split(shares: &[(&str, &str)]) -> String {
        let mut t = format!("{MIN}\n[outbox]\ntables = [\"public.outbox\"]\n");
        for (i, (m, r)) in shares.iter().enumerate() {
            t.push_str(&format!(
                "[[pipelines]]\nslot = \"s{i}\"\npublication = \"p{i}\"\ntables = [\"public.outbox\"]\n{m}{r}"
            ));
        }
        t
    }

    #[test]
    fn a_table_split_by_key_hash_is_covered_exactly_once() {
        let m3 = "hash_modulus = 3\n";
        let c = Config::from_toml(&hash_split(&[
            (m3, "hash_remainder = 2\n"),
            (m3, "hash_remainder = 0\n"),
            (m3, "hash_remainder = 1\n"),
        ]))
        .unwrap();
        let split = c.pipeline_configs().unwrap();
        let shares: Vec<_> = split.iter().map(|c| c.postgres.key_hash).collect();
        assert_eq!(
            shares,
            [2, 0, 1].map(|remainder| Some(KeyHash {
                modulus: 3,
                remainder
            }))
        );
        assert!(split
            .iter()
            .all(|c| c.outbox.tables == ["public.outbox".to_string()]));
        // Without a modulus, whole tables.
        let whole = Config::from_toml(&format!(
            "{MIN}\n[[pipelines]]\nslot = \"a\"\npublication = \"a\"\ntables = [\"outbox\"]\n"
        ))
        .unwrap();
        assert_eq!(whole.pipeline_configs().unwrap()[0].postgres.key_hash, None);

        let bad = |shares: &[(&str, &str)], needle: &str| {
            let err = Config::from_toml(&hash_split(shares))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{needle:?} not in {err:?}");
        };
        // A remainder nobody relays, or two pipelines relaying one.
        bad(
            &[(m3, "hash_remainder = 0\n"), (m3, "hash_remainder = 1\n")],
            "public.outbox is split with hash_modulus = 3 but no entry has hash_remainder = 2: those rows would never be relayed",
        );
        bad(
            &[
                (m3, "hash_remainder = 0\n"),
                (m3, "hash_remainder = 1\n"),
                (m3, "hash_remainder = 1\n"),
            ],
            "public.outbox has hash_remainder = 1 in pipelines[1] and in pipelines[2]",
        );
        bad(
            &[
                (m3, "hash_remainder = 0\n"),
                ("hash_modulus = 2\n", "hash_remainder = 1\n"),
            ],
            "public.outbox is split with hash_modulus = 3 in pipelines[0] and 2 in pipelines[1]",
        );
        // A whole table beside a share of it.
        bad(
            &[("", ""), ("hash_modulus = 2\n", "hash_remainder = 1\n")],
            "public.outbox is in pipelines[0].tables and in pipelines[1].tables",
        );
        bad(
            &[("hash_modulus = 2\n", "hash_remainder = 0\n"), ("", "")],
            "public.outbox is in pipelines[0].tables and in pipelines[1].tables",
        );
        // Half a share, or out of range.
        bad(
            &[(m3, ""), (m3, "hash_remainder = 1\n")],
            "pipelines[0] sets only one of hash_modulus and hash_remainder",
        );
        bad(
            &[(m3, "hash_remainder = 3\n")],
            "pipelines[0].hash_remainder = 3 is not below hash_modulus = 3",
        );
        bad(
            &[("hash_modulus = 1\n", "hash_remainder = 0\n")],
            "pipelines[0].hash_modulus = 1 is out of range (2 to 64)",
        );
    }

    #[test]
    fn the_otlp_endpoint_is_validated() {
        let c = Config::from_toml(MIN).unwrap();
        assert_eq!(c.tracing.traces_url(), None, "traces are off by default");
        let url = |e: &str| {
            Config::from_toml(&format!("{MIN}\n[tracing]\notlp_endpoint = {e:?}\n"))
                .map(|c| c.tracing.traces_url().unwrap())
        };
        assert_eq!(
            url("http://127.0.0.1:4318").unwrap(),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            url("http://otel:4318/").unwrap(),
            "http://otel:4318/v1/traces"
        );
        assert_eq!(
            url("http://otel:4318/v1/traces").unwrap(),
            "http://otel:4318/v1/traces"
        );
        for bad in [
            "https://otel:4318",
            "127.0.0.1:4318",
            "http://",
            "http://u:p@otel:4318",
            "http://otel:4318?x=1",
        ] {
            let err = url(bad).unwrap_err();
            assert!(
                err.to_string().contains("tracing.otlp_endpoint"),
                "{bad}: {err}"
            );
        }
        let err = url("https://otel:4318").unwrap_err();
        assert!(
            err.hint().unwrap_or_default().contains("plain HTTP"),
            "{err:?}"
        );
        let err = Config::from_toml(&format!("{MIN}\n[tracing]\nendpoint = \"http://x:1\"\n"))
            .unwrap_err();
        assert!(
            err.to_string().contains("endpoint"),
            "unknown keys are refused: {err}"
        );
        let err =
            Config::from_toml(&format!("{MIN}\n[tracing]\nmax_queued_spans = 0\n")).unwrap_err();
        assert!(
            err.to_string().contains("tracing.max_queued_spans"),
            "{err}"
        );
    }

    #[test]
    fn metrics_listen_is_validated() {
        let c =
            Config::from_toml(&format!("{MIN}\n[metrics]\nlisten = \"127.0.0.1:9187\"\n")).unwrap();
        assert_eq!(c.metrics.listen.as_deref(), Some("127.0.0.1:9187"));
        let err =
            Config::from_toml(&format!("{MIN}\n[metrics]\nlisten = \"localhost\"\n")).unwrap_err();
        assert!(err.to_string().contains("metrics.listen"), "{err}");
    }

    #[test]
    fn the_metrics_listener_is_an_ip_and_port() {
        assert_eq!(Config::from_toml(MIN).unwrap().metrics.listen, None);
        let c =
            Config::from_toml(&format!("{MIN}\n[metrics]\nlisten = \"0.0.0.0:9187\"\n")).unwrap();
        assert_eq!(c.metrics.listen.as_deref(), Some("0.0.0.0:9187"));
        let err =
            Config::from_toml(&format!("{MIN}\n[metrics]\nlisten = \"localhost\"\n")).unwrap_err();
        assert!(err.to_string().contains("metrics.listen"), "{err}");
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let c = Config::from_toml(MIN).unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("s3cret"), "{dbg}");
        assert!(dbg.contains("<redacted>"));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Config::from_toml(&format!("{MIN}\n[pipeline]\nmax_inflight = 3\n")).unwrap_err();
        assert!(err.to_string().contains("max_inflight"), "{err}");
        let err = Config::from_toml(&format!("{MIN}\n[nope]\nx = 1\n")).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn env_and_set_overrides_apply_in_order() {
        let dir = std::env::temp_dir().join(format!("walcast-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("walcast.toml");
        std::fs::write(&f, MIN).unwrap();
        let env = vec![
            ("WALCAST_POSTGRES__PORT".to_string(), "6543".to_string()),
            (
                "WALCAST_PIPELINE__MAX_IN_FLIGHT_EVENTS".to_string(),
                "77".to_string(),
            ),
            ("WALCAST_KAFKA__LINGER_MS".to_string(), "9".to_string()),
            // Not config overrides (no "__"): ignored.
            ("WALCAST_PG_PORT".to_string(), "1".to_string()),
            ("WALCAST_KAFKA_BOOTSTRAP".to_string(), "x".to_string()),
        ];
        let c = Config::load(Some(&f), env, &["kafka.linger_ms=11".into()]).unwrap();
        assert_eq!(c.postgres.port, 6543);
        assert_eq!(c.pipeline.max_in_flight_events, 77);
        assert_eq!(c.kafka.linger_ms, 11);
        let err = Config::load(
            Some(&f),
            vec![("WALCAST_KAFKA__BOGUS".to_string(), "1".to_string())],
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn streaming_is_off_by_default_and_needs_memory_when_on() {
        let c = Config::from_toml(MIN).unwrap();
        assert!(!c.postgres.streaming);
        assert_eq!(c.postgres.stream_memory_bytes, 16 * 1024 * 1024);
        let on = MIN.replace(
            "password = \"s3cret\"",
            "password = \"s3cret\"\nstreaming = true\nstream_memory_bytes = 1048576",
        );
        let c = Config::from_toml(&on).unwrap();
        assert!(c.postgres.streaming);
        assert_eq!(c.postgres.stream_memory_bytes, 1 << 20);
        let err = Config::from_toml(&on.replace("1048576", "0")).unwrap_err();
        assert!(err.to_string().contains("stream_memory_bytes = 0"), "{err}");
        // Off, the bound is not used and not checked.
        let off = on.replace("streaming = true", "streaming = false");
        assert!(Config::from_toml(&off.replace("1048576", "0")).is_ok());
    }

    #[test]
    fn names_and_values_are_validated() {
        let bad_slot = MIN.replace(
            "user = \"walcast\"",
            "user = \"walcast\"\nslot = \"Bad-Slot\"",
        );
        let err = Config::from_toml(&bad_slot).unwrap_err();
        assert!(err.to_string().contains("postgres.slot"), "{err}");
        let long = format!("slot = \"{}\"", "a".repeat(64));
        let err = Config::from_toml(
            &MIN.replace("user = \"walcast\"", &format!("user = \"walcast\"\n{long}")),
        )
        .unwrap_err();
        assert!(err.to_string().contains("postgres.slot"), "{err}");
        let err = Config::from_toml(&format!(
            "{MIN}\n[kafka.properties]\n\"enable.idempotence\" = \"false\"\n"
        ));
        // [kafka.properties] after [kafka] in the same doc is fine TOML.
        assert!(err.unwrap_err().to_string().contains("enable.idempotence"));
        let err = Config::from_toml(&MIN.replace(
            "user = \"walcast\"",
            "user = \"walcast\"\nsslmode = \"verify-full\"",
        ))
        .unwrap_err();
        assert!(err.to_string().contains("verify-ca"), "{err}");
        let err = Config::from_toml(&MIN.replace("127.0.0.1:9092", "")).unwrap_err();
        assert!(err.to_string().contains("bootstrap_servers"));
        let err =
            Config::from_toml(&format!("{MIN}\n[outbox]\ntables = [\"a.b.c\"]\n")).unwrap_err();
        assert!(err.to_string().contains("a.b.c"));
        let err = Config::from_toml(&format!("{MIN}\n[outbox]\ntopic = \"bad topic ${{x}}\"\n"))
            .unwrap_err();
        assert!(err.to_string().contains("outbox.topic"), "{err}");
    }

    #[test]
    fn durability_relevant_kafka_properties_are_protected() {
        for key in [
            "enable.idempotence",
            "acks",
            "request.required.acks",
            "enable.gapless.guarantee",
            "retries",
            "message.send.max.retries",
            "max.in.flight.requests.per.connection",
            "max.in.flight",
            "message.timeout.ms",
            "delivery.timeout.ms",
            "queue.buffering.max.messages",
            "queue.buffering.max.kbytes",
            "queuing.strategy",
            "delivery.report.only.error",
            "partitioner",
            "transactional.id",
            "compression.type",
            "linger.ms",
            "bootstrap.servers",
        ] {
            let err = Config::from_toml(&format!("{MIN}\n[kafka.properties]\n\"{key}\" = \"1\"\n"))
                .unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::OperatorAction, "{key}");
            let text = err.to_string();
            assert!(text.contains(key), "{key}: {text}");
            assert!(text.contains("cannot be set: "), "{key} says why: {text}");
            assert!(err.hint().is_some_and(|h| !h.is_empty()), "{key}: {text}");
        }
        let err = Config::from_toml(&format!("{MIN}\n[kafka.properties]\n\"retries\" = \"3\"\n"))
            .unwrap_err();
        assert!(
            err.to_string().contains("kafka.delivery_timeout_ms"),
            "{err}"
        );
        // Sizes walcast reads must be byte counts; tuning keys pass through.
        for (key, value) in [
            ("message.max.bytes", "5MB"),
            ("message.max.bytes", "10"),
            ("batch.size", "-1"),
        ] {
            let err = Config::from_toml(&format!(
                "{MIN}\n[kafka.properties]\n\"{key}\" = \"{value}\"\n"
            ))
            .unwrap_err();
            assert!(
                err.to_string().contains("byte count"),
                "{key}={value}: {err}"
            );
        }
        let c = Config::from_toml(&format!(
            "{MIN}\n[kafka.properties]\n\"message.max.bytes\" = \"5000000\"\n\"batch.size\" = \"65536\"\n\"socket.keepalive.enable\" = \"true\"\n"
        ))
        .unwrap();
        assert_eq!(c.kafka.properties.len(), 3);
    }

    #[test]
    fn the_state_dir_does_not_depend_on_the_working_directory() {
        use std::ffi::OsString;
        let c = Config::from_toml(MIN).unwrap();
        assert_eq!(c.pipeline.state_topic, "walcast.state");
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        assert_eq!(
            c.state_dir(env(&[
                ("STATE_DIRECTORY", "/var/lib/walcast:/var/lib/other"),
                ("HOME", "/home/w")
            ]))
            .unwrap(),
            PathBuf::from("/var/lib/walcast")
        );
        assert_eq!(
            c.state_dir(env(&[("XDG_STATE_HOME", "/x/state"), ("HOME", "/home/w")]))
                .unwrap(),
            PathBuf::from("/x/state/walcast")
        );
        assert_eq!(
            c.state_dir(env(&[("XDG_STATE_HOME", ""), ("HOME", "/home/w")]))
                .unwrap(),
            PathBuf::from("/home/w/.local/state/walcast")
        );
        let err = c.state_dir(env(&[])).unwrap_err();
        assert!(err.to_string().contains("pipeline.state_dir"), "{err}");
        // A relative path given by the user resolves against the working directory.
        let rel = Config::from_toml(&format!("{MIN}\n[pipeline]\nstate_dir = \"st\"\n")).unwrap();
        let dir = rel.state_dir(env(&[])).unwrap();
        assert!(
            dir.is_absolute() && dir.ends_with("st"),
            "{}",
            dir.display()
        );
        let abs =
            Config::from_toml(&format!("{MIN}\n[pipeline]\nstate_dir = \"/srv/w\"\n")).unwrap();
        assert_eq!(
            abs.state_dir(env(&[("STATE_DIRECTORY", "/x")])).unwrap(),
            PathBuf::from("/srv/w")
        );
    }

    #[test]
    fn the_dead_letter_policy_needs_a_valid_topic_of_its_own() {
        let with = |extra: &str| Config::from_toml(&format!("{MIN}\n[pipeline]\n{extra}\n"));
        let err = with("on_permanent_error = \"dead-letter\"").unwrap_err();
        assert!(
            err.to_string().contains("pipeline.dead_letter_topic"),
            "{err}"
        );
        let err = with("dead_letter_topic = \"dlq\"").unwrap_err();
        assert!(err.to_string().contains("never be used"), "{err}");
        let err =
            with("on_permanent_error = \"dead-letter\"\ndead_letter_topic = \"a b\"").unwrap_err();
        assert!(
            err.to_string().contains("pipeline.dead_letter_topic"),
            "{err}"
        );
        let err =
            with("on_permanent_error = \"dead-letter\"\ndead_letter_topic = \"walcast.state\"")
                .unwrap_err();
        assert!(err.to_string().contains("state_topic"), "{err}");
        let err =
            with("on_permanent_error = \"dead-letter\"\ndead_letter_topic = \"outbox.event.dlq\"")
                .unwrap_err();
        assert!(err.to_string().contains("outbox.topic"), "{err}");
        let ok = with(
            "on_permanent_error = \"dead-letter\"\ndead_letter_topic = \"walcast.dead-letters\"",
        )
        .unwrap();
        assert_eq!(
            ok.pipeline.on_permanent_error,
            PermanentErrorPolicy::DeadLetter
        );
        assert_eq!(
            ok.pipeline.dead_letter_topic.as_deref(),
            Some("walcast.dead-letters")
        );
    }

    #[test]
    fn each_route_may_have_its_own_dead_letter_policy() {
        use crate::route::OnPermanentError;
        use std::sync::Arc;
        let with = |pipeline: &str, routes: &str| {
            Config::from_toml(&format!("{MIN}\n[pipeline]\n{pipeline}\n{routes}\n"))
        };
        const TWO: &str = r#"
            [[outbox.route]]
            table = "public.a"
            route_topic_replacement = "orders"
            on_permanent_error = "dead-letter"
            dead_letter_topic = "orders.dlq"
            [[outbox.route]]
            table = "public.b"
            route_topic_replacement = "payments"
            on_permanent_error = "stop"
            [[outbox.route]]
            table = "public.c"
            route_topic_replacement = "refunds"
        "#;
        let c = with("", TWO).unwrap();
        let routes = c.routes().unwrap();
        let policy = |i: usize| routes.specs[i].on_permanent_error.clone();
        assert_eq!(policy(0), OnPermanentError::Inherit);
        assert_eq!(
            policy(1),
            OnPermanentError::DeadLetter(Arc::from("orders.dlq"))
        );
        assert_eq!(policy(2), OnPermanentError::Stop);
        assert_eq!(
            policy(3),
            OnPermanentError::Inherit,
            "unset: the pipeline's"
        );
        assert_eq!(
            c.dead_letter_topics().unwrap(),
            vec![(
                "orders.dlq".to_string(),
                "outbox.route[public.a].dead_letter_topic".to_string()
            )]
        );
        // The pipeline's dead-letter policy: inherited by public.c, not by public.b.
        let c = with(
            "on_permanent_error = \"dead-letter\"\ndead_letter_topic = \"all.dlq\"",
            TWO,
        )
        .unwrap();
        let routes = c.routes().unwrap();
        assert_eq!(routes.specs[2].on_permanent_error, OnPermanentError::Stop);
        let all: Arc<str> = Arc::from("all.dlq");
        assert_eq!(
            routes.specs[3].on_permanent_error.topic(Some(&all)),
            Some(all.clone())
        );
        assert_eq!(routes.specs[2].on_permanent_error.topic(Some(&all)), None);
        assert_eq!(c.dead_letter_topics().unwrap().len(), 2);
        // "dead-letter" without a topic anywhere names the route's key.
        let no_topic = TWO.replace("dead_letter_topic = \"orders.dlq\"", "");
        let err = with("", &no_topic).unwrap_err();
        assert!(
            err.to_string()
                .contains("outbox.route[public.a].on_permanent_error = \"dead-letter\" needs outbox.route[public.a].dead_letter_topic"),
            "{err}"
        );
        // ... the pipeline's topic serves it (and is then not unused).
        let c = with("dead_letter_topic = \"all.dlq\"", &no_topic).unwrap();
        assert_eq!(
            c.routes().unwrap().specs[1].on_permanent_error,
            OnPermanentError::DeadLetter(all.clone())
        );
        assert_eq!(
            c.dead_letter_topics().unwrap(),
            vec![(
                "all.dlq".to_string(),
                "pipeline.dead_letter_topic".to_string()
            )]
        );
        // A route's topic under "stop" would never be used.
        let unused = TWO.replace(
            "on_permanent_error = \"stop\"",
            "dead_letter_topic = \"x.dlq\"",
        );
        let err = with("", &unused).unwrap_err();
        assert!(
            err.to_string()
                .contains("outbox.route[public.b].dead_letter_topic"),
            "{err}"
        );
        // A dead-letter topic that is a route's topic, the default route's, the
        // state topic, or invalid.
        for (topic, names) in [
            ("payments", "outbox.route[public.b].route_topic_replacement"),
            ("walcast.state", "pipeline.state_topic"),
            ("a b", "outbox.route[public.a].dead_letter_topic"),
        ] {
            let bad = TWO.replace("orders.dlq", topic);
            let err = with("", &bad).unwrap_err();
            assert!(err.to_string().contains(names), "{topic}: {err}");
        }
        let err = Config::from_toml(&format!(
            "{MIN}\n[outbox]\ntables = [\"public.outbox\"]\n{}",
            TWO.replace("orders.dlq", "outbox.event.x")
        ))
        .unwrap_err();
        assert!(err.to_string().contains("outbox.topic"), "{err}");
        // Table-less routes too.
        let err = with(
            "",
            "[[outbox.message_route]]\nprefix = \"app\"\non_permanent_error = \"dead-letter\"",
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("outbox.message_route[\"app\"].dead_letter_topic"),
            "{err}"
        );
        let c = with(
            "",
            "[[outbox.message_route]]\nprefix = \"app\"\non_permanent_error = \"dead-letter\"\ndead_letter_topic = \"app.dlq\"",
        )
        .unwrap();
        assert_eq!(
            c.routes().unwrap().messages[0].on_permanent_error,
            OnPermanentError::DeadLetter(Arc::from("app.dlq"))
        );
    }

    #[test]
    fn the_state_topic_is_validated() {
        for bad in ["", "has space", "..", "a/b"] {
            let err = Config::from_toml(&format!("{MIN}\n[pipeline]\nstate_topic = \"{bad}\"\n"))
                .unwrap_err();
            assert!(err.to_string().contains("pipeline.state_topic"), "{err}");
        }
        let ok = Config::from_toml(&format!(
            "{MIN}\n[pipeline]\nstate_topic = \"ops.walcast-state_1\"\n"
        ))
        .unwrap();
        assert_eq!(ok.pipeline.state_topic, "ops.walcast-state_1");
    }

    #[test]
    fn table_names_parse_and_quote() {
        assert_eq!(
            TableName::parse("outbox").unwrap().to_string(),
            "public.outbox"
        );
        assert_eq!(TableName::parse("s.o").unwrap().to_string(), "s.o");
        // As the catalog has them, or SQL-quoted: the same table.
        let plain = TableName::parse("billing.EventLog").unwrap();
        assert_eq!(plain.schema, "billing");
        assert_eq!(plain.name, "EventLog");
        assert_eq!(TableName::parse("billing.\"EventLog\"").unwrap(), plain);
        assert_eq!(TableName::parse("\"billing\".\"EventLog\"").unwrap(), plain);
        let odd = TableName::parse("\"my.schema\".\"say \"\"hi\"\"\"").unwrap();
        assert_eq!(odd.schema, "my.schema");
        assert_eq!(odd.name, "say \"hi\"");
        assert_eq!(TableName::parse("\"Outbox\"").unwrap().schema, "public");
        // A quote inside an unquoted name is part of it, as before.
        assert_eq!(TableName::parse("s.Event\"Log").unwrap().name, "Event\"Log");
        for bad in ["a.b.c", "", "s.", ".t", "s.\"\"", "s.\"open", "s.\"a\"b"] {
            let err = TableName::parse(bad).unwrap_err();
            assert!(
                err.to_string().contains("not a valid name"),
                "{bad:?}: {err}"
            );
        }
    }
}
