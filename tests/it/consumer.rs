//! The idempotent consumer library (`walcast-consumer`, issue 13) against the
//! real services: deduplication in the handler's transaction, retries then
//! the dead-letter topic, a SIGKILL between the handler's commit and the
//! offset commit, and per-key order across a rebalance.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_postgres::Transaction;
use walcast_consumer::{Consumer, ConsumerConfig, Delivery, Handler, HandlerError, Stats};
use walcast_outbox::migrations;
use walcast_tests::kafka::{create_topics, TopicReader};
use walcast_tests::pg::TestDb;
use walcast_tests::TestEnv;

/// A database with `processed_events` and the handler's `effects` table.
async fn consumer_db(env: &TestEnv, tag: &str) -> Result<TestDb> {
    let db = TestDb::create_on(env, env.pg_port, tag, false).await?;
    let c = db.admin(env).await?;
    migrations::apply(&c, migrations::Layout::None).await?;
    c.batch_execute(
        "CREATE TABLE effects (n bigserial PRIMARY KEY, event_id text NOT NULL, \
         key text NOT NULL, seq bigint NOT NULL)",
    )
    .await?;
    Ok(db)
}

fn pg_url(env: &TestEnv, db: &TestDb) -> String {
    format!(
        "host={} port={} dbname={} user={} password={}",
        env.pg_host, db.port, db.name, env.admin_user, env.admin_password
    )
}

/// Records each event as one `effects` row (the side effect). Header `fail`
/// = `retry` or `permanent` makes it fail; header `sleep_ms` slows it.
#[derive(Debug, Default)]
struct Effects {
    attempts: Mutex<HashMap<String, Vec<Instant>>>,
}

impl Handler for Effects {
    async fn handle(&self, tx: &Transaction<'_>, e: &Delivery) -> Result<(), HandlerError> {
        self.attempts
            .lock()
            .unwrap()
            .entry(e.id.clone())
            .or_default()
            .push(Instant::now());
        if let Some(ms) = e.header("sleep_ms").and_then(|s| s.parse().ok()) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        match e.header("fail") {
            Some("retry") => return Err(HandlerError::retryable("downstream busy")),
            Some("permanent") => return Err(HandlerError::permanent("amount is negative")),
            _ => {}
        }
        let seq: i64 = e.header("seq").and_then(|s| s.parse().ok()).unwrap_or(0);
        tx.execute(
            "INSERT INTO effects (event_id, key, seq) VALUES ($1, $2, $3)",
            &[&e.id, &e.key_str(), &seq],
        )
        .await?;
        Ok(())
    }
}

fn producer(env: &TestEnv) -> Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", &env.kafka_bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()?)
}

/// Produces a record with the `id` header and `extra` headers.
async fn produce(
    p: &FutureProducer,
    topic: &str,
    key: &str,
    id: &str,
    extra: &[(&str, &str)],
) -> Result<()> {
    let mut h = OwnedHeaders::new().insert(Header {
        key: "id",
        value: Some(id),
    });
    for (k, v) in extra {
        h = h.insert(Header {
            key: k,
            value: Some(*v),
        });
    }
    let payload = format!("{{\"id\": \"{id}\"}}");
    p.send(
        FutureRecord::to(topic)
            .key(key)
            .payload(&payload)
            .headers(h),
        Duration::from_secs(30),
    )
    .await
    .map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
    Ok(())
}

/// Topic and dead-letter topic names of a test.
fn names(db: &TestDb) -> (String, String, String) {
    (
        format!("{}.Withdrawal", db.topic_prefix),
        format!("{}.dlq", db.topic_prefix),
        format!("{}-group", db.topic_prefix),
    )
}

fn config(env: &TestEnv, db: &TestDb) -> ConsumerConfig {
    let (topic, dlq, group) = names(db);
    let mut c = ConsumerConfig::new(&env.kafka_bootstrap, group, vec![topic], pg_url(env, db));
    c.dead_letter_topic = dlq;
    c.commit_interval = Duration::from_millis(200);
    c.retry_backoff = vec![
        Duration::from_millis(100),
        Duration::from_millis(300),
        Duration::from_millis(600),
    ];
    c.shutdown_timeout = Duration::from_secs(10);
    c
}

