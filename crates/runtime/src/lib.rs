//! walcast's runtime: the relay as one handle ([`Relay`]) that the binary,
//! tests and examples share.
//!
//! - [`Relay::run`] supervises the pipeline: it connects Kafka and Postgres,
//!   runs the pipeline, and restarts it from the slot with backoff after a
//!   retryable error, until it is told to stop or an error stops walcast.
//! - [`run_pipeline`] is the one place that closes a run in the order the
//!   delivery rules need (abort the sink before dropping the source, confirm
//!   only what the ack tracker says, report the final position before
//!   closing the connection). It is generic over the source and the sink, so
//!   its ordering is tested with in-memory ones.
//! - Metrics (`docs/metrics.md`), `/healthz` and `/readyz` on the
//!   `[metrics] listen` address, heartbeats and warnings.
#![warn(missing_docs)]

mod events;
mod http;
pub mod telemetry;
pub mod timeline;
pub mod traces;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::Instrument;
use walcast_core::config::{Config, PermanentErrorPolicy};
use walcast_core::dead_letter::KnownRejection;
use walcast_core::failpoint::Failpoints;
use walcast_core::outbox::OutboxFilter;
use walcast_core::pipeline::{Pipeline, PipelineExit, PipelineSettings, Progress};
use walcast_core::route::Router;
use walcast_core::sink::EventSink;
use walcast_core::source::ReplicationSource;
use walcast_core::state::SlotRecordStore;
use walcast_core::{Decision, Error, Lsn, Origin, Result};
use walcast_kafka::{KafkaProbe, KafkaRecordStore, KafkaSink, QueueLimits, TopicLimits};
use walcast_postgres::{ConnectOptions, FileStore, ServerReport, SlotState, WatchSettings};

use crate::events::SlotWatch;
use crate::telemetry::{MetricsRegistry, RelayMetrics, RelayObserver};
use crate::traces::Traces;

/// At most this many broker refusals are remembered for the dead-letter
/// policy in one process (each costs a restart); beyond, walcast stops.
const MAX_KNOWN_REJECTIONS: usize = 10_000;

/// How often `/readyz`'s Kafka check asks the cluster for metadata, and how
/// long it waits for the answer.
const KAFKA_PROBE_EVERY: Duration = Duration::from_secs(2);

/// State shared by the supervisor, the pipeline's observer and the HTTP handlers.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) progress: Arc<Progress>,
    pub(crate) metrics: Arc<RelayMetrics>,
    /// A run holds the slot and streams.
    streaming: AtomicBool,
    /// The Kafka cluster answered the last probe.
    kafka_reachable: AtomicBool,
    /// The current run's probe.
    probe: Mutex<Option<KafkaProbe>>,
    ready_stall: Duration,
    slot: String,
    slot_watch: Mutex<SlotWatch>,
    /// The trace exporter, set by [`Relay::run`] when `[tracing]` is on.
    traces: std::sync::OnceLock<Arc<Traces>>,
}

impl Shared {
    /// `Ok` when `/readyz` answers 200; else the one-line reason.
    pub(crate) fn readiness(&self) -> std::result::Result<(), String> {
        if !self.streaming.load(Ordering::Acquire) {
            return Err(format!(
                "not streaming from replication slot {} (connecting, or restarting after an error)",
                self.slot
            ));
        }
        if !self.kafka_reachable.load(Ordering::Acquire) {
            return Err("the Kafka cluster does not answer (kafka.bootstrap_servers)".into());
        }
        let blocked = self.progress.blocked_for();
        if blocked >= self.ready_stall {
            return Err(format!(
                "Kafka has acknowledged nothing for {}s with events in flight (metrics.ready_stall_ms)",
                blocked.as_secs()
            ));
        }
        Ok(())
    }

    /// Copies the pipeline's counters and the readiness into the metrics.
    pub(crate) fn refresh(&self) {
        self.metrics.refresh(&self.progress);
        self.metrics
            .ready
            .set(if self.readiness().is_ok() { 1.0 } else { 0.0 });
    }

