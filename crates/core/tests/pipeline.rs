//! The pipeline loop against an in-memory source and a sink whose deliveries
//! the test completes by hand, in any order. These check the loop's own logic
//! (flow control, ack order, failure, shutdown) deterministically; Kafka and
//! Postgres behaviour is covered by the integration tests in tests/it.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::{oneshot, watch, Notify};
use walcast_core::config::{OutboxColumns, TableName};
use walcast_core::dead_letter::{Reason, Rejected};
use walcast_core::outbox::OutboxFilter;
use walcast_core::pipeline::{Pipeline, PipelineExit, PipelineSettings, Progress};
use walcast_core::route::{
    HeaderNames, OnPermanentError, OutboxEvent, RouteSpec, Router, Routes, TopicRule, TopicTemplate,
};
use walcast_core::sink::{DeliveryToken, EventSink};
use walcast_core::source::{ReplicationSource, SourceEvent};
use walcast_core::{Error, Lsn, Result};
use walcast_pgoutput::{
    oid, ColumnValue, Insert, Message, Relation, RelationColumn, ReplicaIdentity, TupleData,
};

#[derive(Clone, Default)]
struct SourceState {
    events: Arc<Mutex<VecDeque<SourceEvent>>>,
    read: Arc<AtomicUsize>,
    confirmed: Arc<Mutex<Vec<Lsn>>>,
    more: Arc<Notify>,
}

impl SourceState {
    fn push(&self, e: SourceEvent) {
        self.events.lock().unwrap().push_back(e);
        self.more.notify_one();
    }
    fn last_confirmed(&self) -> Option<Lsn> {
        self.confirmed.lock().unwrap().last().copied()
    }
}

struct FakeSource(SourceState);

impl ReplicationSource for FakeSource {
    async fn recv(&mut self) -> Result<Option<SourceEvent>> {
        loop {
            let next = self.0.events.lock().unwrap().pop_front();
            if let Some(e) = next {
                self.0.read.fetch_add(1, Ordering::SeqCst);
                return Ok(Some(e));
            }
            self.0.more.notified().await;
        }
    }
    fn confirm(&mut self, lsn: Lsn) {
        self.0.confirmed.lock().unwrap().push(lsn);
    }
    async fn shutdown(self) -> Result<()> {
        Ok(())
    }
}

type Pending = Arc<Mutex<Vec<(String, oneshot::Sender<Result<()>>)>>>;

/// Hands events over as pending deliveries; refuses (in `send`, before
/// producing, like a record over the size limit) events whose id starts
/// with "big"; counts `prepare` calls.
struct FakeSink(Pending, Arc<AtomicUsize>, Outcomes);

/// The outcomes of the deliveries handed over, as the test completes them.
type Outcomes = FuturesUnordered<BoxFuture<'static, (DeliveryToken, Result<()>)>>;

/// The outcome of the delivery `rx` completes, under `token`.
fn outcome(
    token: DeliveryToken,
    rx: oneshot::Receiver<Result<()>>,
) -> BoxFuture<'static, (DeliveryToken, Result<()>)> {
    Box::pin(async move {
        (
            token,
            rx.await
                .unwrap_or_else(|_| Err(Error::retryable("sink dropped"))),
        )
    })
}

impl EventSink for FakeSink {
    fn prepare(&mut self, _event: &OutboxEvent) -> impl Future<Output = Result<()>> + Send {
        self.1.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(()))
    }
    fn send(&mut self, event: OutboxEvent, token: DeliveryToken) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let mut id = String::from_utf8_lossy(event.event_id()).into_owned();
        if &*event.topic == DLQ {
            // A dead-letter record (it keeps the event's id).
            id = format!("{DLQ}:{id}");
        } else if id.starts_with("big") {
            return Err(Error::permanent(format!("event {id} is too large"))
                .with_rejected(Rejected::event(Reason::TooLarge, &event)));
        }
        self.0.lock().unwrap().push((id, tx));
        self.2.push(outcome(token, rx));
        Ok(())
    }
    async fn delivered(&mut self, out: &mut Vec<(DeliveryToken, Result<()>)>) {
        match self.2.next().await {
            Some(o) => out.push(o),
            None => std::future::pending().await,
        }
        while let Some(Some(o)) = self.2.next().now_or_never() {
            out.push(o);
        }
    }
    fn abort(self) {}
}

