//! Issue 12, the dead-letter policy (`pipeline.on_permanent_error =
//! "dead-letter"`, delivery rule 8): an event that can never be published
//! goes to `pipeline.dead_letter_topic` with its key, value and headers plus
//! `walcast.*` headers; every other event arrives in order; the slot passes
//! the row only after the dead-letter record was acknowledged; a dead-letter
//! record that cannot be delivered stops walcast (nothing is dropped).
//!
//! Each case writes: five good rows of key k1; one transaction [good k2, the
//! bad row (key k2 where it has one), good k2]; five good rows of k2 and k3.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use tokio_postgres::Client;
use walcast_tests::checker::{check_with_dead_letters, Outcome, Report, WrittenEvent, WrittenTxn};
use walcast_tests::kafka::{create_topics_with, Record, TopicReader};
use walcast_tests::pg::TestDb;
use walcast_tests::process::{Walcast, WalcastConfig};
use walcast_tests::{workload, TestEnv};

use crate::common::{bin, current_wal_lsn, observed, wait_confirmed, wait_ids};

/// `walcast run`'s exit code for an event that can never be published.
const EXIT_PERMANENT: i32 = 3;
/// `walcast run`'s exit code for a setup an operator must fix.
const EXIT_OPERATOR: i32 = 2;

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One case's database (an outbox with nullable columns), topics and config.
pub(crate) struct Case {
    pub(crate) db: TestDb,
    pub(crate) c: Client,
    pub(crate) topic: String,
    pub(crate) dlq: String,
    pub(crate) state: tempfile::TempDir,
    pub(crate) cfg: WalcastConfig,
}

/// A case: the outbox topic gets `topic_configs`; the dead-letter topic is
/// created with `dlq_configs` when given, else walcast creates it.
pub(crate) async fn case(
    env: &'static TestEnv,
    tag: &str,
    topic_configs: &[(&str, &str)],
    dlq_configs: Option<&[(&str, &str)]>,
) -> Result<Case> {
    let db = TestDb::create_on(env, env.pg_port, tag, false).await?;
    let c = db.admin(env).await?;
    c.batch_execute(&format!(
        "CREATE TABLE outbox (seq bigserial, id uuid PRIMARY KEY, aggregatetype text, aggregateid text, type text, payload jsonb);
         {};
         CREATE PUBLICATION {} FOR TABLE outbox WITH (publish = 'insert');",
        workload::MARKER_DDL,
        db.publication
    ))
    .await?;
    let topic = format!("{}.A", db.topic_prefix);
    let dlq = format!("{}-dead-letters", db.topic_prefix);
    create_topics_with(&env.kafka_bootstrap, &[&topic], 3, 1, topic_configs).await?;
    if let Some(configs) = dlq_configs {
        create_topics_with(&env.kafka_bootstrap, &[&dlq], 2, 1, configs).await?;
    }
    let state = tempfile::tempdir()?;
    let cfg = WalcastConfig::for_db(env, &db, state.path())
        .set("pipeline", "on_permanent_error", "\"dead-letter\"")
        .set("pipeline", "dead_letter_topic", &format!("\"{dlq}\""));
    Ok(Case {
        db,
        c,
        topic,
        dlq,
        state,
        cfg,
    })
}

/// The bad row's routing value, key and payload (`None`: NULL).
#[derive(Clone)]
pub(crate) struct Bad {
    pub(crate) agg: Option<String>,
    pub(crate) key: Option<String>,
    pub(crate) payload: Option<String>,
}

impl Bad {
    pub(crate) fn new(agg: Option<&str>, key: Option<&str>, payload: Option<String>) -> Bad {
        Bad {
            agg: agg.map(str::to_string),
            key: key.map(str::to_string),
            payload,
        }
    }
}

pub(crate) async fn insert(
    c: &Client,
    id: &str,
    agg: Option<&str>,
    key: Option<&str>,
    payload: Option<&str>,
) -> Result<()> {
    c.execute(
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) VALUES ($1::text::uuid, $2, $3, 'T', $4::text::jsonb)",
        &[&id, &agg, &key, &payload],
    )
    .await
    .context("inserting an outbox row")?;
    Ok(())
}

