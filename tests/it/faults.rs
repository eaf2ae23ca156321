//! Crashes and outages: kill -9 of walcast, a stopped broker, Postgres
//! restarts. Each ends with the checker.

use std::time::Duration;

use anyhow::{Context as _, Result};
use rand::Rng;
use walcast_tests::checker::{check, KillObservation, Outcome};
use walcast_tests::kafka::TopicReader;
use walcast_tests::pg::TestDb;
use walcast_tests::process::{Walcast, WalcastConfig};
use walcast_tests::TestEnv;

use crate::common::*;

async fn wait_slot_released(env: &TestEnv, db: &TestDb) -> Result<()> {
    for _ in 0..200 {
        if !db.slot_active(env).await? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the slot stayed active after walcast was killed")
}

async fn reconnect(env: &TestEnv, db: &TestDb) -> Result<tokio_postgres::Client> {
    for _ in 0..100 {
        if let Ok(c) = db.admin(env).await {
            if c.simple_query("SELECT 1").await.is_ok() {
                return Ok(c);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    db.admin(env).await
}

/// Issue 4, test 3: kill -9 walcast at random moments under load, at least 5
/// times. Every committed event is in Kafka, per-key first occurrences are in
/// commit order, duplicates only form replayed suffixes, and at each kill
/// every transaction at or below the slot's confirmed_flush_lsn was already
/// in Kafka (commit end LSNs from an auditor slot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_nothing() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let db = TestDb::create(env, "crash").await?;
    // Append-time stamps fence the ack-safety check: a record that a produce
    // request in flight at the kill wrote afterwards does not count.
    let topic_names = topics(&db);
    let topic_refs: Vec<&str> = topic_names.iter().map(String::as_str).collect();
    walcast_tests::kafka::create_topics_with(
        &env.kafka_bootstrap,
        &topic_refs,
        3,
        1,
        &[walcast_tests::chaos::APPEND_TIME_TOPIC_CONFIG],
    )
    .await?;
    let mut reader = walcast_tests::kafka::TopicReader::new(&env.kafka_bootstrap, &topic_refs)?;
    let admin = db.admin(env).await?;
    let auditor = create_auditor(&admin, &db).await?;
    let state = tempfile::tempdir()?;
    // Batches wait 400 ms before they are sent, longer than the 200 ms status
    // interval: a build that confirmed an LSN before Kafka acknowledged its
    // events would have it in the slot while the events are still queued, and
    // the kills would catch it (seen with a build that counted an event as
    // delivered when sent: ack-safety violations). A correct build only gets
    // slower.
    let cfg = WalcastConfig::for_db(env, &db, state.path()).set("kafka", "linger_ms", "400");
    let mut w = Walcast::start(&bin(), state.path(), &cfg)?;
    w.wait_streaming()?;

    let mut client = db.admin(env).await?;
    let mut writer = Writer::new(&client).await?;
    let mut rng = rng("crash");
    let mut writer_rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(rng.random());
    // The writer goes on until the last kill: every kill must happen under
    // load, or it proves nothing (a kill of an idle relay has nothing in
    // flight and nothing unconfirmed).
    let kills_done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = kills_done.clone();
    let writer_task = tokio::spawn(async move {
        let rng = &mut writer_rng;
        while writer.committed() < 4_000 || !done.load(std::sync::atomic::Ordering::Relaxed) {
            let size = rng.random_range(1..=40usize);
            let rollback = rng.random_bool(0.05);
            writer.txn(&mut client, rng, size, 200, rollback).await?;
            // Past the first 4,000 events, a lighter load keeps the kills busy.
            let pause = if writer.committed() < 4_000 { 3 } else { 200 };
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        anyhow::Ok(writer)
    });

    let mut kills = Vec::new();
    while kills.len() < 6 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
        w.kill9()?;
        let died_at = walcast_tests::chaos::now_ms();
        wait_slot_released(env, &db).await?;
        let confirmed = db.confirmed_flush_lsn(env).await?.context("slot gone")?;
        let mut snapshot = TopicReader::new(&env.kafka_bootstrap, &topic_refs)?;
        snapshot.read_to_end(Duration::from_secs(60))?;
        let appended: Vec<_> = snapshot
            .records
            .iter()
            .filter(|r| r.appended_ms.is_some_and(|t| t <= died_at))
            .cloned()
            .collect();
        kills.push(KillObservation {
            confirmed_lsn: confirmed,
            ids_in_kafka: distinct_ids(&appended),
        });
        w = Walcast::start(&bin(), state.path(), &cfg)?;
        w.wait_streaming()?;
    }
    kills_done.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut writer = writer_task.await??;
    assert!(
        wait_all(&mut reader, &writer, Duration::from_secs(120))?,
        "not every event arrived:\n{}",
        w.log_text()
    );
    reader.read_to_end(Duration::from_secs(30))?;
    writer
        .attach_end_lsns(&admin, &auditor, &db.publication)
        .await?;
    let report = check(&writer.txns, &observed(&reader.records), &kills);
    eprintln!("kill -9 x{}: {report}", kills.len());
    assert!(report.is_clean(), "{report}");
    // The kills were real: at some kill a whole transaction was in Kafka but
    // not yet confirmed, and the confirmed position moved between kills.
    assert!(
        report.delivered_unconfirmed_at_kills > 0,
        "no kill caught a delivered but unconfirmed transaction: {report}"
    );
    assert!(
        kills
            .windows(2)
            .any(|k| k[1].confirmed_lsn > k[0].confirmed_lsn),
        "the confirmed LSN never moved between kills"
    );
    w.kill9()?;
    drop_auditor(&admin, &auditor).await?;
    drop(admin);
    db.drop(env).await?;
    Ok(())
}

/// Issue 4, test 4: the broker is stopped for more than 30 s mid-stream.
/// walcast stays up, the slot never passes undelivered events, the
/// replication connection survives wal_sender_timeout (10 s here), and
/// everything arrives after the broker is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_blocks_without_loss() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.exclusive().await;
    let db = TestDb::create(env, "outage").await?;
    let mut reader = reader(env, &db).await?;
    let admin = db.admin(env).await?;
    let auditor = create_auditor(&admin, &db).await?;
    let state = tempfile::tempdir()?;
    let mut w = Walcast::start(
        &bin(),
        state.path(),
        &WalcastConfig::for_db(env, &db, state.path()),
    )?;
    w.wait_streaming()?;
    let mut client = db.admin(env).await?;
    let mut writer = Writer::new(&client).await?;
    let mut rng = rng("outage");
    for _ in 0..30 {
        writer.txn(&mut client, &mut rng, 10, 50, false).await?;
    }
    assert!(wait_all(&mut reader, &writer, Duration::from_secs(60))?);
    let before_outage = writer.txns.len();
    let pid_before: Option<i32> = admin
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.slot],
        )
        .await?
        .get(0);

    env.control(&["stop", "kafka"]);
    let outage = async {
        for _ in 0..30 {
            writer.txn(&mut client, &mut rng, 10, 50, false).await?;
        }
        let mut max_confirmed = 0u64;
        let until = tokio::time::Instant::now() + Duration::from_secs(35);
        while tokio::time::Instant::now() < until {
            max_confirmed = max_confirmed.max(db.confirmed_flush_lsn(env).await?.unwrap_or(0));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        anyhow::Ok(max_confirmed)
    }
    .await;
    let pid_during: Option<i32> = admin
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.slot],
        )
        .await?
        .get(0);
    let still_running = w.is_running();
    env.control(&["start", "kafka"]);
    let max_confirmed = outage?;
    assert!(
        still_running,
        "walcast exited during the outage:\n{}",
        w.log_text()
    );
    assert_eq!(
        pid_before, pid_during,
        "the replication connection did not survive the outage"
    );
    assert!(pid_during.is_some());

    assert!(
        wait_all(&mut reader, &writer, Duration::from_secs(120))?,
        "not every event arrived:\n{}",
        w.log_text()
    );
    reader.read_to_end(Duration::from_secs(30))?;
    writer
        .attach_end_lsns(&admin, &auditor, &db.publication)
        .await?;
    let first_undelivered = writer.txns[before_outage].end_lsn.context("end lsn")?;
    assert!(
        max_confirmed < first_undelivered,
        "the slot passed an undelivered transaction during the outage: confirmed {max_confirmed:X} >= {first_undelivered:X}"
    );
    let report = check(&writer.txns, &observed(&reader.records), &[]);
    eprintln!(
        "broker outage: {report}; confirmed held at {max_confirmed:X} < {first_undelivered:X}"
    );
    assert!(report.is_clean(), "{report}");
    w.kill9()?;
    drop_auditor(&admin, &auditor).await?;
    drop(admin);
    db.drop(env).await?;
    Ok(())
}