const REL: u32 = 16384;

/// The dead-letter topic of [`start_dead_letter`].
const DLQ: &str = "dlq";

fn relation() -> Bytes {
    let col = |name: &str, type_oid: u32| RelationColumn {
        flags: 0,
        name: name.to_string().into(),
        type_oid,
        type_modifier: -1,
    };
    Message::Relation(Relation {
        xid: None,
        rel_id: REL,
        namespace: "public".to_string().into(),
        name: "outbox".to_string().into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            col("id", oid::UUID),
            col("aggregatetype", oid::TEXT),
            col("aggregateid", oid::TEXT),
            col("type", oid::TEXT),
            col("payload", oid::JSONB),
        ],
    })
    .to_bytes()
}

fn insert(id: &str, key: &str, payload_len: usize) -> Bytes {
    let t = |s: &str| ColumnValue::Text(Bytes::copy_from_slice(s.as_bytes()));
    Message::Insert(Insert {
        xid: None,
        rel_id: REL,
        new: TupleData::new(vec![
            t(id),
            t("Order"),
            t(key),
            t("Created"),
            t(&format!("\"{}\"", "x".repeat(payload_len))),
        ]),
    })
    .to_bytes()
}

fn begin(lsn: u64) -> SourceEvent {
    SourceEvent::Begin {
        final_lsn: Lsn::new(lsn),
        xid: 1,
        commit_time_micros: 0,
    }
}

fn commit(end: u64) -> SourceEvent {
    SourceEvent::Commit {
        commit_lsn: Lsn::new(end - 8),
        end_lsn: Lsn::new(end),
        commit_time_micros: 0,
    }
}

fn data(b: Bytes) -> SourceEvent {
    SourceEvent::Data {
        wal_start: Lsn::ZERO,
        data: b,
    }
}

struct Harness {
    source: SourceState,
    pending: Pending,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<PipelineExit>>,
    progress: Arc<Progress>,
    prepared: Arc<AtomicUsize>,
}

fn start(max_events: u64, max_bytes: u64) -> Harness {
    start_with(max_events, max_bytes, Duration::from_secs(600))
}

fn start_with(max_events: u64, max_bytes: u64, delivery_timeout: Duration) -> Harness {
    start_full(max_events, max_bytes, delivery_timeout, None)
}

/// A pipeline under the dead-letter policy (topic [`DLQ`]).
fn start_dead_letter() -> Harness {
    start_full(100, 1 << 20, Duration::from_secs(600), Some(Arc::from(DLQ)))
}

fn start_full(
    max_events: u64,
    max_bytes: u64,
    delivery_timeout: Duration,
    dead_letter: Option<Arc<str>>,
) -> Harness {
    start_routed(
        max_events,
        max_bytes,
        delivery_timeout,
        dead_letter,
        OnPermanentError::Inherit,
    )
}

/// A pipeline whose one route (for `public.outbox`) has its own policy
/// `route`, beside the pipeline's `dead_letter` topic.
fn start_policy(dead_letter: Option<Arc<str>>, route: OnPermanentError) -> Harness {
    start_routed(100, 1 << 20, Duration::from_secs(600), dead_letter, route)
}

fn start_routed(
    max_events: u64,
    max_bytes: u64,
    delivery_timeout: Duration,
    dead_letter: Option<Arc<str>>,
    route: OnPermanentError,
) -> Harness {
    let template = TopicTemplate::parse("outbox.event.${routedByValue}").unwrap();
    let (filter, router) = if route == OnPermanentError::Inherit {
        (
            OutboxFilter::new(
                [TableName::parse("public.outbox").unwrap()],
                OutboxColumns::default(),
            ),
            Router::new(template),
        )
    } else {
        let mut spec = RouteSpec::legacy(&OutboxColumns::default(), TopicRule::Template(template));
        spec.on_permanent_error = route;
        let routes = Routes::single(spec, [TableName::parse("public.outbox").unwrap()]);
        (
            OutboxFilter::with_routes(&routes),
            Router::with_routes(&routes, HeaderNames::default()),
        )
    };
    let source = SourceState::default();
    let pending: Pending = Arc::default();
    let (stop, stop_rx) = watch::channel(false);
    let progress = Arc::new(Progress::default());
    let mut pipeline = Pipeline::new(
        PipelineSettings {
            max_in_flight_events: max_events,
            max_in_flight_bytes: max_bytes,
            shutdown_timeout: Duration::from_secs(5),
            stall_warning_after: Duration::from_secs(60),
            delivery_timeout,
        },
        filter,
        router,
        progress.clone(),
    )
    .with_dead_letter(dead_letter);
    let mut src = FakeSource(source.clone());
    let prepared = Arc::new(AtomicUsize::new(0));
    let mut sink = FakeSink(pending.clone(), prepared.clone(), Outcomes::default());
    let task = tokio::spawn(async move {
        pipeline
            .run(&mut src, &mut sink, Lsn::new(100), stop_rx, |_| {})
            .await
    });
    Harness {
        source,
        pending,
        stop,
        task,
        progress,
        prepared,
    }
}

