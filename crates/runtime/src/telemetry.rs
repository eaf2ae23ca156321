//! walcast's metrics: the handles, registered once per relay (names in
//! `docs/metrics.md`), and the pipeline observer that feeds them.
//!
//! The hot path only touches handles that were registered up front (atomic
//! adds): per topic the observer keeps its handles in a map keyed by the
//! topic's `Arc<str>`. The pipeline's own counters ([`Progress`]) are copied
//! into gauges once a second and at every scrape ([`RelayMetrics::refresh`]).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{Counter, Gauge, Histogram, Recorder};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use walcast_core::ack::TxnTicket;
use walcast_core::dead_letter::Reason;
use walcast_core::pipeline::{PipelineObserver, Progress};
use walcast_core::route::OutboxEvent;
use walcast_core::{Error, ErrorKind, Lsn, Origin};

use crate::events;
use crate::traces::TxnSpans;

/// Buckets of `walcast_commit_to_ack_seconds`.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// The `topic` label of `walcast_dead_lettered_total` for an event without a valid topic.
pub(crate) const NO_TOPIC: &str = "(none)";

/// Microseconds from the Unix epoch to Postgres's (2000-01-01).
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// The `wal_status` values of `walcast_slot_wal_status`.
pub(crate) const WAL_STATUSES: [&str; 4] = ["reserved", "extended", "unreserved", "lost"];

/// Warning events counted in `walcast_warnings_total{event}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Warning {
    /// Events in flight with no delivery report for `kafka.blocked_warning_ms`.
    KafkaBlocked,
    /// The slot's lag is near `max_slot_wal_keep_size`.
    SlotLagNearLimit,
    /// The slot's `wal_status` became `unreserved`.
    SlotWalUnreserved,
    /// The slot's `wal_status` became `lost`.
    SlotWalLost,
}

impl Warning {
    const ALL: [Warning; 4] = [
        Warning::KafkaBlocked,
        Warning::SlotLagNearLimit,
        Warning::SlotWalUnreserved,
        Warning::SlotWalLost,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Warning::KafkaBlocked => "kafka_blocked",
            Warning::SlotLagNearLimit => "slot_lag_near_limit",
            Warning::SlotWalUnreserved => "slot_wal_unreserved",
            Warning::SlotWalLost => "slot_wal_lost",
        }
    }
}

/// The handles of one topic.
#[derive(Debug, Clone)]
struct TopicHandles {
    produced: Counter,
    bytes: Counter,
}

/// Where the metrics of a process's pipelines are recorded: one Prometheus
/// recorder when they are exported, a no-op one otherwise.
#[derive(Clone)]
pub struct MetricsRegistry {
    recorder: Arc<dyn Recorder + Send + Sync>,
    handle: Option<PrometheusHandle>,
}

impl std::fmt::Debug for MetricsRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsRegistry")
            .field("exported", &self.handle.is_some())
            .finish()
    }
}

impl MetricsRegistry {
    /// A registry rendered for Prometheus when `exported`; otherwise every
    /// handle registered in it is a no-op.
    pub fn new(exported: bool) -> Self {
        if exported {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("walcast_commit_to_ack_seconds".into()),
                    LATENCY_BUCKETS,
                )
                .expect("the latency buckets are not empty")
                .build_recorder();
            let handle = recorder.handle();
            MetricsRegistry {
                recorder: Arc::new(recorder),
                handle: Some(handle),
            }
        } else {
            MetricsRegistry {
                recorder: Arc::new(metrics::NoopRecorder),
                handle: None,
            }
        }
    }

    /// The Prometheus text of every pipeline; `None` when not exported.
    pub fn render(&self) -> Option<String> {
        self.handle.as_ref().map(PrometheusHandle::render)
    }

    /// Bounds the exporter's memory (call about once a second).
    pub fn upkeep(&self) {
        if let Some(h) = &self.handle {
            h.run_upkeep();
        }
    }
}