    fn server_report(&self, report: ServerReport) {
        match report {
            ServerReport::Heartbeat => events::heartbeat(&self.metrics),
            ServerReport::Slot(facts) => {
                let mut watch = self.slot_watch.lock().unwrap();
                events::slot_facts(&self.metrics, &mut watch, &self.slot, &facts);
            }
        }
    }
}

/// Marks the relay as streaming while it lives.
struct Streaming<'a>(&'a Shared);

impl Drop for Streaming<'_> {
    fn drop(&mut self) {
        self.0.streaming.store(false, Ordering::Release);
        *self.0.probe.lock().unwrap() = None;
    }
}

/// The relay: one pipeline from a slot to Kafka, or several (`[[pipelines]]`),
/// each supervised on its own.
#[derive(Debug)]
pub struct Relay {
    cfg: Config,
    pipelines: Vec<(Config, Arc<Shared>)>,
    hub: Arc<Hub>,
}

/// What the HTTP handlers see: every pipeline and the metrics they share.
#[derive(Debug)]
pub(crate) struct Hub {
    pub(crate) pipelines: Vec<Arc<Shared>>,
    pub(crate) registry: MetricsRegistry,
}

impl Hub {
    /// `Ok` when every pipeline is ready; else the first reason, naming the
    /// pipeline when there are several.
    pub(crate) fn readiness(&self) -> std::result::Result<(), String> {
        let several = self.pipelines.len() > 1;
        for p in &self.pipelines {
            if let Err(why) = p.readiness() {
                return Err(if several {
                    format!("pipeline {}: {why}", p.slot)
                } else {
                    why
                });
            }
        }
        Ok(())
    }

    /// Refreshes every pipeline's gauges and renders them.
    pub(crate) fn render(&self) -> Option<String> {
        for p in &self.pipelines {
            p.refresh();
        }
        self.registry.render()
    }
}

impl Relay {
    /// A relay for a validated configuration. No I/O yet.
    ///
    /// # Errors
    /// An operator error when `[[pipelines]]` is invalid (see
    /// [`Config::pipeline_configs`]).
    pub fn new(cfg: Config) -> Result<Self> {
        let registry = MetricsRegistry::new(cfg.metrics.listen.is_some());
        let pipelines: Vec<(Config, Arc<Shared>)> = cfg
            .pipeline_configs()?
            .into_iter()
            .map(|c| {
                let shared = Arc::new(Shared {
                    progress: Arc::new(Progress::default()),
                    metrics: Arc::new(RelayMetrics::in_registry(&c.postgres.slot, &registry)),
                    streaming: AtomicBool::new(false),
                    kafka_reachable: AtomicBool::new(false),
                    probe: Mutex::new(None),
                    ready_stall: Duration::from_millis(c.metrics.ready_stall_ms),
                    slot: c.postgres.slot.clone(),
                    slot_watch: Mutex::default(),
                    traces: std::sync::OnceLock::new(),
                });
                (c, shared)
            })
            .collect();
        let hub = Arc::new(Hub {
            pipelines: pipelines.iter().map(|(_, s)| s.clone()).collect(),
            registry,
        });
        Ok(Relay {
            cfg,
            pipelines,
            hub,
        })
    }

    /// The counters of the first pipeline (the only one without
    /// `[[pipelines]]`), shared across restarts.
    pub fn progress(&self) -> Arc<Progress> {
        self.pipelines[0].1.progress.clone()
    }

    /// `Ok` when every pipeline is ready (what `/readyz` answers), else why
    /// not.
    ///
    /// # Errors
    /// The one-line reason it is not ready.
    pub fn readiness(&self) -> std::result::Result<(), String> {
        self.hub.readiness()
    }

    /// The Prometheus text of the relay's metrics (`None` when `[metrics]
    /// listen` is unset).
    pub fn render_metrics(&self) -> Option<String> {
        self.hub.render()
    }

