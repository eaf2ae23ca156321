//! An idempotent consumer for the events walcast publishes.
//!
//! A [`Handler`] gets each record together with an open Postgres
//! [`Transaction`]; it does its side effects in that transaction, and the
//! consumer records the event id in `processed_events` in the same
//! transaction. So a redelivered event (a restart, a rebalance, a producer
//! retry, a replay) finds its row and is skipped: its side effects happen
//! once. Kafka offsets are committed only after the transaction committed,
//! never automatically.
//!
//! - Records are processed one at a time per partition (per-key order holds),
//!   partitions concurrently, each partition on its own Postgres connection.
//! - A handler error that is [`HandlerError::Retryable`] is retried after
//!   each delay of [`ConsumerConfig::retry_backoff`] (1 s, 5 s, 30 s by
//!   default); after the last, or at once for [`HandlerError::Permanent`],
//!   the record goes to [`ConsumerConfig::dead_letter_topic`] with the
//!   headers `error.reason`, `error.kind`, `original.topic`,
//!   `original.partition`, `original.offset` and `failed.at` (milliseconds
//!   since the epoch), and the partition goes on: a poison record never
//!   blocks it. A lost database connection is not the record's fault: it is
//!   retried without limit and without counting.
//! - Rebalance: on revoke the consumer commits the offsets of what is done and
//!   stops the revoked partitions' workers; a record in flight then is done
//!   again by the new owner and deduplicated (its `processed_events` insert
//!   waits for the old owner's transaction).
//! - Shutdown ([`Consumer::run`]'s future): no new record is started, the
//!   records in flight finish (up to [`ConsumerConfig::shutdown_timeout`]),
//!   done offsets are committed.
//! - Metrics (the `metrics` facade): `walcast_consumer_processed_total`,
//!   `walcast_consumer_duplicates_total`, `walcast_consumer_retries_total`,
//!   `walcast_consumer_dead_lettered_total` (labels `group`, `topic`) and
//!   `walcast_consumer_lag` (labels `group`, `topic`, `partition`). Each
//!   record is handled in a `walcast.consume` span with the event id and
//!   correlation id.
//! - Replay: [`rewind`] a stopped group to an offset or a time and run it
//!   again (duplicates are skipped); [`redrive`] dead-lettered records back to
//!   their original topic. The `walcast-consumer` command does both.
#![warn(missing_docs)]

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers as _, Message as _, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_postgres::{Client, NoTls, Transaction};
use tracing::{debug, error, info, warn, Instrument as _};

mod replay;

pub use replay::{redrive, rewind, RewindTo, DEAD_LETTER_HEADERS};

/// Errors that end [`Consumer::run`] or refuse a configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An invalid configuration.
    #[error("walcast-consumer: invalid configuration: {0}")]
    Config(String),
    /// Kafka refused to create or subscribe the client.
    #[error("walcast-consumer: kafka: {0}")]
    Kafka(#[from] KafkaError),
}

/// What a [`Handler`] returns when it cannot process a record.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Worth trying again (a timeout, a busy dependency, a serialization
    /// failure): retried on the backoff schedule, then dead-lettered.
    #[error("{0}")]
    Retryable(String),
    /// Will never succeed (invalid payload, a rule the event breaks):
    /// dead-lettered at once.
    #[error("{0}")]
    Permanent(String),
}

impl HandlerError {
    /// A retryable error from anything displayable.
    pub fn retryable(e: impl std::fmt::Display) -> Self {
        HandlerError::Retryable(e.to_string())
    }
    /// A permanent error from anything displayable.
    pub fn permanent(e: impl std::fmt::Display) -> Self {
        HandlerError::Permanent(e.to_string())
    }
    fn kind(&self) -> &'static str {
        match self {
            HandlerError::Retryable(_) => "retryable",
            HandlerError::Permanent(_) => "permanent",
        }
    }
}

