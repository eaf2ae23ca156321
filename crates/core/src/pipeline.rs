//! The relay loop: read the slot, route outbox INSERTs, hand them to the sink,
//! confirm the LSN only when the ack tracker says so.
//!
//! Rules kept here (see `docs/delivery-rules.md`):
//! - deliveries are handled before new input (`biased` select), so the flush
//!   LSN moves as soon as it may;
//! - in-flight events are bounded by count and bytes; when full, the loop stops
//!   reading the stream (the source keeps status updates flowing). An event
//!   that does not fit waits, already read, until deliveries free room: the
//!   bytes in flight never exceed the bound (one event alone may fill it);
//! - any delivery failure ends the loop with an error at once: nothing
//!   produced after the failed event is awaited or confirmed (rule 7), the
//!   caller discards the sink (dropping its queue) and restarts from the slot.
//!   Nothing is skipped or retried alone;
//! - an input that can never be published, found before it was handed to the
//!   sink (an unroutable row, a record over the size limit), stops the loop
//!   AT that input: the events read before it are awaited and confirmed first;
//! - on shutdown the loop stops reading, waits for outstanding deliveries up to
//!   a timeout, and confirms what was delivered.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use walcast_pgoutput::Lsn;

use crate::ack::{AckTracker, TxnTicket};
use crate::dead_letter::{self, Reason};
use crate::error::{Decision, Error, Origin, Result};
use crate::failpoint::{Failpoints, Point};
use crate::outbox::{OutboxFilter, Row, SkipReason};
use crate::route::{OpBehavior, OutboxEvent, Router};
use crate::sink::{DeliveryToken, EventSink, TokenRing};
use crate::source::{ReplicationSource, SourceEvent};

/// Flow-control and shutdown settings.
#[derive(Debug, Clone)]
pub struct PipelineSettings {
    /// At most this many undelivered events, and at most this many
    /// transactions waiting for acknowledgement in the ack tracker.
    pub max_in_flight_events: u64,
    /// At most this many undelivered bytes.
    pub max_in_flight_bytes: u64,
    /// How long shutdown waits for outstanding deliveries.
    pub shutdown_timeout: Duration,
    /// Warn when events are in flight and nothing was delivered for this long.
    pub stall_warning_after: Duration,
    /// Fail (retryable: the caller restarts from the slot) when events are in
    /// flight and nothing was delivered for this long (`kafka.delivery_timeout_ms`).
    /// The sink itself must never time an event out: see `walcast-kafka`.
    pub delivery_timeout: Duration,
}

/// Counters shared with observers (logs, metrics, health, tests). Updated
/// with cheap atomics by the loop; read them for reporting only.
#[derive(Debug)]
pub struct Progress {
    /// Last LSN confirmed to the source.
    pub confirmed_lsn: AtomicU64,
    /// Events handed to the sink.
    pub events_sent: AtomicU64,
    /// Events the sink reported durable.
    pub events_delivered: AtomicU64,
    /// Transactions whose Commit was read.
    pub transactions: AtomicU64,
    /// Row changes on outbox tables that are not inserts (skipped, still acknowledged).
    pub changes_skipped: AtomicU64,
    /// Transactional logical decoding messages read and not relayed (walcast
    /// does not turn them into events yet; each prefix is logged once).
    pub messages_ignored: AtomicU64,
    /// Events currently in flight.
    pub in_flight_events: AtomicU64,
    /// Bytes currently in flight.
    pub in_flight_bytes: AtomicU64,
    /// UPDATEs of outbox tables read (skipped; counted in `changes_skipped` too).
    pub updates_skipped: AtomicU64,
    /// DELETEs of outbox tables read (skipped; counted in `changes_skipped` too).
    pub deletes_skipped: AtomicU64,
    /// TRUNCATEs of outbox tables read (skipped; counted in `changes_skipped` too).
    pub truncates_skipped: AtomicU64,
    /// The server's WAL end as last reported (keepalives), at least `received_lsn`.
    pub server_wal_end: AtomicU64,
    /// The highest LSN read from the stream (a row change, message or Commit).
    pub received_lsn: AtomicU64,
    /// The commit end LSN of the newest transaction whose events were all
    /// handed to the sink (at least the confirmed LSN).
    pub published_lsn: AtomicU64,
    /// The sink's own queue depth (Kafka: librdkafka's queue), sampled each second.
    pub sink_queue: AtomicU64,
    /// Milliseconds after `epoch` (+1) of the last delivery report; 0: none yet.
    last_delivery_ms: AtomicU64,
    /// Milliseconds after `epoch` (+1) since which events are in flight and
    /// nothing was delivered; 0 when nothing is in flight.
    waiting_since_ms: AtomicU64,
    epoch: Instant,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            confirmed_lsn: AtomicU64::new(0),
            events_sent: AtomicU64::new(0),
            events_delivered: AtomicU64::new(0),
            transactions: AtomicU64::new(0),
            changes_skipped: AtomicU64::new(0),
            messages_ignored: AtomicU64::new(0),
            in_flight_events: AtomicU64::new(0),
            in_flight_bytes: AtomicU64::new(0),
            updates_skipped: AtomicU64::new(0),
            deletes_skipped: AtomicU64::new(0),
            truncates_skipped: AtomicU64::new(0),
            server_wal_end: AtomicU64::new(0),
            received_lsn: AtomicU64::new(0),
            published_lsn: AtomicU64::new(0),
            sink_queue: AtomicU64::new(0),
            last_delivery_ms: AtomicU64::new(0),
            waiting_since_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

/// The LSN ladder at one moment: `confirmed <= published <= received <= server_wal_end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LsnLadder {
    /// The server's WAL end (keepalives), at least `received`.
    pub server_wal_end: Lsn,
    /// The highest LSN read from the stream.
    pub received: Lsn,
    /// The commit end LSN of the newest transaction handed to the sink whole.
    pub published: Lsn,
    /// The flush LSN reported to the server.
    pub confirmed: Lsn,
}