async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
}

fn deliver(h: &Harness, id: &str, result: Result<()>) {
    let mut p = h.pending.lock().unwrap();
    let i = p.iter().position(|(x, _)| x == id).expect("pending event");
    let (_, tx) = p.remove(i);
    let _ = tx.send(result);
}

#[tokio::test]
async fn confirms_only_the_delivered_prefix_of_transactions() {
    let h = start(100, 1 << 20);
    h.source.push(begin(150));
    h.source.push(data(relation()));
    h.source.push(data(insert("a1", "a", 10)));
    h.source.push(commit(200));
    h.source.push(begin(250));
    h.source.push(data(insert("b1", "b", 10)));
    h.source.push(commit(300));
    settle().await;
    assert_eq!(h.pending.lock().unwrap().len(), 2);
    // The later transaction is delivered first: nothing may be confirmed.
    deliver(&h, "b1", Ok(()));
    settle().await;
    assert_eq!(h.source.last_confirmed(), None);
    deliver(&h, "a1", Ok(()));
    settle().await;
    assert_eq!(h.source.last_confirmed(), Some(Lsn::new(300)));
    // Idle: a keepalive moves the confirmed position to the server's.
    h.source.push(SourceEvent::KeepAlive {
        wal_end: Lsn::new(900),
    });
    settle().await;
    assert_eq!(h.source.last_confirmed(), Some(Lsn::new(900)));
    h.stop.send(true).unwrap();
    let exit = h.task.await.unwrap().unwrap();
    assert!(matches!(
        exit,
        PipelineExit::Shutdown {
            abandoned_events: 0,
            ..
        }
    ));
}

