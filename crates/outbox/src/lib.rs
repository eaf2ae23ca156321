//! walcast's outbox writer: write events in the caller's own database
//! transaction, so an event and the business rows it describes commit or roll
//! back together; walcast relays the committed INSERTs to Kafka.
//!
//! - [`migrations`]: the canonical outbox table (plain or hash-partitioned by
//!   aggregate id) and the consumer's `processed_events` table, as plain SQL
//!   files (`crates/outbox/migrations/`) and applied from Rust.
//! - [`Event`]: id (UUID v7 by default), aggregate type and id, event type,
//!   payload (JSON, raw bytes or a [`prost`] message), correlation id,
//!   `traceparent`, and (table-less mode only) other headers.
//! - [`migrations::WALCAST_CONFIG`]: the walcast `[outbox]` routes under which
//!   every mode gives the same Kafka record (headers `id`, `type`,
//!   `correlation_id`, `traceparent`).
//! - [`Outbox::enqueue`] / [`Outbox::enqueue_batch`]: one generic entry point
//!   over tokio-postgres [`Client`](tokio_postgres::Client) and
//!   [`Transaction`](tokio_postgres::Transaction) ([`GenericClient`]); a batch
//!   is one statement (`UNNEST`), so one round trip.
//! - With the `sqlx` feature, `Outbox::enqueue_sqlx` /
//!   `Outbox::enqueue_batch_sqlx`: the same over sqlx, one generic entry
//!   point over `sqlx::Acquire` (`&mut Transaction<'_, Postgres>`,
//!   `&mut PgConnection`, `&PgPool`).
//! - [`Mode`]: insert, or insert-then-delete in the same transaction (the
//!   table stays empty; the WAL still carries the insert, which is all walcast
//!   reads), or table-less: a transactional logical decoding message carrying
//!   the protobuf `walcast.v1.Envelope`.
//! - [`prune`]: delete old rows of the insert mode without ever deleting a row
//!   whose event walcast has not confirmed.
//! - [`rotate`]: for an outbox range-partitioned by `created_at`, create
//!   daily partitions ahead and drop old ones only after walcast confirmed
//!   their events.
//!
//! **Durability contract.** `enqueue` only executes statements on the client
//! it is given; it never commits. Pass a [`Transaction`](tokio_postgres::Transaction)
//! and the event is published if and only if that transaction commits (at
//! least once: consumers deduplicate on the `id` header). On a plain `Client`
//! every statement is its own transaction (autocommit). Per aggregate id,
//! events reach Kafka in commit order, and within one transaction in the order
//! they were enqueued.
#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::sync::RwLock;

use tokio_postgres::GenericClient;
use uuid::Uuid;

pub mod migrations;
mod prune;
mod rotate;
#[cfg(feature = "sqlx")]
mod sqlx_support;

/// The `prost` this crate encodes [`Event::prost`] payloads with.
pub use prost;
pub use prune::{prune, PruneOptions, PruneReport};
pub use rotate::{plan as rotate_plan, rotate, RotateOptions, RotatePlan, RotateReport};

