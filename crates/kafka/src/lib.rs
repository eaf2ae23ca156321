//! walcast's Kafka sink: an idempotent rdkafka producer whose delivery reports
//! feed the relay's ack tracker.
//!
//! Guarantees (the [`EventSink`] contract): `enable.idempotence=true` (which
//! implies `acks=all`), Java-compatible key partitioning (`murmur2_random`), so
//! one aggregate's events land in one partition in order; an event's outcome
//! is `Ok` only on a successful delivery report. With
//! `enable.gapless.guarantee=true` a record that fails for good stops the
//! producer (a librdkafka fatal error) instead of being skipped, so no later
//! record of its partition reaches Kafka ahead of it; the error reported is the
//! failed record's own. Records over their topic's `max.message.bytes` are
//! refused before they are produced ([`limits`]). Settings the guarantee
//! depends on cannot be overridden through `kafka.properties`.
#![warn(missing_docs)]

pub mod check;
pub mod dead_letter;
pub mod limits;
mod state;

pub use state::KafkaRecordStore;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig, ThreadedProducer,
};
use tokio::sync::mpsc;
use walcast_core::config::KafkaConfig;
use walcast_core::dead_letter::{Reason, Rejected};
use walcast_core::route::{OutboxEvent, TopicMatcher};
use walcast_core::sink::{DeliveryToken, EventSink, TokenRing};
use walcast_core::{Error, ErrorKind, Lsn, Result};

pub use limits::{
    batch_cap, event_size_estimate, record_size_estimate, LimitSource, TopicLimit, TopicLimits,
};
use limits::{Admin, DEFAULT_BATCH_SIZE, DEFAULT_PRODUCER_MESSAGE_MAX_BYTES};

/// Settings derived from the pipeline that size the producer's queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// The pipeline's `max_in_flight_events`.
    pub max_in_flight_events: u64,
    /// The pipeline's `max_in_flight_bytes`.
    pub max_in_flight_bytes: u64,
}

/// The librdkafka configuration walcast uses: its own guarantees first, then
/// the user's pass-through properties (protected keys were rejected by config
/// validation). [`KafkaSink`] also caps `batch.size` to the topics' limits.
pub fn client_config(cfg: &KafkaConfig, limits: QueueLimits) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.bootstrap_servers)
        .set("client.id", "walcast")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // A record that fails for good (too large, for example) must stop the
        // producer: without this librdkafka skips it, renumbers the
        // partition's later records and delivers them, so they land in Kafka
        // before the failed one is ever written (issue 10). With it the
        // producer raises a fatal error and sends nothing more.
        .set("enable.gapless.guarantee", "true")
        .set("partitioner", "murmur2_random")
        .set("compression.type", &cfg.compression)
        .set("linger.ms", cfg.linger_ms.to_string())
        // Never time a message out inside librdkafka: on a message timeout
        // the idempotent producer bumps its epoch and goes on sending the
        // younger messages of the same partition, which then land in Kafka
        // before the timed-out ones were ever written (the pipeline replays
        // those after its restart): a reordering. The pipeline enforces
        // kafka.delivery_timeout_ms itself, and restarts after purging
        // everything queued (PipelineSettings::delivery_timeout).
        .set("message.timeout.ms", "0")
        // The pipeline bounds what is in flight; the producer's queue must
        // never be the tighter limit (a full queue is not an error we want).
        .set(
            "queue.buffering.max.messages",
            (limits.max_in_flight_events.saturating_mul(2))
                .clamp(100_000, 2_147_483_647)
                .to_string(),
        )
        .set(
            "queue.buffering.max.kbytes",
            (limits.max_in_flight_bytes.saturating_mul(2) / 1024)
                .clamp(65_536, 2_147_483_647)
                .to_string(),
        );
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    c
}

/// The producer's own record limit: `kafka.properties."message.max.bytes"`,
/// else librdkafka's default.
pub fn producer_message_max_bytes(cfg: &KafkaConfig) -> u64 {
    property_u64(cfg, "message.max.bytes").unwrap_or(DEFAULT_PRODUCER_MESSAGE_MAX_BYTES)
}

fn property_u64(cfg: &KafkaConfig, key: &str) -> Option<u64> {
    cfg.properties.get(key).and_then(|v| v.trim().parse().ok())
}

/// The `batch.size` a producer gets: the user's (or librdkafka's default),
/// capped so that a batch fits the smallest topic limit known.
pub fn batch_size_for(cfg: &KafkaConfig, smallest_limit: Option<u64>) -> u64 {
    let wanted = property_u64(cfg, "batch.size").unwrap_or(DEFAULT_BATCH_SIZE);
    match smallest_limit {
        Some(l) => wanted.min(batch_cap(l)),
        None => wanted,
    }
}

/// The admin client's configuration: the connection and security settings
/// of the producer, without its idempotence (it never produces).
fn admin_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.bootstrap_servers)
        .set("client.id", "walcast-admin");
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    c
}

/// How long a delivery that failed only because another record stopped the
/// producer waits for that record's own error (the one reported).
const ROOT_CAUSE_WAIT: Duration = Duration::from_secs(5);

/// What the sink keeps of a record in flight, to describe it in an error.
#[derive(Debug, Clone)]
struct RecordInfo {
    topic: Arc<str>,
    id: Bytes,
    correlation_id: Option<Bytes>,
    table: Arc<str>,
    source_lsn: Lsn,
    estimate: u64,
    topic_limit: Option<TopicLimit>,
    batch_size: u64,
    /// The record's timestamp, when walcast set one.
    timestamp_ms: Option<i64>,
}

impl RecordInfo {
    fn id(&self) -> String {
        String::from_utf8_lossy(&self.id).into_owned()
    }

    /// Names this record's event in `e` (for the log line's fields).
    fn name_in(&self, e: Error) -> Error {
        e.with_event(&self.id, self.correlation_id.as_deref())
    }
}

/// An event's correlation id as a log field value.
fn lossy(b: &Option<Bytes>) -> Option<std::borrow::Cow<'_, str>> {
    b.as_deref().map(String::from_utf8_lossy)
}

/// The first record failure of a sink, copied for the deliveries it took
/// down with it.
#[derive(Debug, Clone)]
struct Failure {
    kind: ErrorKind,
    message: String,
    hint: Option<String>,
    rejected: Option<Rejected>,
    event: Option<(String, Option<String>)>,
}

impl Failure {
    fn of(e: &Error) -> Self {
        let message = match std::error::Error::source(e) {
            Some(s) => format!("{}: {s}", e.message()),
            None => e.message().to_string(),
        };
        Failure {
            kind: e.kind(),
            message,
            hint: e.hint().map(str::to_string),
            rejected: e.rejected().cloned(),
            event: e
                .event_id()
                .map(|id| (id.to_string(), e.correlation_id().map(str::to_string))),
        }
    }