/// A consumer running in the background: its counters, the sender that
/// stops it, and its task.
type Running = (
    Arc<Stats>,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), walcast_consumer::Error>>,
);

/// Runs a consumer in the background; the sender stops it.
fn spawn<H: Handler>(cfg: ConsumerConfig, h: H) -> Result<Running> {
    let c = Consumer::new(cfg, h)?;
    let stats = c.stats();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let j = tokio::spawn(c.run(async move {
        let _ = rx.await;
    }));
    Ok((stats, tx, j))
}

async fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

async fn effects_of(c: &tokio_postgres::Client) -> Result<HashMap<String, i64>> {
    Ok(
        c.query("SELECT event_id, count(*) FROM effects GROUP BY 1", &[])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect(),
    )
}

/// The same record delivered five times (five copies in the topic, as a
/// producer retry or a relay restart leaves them) causes one side effect;
/// the other four are counted as duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_redelivered_event_has_one_side_effect() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let db = consumer_db(env, "cdup").await?;
    let (topic, dlq, _) = names(&db);
    create_topics(&env.kafka_bootstrap, &[topic.as_str(), dlq.as_str()], 3).await?;
    let p = producer(env)?;
    for _ in 0..5 {
        produce(&p, &topic, "w-1", "event-1", &[]).await?;
    }
    produce(&p, &topic, "w-2", "event-2", &[]).await?;
    produce(&p, &topic, "w-1", "event-3", &[]).await?;
    let (stats, stop, j) = spawn(config(env, &db), Effects::default())?;
    let seen =
        || stats.processed.load(Ordering::SeqCst) + stats.duplicates.load(Ordering::SeqCst) >= 7;
    assert!(
        wait_for(Duration::from_secs(60), seen).await,
        "not all 7 records were consumed"
    );
    let _ = stop.send(());
    j.await??;
    let c = db.admin(env).await?;
    let effects = effects_of(&c).await?;
    assert_eq!(effects.get("event-1"), Some(&1), "{effects:?}");
    assert_eq!(effects.get("event-2"), Some(&1));
    assert_eq!(effects.get("event-3"), Some(&1));
    assert_eq!(stats.processed.load(Ordering::SeqCst), 3);
    assert_eq!(stats.duplicates.load(Ordering::SeqCst), 4);
    drop(c);
    db.drop(env).await?;
    Ok(())
}

