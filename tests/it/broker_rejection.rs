//! Issue 10, item 2: a record the broker rejects for good (larger than its
//! topic's `max.message.bytes`) must not let the later records of its
//! partition reach Kafka ahead of it, and the error must name the record that
//! is actually too large. Real broker-side rejections: topics with a small
//! `max.message.bytes` and a producer whose own `message.max.bytes` is larger.

use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use tokio_postgres::Client;
use walcast_tests::checker::{check, Outcome, WrittenEvent, WrittenTxn};
use walcast_tests::kafka::{alter_topic_config, create_topics_with, Record, TopicReader};
use walcast_tests::pg::TestDb;
use walcast_tests::process::{Walcast, WalcastConfig};
use walcast_tests::TestEnv;

use crate::common::{bin, current_wal_lsn, observed};

/// `walcast run`'s exit code for an event that can never be published.
const EXIT_PERMANENT: i32 = 3;
/// The topics' small limit.
const SMALL_LIMIT: &str = "100000";

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// One test's database, topic and walcast configuration (the producer's
/// `message.max.bytes` raised to 5 MB, as walcast's old hint suggested).
struct Case {
    db: TestDb,
    pg: Client,
    topic: String,
    state: tempfile::TempDir,
    cfg: WalcastConfig,
}

async fn case(env: &'static TestEnv, tag: &str, topic_configs: &[(&str, &str)]) -> Result<Case> {
    let db = TestDb::create(env, tag).await?;
    let pg = db.admin(env).await?;
    let topic = format!("{}.A", db.topic_prefix);
    create_topics_with(&env.kafka_bootstrap, &[&topic], 3, 1, topic_configs).await?;
    let state = tempfile::tempdir()?;
    let cfg = WalcastConfig::for_db(env, &db, state.path()).set(
        "kafka.properties",
        "\"message.max.bytes\"",
        "\"5000000\"",
    );
    Ok(Case {
        db,
        pg,
        topic,
        state,
        cfg,
    })
}

/// Inserts one outbox row; `big_kb` > 0 makes its payload that many KB of
/// random hex (incompressible enough that compression cannot save it).
async fn insert(c: &Client, id: &str, key: &str, big_kb: i32) -> Result<()> {
    c.execute(
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) \
         SELECT $1::text::uuid, 'A', $2, 'T', jsonb_build_object('blob', \
           (SELECT coalesce(string_agg(md5(random()::text), ''), '') FROM generate_series(1, $3::int * 32)))",
        &[&id, &key, &big_kb],
    )
    .await
    .context("inserting an outbox row")?;
    Ok(())
}

/// The ids (`id` header) of `records` with key `key`, in offset order.
fn ids_of_key(records: &[Record], key: &str) -> Vec<String> {
    let mut r: Vec<&Record> = records.iter().filter(|r| r.key_str() == key).collect();
    r.sort_by_key(|r| (r.partition, r.offset));
    r.iter().filter_map(|r| r.header("id")).collect()
}

/// Everything Kafka holds on `topic` now.
fn read_all(env: &TestEnv, topic: &str) -> Result<Vec<Record>> {
    let mut reader = TopicReader::new(&env.kafka_bootstrap, &[topic])?;
    reader.read_to_end(Duration::from_secs(60))?;
    Ok(reader.records)
}