impl Progress {
    /// The last confirmed LSN.
    pub fn confirmed(&self) -> Lsn {
        Lsn::from(self.confirmed_lsn.load(Ordering::Acquire))
    }

    /// The LSN ladder. The loop raises the upper rungs before the lower ones
    /// and this reads them bottom up, so the ladder read is always ordered.
    pub fn ladder(&self) -> LsnLadder {
        let confirmed = self.confirmed_lsn.load(Ordering::Acquire);
        let published = self.published_lsn.load(Ordering::Acquire);
        let received = self.received_lsn.load(Ordering::Acquire);
        let server_wal_end = self.server_wal_end.load(Ordering::Acquire);
        LsnLadder {
            server_wal_end: Lsn::from(server_wal_end),
            received: Lsn::from(received),
            published: Lsn::from(published),
            confirmed: Lsn::from(confirmed),
        }
    }

    /// How long events have been in flight with no delivery report (zero
    /// when nothing is in flight): the clock of the stall warning, the
    /// delivery timeout and readiness.
    pub fn blocked_for(&self) -> Duration {
        self.since(self.waiting_since_ms.load(Ordering::Relaxed))
    }

    /// Time since the last delivery report while events are in flight (zero
    /// when nothing is in flight). Unlike [`Progress::blocked_for`] it counts
    /// from the previous report even when that predates the oldest event.
    pub fn last_ack_age(&self) -> Duration {
        if self.waiting_since_ms.load(Ordering::Relaxed) == 0 {
            return Duration::ZERO;
        }
        match self.last_delivery_ms.load(Ordering::Relaxed) {
            0 => self.blocked_for(),
            t => self.since(t),
        }
    }

    fn since(&self, stamp: u64) -> Duration {
        match stamp {
            0 => Duration::ZERO,
            t => self
                .epoch
                .elapsed()
                .saturating_sub(Duration::from_millis(t - 1)),
        }
    }

    fn stamp(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64 + 1
    }

    /// Raises the ladder for an LSN read from the stream (top rungs first).
    fn received(&self, lsn: Lsn) {
        let v = u64::from(lsn);
        self.server_wal_end.fetch_max(v, Ordering::AcqRel);
        self.received_lsn.fetch_max(v, Ordering::AcqRel);
    }

    /// Raises the ladder up to `lsn` as published (and so received).
    fn published(&self, lsn: Lsn) {
        self.received(lsn);
        self.published_lsn
            .fetch_max(u64::from(lsn), Ordering::AcqRel);
    }

    /// Stores the confirmed LSN after raising the rungs above it.
    fn confirmed_at(&self, lsn: Lsn) {
        self.published(lsn);
        self.confirmed_lsn.store(u64::from(lsn), Ordering::Release);
    }
}

/// Hooks the loop calls at operator-visible happenings, for metrics and
/// logs. Called on the loop's task: keep them cheap (no I/O, no locks held
/// for long). Every method has a default: the default observer only logs.
pub trait PipelineObserver: Send {
    /// Kafka acknowledged one event of `topic` (`bytes`: key + value +
    /// headers + topic name) of the transaction `txn`, committed at
    /// `commit_time_micros` (microseconds since 2000-01-01).
    fn delivered(&mut self, txn: TxnTicket, topic: &Arc<str>, bytes: u64, commit_time_micros: i64) {
        let _ = (txn, topic, bytes, commit_time_micros);
    }

    /// A transaction's Begin was read: `txn` names it in the calls that
    /// follow; `commit_lsn` is its commit record's LSN.
    fn transaction_begin(
        &mut self,
        txn: TxnTicket,
        xid: u32,
        commit_lsn: Lsn,
        commit_time_micros: i64,
    ) {
        let _ = (txn, xid, commit_lsn, commit_time_micros);
    }

    /// An event of `txn` is about to be handed to the sink.
    fn event_sent(&mut self, txn: TxnTicket, event: &OutboxEvent) {
        let _ = (txn, event);
    }

    /// The Commit of `txn` was read: every event of it was handed to the
    /// sink before (none, when it had none); `end_lsn` is the position
    /// confirmed once they are all delivered.
    fn transaction_commit(&mut self, txn: TxnTicket, end_lsn: Lsn) {
        let _ = (txn, end_lsn);
    }

    /// A delivery failed, or the sink refused an event before producing it.
    fn delivery_failed(&mut self, error: &Error) {
        let _ = error;
    }

    /// Kafka acknowledged the dead-letter record of an event that could not
    /// be published for `reason`; `original_topic` is the topic it was
    /// routed to (`None`: the row has no valid topic). Called after
    /// [`PipelineObserver::delivered`] for the dead-letter topic.
    fn dead_lettered(&mut self, reason: Reason, original_topic: Option<&Arc<str>>) {
        let _ = (reason, original_topic);
    }

