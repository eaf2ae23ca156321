//! The order in which a run is closed ([`walcast_runtime::run_pipeline`]),
//! over an in-memory source and sink that log every call: the sink is
//! aborted before the source is dropped or shut down, the final position
//! reported is the one the ack tracker confirmed, and it is reported before
//! the connection closes. Real services: tests/it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::{oneshot, watch, Notify};
use walcast_core::config::{OutboxColumns, TableName};
use walcast_core::outbox::OutboxFilter;
use walcast_core::pipeline::{Pipeline, PipelineExit, PipelineSettings, Progress};
use walcast_core::route::{OutboxEvent, Router, TopicTemplate};
use walcast_core::sink::{DeliveryToken, EventSink};
use walcast_core::source::{ReplicationSource, SourceEvent};
use walcast_core::{Error, ErrorKind, Lsn, Result};
use walcast_pgoutput::{
    oid, ColumnValue, Insert, Message, Relation, RelationColumn, ReplicaIdentity, TupleData,
};
use walcast_runtime::run_pipeline;

/// Every call the run makes, in order.
type Log = Arc<Mutex<Vec<String>>>;

fn note(l: &Log, s: impl Into<String>) {
    l.lock().unwrap().push(s.into());
}

struct FakeSource {
    events: Arc<Mutex<VecDeque<SourceEvent>>>,
    more: Arc<Notify>,
    log: Log,
}

impl ReplicationSource for FakeSource {
    async fn recv(&mut self) -> Result<Option<SourceEvent>> {
        loop {
            let next = self.events.lock().unwrap().pop_front();
            if let Some(e) = next {
                return Ok(Some(e));
            }
            self.more.notified().await;
        }
    }
    fn confirm(&mut self, lsn: Lsn) {
        note(&self.log, format!("confirm {lsn}"));
    }
    async fn shutdown(self) -> Result<()> {
        note(&self.log, "source shutdown");
        Ok(())
    }
}

impl Drop for FakeSource {
    fn drop(&mut self) {
        note(&self.log, "source closed");
    }
}

type Pending = Arc<Mutex<Vec<(String, oneshot::Sender<Result<()>>)>>>;

/// Deliveries complete when the test says; refuses ids starting with "big".
struct FakeSink {
    pending: Pending,
    outcomes: FuturesUnordered<BoxFuture<'static, (DeliveryToken, Result<()>)>>,
    log: Log,
}

impl EventSink for FakeSink {
    fn send(&mut self, event: OutboxEvent, token: DeliveryToken) -> Result<()> {
        let id = String::from_utf8_lossy(event.event_id()).into_owned();
        if id.starts_with("big") {
            return Err(Error::permanent(format!("event {id} is too large")));
        }
        note(&self.log, format!("send {id}"));
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().push((id, tx));
        self.outcomes.push(Box::pin(async move {
            (
                token,
                rx.await
                    .unwrap_or_else(|_| Err(Error::retryable("sink dropped"))),
            )
        }));
        Ok(())
    }
    async fn delivered(&mut self, out: &mut Vec<(DeliveryToken, Result<()>)>) {
        match self.outcomes.next().await {
            Some(o) => out.push(o),
            None => std::future::pending().await,
        }
        while let Some(Some(o)) = self.outcomes.next().now_or_never() {
            out.push(o);
        }
    }
    fn abort(self) {
        note(&self.log, "sink abort");
    }
}

const REL: u32 = 16384;

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

fn insert(id: &str) -> SourceEvent {
    let t = |s: &str| ColumnValue::Text(Bytes::copy_from_slice(s.as_bytes()));
    SourceEvent::Data {
        wal_start: Lsn::ZERO,
        data: Message::Insert(Insert {
            xid: None,
            rel_id: REL,
            new: TupleData::new(vec![t(id), t("Order"), t("k"), t("Created"), t("{}")]),
        })
        .to_bytes(),
    }
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

struct Run {
    log: Log,
    pending: Pending,
    stop: watch::Sender<bool>,
    beside: Option<oneshot::Sender<Error>>,
    task: tokio::task::JoinHandle<Result<PipelineExit>>,
}

/// Starts a run over `events` with a 300 ms shutdown timeout.
fn start(events: Vec<SourceEvent>) -> Run {
    let log: Log = Arc::default();
    let pending: Pending = Arc::default();
    let (stop, stop_rx) = watch::channel(false);
    let (beside_tx, beside_rx) = oneshot::channel::<Error>();
    let mut all = VecDeque::from(vec![
        begin(150),
        SourceEvent::Data {
            wal_start: Lsn::ZERO,
            data: relation(),
        },
    ]);
    all.extend(events);
    let source = FakeSource {
        events: Arc::new(Mutex::new(all)),
        more: Arc::new(Notify::new()),
        log: log.clone(),
    };
    let sink = FakeSink {
        pending: pending.clone(),
        outcomes: FuturesUnordered::new(),
        log: log.clone(),
    };
    let final_log = log.clone();
    let task = tokio::spawn(async move {
        let mut pipeline = Pipeline::new(
            PipelineSettings {
                max_in_flight_events: 100,
                max_in_flight_bytes: 1 << 20,
                shutdown_timeout: Duration::from_millis(300),
                stall_warning_after: Duration::from_secs(60),
                delivery_timeout: Duration::from_secs(600),
            },
            OutboxFilter::new(
                [TableName::parse("public.outbox").unwrap()],
                OutboxColumns::default(),
            ),
            Router::new(TopicTemplate::parse("outbox.event.${routedByValue}").unwrap()),
            Arc::new(Progress::default()),
        );
        let beside = async move {
            match beside_rx.await {
                Ok(e) => e,
                Err(_) => std::future::pending().await,
            }
        };
        run_pipeline(
            &mut pipeline,
            source,
            sink,
            Lsn::new(100),
            stop_rx,
            |_| {},
            beside,
            move |lsn| note(&final_log, format!("report final {lsn}")),
        )
        .await
    });
    Run {
        log,
        pending,
        stop,
        beside: Some(beside_tx),
        task,
    }
}

async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
}