#[tokio::test]
async fn stops_reading_when_in_flight_is_full_and_resumes_after_acks() {
    let h = start(3, 1 << 20);
    h.source.push(begin(150));
    h.source.push(data(relation()));
    for i in 0..10 {
        h.source.push(data(insert(&format!("e{i}"), "k", 10)));
    }
    h.source.push(commit(200));
    settle().await;
    // Begin + Relation + 3 inserts read; the rest waits in the source.
    assert_eq!(h.pending.lock().unwrap().len(), 3);
    assert_eq!(h.source.read.load(Ordering::SeqCst), 5);
    assert_eq!(h.progress.in_flight_events.load(Ordering::SeqCst), 3);
    for i in 0..10 {
        deliver(&h, &format!("e{i}"), Ok(()));
        settle().await;
    }
    assert_eq!(h.source.last_confirmed(), Some(Lsn::new(200)));
    h.stop.send(true).unwrap();
    h.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn the_byte_bound_holds_too() {
    // Each event is ~1.1 KB; 2.5 KB of room admits two. The third is read and
    // waits outside the window (bytes in flight never exceed the bound), and
    // nothing more is read meanwhile.
    let h = start(1000, 2_500);
    h.source.push(begin(150));
    h.source.push(data(relation()));
    for i in 0..6 {
        h.source.push(data(insert(&format!("e{i}"), "k", 1000)));
    }
    h.source.push(commit(200));
    settle().await;
    assert_eq!(h.pending.lock().unwrap().len(), 2);
    assert_eq!(
        h.source.read.load(Ordering::SeqCst),
        5,
        "begin, relation, e0..e2"
    );
    assert!(h.progress.in_flight_bytes.load(Ordering::SeqCst) <= 2_500);
    // One delivery frees room for the waiting event, in order.
    deliver(&h, "e0", Ok(()));
    settle().await;
    let ids: Vec<String> = h
        .pending
        .lock()
        .unwrap()
        .iter()
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(ids, ["e1", "e2"]);
    assert!(h.progress.in_flight_bytes.load(Ordering::SeqCst) <= 2_500);
    h.stop.send(true).unwrap();
    for i in 1..3 {
        deliver(&h, &format!("e{i}"), Ok(()));
    }
    let exit = h.task.await.unwrap().unwrap();
    // The transaction is incomplete: nothing confirmed beyond the start.
    assert!(matches!(exit, PipelineExit::Shutdown { confirmed, .. } if confirmed == Lsn::new(100)));
}

#[tokio::test]
async fn a_keepalive_while_a_transaction_is_open_does_not_move_the_lsn() {
    let h = start(100, 1 << 20);
    h.source.push(begin(150));
    h.source.push(data(relation()));
    h.source.push(data(insert("a1", "a", 10)));
    // The server's position is far ahead (other databases write WAL), but a
    // transaction is open: rule 3.
    h.source.push(SourceEvent::KeepAlive {
        wal_end: Lsn::new(5_000),
    });
    settle().await;
    deliver(&h, "a1", Ok(()));
    settle().await;
    h.source.push(SourceEvent::KeepAlive {
        wal_end: Lsn::new(6_000),
    });
    settle().await;
    assert_eq!(
        h.source.last_confirmed(),
        None,
        "nothing may be confirmed inside an open transaction"
    );
    h.source.push(commit(200));
    settle().await;
    assert_eq!(h.source.last_confirmed(), Some(Lsn::new(200)));
    // Now idle: the next keepalive moves it (rule 2).
    h.source.push(SourceEvent::KeepAlive {
        wal_end: Lsn::new(7_000),
    });
    settle().await;
    assert_eq!(h.source.last_confirmed(), Some(Lsn::new(7_000)));
    h.stop.send(true).unwrap();
    h.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn waiting_transactions_are_bounded_behind_a_stuck_event() {
    // One event is stuck; 50 transactions with one event each are delivered
    // behind it, then thousands of empty ones stream past. The tracker holds
    // at most max_in_flight_events transactions: reading stops instead.
    let h = start(10, 1 << 20);
    h.source.push(begin(150));
    h.source.push(data(relation()));
    h.source.push(data(insert("stuck", "s", 10)));
    h.source.push(commit(200));
    let mut lsn = 200;
    for i in 0..50 {
        h.source.push(begin(lsn + 50));
        h.source.push(data(insert(&format!("t{i}"), "k", 10)));
        lsn += 100;
        h.source.push(commit(lsn));
    }
    for _ in 0..5_000 {
        h.source.push(begin(lsn + 50));
        lsn += 100;
        h.source.push(commit(lsn));
    }
    let total = 4 + 50 * 3 + 5_000 * 2;
    deliver_rounds(&h, 60, Some("stuck"), None).await;
    let read = h.source.read.load(Ordering::SeqCst);
    assert!(
        read < total,
        "read everything ({read}) while an event was stuck"
    );
    assert_eq!(h.source.last_confirmed(), None);
    // Unstuck: everything is read and confirmed.
    deliver(&h, "stuck", Ok(()));
    deliver_rounds(&h, 60, None, Some(Lsn::new(lsn))).await;
    assert_eq!(h.source.read.load(Ordering::SeqCst), total);
    assert_eq!(h.source.last_confirmed(), Some(Lsn::new(lsn)));
    h.stop.send(true).unwrap();
    h.task.await.unwrap().unwrap();
}

/// Up to `rounds` times: lets the pipeline run, then delivers every pending
/// event except `stuck`; stops early once `until` is confirmed. Returns the
/// number of events delivered.
async fn deliver_rounds(
    h: &Harness,
    rounds: usize,
    stuck: Option<&str>,
    until: Option<Lsn>,
) -> usize {
    let mut delivered = 0;
    for _ in 0..rounds {
        settle().await;
        for id in pending_ids(h)
            .into_iter()
            .filter(|id| Some(id.as_str()) != stuck)
        {
            deliver(h, &id, Ok(()));
            delivered += 1;
        }
        if until.is_some() && h.source.last_confirmed() == until {
            break;
        }
    }
    delivered
}

/// The events delivered behind a stuck one in the same transaction are
/// bounded too (the sink's outcomes are tracked in a ring from the oldest
/// outstanding event): reading pauses at 4 x max_in_flight_events of them,
/// and resumes once the stuck event is delivered.
#[tokio::test]
async fn events_delivered_behind_a_stuck_one_are_bounded() {
    let h = start(2, 1 << 20);
    h.source.push(begin(150));
    h.source.push(data(relation()));
    h.source.push(data(insert("stuck", "s", 10)));
    for i in 0..40 {
        h.source.push(data(insert(&format!("e{i}"), "k", 10)));
    }
    h.source.push(commit(200));
    let sent = 1 + deliver_rounds(&h, 30, Some("stuck"), None).await;
    assert_eq!(
        sent, 8,
        "the stuck event and 7 after it (a span of 8 tokens)"
    );
    assert_eq!(h.progress.in_flight_events.load(Ordering::SeqCst), 1);
    deliver(&h, "stuck", Ok(()));
    deliver_rounds(&h, 40, None, Some(Lsn::new(200))).await;
    assert_eq!(h.source.last_confirmed(), Some(Lsn::new(200)));
    h.stop.send(true).unwrap();
    h.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_failed_delivery_stops_the_pipeline_without_confirming() {
    let h = start(100, 1 << 20);
    h.source.push(begin(150));
    h.source.push(data(relation()));
    h.source.push(data(insert("a1", "a", 10)));
    h.source.push(data(insert("a2", "a", 10)));
    h.source.push(commit(200));
    settle().await;
    deliver(&h, "a2", Ok(()));
    deliver(&h, "a1", Err(Error::retryable("broker gone")));
    let err = h.task.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), walcast_core::ErrorKind::Retryable);
    assert_eq!(h.source.last_confirmed(), None);
}

/// Delivery rule 7: once a delivery failed, nothing sent after it is awaited
/// or confirmed, even for a permanent failure (which stops walcast): the
/// later events may belong to the failed one's partition.
#[tokio::test]
async fn a_failed_delivery_stops_at_once_without_awaiting_later_events() {
    let h = start(100, 1 << 20);
    h.source.push(begin(150));
    h.source.push(data(relation()));
    h.source.push(data(insert("a1", "a", 10)));
    h.source.push(commit(200));
    h.source.push(begin(250));
    h.source.push(data(insert("a2", "a", 10)));
    h.source.push(commit(300));
    h.source.push(begin(350));
    h.source.push(data(insert("a3", "a", 10)));
    h.source.push(data(insert("b1", "b", 10)));
    h.source.push(commit(400));
    settle().await;
    assert_eq!(h.pending.lock().unwrap().len(), 4);
    deliver(&h, "a1", Ok(()));
    settle().await;
    assert_eq!(h.source.last_confirmed(), Some(Lsn::new(200)));
    deliver(&h, "a2", Err(Error::permanent("event a2 is too large")));
    let err = tokio::time::timeout(Duration::from_secs(1), h.task)
        .await
        .expect("the pipeline stops at once instead of waiting for a3 and b1")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), walcast_core::ErrorKind::Permanent);
    assert!(err.to_string().contains("a2"), "{err}");
    assert_eq!(h.source.last_confirmed(), Some(Lsn::new(200)));
    let left: Vec<String> = h
        .pending
        .lock()
        .unwrap()
        .iter()
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(left, ["a3", "b1"], "never awaited");
}