    /// Events have been in flight without a delivery report for
    /// `blocked_for` (at least the stall warning threshold); called once per stall.
    fn kafka_blocked(&mut self, blocked_for: Duration, in_flight_events: u64, confirmed: Lsn) {
        tracing::warn!(
            in_flight_events,
            confirmed_lsn = %confirmed,
            stalled_secs = blocked_for.as_secs(),
            "Kafka has acknowledged nothing for {}s; the slot is held at {confirmed} and nothing is skipped. Check the brokers and kafka.bootstrap_servers",
            blocked_for.as_secs()
        );
    }

    /// Deliveries resumed after [`PipelineObserver::kafka_blocked`].
    fn kafka_flowing(&mut self, blocked_for: Duration) {
        tracing::info!(
            stalled_secs = blocked_for.as_secs(),
            "Kafka acknowledges events again after {}s",
            blocked_for.as_secs()
        );
    }
}

/// The observer that only logs.
#[derive(Debug, Default)]
pub struct LogObserver;

impl PipelineObserver for LogObserver {}

/// Why the loop ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipelineExit {
    /// Shutdown was requested; outstanding deliveries were awaited (or timed out).
    Shutdown {
        /// The final confirmed LSN.
        confirmed: Lsn,
        /// Events still undelivered when the timeout ran out (left for the next run).
        abandoned_events: u64,
    },
    /// The server ended the stream.
    SourceEnded {
        /// The final confirmed LSN.
        confirmed: Lsn,
    },
}

/// A running relay over one source and one sink.
#[derive(Debug)]
pub struct Pipeline {
    settings: PipelineSettings,
    filter: OutboxFilter,
    router: Router,
    progress: Arc<Progress>,
    failpoints: Option<Arc<Failpoints>>,
    observer: Box<dyn PipelineObserver>,
    /// `pipeline.dead_letter_topic` under the dead-letter policy: for the
    /// routes that inherit the pipeline's policy.
    dead_letter: Option<Arc<str>>,
    /// Events Kafka refused for good in an earlier run (dead-letter policy).
    known_rejections: Vec<dead_letter::KnownRejection>,
}

impl std::fmt::Debug for dyn PipelineObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PipelineObserver")
    }
}

impl Pipeline {
    /// A pipeline; `filter` decides which rows are events, `router` makes records.
    pub fn new(
        settings: PipelineSettings,
        filter: OutboxFilter,
        router: Router,
        progress: Arc<Progress>,
    ) -> Self {
        Pipeline {
            settings,
            filter,
            router,
            progress,
            failpoints: None,
            observer: Box::new(LogObserver),
            dead_letter: None,
            known_rejections: Vec::new(),
        }
    }

    /// The counters this pipeline updates.
    pub fn progress(&self) -> &Arc<Progress> {
        &self.progress
    }

    /// Replaces the observer (the default only logs).
    pub fn with_observer(mut self, observer: Box<dyn PipelineObserver>) -> Self {
        self.observer = observer;
        self
    }

    /// Turns on the dead-letter policy (`pipeline.on_permanent_error =
    /// "dead-letter"`) for the routes that inherit the pipeline's policy
    /// ([`crate::route::OnPermanentError::Inherit`]; a route's own policy
    /// wins): an event that can never be published (its error carries a
    /// [`dead_letter::Rejected`]) is replaced by its dead-letter record for
    /// `topic`, which takes the event's place in the ack tracker. Nothing
    /// more is read from the stream until that record is acknowledged, so no
    /// later event reaches Kafka before it. `None`: stop.
    pub fn with_dead_letter(mut self, topic: Option<Arc<str>>) -> Self {
        self.dead_letter = topic;
        self
    }

    /// Events a broker refused for good in an earlier run (under the
    /// dead-letter policy): when the stream brings one of them again, its
    /// dead-letter record is sent instead of producing it (a broker refusal
    /// stops the gapless producer, so it cannot be dead-lettered in the run
    /// that saw it). Entries the slot has passed are ignored.
    pub fn with_known_rejections(mut self, known: Vec<dead_letter::KnownRejection>) -> Self {
        self.known_rejections = known;
        self
    }

    /// Arms crash points for the reliability suite (see [`crate::failpoint`]).
    /// `None` (the default) costs one branch per delivery and confirmation.
    pub fn with_failpoints(mut self, failpoints: Option<Arc<Failpoints>>) -> Self {
        self.failpoints = failpoints;
        self
    }