/// A retryable failure is retried after 100, 300 and 600 ms, then
/// dead-lettered; a permanent one at once; both with the error and origin
/// headers; the records behind them on the same partition are processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_retries_on_schedule_then_dead_letters() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let db = consumer_db(env, "cdlq").await?;
    let (topic, dlq, _) = names(&db);
    create_topics(&env.kafka_bootstrap, &[topic.as_str(), dlq.as_str()], 3).await?;
    let p = producer(env)?;
    // One key: one partition, in this order.
    produce(&p, &topic, "w-9", "busy", &[("fail", "retry")]).await?;
    produce(&p, &topic, "w-9", "after-busy", &[]).await?;
    produce(&p, &topic, "w-9", "negative", &[("fail", "permanent")]).await?;
    produce(&p, &topic, "w-9", "after-negative", &[]).await?;
    let handler = Arc::new(Effects::default());
    struct Shared(Arc<Effects>);
    impl Handler for Shared {
        async fn handle(&self, tx: &Transaction<'_>, e: &Delivery) -> Result<(), HandlerError> {
            self.0.handle(tx, e).await
        }
    }
    let (stats, stop, j) = spawn(config(env, &db), Shared(handler.clone()))?;
    let done = || {
        stats.processed.load(Ordering::SeqCst) >= 2
            && stats.dead_lettered.load(Ordering::SeqCst) >= 2
    };
    assert!(
        wait_for(Duration::from_secs(60), done).await,
        "records not all handled"
    );
    let _ = stop.send(());
    j.await??;

    let attempts = handler.attempts.lock().unwrap().clone();
    let busy = &attempts["busy"];
    assert_eq!(busy.len(), 4, "one try and three retries");
    for (i, want) in [100u64, 300, 600].iter().enumerate() {
        let gap = busy[i + 1] - busy[i];
        assert!(
            gap >= Duration::from_millis(*want) && gap < Duration::from_millis(want + 2000),
            "retry {i} after {gap:?}, schedule says {want} ms"
        );
    }
    assert_eq!(
        attempts["negative"].len(),
        1,
        "a permanent error is not retried"
    );
    assert_eq!(stats.retries.load(Ordering::SeqCst), 3);

    let c = db.admin(env).await?;
    let effects = effects_of(&c).await?;
    assert_eq!(effects.get("after-busy"), Some(&1), "the partition went on");
    assert_eq!(effects.get("after-negative"), Some(&1));
    assert!(!effects.contains_key("busy") && !effects.contains_key("negative"));
    let dedupe: i64 = c
        .query_one(
            "SELECT count(*) FROM processed_events WHERE event_id IN ('busy', 'negative')",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(dedupe, 0, "a failed event is not marked processed");

    let mut r = TopicReader::new(&env.kafka_bootstrap, &[dlq.as_str()])?;
    assert!(r.read_at_least(2, Duration::from_secs(30))?);
    r.read_to_end(Duration::from_secs(10))?;
    assert_eq!(r.records.len(), 2);
    let by: HashMap<String, _> = r
        .records
        .iter()
        .map(|x| (x.header("id").unwrap(), x))
        .collect();
    for (id, kind, reason) in [
        ("busy", "retryable", "downstream busy"),
        ("negative", "permanent", "amount is negative"),
    ] {
        let x = by[id];
        assert_eq!(x.key_str(), "w-9");
        assert_eq!(x.json()["id"], id);
        assert_eq!(x.header("walcast.error.kind").as_deref(), Some(kind));
        assert_eq!(x.header("walcast.error.reason").as_deref(), Some(reason));
        assert_eq!(
            x.header("walcast.original.topic").as_deref(),
            Some(topic.as_str())
        );
        assert!(x
            .header("walcast.original.partition")
            .unwrap()
            .parse::<i32>()
            .is_ok());
        assert!(x
            .header("walcast.original.offset")
            .unwrap()
            .parse::<i64>()
            .is_ok());
        let at: u128 = x.header("walcast.failed.at").unwrap().parse()?;
        assert!(at > 1_600_000_000_000);
    }
    assert_eq!(
        by["busy"].header("walcast.original.offset").as_deref(),
        Some("0")
    );
    assert_eq!(
        by["negative"].header("walcast.original.offset").as_deref(),
        Some("2")
    );
    drop(c);
    db.drop(env).await?;
    Ok(())
}

const CHILD_ENV: &str = "WALCAST_TEST_CONSUMER_CHILD";

/// Not a test on its own: the child process of
/// `consumer_kill9_after_the_handler_commit_causes_no_second_side_effect`
/// (the test binary runs itself with this filter). It consumes with offset
/// commits effectively off until it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of the kill -9 consumer test"]
async fn consumer_child_process() -> Result<()> {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return Ok(());
    };
    let v: serde_json::Value = serde_json::from_str(&spec)?;
    let s = |k: &str| v[k].as_str().unwrap().to_string();
    let mut cfg = ConsumerConfig::new(s("bootstrap"), s("group"), vec![s("topic")], s("pg"));
    cfg.dead_letter_topic = s("dlq");
    cfg.commit_interval = Duration::from_secs(3600);
    let c = Consumer::new(cfg, Effects::default())?;
    c.run(std::future::pending()).await?;
    Ok(())
}