/// Database errors in a handler are retryable (`?` works on them); a lost
/// connection is retried without counting against the schedule.
impl From<tokio_postgres::Error> for HandlerError {
    fn from(e: tokio_postgres::Error) -> Self {
        HandlerError::Retryable(format!("database: {e}"))
    }
}

/// One record as the handler sees it.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The event id (`id` header), the deduplication key.
    pub id: String,
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key (the aggregate id).
    pub key: Option<Vec<u8>>,
    /// Value.
    pub payload: Option<Vec<u8>>,
    /// Headers in record order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// 0 on the first try, then 1, 2, … on retries.
    pub attempt: u32,
}

impl Delivery {
    fn from_message(m: &OwnedMessage) -> Delivery {
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        let mut d = Delivery {
            id: String::new(),
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers,
            attempt: 0,
        };
        d.id = d.header("id").unwrap_or_default().to_string();
        d
    }

    /// A header as UTF-8 (the last one of that name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// The `correlation_id` header.
    pub fn correlation_id(&self) -> Option<&str> {
        self.header("correlation_id")
    }

    /// The key as UTF-8 (lossy).
    pub fn key_str(&self) -> String {
        String::from_utf8_lossy(self.key.as_deref().unwrap_or_default()).into_owned()
    }

    /// The value parsed as JSON; a value that does not parse is a permanent error.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_slice(self.payload.as_deref().unwrap_or_default())
            .map_err(|e| HandlerError::Permanent(format!("payload is not the expected JSON: {e}")))
    }
}

/// Processes records.
///
/// **Ordering contract.** `handle` is called for one partition's records one
/// at a time in offset order (so per key in the order walcast published
/// them); different partitions are handled concurrently. The same event can
/// be offered again (redelivery, rebalance, retries): each call gets a fresh
/// transaction.
///
/// **Durability contract.** Do every side effect through `tx`. The consumer
/// inserts the event's `processed_events` row in `tx` before calling
/// `handle` and commits `tx` after it returned `Ok`; only then is the offset
/// eligible for commit. An `Err` rolls `tx` back. Side effects outside `tx`
/// (HTTP calls, emails) are at least once: make them idempotent with
/// [`Delivery::id`].
pub trait Handler: Send + Sync + 'static {
    /// Handles one record inside `tx`.
    fn handle(
        &self,
        tx: &Transaction<'_>,
        event: &Delivery,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// Consumer settings. [`ConsumerConfig::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Kafka bootstrap servers.
    pub bootstrap_servers: String,
    /// Consumer group (also the `consumer_group` of `processed_events` rows).
    pub group_id: String,
    /// Topics to consume.
    pub topics: Vec<String>,
    /// tokio-postgres connection string of the handler's database (no TLS).
    pub postgres: String,
    /// Where failed records go (default `<group_id>.dlq`).
    pub dead_letter_topic: String,
    /// Delays before each retry of a retryable handler error (default 1 s,
    /// 5 s, 30 s): `retry_backoff.len()` retries, then the dead-letter topic.
    pub retry_backoff: Vec<Duration>,
    /// The deduplication table (default `processed_events`).
    pub processed_table: String,
    /// How often done offsets are committed (default 1 s).
    pub commit_interval: Duration,
    /// Records queued per partition (default 256). When a partition's queue
    /// is full, fetching that partition pauses until its worker catches up;
    /// the other partitions go on.
    pub queue_capacity: usize,
    /// How long shutdown waits for records in flight (default 30 s).
    pub shutdown_timeout: Duration,
    /// Extra librdkafka properties for the consumer (security and the like).
    /// `enable.auto.commit` and `enable.auto.offset.store` are always false.
    pub kafka_properties: BTreeMap<String, String>,
}

impl ConsumerConfig {
    /// Defaults for `group_id` on `topics`.
    pub fn new(
        bootstrap_servers: impl Into<String>,
        group_id: impl Into<String>,
        topics: Vec<String>,
        postgres: impl Into<String>,
    ) -> ConsumerConfig {
        let group_id = group_id.into();
        ConsumerConfig {
            bootstrap_servers: bootstrap_servers.into(),
            dead_letter_topic: format!("{group_id}.dlq"),
            group_id,
            topics,
            postgres: postgres.into(),
            retry_backoff: vec![
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(30),
            ],
            processed_table: "processed_events".into(),
            commit_interval: Duration::from_secs(1),
            queue_capacity: 256,
            shutdown_timeout: Duration::from_secs(30),
            kafka_properties: BTreeMap::new(),
        }
    }