    fn to_error(&self) -> Error {
        let mut e = Error::new(self.kind, self.message.clone());
        if let Some(h) = &self.hint {
            e = e.with_hint(h.clone());
        }
        if let Some(r) = &self.rejected {
            e = e.with_rejected(r.clone());
        }
        if let Some((id, c)) = &self.event {
            e = e.with_event(id.as_bytes(), c.as_deref().map(str::as_bytes));
        }
        e
    }
}

/// A delivery report as librdkafka's polling thread passes it on: the
/// record's sequence number in its sink, and its partition and offset, or the
/// error with the record (when librdkafka returned it; boxed, so that the
/// common report stays small in the channel).
type Report = (
    u64,
    std::result::Result<(i32, i64), Box<(KafkaError, Option<OwnedMessage>)>>,
);

/// The producer's context: each delivery report goes to the sink through a
/// channel (no allocation or future per record; the sink reads the reports
/// in batches).
#[derive(Debug)]
pub struct SinkContext {
    reports: mpsc::UnboundedSender<Report>,
}

impl ClientContext for SinkContext {}

impl ProducerContext for SinkContext {
    /// The record's sequence number in its sink.
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        let report = match result {
            Ok(m) => Ok((m.partition(), m.offset())),
            Err((e, m)) => Err(Box::new((e.clone(), Some(m.detach())))),
        };
        // The sink is gone (aborted): nobody waits for the report.
        let _ = self.reports.send((seq as u64, report));
    }
}

/// walcast's producer: librdkafka with a polling thread serving delivery
/// reports.
pub type SinkProducer = ThreadedProducer<SinkContext>;

/// Failures that only mirror another record's (the producer stopped), held
/// until that record's own error is known or [`ROOT_CAUSE_WAIT`] passed.
#[derive(Default)]
struct Collateral {
    held: Vec<(DeliveryToken, RecordInfo, KafkaError)>,
    deadline: Option<tokio::time::Instant>,
}

/// The Kafka sink.
pub struct KafkaSink {
    producer: SinkProducer,
    admin: Arc<Admin>,
    bootstrap: String,
    limits: TopicLimits,
    /// Topics this sink checked (their limit fits its batch size).
    seen: HashMap<Arc<str>, TopicLimit>,
    /// Partition counts of the topics events chose a partition of (a
    /// `column:partition` placement), read from the cluster when an event
    /// names a partition beyond the count known.
    partitions: HashMap<Arc<str>, i32>,
    producer_max: u64,
    batch_size: u64,
    lookup_timeout: Duration,
    /// Records in flight by sequence number: the caller's token and what
    /// describes the record in an error.
    records: TokenRing<(DeliveryToken, RecordInfo)>,
    reports: mpsc::UnboundedReceiver<Report>,
    /// For failures found at `send` that are reported later.
    report_tx: mpsc::UnboundedSender<Report>,
    /// Reports read from the channel and not yet turned into outcomes.
    batch: Vec<Report>,
    /// The first record that failed on its own account (not because the
    /// producer had already stopped).
    root: Option<Failure>,
    collateral: Collateral,
    /// A topic this sink produces to, for [`KafkaProbe`].
    probe_topic: Arc<std::sync::Mutex<Option<Arc<str>>>>,
    /// The dead-letter topics: their records are checked against an
    /// assumed limit too (see [`KafkaSink::with_dead_letter_topics`]).
    dead_letter_topics: Vec<Arc<str>>,
}

/// Checks that the Kafka cluster answers, with the sink's admin client (the
/// producer's servers and security settings). For readiness checks.
#[derive(Clone)]
pub struct KafkaProbe {
    admin: Arc<Admin>,
    topic: Arc<std::sync::Mutex<Option<Arc<str>>>>,
}

impl std::fmt::Debug for KafkaProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaProbe").finish_non_exhaustive()
    }
}

impl KafkaProbe {
    /// Asks the cluster for metadata (of one topic the sink produces to, or
    /// of the cluster before the first event) and waits up to `timeout`.
    /// Blocking: call it from a blocking thread.
    ///
    /// # Errors
    /// The client's error when no broker answered in time.
    pub fn check(&self, timeout: Duration) -> std::result::Result<(), KafkaError> {
        let topic = self.topic.lock().unwrap().clone();
        self.admin
            .inner()
            .fetch_metadata(topic.as_deref(), timeout)
            .map(|_| ())
    }
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("bootstrap", &self.bootstrap)
            .field("batch_size", &self.batch_size)
            .field("producer_max", &self.producer_max)
            .finish_non_exhaustive()
    }
}

impl KafkaSink {
    /// Reaches the cluster, reads the record size limits (the brokers'
    /// default and the `max.message.bytes` of every existing topic that
    /// `template` can render) into `limits`, and creates the producer with a
    /// `batch.size` that fits them.
    ///
    /// # Errors
    /// A retryable error naming the bootstrap servers when the cluster cannot
    /// be reached or does not answer; an operator error when librdkafka
    /// rejects the configuration.
    pub async fn connect(
        cfg: &KafkaConfig,
        queue: QueueLimits,
        template: &dyn TopicMatcher,
        limits: &TopicLimits,
        timeout: Duration,
    ) -> Result<Self> {
        let admin = Arc::new(create_admin(cfg)?);
        limits::read_cluster_limits(&admin, &cfg.bootstrap_servers, template, limits, timeout)
            .await?;
        let sink = Self::build(cfg, queue, admin, limits.clone(), timeout)?;
        tracing::info!(
            batch_size = sink.batch_size,
            producer_message_max_bytes = sink.producer_max,
            smallest_topic_limit = limits.smallest(),
            "Kafka producer sized to the topics' max.message.bytes"
        );
        Ok(sink)
    }

    /// Creates the producer (no network I/O yet) from the limits already in
    /// `limits`; topics are looked up when first seen.
    ///
    /// # Errors
    /// An operator error when librdkafka rejects the configuration.
    pub fn new(cfg: &KafkaConfig, queue: QueueLimits, limits: TopicLimits) -> Result<Self> {
        let admin = Arc::new(create_admin(cfg)?);
        Self::build(cfg, queue, admin, limits, Duration::from_secs(10))
    }