/// A consumer process killed with SIGKILL after its handler transactions
/// committed but before any offset commit: the next consumer of the group
/// reads every record again and causes no second side effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_kill9_after_the_handler_commit_causes_no_second_side_effect() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let db = consumer_db(env, "ckill").await?;
    let (topic, dlq, group) = names(&db);
    create_topics(&env.kafka_bootstrap, &[topic.as_str(), dlq.as_str()], 3).await?;
    let p = producer(env)?;
    for i in 0..200 {
        produce(&p, &topic, &format!("w-{}", i % 17), &format!("e-{i}"), &[]).await?;
    }
    let spec = serde_json::json!({
        "bootstrap": env.kafka_bootstrap, "group": group, "topic": topic,
        "dlq": dlq, "pg": pg_url(env, &db),
    });
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args([
            "consumer::consumer_child_process",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_ENV, spec.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting the child consumer")?;
    let c = db.admin(env).await?;
    let end = Instant::now() + Duration::from_secs(90);
    loop {
        let n: i64 = c
            .query_one("SELECT count(*) FROM effects", &[])
            .await?
            .get(0);
        if n >= 200 {
            break;
        }
        assert!(
            Instant::now() < end,
            "the child consumer handled only {n} of 200"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child.kill()?; // SIGKILL
    child.wait()?;

    let (stats, stop, j) = spawn(config(env, &db), Effects::default())?;
    let seen =
        || stats.processed.load(Ordering::SeqCst) + stats.duplicates.load(Ordering::SeqCst) >= 200;
    assert!(
        wait_for(Duration::from_secs(90), seen).await,
        "the second consumer saw too few records"
    );
    let _ = stop.send(());
    j.await??;
    assert_eq!(
        stats.duplicates.load(Ordering::SeqCst),
        200,
        "every record came again (no offset was committed before the kill)"
    );
    let effects = effects_of(&c).await?;
    assert_eq!(effects.len(), 200);
    let twice: Vec<_> = effects.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "side effects repeated: {twice:?}");
    drop(c);
    db.drop(env).await?;
    Ok(())
}

async fn count(c: &tokio_postgres::Client) -> Result<i64> {
    Ok(
        c.query_one("SELECT count(DISTINCT event_id) FROM effects", &[])
            .await?
            .get(0),
    )
}

/// Two instances of one group: A alone, then B joins (rebalance), then A
/// stops (rebalance again). Every event has exactly one side effect and,
/// per key, the side effects happen in the order of the records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_per_key_order_holds_across_a_rebalance() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let db = consumer_db(env, "creb").await?;
    let (topic, dlq, _) = names(&db);
    create_topics(&env.kafka_bootstrap, &[topic.as_str(), dlq.as_str()], 6).await?;
    let p = producer(env)?;
    let keys = 30;
    let per_key = 60;
    let mut sends = Vec::new();
    for s in 0..per_key {
        for k in 0..keys {
            let (key, id, seq) = (format!("w-{k}"), format!("e-{k}-{s}"), s.to_string());
            sends.push((key, id, seq));
        }
    }
    for (key, id, seq) in &sends {
        produce(&p, &topic, key, id, &[("seq", seq), ("sleep_ms", "2")]).await?;
    }
    let total = (keys * per_key) as i64;
    let c = db.admin(env).await?;
    let (_sa, stop_a, ja) = spawn(config(env, &db), Effects::default())?;
    let end = Instant::now() + Duration::from_secs(120);
    while count(&c).await? < total / 5 {
        assert!(Instant::now() < end, "A made no progress");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_sb, stop_b, jb) = spawn(config(env, &db), Effects::default())?;
    while count(&c).await? < total / 2 {
        assert!(Instant::now() < end, "no progress after B joined");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_a.send(());
    ja.await??;
    // On a timeout the order is checked first (it says more), then the count.
    while count(&c).await? < total && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_b.send(());
    jb.await??;
    let (a, b) = (
        _sa.processed.load(Ordering::SeqCst),
        _sb.processed.load(Ordering::SeqCst),
    );
    eprintln!("rebalance: A processed {a}, B processed {b}");
    assert!(
        a > 0 && b > 0,
        "both instances must have worked (A {a}, B {b})"
    );

    let rows = c
        .query("SELECT key, seq, event_id FROM effects ORDER BY n", &[])
        .await?;
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut ids = HashSet::new();
    for r in &rows {
        let (key, seq, id): (String, i64, String) = (r.get(0), r.get(1), r.get(2));
        assert!(ids.insert(id.clone()), "second side effect of {id}");
        if let Some(prev) = last.insert(key.clone(), seq) {
            assert!(prev < seq, "key {key}: seq {seq} after {prev}");
        }
    }
    assert_eq!(ids.len() as i64, total, "B did not finish after A stopped");
    drop(c);
    db.drop(env).await?;
    Ok(())
}

/// Fails every record whose `fail` header is `until-fixed` while `broken` is set.
#[derive(Debug)]
struct Fixable {
    broken: std::sync::atomic::AtomicBool,
}

impl Handler for Fixable {
    async fn handle(&self, tx: &Transaction<'_>, e: &Delivery) -> Result<(), HandlerError> {
        if e.header("fail") == Some("until-fixed") && self.broken.load(Ordering::SeqCst) {
            return Err(HandlerError::permanent("handler bug"));
        }
        Effects::default().handle(tx, e).await
    }
}

/// Runs a consumer of `cfg` until it has seen `n` records, then stops it.
async fn consume_n(cfg: ConsumerConfig, broken: bool, n: u64) -> Result<Arc<Stats>> {
    let (stats, stop, j) = spawn(
        cfg,
        Fixable {
            broken: broken.into(),
        },
    )?;
    let s = stats.clone();
    let seen = move || {
        s.processed.load(Ordering::SeqCst)
            + s.duplicates.load(Ordering::SeqCst)
            + s.dead_lettered.load(Ordering::SeqCst)
            >= n
    };
    assert!(
        wait_for(Duration::from_secs(60), seen).await,
        "fewer than {n} records seen"
    );
    // Anything beyond n would show up now.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _ = stop.send(());
    j.await??;
    Ok(stats)
}

fn counts(s: &Stats) -> (u64, u64, u64) {
    (
        s.processed.load(Ordering::SeqCst),
        s.duplicates.load(Ordering::SeqCst),
        s.dead_lettered.load(Ordering::SeqCst),
    )
}

async fn rewind_retrying(
    env: &TestEnv,
    group: &str,
    topic: &str,
    to: walcast_consumer::RewindTo,
) -> Result<Vec<(i32, i64)>> {
    let mut last = None;
    for _ in 0..40 {
        match walcast_consumer::rewind(&env.kafka_bootstrap, group, topic, to) {
            Ok(v) => return Ok(v),
            Err(e) => last = Some(e),
        }
        // The stopped instance may still count as a member for a moment.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(anyhow::anyhow!("rewind kept failing: {last:?}"))
}

/// Replay: a record dead-lettered by a handler bug is re-driven to its
/// topic and processed once the handler is fixed; rewinding the group to
/// offset 0 re-consumes everything as duplicates (no second side effect);
/// rewinding to a time re-consumes from the first record at or after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_redrive_and_rewind_replay_without_second_side_effects() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let db = consumer_db(env, "creplay").await?;
    let (topic, dlq, group) = names(&db);
    create_topics(&env.kafka_bootstrap, &[topic.as_str()], 1).await?;
    create_topics(&env.kafka_bootstrap, &[dlq.as_str()], 3).await?;
    let p = producer(env)?;
    for i in 0..5 {
        let fail = if i == 3 { "until-fixed" } else { "no" };
        produce(&p, &topic, "w-1", &format!("r-{i}"), &[("fail", fail)]).await?;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mid = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    tokio::time::sleep(Duration::from_millis(100)).await;
    for i in 5..10 {
        produce(&p, &topic, "w-1", &format!("r-{i}"), &[]).await?;
    }

    // 1. The handler bug dead-letters r-3.
    let s = consume_n(config(env, &db), true, 10).await?;
    assert_eq!(counts(&s), (9, 0, 1));
    // 2. Re-drive it; the fixed handler processes it.
    let n = walcast_consumer::redrive(&env.kafka_bootstrap, &dlq).await?;
    assert_eq!(n, 1);
    let s = consume_n(config(env, &db), false, 1).await?;
    assert_eq!(counts(&s), (1, 0, 0));
    let c = db.admin(env).await?;
    let effects = effects_of(&c).await?;
    assert_eq!(effects.len(), 10);
    assert!(effects.values().all(|n| *n == 1), "{effects:?}");
    // 3. Rewind to 0: all 11 records again, all duplicates.
    let at = rewind_retrying(env, &group, &topic, walcast_consumer::RewindTo::Offset(0)).await?;
    assert_eq!(at, vec![(0, 0)]);
    let s = consume_n(config(env, &db), false, 11).await?;
    assert_eq!(counts(&s), (0, 11, 0));
    // 4. Rewind to the time between r-4 and r-5: r-5..r-9 and the re-driven r-3.
    let at = rewind_retrying(
        env,
        &group,
        &topic,
        walcast_consumer::RewindTo::TimestampMs(mid),
    )
    .await?;
    assert_eq!(at, vec![(0, 5)]);
    let s = consume_n(config(env, &db), false, 6).await?;
    assert_eq!(counts(&s), (0, 6, 0));
    let effects = effects_of(&c).await?;
    assert_eq!(effects.len(), 10);
    assert!(effects.values().all(|n| *n == 1), "{effects:?}");
    drop(c);
    db.drop(env).await?;
    Ok(())
}

/// Holds every record with a `hold` header until `released` is set.
#[derive(Debug, Default)]
struct Gated {
    released: Arc<std::sync::atomic::AtomicBool>,
    held: Arc<std::sync::atomic::AtomicU64>,
}

impl Handler for Gated {
    async fn handle(&self, tx: &Transaction<'_>, e: &Delivery) -> Result<(), HandlerError> {
        if e.header("hold").is_some() {
            self.held.fetch_add(1, Ordering::SeqCst);
            while !self.released.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Effects::default().handle(tx, e).await
    }
}

/// A slow partition does not hold up the others: partition 0's handler is
/// stuck with its queue (capacity 1) full, yet partition 1's records are
/// all handled meanwhile; once released, partition 0's records are handled
/// once each, in offset order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_a_stuck_partition_does_not_hold_up_the_others() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let db = consumer_db(env, "chol").await?;
    let (topic, dlq, _) = names(&db);
    create_topics(&env.kafka_bootstrap, &[topic.as_str(), dlq.as_str()], 2).await?;
    let p = producer(env)?;
    let send = |partition: i32, key: String, id: String, seq: String, hold: bool| {
        let p = p.clone();
        let topic = topic.clone();
        async move {
            let mut h = OwnedHeaders::new()
                .insert(Header {
                    key: "id",
                    value: Some(&id),
                })
                .insert(Header {
                    key: "seq",
                    value: Some(&seq),
                });
            if hold {
                h = h.insert(Header {
                    key: "hold",
                    value: Some("1"),
                });
            }
            p.send(
                FutureRecord::to(&topic)
                    .partition(partition)
                    .key(&key)
                    .payload("{}")
                    .headers(h),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))
        }
    };
    for s in 1..=6 {
        send(0, "slow".into(), format!("s-{s}"), s.to_string(), true).await?;
    }
    let mut cfg = config(env, &db);
    cfg.queue_capacity = 1;
    let gated = Gated::default();
    let (released, held) = (gated.released.clone(), gated.held.clone());
    let (_stats, stop, j) = spawn(cfg, gated)?;
    assert!(
        wait_for(Duration::from_secs(60), || held.load(Ordering::SeqCst) >= 1).await,
        "the consumer never reached partition 0's first record"
    );
    // Give the consumer time to read partition 0's other records (one fits
    // the queue, the next finds it full).
    tokio::time::sleep(Duration::from_secs(2)).await;
    for s in 1..=20 {
        send(1, "fast".into(), format!("f-{s}"), s.to_string(), false).await?;
    }
    let c = db.admin(env).await?;
    let end = Instant::now() + Duration::from_secs(30);
    let mut fast = 0;
    while Instant::now() < end {
        fast = c
            .query_one("SELECT count(*) FROM effects WHERE key = 'fast'", &[])
            .await?
            .get::<_, i64>(0);
        if fast == 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        fast, 20,
        "partition 1 was held up by partition 0's full queue: {fast} of 20 handled in 30 s"
    );
    released.store(true, Ordering::SeqCst);
    let end = Instant::now() + Duration::from_secs(60);
    let mut slow: Vec<i64> = Vec::new();
    while Instant::now() < end {
        slow = c
            .query("SELECT seq FROM effects WHERE key = 'slow' ORDER BY n", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if slow.len() >= 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        slow,
        (1..=6).collect::<Vec<i64>>(),
        "partition 0 after release"
    );
    let _ = stop.send(());
    j.await??;
    drop(c);
    db.drop(env).await?;
    Ok(())
}