    fn validate(&self) -> Result<(), Error> {
        if self.topics.is_empty() {
            return Err(Error::Config("topics is empty".into()));
        }
        if self.group_id.is_empty() {
            return Err(Error::Config("group_id is empty".into()));
        }
        if self.topics.contains(&self.dead_letter_topic) {
            return Err(Error::Config(format!(
                "dead_letter_topic {:?} is one of the consumed topics",
                self.dead_letter_topic
            )));
        }
        let t = &self.processed_table;
        let ok = t.split('.').count() <= 2
            && t.split('.')
                .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        if !ok {
            return Err(Error::Config(format!(
                "processed_table {t:?}: use name or schema.name of letters, digits and _"
            )));
        }
        if self.queue_capacity == 0 {
            return Err(Error::Config("queue_capacity must be at least 1".into()));
        }
        for k in self.kafka_properties.keys() {
            if matches!(
                k.as_str(),
                "enable.auto.commit" | "enable.auto.offset.store" | "group.id"
            ) {
                return Err(Error::Config(format!(
                    "kafka property {k:?} is set by the consumer itself"
                )));
            }
        }
        Ok(())
    }
}

/// Counters of one consumer (the same numbers as its metrics).
#[derive(Debug, Default)]
pub struct Stats {
    /// Records whose handler committed.
    pub processed: AtomicU64,
    /// Records skipped because their event id was already processed.
    pub duplicates: AtomicU64,
    /// Retries of retryable handler errors.
    pub retries: AtomicU64,
    /// Records sent to the dead-letter topic.
    pub dead_lettered: AtomicU64,
}

type Tp = (String, i32);

struct Worker {
    tx: mpsc::Sender<OwnedMessage>,
    revoked: Arc<AtomicBool>,
}

struct Shared {
    /// Next offset to commit per partition (last done + 1).
    done: Mutex<HashMap<Tp, i64>>,
    committed: Mutex<HashMap<Tp, i64>>,
    workers: Mutex<HashMap<Tp, Worker>>,
    stopping: AtomicBool,
}

impl Shared {
    fn pending(&self) -> TopicPartitionList {
        let done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        let committed = self.committed.lock().unwrap_or_else(|e| e.into_inner());
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in done.iter() {
            if committed.get(&(t.clone(), *p)) != Some(o) {
                let _ = tpl.add_partition_offset(t, *p, Offset::Offset(*o));
            }
        }
        tpl
    }

    fn mark_committed(&self, tpl: &TopicPartitionList) {
        let mut committed = self.committed.lock().unwrap_or_else(|e| e.into_inner());
        for e in tpl.elements() {
            if let Offset::Offset(o) = e.offset() {
                committed.insert((e.topic().to_string(), e.partition()), o);
            }
        }
    }
}

struct Ctx {
    shared: Arc<Shared>,
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // A partition paused for a full queue before it was revoked must not
        // come back paused.
        if let Rebalance::Assign(assigned) = rebalance {
            if let Err(e) = consumer.resume(assigned) {
                warn!(error = %e, "resuming newly assigned partitions failed");
            }
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else {
            return;
        };
        // Stop the revoked partitions' workers: they start nothing new and
        // do not record what they finish (the new owner redoes it and
        // deduplicates).
        let mut tps = Vec::new();
        {
            let mut workers = self
                .shared
                .workers
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for e in revoked.elements() {
                let tp = (e.topic().to_string(), e.partition());
                if let Some(w) = workers.remove(&tp) {
                    w.revoked.store(true, Ordering::SeqCst);
                }
                tps.push(tp);
            }
        }
        // Commit what is done, synchronously, before the partitions go.
        let mut tpl = TopicPartitionList::new();
        {
            let mut done = self.shared.done.lock().unwrap_or_else(|e| e.into_inner());
            let mut committed = self
                .shared
                .committed
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for tp in &tps {
                if let Some(o) = done.remove(tp) {
                    if committed.remove(tp) != Some(o) {
                        let _ = tpl.add_partition_offset(&tp.0, tp.1, Offset::Offset(o));
                    }
                }
            }
        }
        if tpl.count() > 0 {
            match consumer.commit(&tpl, CommitMode::Sync) {
                Ok(()) => info!(partitions = tpl.count(), "committed done offsets on revoke"),
                Err(e) => {
                    warn!(error = %e, "committing done offsets on revoke failed; the new owner redoes (and deduplicates) those records")
                }
            }
        }
    }
}