/// Errors of the outbox writer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database refused a statement (the caller's transaction is then
    /// aborted, like for any failed statement).
    #[error("outbox: {context}: {source}")]
    Db {
        /// What was being done.
        context: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// sqlx returned an error (feature `sqlx`; the caller's transaction is
    /// then aborted, like for any failed statement).
    #[cfg(feature = "sqlx")]
    #[error("outbox: {context}: {source}")]
    Sqlx {
        /// What was being done.
        context: String,
        /// sqlx's error (it includes the server's message).
        #[source]
        source: sqlx::Error,
    },
    /// An event that cannot be written as configured.
    #[error("outbox: invalid event {id}: {reason}")]
    InvalidEvent {
        /// The event's id.
        id: Uuid,
        /// Why.
        reason: String,
    },
    /// A table name that is not `name` or `schema.name` of `[A-Za-z0-9_]`.
    #[error("outbox: invalid table name {0:?}: use name or schema.name of letters, digits and _")]
    InvalidTable(String),
    /// Pruning or rotation found no replication slot of that name.
    #[error("outbox: replication slot {0:?} does not exist; pruning and partition rotation need the slot walcast confirms on (postgres.slot)")]
    SlotMissing(String),
    /// A table [`rotate`] cannot rotate.
    #[error("outbox rotate: {table} cannot be rotated: {reason}. Rotation needs an outbox partitioned by RANGE (created_at) (migrations/0001_outbox_range_partitioned.sql)")]
    NotRotatable {
        /// The table.
        table: String,
        /// Why.
        reason: String,
    },
    /// Rotation detached old partitions but the slot did not confirm their
    /// position in time: nothing was dropped.
    #[error("outbox rotate: slot {slot:?} confirmed {confirmed} but the detached partitions {tables:?} are only safe to drop once it reaches {needed}; waited {waited_ms} ms. Nothing was dropped: they stay detached (their rows readable under their own names) and the next rotation drops them once walcast has caught up. Is walcast running and keeping up? Retry later or raise --wait-timeout")]
    DropPending {
        /// The slot.
        slot: String,
        /// Its confirmed_flush_lsn (or "none").
        confirmed: String,
        /// The position it must reach.
        needed: String,
        /// How long rotation waited.
        waited_ms: u128,
        /// The detached partitions waiting to be dropped.
        tables: Vec<String>,
    },
    /// Pruning waited too long for walcast to confirm the current position.
    #[error("outbox prune: slot {slot:?} confirmed {confirmed} but rows are only safe to delete once it reaches {needed}; waited {waited_ms} ms. Is walcast running and keeping up? Retry later or raise --wait-timeout")]
    SlotBehind {
        /// The slot.
        slot: String,
        /// Its confirmed_flush_lsn (or "none").
        confirmed: String,
        /// The position it must reach.
        needed: String,
        /// How long prune waited.
        waited_ms: u128,
    },
}

pub(crate) fn db(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Error {
    let context = context.into();
    move |source| {
        // The driver's Display is only "db error": name what the server said.
        let context = match source.as_db_error() {
            Some(e) => format!("{context}: {}", e.message()),
            None => context,
        };
        Error::Db { context, source }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An event's payload.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// A JSON value (the outbox's `payload` column is `jsonb`).
    Json(serde_json::Value),
    /// Raw bytes: for a `bytea` payload column they are stored as they are;
    /// for a `jsonb` column they must be UTF-8 JSON text.
    Bytes(Vec<u8>),
    /// An encoded protobuf message ([`Event::prost`], [`Event::with_prost`]):
    /// the bytes of a `bytea` payload column, or the envelope's `payload`
    /// (`content_type` [`PROTOBUF_CONTENT_TYPE`]) in [`Mode::Message`]. A
    /// `jsonb` column cannot hold it ([`Error::InvalidEvent`]).
    Protobuf(Vec<u8>),
}

/// The envelope's `content_type` of a [`Payload::Protobuf`].
pub const PROTOBUF_CONTENT_TYPE: &str = "application/x-protobuf";

/// Header key the correlation id is stored under.
pub const CORRELATION_ID_HEADER: &str = "correlation_id";
/// Header key the W3C trace context is stored under.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// A function that returns the W3C `traceparent` of the current span, if any.
pub type TraceparentSource = fn() -> Option<String>;

static TRACEPARENT_SOURCE: RwLock<Option<TraceparentSource>> = RwLock::new(None);

/// Installs the function [`Event::new`] asks for the current span's
/// `traceparent` (for example one built on `tracing-opentelemetry` that
/// formats the current span's OpenTelemetry context). Without one, events
/// carry a `traceparent` only when set with [`Event::traceparent`].
pub fn set_traceparent_source(source: TraceparentSource) {
    *TRACEPARENT_SOURCE
        .write()
        .unwrap_or_else(|e| e.into_inner()) = Some(source);
}

fn current_traceparent() -> Option<String> {
    let source = *TRACEPARENT_SOURCE.read().unwrap_or_else(|e| e.into_inner());
    source.and_then(|f| f())
}

/// One outbox event. Build it with [`Event::new`] and the `with` methods.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The event id (the Kafka `id` header consumers deduplicate on).
    pub id: Uuid,
    /// Aggregate type: routes to the topic (`outbox.event.<aggregatetype>` by default).
    pub aggregate_type: String,
    /// Aggregate id: the Kafka record key (one aggregate's events keep their order).
    pub aggregate_id: String,
    /// Event type (the `type` header).
    pub event_type: String,
    /// The record value.
    pub payload: Payload,
    /// Headers: the correlation id ([`CORRELATION_ID_HEADER`], the
    /// `correlation_id` column) and the traceparent ([`TRACEPARENT_HEADER`],
    /// the `tracingspancontext` column) in every mode; any other header only
    /// in [`Mode::Message`] (the envelope's headers): the table modes refuse
    /// it ([`Error::InvalidEvent`]), because the relay places columns, not a
    /// map of headers.
    pub headers: BTreeMap<String, String>,
}