    /// Runs until shutdown is signalled (`shutdown` becomes `true`), the source
    /// ends, or an error. `start` is the slot's confirmed flush LSN. `on_confirm`
    /// is called with each newly confirmed LSN after the source was told.
    ///
    /// # Errors
    /// Any source, decode, routing or delivery error. The caller must then
    /// [`EventSink::abort`] the sink and drop the source before restarting.
    /// An error that stops walcast ([`Decision::Exit`]: an event that can
    /// never be published, a dropped outbox column) and that was found before
    /// the event reached the sink is returned only after the deliveries of the
    /// events read before it were awaited (up to `shutdown_timeout`) and
    /// confirmed; shut the source down then, so that confirmation reaches the
    /// server. A failed delivery is returned at once, whatever its kind: the
    /// events sent after the failed one may belong to its partition and must
    /// not reach Kafka ahead of it, so none of them is awaited.
    pub async fn run<S, K>(
        &mut self,
        source: &mut S,
        sink: &mut K,
        start: Lsn,
        mut shutdown: watch::Receiver<bool>,
        mut on_confirm: impl FnMut(Lsn) + Send,
    ) -> Result<PipelineExit>
    where
        S: ReplicationSource,
        K: EventSink,
    {
        let mut tracker = AckTracker::new(start);
        let mut confirmed = start;
        let mut outstanding = Outstanding::default();
        let mut outcomes: Vec<(DeliveryToken, Result<()>)> = Vec::new();
        // The open transaction: its ticket, commit LSN and commit time.
        let mut open: Option<(TxnTicket, Lsn, i64)> = None;
        // The open transaction's id (for table-less outbox envelopes).
        let mut open_xid: u32 = 0;
        let mut bytes_in_flight: u64 = 0;
        // An event read but not yet handed to the sink because the byte bound
        // was full; nothing more is read until it went out.
        let mut waiting: Option<(TxnTicket, i64, Outgoing)> = None;
        // Dead-letter records handed to the sink and not yet acknowledged:
        // nothing more is read while there is one (rule 8).
        let mut dead_letters_in_flight: u64 = 0;
        let dead_letter_topic = self.dead_letter.clone();
        self.known_rejections
            .retain(|k| k.rejected.source_lsn >= start);
        let mut dead_letter_topics = self.router.dead_letter_topics();
        dead_letter_topics.extend(dead_letter_topic.clone());
        for dlq in &dead_letter_topics {
            // Learn each dead-letter topic's limit now, so a dead-letter
            // record can be handed over at once when an event is refused.
            sink.prepare(&dead_letter::probe(dlq))
                .await
                .map_err(|e| e.or_origin(Origin::Kafka))?;
        }
        let mut warned_prefixes = std::collections::HashSet::new();
        let mut last_delivery = Instant::now();
        let mut stall_warned = None::<Duration>;
        // Set when the loop ends because a delivery failed (as opposed to an
        // input found bad before it was sent): then nothing is drained.
        let mut delivery_failed = false;
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.progress.confirmed_at(start);
        self.progress.waiting_since_ms.store(0, Ordering::Relaxed);

        // The loop runs in a block so that an error ends the block, not the
        // function: a non-retryable error first drains (below).
        let result: Result<Option<PipelineExit>> = async {
            Ok(loop {
                // The tracker's queue counts too: transactions whose events
                // were delivered behind a stuck one wait there (empty ones are
                // merged, so only transactions that had events count).
                let has_room = waiting.is_none()
                    && dead_letters_in_flight == 0
                    && tracker.in_flight_events() < self.settings.max_in_flight_events
                    && (tracker.pending_transactions() as u64) <= self.settings.max_in_flight_events
                    // The ring of outstanding tokens spans delivered events
                    // behind an undelivered one too: bounded as well.
                    && outstanding.span() < self.settings.max_in_flight_events.saturating_mul(OUTSTANDING_SPAN_FACTOR)
                    && bytes_in_flight < self.settings.max_in_flight_bytes;
                tokio::select! {
                    biased;
                    _ = sink.delivered(&mut outcomes), if !outstanding.is_empty() => {
                        // Popped one by one: when the loop ends early (an
                        // input that stops walcast), the outcomes not handled
                        // stay for the drain below.
                        outcomes.reverse();
                        while let Some((token, result)) = outcomes.pop() {
                            let Sent { ticket, size, topic, commit_time, dead_letter, dead_letter_topic: dlq } = outstanding.take(token).ok_or_else(|| unknown_token(token))?;
                            if let Err(e) = result {
                                delivery_failed = true;
                                let e = match &dead_letter {
                                    Some(dl) => dl.failed(e),
                                    // Its route stops at such an event: nothing
                                    // to dead-letter after a restart either.
                                    None if dlq.is_none() => e.without_rejected(),
                                    None => e,
                                };
                                self.observer.delivery_failed(&e);
                                return Err(e.or_origin(Origin::Kafka));
                            }
                            tracker.delivered(ticket).map_err(protocol_error)?;
                            if let Some(dl) = &dead_letter {
                                dead_letters_in_flight -= 1;
                                self.observer.dead_lettered(dl.reason, dl.original_topic.as_ref());
                            }
                            bytes_in_flight -= size;
                            if stall_warned.take().is_some() {
                                self.observer.kafka_flowing(last_delivery.elapsed());
                            }
                            last_delivery = Instant::now();
                            self.progress
                                .last_delivery_ms
                                .store(self.progress.stamp(last_delivery), Ordering::Relaxed);
                            self.progress.events_delivered.fetch_add(1, Ordering::Relaxed);
                            self.observer.delivered(ticket, &topic, size, commit_time);
                            if let Some(fp) = &self.failpoints {
                                if fp.hit(Point::AfterDelivery) {
                                    Failpoints::fire(Point::AfterDelivery);
                                }
                            }
                            if waiting.as_ref().is_some_and(|(_, _, o)| {
                                fits(bytes_in_flight, o.event.size_bytes(), self.settings.max_in_flight_bytes)
                            }) {
                                if let Some((ticket, commit_time, outgoing)) = waiting.take() {
                                    self.observer.event_sent(ticket, &outgoing.event);
                                    let (size, dead) = hand_over(sink, &mut tracker, &mut outstanding, ticket, commit_time, outgoing)
                                        .inspect_err(|e| self.observer.delivery_failed(e))?;
                                    bytes_in_flight += size;
                                    dead_letters_in_flight += u64::from(dead);
                                    self.progress.events_sent.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    }
                    changed = shutdown.changed() => {
                        if changed.is_err() || *shutdown.borrow() {
                            break None;
                        }
                    }
                    event = source.recv(), if has_room => {
                        let Some(event) = event.map_err(|e| e.or_origin(Origin::Postgres))? else {
                            break Some(PipelineExit::SourceEnded { confirmed });
                        };
                        // An event read from the stream (an outbox INSERT or a
                        // routed transactional message), handed on below in
                        // stream order.
                        // With the dead-letter topic of its route (`None`: stop).
                        let mut routed: Option<(Result<OutboxEvent>, Option<Arc<str>>)> = None;
                        match event {
                            SourceEvent::Begin { final_lsn, commit_time_micros, xid } => {
                                let ticket = tracker.begin().map_err(protocol_error)?;
                                self.observer.transaction_begin(ticket, xid, final_lsn, commit_time_micros);
                                open = Some((ticket, final_lsn, commit_time_micros));
                                open_xid = xid;
                            }
                            SourceEvent::Data { data, wal_start } => {
                                self.progress.received(wal_start);
                                match self.filter.decode(&data)? {
                                    Row::OutboxInsert { table, row } => {
                                        let (_, commit_lsn, commit_time) = open.ok_or_else(|| {
                                            protocol_error("an INSERT arrived outside a transaction")
                                        })?;
                                        let policy = self.router.row_policy(row.route).topic(dead_letter_topic.as_ref());
                                        routed = Some((self.router.route(&table, commit_lsn, commit_time, row), policy));
                                    }
                                    Row::Skipped { reason, table, behavior } => {
                                        if behavior == OpBehavior::Stop {
                                            // The route says an UPDATE/DELETE of this
                                            // outbox table must not pass: stop AT it.
                                            return Err(Error::permanent(format!(
                                                "{} on outbox table {table} at LSN {wal_start}: its route does not allow it (table_op_{}_behavior = \"stop\")",
                                                reason.as_sql(),
                                                if reason == SkipReason::Update { "invalid" } else { "delete" },
                                            ))
                                            .with_hint("outbox rows are INSERT-only events; find the writer that changed the row. walcast stopped before the slot passed this change: set the behaviour to \"warn\" or \"ignore\" to let it pass, then restart"));
                                        }
                                        if behavior == OpBehavior::Warn {
                                            tracing::warn!(
                                                table = %table,
                                                lsn = %wal_start,
                                                "{} on outbox table {table} at LSN {wal_start} skipped: outbox rows are INSERT-only events (set the route's table_op_{}_behavior to \"ignore\" to skip such changes silently, or \"stop\")",
                                                reason.as_sql(),
                                                if reason == SkipReason::Update { "invalid" } else { "delete" },
                                            );
                                        }
                                        self.progress.changes_skipped.fetch_add(1, Ordering::Relaxed);
                                        match reason {
                                            SkipReason::Update => &self.progress.updates_skipped,
                                            SkipReason::Delete => &self.progress.deletes_skipped,
                                            SkipReason::Truncate => &self.progress.truncates_skipped,
                                        }
                                        .fetch_add(1, Ordering::Relaxed);
                                    }
                                    Row::Other => {}
                                }
                            }
                            SourceEvent::Commit { end_lsn, .. } => {
                                let (ticket, _, _) = open.take().ok_or_else(|| {
                                    protocol_error("a Commit arrived outside a transaction")
                                })?;
                                tracker.commit(ticket, end_lsn).map_err(protocol_error)?;
                                self.observer.transaction_commit(ticket, end_lsn);
                                // Every event of the transaction was handed
                                // to the sink before its Commit was read.
                                self.progress.published(end_lsn);
                                self.progress.transactions.fetch_add(1, Ordering::Relaxed);
                            }
                            SourceEvent::Message { transactional: true, prefix, lsn, content } => {
                                self.progress.received(lsn);
                                if let Some(route) = self.router.message_route(&prefix) {
                                    // The table-less outbox: an event in its
                                    // place in the transaction's order.
                                    let (_, commit_lsn, commit_time) = open.ok_or_else(|| {
                                        protocol_error("a transactional message arrived outside a transaction")
                                    })?;
                                    let policy = self.router.message_policy(route).topic(dead_letter_topic.as_ref());
                                    routed = Some((self.router.route_message(
                                        route, lsn, commit_lsn, open_xid, commit_time, &content,
                                    ), policy));
                                } else {
                                    // Not events: they still count towards
                                    // acknowledgement through their transaction.
                                    self.progress.messages_ignored.fetch_add(1, Ordering::Relaxed);
                                    if warned_prefixes.len() < 64 && warned_prefixes.insert(prefix.clone()) {
                                        tracing::warn!(
                                            prefix = %prefix,
                                            %lsn,
                                            "a transactional logical decoding message (pg_logical_emit_message(true, {prefix:?}, ...)) was read and NOT relayed: no [[outbox.message_route]] has this prefix. Messages with this prefix are counted, not logged again"
                                        );
                                    }
                                }
                            }
                            SourceEvent::Message { lsn, .. } => {
                                // Non-transactional messages (walcast's own
                                // heartbeats, other tools') are never events.
                                self.progress.received(lsn);
                            }
                            SourceEvent::KeepAlive { wal_end } => {
                                self.progress
                                    .server_wal_end
                                    .fetch_max(u64::from(wal_end), Ordering::AcqRel);
                                tracker.server_position(wal_end);
                            }
                        }
                        if let Some((routed, dlq)) = routed {
                            let (ticket, _, commit_time) = open.ok_or_else(|| {
                                protocol_error("an event arrived outside a transaction")
                            })?;
                            // A refused event (by the router now, or by Kafka
                            // in an earlier run) becomes its dead-letter record
                            // under the dead-letter policy, or stops walcast.
                            let outgoing = match routed {
                                Ok(event) => match self.known_rejections.iter().find(|k| k.matches(&event)) {
                                    Some(known) => DeadLetter::replace(dlq, known.error_for(&event))?,
                                    None => Outgoing { event, dead_letter: None, dead_letter_topic: dlq },
                                },
                                Err(e) => DeadLetter::replace(dlq, e)?,
                            };
                            let size = outgoing.event.size_bytes();
                            sink.prepare(&outgoing.event).await.map_err(|e| e.or_origin(Origin::Kafka))?;
                            if !outstanding.is_empty()
                                && !fits(bytes_in_flight, size, self.settings.max_in_flight_bytes)
                            {
                                waiting = Some((ticket, commit_time, outgoing));
                            } else {
                                self.observer.event_sent(ticket, &outgoing.event);
                                let was_idle = outstanding.is_empty();
                                let (size, dead) = hand_over(sink, &mut tracker, &mut outstanding, ticket, commit_time, outgoing)
                                    .inspect_err(|e| self.observer.delivery_failed(e))?;
                                bytes_in_flight += size;
                                dead_letters_in_flight += u64::from(dead);
                                if was_idle {
                                    last_delivery = Instant::now();
                                }
                                self.progress.events_sent.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    _ = ticker.tick() => {
                        if let Some(depth) = sink.queue_depth() {
                            self.progress.sink_queue.store(depth, Ordering::Relaxed);
                        }
                        let stalled_for = last_delivery.elapsed();
                        if !outstanding.is_empty() && stalled_for >= self.settings.delivery_timeout {
                            return Err(Error::retryable(format!(
                                "Kafka acknowledged nothing for {}s with {} events in flight (kafka.delivery_timeout_ms)",
                                stalled_for.as_secs(),
                                tracker.in_flight_events()
                            ))
                            .with_hint("walcast restarts from the slot's confirmed position with backoff; nothing is skipped")
                            .or_origin(Origin::DeliveryTimeout));
                        }
                        if !outstanding.is_empty() && stalled_for >= self.settings.stall_warning_after && stall_warned.is_none() {
                            self.observer.kafka_blocked(stalled_for, tracker.in_flight_events(), confirmed);
                            stall_warned = Some(stalled_for);
                        }
                    }
                }
                self.progress.waiting_since_ms.store(
                    if outstanding.is_empty() { 0 } else { self.progress.stamp(last_delivery) },
                    Ordering::Relaxed,
                );
                self.progress
                    .in_flight_events
                    .store(tracker.in_flight_events(), Ordering::Relaxed);
                self.progress
                    .in_flight_bytes
                    .store(bytes_in_flight, Ordering::Relaxed);
                let flush = tracker.flush_lsn();
                if self.advance(source, &mut confirmed, flush, &mut on_confirm) {
                    if let Some(fp) = &self.failpoints {
                        if fp.hit(Point::AfterAck) {
                            wait_reported(source, flush).await;
                            Failpoints::fire(Point::AfterAck);
                        }
                    }
                }
            })
        }
        .await;
        let stop_error = match result {
            Ok(Some(exit)) => return Ok(exit),
            Ok(None) => None,
            // A delivery failed: whatever came after it in its partition must
            // not land ahead of it (delivery rule 7), so nothing is drained;
            // the caller drops the producer's queue. What was confirmed before
            // the failure stays confirmed.
            Err(e) if delivery_failed => return Err(e),
            // Stop AT a bad input (an unpublishable row, a dropped column): the
            // events read before it are valid, so deliver and confirm them first
            // and leave the slot right before the bad transaction, instead of
            // purging them with it (the next run would read them again and
            // stop before delivering them again, for as long as the row is there).
            Err(e) if e.kind().decision() == Decision::Exit && !outstanding.is_empty() => Some(e),
            Err(e) => return Err(e),
        };

        // Shutdown (or a stop at a bad input): stop reading, wait for
        // outstanding deliveries, confirm.
        let deadline = tokio::time::Instant::now() + self.settings.shutdown_timeout;
        tracing::info!(
            in_flight_events = tracker.in_flight_events(),
            "{}: waiting for outstanding deliveries",
            if stop_error.is_some() {
                "stopping at an event that cannot be published"
            } else {
                "shutting down"
            }
        );
        'drain: while !outstanding.is_empty() {
            if outcomes.is_empty()
                && tokio::time::timeout_at(deadline, sink.delivered(&mut outcomes))
                    .await
                    .is_err()
            {
                tracing::warn!(
                    in_flight_events = tracker.in_flight_events(),
                    "shutdown timeout reached; undelivered events are left for the next run"
                );
                break;
            }
            outcomes.reverse();
            while let Some((token, result)) = outcomes.pop() {
                let Sent {
                    ticket,
                    size,
                    topic,
                    commit_time,
                    dead_letter,
                    ..
                } = outstanding
                    .take(token)
                    .ok_or_else(|| unknown_token(token))?;
                if let Err(e) = result {
                    self.observer.delivery_failed(&e);
                    tracing::warn!(
                        error = %e,
                        event_id = e.event_id(),
                        correlation_id = e.correlation_id(),
                        "delivery failed during shutdown; the event is left for the next run"
                    );
                    break 'drain;
                }
                tracker.delivered(ticket).map_err(protocol_error)?;
                self.observer.delivered(ticket, &topic, size, commit_time);
                if let Some(dl) = &dead_letter {
                    self.observer
                        .dead_lettered(dl.reason, dl.original_topic.as_ref());
                }
                bytes_in_flight -= size;
                self.progress
                    .in_flight_bytes
                    .store(bytes_in_flight, Ordering::Relaxed);
                self.progress
                    .events_delivered
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        self.advance(source, &mut confirmed, tracker.flush_lsn(), &mut on_confirm);
        self.progress
            .in_flight_events
            .store(tracker.in_flight_events(), Ordering::Relaxed);
        self.progress.waiting_since_ms.store(0, Ordering::Relaxed);
        if let Some(e) = stop_error {
            return Err(e);
        }
        Ok(PipelineExit::Shutdown {
            confirmed,
            abandoned_events: tracker.in_flight_events(),
        })
    }

    /// Confirms `flush` to the source (then to the progress counters and
    /// `on_confirm`) if it is past `confirmed`; true if it moved. `flush` must
    /// come from the ack tracker.
    fn advance<S: ReplicationSource>(
        &self,
        source: &mut S,
        confirmed: &mut Lsn,
        flush: Lsn,
        on_confirm: &mut impl FnMut(Lsn),
    ) -> bool {
        if flush <= *confirmed {
            return false;
        }
        *confirmed = flush;
        source.confirm(flush);
        self.progress.confirmed_at(flush);
        on_confirm(flush);
        true
    }
}

/// An event handed to the sink and not yet reported: its ticket, size,
/// topic and commit time, whether it is a dead-letter record, and its
/// route's dead-letter topic (`None`: the route stops at such events).
struct Sent {
    ticket: TxnTicket,
    size: u64,
    topic: Arc<str>,
    commit_time: i64,
    dead_letter: Option<DeadLetter>,
    dead_letter_topic: Option<Arc<str>>,
}

/// The events handed to the sink and not yet reported, by token.
type Outstanding = TokenRing<Sent>;

/// The ring of outstanding tokens may span this many times
/// `max_in_flight_events` (delivered events behind one still in flight)
/// before reading pauses: its memory stays bounded when one partition lags.
const OUTSTANDING_SPAN_FACTOR: u64 = 4;

/// A sink reported an outcome for a token it was not sent under (or twice).
fn unknown_token(token: DeliveryToken) -> Error {
    Error::permanent(format!(
        "the sink reported an outcome for delivery {token}, which is not outstanding"
    ))
    .with_hint("this is a bug in the sink; report it with the log. Nothing was skipped: the slot was not advanced past the problem")
}

/// A dead-letter record's origin: the refused event.
#[derive(Debug, Clone)]
struct DeadLetter {
    reason: Reason,
    original_topic: Option<Arc<str>>,
    /// The refused event's id and LSN, for errors.
    what: String,
}

/// What the loop hands to the sink: an event, or a dead-letter record in
/// its place; with the dead-letter topic of the event's route (`None`: the
/// route stops at an event that can never be published).
#[derive(Debug)]
struct Outgoing {
    event: OutboxEvent,
    dead_letter: Option<DeadLetter>,
    dead_letter_topic: Option<Arc<str>>,
}

impl DeadLetter {
    /// The dead-letter record replacing the event `refused` refused, when
    /// the event's route is under the dead-letter policy (`topic`) and the
    /// error carries the event; else `refused` itself.
    fn replace(topic: Option<Arc<str>>, refused: Error) -> Result<Outgoing> {
        let (Some(topic), Some(rejected)) = (topic.as_ref(), refused.rejected()) else {
            return Err(refused.without_rejected());
        };
        if refused.kind() == crate::ErrorKind::Retryable {
            return Err(refused);
        }
        let id = rejected
            .event_id()
            .map(|id| String::from_utf8_lossy(id).into_owned())
            .unwrap_or_else(|| "NULL".into());
        let dl = DeadLetter {
            reason: rejected.reason,
            original_topic: rejected.topic.clone(),
            what: format!(
                "event {id} from {} (commit LSN {})",
                rejected.table, rejected.source_lsn
            ),
        };
        tracing::warn!(
            reason = dl.reason.as_str(),
            dead_letter_topic = %topic,
            "{}; it goes to the dead-letter topic {topic} instead (on_permanent_error = \"dead-letter\")",
            refused.message()
        );
        let event = dead_letter::record(topic, rejected, &refused, std::time::SystemTime::now());
        Ok(Outgoing {
            event,
            dead_letter: Some(dl),
            dead_letter_topic: Some(topic.clone()),
        })
    }

    /// The error that ends the run when this dead-letter record cannot be
    /// delivered: never dropped, and never dead-lettered in turn.
    fn failed(&self, e: Error) -> Error {
        let kind = e.kind();
        let hint = match kind {
            crate::ErrorKind::Retryable => "walcast restarts from the slot's confirmed position and dead-letters the event again; nothing is skipped".to_string(),
            _ => format!(
                "{}. walcast stops without moving the slot past the event; fix the dead-letter topic (the route's dead_letter_topic, or pipeline.dead_letter_topic) and restart",
                e.hint().unwrap_or("check the dead-letter topic")
            ),
        };
        Error::new(
            kind,
            format!(
                "the dead-letter record of {} ({}) could not be delivered: {}",
                self.what,
                self.reason.as_str(),
                e.message()
            ),
        )
        .with_hint(hint)
    }
}

/// Hands `outgoing` of the open transaction `ticket` (committed at
/// `commit_time`) to the sink. When the event's route is under the
/// dead-letter policy, an event the sink refuses for good before producing
/// it is replaced by its dead-letter record, and a dead-letter record too
/// large for its topic is sent without its value. Returns the bytes it holds
/// in flight, and whether it is a dead-letter record.
fn hand_over<K: EventSink>(
    sink: &mut K,
    tracker: &mut AckTracker,
    outstanding: &mut Outstanding,
    ticket: TxnTicket,
    commit_time: i64,
    outgoing: Outgoing,
) -> Result<(u64, bool)> {
    let Outgoing {
        event,
        dead_letter,
        dead_letter_topic: dlq,
    } = outgoing;
    let txn = (ticket, commit_time);
    let (record, dl) = match dead_letter {
        None => {
            let size = event.size_bytes();
            match dispatch(sink, tracker, outstanding, txn, event, None, dlq.clone()) {
                Ok(()) => return Ok((size, false)),
                Err(refused) => {
                    let o = DeadLetter::replace(dlq.clone(), refused)?;
                    (o.event, o.dead_letter.unwrap_or_else(|| unreachable!()))
                }
            }
        }
        Some(dl) => (event, dl),
    };
    let size = record.size_bytes();
    let keep = (!record.payload.is_empty()).then(|| record.clone());
    match dispatch(
        sink,
        tracker,
        outstanding,
        txn,
        record,
        Some(dl.clone()),
        dlq.clone(),
    ) {
        Ok(()) => Ok((size, true)),
        Err(e) if keep.is_some() && e.rejected().is_some_and(|r| r.reason == Reason::TooLarge) => {
            // The value does not fit the dead-letter topic either: send the
            // key and headers, with the value's size in a header.
            let record = dead_letter::without_value(keep.unwrap_or_else(|| unreachable!()));
            tracing::warn!(
                "the dead-letter record of {} is too large for the dead-letter topic with its value: it is sent without it ({})",
                dl.what,
                dead_letter::HEADER_VALUE_OMITTED
            );
            let size = record.size_bytes();
            dispatch(
                sink,
                tracker,
                outstanding,
                txn,
                record,
                Some(dl.clone()),
                dlq,
            )
            .map(|()| (size, true))
            .map_err(|e| dl.failed(e))
        }
        Err(e) => Err(dl.failed(e)),
    }
}

/// Hands `event` of the open transaction `txn` (its ticket and commit time)
/// to the sink under the next token, and records it as outstanding.
/// `dead_letter_topic` is the event's route's (`None`: stop).
fn dispatch<K: EventSink>(
    sink: &mut K,
    tracker: &mut AckTracker,
    outstanding: &mut Outstanding,
    (ticket, commit_time): (TxnTicket, i64),
    event: OutboxEvent,
    dead_letter: Option<DeadLetter>,
    dead_letter_topic: Option<Arc<str>>,
) -> Result<()> {
    let size = event.size_bytes();
    let topic = event.topic.clone();
    sink.send(event, outstanding.next_token())
        .map_err(|e| e.or_origin(Origin::Kafka))?;
    tracker.event_sent(ticket).map_err(protocol_error)?;
    outstanding.push(Sent {
        ticket,
        size,
        topic,
        commit_time,
        dead_letter,
        dead_letter_topic,
    });
    Ok(())
}

/// True when an event of `size` bytes may join `in_flight` bytes under `max`.
fn fits(in_flight: u64, size: u64, max: u64) -> bool {
    in_flight.saturating_add(size) <= max
}

/// Waits (bounded) until the source reported `lsn` to the server, when it can tell.
async fn wait_reported<S: ReplicationSource>(source: &S, lsn: Lsn) {
    let deadline = tokio::time::Instant::now() + crate::failpoint::ACK_REPORT_WAIT;
    while source.reported_lsn().is_some_and(|r| r < lsn) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn protocol_error(e: impl std::fmt::Display) -> Error {
    Error::permanent(format!("replication stream out of protocol order: {e}"))
        .with_hint("this is a bug or a server/protocol mismatch; report it with the log. Nothing was skipped: the slot was not advanced past the problem")
}