/// The idempotent consumer. Build with [`Consumer::new`], run with [`Consumer::run`].
pub struct Consumer<H: Handler> {
    cfg: Arc<ConsumerConfig>,
    handler: Arc<H>,
    stats: Arc<Stats>,
}

impl<H: Handler> std::fmt::Debug for Consumer<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("group_id", &self.cfg.group_id)
            .field("topics", &self.cfg.topics)
            .finish()
    }
}

struct Env<H> {
    cfg: Arc<ConsumerConfig>,
    handler: Arc<H>,
    stats: Arc<Stats>,
    producer: FutureProducer,
    shared: Arc<Shared>,
    dedupe_sql: String,
}

impl<H: Handler> Consumer<H> {
    /// A consumer of `cfg` with `handler`; validates `cfg`.
    pub fn new(cfg: ConsumerConfig, handler: H) -> Result<Self, Error> {
        cfg.validate()?;
        Ok(Consumer {
            cfg: Arc::new(cfg),
            handler: Arc::new(handler),
            stats: Arc::new(Stats::default()),
        })
    }

    /// The consumer's counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Consumes until `shutdown` completes, then stops gracefully (see the
    /// crate documentation). Needs the multi-threaded tokio runtime.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let cfg = self.cfg.clone();
        let shared = Arc::new(Shared {
            done: Mutex::new(HashMap::new()),
            committed: Mutex::new(HashMap::new()),
            workers: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
        });
        let mut cc = ClientConfig::new();
        for (k, v) in &cfg.kafka_properties {
            cc.set(k, v);
        }
        cc.set("bootstrap.servers", &cfg.bootstrap_servers)
            .set("group.id", &cfg.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        if !cfg.kafka_properties.contains_key("auto.offset.reset") {
            cc.set("auto.offset.reset", "earliest");
        }
        if !cfg.kafka_properties.contains_key("isolation.level") {
            cc.set("isolation.level", "read_committed");
        }
        let consumer: Arc<StreamConsumer<Ctx>> = Arc::new(cc.create_with_context(Ctx {
            shared: shared.clone(),
        })?);
        let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;

        let mut pc = ClientConfig::new();
        for (k, v) in &cfg.kafka_properties {
            if k.starts_with("security.") || k.starts_with("sasl.") || k.starts_with("ssl.") {
                pc.set(k, v);
            }
        }
        let producer: FutureProducer = pc
            .set("bootstrap.servers", &cfg.bootstrap_servers)
            .set("enable.idempotence", "true")
            .set("linger.ms", "0")
            .create()?;
        let env = Arc::new(Env {
            dedupe_sql: format!(
                "INSERT INTO {} (consumer_group, event_id, topic, kafka_partition, kafka_offset) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                cfg.processed_table
            ),
            cfg: cfg.clone(),
            handler: self.handler.clone(),
            stats: self.stats.clone(),
            producer,
            shared: shared.clone(),
        });

        let committer = tokio::spawn(commit_loop(consumer.clone(), shared.clone(), cfg.clone()));
        let mut handles = Vec::new();
        tokio::pin!(shutdown);
        loop {
            let msg = tokio::select! {
                _ = &mut shutdown => break,
                m = consumer.recv() => m,
            };
            let m = match msg {
                Ok(m) => m.detach(),
                Err(e) => {
                    warn!(error = %e, "kafka consumer error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let tp = (m.topic().to_string(), m.partition());
            let sender = {
                let mut workers = shared.workers.lock().unwrap_or_else(|e| e.into_inner());
                let w = workers.entry(tp.clone()).or_insert_with(|| {
                    let (tx, rx) = mpsc::channel(cfg.queue_capacity);
                    let revoked = Arc::new(AtomicBool::new(false));
                    handles.push(tokio::spawn(worker(
                        env.clone(),
                        tp.clone(),
                        rx,
                        revoked.clone(),
                    )));
                    Worker { tx, revoked }
                });
                w.tx.clone()
            };
            match sender.try_send(m) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    debug!(topic = %tp.0, partition = tp.1, "record of a revoked partition dropped");
                }
                // This partition's worker is behind (a slow handler, retries
                // with backoff): stop fetching the partition instead of
                // waiting here, so the other partitions go on. The record is
                // handed over when the queue has room (waiters are served in
                // order, before any later try_send), then the partition
                // resumes from the position after it.
                Err(mpsc::error::TrySendError::Full(m)) => {
                    let mut tpl = TopicPartitionList::new();
                    tpl.add_partition(&tp.0, tp.1);
                    match consumer.pause(&tpl) {
                        Ok(()) => {
                            debug!(topic = %tp.0, partition = tp.1, "partition queue full: fetching paused");
                            let c = consumer.clone();
                            tokio::spawn(async move {
                                if sender.send(m).await.is_ok() {
                                    if let Err(e) = c.resume(&tpl) {
                                        warn!(error = %e, "resuming a paused partition failed; it resumes at the next rebalance");
                                    }
                                }
                            });
                        }
                        Err(e) => {
                            warn!(error = %e, topic = %tp.0, partition = tp.1, "pausing a partition with a full queue failed; waiting for its worker instead");
                            tokio::select! {
                                _ = &mut shutdown => break,
                                r = sender.send(m) => if r.is_err() {
                                    debug!(topic = %tp.0, partition = tp.1, "record of a revoked partition dropped");
                                },
                            }
                        }
                    }
                }
            }
        }
        // Graceful shutdown: start nothing new, let records in flight finish.
        info!("consumer shutting down");
        shared.stopping.store(true, Ordering::SeqCst);
        shared
            .workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        let all = futures_join_all(handles);
        if tokio::time::timeout(cfg.shutdown_timeout, all)
            .await
            .is_err()
        {
            warn!("records still in flight after shutdown_timeout; they will be redone (and deduplicated)");
        }
        committer.abort();
        let tpl = shared.pending();
        if tpl.count() > 0 {
            if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                warn!(error = %e, "final offset commit failed; the next run redoes (and deduplicates) those records");
            }
        }
        consumer.unsubscribe();
        Ok(())
    }
}