/// Every metric of one relay (one pipeline), registered at start.
pub struct RelayMetrics {
    pipeline: String,
    recorder: Arc<dyn Recorder + Send + Sync>,
    handle: Option<PrometheusHandle>,
    skipped_update: Counter,
    skipped_delete: Counter,
    skipped_truncate: Counter,
    skipped_message: Counter,
    in_flight_events: Gauge,
    in_flight_bytes: Gauge,
    lsn_server_wal_end: Gauge,
    lsn_received: Gauge,
    lsn_published: Gauge,
    lsn_confirmed: Gauge,
    lag: Gauge,
    latency: Histogram,
    last_ack_age: Gauge,
    restarts: [Counter; 4],
    pub(crate) postgres_reconnects: Counter,
    producer_queue: Gauge,
    producer_errors: [Counter; 3],
    wal_status: [Gauge; 4],
    kafka_blocked: Gauge,
    pub(crate) ready: Gauge,
    pub(crate) heartbeats: Counter,
    warnings: [Counter; 4],
}

impl std::fmt::Debug for RelayMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayMetrics")
            .field("pipeline", &self.pipeline)
            .field("exported", &self.handle.is_some())
            .finish_non_exhaustive()
    }
}

impl RelayMetrics {
    /// Metrics for the pipeline `pipeline` (the slot name); rendered for
    /// Prometheus when `exported`, otherwise every handle is a no-op.
    pub fn new(pipeline: &str, exported: bool) -> Self {
        Self::in_registry(pipeline, &MetricsRegistry::new(exported))
    }

    /// Metrics for the pipeline `pipeline` in `registry`, which the
    /// pipelines of one process share (one `/metrics` page, every series
    /// labelled with its pipeline).
    pub fn in_registry(pipeline: &str, registry: &MetricsRegistry) -> Self {
        let recorder = registry.recorder.clone();
        let handle = registry.handle.clone();
        let p = pipeline.to_string();
        let m = metrics::with_local_recorder(recorder.as_ref(), || {
            let skipped = |reason: &'static str| metrics::counter!("walcast_events_skipped_total", "pipeline" => p.clone(), "reason" => reason);
            let lsn = |position: &'static str| metrics::gauge!("walcast_lsn", "pipeline" => p.clone(), "position" => position);
            let restarts = |cause: &'static str| metrics::counter!("walcast_pipeline_restarts_total", "pipeline" => p.clone(), "cause" => cause);
            let errors = |kind: ErrorKind| metrics::counter!("walcast_producer_errors_total", "pipeline" => p.clone(), "kind" => kind.as_str());
            let status = |s: &'static str| metrics::gauge!("walcast_slot_wal_status", "pipeline" => p.clone(), "status" => s);
            let warning = |w: Warning| metrics::counter!("walcast_warnings_total", "pipeline" => p.clone(), "event" => w.as_str());
            RelayMetrics {
                pipeline: p.clone(),
                skipped_update: skipped("update"),
                skipped_delete: skipped("delete"),
                skipped_truncate: skipped("truncate"),
                skipped_message: skipped("logical_message"),
                in_flight_events: metrics::gauge!("walcast_in_flight_events", "pipeline" => p.clone()),
                in_flight_bytes: metrics::gauge!("walcast_in_flight_bytes", "pipeline" => p.clone()),
                lsn_server_wal_end: lsn("server_wal_end"),
                lsn_received: lsn("received"),
                lsn_published: lsn("published"),
                lsn_confirmed: lsn("confirmed"),
                lag: metrics::gauge!("walcast_replication_lag_bytes", "pipeline" => p.clone()),
                latency: metrics::histogram!("walcast_commit_to_ack_seconds", "pipeline" => p.clone()),
                last_ack_age: metrics::gauge!("walcast_last_ack_age_seconds", "pipeline" => p.clone()),
                restarts: [
                    restarts("kafka"),
                    restarts("postgres"),
                    restarts("delivery_timeout"),
                    restarts("other"),
                ],
                postgres_reconnects: metrics::counter!("walcast_postgres_reconnects_total", "pipeline" => p.clone()),
                producer_queue: metrics::gauge!("walcast_producer_queue_messages", "pipeline" => p.clone()),
                producer_errors: [
                    errors(ErrorKind::Retryable),
                    errors(ErrorKind::Permanent),
                    errors(ErrorKind::OperatorAction),
                ],
                wal_status: WAL_STATUSES.map(status),
                kafka_blocked: metrics::gauge!("walcast_kafka_blocked_seconds", "pipeline" => p.clone()),
                ready: metrics::gauge!("walcast_ready", "pipeline" => p.clone()),
                heartbeats: metrics::counter!("walcast_heartbeats_total", "pipeline" => p.clone()),
                warnings: Warning::ALL.map(warning),
                recorder: Arc::new(metrics::NoopRecorder),
                handle: None,
            }
        });
        m.with_recorder(recorder, handle)
    }