impl Event {
    /// A new event with a fresh UUID v7 id (time-ordered, so the primary key
    /// index stays append-mostly) and a JSON payload. Takes the current
    /// span's `traceparent` from the installed [`TraceparentSource`] if there is one.
    pub fn new(
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        payload: serde_json::Value,
    ) -> Event {
        let mut headers = BTreeMap::new();
        if let Some(tp) = current_traceparent() {
            headers.insert(TRACEPARENT_HEADER.to_string(), tp);
        }
        Event {
            id: Uuid::now_v7(),
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            event_type: event_type.into(),
            payload: Payload::Json(payload),
            headers,
        }
    }

    /// A JSON payload from any serializable value.
    pub fn json<T: serde::Serialize>(
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        payload: &T,
    ) -> Result<Event, serde_json::Error> {
        Ok(Event::new(
            aggregate_type,
            aggregate_id,
            event_type,
            serde_json::to_value(payload)?,
        ))
    }

    /// A new event (as [`Event::new`]) whose payload is the protobuf
    /// encoding of `message` ([`Payload::Protobuf`]); consumers decode the
    /// record's value with the same message type.
    pub fn prost<M: prost::Message>(
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        message: &M,
    ) -> Event {
        Event::new(
            aggregate_type,
            aggregate_id,
            event_type,
            serde_json::Value::Null,
        )
        .with_prost(message)
    }

    /// Replaces the payload with the protobuf encoding of `message`.
    pub fn with_prost<M: prost::Message>(mut self, message: &M) -> Event {
        self.payload = Payload::Protobuf(message.encode_to_vec());
        self
    }

    /// Replaces the id (for example a v4 id, or an id derived from a request
    /// for idempotent producers).
    pub fn with_id(mut self, id: Uuid) -> Event {
        self.id = id;
        self
    }

    /// Replaces the payload with raw bytes.
    pub fn with_bytes(mut self, bytes: impl Into<Vec<u8>>) -> Event {
        self.payload = Payload::Bytes(bytes.into());
        self
    }

    /// Adds a header. Other than [`CORRELATION_ID_HEADER`] and
    /// [`TRACEPARENT_HEADER`], headers reach Kafka only in [`Mode::Message`];
    /// the table modes refuse an event that has one.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Event {
        self.headers.insert(key.into(), value.into());
        self
    }

    /// Sets the correlation id (header `correlation_id`).
    pub fn correlation_id(self, id: impl Into<String>) -> Event {
        self.header(CORRELATION_ID_HEADER, id)
    }

    /// Sets the W3C trace context (header `traceparent`).
    pub fn traceparent(self, tp: impl Into<String>) -> Event {
        self.header(TRACEPARENT_HEADER, tp)
    }
}

