//! Issue 10 items 3 and 6: walcast's record of the slots it confirmed
//! positions on survives what a deployment loses (delivery rule 5), and a
//! stale walsender of walcast's own never needs a person.
//!
//! The record lives in the state directory and in the compacted Kafka topic
//! `walcast.state` (the default `pipeline.state_topic`).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use walcast_pgoutput::Lsn;
use walcast_tests::chaos::walsender_pid;
use walcast_tests::kafka::{read_state_record, write_state_record};
use walcast_tests::pg::TestDb;
use walcast_tests::process::{Walcast, WalcastConfig};
use walcast_tests::proxy::FaultProxy;
use walcast_tests::TestEnv;

use crate::common::*;

const STATE_TOPIC: &str = "walcast.state";
const OPERATOR_EXIT: i32 = 2;

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// `walcast run` that is expected to exit: (exit code, output).
fn run_to_exit(dir: &Path, cfg: &WalcastConfig) -> Result<(i32, String)> {
    std::fs::create_dir_all(dir)?;
    let file = dir.join("walcast.toml");
    std::fs::write(&file, &cfg.toml)?;
    let (status, out) = blocking(|| {
        Walcast::run_to_exit(
            &bin(),
            &["run", "--config", file.to_str().unwrap()],
            Duration::from_secs(45),
        )
    })?;
    Ok((status.code().unwrap_or(-1), out))
}

/// The server's system identifier.
async fn system_identifier(env: &TestEnv, db: &TestDb) -> Result<String> {
    let c = db.admin(env).await?;
    Ok(c.query_one(
        "SELECT system_identifier::text FROM pg_control_system()",
        &[],
    )
    .await?
    .get(0))
}

async fn slot_count(env: &TestEnv, db: &TestDb) -> Result<i64> {
    let c = db.admin(env).await?;
    Ok(c.query_one(
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
        &[&db.slot],
    )
    .await?
    .get(0))
}

fn lsn_field(record: &serde_json::Value, field: &str) -> Result<u64> {
    let text = record[field]
        .as_str()
        .with_context(|| format!("{field} in {record}"))?;
    Ok(text.parse::<Lsn>()?.as_u64())
}

/// The state directory's copy of the record of `db`'s slot.
fn file_record(state_dir: &Path, db: &TestDb) -> Result<Option<serde_json::Value>> {
    let Ok(entries) = std::fs::read_dir(state_dir) else {
        return Ok(None);
    };
    for e in entries {
        let path = e?.path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".json") && name.contains(&db.slot) {
            let value: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
            if value["slot"] == db.slot.as_str() {
                return Ok(Some(value));
            }
        }
    }
    Ok(None)
}