/// What [`write`] wrote.
pub(crate) struct Written {
    pub(crate) txns: Vec<WrittenTxn>,
    pub(crate) bad_id: String,
    /// The WAL position before the bad transaction began.
    pub(crate) before_bad: u64,
    /// The WAL position after the bad transaction committed.
    pub(crate) after_bad: u64,
}

fn txn(ids: &[(&str, &str)]) -> WrittenTxn {
    WrittenTxn {
        events: ids
            .iter()
            .map(|(id, key)| WrittenEvent {
                id: id.to_string(),
                key: key.to_string(),
            })
            .collect(),
        outcome: Outcome::Committed,
        end_lsn: None,
    }
}

const GOOD: &str = "{\"ok\": true}";

/// Writes the case's rows (see the module documentation).
pub(crate) async fn write(c: &Client, bad: &Bad) -> Result<Written> {
    let mut txns = Vec::new();
    for _ in 0..5 {
        let id = uuid();
        insert(c, &id, Some("A"), Some("k1"), Some(GOOD)).await?;
        txns.push(txn(&[(&id, "k1")]));
    }
    let before_bad = current_wal_lsn(c).await?;
    let bad_id = uuid();
    let (first, last) = (uuid(), uuid());
    c.batch_execute("BEGIN").await?;
    insert(c, &first, Some("A"), Some("k2"), Some(GOOD)).await?;
    insert(
        c,
        &bad_id,
        bad.agg.as_deref(),
        bad.key.as_deref(),
        bad.payload.as_deref(),
    )
    .await?;
    insert(c, &last, Some("A"), Some("k2"), Some(GOOD)).await?;
    c.batch_execute("COMMIT").await?;
    let after_bad = current_wal_lsn(c).await?;
    txns.push(txn(&[(&first, "k2"), (&bad_id, "k2"), (&last, "k2")]));
    for i in 0..10 {
        let id = uuid();
        let key = if i % 2 == 0 { "k2" } else { "k3" };
        insert(c, &id, Some("A"), Some(key), Some(GOOD)).await?;
        txns.push(txn(&[(&id, key)]));
    }
    Ok(Written {
        txns,
        bad_id,
        before_bad,
        after_bad,
    })
}