    fn build(
        cfg: &KafkaConfig,
        queue: QueueLimits,
        admin: Arc<Admin>,
        limits: TopicLimits,
        lookup_timeout: Duration,
    ) -> Result<Self> {
        let batch_size = batch_size_for(cfg, limits.smallest());
        let mut config = client_config(cfg, queue);
        config.set("batch.size", batch_size.to_string());
        let (report_tx, reports) = mpsc::unbounded_channel();
        let producer: SinkProducer = config
            .create_with_context(SinkContext {
                reports: report_tx.clone(),
            })
            .map_err(rejected_config)?;
        Ok(KafkaSink {
            records: TokenRing::default(),
            reports,
            report_tx,
            batch: Vec::new(),
            root: None,
            collateral: Collateral::default(),
            producer,
            admin,
            bootstrap: cfg.bootstrap_servers.clone(),
            limits,
            seen: HashMap::new(),
            partitions: HashMap::new(),
            producer_max: producer_message_max_bytes(cfg),
            batch_size,
            lookup_timeout,
            probe_topic: Arc::default(),
            dead_letter_topics: Vec::new(),
        })
    }

    /// Names the dead-letter topics (the pipeline's and the routes'). A
    /// dead-letter record is checked against its topic's limit even when
    /// walcast could only assume it (the brokers' default): a dead-letter
    /// record the broker refused would stop walcast, while one refused here
    /// is sent again without its value.
    pub fn with_dead_letter_topics(mut self, topics: Vec<Arc<str>>) -> Self {
        self.dead_letter_topics = topics;
        self
    }

    /// A probe of the cluster's reachability for readiness checks.
    pub fn probe(&self) -> KafkaProbe {
        KafkaProbe {
            admin: self.admin.clone(),
            topic: self.probe_topic.clone(),
        }
    }

    /// The underlying producer (for tools and tests).
    pub fn producer(&self) -> &SinkProducer {
        &self.producer
    }

    /// The `batch.size` the producer was built with.
    pub fn batch_size(&self) -> u64 {
        self.batch_size
    }
}

fn rejected_config(e: KafkaError) -> Error {
    Error::operator("the Kafka producer configuration was rejected")
        .with_source(e)
        .with_hint("check [kafka] and kafka.properties against librdkafka's CONFIGURATION.md")
}

fn create_admin(cfg: &KafkaConfig) -> Result<Admin> {
    admin_config(cfg).create().map_err(rejected_config)
}

fn code_of(err: &KafkaError) -> Option<RDKafkaErrorCode> {
    match err {
        KafkaError::MessageProduction(code) => Some(*code),
        other => other.rdkafka_error_code(),
    }
}

/// Sorts a Kafka error into walcast's kinds.
pub fn classify(err: &KafkaError) -> ErrorKind {
    classify_code(code_of(err))
}

fn classify_code(code: Option<RDKafkaErrorCode>) -> ErrorKind {
    match code {
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::InvalidTimestamp
            // A partition number the row chose (a `column:partition`
            // placement) that the topic does not have.
            | RDKafkaErrorCode::UnknownPartition,
        ) => ErrorKind::Permanent,
        Some(
            RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::PolicyViolation,
        ) => ErrorKind::OperatorAction,
        _ => ErrorKind::Retryable,
    }
}

/// A failure that is not the record's own: the producer stopped (fatal
/// error) or dropped its queue because of another record.
fn is_collateral(err: &KafkaError) -> bool {
    matches!(
        code_of(err),
        Some(
            RDKafkaErrorCode::PurgeQueue
                | RDKafkaErrorCode::PurgeInflight
                | RDKafkaErrorCode::Fatal
                | RDKafkaErrorCode::GaplessGuarantee
        )
    )
}

/// Rounds a size up for a suggested setting: 1 % more, to the next KiB.
fn suggested(bytes: u64) -> u64 {
    (bytes + bytes / 100).div_ceil(1024) * 1024
}

/// The error for an event found too large before it was produced.
fn too_large(
    event: &OutboxEvent,
    estimate: u64,
    topic_limit: Option<TopicLimit>,
    producer_max: u64,
) -> Error {
    let topic = &*event.topic;
    let need = suggested(estimate);
    let mut over = Vec::new();
    let mut fixes = Vec::new();
    if let Some(l) = topic_limit.filter(|l| estimate > l.bytes) {
        match l.source {
            LimitSource::Topic => {
                over.push(format!(
                    "topic {topic:?} accepts at most {} bytes (its max.message.bytes)",
                    l.bytes
                ));
                fixes.push(format!(
                    "raise the topic's max.message.bytes to at least {estimate} (kafka-configs.sh --bootstrap-server <broker> --alter --entity-type topics --entity-name {topic} --add-config max.message.bytes={need})"
                ));
            }
            LimitSource::BrokerDefault => {
                over.push(format!(
                    "topic {topic:?} does not exist yet and would get the brokers' message.max.bytes of {} bytes",
                    l.bytes
                ));
                fixes.push(format!(
                    "create the topic with max.message.bytes of at least {estimate} (kafka-topics.sh --create --topic {topic} --config max.message.bytes={need} …)"
                ));
            }
            // Never checked against (see `send`).
            LimitSource::Assumed => {}
        }
    }
    if estimate > producer_max {
        over.push(format!(
            "walcast's producer accepts at most {producer_max} bytes (kafka.properties.\"message.max.bytes\")"
        ));
        fixes.push(format!(
            "set kafka.properties.\"message.max.bytes\" = \"{need}\" (or more)"
        ));
    }
    let headers: usize = event
        .headers
        .iter()
        .map(|h| h.name.len() + h.value.len())
        .sum();
    Error::permanent(format!(
        "event {} from {} (commit LSN {}) is too large for Kafka: as a record it is about {estimate} bytes (key {}, value {}, headers {headers} bytes, plus framing), but {}",
        String::from_utf8_lossy(event.event_id()),
        event.table,
        event.source_lsn,
        event.key.len(),
        event.payload.len(),
        over.join(" and ")
    ))
    .with_hint(format!(
        "{}; or make the payload smaller. walcast delivered and confirmed the events before it and stops without moving the slot past it (it stops here again until the event fits)",
        fixes.join("; ")
    ))
    .with_event(event.event_id(), event.correlation_id.as_deref())
}

/// Milliseconds since the Unix epoch on this host's clock.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The hint for a record timestamp a topic refuses.
fn timestamp_hint(topic: &str) -> String {
    format!(
        "the record timestamp is the route's table_field_event_timestamp column, else the transaction's commit time. Fix the row's timestamp, or widen the topic's window (kafka-configs.sh --bootstrap-server <broker> --alter --entity-type topics --entity-name {topic} --add-config message.timestamp.after.max.ms=<ms>,message.timestamp.before.max.ms=<ms>), or have the broker stamp records itself (message.timestamp.type=LogAppendTime); walcast delivered and confirmed the events before it and stops without moving the slot past it"
    )
}