/// Runs walcast once on `db` (creating the slot), relays a transaction,
/// and stops it cleanly. Returns the config.
async fn relay_once(env: &TestEnv, db: &TestDb, dir: &Path) -> Result<WalcastConfig> {
    let cfg = WalcastConfig::for_db(env, db, &dir.join("state"));
    let mut reader = reader(env, db).await?;
    let mut w = Walcast::start(&bin(), &dir.join("first"), &cfg)?;
    blocking(|| w.wait_streaming())?;
    let mut client = db.admin(env).await?;
    let mut writer = Writer::new(&client).await?;
    writer
        .txn(&mut client, &mut rng("slot_record"), 5, 3, false)
        .await?;
    ensure!(
        blocking(|| wait_all(&mut reader, &writer, Duration::from_secs(60)))?,
        "events did not arrive:\n{}",
        w.log_text()
    );
    let wal = current_wal_lsn(&client).await?;
    ensure!(
        wait_confirmed(env, db, wal, Duration::from_secs(30)).await?,
        "the slot was not confirmed"
    );
    w.terminate()?;
    ensure!(blocking(|| w.wait_exit(Duration::from_secs(30)))?.success());
    Ok(cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_start_creates_the_slot_and_writes_the_record_to_both_stores() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let dir = tempfile::tempdir()?;
    let db = TestDb::create(env, "recfirst").await?;
    let cfg = relay_once(env, &db, dir.path()).await?;
    let sysid = system_identifier(env, &db).await?;
    let slot_at = db.confirmed_flush_lsn(env).await?.context("slot")?;
    let file =
        file_record(&dir.path().join("state"), &db)?.context("no record in the state directory")?;
    let kafka =
        blocking(|| read_state_record(&env.kafka_bootstrap, STATE_TOPIC, &db.name, &db.slot))?
            .context("no record in the Kafka state topic")?;
    for (store, r) in [("file", &file), ("kafka", &kafka)] {
        ensure!(r["database"] == db.name.as_str(), "{store}: {r}");
        ensure!(r["system_identifier"] == sysid.as_str(), "{store}: {r}");
        ensure!(r["walsender"]["pid"].is_i64(), "{store}: {r}");
        // Write-ahead: the slot never passes the record's upper bound.
        ensure!(
            lsn_field(r, "confirmed_upper")? >= slot_at,
            "{store}: the slot is at {slot_at:X}, above the record {r}"
        );
        ensure!(lsn_field(r, "confirmed_lower")? <= lsn_field(r, "confirmed_upper")?);
    }
    // The next start resumes (record and slot agree).
    let mut again = Walcast::start(&bin(), &dir.path().join("again"), &cfg)?;
    blocking(|| again.wait_streaming())?;
    ensure!(again.log_text().contains("created_slot=false"));
    again.kill9()?;
    db.drop(env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_container_and_dropped_slot_is_refused_from_the_kafka_record() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let dir = tempfile::tempdir()?;
    let db = TestDb::create(env, "recnewcont").await?;
    relay_once(env, &db, dir.path()).await?;
    let admin = db.admin(env).await?;
    admin
        .execute("SELECT pg_drop_replication_slot($1)", &[&db.slot])
        .await?;
    // A new container: an empty state directory, the same Kafka.
    let fresh = WalcastConfig::for_db(env, &db, &dir.path().join("empty-state"));
    let (code, out) = run_to_exit(&dir.path().join("new-container"), &fresh)?;
    ensure!(code == OPERATOR_EXIT, "exit {code}:\n{out}");
    ensure!(
        out.contains("no longer exists")
            && out.contains("Kafka topic walcast.state")
            && out.contains("walcast slot accept-gap"),
        "{out}"
    );
    ensure!(
        slot_count(env, &db).await? == 0,
        "walcast silently recreated the slot"
    );
    // Accepting the gap forgets the record in Kafka (a tombstone).
    let file = dir.path().join("new-container/walcast.toml");
    let (status, out) = blocking(|| {
        Walcast::run_to_exit(
            &bin(),
            &["slot", "accept-gap", "--config", file.to_str().unwrap()],
            Duration::from_secs(60),
        )
    })?;
    ensure!(status.success(), "{out}");
    ensure!(
        out.contains("forgot walcast's record") && out.contains("Kafka topic walcast.state"),
        "{out}"
    );
    ensure!(
        blocking(|| read_state_record(&env.kafka_bootstrap, STATE_TOPIC, &db.name, &db.slot))?
            .is_none(),
        "the Kafka record survived accept-gap"
    );
    let mut w = Walcast::start(&bin(), &dir.path().join("accepted"), &fresh)?;
    blocking(|| w.wait_streaming())?;
    ensure!(w.log_text().contains("created_slot=true"));
    w.kill9()?;
    drop(admin);
    db.drop(env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_recreated_by_hand_is_refused() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let dir = tempfile::tempdir()?;
    let db = TestDb::create(env, "recrecreate").await?;
    let cfg = relay_once(env, &db, dir.path()).await?;
    let mut client = db.admin(env).await?;
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&db.slot])
        .await?;
    // Committed while there is no slot: never relayed.
    let mut writer = Writer::new(&client).await?;
    writer
        .txn(&mut client, &mut rng("recreate"), 3, 2, false)
        .await?;
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&db.slot],
        )
        .await?;
    let (code, out) = run_to_exit(&dir.path().join("after"), &cfg)?;
    ensure!(code == OPERATOR_EXIT, "exit {code}:\n{out}");
    ensure!(
        out.contains("ahead of walcast's record")
            && out.contains("dropped and recreated")
            && out.contains("walcast slot accept-gap"),
        "{out}"
    );
    drop(client);
    db.drop(env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_of_another_system_identifier_is_refused() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let dir = tempfile::tempdir()?;
    let db = TestDb::create(env, "recsysid").await?;
    relay_once(env, &db, dir.path()).await?;
    let admin = db.admin(env).await?;
    admin
        .execute("SELECT pg_drop_replication_slot($1)", &[&db.slot])
        .await?;
    // Every copy of the record says another cluster (a replaced cluster, or
    // another cluster sharing the record).
    const OTHER: &str = "6999999999999999999";
    let sysid = system_identifier(env, &db).await?;
    let state = dir.path().join("state");
    let mut doctored = 0;
    for e in std::fs::read_dir(&state)? {
        let path = e?.path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".json") || !name.contains(&db.slot) {
            continue;
        }
        let mut value: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        value["system_identifier"] = OTHER.into();
        std::fs::remove_file(&path)?;
        std::fs::write(
            state.join(name.replace(&sysid, OTHER)),
            serde_json::to_vec(&value)?,
        )?;
        doctored += 1;
    }
    ensure!(doctored == 1, "{doctored} record files");
    if let Some(mut record) =
        blocking(|| read_state_record(&env.kafka_bootstrap, STATE_TOPIC, &db.name, &db.slot))?
    {
        record["system_identifier"] = OTHER.into();
        write_state_record(
            &env.kafka_bootstrap,
            STATE_TOPIC,
            &db.name,
            &db.slot,
            Some(&record),
        )
        .await?;
    }
    let cfg = WalcastConfig::for_db(env, &db, &state);
    let (code, out) = run_to_exit(&dir.path().join("replaced"), &cfg)?;
    ensure!(code == OPERATOR_EXIT, "exit {code}:\n{out}");
    ensure!(
        out.contains(OTHER) && out.contains(&sysid) && out.contains("walcast slot accept-gap"),
        "the error must name both system identifiers ({OTHER}, {sysid}):\n{out}"
    );
    ensure!(
        slot_count(env, &db).await? == 0,
        "walcast silently recreated the slot"
    );
    drop(admin);
    db.drop(env).await
}