    /// Runs until `stop` turns true (then stops reading, waits for
    /// outstanding deliveries up to `pipeline.shutdown_timeout_ms`, reports the
    /// final position and returns `Ok`), or until an error that stops walcast.
    /// Retryable errors restart the pipeline from the slot with backoff.
    /// Serves `[metrics] listen` meanwhile.
    ///
    /// With several pipelines, each restarts on its own; an error that stops
    /// one stops the others too (gracefully, as on a signal) and is returned.
    ///
    /// # Errors
    /// An error whose decision is [`Decision::Exit`]: an operator error (the
    /// setup is wrong, the listener cannot bind) or a permanent one (an event
    /// that can never be published).
    pub async fn run(self, stop: watch::Receiver<bool>) -> Result<()> {
        for (c, shared) in &self.pipelines {
            if let Some(traces) = Traces::start(&c.tracing, &c.postgres.slot)? {
                tracing::info!(
                    otlp_url = c.tracing.traces_url().unwrap_or_default(),
                    pipeline = %c.postgres.slot,
                    "exporting a span per relayed transaction (OTLP/HTTP)"
                );
                let _ = shared.traces.set(traces);
            }
        }
        let all: Vec<Arc<Shared>> = self.hub.pipelines.clone();
        let result = self.serve(stop).await;
        for shared in all {
            if let Some(traces) = shared.traces.get().cloned() {
                // Bounded by tracing.export_timeout_ms; never an error.
                let _ = tokio::task::spawn_blocking(move || traces.shutdown()).await;
            }
        }
        result
    }

    async fn serve(self, stop: watch::Receiver<bool>) -> Result<()> {
        let hub = self.hub.clone();
        let server = match &self.cfg.metrics.listen {
            Some(listen) => Some(http::bind(listen, hub.clone()).await?),
            None => None,
        };
        let background = async {
            let Some(server) = server else {
                return std::future::pending().await;
            };
            let probes = hub.pipelines.iter().map(|s| probe_kafka(s));
            tokio::join!(server, tick(&hub), futures::future::join_all(probes));
        };
        tokio::select! {
            r = run_all(&self.pipelines, stop) => r,
            () = background => Ok(()),
            () = warn_leftover_slots(&self.pipelines) => Ok(()),
        }
    }
}

/// How often [`warn_leftover_slots`] looks, and how long a slot record must
/// have stood still before its slot counts as left behind.
const LEFTOVER_CHECK: Duration = Duration::from_secs(300);

/// Warns (once per slot) about each inactive logical slot of the outbox
/// database that walcast's state directory holds a record of, for the same
/// cluster, that this process does not run, and whose record has not moved
/// for [`LEFTOVER_CHECK`]: typically the single slot that a switch to
/// `[[pipelines]]` left behind, or the slots of an older key-hash split. Such
/// a slot retains WAL until it is dropped, and the server's disk fills.
/// Looks once every pipeline streams, then every [`LEFTOVER_CHECK`]; best
/// effort (a failure is logged at debug level). Never returns.
async fn warn_leftover_slots(pipelines: &[(Config, Arc<Shared>)]) {
    let mut warned = std::collections::HashSet::new();
    loop {
        while !pipelines
            .iter()
            .all(|(_, s)| s.streaming.load(Ordering::Relaxed))
        {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        if let Err(e) = leftover_slots(pipelines, &mut warned).await {
            tracing::debug!(error = %e, "could not look for slots walcast left behind");
        }
        tokio::time::sleep(LEFTOVER_CHECK).await;
    }
}

async fn leftover_slots(
    pipelines: &[(Config, Arc<Shared>)],
    warned: &mut std::collections::HashSet<String>,
) -> Result<()> {
    let Some((cfg, _)) = pipelines.first() else {
        return Ok(());
    };
    let ours: Vec<&str> = pipelines
        .iter()
        .map(|(c, _)| c.postgres.slot.as_str())
        .chain(warned.iter().map(String::as_str))
        .collect();
    let found = left_behind_slots(cfg, &ours, LEFTOVER_CHECK).await?;
    for slot in found {
        tracing::warn!(
            slot = %slot.slot,
            database = %slot.database,
            retained_wal_bytes = slot.retained_wal_bytes.unwrap_or(-1),
            state_dir = %slot.state_dir.display(),
            "{}. {}",
            slot.describe(),
            slot.fix()
        );
        warned.insert(slot.slot);
    }
    Ok(())
}

/// A logical slot walcast created and no longer runs: see
/// [`left_behind_slots`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeftBehindSlot {
    /// The slot's name.
    pub slot: String,
    /// Its database.
    pub database: String,
    /// WAL the slot retains on the server, bytes (`None` when the server
    /// does not say).
    pub retained_wal_bytes: Option<i64>,
    /// Seconds since walcast last wrote the slot's record.
    pub record_age_secs: u64,
    /// The state directory that holds the record.
    pub state_dir: std::path::PathBuf,
}