/// The error for an event whose record timestamp its topic refuses, found
/// before it is produced.
fn refused_timestamp(
    event: &OutboxEvent,
    ts_ms: i64,
    (setting, off_ms, max_ms): (&str, i64, i64),
) -> Error {
    let topic = &*event.topic;
    let direction = if setting.contains("after") {
        "ahead of"
    } else {
        "behind"
    };
    Error::permanent(format!(
        "event {} from {} (commit LSN {}) has record timestamp {ts_ms} (ms since the epoch), {} {direction} this host's clock, and topic {topic:?} refuses records more than {} {direction} the broker's ({setting} = {max_ms})",
        String::from_utf8_lossy(event.event_id()),
        event.table,
        event.source_lsn,
        limits::span(off_ms),
        limits::span(max_ms),
    ))
    .with_hint(timestamp_hint(topic))
    .with_event(event.event_id(), event.correlation_id.as_deref())
}

/// The error for an event that chose a partition its topic does not have.
fn unknown_partition(event: &OutboxEvent, partition: i32, count: i32) -> Error {
    let topic = &*event.topic;
    Error::permanent(format!(
        "event {} from {} (commit LSN {}) chose partition {partition} of topic {topic:?}, which has {count} partition{} (0 to {}): Kafka has no such partition",
        String::from_utf8_lossy(event.event_id()),
        event.table,
        event.source_lsn,
        if count == 1 { "" } else { "s" },
        count - 1
    ))
    .with_hint(format!(
        "fix the row's partition column, or add partitions to the topic (kafka-topics.sh --bootstrap-server <broker> --alter --topic {topic} --partitions {}); walcast delivered and confirmed the events before it and stops without moving the slot past it",
        partition + 1
    ))
    .with_event(event.event_id(), event.correlation_id.as_deref())
}

/// The error of a record whose delivery failed on its own account, naming
/// its event.
fn delivery_error(err: KafkaError, info: &RecordInfo) -> Error {
    info.name_in(delivery_error_text(err, info))
}

fn delivery_error_text(err: KafkaError, info: &RecordInfo) -> Error {
    let id = info.id();
    let topic = &*info.topic;
    let code = code_of(&err);
    if code == Some(RDKafkaErrorCode::MessageSizeTooLarge) {
        // A record whose wire size exceeds batch.size is always alone in its
        // batch (librdkafka starts a new batch for it and adds nothing after
        // it); the estimate is at most 61 bytes above the wire size.
        let alone = info.estimate > info.batch_size + 64;
        let limit_text = match info.topic_limit {
            Some(l) if l.source == LimitSource::Topic => {
                format!(
                    "the topic's max.message.bytes was {} when walcast read it",
                    l.bytes
                )
            }
            Some(l) => format!("walcast assumed a limit of {} bytes for the topic", l.bytes),
            None => "walcast did not know the topic's limit".to_string(),
        };
        if alone {
            return Error::permanent(format!(
                "Kafka rejected event {id} from {} (commit LSN {}) for topic {topic:?} as too large: as a record it is about {} bytes, and {limit_text} (it may have been lowered since, and compression can make an incompressible payload slightly larger)",
                info.table, info.source_lsn, info.estimate
            ))
            .with_source(err)
            .with_hint(format!(
                "raise the topic's max.message.bytes to at least {} (kafka-configs.sh --bootstrap-server <broker> --alter --entity-type topics --entity-name {topic} --add-config max.message.bytes={}), or make the payload smaller. Nothing after it reached Kafka; walcast stops without moving the slot past it",
                info.estimate,
                suggested(info.estimate)
            ));
        }
        let (why, fix) = if info.topic_limit.is_some() {
            (
                "the topic's max.message.bytes was probably lowered while walcast ran",
                "walcast restarts from the slot's confirmed position, reads the topic limits again and sizes its batches to them; nothing is skipped",
            )
        } else {
            (
                "walcast could not read the topic's max.message.bytes to size its batches",
                "grant walcast's principal DescribeConfigs on the topic, or set kafka.properties.\"batch.size\" below its max.message.bytes; walcast restarts from the slot's confirmed position with backoff, nothing is skipped",
            )
        };
        return Error::retryable(format!(
            "Kafka rejected the record batch holding event {id} for topic {topic:?} as too large, although the event is only about {} bytes and {limit_text}: {why}",
            info.estimate
        ))
        .with_source(err)
        .with_hint(fix);
    }
    if code == Some(RDKafkaErrorCode::InvalidTimestamp) {
        let timestamp = info.timestamp_ms.map_or_else(
            || "none set".to_string(),
            |t| format!("{t} ms since the epoch"),
        );
        // walcast checked the record against the topic's window before
        // producing it: the broker's clock differs from this host's, the
        // window was narrowed since walcast read it, or another record of
        // the batch is the one refused. A restart reads the window again.
        if info.topic_limit.is_some_and(|l| l.timestamps.is_some()) {
            return Error::retryable(format!(
                "Kafka refused the record batch holding event {id} for topic {topic:?} for its record timestamp ({}), which walcast found inside the topic's message.timestamp.before.max.ms / after.max.ms window",
                timestamp
            ))
            .with_source(err)
            .with_hint("walcast restarts from the slot's confirmed position and reads the topic's window again; nothing is skipped. If this repeats, compare the brokers' clocks with this host's");
        }
        return Error::permanent(format!(
            "Kafka refused event {id} from {} (commit LSN {}) for topic {topic:?}: its record timestamp ({}) lies outside the window the topic accepts (message.timestamp.before.max.ms / message.timestamp.after.max.ms; walcast could not read them to check before producing)",
            info.table,
            info.source_lsn,
            timestamp
        ))
        .with_source(err)
        .with_hint(timestamp_hint(topic));
    }
    let kind = classify_code(code);
    let hint = match kind {
        ErrorKind::Permanent => format!(
            "the event is about {} bytes as a record; fix the record or the topic, walcast stops without moving the slot past it",
            info.estimate
        ),
        ErrorKind::OperatorAction => format!(
            "create topic {topic:?} (or enable auto.create.topics.enable) and grant walcast's principal Write (and IdempotentWrite on the cluster for older brokers) on it"
        ),
        _ => "walcast restarts from the slot's confirmed position with backoff; nothing is skipped"
            .to_string(),
    };
    Error::new(
        kind,
        format!(
            "Kafka did not accept event {id} from {} (commit LSN {}) for topic {topic:?}",
            info.table, info.source_lsn
        ),
    )
    .with_source(err)
    .with_hint(hint)
}