/// A reader of `topic`, which walcast may have created a moment ago.
pub(crate) fn reader(env: &TestEnv, topic: &str) -> Result<TopicReader> {
    let mut last = None;
    for _ in 0..50 {
        match TopicReader::new(&env.kafka_bootstrap, &[topic]) {
            Ok(r) => return Ok(r),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no reader")))
}

/// Starts walcast and waits until it streams.
pub(crate) fn start(c: &Case) -> Result<Walcast> {
    let mut w = Walcast::start(&bin(), c.state.path(), &c.cfg)?;
    blocking(|| w.wait_streaming())?;
    Ok(w)
}

/// Waits for every event of `written` (the bad one in the dead-letter
/// topic), for the slot to pass the bad transaction, and checks the whole
/// read: nothing lost, nothing diverted, per key in commit order, no
/// duplicates. Returns the dead-letter record and the report.
pub(crate) async fn delivered(
    env: &'static TestEnv,
    c: &Case,
    w: &mut Walcast,
    written: &Written,
    restarts: bool,
) -> Result<(Record, Report)> {
    let mut dlq = blocking(|| reader(env, &c.dlq))?;
    let want: HashSet<String> = [written.bad_id.clone()].into();
    ensure!(
        blocking(|| wait_ids(&mut dlq, &want, Duration::from_secs(60)))?,
        "no dead-letter record of {}:\n{}",
        written.bad_id,
        tail(&w.log_text(), 30)
    );
    let mut main = blocking(|| reader(env, &c.topic))?;
    let want: HashSet<String> = written
        .txns
        .iter()
        .flat_map(|t| t.events.iter().map(|e| e.id.clone()))
        .filter(|id| *id != written.bad_id)
        .collect();
    ensure!(
        blocking(|| wait_ids(&mut main, &want, Duration::from_secs(60)))?,
        "the events around the bad one did not all arrive:\n{}",
        tail(&w.log_text(), 30)
    );
    ensure!(
        wait_confirmed(env, &c.db, written.after_bad, Duration::from_secs(30)).await?,
        "the slot did not pass the dead-lettered row's transaction"
    );
    ensure!(
        w.is_running(),
        "walcast stopped:\n{}",
        tail(&w.log_text(), 30)
    );
    blocking(|| main.read_to_end(Duration::from_secs(30)))?;
    blocking(|| dlq.read_to_end(Duration::from_secs(30)))?;
    let report = check_with_dead_letters(
        &written.txns,
        &observed(&main.records),
        &[written.bad_id.clone()].into(),
        &observed(&dlq.records),
        &[],
    );
    ensure!(
        report.is_clean() && (restarts || report.duplicates == 0) && report.dead_lettered == 1,
        "{report}"
    );
    let record = dlq
        .records
        .iter()
        .find(|r| r.header("id").as_deref() == Some(written.bad_id.as_str()))
        .cloned()
        .context("the dead-letter record")?;
    Ok((record, report))
}

/// Checks the dead-letter record's headers: the original ones (`id`,
/// `type`) and walcast's.
pub(crate) fn check_headers(
    r: &Record,
    written: &Written,
    reason: &str,
    original_topic: Option<&str>,
) -> Result<()> {
    let h = |n: &str| r.header(n);
    ensure!(
        h("id").as_deref() == Some(written.bad_id.as_str()),
        "id header: {:?}",
        r.headers
    );
    ensure!(
        h("type").as_deref() == Some("T"),
        "type header: {:?}",
        r.headers
    );
    ensure!(
        h("walcast.error.reason").as_deref() == Some(reason),
        "reason: {:?}",
        h("walcast.error.reason")
    );
    ensure!(
        h("walcast.error.kind").as_deref() == Some("permanent"),
        "kind: {:?}",
        h("walcast.error.kind")
    );
    let message = h("walcast.error.message").unwrap_or_default();
    ensure!(message.contains(&written.bad_id), "message: {message}");
    ensure!(
        h("walcast.original.topic").as_deref() == original_topic,
        "original topic: {:?}",
        h("walcast.original.topic")
    );
    ensure!(
        h("walcast.source.table").as_deref() == Some("public.outbox"),
        "table: {:?}",
        h("walcast.source.table")
    );
    let lsn = h("walcast.source.lsn").unwrap_or_default();
    let (hi, lo) = lsn.split_once('/').context("LSN header X/Y")?;
    let lsn = (u64::from_str_radix(hi, 16)? << 32) | u64::from_str_radix(lo, 16)?;
    ensure!(
        written.before_bad < lsn && lsn <= written.after_bad,
        "the LSN header {lsn:X} is not the bad transaction's commit ({:X}..{:X})",
        written.before_bad,
        written.after_bad
    );
    let at = h("walcast.failed.at").unwrap_or_default();
    ensure!(
        at.len() == 24 && at.ends_with('Z') && at.as_bytes()[10] == b'T',
        "failed.at: {at:?}"
    );
    Ok(())
}

async fn finish(c: Case, mut w: Walcast) -> Result<()> {
    w.kill9()?;
    let Case { db, c: client, .. } = c;
    drop(client);
    let env = TestEnv::get();
    db.drop(env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_null_key_is_dead_lettered() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let c = case(env, "dlq_nullkey", &[], None).await?;
    let mut w = start(&c)?;
    let payload = "{\"n\": 1}".to_string();
    let written = write(&c.c, &Bad::new(Some("A"), None, Some(payload))).await?;
    let (r, _) = delivered(env, &c, &mut w, &written, false).await?;
    check_headers(&r, &written, "null_key", None)?;
    // walcast created the dead-letter topic (not compacted).
    let policy =
        walcast_tests::kafka::topic_config(&env.kafka_bootstrap, &c.dlq, "cleanup.policy").await?;
    ensure!(
        policy.as_deref() == Some("delete"),
        "cleanup.policy {policy:?}"
    );
    ensure!(
        r.key.as_deref().unwrap_or_default().is_empty(),
        "key {:?}",
        r.key
    );
    ensure!(
        r.json() == serde_json::json!({"n": 1}),
        "value {:?}",
        r.value
    );
    finish(c, w).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_topic_is_dead_lettered() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let c = case(env, "dlq_badtopic", &[], None).await?;
    let mut w = start(&c)?;
    let bad = Bad::new(
        Some("no such/topic!"),
        Some("k2"),
        Some("{\"n\": 2}".into()),
    );
    let written = write(&c.c, &bad).await?;
    let (r, _) = delivered(env, &c, &mut w, &written, false).await?;
    check_headers(&r, &written, "invalid_topic", None)?;
    ensure!(r.key_str() == "k2", "key {:?}", r.key);
    ensure!(
        r.json() == serde_json::json!({"n": 2}),
        "value {:?}",
        r.value
    );
    finish(c, w).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_null_payload_is_dead_lettered() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let c = case(env, "dlq_nullpayload", &[], None).await?;
    let mut w = start(&c)?;
    let written = write(&c.c, &Bad::new(Some("A"), Some("k2"), None)).await?;
    let (r, _) = delivered(env, &c, &mut w, &written, false).await?;
    check_headers(&r, &written, "null_payload", None)?;
    ensure!(r.key_str() == "k2", "key {:?}", r.key);
    ensure!(
        r.value.as_deref().unwrap_or_default().is_empty(),
        "value {:?}",
        r.value
    );
    finish(c, w).await
}

/// Over the outbox topic's `max.message.bytes` (100,000; found by the size
/// check before it is produced), within the dead-letter topic's (the
/// brokers' default): the dead-letter record carries the whole value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_event_is_dead_lettered_whole() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let c = case(env, "dlq_big", &[("max.message.bytes", "100000")], None).await?;
    let mut w = start(&c)?;
    let big = format!("\"{}\"", "y".repeat(300_000));
    let written = write(&c.c, &Bad::new(Some("A"), Some("k2"), Some(big.clone()))).await?;
    let (r, _) = delivered(env, &c, &mut w, &written, false).await?;
    check_headers(&r, &written, "too_large", Some(&c.topic))?;
    ensure!(r.key_str() == "k2", "key {:?}", r.key);
    ensure!(
        r.value.as_deref() == Some(big.as_bytes()),
        "value of {} bytes",
        r.value.as_ref().map_or(0, Vec::len)
    );
    ensure!(r.header("walcast.value.omitted.bytes").is_none());
    finish(c, w).await
}

/// Over the producer's `message.max.bytes` (1,000,000) and so over the
/// dead-letter topic's too: the dead-letter record has no value, and the
/// value's size in `walcast.value.omitted.bytes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_too_large_for_the_dead_letter_topic_goes_without_its_value() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let c = case(env, "dlq_huge", &[], None).await?;
    let mut w = start(&c)?;
    let huge = format!("\"{}\"", "z".repeat(1_500_000));
    let written = write(&c.c, &Bad::new(Some("A"), Some("k2"), Some(huge.clone()))).await?;
    let (r, _) = delivered(env, &c, &mut w, &written, false).await?;
    check_headers(&r, &written, "too_large", Some(&c.topic))?;
    ensure!(r.key_str() == "k2", "key {:?}", r.key);
    ensure!(
        r.value.as_deref().unwrap_or_default().is_empty(),
        "value of {} bytes",
        r.value.as_ref().map_or(0, Vec::len)
    );
    // jsonb's text form of the string is the string itself.
    ensure!(
        r.header("walcast.value.omitted.bytes") == Some(huge.len().to_string()),
        "omitted: {:?}",
        r.header("walcast.value.omitted.bytes")
    );
    finish(c, w).await
}

/// A dead-letter record the dead-letter topic can never take (its
/// `max.message.bytes` is smaller than the headers alone) stops walcast
/// with exit 3, without moving the slot past the row: nothing is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_record_that_cannot_be_delivered_stops_walcast() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let c = case(env, "dlq_stop", &[], Some(&[("max.message.bytes", "300")])).await?;
    let mut w = start(&c)?;
    let written = write(&c.c, &Bad::new(Some("A"), None, Some("{\"n\": 4}".into()))).await?;
    let status = blocking(|| w.wait_exit(Duration::from_secs(90)))?;
    let log = w.log_text();
    ensure!(
        status.code() == Some(EXIT_PERMANENT),
        "expected exit 3, got {status}:\n{}",
        tail(&log, 30)
    );
    ensure!(
        log.contains("dead-letter record") && log.contains(&written.bad_id),
        "the error does not name the dead-letter record of {}:\n{}",
        written.bad_id,
        tail(&log, 30)
    );
    let confirmed = c.db.confirmed_flush_lsn(env).await?.unwrap_or(0);
    ensure!(
        confirmed < written.after_bad,
        "the slot passed the row ({confirmed:X} >= {:X})",
        written.after_bad
    );
    // The rows before the bad transaction were delivered and confirmed.
    let mut main = blocking(|| reader(env, &c.topic))?;
    let before: HashSet<String> = written.txns[..5]
        .iter()
        .flat_map(|t| t.events.iter().map(|e| e.id.clone()))
        .collect();
    ensure!(blocking(|| wait_ids(
        &mut main,
        &before,
        Duration::from_secs(30)
    ))?);
    let mut dlq = blocking(|| reader(env, &c.dlq))?;
    blocking(|| dlq.read_to_end(Duration::from_secs(30)))?;
    ensure!(
        dlq.records.is_empty(),
        "{} dead-letter records",
        dlq.records.len()
    );
    finish(c, w).await
}