    fn with_recorder(
        mut self,
        recorder: Arc<dyn Recorder + Send + Sync>,
        handle: Option<PrometheusHandle>,
    ) -> Self {
        self.recorder = recorder;
        self.handle = handle;
        self
    }

    /// The pipeline label.
    pub fn pipeline(&self) -> &str {
        &self.pipeline
    }

    fn topic(&self, topic: &str) -> TopicHandles {
        let p = self.pipeline.clone();
        let t = topic.to_string();
        metrics::with_local_recorder(self.recorder.as_ref(), || {
            // Registered (at 0) for every reason with the topic, so an alert
            // on its increase sees the first dead letter.
            for reason in Reason::ALL {
                let _ = metrics::counter!("walcast_dead_lettered_total", "pipeline" => p.clone(), "topic" => t.clone(), "reason" => reason.as_str());
            }
            TopicHandles {
                produced: metrics::counter!("walcast_events_produced_total", "pipeline" => p.clone(), "topic" => t.clone()),
                bytes: metrics::counter!("walcast_bytes_produced_total", "pipeline" => p, "topic" => t),
            }
        })
    }

    /// Counts one dead-lettered event of `topic` (`None`: it had no valid
    /// topic, counted as `(none)`).
    pub(crate) fn dead_lettered(&self, topic: Option<&str>, reason: Reason) {
        let p = self.pipeline.clone();
        let t = topic.unwrap_or(NO_TOPIC).to_string();
        metrics::with_local_recorder(self.recorder.as_ref(), || {
            metrics::counter!("walcast_dead_lettered_total", "pipeline" => p, "topic" => t, "reason" => reason.as_str())
                .increment(1)
        });
    }

    /// Sets `walcast_slot_safe_wal_size_bytes` (registered on first use, so
    /// the series is absent while the slot's WAL is unlimited).
    pub(crate) fn set_safe_wal_size(&self, bytes: i64) {
        let p = self.pipeline.clone();
        metrics::with_local_recorder(self.recorder.as_ref(), || {
            metrics::gauge!("walcast_slot_safe_wal_size_bytes", "pipeline" => p).set(bytes as f64)
        });
    }

    /// Sets `walcast_slot_wal_status` (1 for `status`, 0 for the others).
    pub(crate) fn set_wal_status(&self, status: Option<&str>) {
        for (name, g) in WAL_STATUSES.iter().zip(&self.wal_status) {
            g.set(if Some(*name) == status { 1.0 } else { 0.0 });
        }
    }

    /// Counts a restart of the pipeline from the slot.
    pub(crate) fn restart(&self, origin: Option<Origin>) {
        let i = match origin {
            Some(Origin::Kafka) => 0,
            Some(Origin::Postgres) => 1,
            Some(Origin::DeliveryTimeout) => 2,
            _ => 3,
        };
        self.restarts[i].increment(1);
    }

    pub(crate) fn warning(&self, w: Warning) {
        let i = Warning::ALL.iter().position(|x| *x == w).unwrap_or(0);
        self.warnings[i].increment(1);
    }