/// The record a broker refused for good, for the dead-letter policy: a
/// record too large (alone in its batch), an invalid record or topic, an
/// unknown topic or one walcast may not write to. `None` for errors that are
/// not the record's own (the batch, the cluster, a transient one).
fn rejected_by_broker(
    e: &Error,
    msg: &rdkafka::message::OwnedMessage,
    info: &RecordInfo,
) -> Option<Rejected> {
    use rdkafka::message::{Headers, Message};
    if e.kind() == ErrorKind::Retryable {
        return None;
    }
    let code = std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<KafkaError>())
        .and_then(code_of)?;
    let reason = match code {
        RDKafkaErrorCode::MessageSizeTooLarge => Reason::TooLarge,
        RDKafkaErrorCode::InvalidTopic => Reason::InvalidTopic,
        RDKafkaErrorCode::InvalidRecord
        | RDKafkaErrorCode::InvalidMessage
        | RDKafkaErrorCode::InvalidMessageSize
        | RDKafkaErrorCode::InvalidTimestamp => Reason::InvalidRecord,
        RDKafkaErrorCode::UnknownTopic
        | RDKafkaErrorCode::UnknownTopicOrPartition
        | RDKafkaErrorCode::TopicAuthorizationFailed => Reason::TopicRejected,
        // A partition the row chose that the topic does not have, found by
        // librdkafka after producing (the topic's metadata was not known).
        RDKafkaErrorCode::UnknownPartition => Reason::Unroutable,
        _ => return None,
    };
    let headers = msg
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| walcast_core::route::Header {
                    name: Arc::from(h.key),
                    value: Bytes::copy_from_slice(h.value.unwrap_or_default()),
                })
                .collect()
        })
        .unwrap_or_default();
    Some(Rejected {
        reason,
        topic: Some(info.topic.clone()),
        key: msg.key().map(Bytes::copy_from_slice),
        value: msg.payload().map(Bytes::copy_from_slice),
        headers,
        table: info.table.clone(),
        source_lsn: info.source_lsn,
    })
}

impl KafkaSink {
    /// Turns one delivery report into its outcome in `out`; a failure that
    /// only mirrors another record's is held (see [`Collateral`]).
    fn report(&mut self, (seq, report): Report, out: &mut Vec<(DeliveryToken, Result<()>)>) {
        let Some((token, info)) = self.records.take(seq) else {
            tracing::warn!(
                seq,
                "a delivery report for a record this sink does not hold; ignored"
            );
            return;
        };
        match report {
            Ok((partition, offset)) => {
                tracing::debug!(
                    event_id = %String::from_utf8_lossy(&info.id),
                    correlation_id = lossy(&info.correlation_id).as_deref(),
                    topic = %info.topic,
                    partition,
                    offset,
                    "Kafka acknowledged the event"
                );
                out.push((token, Ok(())));
            }
            Err(failed) if is_collateral(&failed.0) => match &self.root {
                Some(root) => out.push((token, Err(root.to_error()))),
                None => self.hold(token, info, failed.0),
            },
            Err(failed) => {
                let (err, msg) = *failed;
                let e = delivery_error(err, &info);
                let e = match msg.and_then(|m| rejected_by_broker(&e, &m, &info)) {
                    Some(r) => e.with_rejected(r),
                    None => e,
                };
                if self.root.is_none() {
                    self.root = Some(Failure::of(&e));
                }
                out.push((token, Err(e)));
            }
        }
    }

    /// Holds a failure that only mirrors another record's until that
    /// record's error is known.
    fn hold(&mut self, token: DeliveryToken, info: RecordInfo, err: KafkaError) {
        self.collateral
            .deadline
            .get_or_insert_with(|| tokio::time::Instant::now() + ROOT_CAUSE_WAIT);
        self.collateral.held.push((token, info, err));
    }

    /// Reports the held failures: with the error of the record that stopped
    /// the producer once known, or (`give_up`) the producer's fatal error or
    /// their own.
    fn release_held(&mut self, give_up: bool, out: &mut Vec<(DeliveryToken, Result<()>)>) {
        if self.collateral.held.is_empty() || (self.root.is_none() && !give_up) {
            return;
        }
        self.collateral.deadline = None;
        for (token, info, err) in std::mem::take(&mut self.collateral.held) {
            let e = match &self.root {
                Some(root) => root.to_error(),
                None => self.collateral_error(&info, err),
            };
            out.push((token, Err(e)));
        }
    }

    /// The error of a delivery that failed because the producer stopped,
    /// when no record of this sink was found to cause it: the producer's
    /// fatal error, or the delivery's own.
    fn collateral_error(&self, info: &RecordInfo, err: KafkaError) -> Error {
        match self.producer.client().fatal_error() {
            Some((code, reason)) => Error::new(
                classify_code(Some(code)),
                format!("the Kafka producer stopped after a fatal error ({code}): {reason}"),
            )
            .with_hint("walcast restarts from the slot's confirmed position with a new producer; nothing is skipped"),
            None => info.name_in(Error::retryable(format!(
                "event {} for topic {:?} was not delivered: {err}",
                info.id(),
                info.topic
            ))
            .with_hint("walcast restarts from the slot's confirmed position with backoff; nothing is skipped")),
        }
    }
}

impl EventSink for KafkaSink {
    /// Looks the event's topic up the first time this sink sees it: its
    /// `max.message.bytes` (cached for the process), and whether this
    /// producer's batches fit it. A topic with a smaller limit than the
    /// producer was sized for is a retryable error: the pipeline restarts
    /// from the slot and the next producer is sized for it.
    ///
    /// An event that chose its partition (a `column:partition` placement)
    /// beyond the topic's partition count known to the sink has the count
    /// read again, so that `send` refuses a partition the topic does not have
    /// before producing it, in every run alike (librdkafka finds it only
    /// after producing when it has yet to learn the topic's metadata).
    async fn prepare(&mut self, event: &OutboxEvent) -> Result<()> {
        if let Some(p) = event.partition {
            if self.partitions.get(&*event.topic).is_none_or(|n| p >= *n) {
                if let Some(n) = limits::partition_count(
                    &self.producer,
                    &self.bootstrap,
                    &event.topic,
                    self.lookup_timeout,
                )
                .await?
                {
                    self.partitions.insert(event.topic.clone(), n);
                }
            }
        }
        if self.seen.contains_key(&*event.topic) {
            return Ok(());
        }
        let limit = match self.limits.get(&event.topic) {
            Some(l) => l,
            None => {
                limits::read_topic_limit(
                    &self.admin,
                    &event.topic,
                    &self.limits,
                    self.lookup_timeout,
                )
                .await?
            }
        };
        let cap = batch_cap(limit.bytes);
        if cap < self.batch_size {
            return Err(Error::retryable(format!(
                "topic {:?} accepts record batches of at most {} bytes (max.message.bytes), less than the batch.size of {} this producer was built with",
                event.topic, limit.bytes, self.batch_size
            ))
            .with_hint(format!(
                "walcast restarts from the slot's confirmed position with batch.size {cap}; nothing is skipped"
            )));
        }
        tracing::debug!(topic = %event.topic, max_message_bytes = limit.bytes, source = ?limit.source, "topic limit");
        if self.seen.is_empty() {
            *self.probe_topic.lock().unwrap() = Some(event.topic.clone());
        }
        self.seen.insert(event.topic.clone(), limit);
        Ok(())
    }