/// Random hex: incompressible enough that compression cannot shrink it
/// under a small limit.
pub(crate) fn noise(len: usize) -> String {
    let mut s = String::with_capacity(len + 32);
    while s.len() < len {
        s.push_str(&uuid::Uuid::new_v4().simple().to_string());
    }
    s.truncate(len);
    s
}

/// The broker itself refuses the record (the topic's limit was lowered
/// after walcast read it, so walcast's own check let it through). Under
/// the gapless guarantee that stops the producer: walcast restarts from the
/// slot with a new producer and dead-letters the event when it reads it
/// again (the dead-letter record says the broker refused it). Nothing of
/// its key overtakes it; the other events arrive in order (a replayed
/// suffix may repeat).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_broker_refuses_is_dead_lettered_after_a_restart() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let mut c = case(env, "dlq_broker", &[("max.message.bytes", "5000000")], None).await?;
    c.cfg = c
        .cfg
        .clone()
        .set("kafka.properties", "\"message.max.bytes\"", "\"5000000\"");
    let mut w = start(&c)?;
    // walcast read the 5 MB limit at start; now the topic takes 100 kB.
    walcast_tests::kafka::alter_topic_config(
        &env.kafka_bootstrap,
        &c.topic,
        &[("max.message.bytes", "100000")],
    )
    .await?;
    let big = format!("\"{}\"", noise(1_600_000));
    let written = write(&c.c, &Bad::new(Some("A"), Some("k2"), Some(big.clone()))).await?;
    let (r, _) = delivered(env, &c, &mut w, &written, true).await?;
    check_headers(&r, &written, "too_large", Some(&c.topic))?;
    let message = r.header("walcast.error.message").unwrap_or_default();
    ensure!(
        message.contains("Kafka rejected event"),
        "the dead-letter record should carry the broker's refusal: {message}"
    );
    ensure!(r.key_str() == "k2", "key {:?}", r.key);
    // 1.6 MB is over the dead-letter topic's limit (the brokers' default).
    ensure!(
        r.header("walcast.value.omitted.bytes") == Some(big.len().to_string()),
        "omitted: {:?}",
        r.header("walcast.value.omitted.bytes")
    );
    let log = w.log_text();
    ensure!(
        log.contains("restarts from the slot with a new producer"),
        "{}",
        tail(&log, 30)
    );
    finish(c, w).await
}