/// How events are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// INSERT into the outbox table; rows stay until pruned ([`prune`]).
    #[default]
    Insert,
    /// INSERT, then DELETE the same rows in the same transaction: the table
    /// stays empty while the WAL (what walcast reads) still carries the
    /// inserts. Call it inside a transaction; on a plain client the two
    /// statements commit separately (the events are still published).
    InsertDelete,
    /// No table: each event is a transactional logical decoding message,
    /// `pg_logical_emit_message(true, prefix, content)`, whose content is the
    /// protobuf `walcast.v1.Envelope` (`walcast-envelope`, docs/envelope.md).
    /// Published only if the transaction commits; nothing to clean up. Needs
    /// a walcast that relays messages of the prefix ([`Outbox::message_prefix`],
    /// default `walcast`) with an `[[outbox.message_route]]`
    /// ([`migrations::WALCAST_CONFIG`]). The JSON payload is rendered by
    /// Postgres' `jsonb` (one extra round trip per batch), so its bytes are
    /// the ones the table modes send; the envelope's timestamp is left 0, so
    /// the record's timestamp is the commit time, as in the table modes.
    Message,
}

/// The type of the outbox's `payload` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PayloadColumn {
    /// `jsonb` (the canonical table).
    #[default]
    Jsonb,
    /// `bytea`: walcast sends the bytes as they are.
    Bytea,
}

/// A configured outbox: table, mode and payload column type.
#[derive(Debug, Clone)]
pub struct Outbox {
    table: String,
    mode: Mode,
    payload: PayloadColumn,
    prefix: String,
    insert_sql: String,
    delete_sql: String,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox::new("outbox").expect("valid default table")
    }
}

fn valid_table(t: &str) -> bool {
    let parts: Vec<&str> = t.split('.').collect();
    parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.len() <= 63
                && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !p.starts_with(|c: char| c.is_ascii_digit())
        })
}

impl Outbox {
    /// The outbox `table` (`name` or `schema.name`) in [`Mode::Insert`] with
    /// a `jsonb` payload and the canonical columns.
    pub fn new(table: &str) -> Result<Outbox> {
        if !valid_table(table) {
            return Err(Error::InvalidTable(table.to_string()));
        }
        let mut o = Outbox {
            table: table.to_string(),
            mode: Mode::Insert,
            payload: PayloadColumn::Jsonb,
            prefix: "walcast".to_string(),
            insert_sql: String::new(),
            delete_sql: String::new(),
        };
        o.build_sql();
        Ok(o)
    }

    /// Sets the mode.
    pub fn mode(mut self, mode: Mode) -> Outbox {
        self.mode = mode;
        self
    }

    /// Sets the payload column's type.
    pub fn payload_column(mut self, payload: PayloadColumn) -> Outbox {
        self.payload = payload;
        self.build_sql();
        self
    }

    /// The logical decoding message prefix of [`Mode::Message`] (default `walcast`).
    pub fn message_prefix(mut self, prefix: impl Into<String>) -> Outbox {
        self.prefix = prefix.into();
        self
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.table
    }

    fn build_sql(&mut self) {
        let (ptype, pexpr) = match self.payload {
            PayloadColumn::Jsonb => ("text[]", "p::jsonb"),
            PayloadColumn::Bytea => ("bytea[]", "p"),
        };
        // WITH ORDINALITY keeps the enqueue order as the insert order, which
        // is the order walcast publishes a transaction's events in.
        self.insert_sql = format!(
            "INSERT INTO {t} (id, aggregatetype, aggregateid, type, payload, correlation_id, tracingspancontext) \
             SELECT i, a, k, y, {pexpr}, c, tr \
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::{ptype}, $6::text[], $7::text[]) \
             WITH ORDINALITY AS u(i, a, k, y, p, c, tr, n) ORDER BY n",
            t = self.table
        );
        self.delete_sql = format!(
            "DELETE FROM {t} o USING unnest($1::uuid[], $2::text[]) AS u(i, k) \
             WHERE o.id = u.i AND o.aggregateid = u.k",
            t = self.table
        );
    }

    /// Writes one event on `client` (a `Client` or, for atomicity with your
    /// business rows, a `Transaction`). Never commits.
    pub async fn enqueue<C: GenericClient + Sync>(&self, client: &C, event: &Event) -> Result<()> {
        self.enqueue_batch(client, std::slice::from_ref(event))
            .await
            .map(|_| ())
    }