/// A record the sink refuses before producing it (too large) stops the
/// pipeline AT it: what was sent before it is awaited and confirmed, nothing
/// after it is sent.
/// Outcomes come in batches: when one outcome of a batch frees room for a
/// waiting event that stops walcast, the batch's other outcomes still count,
/// and the events before the stop are confirmed.
#[tokio::test]
async fn a_stop_while_handling_a_batch_of_outcomes_keeps_the_rest_of_the_batch() {
    // ~1.1 KB events, room for two: big2 is read and waits for room.
    let h = start(1000, 2_500);
    h.source.push(begin(150));
    h.source.push(data(relation()));
    h.source.push(data(insert("e0", "k", 1000)));
    h.source.push(data(insert("e1", "k", 1000)));
    h.source.push(commit(200));
    h.source.push(begin(250));
    h.source.push(data(insert("big2", "k", 1000)));
    h.source.push(commit(300));
    settle().await;
    assert_eq!(pending_ids(&h), ["e0", "e1"]);
    // Both outcomes in one batch: the first frees room, big2 is handed over
    // and refused (no dead-letter topic), which stops walcast.
    deliver(&h, "e0", Ok(()));
    deliver(&h, "e1", Ok(()));
    let err = h.task.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("big2"), "{err}");
    assert_eq!(
        h.source.last_confirmed(),
        Some(Lsn::new(200)),
        "e0 and e1 delivered: their transaction is confirmed"
    );
}