/// The write-ahead gate: walcast is killed (SIGKILL) at random moments under
/// load; every time, the slot's confirmed position is at or below the upper
/// bound of walcast's record in both stores, and the next start resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slot_never_passes_the_record_across_kills() -> Result<()> {
    use rand::Rng as _;
    let env = TestEnv::get();
    let _g = env.shared().await;
    let dir = tempfile::tempdir()?;
    let db = TestDb::create(env, "recgate").await?;
    let admin = db.admin(env).await?;
    admin
        .batch_execute(walcast_tests::workload::MARKER_DDL)
        .await?;
    let topics = walcast_tests::workload::topics(&db);
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    walcast_tests::kafka::create_topics(&env.kafka_bootstrap, &refs, 3).await?;
    let mut rng = rng("the_slot_never_passes_the_record_across_kills");
    let state = dir.path().join("state");
    let cfg = WalcastConfig::for_db(env, &db, &state);
    let load = walcast_tests::workload::Workload::start(
        env,
        &db,
        walcast_tests::workload::WorkloadSpec::default(),
        rng.random(),
    );
    let mut checked = 0;
    for cycle in 0..8 {
        let mut w = Walcast::start(&bin(), &dir.path().join(format!("run{cycle}")), &cfg)?;
        blocking(|| w.wait_streaming())
            .with_context(|| format!("cycle {cycle}: walcast did not resume"))?;
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..2_500))).await;
        w.kill9()?;
        let slot_at = db.confirmed_flush_lsn(env).await?.context("slot")?;
        let file = file_record(&state, &db)?.context("no record in the state directory")?;
        let kafka =
            blocking(|| read_state_record(&env.kafka_bootstrap, STATE_TOPIC, &db.name, &db.slot))?
                .context("no record in Kafka")?;
        for (store, r) in [("file", &file), ("kafka", &kafka)] {
            let upper = lsn_field(r, "confirmed_upper")?;
            ensure!(
                slot_at <= upper,
                "cycle {cycle}: the slot is at {slot_at:X}, above walcast's record in the {store} ({upper:X}): reported before it was persisted"
            );
        }
        checked += 1;
    }
    load.stop()?;
    eprintln!("{checked} kills, the slot never passed the record");
    drop(admin);
    db.drop(env).await
}

/// A database whose sessions use `wal_sender_timeout` (so its walsenders
/// outlive a vanished client that long), behind a fault proxy.
async fn proxied_db(
    env: &TestEnv,
    tag: &str,
    wal_sender_timeout: &str,
) -> Result<(TestDb, FaultProxy)> {
    let db = TestDb::create(env, tag).await?;
    let admin = db.admin(env).await?;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} SET wal_sender_timeout = '{wal_sender_timeout}'",
            db.name
        ))
        .await?;
    let proxy = FaultProxy::start(([127, 0, 0, 1], db.port).into())?;
    Ok((db, proxy))
}

/// Waits until a walsender other than `old` serves the slot.
async fn wait_new_walsender(
    env: &TestEnv,
    db: &TestDb,
    old: Option<i32>,
    timeout: Duration,
) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let now = walsender_pid(env, db).await?;
        if now.is_some() && now != old {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(false)
}