/// Issue 4, test 5: `pg_ctl restart -m fast` and `-m immediate` mid-stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarts_lose_nothing() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.exclusive().await;
    let db = TestDb::create(env, "pgrestart").await?;
    let mut reader = reader(env, &db).await?;
    let state = tempfile::tempdir()?;
    let mut w = Walcast::start(
        &bin(),
        state.path(),
        &WalcastConfig::for_db(env, &db, state.path()),
    )?;
    w.wait_streaming()?;
    let mut client = db.admin(env).await?;
    let mut writer = Writer::new(&client).await?;
    let mut rng = rng("pgrestart");
    for mode in ["fast", "immediate"] {
        for _ in 0..40 {
            let rollback = rng.random_bool(0.05);
            writer.txn(&mut client, &mut rng, 50, 100, rollback).await?;
        }
        // Restart while walcast is still streaming what was just written.
        env.control(&["restart", "pg", "--mode", mode]);
        client = reconnect(env, &db).await?;
    }
    for _ in 0..20 {
        writer.txn(&mut client, &mut rng, 20, 100, false).await?;
    }
    assert!(
        wait_all(&mut reader, &writer, Duration::from_secs(180))?,
        "not every event arrived:\n{}",
        w.log_text()
    );
    reader.read_to_end(Duration::from_secs(30))?;
    let report = check(&writer.txns, &observed(&reader.records), &[]);
    eprintln!("postgres restarts: {report}");
    assert!(report.is_clean(), "{report}");
    assert!(
        w.is_running(),
        "walcast should reconnect, not exit:\n{}",
        w.log_text()
    );
    assert!(
        w.log_text().contains("restarting from the slot"),
        "no restart was observed:\n{}",
        w.log_text()
    );
    w.kill9()?;
    drop(client);
    db.drop(env).await?;
    assert!(writer.txns.iter().any(|t| t.outcome == Outcome::Committed));
    Ok(())
}