/// The line of walcast's final error (printed for the test's output).
fn error_line(log: &str) -> String {
    let line = log
        .lines()
        .rev()
        .find(|l| l.starts_with("walcast: error"))
        .unwrap_or_default()
        .to_string();
    eprintln!("{line}");
    line
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Starts walcast (creating the slot on the first run) and waits until it streams.
fn start(c: &Case) -> Result<Walcast> {
    let mut w = Walcast::start(&bin(), c.state.path(), &c.cfg)?;
    blocking(|| w.wait_streaming())?;
    Ok(w)
}

/// Waits until walcast exits by itself; its exit code and log.
fn exit_of(mut w: Walcast) -> Result<(i32, String)> {
    let status = blocking(|| w.wait_exit(Duration::from_secs(120)))?;
    Ok((status.code().unwrap_or(-1), w.log_text()))
}

/// The six single-event transactions of one key, in commit order.
fn txns_of(ids: &[String], key: &str) -> Vec<WrittenTxn> {
    ids.iter()
        .map(|id| WrittenTxn {
            events: vec![WrittenEvent {
                id: id.clone(),
                key: key.into(),
            }],
            outcome: Outcome::Committed,
            end_lsn: None,
        })
        .collect()
}

/// Raises the topic's limit, runs walcast again and checks that every event
/// of `txns` arrives, per key in commit order (first occurrences).
async fn recovers_in_order(env: &'static TestEnv, c: &Case, txns: &[WrittenTxn]) -> Result<()> {
    alter_topic_config(
        &env.kafka_bootstrap,
        &c.topic,
        &[("max.message.bytes", "2000000")],
    )
    .await?;
    let mut w = Walcast::start(&bin(), c.state.path(), &c.cfg)?;
    let want: std::collections::HashSet<String> = txns
        .iter()
        .flat_map(|t| t.events.iter().map(|e| e.id.clone()))
        .collect();
    let mut reader = TopicReader::new(&env.kafka_bootstrap, &[c.topic.as_str()])?;
    let arrived = blocking(|| {
        reader.read_until(Duration::from_secs(90), |recs| {
            let have: std::collections::HashSet<String> =
                recs.iter().filter_map(|r| r.header("id")).collect();
            want.iter().all(|id| have.contains(id))
        })
    })?;
    ensure!(
        arrived,
        "after raising max.message.bytes not every event arrived:\n{}",
        tail(&w.log_text(), 30)
    );
    blocking(|| reader.read_to_end(Duration::from_secs(60)))?;
    let report = check(txns, &observed(&reader.records), &[]);
    ensure!(report.is_clean(), "after the fix: {report}");
    w.terminate()?;
    blocking(|| w.wait_exit(Duration::from_secs(60)))?;
    Ok(())
}

/// The reproduction: topic max.message.bytes = 100000, producer
/// message.max.bytes = 5 MB, six events of one key committed back to back,
/// the second one 1.6 MB. walcast exits 3 naming event 2; Kafka holds only
/// event 1; the slot stays before event 2. After the topic's limit is raised,
/// events 2..6 arrive in order after 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_event_stops_walcast_before_anything_after_it() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let c = case(env, "brkrej", &[("max.message.bytes", SMALL_LIMIT)]).await?;
    let w = start(&c)?;
    let ids: Vec<String> = (0..6).map(|_| uuid()).collect();
    let mut after_2 = 0;
    for (i, id) in ids.iter().enumerate() {
        insert(&c.pg, id, "order-1", if i == 1 { 1_600 } else { 0 }).await?;
        if i == 1 {
            after_2 = current_wal_lsn(&c.pg).await?;
        }
    }
    let (code, log) = exit_of(w)?;
    let err = error_line(&log);
    ensure!(
        code == EXIT_PERMANENT,
        "expected exit {EXIT_PERMANENT}, got {code}:\n{}",
        tail(&log, 30)
    );
    ensure!(
        err.contains(&ids[1]) && err.contains("max.message.bytes"),
        "the error does not name event 2 ({}) and the topic limit: {err}",
        ids[1]
    );
    for (i, id) in ids.iter().enumerate().filter(|(i, _)| *i != 1) {
        ensure!(
            !err.contains(id.as_str()),
            "the error blames event {} ({id}): {err}",
            i + 1
        );
    }
    let records = blocking(|| read_all(env, &c.topic))?;
    let held = ids_of_key(&records, "order-1");
    ensure!(
        held == ids[..1],
        "Kafka must hold only event 1 (nothing after event 2 of the key); it holds events {:?}",
        held.iter()
            .map(|h| ids.iter().position(|i| i == h).map_or(0, |p| p + 1))
            .collect::<Vec<_>>()
    );
    let confirmed = c.db.confirmed_flush_lsn(env).await?.unwrap_or(0);
    ensure!(
        confirmed < after_2,
        "the slot moved past event 2's transaction ({confirmed:X} >= {after_2:X})"
    );

    recovers_in_order(env, &c, &txns_of(&ids, "order-1")).await?;
    drop(c.pg);
    c.db.drop(env).await?;
    Ok(())
}