/// A compacted dead-letter topic would drop dead-letter records of the same
/// key: walcast refuses it at start (exit 2), naming the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_dead_letter_topic_is_refused() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let c = case(
        env,
        "dlq_compact",
        &[],
        Some(&[("cleanup.policy", "compact")]),
    )
    .await?;
    let (code, log) = blocking(|| crate::common::run_to_exit(c.state.path(), &c.cfg))?;
    ensure!(code == EXIT_OPERATOR, "exit {code}:\n{}", tail(&log, 20));
    ensure!(
        log.contains(&c.dlq) && log.contains("cleanup.policy=delete"),
        "{}",
        tail(&log, 20)
    );
    let Case { db, c: client, .. } = c;
    drop(client);
    db.drop(env).await
}

/// Inserts a row into the outbox table `table` (columns as [`insert`]).
async fn insert_into(
    c: &Client,
    table: &str,
    id: &str,
    key: Option<&str>,
    payload: &str,
) -> Result<()> {
    c.execute(
        &format!("INSERT INTO {table} (id, aggregatetype, aggregateid, type, payload) VALUES ($1::text::uuid, 'A', $2, 'T', $3::text::jsonb)"),
        &[&id, &key, &payload],
    )
    .await
    .with_context(|| format!("inserting into {table}"))?;
    Ok(())
}