    /// Copies the pipeline's counters into the gauges.
    pub fn refresh(&self, progress: &Progress) {
        let r = Ordering::Relaxed;
        self.skipped_update
            .absolute(progress.updates_skipped.load(r));
        self.skipped_delete
            .absolute(progress.deletes_skipped.load(r));
        self.skipped_truncate
            .absolute(progress.truncates_skipped.load(r));
        self.skipped_message
            .absolute(progress.messages_ignored.load(r));
        self.in_flight_events
            .set(progress.in_flight_events.load(r) as f64);
        self.in_flight_bytes
            .set(progress.in_flight_bytes.load(r) as f64);
        let ladder = progress.ladder();
        let n = |l: Lsn| u64::from(l) as f64;
        self.lsn_confirmed.set(n(ladder.confirmed));
        self.lsn_published.set(n(ladder.published));
        self.lsn_received.set(n(ladder.received));
        self.lsn_server_wal_end.set(n(ladder.server_wal_end));
        self.lag.set(
            u64::from(ladder.server_wal_end).saturating_sub(u64::from(ladder.confirmed)) as f64,
        );
        self.last_ack_age.set(progress.last_ack_age().as_secs_f64());
        self.kafka_blocked.set(progress.blocked_for().as_secs_f64());
        self.producer_queue.set(progress.sink_queue.load(r) as f64);
    }

    /// Bounds the exporter's memory between scrapes (drains histogram samples).
    pub fn upkeep(&self) {
        if let Some(h) = &self.handle {
            h.run_upkeep();
        }
    }

    /// The Prometheus text; `None` when metrics are not exported.
    pub fn render(&self) -> Option<String> {
        self.handle.as_ref().map(PrometheusHandle::render)
    }
}

/// Feeds one pipeline run's happenings into the metrics.
#[derive(Debug)]
pub struct RelayObserver {
    metrics: Arc<RelayMetrics>,
    topics: HashMap<Arc<str>, TopicHandles>,
    /// The open transaction spans, when traces are on.
    spans: Option<TxnSpans>,
}

impl RelayObserver {
    /// An observer with an empty topic cache.
    pub fn new(metrics: Arc<RelayMetrics>) -> Self {
        RelayObserver {
            metrics,
            topics: HashMap::new(),
            spans: None,
        }
    }

    /// Emits a span per relayed transaction through `traces` (`None`: off).
    pub fn with_traces(mut self, traces: Option<&Arc<crate::traces::Traces>>) -> Self {
        self.spans = traces.map(|t| t.transactions());
        self
    }
}

/// Seconds from a Postgres commit timestamp to now (0 when the clocks disagree).
fn seconds_since_commit(commit_time_micros: i64) -> f64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    let age = now - commit_time_micros.saturating_add(PG_EPOCH_UNIX_MICROS);
    age.max(0) as f64 / 1e6
}

impl PipelineObserver for RelayObserver {
    fn delivered(&mut self, txn: TxnTicket, topic: &Arc<str>, bytes: u64, commit_time_micros: i64) {
        if let Some(spans) = &mut self.spans {
            spans.delivered(txn);
        }
        let handles = match self.topics.get(topic) {
            Some(h) => h,
            None => {
                let h = self.metrics.topic(topic);
                self.topics.entry(topic.clone()).or_insert(h)
            }
        };
        handles.produced.increment(1);
        // The in-flight size counts the topic name too; the metric does not.
        handles
            .bytes
            .increment(bytes.saturating_sub(topic.len() as u64));
        self.metrics
            .latency
            .record(seconds_since_commit(commit_time_micros));
    }

    fn transaction_begin(
        &mut self,
        txn: TxnTicket,
        xid: u32,
        commit_lsn: Lsn,
        commit_time_micros: i64,
    ) {
        if let Some(spans) = &mut self.spans {
            spans.begin(txn, xid, commit_lsn, commit_time_micros);
        }
    }