/// An oversize event among small ones of the same transaction (the same key
/// and another key): the error names the oversize event, not a neighbour;
/// every event committed before it is in Kafka, nothing after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_event_does_not_take_its_batch_mates_with_it() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let c = case(env, "brkmates", &[("max.message.bytes", SMALL_LIMIT)]).await?;
    let w = start(&c)?;
    let key_of = |i: usize| if i.is_multiple_of(2) { "k1" } else { "k2" };
    // One earlier transaction, then: 8 small, the oversize one (key k1), 4 small.
    let early: Vec<String> = (0..3).map(|_| uuid()).collect();
    for (i, id) in early.iter().enumerate() {
        insert(&c.pg, id, key_of(i), 0).await?;
    }
    let before: Vec<String> = (0..8).map(|_| uuid()).collect();
    let big = uuid();
    let after: Vec<String> = (0..4).map(|_| uuid()).collect();
    c.pg.batch_execute("BEGIN").await?;
    for (i, id) in before.iter().enumerate() {
        insert(&c.pg, id, key_of(i), 0).await?;
    }
    insert(&c.pg, &big, "k1", 150).await?;
    for (i, id) in after.iter().enumerate() {
        insert(&c.pg, id, key_of(i), 0).await?;
    }
    c.pg.batch_execute("COMMIT").await?;
    let after_commit = current_wal_lsn(&c.pg).await?;
    let later = uuid();
    insert(&c.pg, &later, "k1", 0).await?;

    let (code, log) = exit_of(w)?;
    let err = error_line(&log);
    ensure!(
        code == EXIT_PERMANENT,
        "expected exit {EXIT_PERMANENT}, got {code}:\n{}",
        tail(&log, 30)
    );
    ensure!(
        err.contains(&big),
        "the error does not name the oversize event {big}: {err}"
    );
    for id in early.iter().chain(&before).chain(&after).chain([&later]) {
        ensure!(
            !err.contains(id.as_str()),
            "the error blames the small event {id}: {err}"
        );
    }
    let records = blocking(|| read_all(env, &c.topic))?;
    let held: std::collections::HashSet<String> =
        records.iter().filter_map(|r| r.header("id")).collect();
    for id in early.iter().chain(&before) {
        ensure!(
            held.contains(id),
            "event {id}, committed before the oversize one, is not in Kafka ({} records held)",
            held.len()
        );
    }
    for id in after.iter().chain([&big, &later]) {
        ensure!(
            !held.contains(id),
            "event {id}, at or after the oversize one, reached Kafka"
        );
    }
    let confirmed = c.db.confirmed_flush_lsn(env).await?.unwrap_or(0);
    ensure!(
        confirmed < after_commit,
        "the slot moved past the oversize event's transaction ({confirmed:X} >= {after_commit:X})"
    );

    let mut txns = Vec::new();
    for (i, id) in early.iter().enumerate() {
        txns.extend(txns_of(std::slice::from_ref(id), key_of(i)));
    }
    let mut events: Vec<WrittenEvent> = before
        .iter()
        .enumerate()
        .map(|(i, id)| WrittenEvent {
            id: id.clone(),
            key: key_of(i).into(),
        })
        .collect();
    events.push(WrittenEvent {
        id: big.clone(),
        key: "k1".into(),
    });
    events.extend(after.iter().enumerate().map(|(i, id)| WrittenEvent {
        id: id.clone(),
        key: key_of(i).into(),
    }));
    txns.push(WrittenTxn {
        events,
        outcome: Outcome::Committed,
        end_lsn: None,
    });
    txns.extend(txns_of(std::slice::from_ref(&later), "k1"));
    recovers_in_order(env, &c, &txns).await?;
    drop(c.pg);
    c.db.drop(env).await?;
    Ok(())
}