/// Writes one transaction into `table`: `(id, key, payload)` rows (`key`
/// `None`: NULL); returns it as written and the WAL positions around it.
async fn write_txn(
    c: &Client,
    table: &str,
    rows: &[(&str, Option<&str>, &str)],
) -> Result<(WrittenTxn, u64, u64)> {
    let before = current_wal_lsn(c).await?;
    c.batch_execute("BEGIN").await?;
    for (id, key, payload) in rows {
        insert_into(c, table, id, *key, payload).await?;
    }
    c.batch_execute("COMMIT").await?;
    let after = current_wal_lsn(c).await?;
    let ids: Vec<(&str, &str)> = rows
        .iter()
        .map(|(id, key, _)| (*id, key.unwrap_or_default()))
        .collect();
    Ok((txn(&ids), before, after))
}

/// Checks a dead-letter record of the per-route test: its `id` and `type`
/// headers, walcast's headers (reason, kind, table, original topic, the
/// LSN of the transaction between `before` and `after`), its value.
fn check_route_dead_letter(
    r: &Record,
    id: &str,
    reason: &str,
    table: &str,
    original_topic: Option<&str>,
    (before, after): (u64, u64),
) -> Result<()> {
    let h = |n: &str| r.header(n);
    ensure!(h("id").as_deref() == Some(id), "id: {:?}", r.headers);
    ensure!(h("type").as_deref() == Some("T"), "type: {:?}", r.headers);
    ensure!(
        h("walcast.error.reason").as_deref() == Some(reason),
        "{id}: reason {:?}",
        h("walcast.error.reason")
    );
    ensure!(
        h("walcast.error.kind").as_deref() == Some("permanent"),
        "{id}: kind {:?}",
        h("walcast.error.kind")
    );
    ensure!(
        h("walcast.source.table").as_deref() == Some(table),
        "{id}: table {:?}",
        h("walcast.source.table")
    );
    ensure!(
        h("walcast.original.topic").as_deref() == original_topic,
        "{id}: original topic {:?}",
        h("walcast.original.topic")
    );
    ensure!(
        h("walcast.error.message").unwrap_or_default().contains(id),
        "{id}: message {:?}",
        h("walcast.error.message")
    );
    let lsn = h("walcast.source.lsn").unwrap_or_default();
    let (hi, lo) = lsn.split_once('/').context("LSN header X/Y")?;
    let lsn = (u64::from_str_radix(hi, 16)? << 32) | u64::from_str_radix(lo, 16)?;
    ensure!(
        before < lsn && lsn <= after,
        "{id}: the LSN header {lsn:X} is not its transaction's commit ({before:X}..{after:X})"
    );
    ensure!(
        h("walcast.failed.at").is_some_and(|at| at.len() == 24 && at.ends_with('Z')),
        "{id}: failed.at {:?}",
        h("walcast.failed.at")
    );
    Ok(())
}