    /// Writes `events` in one statement (an INSERT from `UNNEST`; then one
    /// DELETE in [`Mode::InsertDelete`]), in slice order. Returns the
    /// number of rows inserted. Never commits.
    pub async fn enqueue_batch<C: GenericClient + Sync>(
        &self,
        client: &C,
        events: &[Event],
    ) -> Result<u64> {
        if events.is_empty() {
            return Ok(0);
        }
        if self.mode == Mode::Message {
            return self.emit_messages(client, events).await;
        }
        let rows = self.rows(events)?;
        let payloads: &(dyn tokio_postgres::types::ToSql + Sync) = match &rows.payloads {
            Payloads::Text(t) => t,
            Payloads::Bytes(b) => b,
        };
        let insert_params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] = [
            &rows.ids,
            &rows.types,
            &rows.keys,
            &rows.etypes,
            payloads,
            &rows.correlation_ids,
            &rows.traceparents,
        ];
        let delete_params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] =
            [&rows.ids, &rows.keys];
        let insert = client.execute(self.insert_sql.as_str(), &insert_params);
        match self.mode {
            Mode::Insert | Mode::Message => insert
                .await
                .map_err(db(format!("INSERT INTO {}", self.table))),
            Mode::InsertDelete => {
                // Strictly one after the other: pipelining the two (joining
                // the futures) lets the DELETE run before the INSERT, because
                // each statement is prepared first and the executes then go
                // out in whichever order the futures are polled.
                let n = insert
                    .await
                    .map_err(db(format!("INSERT INTO {}", self.table)))?;
                client
                    .execute(self.delete_sql.as_str(), &delete_params)
                    .await
                    .map_err(db(format!("DELETE FROM {}", self.table)))?;
                Ok(n)
            }
        }
    }
}

impl Outbox {
    async fn emit_messages<C: GenericClient + Sync>(
        &self,
        client: &C,
        events: &[Event],
    ) -> Result<u64> {
        // JSON payloads as Postgres' jsonb renders them: the same bytes the
        // table modes' jsonb column gives walcast.
        let json = json_texts(events);
        let rendered: Vec<Option<String>> = if json.iter().any(Option::is_some) {
            client
                .query(RENDER_JSONB_SQL, &[&json])
                .await
                .map_err(db("rendering JSON payloads as jsonb"))?
                .iter()
                .map(|r| r.get(0))
                .collect()
        } else {
            json
        };
        let contents = message_contents(events, rendered);
        client
            .execute(EMIT_SQL, &[&self.prefix, &contents])
            .await
            .map_err(db("pg_logical_emit_message"))
    }
}

/// The payload column's values of a batch.
pub(crate) enum Payloads {
    /// For a `jsonb` column (cast from text).
    Text(Vec<String>),
    /// For a `bytea` column.
    Bytes(Vec<Vec<u8>>),
}

/// A batch as the column arrays the INSERT unnests.
pub(crate) struct Rows<'a> {
    pub(crate) ids: Vec<Uuid>,
    pub(crate) types: Vec<&'a str>,
    pub(crate) keys: Vec<&'a str>,
    pub(crate) etypes: Vec<&'a str>,
    pub(crate) payloads: Payloads,
    pub(crate) correlation_ids: Vec<Option<&'a str>>,
    pub(crate) traceparents: Vec<Option<&'a str>>,
}