async fn futures_join_all(handles: Vec<tokio::task::JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}

async fn commit_loop<C: ConsumerContext + 'static>(
    consumer: Arc<StreamConsumer<C>>,
    shared: Arc<Shared>,
    cfg: Arc<ConsumerConfig>,
) {
    let mut last_lag = std::time::Instant::now();
    loop {
        tokio::time::sleep(cfg.commit_interval).await;
        let tpl = shared.pending();
        if tpl.count() > 0 {
            match consumer.commit(&tpl, CommitMode::Async) {
                Ok(()) => shared.mark_committed(&tpl),
                Err(e) => warn!(error = %e, "offset commit failed; retried next interval"),
            }
        }
        if last_lag.elapsed() >= Duration::from_secs(5) {
            last_lag = std::time::Instant::now();
            let done: Vec<(Tp, i64)> = shared
                .done
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect();
            let c = consumer.clone();
            let group = cfg.group_id.clone();
            let _ = tokio::task::spawn_blocking(move || {
                for ((t, p), next) in done {
                    if let Ok((_, high)) = c.fetch_watermarks(&t, p, Duration::from_secs(2)) {
                        metrics::gauge!("walcast_consumer_lag", "group" => group.clone(), "topic" => t.clone(), "partition" => p.to_string())
                            .set((high - next).max(0) as f64);
                    }
                }
            })
            .await;
        }
    }
}