fn deliver(r: &Run, id: &str, result: Result<()>) {
    let mut p = r.pending.lock().unwrap();
    let i = p.iter().position(|(x, _)| x == id).expect("pending event");
    let (_, tx) = p.remove(i);
    let _ = tx.send(result);
}

/// The calls after the last `send`/`confirm` of the loop itself.
fn closing(log: &Log) -> Vec<String> {
    let l = log.lock().unwrap();
    let first = l
        .iter()
        .position(|s| !s.starts_with("send ") && !s.starts_with("confirm "))
        .unwrap_or(l.len());
    l[first..].to_vec()
}

fn confirmed(log: &Log) -> Vec<String> {
    log.lock()
        .unwrap()
        .iter()
        .filter(|s| s.starts_with("confirm "))
        .cloned()
        .collect()
}

/// Shutdown with an event still undelivered when the timeout runs out: the
/// sink is aborted first (the undelivered event is dropped with it), then the
/// final position, the delivered prefix only, is reported, then the
/// connection is shut down (which sends it to the server).
#[tokio::test]
async fn a_shutdown_aborts_the_sink_then_reports_the_final_position_then_closes() {
    let r = start(vec![
        insert("a1"),
        commit(200),
        begin(250),
        insert("b1"),
        commit(300),
    ]);
    settle().await;
    deliver(&r, "a1", Ok(()));
    settle().await;
    r.stop.send(true).unwrap();
    let exit = r.task.await.unwrap().unwrap();
    assert_eq!(
        exit,
        PipelineExit::Shutdown {
            confirmed: Lsn::new(200),
            abandoned_events: 1
        }
    );
    assert_eq!(
        confirmed(&r.log),
        ["confirm 0/C8"],
        "only what the tracker says"
    );
    assert_eq!(
        closing(&r.log),
        [
            "sink abort",
            "report final 0/C8",
            "source shutdown",
            "source closed"
        ]
    );
}

/// A retryable delivery failure: the sink is aborted before the source is
/// dropped (so nothing of this run reaches Kafka once the next run streams),
/// no final position is reported and the source is not shut down (the next
/// run resumes from the slot).
#[tokio::test]
async fn a_restart_aborts_the_sink_before_dropping_the_source() {
    let r = start(vec![
        insert("a1"),
        commit(200),
        begin(250),
        insert("b1"),
        insert("b2"),
        commit(300),
    ]);
    settle().await;
    deliver(&r, "a1", Ok(()));
    settle().await;
    deliver(&r, "b2", Ok(()));
    deliver(&r, "b1", Err(Error::retryable("broker gone")));
    let err = r.task.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Retryable);
    assert_eq!(confirmed(&r.log), ["confirm 0/C8"]);
    assert_eq!(closing(&r.log), ["sink abort", "source closed"]);
}

/// An event the sink refuses for good stops walcast AT it: the events before
/// it are delivered and confirmed, then the sink is aborted, the final
/// position reported and the connection shut down.
#[tokio::test]
async fn a_stop_at_an_unpublishable_event_reports_the_position_before_it() {
    let r = start(vec![
        insert("a1"),
        commit(200),
        begin(250),
        insert("big1"),
        commit(300),
    ]);
    settle().await;
    deliver(&r, "a1", Ok(()));
    let err = r.task.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Permanent);
    assert!(err.to_string().contains("big1"), "{err}");
    assert_eq!(confirmed(&r.log), ["confirm 0/C8"]);
    assert_eq!(
        closing(&r.log),
        [
            "sink abort",
            "report final 0/C8",
            "source shutdown",
            "source closed"
        ]
    );
}

/// An error of the periodic check beside the pipeline ends the run in the
/// same order: an operator error (an outbox table swapped) closes like a
/// stop, a retryable one like a restart. Events in flight then are never
/// awaited or confirmed.
#[tokio::test]
async fn an_error_beside_the_pipeline_ends_the_run_in_the_same_order() {
    for (error, expected) in [
        (
            Error::operator("outbox table public.outbox was replaced"),
            vec![
                "sink abort",
                "report final 0/C8",
                "source shutdown",
                "source closed",
            ],
        ),
        (
            Error::retryable("the check's session failed"),
            vec!["sink abort", "source closed"],
        ),
    ] {
        let mut r = start(vec![insert("a1"), commit(200), begin(250), insert("b1")]);
        settle().await;
        deliver(&r, "a1", Ok(()));
        settle().await;
        r.beside.take().unwrap().send(error).unwrap();
        r.task.await.unwrap().unwrap_err();
        assert_eq!(confirmed(&r.log), ["confirm 0/C8"]);
        assert_eq!(closing(&r.log), expected);
    }
}