impl LeftBehindSlot {
    /// What the slot is and what to do about it.
    pub fn describe(&self) -> String {
        format!(
            "replication slot {} was walcast's (a record in the state directory, last written {} s ago) but this configuration does not run it, and nothing streams from it: it retains WAL ({}) until it is dropped",
            self.slot,
            self.record_age_secs,
            self.retained_wal_bytes
                .map_or("an unknown amount".to_string(), |b| format!("{b} bytes")),
        )
    }

    /// The fix.
    pub fn fix(&self) -> String {
        format!(
            "If this configuration replaced it (a renamed slot, a switch to [[pipelines]] or another split), drop it once the new slots relay: walcast slot drop --config <its old configuration> --yes (or SELECT pg_drop_replication_slot('{}')); if another walcast process runs it, start that process",
            self.slot
        )
    }
}

/// The inactive logical slots of `cfg`'s outbox database that walcast's
/// state directory (`cfg`'s) holds a record of, for the same cluster, whose
/// names are not in `ours` and whose record has not been written for
/// `min_record_age`: typically the single slot that a switch to
/// `[[pipelines]]` left behind, or the slots of an older key-hash split.
/// Such a slot retains WAL until it is dropped, and the server's disk fills.
/// Connects to Postgres only when the state directory holds such a record.
pub async fn left_behind_slots(
    cfg: &Config,
    ours: &[&str],
    min_record_age: Duration,
) -> Result<Vec<LeftBehindSlot>> {
    let dir = cfg.state_dir(|k| std::env::var_os(k))?;
    let store = FileStore::new(dir.clone());
    let now = walcast_core::state::SlotRecord::now_unix();
    let candidates: Vec<_> = store
        .records()
        .into_iter()
        .filter(|r| {
            r.database == cfg.postgres.database
                && !ours.contains(&r.slot.as_str())
                && now.saturating_sub(r.updated_at_unix) >= min_record_age.as_secs()
        })
        .collect();
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    let opts = connect_options(cfg, SlotState::new(vec![Arc::new(store)]))?;
    let mut s = walcast_postgres::AdminSession::open(&opts).await?;
    let inactive = s.inactive_slots().await?;
    Ok(candidates
        .into_iter()
        .filter(|r| r.system_identifier == s.system_identifier())
        .filter_map(|r| {
            let (_, retained) = inactive.iter().find(|(name, _)| *name == r.slot)?;
            Some(LeftBehindSlot {
                slot: r.slot.clone(),
                database: r.database.clone(),
                retained_wal_bytes: *retained,
                record_age_secs: now.saturating_sub(r.updated_at_unix),
                state_dir: dir.clone(),
            })
        })
        .collect())
}