enum Outcome {
    Processed,
    Duplicate,
}

enum Failure {
    /// The database connection or the consumer's own statements: not the record's fault.
    Infra(String),
    Handler(HandlerError),
}

async fn worker<H: Handler>(
    env: Arc<Env<H>>,
    tp: Tp,
    mut rx: mpsc::Receiver<OwnedMessage>,
    revoked: Arc<AtomicBool>,
) {
    let mut client: Option<Client> = None;
    let stopped = || revoked.load(Ordering::SeqCst) || env.shared.stopping.load(Ordering::SeqCst);
    while let Some(m) = rx.recv().await {
        if stopped() {
            break;
        }
        let d = Delivery::from_message(&m);
        let span = tracing::info_span!(
            "walcast.consume",
            event.id = %d.id,
            correlation.id = d.correlation_id().unwrap_or(""),
            topic = %d.topic,
            partition = d.partition,
            offset = d.offset,
        );
        let done = process(&env, &mut client, d, &stopped)
            .instrument(span)
            .await;
        if !done || revoked.load(Ordering::SeqCst) {
            break;
        }
        env.shared
            .done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(tp.clone(), m.offset() + 1);
    }
}

/// Processes one record to the end: handled, duplicate or dead-lettered
/// (true), or abandoned because the partition was revoked or the consumer
/// stops (false).
async fn process<H: Handler>(
    env: &Env<H>,
    client: &mut Option<Client>,
    mut d: Delivery,
    stopped: &impl Fn() -> bool,
) -> bool {
    let labels = [
        ("group", env.cfg.group_id.clone()),
        ("topic", d.topic.clone()),
    ];
    if d.id.is_empty() {
        let e = HandlerError::Permanent("the record has no `id` header to deduplicate on".into());
        return dead_letter(env, &d, &e, stopped).await;
    }
    let mut infra_delay = Duration::from_millis(100);
    loop {
        if stopped() {
            return false;
        }
        if client.as_ref().is_none_or(Client::is_closed) {
            match tokio_postgres::connect(&env.cfg.postgres, NoTls).await {
                Ok((c, conn)) => {
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    *client = Some(c);
                }
                Err(e) => {
                    warn!(error = %e, "connecting to the handler's database failed; retrying");
                    sleep_unless(infra_delay, stopped).await;
                    infra_delay = (infra_delay * 2).min(Duration::from_secs(10));
                    continue;
                }
            }
        }
        let c = client.as_mut().expect("connected");
        match attempt(env, c, &d).await {
            Ok(Outcome::Processed) => {
                env.stats.processed.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("walcast_consumer_processed_total", &labels).increment(1);
                return true;
            }
            Ok(Outcome::Duplicate) => {
                debug!("duplicate event skipped");
                env.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("walcast_consumer_duplicates_total", &labels).increment(1);
                return true;
            }
            Err(Failure::Infra(e)) => {
                warn!(error = %e, "database failure outside the handler; retrying");
                sleep_unless(infra_delay, stopped).await;
                infra_delay = (infra_delay * 2).min(Duration::from_secs(10));
            }
            Err(Failure::Handler(e)) if c.is_closed() => {
                warn!(error = %e, "handler failed on a lost database connection; retrying without counting");
                sleep_unless(infra_delay, stopped).await;
                infra_delay = (infra_delay * 2).min(Duration::from_secs(10));
            }
            Err(Failure::Handler(e @ HandlerError::Permanent(_))) => {
                return dead_letter(env, &d, &e, stopped).await;
            }
            Err(Failure::Handler(e)) => {
                let n = d.attempt as usize;
                let Some(delay) = env.cfg.retry_backoff.get(n).copied() else {
                    return dead_letter(env, &d, &e, stopped).await;
                };
                warn!(error = %e, attempt = d.attempt, delay_ms = delay.as_millis() as u64, "handler failed; retrying");
                env.stats.retries.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("walcast_consumer_retries_total", &labels).increment(1);
                if !sleep_unless(delay, stopped).await {
                    return false;
                }
                d.attempt += 1;
            }
        }
    }
}

