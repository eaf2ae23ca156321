//! Issue 11, operations: the metrics endpoint scraped during a run, /readyz
//! through a broker outage, and heartbeats that move a quiet slot while
//! another database of the server writes WAL.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use walcast_tests::checker::Outcome;
use walcast_tests::net::{free_port, http_get};
use walcast_tests::pg::TestDb;
use walcast_tests::process::{Walcast, WalcastConfig};
use walcast_tests::TestEnv;

use crate::common::*;

/// The value of the sample `name{…}` whose labels include every one of
/// `labels` (`key="value"` pairs).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix('{')?;
        let (label_text, value) = rest.split_once("} ")?;
        labels
            .iter()
            .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")))
            .then(|| value.trim().parse().ok())?
    })
}

/// The LSN ladder of a scrape: confirmed, published, received, server_wal_end.
fn ladder(text: &str, slot: &str) -> Result<[f64; 4]> {
    let mut out = [0.0; 4];
    for (i, position) in ["confirmed", "published", "received", "server_wal_end"]
        .into_iter()
        .enumerate()
    {
        out[i] = sample(
            text,
            "walcast_lsn",
            &[("pipeline", slot), ("position", position)],
        )
        .with_context(|| format!("walcast_lsn{{position={position:?}}} missing:\n{text}"))?;
    }
    Ok(out)
}

fn metrics_config(env: &TestEnv, db: &TestDb, dir: &std::path::Path, port: u16) -> WalcastConfig {
    WalcastConfig::for_db(env, db, dir).set("metrics", "listen", &format!("\"127.0.0.1:{port}\""))
}