impl Outbox {
    /// Checks the events for the table modes and lays them out as columns.
    pub(crate) fn rows<'a>(&self, events: &'a [Event]) -> Result<Rows<'a>> {
        let mut ids = Vec::with_capacity(events.len());
        let mut types = Vec::with_capacity(events.len());
        let mut keys = Vec::with_capacity(events.len());
        let mut etypes = Vec::with_capacity(events.len());
        let mut text_payloads: Vec<String> = Vec::new();
        let mut byte_payloads: Vec<Vec<u8>> = Vec::new();
        let mut correlation_ids: Vec<Option<&str>> = Vec::with_capacity(events.len());
        let mut traceparents: Vec<Option<&str>> = Vec::with_capacity(events.len());
        for e in events {
            if let Some(k) = e
                .headers
                .keys()
                .find(|k| k.as_str() != CORRELATION_ID_HEADER && k.as_str() != TRACEPARENT_HEADER)
            {
                return Err(Error::InvalidEvent {
                    id: e.id,
                    reason: format!(
                        "header {k:?}: the outbox table carries only {CORRELATION_ID_HEADER:?} and {TRACEPARENT_HEADER:?} (columns correlation_id, tracingspancontext); use Mode::Message, whose envelope carries any header, or put the value in a column of your own placed with table_fields_additional_placement"
                    ),
                });
            }
            ids.push(e.id);
            types.push(e.aggregate_type.as_str());
            keys.push(e.aggregate_id.as_str());
            etypes.push(e.event_type.as_str());
            correlation_ids.push(e.headers.get(CORRELATION_ID_HEADER).map(String::as_str));
            traceparents.push(e.headers.get(TRACEPARENT_HEADER).map(String::as_str));
            match (self.payload, &e.payload) {
                (PayloadColumn::Jsonb, Payload::Json(v)) => text_payloads.push(v.to_string()),
                (PayloadColumn::Jsonb, Payload::Bytes(b)) => {
                    let s = std::str::from_utf8(b).map_err(|_| Error::InvalidEvent {
                        id: e.id,
                        reason: "raw bytes for a jsonb payload column must be UTF-8 JSON text (use PayloadColumn::Bytea for binary payloads)".into(),
                    })?;
                    if serde_json::from_str::<serde::de::IgnoredAny>(s).is_err() {
                        return Err(Error::InvalidEvent {
                            id: e.id,
                            reason: "raw bytes for a jsonb payload column must be valid JSON"
                                .into(),
                        });
                    }
                    text_payloads.push(s.to_string())
                }
                (PayloadColumn::Bytea, Payload::Json(v)) => {
                    byte_payloads.push(v.to_string().into_bytes())
                }
                (PayloadColumn::Jsonb, Payload::Protobuf(_)) => {
                    return Err(Error::InvalidEvent {
                        id: e.id,
                        reason: "a protobuf payload needs a bytea payload column (Outbox::payload_column(PayloadColumn::Bytea)) or Mode::Message; this outbox's payload column is jsonb".into(),
                    })
                }
                (PayloadColumn::Bytea, Payload::Bytes(b) | Payload::Protobuf(b)) => {
                    byte_payloads.push(b.clone())
                }
            }
        }
        Ok(Rows {
            ids,
            types,
            keys,
            etypes,
            payloads: match self.payload {
                PayloadColumn::Jsonb => Payloads::Text(text_payloads),
                PayloadColumn::Bytea => Payloads::Bytes(byte_payloads),
            },
            correlation_ids,
            traceparents,
        })
    }
}

/// [`Mode::Message`]: the JSON payloads to render as `jsonb` text (None for
/// the others).
pub(crate) fn json_texts(events: &[Event]) -> Vec<Option<String>> {
    events
        .iter()
        .map(|e| match &e.payload {
            Payload::Json(v) => Some(v.to_string()),
            Payload::Bytes(_) | Payload::Protobuf(_) => None,
        })
        .collect()
}

/// [`Mode::Message`]'s message contents, with the JSON payloads as rendered.
pub(crate) fn message_contents(events: &[Event], rendered: Vec<Option<String>>) -> Vec<Vec<u8>> {
    // Timestamp 0: walcast uses the commit time, as for the table modes.
    events
        .iter()
        .zip(rendered)
        .map(|(e, text)| {
            let mut env = envelope(e, 0);
            if let Some(text) = text {
                env.payload = text.into_bytes();
            }
            walcast_envelope::encode(&env)
        })
        .collect()
}

/// Renders JSON texts as Postgres' `jsonb` does, in order.
pub(crate) const RENDER_JSONB_SQL: &str =
    "SELECT p::jsonb::text FROM unnest($1::text[]) WITH ORDINALITY AS u(p, n) ORDER BY n";