/// Runs every pipeline's supervisor, each as its own task (so a
/// multi-threaded runtime runs them on several threads). The first error
/// that stops a pipeline stops the others (as a signal would) and is
/// returned once they have stopped.
async fn run_all(pipelines: &[(Config, Arc<Shared>)], stop: watch::Receiver<bool>) -> Result<()> {
    if let [(cfg, shared)] = pipelines {
        return run(cfg, shared, stop).await;
    }
    let (inner_tx, inner_rx) = watch::channel(false);
    let inner_tx = Arc::new(inner_tx);
    let mut tasks = tokio::task::JoinSet::new();
    for (cfg, shared) in pipelines {
        let (cfg, shared) = (cfg.clone(), shared.clone());
        let (inner_rx, inner_tx) = (inner_rx.clone(), inner_tx.clone());
        let span = tracing::info_span!("pipeline", slot = %cfg.postgres.slot);
        tasks.spawn(
            async move {
                let result = run(&cfg, &shared, inner_rx).await;
                if result.is_err() {
                    tracing::error!(
                        "pipeline {} stopped walcast: stopping the other pipelines",
                        cfg.postgres.slot
                    );
                    let _ = inner_tx.send(true);
                }
                result
            }
            .instrument(span),
        );
    }
    let follow = {
        let inner_tx = inner_tx.clone();
        let mut stop = stop.clone();
        async move {
            let _ = stop.wait_for(|s| *s).await;
            let _ = inner_tx.send(true);
            std::future::pending::<()>().await
        }
    };
    let joined = async {
        let mut first: Option<Error> = None;
        while let Some(joined) = tasks.join_next().await {
            let result = joined.unwrap_or_else(|e| {
                Err(Error::permanent(format!("a pipeline's task failed: {e}")))
            });
            if let Err(e) = result {
                first.get_or_insert(e);
            }
        }
        first
    };
    let first = tokio::select! {
        first = joined => first,
        () = follow => None,
    };
    match first {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Once a second: copies every pipeline's counters into its gauges, then
/// bounds the exporter's memory.
async fn tick(hub: &Hub) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        for p in &hub.pipelines {
            p.refresh();
        }
        hub.registry.upkeep();
    }
}