/// Waits until `/readyz` answers `want`; returns the last body.
fn wait_ready(addr: &str, want: u16, timeout: Duration, w: &Walcast) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = http_get(addr, "/readyz");
        if let Ok((status, body)) = &last {
            if *status == want {
                return Ok(body.clone());
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "/readyz did not answer {want} within {timeout:?} (last: {last:?}):\n{}",
                w.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The metrics endpoint during and after a run: events produced per topic
/// equal what was written, nothing is left in flight, the LSN ladder is
/// ordered at every scrape (confirmed <= published <= received <=
/// server_wal_end), and the commit-to-ack histogram counted every event.
/// UPDATEs and DELETEs of outbox rows are counted as skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_was_relayed_and_the_lsn_ladder_is_ordered() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let db = TestDb::create(env, "metrics").await?;
    // UPDATEs and DELETEs reach walcast only when published.
    db.admin(env)
        .await?
        .batch_execute(&format!(
            "ALTER PUBLICATION {} SET (publish = 'insert, update, delete')",
            db.publication
        ))
        .await?;
    let mut reader = reader(env, &db).await?;
    let state = tempfile::tempdir()?;
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let mut w = Walcast::start(
        &bin(),
        state.path(),
        &metrics_config(env, &db, state.path(), port),
    )?;
    w.wait_streaming()?;
    let (status, body) = http_get(&addr, "/healthz")?;
    assert_eq!((status, body.trim()), (200, "ok"));

    let mut client = db.admin(env).await?;
    let mut writer = Writer::new(&client).await?;
    let mut rng = rng("metrics");
    let mut scrapes = 0;
    while writer.committed() < 2_000 {
        writer.txn(&mut client, &mut rng, 40, 300, false).await?;
        // Scrape while events are in flight too: the ladder must hold at
        // any moment, not only at rest.
        let (status, text) = http_get(&addr, "/metrics")?;
        assert_eq!(status, 200);
        let [c, p, r, e] = ladder(&text, &db.slot)?;
        assert!(
            c <= p && p <= r && r <= e,
            "LSN ladder out of order during the run: confirmed {c} published {p} received {r} server_wal_end {e}"
        );
        scrapes += 1;
    }
    client
        .batch_execute(
            "UPDATE outbox SET type = 'Touched' WHERE id IN (SELECT id FROM outbox LIMIT 3); \
             DELETE FROM outbox WHERE id IN (SELECT id FROM outbox LIMIT 2)",
        )
        .await?;
    assert!(
        wait_all(&mut reader, &writer, Duration::from_secs(120))?,
        "not every event arrived:\n{}",
        w.log_text()
    );
    // Idle again: the slot confirms the server's position.
    let end = current_wal_lsn(&client).await?;
    assert!(wait_confirmed(env, &db, end, Duration::from_secs(20)).await?);

    let mut per_topic: HashMap<String, u64> = HashMap::new();
    for t in writer
        .txns
        .iter()
        .filter(|t| t.outcome == Outcome::Committed)
    {
        for e in &t.events {
            let agg: usize = e.key["agg-".len()..].parse()?;
            let topic = format!("{}.{}", db.topic_prefix, AGG_TYPES[agg % AGG_TYPES.len()]);
            *per_topic.entry(topic).or_default() += 1;
        }
    }
    let written = writer.committed() as f64;
    // The gauges are refreshed at each scrape; give the last delivery
    // reports and the skipped rows a moment to be counted.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let (_, text) = http_get(&addr, "/metrics")?;
        let s = |name: &str, labels: &[(&str, &str)]| sample(&text, name, labels).unwrap_or(-1.0);
        let settled = s("walcast_in_flight_events", &[("pipeline", &db.slot)]) == 0.0
            && s("walcast_events_skipped_total", &[("reason", "delete")]) == 2.0
            && s(
                "walcast_commit_to_ack_seconds_count",
                &[("pipeline", &db.slot)],
            ) == written;
        if settled || Instant::now() >= deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "metrics: {scrapes} scrapes during the run; at the end:\n{}",
        text.lines()
            .filter(|l| l.starts_with("walcast_") && !l.contains("_bucket"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let slot = db.slot.as_str();
    for (topic, n) in &per_topic {
        assert_eq!(
            sample(
                &text,
                "walcast_events_produced_total",
                &[("pipeline", slot), ("topic", topic)]
            ),
            Some(*n as f64),
            "events produced to {topic}"
        );
        assert!(
            sample(&text, "walcast_bytes_produced_total", &[("topic", topic)]).unwrap_or(0.0)
                > *n as f64 * 50.0,
            "bytes produced to {topic}"
        );
    }
    assert_eq!(
        sample(&text, "walcast_in_flight_events", &[("pipeline", slot)]),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, "walcast_in_flight_bytes", &[("pipeline", slot)]),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &text,
            "walcast_commit_to_ack_seconds_count",
            &[("pipeline", slot)]
        ),
        Some(written),
        "one latency sample per event"
    );
    assert_eq!(
        sample(
            &text,
            "walcast_events_skipped_total",
            &[("reason", "update")]
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(
            &text,
            "walcast_events_skipped_total",
            &[("reason", "delete")]
        ),
        Some(2.0)
    );
    let [c, p, r, e] = ladder(&text, slot)?;
    assert!(
        c <= p && p <= r && r <= e,
        "ladder at rest: {c} {p} {r} {e}"
    );
    assert!(
        c >= end as f64,
        "confirmed {c} < the server's position {end} when idle"
    );
    assert_eq!(
        sample(
            &text,
            "walcast_pipeline_restarts_total",
            &[("cause", "kafka")]
        ),
        Some(0.0)
    );
    let ready = http_get(&addr, "/readyz")?;
    assert_eq!(ready.0, 200, "{ready:?}:\n{}", w.log_text());
    let (_, text) = http_get(&addr, "/metrics")?;
    assert_eq!(
        sample(&text, "walcast_ready", &[("pipeline", slot)]),
        Some(1.0)
    );
    w.terminate()?;
    assert!(
        w.wait_exit(Duration::from_secs(30))?.success(),
        "{}",
        w.log_text()
    );
    drop(client);
    db.drop(env).await?;
    Ok(())
}

/// `/readyz` answers 503 naming Kafka while the broker is stopped, and 200
/// again once it is back; `/healthz` stays 200 throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_broker() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.exclusive().await;
    let db = TestDb::create(env, "ready").await?;
    let mut reader = reader(env, &db).await?;
    let state = tempfile::tempdir()?;
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let mut w = Walcast::start(
        &bin(),
        state.path(),
        &metrics_config(env, &db, state.path(), port),
    )?;
    w.wait_streaming()?;
    let mut client = db.admin(env).await?;
    let mut writer = Writer::new(&client).await?;
    let mut rng = rng("ready");
    writer.txn(&mut client, &mut rng, 10, 10, false).await?;
    assert!(wait_all(&mut reader, &writer, Duration::from_secs(60))?);
    wait_ready(&addr, 200, Duration::from_secs(20), &w)?;

    env.control(&["stop", "kafka"]);
    let outage = (|| {
        let body = wait_ready(&addr, 503, Duration::from_secs(30), &w)?;
        assert!(body.contains("Kafka"), "{body}");
        assert_eq!(http_get(&addr, "/healthz")?.0, 200, "alive while not ready");
        let (_, text) = http_get(&addr, "/metrics")?;
        assert_eq!(
            sample(&text, "walcast_ready", &[("pipeline", &db.slot)]),
            Some(0.0)
        );
        anyhow::Ok(body)
    })();
    env.control(&["start", "kafka"]);
    let body = outage?;
    eprintln!("readyz during the outage: {}", body.trim());
    wait_ready(&addr, 200, Duration::from_secs(90), &w)?;
    writer.txn(&mut client, &mut rng, 10, 10, false).await?;
    assert!(
        wait_all(&mut reader, &writer, Duration::from_secs(60))?,
        "the events written after the outage did not all arrive in 60 s; walcast's log:\n{}",
        w.log_text()
    );
    assert!(w.is_running(), "{}", w.log_text());
    w.kill9()?;
    drop(client);
    db.drop(env).await?;
    Ok(())
}

/// Writes about `bytes` of WAL into `db` of another database (a table of
/// its own, nothing walcast reads) over `secs` seconds.
async fn write_elsewhere(client: &tokio_postgres::Client, secs: u64) -> Result<()> {
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS noise (id bigserial PRIMARY KEY, note text)")
        .await?;
    let until = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < until {
        client
            .batch_execute(
                "INSERT INTO noise (note) SELECT repeat('x', 200) FROM generate_series(1, 200)",
            )
            .await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The slot's lags behind the server's WAL: `confirmed_flush_lsn` (what
/// walcast confirmed) and `restart_lsn` (the oldest WAL Postgres keeps for it).
async fn slot_lags(db: &TestDb, admin: &tokio_postgres::Client) -> Result<(i64, i64)> {
    let row = admin
        .query_one(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint, (pg_current_wal_lsn() - restart_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.slot],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// The slot's lags at the end of `secs` seconds of writes in another
/// database (sampled every 500 ms after the first 3 s; the last sample is
/// returned), and the WAL written meanwhile.
async fn lag_while_elsewhere_writes(
    db: &TestDb,
    admin: &tokio_postgres::Client,
    other: &tokio_postgres::Client,
    secs: u64,
) -> Result<Lags> {
    let wal_before = current_wal_lsn(admin).await?;
    let writes = write_elsewhere(other, secs);
    let sample = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut lags = Vec::new();
        let until = Instant::now() + Duration::from_secs(secs - 4);
        while Instant::now() < until {
            lags.push(slot_lags(db, admin).await?);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        anyhow::Ok(lags)
    };
    let (w, lags) = tokio::join!(writes, sample);
    w?;
    let lags = lags?;
    let last = *lags.last().context("no lag sample")?;
    Ok(Lags {
        confirmed: last.0,
        restart: last.1,
        written: current_wal_lsn(admin).await? - wal_before,
    })
}

/// What [`lag_while_elsewhere_writes`] saw.
#[derive(Debug, Clone, Copy)]
struct Lags {
    /// `pg_current_wal_lsn() - confirmed_flush_lsn` at the end.
    confirmed: i64,
    /// `pg_current_wal_lsn() - restart_lsn` at the end.
    restart: i64,
    /// WAL written during the writes (all databases).
    written: u64,
}

/// Heartbeat messages an auditor slot (test_decoding, in the outbox
/// database) has seen so far.
async fn heartbeats_in_wal(admin: &tokio_postgres::Client, auditor: &str) -> Result<usize> {
    let rows = admin
        .query(
            "SELECT data FROM pg_logical_slot_peek_changes($1, NULL, NULL) WHERE data LIKE 'message: transactional: 0 prefix: walcast.heartbeat,%'",
            &[&auditor],
        )
        .await?;
    Ok(rows.len())
}

/// Heartbeats (issue 11): the outbox database is quiet while another
/// database on the server writes WAL (about 1 MB/s for 30 s), once with
/// `heartbeat_interval_ms = 0` and once with 500. With heartbeats walcast
/// writes a non-transactional logical message into the outbox database, on
/// its own LOGIN REPLICATION role: an auditor slot there sees them, they are
/// counted in the metrics, and both the slot's `confirmed_flush_lsn` and its
/// `restart_lsn` follow the server's WAL (restart_lsn moves at the
/// `running_xacts` records Postgres logs every 15 s, so it may trail by that
/// much WAL). With `heartbeat_interval_ms = 0` none is written.
///
/// Measured on PostgreSQL 15 and 17 (docs/operations.md, "Heartbeats"):
/// WITHOUT heartbeats the slot follows the other database's writes just as
/// well, because the walsender decodes all of the server's WAL, sends a
/// keepalive each time it has caught up, and walcast confirms its `wal_end`
/// when nothing is in flight (delivery rule 2); restart_lsn follows at the
/// running_xacts records. The test asserts that too, so a regression of
/// rule 2 shows here; the lags of both runs are printed.
async fn heartbeats_and_a_busy_neighbour(port: u16, version: &str) -> Result<()> {
    let env = TestEnv::get();
    let db = TestDb::create_on(env, port, "quiet", true).await?;
    let admin = db.admin(env).await?;
    let auditor = format!("{}_hb", db.slot);
    admin
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'test_decoding')",
            &[&auditor],
        )
        .await?;
    let other = TestDb::create_on(env, port, "busy", false).await?;
    let other_client = other.admin(env).await?;
    let state = tempfile::tempdir()?;
    let metrics_port = free_port()?;
    let addr = format!("127.0.0.1:{metrics_port}");
    let cfg = metrics_config(env, &db, state.path(), metrics_port);
    const SECS: u64 = 30;

    let mut w = Walcast::start(
        &bin(),
        state.path(),
        &cfg.clone().set("postgres", "heartbeat_interval_ms", "0"),
    )?;
    w.wait_streaming()?;
    let without = lag_while_elsewhere_writes(&db, &admin, &other_client, SECS).await?;
    let log_without = w.log_text();
    w.terminate()?;
    w.wait_exit(Duration::from_secs(30))?;
    let written_while_off = heartbeats_in_wal(&admin, &auditor).await?;

    let mut w = Walcast::start(
        &bin(),
        state.path(),
        &cfg.set("postgres", "heartbeat_interval_ms", "500"),
    )?;
    w.wait_streaming()?;
    let with = lag_while_elsewhere_writes(&db, &admin, &other_client, SECS).await?;
    let (_, text) = http_get(&addr, "/metrics")?;
    let counted = sample(&text, "walcast_heartbeats_total", &[("pipeline", &db.slot)]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let in_wal = heartbeats_in_wal(&admin, &auditor).await?;
    eprintln!(
        "PostgreSQL {version}, quiet outbox, busy neighbour database ({SECS} s each): without heartbeats {without:?}; with heartbeats every 500 ms {with:?}; heartbeats counted {counted:?}, in the outbox database's WAL {in_wal} (while off: {written_while_off})"
    );
    assert_eq!(
        written_while_off, 0,
        "heartbeat_interval_ms = 0 writes none"
    );
    assert!(
        in_wal >= 20,
        "the auditor slot saw {in_wal} heartbeat messages in {SECS} s:\n{}",
        w.log_text()
    );
    assert!(
        counted.unwrap_or(0.0) >= 20.0,
        "heartbeats counted: {counted:?}"
    );
    for (mode, lags, log) in [
        ("with", with, w.log_text()),
        ("without", without, log_without),
    ] {
        assert!(
            lags.written > 8 * 1024 * 1024,
            "the neighbour wrote only {} bytes of WAL",
            lags.written
        );
        assert!(
            lags.confirmed < 1024 * 1024,
            "{mode} heartbeats the slot's confirmed_flush_lsn lags {} bytes after {} bytes written elsewhere:\n{log}",
            lags.confirmed,
            lags.written
        );
        // restart_lsn moves at running_xacts (every 15 s of activity and at
        // checkpoints): it must have moved, so it trails by less than all
        // that was written.
        assert!(
            (lags.restart as u64) < lags.written,
            "{mode} heartbeats the slot's restart_lsn lags {} bytes, all {} bytes written elsewhere: it did not move:\n{log}",
            lags.restart,
            lags.written
        );
    }
    w.kill9()?;
    admin
        .execute("SELECT pg_drop_replication_slot($1)", &[&auditor])
        .await?;
    drop(admin);
    drop(other_client);
    other.drop(env).await?;
    db.drop(env).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_move_a_quiet_slot_while_another_database_writes() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.exclusive().await;
    heartbeats_and_a_busy_neighbour(env.pg_port, "15").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_move_a_quiet_slot_while_another_database_writes_pg17() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.exclusive().await;
    heartbeats_and_a_busy_neighbour(env.pg17_port(), "17").await
}