    fn send(&mut self, event: OutboxEvent, token: DeliveryToken) -> Result<()> {
        let estimate = event_size_estimate(&event);
        let topic_limit = match self.seen.get(&*event.topic) {
            Some(l) => Some(*l),
            None => self.limits.get(&event.topic),
        }
        // An assumed limit sizes batches, but does not refuse records: the
        // topic may accept more than walcast may read; the broker judges.
        .filter(|l| {
            l.source != LimitSource::Assumed
                || self.dead_letter_topics.iter().any(|t| **t == *event.topic)
        });
        if estimate
            > topic_limit
                .map_or(u64::MAX, |l| l.bytes)
                .min(self.producer_max)
        {
            return Err(too_large(&event, estimate, topic_limit, self.producer_max)
                .with_rejected(Rejected::event(Reason::TooLarge, &event)));
        }
        if let (Some(ts), Some(window)) = (
            event.timestamp_ms,
            topic_limit
                .and_then(|l| l.timestamps)
                .filter(limits::TimestampWindow::is_bounded),
        ) {
            if let Some(broken) = window.refuses(ts, now_ms()) {
                return Err(refused_timestamp(&event, ts, broken)
                    .with_rejected(Rejected::event(Reason::InvalidRecord, &event)));
            }
        }
        // The partition the row chose, when the cluster reported it exists.
        let mut chosen = None;
        if let (Some(p), Some(&count)) = (event.partition, self.partitions.get(&*event.topic)) {
            if p >= count {
                return Err(unknown_partition(&event, p, count)
                    .with_rejected(Rejected::event(Reason::Unroutable, &event)));
            }
            chosen = Some(p);
        }
        let mut headers = OwnedHeaders::new_with_capacity(event.headers.len());
        for h in &event.headers {
            headers = headers.insert(Header {
                key: &h.name,
                value: Some(&h.value[..]),
            });
        }
        let info = RecordInfo {
            topic: event.topic.clone(),
            id: event
                .headers
                .first()
                .map(|h| h.value.clone())
                .unwrap_or_default(),
            correlation_id: event.correlation_id.clone(),
            table: event.table.clone(),
            source_lsn: event.source_lsn,
            estimate,
            topic_limit,
            batch_size: self.batch_size,
            timestamp_ms: event.timestamp_ms,
        };
        let seq = self.records.next_token();
        let mut record = BaseRecord::with_opaque_to(&event.topic, seq as usize)
            .key(&event.key[..])
            .headers(headers);
        if !event.tombstone {
            record = record.payload(&event.payload[..]);
        }
        if let Some(ts) = event.timestamp_ms {
            record = record.timestamp(ts);
        }
        if let Some(p) = event.partition {
            record = record.partition(p);
        }
        match self.producer.send(record) {
            Ok(()) => {
                tracing::debug!(
                    event_id = %String::from_utf8_lossy(&info.id),
                    correlation_id = lossy(&info.correlation_id).as_deref(),
                    topic = %info.topic,
                    table = %info.table,
                    commit_lsn = %info.source_lsn,
                    "event handed to the Kafka producer"
                );
                self.records.push((token, info));
                Ok(())
            }
            // The producer already stopped because of another record: report
            // that record's error as this event's outcome.
            Err((err, _record)) if is_collateral(&err) => {
                self.records.push((token, info));
                let _ = self.report_tx.send((seq, Err(Box::new((err, None)))));
                Ok(())
            }
            // The cluster reported the partition (see `prepare`), but the
            // producer's view of the topic is older: not the record's fault.
            Err((err, _record))
                if code_of(&err) == Some(RDKafkaErrorCode::UnknownPartition)
                    && chosen.is_some() =>
            {
                Err(info.name_in(
                    Error::retryable(format!(
                        "the Kafka producer does not know partition {} of topic {:?} yet, which the cluster reports",
                        chosen.unwrap_or_default(),
                        info.topic
                    ))
                    .with_source(err)
                    .with_hint("walcast restarts from the slot's confirmed position with a new producer; nothing is skipped"),
                ))
            }
            Err((err, _record)) => Err(delivery_error(err, &info)),
        }
    }

    /// Reads the delivery reports in batches. A failure that only mirrors
    /// another record's (the producer stopped) waits up to
    /// [`ROOT_CAUSE_WAIT`] for that record's report, so the error reported is
    /// the one that caused it.
    async fn delivered(&mut self, out: &mut Vec<(DeliveryToken, Result<()>)>) {
        loop {
            let give_up = self
                .collateral
                .deadline
                .is_some_and(|d| tokio::time::Instant::now() >= d);
            self.release_held(give_up, out);
            if !out.is_empty() {
                return;
            }
            let got = match self.collateral.deadline {
                Some(deadline) => {
                    tokio::time::timeout_at(deadline, self.reports.recv_many(&mut self.batch, 4096))
                        .await
                        .unwrap_or(0)
                }
                None => self.reports.recv_many(&mut self.batch, 4096).await,
            };
            if got == 0 && self.collateral.deadline.is_none() {
                // The channel cannot close while this sink holds a sender.
                std::future::pending::<()>().await;
            }
            let mut batch = std::mem::take(&mut self.batch);
            for report in batch.drain(..) {
                self.report(report, out);
            }
            self.batch = batch;
        }
    }

    fn queue_depth(&self) -> Option<u64> {
        Some(u64::try_from(self.producer.in_flight_count()).unwrap_or(0))
    }

