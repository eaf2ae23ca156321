//! The relay end to end on the real services.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context as _, Result};
use rand::Rng;
use walcast_tests::checker::{check, Outcome};
use walcast_tests::pg::TestDb;
use walcast_tests::process::{Walcast, WalcastConfig};
use walcast_tests::TestEnv;

use crate::common::*;

/// Issue 4, test 1: 10,000 events across 1,000 aggregates in transactions of
/// 1–200 rows, with writes to other tables and rolled-back transactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_committed_event_arrives_once_in_commit_order() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let db = TestDb::create(env, "relay").await?;
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
    let mut rng = rng("relay");
    while writer.committed() < 10_000 {
        let size = rng
            .random_range(1..=200usize)
            .min(10_000 - writer.committed());
        let rollback = rng.random_bool(0.05);
        writer
            .txn(&mut client, &mut rng, size, 1_000, rollback)
            .await?;
    }
    // A few rolled-back transactions at the end as well.
    for _ in 0..3 {
        writer.txn(&mut client, &mut rng, 5, 1_000, true).await?;
    }
    assert!(writer.txns.iter().any(|t| t.outcome == Outcome::RolledBack));
    assert!(
        wait_all(&mut reader, &writer, Duration::from_secs(120))?,
        "not every event arrived:\n{}",
        w.log_text()
    );
    // Anything extra (duplicates, phantoms) would be in Kafka by now too.
    reader.read_to_end(Duration::from_secs(30))?;
    let report = check(&writer.txns, &observed(&reader.records), &[]);
    eprintln!("relay: {report}");
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.duplicates, 0, "a clean run delivers exactly once");
    assert_eq!(reader.records.len(), 10_000);

    // Topic, key, headers and payload of every record match what was written.
    let written: HashMap<String, String> = writer
        .txns
        .iter()
        .filter(|t| t.outcome == Outcome::Committed)
        .flat_map(|t| t.events.iter().map(|e| (e.id.clone(), e.key.clone())))
        .collect();
    for r in &reader.records {
        let id = r.header("id").expect("id header");
        assert_eq!(written.get(&id), Some(&r.key_str()), "key of {id}");
        assert_eq!(r.header("type").as_deref(), Some("Happened"));
        let payload = r.json();
        assert_eq!(payload["aggregate"].as_str(), Some(r.key_str().as_str()));
        let agg: usize = r.key_str()["agg-".len()..].parse()?;
        assert_eq!(
            r.topic,
            format!("{}.{}", db.topic_prefix, AGG_TYPES[agg % AGG_TYPES.len()])
        );
    }

    // Idle again: the slot confirms the server's position (rule 2). Then a
    // graceful shutdown exits 0 and keeps it.
    let end = confirm_idle_then_stop(env, &db, &client, &mut w).await?;
    assert!(db.confirmed_flush_lsn(env).await?.unwrap_or(0) >= end);
    drop(client);
    db.drop(env).await?;
    Ok(())
}

/// Issue 4, test 2: heavy writes to a table outside the publication while
/// walcast runs: the slot's lag returns to near zero within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_slot_does_not_pin_wal() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let db = TestDb::create(env, "idle").await?;
    let state = tempfile::tempdir()?;
    let mut w = Walcast::start(
        &bin(),
        state.path(),
        &WalcastConfig::for_db(env, &db, state.path()),
    )?;
    w.wait_streaming()?;
    let client = db.admin(env).await?;
    client
        .batch_execute("CREATE TABLE neighbour (id bigserial PRIMARY KEY, note text)")
        .await?;
    for _ in 0..20 {
        client
            .batch_execute("INSERT INTO neighbour (note) SELECT repeat('x', 100) FROM generate_series(1, 1000)")
            .await?;
    }
    let written_to = current_wal_lsn(&client).await?;
    // Lag right after the writes, then within seconds it returns to near zero.
    let lag_before = db.slot_lag_bytes(env).await?;
    let mut lag = lag_before;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::time::Instant::now() < deadline {
        lag = db.slot_lag_bytes(env).await?;
        if lag < 64 * 1024 && db.confirmed_flush_lsn(env).await?.unwrap_or(0) >= written_to {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "idle slot: lag right after 20,000 neighbour rows = {lag_before} bytes, then {lag} bytes"
    );
    assert!(
        db.confirmed_flush_lsn(env).await?.unwrap_or(0) >= written_to,
        "slot did not advance past the neighbour writes (lag {lag} bytes):\n{}",
        w.log_text()
    );
    assert!(lag < 64 * 1024, "lag stayed at {lag} bytes");
    w.kill9()?;
    drop(client);
    db.drop(env).await?;
    Ok(())
}

/// Issue 14: `WALCAST_DEBUG_TIMELINE` makes `walcast run` write the
/// pipeline's counters every 10 ms as CSV, with a last row at shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_debug_timeline_records_the_counters() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let db = TestDb::create(env, "timeline").await?;
    let mut reader = reader(env, &db).await?;
    let state = tempfile::tempdir()?;
    let file = state.path().join("timeline.csv");
    let mut w = Walcast::start_with(
        &bin(),
        state.path(),
        &WalcastConfig::for_db(env, &db, state.path()),
        &[("WALCAST_DEBUG_TIMELINE", file.to_str().unwrap())],
    )?;
    w.wait_streaming()?;
    let mut client = db.admin(env).await?;
    let mut writer = Writer::new(&client).await?;
    let mut rng = rng("timeline");
    for _ in 0..20 {
        writer.txn(&mut client, &mut rng, 10, 50, false).await?;
    }
    assert!(
        wait_all(&mut reader, &writer, Duration::from_secs(60))?,
        "not every event arrived:\n{}",
        w.log_text()
    );
    // Let the sampler see the acks, then stop gracefully (the last row is
    // written and the file flushed at exit).
    tokio::time::sleep(Duration::from_millis(100)).await;
    w.terminate()?;
    assert!(w.wait_exit(Duration::from_secs(30))?.success());

    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("reading the timeline {}", file.display()))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    assert_eq!(
        header[..5],
        [
            "t_ms",
            "events_sent",
            "events_delivered",
            "in_flight_events",
            "in_flight_bytes"
        ],
        "{text}"
    );
    let rows: Vec<Vec<f64>> = lines
        .map(|l| l.split(',').map(|v| v.parse().unwrap()).collect())
        .collect();
    assert!(rows.len() >= 10, "few rows:\n{text}");
    for pair in rows.windows(2) {
        assert!(pair[0][0] < pair[1][0], "t_ms does not increase: {pair:?}");
        assert!(
            pair[0][2] <= pair[1][2],
            "events_delivered decreases: {pair:?}"
        );
    }
    let last = rows.last().unwrap();
    assert_eq!((last[1], last[2], last[3]), (200.0, 200.0, 0.0), "{text}");
    assert!(
        rows.iter().any(|r| r[2] == 0.0),
        "the timeline starts before the first event"
    );
    drop(client);
    db.drop(env).await?;
    Ok(())
}