/// Item 6, the same process: the replication connection breaks on walcast's
/// side only (a middlebox resets it), so the old walsender keeps the slot
/// until wal_sender_timeout (60 s here). walcast ends its own old session
/// and streams again within seconds, although slot_wait_timeout_ms (3 s) is
/// far shorter than wal_sender_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_stale_walsender_is_ended_after_a_network_failure() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let dir = tempfile::tempdir()?;
    let (db, proxy) = proxied_db(env, "recblip", "60s").await?;
    let cfg = WalcastConfig::for_db(env, &db, &dir.path().join("state"))
        .set("postgres", "port", &proxy.port().to_string())
        .set("postgres", "slot_wait_timeout_ms", "3000");
    let mut reader = reader(env, &db).await?;
    let mut w = Walcast::start(&bin(), &dir.path().join("w"), &cfg)?;
    blocking(|| w.wait_streaming())?;
    let mut client = db.admin(env).await?;
    let mut writer = Writer::new(&client).await?;
    let mut rng = rng("own_stale_walsender");
    writer.txn(&mut client, &mut rng, 5, 3, false).await?;
    ensure!(blocking(|| wait_all(
        &mut reader,
        &writer,
        Duration::from_secs(60)
    ))?);
    let before = walsender_pid(env, &db).await?;
    ensure!(before.is_some());
    proxy.reset_client_side();
    let blip = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(
        walsender_pid(env, &db).await? == before,
        "the server should not have noticed the broken connection yet"
    );
    writer.txn(&mut client, &mut rng, 5, 3, false).await?;
    let reconnected = wait_new_walsender(env, &db, before, Duration::from_secs(20)).await?;
    let arrived = blocking(|| wait_all(&mut reader, &writer, Duration::from_secs(20)))?;
    let took = blip.elapsed();
    let text = w.log_text();
    ensure!(
        w.is_running() && reconnected && arrived,
        "walcast did not stream again within 20 s of the blip (running {}, new walsender {reconnected}, events {arrived}):\n{}",
        w.is_running(),
        tail(&text, 30)
    );
    ensure!(
        text.contains("held by this process's previous replication session"),
        "{}",
        tail(&text, 30)
    );
    eprintln!("streaming again {:.1} s after the blip", took.as_secs_f64());
    w.kill9()?;
    drop(proxy);
    drop(client);
    db.drop(env).await
}

/// Item 6, a restarted process: the network fails half-open and walcast is
/// restarted meanwhile (a liveness probe, a redeploy). The old walsender
/// holds the slot until wal_sender_timeout (20 s here); the new process
/// waits it out past slot_wait_timeout_ms (2 s) instead of exiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previous_process_stale_walsender_is_waited_out() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let dir = tempfile::tempdir()?;
    let (db, proxy) = proxied_db(env, "recrestart", "20s").await?;
    let cfg = WalcastConfig::for_db(env, &db, &dir.path().join("state"))
        .set("postgres", "port", &proxy.port().to_string())
        .set("postgres", "slot_wait_timeout_ms", "2000");
    let mut reader = reader(env, &db).await?;
    let mut first = Walcast::start(&bin(), &dir.path().join("first"), &cfg)?;
    blocking(|| first.wait_streaming())?;
    let mut client = db.admin(env).await?;
    let mut writer = Writer::new(&client).await?;
    let mut rng = rng("previous_process_stale_walsender");
    writer.txn(&mut client, &mut rng, 5, 3, false).await?;
    ensure!(blocking(|| wait_all(
        &mut reader,
        &writer,
        Duration::from_secs(60)
    ))?);
    let before = walsender_pid(env, &db).await?;
    proxy.half_open();
    first.kill9()?;
    let restarted = Instant::now();
    let mut second = Walcast::start(&bin(), &dir.path().join("second"), &cfg)?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    ensure!(
        second.is_running(),
        "walcast exited while its previous session held the slot:\n{}",
        second.log_text()
    );
    writer.txn(&mut client, &mut rng, 5, 3, false).await?;
    let reconnected = wait_new_walsender(env, &db, before, Duration::from_secs(45)).await?;
    let arrived = blocking(|| wait_all(&mut reader, &writer, Duration::from_secs(30)))?;
    let text = second.log_text();
    ensure!(
        second.is_running() && reconnected && arrived,
        "the restarted walcast did not take over (running {}, new walsender {reconnected}, events {arrived}):\n{}",
        second.is_running(),
        tail(&text, 30)
    );
    ensure!(
        text.contains("held by walcast's previous replication session"),
        "{}",
        tail(&text, 30)
    );
    eprintln!(
        "the restarted walcast streamed {:.1} s after the restart",
        restarted.elapsed().as_secs_f64()
    );
    second.kill9()?;
    drop(proxy);
    drop(client);
    db.drop(env).await
}

fn tail(text: &str, lines: usize) -> String {
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}