/// The broker itself rejects the record (the topic's limit was lowered after
/// walcast read it, so its own check lets the record through): the producer
/// must not skip it and deliver the key's later events (librdkafka's
/// non-gapless idempotent mode would), and the error names the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_broker_rejects_is_not_overtaken() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let c = case(env, "brkgap", &[("max.message.bytes", "5000000")]).await?;
    // walcast reads the topic's 5 MB limit at start.
    let mut w = Walcast::start(&bin(), c.state.path(), &c.cfg)?;
    blocking(|| w.wait_streaming())?;
    let warmup = uuid();
    insert(&c.pg, &warmup, "order-1", 0).await?;
    let mut reader = TopicReader::new(&env.kafka_bootstrap, &[c.topic.as_str()])?;
    ensure!(
        blocking(|| reader.read_at_least(1, Duration::from_secs(60)))?,
        "the warm-up event did not arrive:\n{}",
        tail(&w.log_text(), 20)
    );
    alter_topic_config(
        &env.kafka_bootstrap,
        &c.topic,
        &[("max.message.bytes", SMALL_LIMIT)],
    )
    .await?;
    let ids: Vec<String> = (0..6).map(|_| uuid()).collect();
    let mut after_2 = 0;
    for (i, id) in ids.iter().enumerate() {
        insert(&c.pg, id, "order-1", if i == 1 { 1_600 } else { 0 }).await?;
        if i == 1 {
            after_2 = current_wal_lsn(&c.pg).await?;
        }
    }
    let status = blocking(|| w.wait_exit(Duration::from_secs(120)))?;
    let log = w.log_text();
    let err = error_line(&log);
    ensure!(
        status.code() == Some(EXIT_PERMANENT),
        "expected exit {EXIT_PERMANENT}, got {status}:\n{}",
        tail(&log, 30)
    );
    ensure!(
        err.contains(&ids[1]),
        "the error does not name event 2 ({}): {err}",
        ids[1]
    );
    let records = blocking(|| read_all(env, &c.topic))?;
    let held = ids_of_key(&records, "order-1");
    let mut want = vec![warmup.clone()];
    want.push(ids[0].clone());
    ensure!(
        held == want,
        "Kafka must hold only the warm-up event and event 1; it holds {:?}",
        held.iter()
            .map(|h| ids.iter().position(|i| i == h).map_or(0, |p| p + 1))
            .collect::<Vec<_>>()
    );
    let confirmed = c.db.confirmed_flush_lsn(env).await?.unwrap_or(0);
    ensure!(
        confirmed < after_2,
        "the slot moved past event 2's transaction ({confirmed:X} >= {after_2:X})"
    );
    // A restart reads the lowered limit: now walcast's own check stops at
    // event 2, with the same result.
    let (code, log) = exit_of(Walcast::start(&bin(), c.state.path(), &c.cfg)?)?;
    let err = error_line(&log);
    ensure!(
        code == EXIT_PERMANENT && err.contains(&ids[1]) && err.contains("max.message.bytes"),
        "second run: exit {code}, {err}"
    );
    let mut all = vec![warmup];
    all.extend(ids.iter().cloned());
    recovers_in_order(env, &c, &txns_of(&all, "order-1")).await?;
    drop(c.pg);
    c.db.drop(env).await?;
    Ok(())
}

/// A topic that appears after walcast started, with a smaller
/// `max.message.bytes` than the producer's batches: walcast must not send it
/// batches of small records larger than its limit (the broker would reject
/// each batch whole). It restarts with a producer sized for the topic, and
/// every event arrives, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_topic_with_a_smaller_limit_gets_batches_that_fit() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let c = case(env, "brknew", &[]).await?;
    let mut w = start(&c)?;
    let topic_b = format!("{}.B", c.db.topic_prefix);
    create_topics_with(
        &env.kafka_bootstrap,
        &[&topic_b],
        3,
        1,
        &[("max.message.bytes", SMALL_LIMIT)],
    )
    .await?;
    // 600 events of 2 KB of random hex in one transaction: far more than
    // 100,000 bytes per partition, in batches of up to batch.size.
    let rows = c
        .pg
        .query(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) \
             SELECT gen_random_uuid(), 'B', 'k' || (g % 5), 'T', jsonb_build_object('n', g, 'blob', \
               (SELECT string_agg(md5(random()::text || s::text), '') FROM generate_series(1, 64) s WHERE g > 0)) \
             FROM generate_series(1, 600) g RETURNING id::text, aggregateid",
            &[],
        )
        .await?;
    let events: Vec<WrittenEvent> = rows
        .iter()
        .map(|r| WrittenEvent {
            id: r.get(0),
            key: r.get(1),
        })
        .collect();
    let txns = vec![WrittenTxn {
        events,
        outcome: Outcome::Committed,
        end_lsn: None,
    }];
    let mut reader = TopicReader::new(&env.kafka_bootstrap, &[topic_b.as_str()])?;
    let arrived = blocking(|| reader.read_at_least(600, Duration::from_secs(90)))?;
    let log = w.log_text();
    ensure!(
        arrived && w.is_running(),
        "{} of 600 events arrived; walcast running: {}:\n{}",
        reader.records.len(),
        w.is_running(),
        tail(&log, 30)
    );
    blocking(|| reader.read_to_end(Duration::from_secs(60)))?;
    let report = check(&txns, &observed(&reader.records), &[]);
    ensure!(report.is_clean(), "{report}");
    ensure!(
        log.contains("less than the batch.size"),
        "walcast did not resize its producer for the new topic:\n{}",
        tail(&log, 30)
    );
    w.terminate()?;
    blocking(|| w.wait_exit(Duration::from_secs(60)))?;
    drop(c.pg);
    c.db.drop(env).await?;
    Ok(())
}