    fn abort(self) {
        self.producer
            .purge(PurgeConfig::default().queue().inflight());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walcast_core::route::Header as EventHeader;

    fn cfg() -> KafkaConfig {
        KafkaConfig {
            bootstrap_servers: "127.0.0.1:1".into(),
            compression: "zstd".into(),
            linger_ms: 7,
            delivery_timeout_ms: 1234,
            blocked_warning_ms: 10_000,
            properties: Default::default(),
        }
    }

    const QUEUE: QueueLimits = QueueLimits {
        max_in_flight_events: 10,
        max_in_flight_bytes: 10,
    };

    fn event(id: &str, payload_len: usize) -> OutboxEvent {
        OutboxEvent::new(
            Arc::from("t.A"),
            Bytes::from_static(b"order-1"),
            Bytes::from(vec![b'x'; payload_len]),
            vec![EventHeader {
                name: Arc::from(walcast_core::route::HEADER_ID),
                value: Bytes::copy_from_slice(id.as_bytes()),
            }],
            Lsn::from(0x1234),
            Arc::from("public.outbox"),
        )
    }

    #[test]
    fn guarantees_are_set_and_user_properties_pass_through() {
        let mut cfg = cfg();
        cfg.properties
            .insert("socket.keepalive.enable".into(), "true".into());
        let c = client_config(&cfg, QUEUE);
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(
            c.get("enable.gapless.guarantee"),
            Some("true"),
            "a record that fails for good stops the producer instead of being skipped"
        );
        assert_eq!(c.get("partitioner"), Some("murmur2_random"));
        assert_eq!(
            c.get("message.timeout.ms"),
            Some("0"),
            "librdkafka never times a message out"
        );
        assert_eq!(c.get("compression.type"), Some("zstd"));
        assert_eq!(c.get("socket.keepalive.enable"), Some("true"));
        // The producer builds with this config (librdkafka validates it).
        let sink = KafkaSink::new(&cfg, QUEUE, TopicLimits::default()).unwrap();
        assert_eq!(sink.batch_size(), limits::DEFAULT_BATCH_SIZE);
    }

    #[test]
    fn batches_are_capped_below_the_smallest_topic_limit() {
        let mut cfg = cfg();
        cfg.properties
            .insert("message.max.bytes".into(), "5000000".into());
        let limits = TopicLimits::default();
        limits.set_broker_default(1_048_588);
        assert_eq!(
            batch_size_for(&cfg, limits.smallest()),
            limits::DEFAULT_BATCH_SIZE,
            "the defaults fit"
        );
        limits.insert(
            "t.A",
            TopicLimit {
                bytes: 100_000,
                source: LimitSource::Topic,
                timestamps: None,
            },
        );
        let sink = KafkaSink::new(&cfg, QUEUE, limits.clone()).unwrap();
        assert_eq!(sink.batch_size(), batch_cap(100_000));
        assert!(sink.batch_size() < 100_000);
        // A smaller batch.size of the user's is kept.
        cfg.properties.insert("batch.size".into(), "16384".into());
        assert_eq!(batch_size_for(&cfg, limits.smallest()), 16_384);
        assert_eq!(producer_message_max_bytes(&cfg), 5_000_000);
    }

    #[test]
    fn an_oversize_event_is_refused_before_it_is_produced_naming_it() {
        let mut cfg = cfg();
        cfg.properties
            .insert("message.max.bytes".into(), "5000000".into());
        let limits = TopicLimits::default();
        limits.insert(
            "t.A",
            TopicLimit {
                bytes: 100_000,
                source: LimitSource::Topic,
                timestamps: None,
            },
        );
        let mut sink = KafkaSink::new(&cfg, QUEUE, limits).unwrap();
        let err = sink.send(event("big-2", 1_600_000), 0).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Permanent);
        let text = err.to_string();
        for needle in [
            "big-2",
            "public.outbox",
            "0/1234",
            "100000",
            "max.message.bytes",
            "kafka-configs.sh",
            "t.A",
        ] {
            assert!(text.contains(needle), "{needle:?} missing in: {text}");
        }
        assert!(
            !text.contains("kafka.properties"),
            "the producer's limit is not the one exceeded: {text}"
        );
        // Over the producer's own limit too: both settings are named.
        let err = sink.send(event("huge-3", 6_000_000), 0).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("max.message.bytes")
                && text.contains("kafka.properties.\"message.max.bytes\""),
            "{text}"
        );
        // A small event passes the check (the producer only queues it here).
        sink.send(event("small-1", 100), 0).unwrap();
        sink.abort();
    }

    #[test]
    fn a_partition_beyond_the_known_count_is_refused_before_it_is_produced() {
        let mut sink = KafkaSink::new(&cfg(), QUEUE, TopicLimits::default()).unwrap();
        sink.partitions.insert(Arc::from("t.A"), 2);
        let mut bad = event("p-9", 10);
        bad.partition = Some(2);
        let err = sink.send(bad, 0).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Permanent);
        let rejected = err.rejected().expect("a dead-letter record for it");
        assert_eq!(rejected.reason, Reason::Unroutable);
        let text = err.to_string();
        for needle in [
            "p-9",
            "public.outbox",
            "0/1234",
            "chose partition 2 of topic \"t.A\", which has 2 partitions (0 to 1)",
        ] {
            assert!(text.contains(needle), "{needle:?} missing in: {text}");
        }
        let hint = err.hint().unwrap_or_default();
        assert!(hint.contains("--partitions 3"), "{hint}");
        // A partition the topic has passes the check (only queued here).
        let mut good = event("p-1", 10);
        good.partition = Some(1);
        sink.send(good, 0).unwrap();
        sink.abort();
    }

    #[test]
    fn a_timestamp_outside_the_topics_window_is_refused_before_it_is_produced() {
        let limits = TopicLimits::default();
        limits.insert(
            "t.A",
            TopicLimit {
                bytes: 1_000_000,
                source: LimitSource::Topic,
                timestamps: Some(limits::TimestampWindow {
                    before_ms: i64::MAX,
                    after_ms: 3_600_000,
                }),
            },
        );
        let mut sink = KafkaSink::new(&cfg(), QUEUE, limits).unwrap();
        let mut ahead = event("ts-7", 10);
        ahead.timestamp_ms = Some(now_ms() + 2 * 86_400_000 + 1_000);
        let err = sink.send(ahead, 0).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Permanent);
        assert_eq!(
            err.rejected().map(|r| r.reason),
            Some(Reason::InvalidRecord)
        );
        let text = err.to_string();
        for needle in [
            "ts-7",
            "public.outbox",
            "2 days ahead of",
            "message.timestamp.after.max.ms = 3600000",
            "\"t.A\"",
        ] {
            assert!(text.contains(needle), "{needle:?} missing in: {text}");
        }
        let hint = err.hint().unwrap_or_default();
        assert!(
            hint.contains("LogAppendTime") && hint.contains("table_field_event_timestamp"),
            "{hint}"
        );
        // Old timestamps pass: the window is open behind.
        let mut old = event("ts-8", 10);
        old.timestamp_ms = Some(0);
        sink.send(old, 0).unwrap();
        sink.abort();
    }

    #[test]
    fn a_broker_side_timestamp_refusal_is_permanent_only_when_walcast_could_not_check_it() {
        let refused = || KafkaError::MessageProduction(RDKafkaErrorCode::InvalidTimestamp);
        let mut info = info(b"ts-3");
        info.timestamp_ms = Some(1_800_000_000_000);
        let err = delivery_error(refused(), &info);
        assert_eq!(err.kind(), ErrorKind::Permanent, "{err}");
        assert!(
            err.to_string().contains("ts-3") && err.to_string().contains("1800000000000"),
            "{err}"
        );
        // walcast checked it against the topic's window: clocks or a
        // batch-mate; a restart reads the window again.
        info.topic_limit = Some(TopicLimit {
            bytes: 1_000_000,
            source: LimitSource::Topic,
            timestamps: Some(limits::TimestampWindow {
                before_ms: 60_000,
                after_ms: 60_000,
            }),
        });
        let err = delivery_error(refused(), &info);
        assert_eq!(err.kind(), ErrorKind::Retryable, "{err}");
    }

    #[test]
    fn errors_are_classified() {
        let e = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert_eq!(classify(&e), ErrorKind::Permanent);
        let e = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert_eq!(classify(&e), ErrorKind::Retryable);
        let e = KafkaError::MessageProduction(RDKafkaErrorCode::TopicAuthorizationFailed);
        assert_eq!(classify(&e), ErrorKind::OperatorAction);
        for code in [
            RDKafkaErrorCode::PurgeQueue,
            RDKafkaErrorCode::PurgeInflight,
            RDKafkaErrorCode::Fatal,
        ] {
            assert!(is_collateral(&KafkaError::MessageProduction(code)));
        }
        assert!(!is_collateral(&e));
        let info = RecordInfo {
            topic: Arc::from("t"),
            id: Bytes::from_static(b"id-1"),
            correlation_id: None,
            table: Arc::from("public.outbox"),
            source_lsn: Lsn::from(1),
            estimate: 120,
            topic_limit: None,
            batch_size: 1_000_000,
            timestamp_ms: None,
        };
        let err = delivery_error(e, &info);
        assert!(err.to_string().contains("id-1"), "{err}");
    }

    fn info(id: &'static [u8]) -> RecordInfo {
        RecordInfo {
            topic: Arc::from("t"),
            id: Bytes::from_static(id),
            correlation_id: None,
            table: Arc::from("public.outbox"),
            source_lsn: Lsn::from(1),
            estimate: 120,
            topic_limit: None,
            batch_size: 1_000_000,
            timestamp_ms: None,
        }
    }

    /// Holds `info` in flight under the caller's `token` and has the
    /// producer's thread report `report` for it.
    fn reported(
        sink: &mut KafkaSink,
        token: DeliveryToken,
        info: RecordInfo,
        report: std::result::Result<(i32, i64), KafkaError>,
    ) {
        let seq = sink.records.push((token, info));
        sink.report_tx
            .send((seq, report.map_err(|e| Box::new((e, None)))))
            .unwrap();
    }

    async fn outcomes(sink: &mut KafkaSink, wait: Duration) -> Vec<(DeliveryToken, Result<()>)> {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(wait, sink.delivered(&mut out)).await;
        out
    }

    /// A delivery that failed only because the producer stopped (fatal
    /// error, purged queue) reports the error of the record that stopped it,
    /// even when that record's own report comes later; successes pass
    /// meanwhile.
    #[tokio::test]
    async fn a_delivery_taken_down_by_another_record_reports_that_records_error() {
        let mut sink = KafkaSink::new(&cfg(), QUEUE, TopicLimits::default()).unwrap();
        let purged = || KafkaError::MessageProduction(RDKafkaErrorCode::PurgeQueue);
        reported(&mut sink, 9, info(b"small-9"), Err(purged()));
        assert!(
            outcomes(&mut sink, Duration::from_millis(50))
                .await
                .is_empty(),
            "it waits for the root cause"
        );
        reported(&mut sink, 1, info(b"ok-1"), Ok((0, 7)));
        let out = outcomes(&mut sink, Duration::from_millis(50)).await;
        assert!(
            matches!(&out[..], [(1, Ok(()))]),
            "a success is reported meanwhile: {out:?}"
        );
        reported(
            &mut sink,
            2,
            info(b"root-2"),
            Err(KafkaError::MessageProduction(
                RDKafkaErrorCode::InvalidRecord,
            )),
        );
        let out = outcomes(&mut sink, Duration::from_secs(1)).await;
        assert_eq!(
            out.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            [2, 9],
            "{out:?}"
        );
        for (_, r) in &out {
            let err = r.as_ref().unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Permanent);
            assert!(err.to_string().contains("root-2"), "{err}");
            assert!(!err.to_string().contains("small-9"), "{err}");
        }
        // Later ones get it at once; a second failure does not replace it.
        reported(
            &mut sink,
            3,
            info(b"other-3"),
            Err(KafkaError::MessageProduction(
                RDKafkaErrorCode::InvalidRecord,
            )),
        );
        reported(&mut sink, 10, info(b"small-10"), Err(purged()));
        let out = outcomes(&mut sink, Duration::from_secs(1)).await;
        assert_eq!(out.len(), 2, "{out:?}");
        let (token, r) = &out[1];
        assert_eq!(*token, 10);
        assert!(
            r.as_ref().unwrap_err().to_string().contains("root-2"),
            "{out:?}"
        );
        assert!(sink.records.is_empty());
        sink.abort();
    }

    /// With no record of its own to blame, a mirrored failure is reported
    /// after the wait as a retryable error naming its own event.
    #[tokio::test]
    async fn a_mirrored_failure_without_a_cause_is_retryable_after_the_wait() {
        let mut sink = KafkaSink::new(&cfg(), QUEUE, TopicLimits::default()).unwrap();
        reported(
            &mut sink,
            4,
            info(b"small-4"),
            Err(KafkaError::MessageProduction(
                RDKafkaErrorCode::PurgeInflight,
            )),
        );
        let started = tokio::time::Instant::now();
        let out = outcomes(&mut sink, ROOT_CAUSE_WAIT * 2).await;
        assert!(started.elapsed() >= ROOT_CAUSE_WAIT);
        let [(4, Err(e))] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(e.kind(), ErrorKind::Retryable);
        assert!(e.to_string().contains("small-4"), "{e}");
        sink.abort();
    }

    #[test]
    fn a_broker_side_size_rejection_blames_the_record_only_when_it_was_alone() {
        let too_large = || KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        let mut info = RecordInfo {
            topic: Arc::from("t"),
            id: Bytes::from_static(b"big-2"),
            correlation_id: None,
            table: Arc::from("public.outbox"),
            source_lsn: Lsn::from(1),
            estimate: 1_600_100,
            topic_limit: Some(TopicLimit {
                bytes: 5_000_000,
                source: LimitSource::Topic,
                timestamps: None,
            }),
            batch_size: 1_000_000,
            timestamp_ms: None,
        };
        // Larger than batch.size: alone in its batch, so it is the one.
        let err = delivery_error(too_large(), &info);
        assert_eq!(err.kind(), ErrorKind::Permanent);
        assert!(err.to_string().contains("big-2"), "{err}");
        // A small record was rejected with its batch: not its fault; walcast
        // restarts and reads the limits again.
        info.id = Bytes::from_static(b"small-1");
        info.estimate = 130;
        let err = delivery_error(too_large(), &info);
        assert_eq!(err.kind(), ErrorKind::Retryable, "{err}");
        assert!(err.to_string().contains("record batch"), "{err}");
    }
}