/// Asks the Kafka cluster for metadata every [`KAFKA_PROBE_EVERY`] (on a
/// blocking thread) for `/readyz`.
async fn probe_kafka(shared: &Shared) {
    let mut ticker = tokio::time::interval(KAFKA_PROBE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut logged_down = false;
    loop {
        ticker.tick().await;
        let probe = shared.probe.lock().unwrap().clone();
        let result = match probe {
            None => Err(None),
            Some(p) => {
                match tokio::task::spawn_blocking(move || p.check(KAFKA_PROBE_EVERY)).await {
                    Ok(r) => r.map_err(|e| Some(e.to_string())),
                    Err(e) => Err(Some(e.to_string())),
                }
            }
        };
        let up = result.is_ok();
        shared.kafka_reachable.store(up, Ordering::Release);
        match result {
            Ok(()) if logged_down => {
                logged_down = false;
                events::kafka_reachable(true, None);
            }
            Err(Some(e)) if !logged_down => {
                logged_down = true;
                events::kafka_reachable(false, Some(&e));
            }
            _ => {}
        }
    }
}

/// walcast's slot record stores: the state directory's file and the
/// compacted Kafka topic `pipeline.state_topic` (created when missing).
/// Delivery rule 5: a record in either counts.
///
/// # Errors
/// When the state directory cannot be resolved or the Kafka topic cannot be
/// opened or created.
pub async fn state_stores(cfg: &Config) -> Result<SlotState> {
    let dir = cfg.state_dir(|k| std::env::var_os(k))?;
    match &cfg.pipeline.state_dir {
        Some(given) if given.is_relative() => tracing::info!(
            "pipeline.state_dir {} is relative: walcast's slot records are kept in {}",
            given.display(),
            dir.display()
        ),
        _ => {}
    }
    if cfg.pipeline.state_dir.is_none() && std::path::Path::new("walcast-state").is_dir() {
        tracing::warn!(
            "found walcast-state in the working directory (the former default state directory); walcast now keeps its slot records in {}. Set pipeline.state_dir to the old directory's absolute path to keep using it",
            dir.display()
        );
    }
    let kafka = KafkaRecordStore::open(&cfg.kafka, &cfg.pipeline.state_topic).await?;
    tracing::info!(
        state_dir = %dir.display(),
        state_topic = %cfg.pipeline.state_topic,
        "walcast's slot records: the state directory and the Kafka topic"
    );
    let stores: Vec<Arc<dyn SlotRecordStore>> =
        vec![Arc::new(FileStore::new(dir)), Arc::new(kafka)];
    Ok(SlotState::new(stores))
}

/// What one run (or an operator tool) connects with.
///
/// # Errors
/// When the password file cannot be read or a table name is invalid.
pub fn connect_options(cfg: &Config, state: SlotState) -> Result<ConnectOptions> {
    Ok(ConnectOptions {
        pg: cfg.postgres.clone(),
        password: cfg.postgres_password()?,
        tables: cfg.outbox_tables()?,
        columns: cfg.routes()?.required_columns(),
        keys: cfg.routes()?.key_columns(),
        state,
        max_row_bytes: cfg.pipeline.max_row_bytes,
        // Unused unless postgres.streaming; resolved like the state directory.
        spill_dir: cfg
            .state_dir(|k| std::env::var_os(k))
            .map(|d| d.join("spill"))
            .unwrap_or_else(|_| std::env::temp_dir()),
    })
}

/// The supervisor: runs the pipeline, restarting it from the slot with
/// backoff after retryable errors.
async fn run(cfg: &Config, shared: &Shared, stop_rx: watch::Receiver<bool>) -> Result<()> {
    // Resolved before any I/O: a missing state directory is a setup error.
    cfg.state_dir(|k| std::env::var_os(k))?;
    // Opened once Kafka answers (the record's second copy lives there).
    let mut opts: Option<ConnectOptions> = None;
    // Test-only crash points, read once; `None` unless WALCAST_FAILPOINTS is set.
    let failpoints = Failpoints::from_env()?.map(Arc::new);
    if failpoints.is_some() {
        let var = walcast_core::failpoint::ENV_VAR;
        tracing::warn!(
            "{var}={} is set: this process will abort itself there (a test tool, never for production)",
            std::env::var(var).unwrap_or_default()
        );
    }
    if walcast_core::ack::BROKEN_ACK_FOR_TESTS {
        tracing::error!(
            "this walcast was built with the feature broken-ack-for-tests: it acknowledges a transaction when its FIRST event is delivered and LOSES DATA. It exists only to prove that the reliability suite catches such a bug"
        );
    }
    // The topics' record size limits, read by each run's sink and kept here
    // so a limit one run learnt sizes the next run's producer.
    let topic_limits = TopicLimits::default();
    let initial = Duration::from_millis(cfg.pipeline.restart_backoff_initial_ms);
    let max = Duration::from_millis(cfg.pipeline.restart_backoff_max_ms);
    let mut backoff = initial;
    let mut connections = 0u64;
    // Events a broker refused for good (dead-letter policy): the next run
    // dead-letters them instead of producing them again.
    let mut known_rejections: Vec<KnownRejection> = Vec::new();
    let dead_letter_in_use = !cfg.dead_letter_topics()?.is_empty();
    loop {
        if *stop_rx.borrow() {
            return Ok(());
        }
        let started = Instant::now();
        match run_once(
            cfg,
            &mut opts,
            shared,
            &failpoints,
            &topic_limits,
            &mut connections,
            &known_rejections,
            stop_rx.clone(),
        )
        .await
        {
            Ok(PipelineExit::Shutdown {
                confirmed,
                abandoned_events,
            }) => {
                tracing::info!(%confirmed, abandoned_events, "stopped");
                return Ok(());
            }
            Ok(PipelineExit::SourceEnded { confirmed }) => {
                events::source_ended(&shared.metrics, confirmed);
            }
            Err(e) => match e.kind().decision() {
                // A record the broker refused for good stopped the gapless
                // producer: under the dead-letter policy, restart with a new
                // producer that dead-letters it when the slot brings it again.
                // Only a delivery's verdict (origin Kafka), once per event:
                // refused again after the restart, walcast stops.
                Decision::Exit
                    if dead_letter_in_use
                        && e.origin() == Some(Origin::Kafka)
                        && known_rejections.len() < MAX_KNOWN_REJECTIONS
                        && KnownRejection::of(&e).is_some_and(|new| {
                            !known_rejections.iter().any(|k| k.same_event(&new))
                        }) =>
                {
                    tracing::warn!(
                        "{e} (under on_permanent_error = \"dead-letter\" walcast restarts from the slot with a new producer and sends this event to the dead-letter topic when it reads it again)"
                    );
                    known_rejections.extend(KnownRejection::of(&e));
                    backoff = initial;
                    events::pipeline_restart(&shared.metrics, &e, backoff);
                }
                Decision::Exit => {
                    tracing::error!(
                        kind = %e.kind(),
                        event_id = e.event_id(),
                        correlation_id = e.correlation_id(),
                        "{e}"
                    );
                    return Err(e);
                }
                Decision::RestartFromSlot => {
                    if started.elapsed() > Duration::from_secs(60) {
                        backoff = initial;
                    }
                    events::pipeline_restart(&shared.metrics, &e, backoff);
                }
            },
        }
        let mut stop = stop_rx.clone();
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
        backoff = (backoff * 2).min(max);
    }
}

/// One run: connect Kafka and Postgres, run the pipeline beside the
/// periodic server check, close in order ([`run_pipeline`]).
#[allow(clippy::too_many_arguments)]
async fn run_once(
    cfg: &Config,
    opts: &mut Option<ConnectOptions>,
    shared: &Shared,
    failpoints: &Option<Arc<Failpoints>>,
    topic_limits: &TopicLimits,
    connections: &mut u64,
    known_rejections: &[KnownRejection],
    stop: watch::Receiver<bool>,
) -> Result<PipelineExit> {
    let progress = &shared.progress;
    let routes = cfg.routes()?;
    let dead_letter_topics = cfg.dead_letter_topics()?;
    let sink = KafkaSink::connect(
        &cfg.kafka,
        QueueLimits {
            max_in_flight_events: cfg.pipeline.max_in_flight_events,
            max_in_flight_bytes: cfg.pipeline.max_in_flight_bytes,
        },
        &routes,
        topic_limits,
        Duration::from_secs(10),
    )
    .await
    .map_err(|e| e.or_origin(Origin::Kafka))?
    .with_dead_letter_topics(
        dead_letter_topics
            .iter()
            .map(|(t, _)| Arc::from(t.as_str()))
            .collect(),
    );
    if opts.is_none() {
        for (topic, option) in &dead_letter_topics {
            walcast_kafka::dead_letter::ensure_topic(&cfg.kafka, topic, option)
                .await
                .map_err(|e| e.or_origin(Origin::Kafka))?;
        }
        let state = state_stores(cfg)
            .await
            .map_err(|e| e.or_origin(Origin::Kafka))?;
        *opts = Some(connect_options(cfg, state)?);
    }
    let opts = opts
        .as_ref()
        .ok_or_else(|| Error::permanent("connection options missing"))?;
    let connected = walcast_postgres::connect(opts)
        .await
        .map_err(|e| e.or_origin(Origin::Postgres))?;
    *connections += 1;
    if *connections > 1 {
        shared.metrics.postgres_reconnects.increment(1);
    }
    let source = connected.source;
    tracing::info!(
        slot = %cfg.postgres.slot,
        publication = %cfg.postgres.publication,
        start_lsn = %connected.start_lsn,
        created_slot = connected.created_slot,
        server_version = connected.info.server_version_num,
        "streaming from the slot"
    );
    *shared.probe.lock().unwrap() = Some(sink.probe());
    // KafkaSink::connect read the cluster's metadata: it answers now.
    shared.kafka_reachable.store(true, Ordering::Release);
    shared.streaming.store(true, Ordering::Release);
    let _streaming = Streaming(shared);
    let filter = OutboxFilter::with_routes(&routes).with_partitions(connected.partitions.clone());
    let router = Router::with_routes(&routes, cfg.header_names());
    let mut pipeline = Pipeline::new(
        PipelineSettings {
            max_in_flight_events: cfg.pipeline.max_in_flight_events,
            max_in_flight_bytes: cfg.pipeline.max_in_flight_bytes,
            shutdown_timeout: Duration::from_millis(cfg.pipeline.shutdown_timeout_ms),
            stall_warning_after: Duration::from_millis(cfg.kafka.blocked_warning_ms),
            delivery_timeout: Duration::from_millis(cfg.kafka.delivery_timeout_ms),
        },
        filter,
        router,
        progress.clone(),
    )
    .with_failpoints(failpoints.clone())
    // The pipeline's policy, for the routes that inherit it.
    .with_dead_letter(match cfg.pipeline.on_permanent_error {
        PermanentErrorPolicy::DeadLetter => {
            cfg.pipeline.dead_letter_topic.as_deref().map(Arc::from)
        }
        PermanentErrorPolicy::Stop => None,
    })
    .with_known_rejections(known_rejections.to_vec())
    .with_observer(Box::new(
        RelayObserver::new(shared.metrics.clone()).with_traces(shared.traces.get()),
    ));
    // walcast's slot record is written ahead of every reported position by
    // the source itself (walcast_postgres: the write-ahead gate), also the
    // final one at shutdown: nothing to save here.
    let on_confirm = |_: Lsn| {};
    // A swapped outbox table never shows in the stream: watch the catalog
    // (and read the slot's facts, and write heartbeats) beside the pipeline.
    let every = |ms: u64| (ms > 0).then(|| Duration::from_millis(ms));
    let watch = walcast_postgres::watch_server(
        opts,
        connected.catalog.clone(),
        WatchSettings {
            catalog_every: every(cfg.postgres.catalog_check_interval_ms),
            heartbeat_every: every(cfg.postgres.heartbeat_interval_ms),
        },
        |report| shared.server_report(report),
    );
    let report_final = |_: Lsn| {};
    run_pipeline(
        &mut pipeline,
        source,
        sink,
        connected.start_lsn,
        stop,
        on_confirm,
        watch,
        report_final,
    )
    .await
}

/// Runs `pipeline` over `source` and `sink` from `start` beside `beside`
/// (the periodic server check: an error it resolves with ends the run like a
/// pipeline error), then closes them in the order the delivery rules need:
///
/// 1. the sink is aborted first, whatever the outcome: everything it still
///    holds is dropped, so nothing of this run can reach Kafka after the
///    next run started from the slot (rule 7), and nothing it held is
///    confirmed;
/// 2. when the run ended cleanly or stops walcast ([`Decision::Exit`]), the
///    final position, the one the ack tracker confirmed, is reported:
///    `report_final` gets it (the state record), then the source is shut
///    down, which sends it to the server before closing (rule 11);
/// 3. otherwise (a restart) the source is dropped without more: the server
///    keeps the last position reported and the next run resumes there.
///
/// `on_confirm` is called with each newly confirmed LSN (see [`Pipeline::run`]).
///
/// # Errors
/// The pipeline's error, or `beside`'s.
#[allow(clippy::too_many_arguments)]
pub async fn run_pipeline<S, K>(
    pipeline: &mut Pipeline,
    mut source: S,
    mut sink: K,
    start: Lsn,
    stop: watch::Receiver<bool>,
    on_confirm: impl FnMut(Lsn) + Send,
    beside: impl Future<Output = Error>,
    report_final: impl FnOnce(Lsn),
) -> Result<PipelineExit>
where
    S: ReplicationSource,
    K: EventSink,
{
    let result = {
        let run = pipeline.run(&mut source, &mut sink, start, stop, on_confirm);
        tokio::select! {
            r = run => r,
            e = beside => Err(e),
        }
    };
    sink.abort();
    let closing = match &result {
        Ok(_) => true,
        Err(e) => e.kind().decision() == Decision::Exit,
    };
    if closing {
        report_final(pipeline.progress().confirmed());
        if let Err(e) = source.shutdown().await {
            tracing::warn!("{e}");
        }
    } else {
        drop(source);
    }
    result
}