    fn event_sent(&mut self, txn: TxnTicket, event: &OutboxEvent) {
        if let Some(spans) = &mut self.spans {
            spans.event_sent(txn, event);
        }
    }

    fn transaction_commit(&mut self, txn: TxnTicket, end_lsn: Lsn) {
        if let Some(spans) = &mut self.spans {
            spans.commit(txn, end_lsn);
        }
    }

    fn delivery_failed(&mut self, error: &Error) {
        if let Some(spans) = &mut self.spans {
            spans.fail_all(&format!("not acknowledged: {error}"));
        }
        let i = match error.kind() {
            ErrorKind::Retryable => 0,
            ErrorKind::Permanent => 1,
            _ => 2,
        };
        self.metrics.producer_errors[i].increment(1);
    }

    fn dead_lettered(&mut self, reason: Reason, original_topic: Option<&Arc<str>>) {
        self.metrics
            .dead_lettered(original_topic.map(|t| &**t), reason);
    }

    fn kafka_blocked(&mut self, blocked_for: Duration, in_flight_events: u64, confirmed: Lsn) {
        events::kafka_blocked(&self.metrics, blocked_for, in_flight_events, confirmed);
    }

    fn kafka_flowing(&mut self, blocked_for: Duration) {
        events::kafka_flowing(blocked_for);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels_render() {
        let m = Arc::new(RelayMetrics::new("slot_a", true));
        let mut o = RelayObserver::new(m.clone());
        let topic: Arc<str> = Arc::from("t.A");
        // Committed "now" in Postgres time: a small latency.
        let now_pg = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros() as i64
            - PG_EPOCH_UNIX_MICROS;
        let txn = walcast_core::ack::AckTracker::new(Lsn::from(0))
            .begin()
            .unwrap();
        o.delivered(txn, &topic, 103, now_pg);
        o.delivered(txn, &topic, 103, now_pg);
        o.dead_lettered(Reason::NullKey, None);
        o.dead_lettered(Reason::TooLarge, Some(&topic));
        let progress = Progress::default();
        m.refresh(&progress);
        let text = m.render().unwrap();
        for needle in [
            "walcast_events_produced_total{pipeline=\"slot_a\",topic=\"t.A\"} 2",
            "walcast_bytes_produced_total{pipeline=\"slot_a\",topic=\"t.A\"} 200",
            "walcast_commit_to_ack_seconds_count{pipeline=\"slot_a\"} 2",
            "walcast_commit_to_ack_seconds_bucket{pipeline=\"slot_a\",le=\"0.5\"} 2",
            "walcast_lsn{pipeline=\"slot_a\",position=\"confirmed\"} 0",
            "walcast_events_skipped_total{pipeline=\"slot_a\",reason=\"update\"} 0",
            "walcast_pipeline_restarts_total{pipeline=\"slot_a\",cause=\"kafka\"} 0",
            "walcast_slot_wal_status{pipeline=\"slot_a\",status=\"reserved\"} 0",
            "walcast_dead_lettered_total{pipeline=\"slot_a\",topic=\"t.A\",reason=\"null_key\"} 0",
            "walcast_dead_lettered_total{pipeline=\"slot_a\",topic=\"t.A\",reason=\"too_large\"} 1",
            "walcast_dead_lettered_total{pipeline=\"slot_a\",topic=\"(none)\",reason=\"null_key\"} 1",
            "walcast_warnings_total{pipeline=\"slot_a\",event=\"kafka_blocked\"} 0",
        ] {
            assert!(text.contains(needle), "{needle} missing in:\n{text}");
        }
        assert!(
            !text.contains("walcast_slot_safe_wal_size_bytes"),
            "absent until known"
        );
        // Off: nothing is rendered and every handle is a no-op.
        assert!(RelayMetrics::new("slot_a", false).render().is_none());
    }

    #[test]
    fn commit_latency_is_never_negative() {
        assert_eq!(seconds_since_commit(i64::MAX / 2), 0.0);
        assert!(seconds_since_commit(0) > 20.0 * 365.0 * 86400.0);
    }
}