#[tokio::test]
async fn a_record_refused_by_the_sink_stops_after_the_events_before_it() {
    let h = start(100, 1 << 20);
    h.source.push(begin(150));
    h.source.push(data(relation()));
    h.source.push(data(insert("a1", "a", 10)));
    h.source.push(commit(200));
    h.source.push(begin(250));
    h.source.push(data(insert("a2", "a", 10)));
    h.source.push(data(insert("big1", "a", 10)));
    h.source.push(data(insert("a3", "a", 10)));
    h.source.push(commit(300));
    settle().await;
    assert!(!h.task.is_finished(), "it waits for a1 and a2");
    assert_eq!(
        h.prepared.load(Ordering::SeqCst),
        3,
        "prepare runs before each send"
    );
    let sent: Vec<String> = h
        .pending
        .lock()
        .unwrap()
        .iter()
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(
        sent,
        ["a1", "a2"],
        "nothing after the refused event is sent"
    );
    deliver(&h, "a1", Ok(()));
    deliver(&h, "a2", Ok(()));
    let err = h.task.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), walcast_core::ErrorKind::Permanent);
    assert!(err.to_string().contains("big1"), "{err}");
    assert_eq!(
        h.source.last_confirmed(),
        Some(Lsn::new(200)),
        "confirmed up to the refused event's transaction, not into it"
    );
}

#[tokio::test]
async fn unroutable_rows_stop_with_a_permanent_error() {
    let h = start(100, 1 << 20);
    h.source.push(begin(150));
    h.source.push(data(relation()));
    let t = |s: &str| ColumnValue::Text(Bytes::copy_from_slice(s.as_bytes()));
    let null_key = Message::Insert(Insert {
        xid: None,
        rel_id: REL,
        new: TupleData::new(vec![
            t("x1"),
            t("Order"),
            ColumnValue::Null,
            t("T"),
            t("{}"),
        ]),
    })
    .to_bytes();
    h.source.push(data(null_key));
    h.source.push(commit(200));
    let err = h.task.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), walcast_core::ErrorKind::Permanent);
    assert!(err.to_string().contains("aggregateid"), "{err}");
    assert_eq!(h.source.last_confirmed(), None);
}

/// A row that can never be published stops the pipeline AT it: the events
/// read before it are still delivered and confirmed (not purged with it), and
/// the slot stops right before the bad transaction.
#[tokio::test]
async fn a_bad_row_stops_only_after_the_events_before_it_are_confirmed() {
    let h = start(100, 1 << 20);
    h.source.push(begin(150));
    h.source.push(data(relation()));
    h.source.push(data(insert("a1", "a", 10)));
    h.source.push(commit(200));
    h.source.push(begin(250));
    h.source.push(data(insert("b1", "b", 10)));
    let t = |s: &str| ColumnValue::Text(Bytes::copy_from_slice(s.as_bytes()));
    let null_key = Message::Insert(Insert {
        xid: None,
        rel_id: REL,
        new: TupleData::new(vec![
            t("b2"),
            t("Order"),
            ColumnValue::Null,
            t("T"),
            t("{}"),
        ]),
    })
    .to_bytes();
    h.source.push(data(null_key));
    h.source.push(commit(300));
    settle().await;
    assert!(
        !h.task.is_finished(),
        "it waits for the deliveries of a1 and b1"
    );
    deliver(&h, "a1", Ok(()));
    deliver(&h, "b1", Ok(()));
    let err = h.task.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), walcast_core::ErrorKind::Permanent);
    assert_eq!(
        h.source.last_confirmed(),
        Some(Lsn::new(200)),
        "confirmed up to the bad transaction, not into it"
    );
}