/// Emits one transactional message per content, in order (`$1` prefix,
/// `$2` contents): unnest yields the array in order.
pub(crate) const EMIT_SQL: &str = "SELECT pg_catalog.pg_logical_emit_message(true, $1::text, c) \
     FROM unnest($2::bytea[]) WITH ORDINALITY AS u(c, n) ORDER BY n";

/// The `walcast.v1.Envelope` of an event ([`Mode::Message`]'s content):
/// correlation id and traceparent in their own fields, the other headers in
/// `headers`; a JSON payload as its compact text with `content_type`
/// `application/json` ([`Mode::Message`] writes it as `jsonb` renders it),
/// a protobuf payload as its bytes with [`PROTOBUF_CONTENT_TYPE`];
/// `timestamp_unix_micros` 0 means the commit time.
pub fn envelope(e: &Event, timestamp_unix_micros: i64) -> walcast_envelope::Envelope {
    let (payload, content_type) = match &e.payload {
        Payload::Json(v) => (v.to_string().into_bytes(), "application/json"),
        Payload::Bytes(b) => (b.clone(), ""),
        Payload::Protobuf(b) => (b.clone(), PROTOBUF_CONTENT_TYPE),
    };
    walcast_envelope::Envelope {
        event_id: e.id.to_string(),
        aggregate_type: e.aggregate_type.clone(),
        aggregate_id: e.aggregate_id.clone(),
        event_type: e.event_type.clone(),
        timestamp_unix_micros,
        headers: e
            .headers
            .iter()
            .filter(|(k, _)| {
                k.as_str() != CORRELATION_ID_HEADER && k.as_str() != TRACEPARENT_HEADER
            })
            .map(|(k, v)| walcast_envelope::Header {
                key: k.clone(),
                value: v.clone().into_bytes(),
            })
            .collect(),
        payload,
        content_type: content_type.to_string(),
        correlation_id: e
            .headers
            .get(CORRELATION_ID_HEADER)
            .cloned()
            .unwrap_or_default(),
        traceparent: e
            .headers
            .get(TRACEPARENT_HEADER)
            .cloned()
            .unwrap_or_default(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_v7_and_ordered() {
        let a = Event::new("Order", "1", "Created", serde_json::json!({}));
        let b = Event::new("Order", "1", "Created", serde_json::json!({}));
        assert_eq!(a.id.get_version_num(), 7);
        assert!(a.id < b.id);
    }

    #[test]
    fn builder_sets_headers() {
        let e = Event::new("Order", "1", "Created", serde_json::json!({"a": 1}))
            .correlation_id("c-1")
            .traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .header("tenant", "t");
        assert_eq!(
            e.headers.get(CORRELATION_ID_HEADER).map(String::as_str),
            Some("c-1")
        );
        assert_eq!(e.headers.len(), 3);
    }

    #[test]
    fn traceparent_source_is_used() {
        fn tp() -> Option<String> {
            Some("00-11111111111111111111111111111111-2222222222222222-01".into())
        }
        set_traceparent_source(tp);
        let e = Event::new("Order", "1", "Created", serde_json::json!({}));
        assert_eq!(e.headers.get(TRACEPARENT_HEADER), tp().as_ref());
    }

    #[test]
    fn prost_payloads_are_encoded() {
        let header = walcast_envelope::Header {
            key: "k".into(),
            value: vec![0xff, 0],
        };
        let e = Event::prost("Order", "1", "Created", &header);
        assert_eq!(
            e.payload,
            Payload::Protobuf(prost::Message::encode_to_vec(&header))
        );
        let env = envelope(&e, 0);
        assert_eq!(env.content_type, PROTOBUF_CONTENT_TYPE);
        let back: walcast_envelope::Header =
            prost::Message::decode(env.payload.as_slice()).unwrap();
        assert_eq!(back, header);
    }

    #[test]
    fn table_names_are_checked() {
        assert!(Outbox::new("public.outbox").is_ok());
        assert!(Outbox::new("outbox; DROP TABLE x").is_err());
        assert!(Outbox::new("a.b.c").is_err());
    }
}