/// Sleeps `d` unless stopped meanwhile (checked every 50 ms); false when stopped.
async fn sleep_unless(d: Duration, stopped: &impl Fn() -> bool) -> bool {
    let end = tokio::time::Instant::now() + d;
    loop {
        if stopped() {
            return false;
        }
        let now = tokio::time::Instant::now();
        if now >= end {
            return true;
        }
        tokio::time::sleep((end - now).min(Duration::from_millis(50))).await;
    }
}

async fn attempt<H: Handler>(
    env: &Env<H>,
    c: &mut Client,
    d: &Delivery,
) -> Result<Outcome, Failure> {
    let infra = |what: &str| {
        let what = what.to_string();
        move |e: tokio_postgres::Error| Failure::Infra(format!("{what}: {e}"))
    };
    let tx = c.transaction().await.map_err(infra("BEGIN"))?;
    // The dedupe row first: a concurrent transaction on the same event (the
    // old owner after a rebalance) makes this wait for its outcome.
    let n = tx
        .execute(
            env.dedupe_sql.as_str(),
            &[&env.cfg.group_id, &d.id, &d.topic, &d.partition, &d.offset],
        )
        .await
        .map_err(|e| {
            error!(error = %e, table = %env.cfg.processed_table, "recording the event in the deduplication table failed (create it with walcast-outbox's migrations, 0002_processed_events.sql)");
            Failure::Infra(e.to_string())
        })?;
    if n == 0 {
        tx.rollback().await.map_err(infra("ROLLBACK"))?;
        return Ok(Outcome::Duplicate);
    }
    env.handler.handle(&tx, d).await.map_err(Failure::Handler)?;
    tx.commit().await.map_err(infra("COMMIT"))?;
    Ok(Outcome::Processed)
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// Sends `d` to the dead-letter topic and waits for Kafka's acknowledgement
/// (retried until it succeeds or the consumer stops: never skipped).
async fn dead_letter<H: Handler>(
    env: &Env<H>,
    d: &Delivery,
    e: &HandlerError,
    stopped: &impl Fn() -> bool,
) -> bool {
    let partition = d.partition.to_string();
    let offset = d.offset.to_string();
    let failed_at = now_ms().to_string();
    let reason = e.to_string();
    let mut delay = Duration::from_millis(200);
    loop {
        let mut headers = OwnedHeaders::new_with_capacity(d.headers.len() + 6);
        for (k, v) in &d.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        for (k, v) in [
            ("walcast.error.reason", reason.as_str()),
            ("walcast.error.kind", e.kind()),
            ("walcast.original.topic", d.topic.as_str()),
            ("walcast.original.partition", partition.as_str()),
            ("walcast.original.offset", offset.as_str()),
            ("walcast.failed.at", failed_at.as_str()),
        ] {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let mut rec: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&env.cfg.dead_letter_topic).headers(headers);
        if let Some(k) = &d.key {
            rec = rec.key(k.as_slice());
        }
        if let Some(p) = &d.payload {
            rec = rec.payload(p.as_slice());
        }
        match env.producer.send(rec, Duration::from_secs(30)).await {
            Ok(_) => {
                error!(reason = %reason, kind = e.kind(), dead_letter_topic = %env.cfg.dead_letter_topic, "record dead-lettered");
                env.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("walcast_consumer_dead_lettered_total", "group" => env.cfg.group_id.clone(), "topic" => d.topic.clone())
                    .increment(1);
                return true;
            }
            Err((err, _)) => {
                warn!(error = %err, "writing the dead-letter record failed; retrying (the partition waits)");
                if !sleep_unless(delay, stopped).await {
                    return false;
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}