/// Events in flight and no delivery report for `delivery_timeout`: the
/// pipeline fails (retryable) without confirming, so the caller purges the
/// sink and restarts from the slot. (The sink never times events out itself.)
#[tokio::test]
async fn nothing_delivered_for_the_delivery_timeout_restarts_without_confirming() {
    let h = start_with(100, 1 << 20, Duration::from_millis(1500));
    h.source.push(begin(150));
    h.source.push(data(relation()));
    h.source.push(data(insert("a1", "a", 10)));
    h.source.push(commit(200));
    let err = tokio::time::timeout(Duration::from_secs(10), h.task)
        .await
        .expect("the pipeline gives up after its delivery timeout")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), walcast_core::ErrorKind::Retryable);
    assert!(err.to_string().contains("delivery_timeout_ms"), "{err}");
    assert_eq!(h.source.last_confirmed(), None);
}

fn null_key(id: &str) -> Bytes {
    let t = |s: &str| ColumnValue::Text(Bytes::copy_from_slice(s.as_bytes()));
    Message::Insert(Insert {
        xid: None,
        rel_id: REL,
        new: TupleData::new(vec![t(id), t("Order"), ColumnValue::Null, t("T"), t("{}")]),
    })
    .to_bytes()
}

fn pending_ids(h: &Harness) -> Vec<String> {
    h.pending
        .lock()
        .unwrap()
        .iter()
        .map(|(id, _)| id.clone())
        .collect()
}

/// Delivery rule 8: the dead-letter record takes the bad event's place in
/// its transaction: the slot does not pass the row before the record is
/// acknowledged, and nothing after the row is sent before that either.
#[tokio::test]
async fn a_dead_letter_record_holds_the_slot_and_the_stream_until_acknowledged() {
    let h = start_dead_letter();
    h.source.push(begin(150));
    h.source.push(data(relation()));
    h.source.push(data(insert("a1", "a", 10)));
    h.source.push(commit(200));
    h.source.push(begin(250));
    h.source.push(data(insert("b1", "b", 10)));
    h.source.push(data(null_key("b2")));
    h.source.push(data(insert("b3", "b", 10)));
    h.source.push(commit(300));
    h.source.push(begin(350));
    h.source.push(data(insert("b4", "b", 10)));
    h.source.push(commit(400));
    settle().await;
    assert_eq!(
        pending_ids(&h),
        ["a1", "b1", "dlq:b2"],
        "nothing after the dead-lettered row is sent before its record is acknowledged"
    );
    deliver(&h, "a1", Ok(()));
    deliver(&h, "b1", Ok(()));
    settle().await;
    assert_eq!(
        h.source.last_confirmed(),
        Some(Lsn::new(200)),
        "the slot stays before the row's transaction until its dead-letter record is acknowledged"
    );
    assert_eq!(pending_ids(&h), ["dlq:b2"]);
    deliver(&h, "dlq:b2", Ok(()));
    settle().await;
    assert_eq!(pending_ids(&h), ["b3", "b4"]);
    assert_eq!(h.source.last_confirmed(), Some(Lsn::new(200)));
    deliver(&h, "b3", Ok(()));
    deliver(&h, "b4", Ok(()));
    settle().await;
    assert_eq!(h.source.last_confirmed(), Some(Lsn::new(400)));
    assert!(!h.task.is_finished(), "the pipeline goes on");
    let _ = h.stop.send(true);
    h.task.await.unwrap().unwrap();
}

/// An event the sink refuses before producing it (over the size limit) is
/// dead-lettered in its place, under the same rule.
#[tokio::test]
async fn a_record_refused_by_the_sink_is_dead_lettered() {
    let h = start_dead_letter();
    h.source.push(begin(150));
    h.source.push(data(relation()));
    h.source.push(data(insert("a1", "a", 10)));
    h.source.push(data(insert("big1", "a", 10)));
    h.source.push(data(insert("a2", "a", 10)));
    h.source.push(commit(200));
    settle().await;
    assert_eq!(pending_ids(&h), ["a1", "dlq:big1"]);
    deliver(&h, "a1", Ok(()));
    settle().await;
    assert_eq!(h.source.last_confirmed(), None);
    deliver(&h, "dlq:big1", Ok(()));
    settle().await;
    assert_eq!(pending_ids(&h), ["a2"]);
    deliver(&h, "a2", Ok(()));
    settle().await;
    assert_eq!(h.source.last_confirmed(), Some(Lsn::new(200)));
    let _ = h.stop.send(true);
    h.task.await.unwrap().unwrap();
}