/// Issue 12's "dead-letter policy per table": two outbox tables, each with
/// its own `[[outbox.route]]` policy, under a pipeline whose own policy is
/// `dead-letter` to a third topic. `public.orders_outbox` says
/// `dead-letter` to its own topic: a NULL-key row and a 300 kB row (over
/// its topic's 100 kB limit) land there with their headers, the rows
/// around them arrive in order, the slot passes them and walcast goes on;
/// the pipeline's dead-letter topic stays empty. `public.payments_outbox`
/// says `stop`: the same 300 kB row stops walcast (exit 3), the slot stays
/// before its transaction, the rows before it are delivered, and nothing of
/// it reaches any topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_route_follows_its_own_dead_letter_policy() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let db = TestDb::create_on(env, env.pg_port, "dlq_routes", false).await?;
    let c = db.admin(env).await?;
    c.batch_execute(&format!(
        "CREATE TABLE orders_outbox (seq bigserial, id uuid PRIMARY KEY, aggregatetype text, aggregateid text, type text, payload jsonb);
         CREATE TABLE payments_outbox (seq bigserial, id uuid PRIMARY KEY, aggregatetype text, aggregateid text, type text, payload jsonb);
         CREATE PUBLICATION {} FOR TABLE orders_outbox, payments_outbox WITH (publish = 'insert');",
        db.publication
    ))
    .await?;
    let p = &db.topic_prefix;
    let orders = format!("{p}.orders");
    let payments = format!("{p}.payments");
    let orders_dlq = format!("{p}-orders-dead-letters");
    let default_dlq = format!("{p}-dead-letters");
    create_topics_with(
        &env.kafka_bootstrap,
        &[orders.as_str(), payments.as_str()],
        3,
        1,
        &[("max.message.bytes", "100000")],
    )
    .await?;
    let state = tempfile::tempdir()?;
    let mut cfg = WalcastConfig::for_db(env, &db, state.path())
        .set("outbox", "tables", "[]")
        .set("pipeline", "on_permanent_error", "\"dead-letter\"")
        .set(
            "pipeline",
            "dead_letter_topic",
            &format!("\"{default_dlq}\""),
        );
    cfg.toml.push_str(&format!(
        r#"
[[outbox.route]]
table = "public.orders_outbox"
route_topic_replacement = "{orders}"
on_permanent_error = "dead-letter"
dead_letter_topic = "{orders_dlq}"

[[outbox.route]]
table = "public.payments_outbox"
route_topic_replacement = "{payments}"
on_permanent_error = "stop"
"#
    ));
    let mut w = Walcast::start(&bin(), state.path(), &cfg)?;
    blocking(|| w.wait_streaming())?;

    // The dead-letter route.
    let big = format!("\"{}\"", "y".repeat(300_000));
    let mut txns = Vec::new();
    for key in ["k1", "k1", "k2"] {
        txns.push(
            write_txn(&c, "orders_outbox", &[(&uuid(), Some(key), GOOD)])
                .await?
                .0,
        );
    }
    let null_key = uuid();
    let (t, before_null, after_null) = write_txn(
        &c,
        "orders_outbox",
        &[
            (&uuid(), Some("k2"), GOOD),
            (&null_key, None, "{\"n\": 1}"),
            (&uuid(), Some("k2"), GOOD),
        ],
    )
    .await?;
    txns.push(t);
    let oversize = uuid();
    let (t, before_big, after_big) = write_txn(
        &c,
        "orders_outbox",
        &[
            (&uuid(), Some("k2"), GOOD),
            (&oversize, Some("k2"), &big),
            (&uuid(), Some("k3"), GOOD),
        ],
    )
    .await?;
    txns.push(t);
    for key in ["k2", "k3", "k1"] {
        txns.push(
            write_txn(&c, "orders_outbox", &[(&uuid(), Some(key), GOOD)])
                .await?
                .0,
        );
    }
    let dead: HashSet<String> = [null_key.clone(), oversize.clone()].into();
    let mut dlq = blocking(|| reader(env, &orders_dlq))?;
    ensure!(
        blocking(|| wait_ids(&mut dlq, &dead, Duration::from_secs(60)))?,
        "the orders route's dead-letter topic {orders_dlq} lacks {dead:?} (has {}):\n{}",
        dlq.records.len(),
        tail(&w.log_text(), 30)
    );
    let mut main = blocking(|| reader(env, &orders))?;
    let want: HashSet<String> = txns
        .iter()
        .flat_map(|t| t.events.iter().map(|e| e.id.clone()))
        .filter(|id| !dead.contains(id))
        .collect();
    ensure!(
        blocking(|| wait_ids(&mut main, &want, Duration::from_secs(60)))?,
        "the orders events around the bad rows did not all arrive:\n{}",
        tail(&w.log_text(), 30)
    );
    ensure!(
        wait_confirmed(env, &db, after_big, Duration::from_secs(30)).await?,
        "the slot did not pass the dead-lettered rows' transactions"
    );
    ensure!(
        w.is_running(),
        "walcast stopped:\n{}",
        tail(&w.log_text(), 30)
    );
    blocking(|| main.read_to_end(Duration::from_secs(20)))?;
    blocking(|| dlq.read_to_end(Duration::from_secs(20)))?;
    let report = check_with_dead_letters(
        &txns,
        &observed(&main.records),
        &dead,
        &observed(&dlq.records),
        &[],
    );
    ensure!(
        report.is_clean() && report.duplicates == 0 && report.dead_lettered == 2,
        "{report}"
    );
    let record = |id: &str| {
        dlq.records
            .iter()
            .find(|r| r.header("id").as_deref() == Some(id))
            .cloned()
            .context("a dead-letter record")
    };
    let r = record(&null_key)?;
    check_route_dead_letter(
        &r,
        &null_key,
        "null_key",
        "public.orders_outbox",
        None,
        (before_null, after_null),
    )?;
    ensure!(
        r.json() == serde_json::json!({"n": 1}),
        "value {:?}",
        r.value
    );
    let r = record(&oversize)?;
    check_route_dead_letter(
        &r,
        &oversize,
        "too_large",
        "public.orders_outbox",
        Some(&orders),
        (before_big, after_big),
    )?;
    ensure!(
        r.value.as_deref() == Some(big.as_bytes()) && r.key_str() == "k2",
        "the oversize row's record: key {:?}, value of {} bytes",
        r.key_str(),
        r.value.as_ref().map_or(0, Vec::len)
    );

    // The stop route: the same oversize row stops walcast at it.
    let mut before_ids = HashSet::new();
    for key in ["p1", "p2"] {
        let (t, _, _) = write_txn(&c, "payments_outbox", &[(&uuid(), Some(key), GOOD)]).await?;
        before_ids.extend(t.events.iter().map(|e| e.id.clone()));
    }
    let stopper = uuid();
    let (_, _, after_stop) = write_txn(
        &c,
        "payments_outbox",
        &[
            (&uuid(), Some("p1"), GOOD),
            (&stopper, Some("p1"), &big),
            (&uuid(), Some("p1"), GOOD),
        ],
    )
    .await?;
    write_txn(&c, "payments_outbox", &[(&uuid(), Some("p2"), GOOD)]).await?;
    let status = blocking(|| w.wait_exit(Duration::from_secs(90)))?;
    let log = w.log_text();
    ensure!(
        status.code() == Some(EXIT_PERMANENT),
        "the stop route's oversize row: expected exit 3, got {status}:\n{}",
        tail(&log, 30)
    );
    ensure!(
        log.contains(&stopper),
        "the error does not name the row {stopper}:\n{}",
        tail(&log, 30)
    );
    let confirmed = db.confirmed_flush_lsn(env).await?.unwrap_or(0);
    ensure!(
        confirmed < after_stop,
        "the slot passed the stop route's row ({confirmed:X} >= {after_stop:X})"
    );
    let mut pay = blocking(|| reader(env, &payments))?;
    ensure!(
        blocking(|| wait_ids(&mut pay, &before_ids, Duration::from_secs(30)))?,
        "the payments rows before the bad one were not delivered"
    );
    let mut all = blocking(|| reader(env, &default_dlq))?;
    blocking(|| all.read_to_end(Duration::from_secs(20)))?;
    ensure!(
        all.records.is_empty(),
        "the pipeline's dead-letter topic {default_dlq} got {} record(s) (ids {:?}): each route's own policy must win",
        all.records.len(),
        all.records.iter().map(|r| r.header("id")).collect::<Vec<_>>()
    );
    blocking(|| pay.read_to_end(Duration::from_secs(10)))?;
    blocking(|| main.read_to_end(Duration::from_secs(10)))?;
    blocking(|| dlq.read_to_end(Duration::from_secs(10)))?;
    for (topic, records) in [
        (&payments, &pay.records),
        (&orders, &main.records),
        (&orders_dlq, &dlq.records),
    ] {
        ensure!(
            !records
                .iter()
                .any(|r| r.header("id").as_deref() == Some(stopper.as_str())),
            "the stop route's row {stopper} reached {topic}"
        );
    }
    drop(c);
    db.drop(env).await
}