/// A dead-letter record that fails ends the run without confirming its
/// row: it is never dropped (and never dead-lettered in turn).
#[tokio::test]
async fn a_failed_dead_letter_record_stops_without_passing_the_row() {
    let h = start_dead_letter();
    h.source.push(begin(150));
    h.source.push(data(relation()));
    h.source.push(data(insert("a1", "a", 10)));
    h.source.push(commit(200));
    h.source.push(begin(250));
    h.source.push(data(null_key("b2")));
    h.source.push(commit(300));
    settle().await;
    deliver(&h, "a1", Ok(()));
    settle().await;
    deliver(
        &h,
        "dlq:b2",
        Err(Error::permanent("the dead-letter topic refused it")),
    );
    let err = tokio::time::timeout(Duration::from_secs(5), h.task)
        .await
        .expect("the pipeline stops when a dead-letter record fails")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), walcast_core::ErrorKind::Permanent);
    assert!(err.to_string().contains("dead-letter record"), "{err}");
    assert!(err.rejected().is_none(), "never dead-lettered in turn");
    assert_eq!(h.source.last_confirmed(), Some(Lsn::new(200)));
}

/// A route's own policy wins over the pipeline's: a route that says `stop`
/// stops at a NULL-key row although the pipeline dead-letters; a route that
/// dead-letters to its own topic does so although the pipeline stops.
#[tokio::test]
async fn a_routes_own_policy_wins_over_the_pipelines() {
    let h = start_policy(Some(Arc::from("pipeline-dlq")), OnPermanentError::Stop);
    h.source.push(begin(150));
    h.source.push(data(relation()));
    h.source.push(data(null_key("b1")));
    h.source.push(commit(200));
    let err = tokio::time::timeout(Duration::from_secs(5), h.task)
        .await
        .expect("the stop route stops the pipeline")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), walcast_core::ErrorKind::Permanent);
    assert!(
        h.pending.lock().unwrap().is_empty(),
        "nothing dead-lettered"
    );
    assert!(
        err.rejected().is_none(),
        "a stop route's event is never kept for dead-lettering"
    );

    let h = start_policy(None, OnPermanentError::DeadLetter(Arc::from(DLQ)));
    h.source.push(begin(150));
    h.source.push(data(relation()));
    h.source.push(data(null_key("b1")));
    h.source.push(commit(200));
    settle().await;
    assert_eq!(pending_ids(&h), ["dlq:b1"]);
    deliver(&h, "dlq:b1", Ok(()));
    settle().await;
    assert_eq!(h.source.last_confirmed(), Some(Lsn::new(200)));
    let _ = h.stop.send(true);
    h.task.await.unwrap().unwrap();
}

/// A broker's refusal of a produced event ends the run either way; the
/// refused event stays attached (so the supervisor restarts and
/// dead-letters it) only when its route dead-letters.
#[tokio::test]
async fn a_broker_refusal_is_kept_for_dead_lettering_only_under_its_routes_dead_letter_policy() {
    for (route, kept) in [
        (OnPermanentError::Stop, false),
        (OnPermanentError::DeadLetter(Arc::from(DLQ)), true),
    ] {
        let h = start_policy(None, route.clone());
        h.source.push(begin(150));
        h.source.push(data(relation()));
        h.source.push(data(insert("a1", "a", 10)));
        h.source.push(commit(200));
        settle().await;
        let event = OutboxEvent::new(
            Arc::from("outbox.event.Order"),
            Bytes::from_static(b"a"),
            Bytes::new(),
            Vec::new(),
            Lsn::new(142),
            Arc::from("public.outbox"),
        );
        deliver(
            &h,
            "a1",
            Err(Error::permanent("the broker refused it")
                .with_rejected(Rejected::event(Reason::TooLarge, &event))),
        );
        let err = h.task.await.unwrap().unwrap_err();
        assert_eq!(err.rejected().is_some(), kept, "{route:?}");
        assert_eq!(h.source.last_confirmed(), None);
    }
}
