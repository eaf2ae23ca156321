//! Issue 4, test 6: bad configuration and bad state each give a clear error
//! and a non-zero exit.

use std::time::Duration;

use anyhow::Result;
use walcast_tests::pg::TestDb;
use walcast_tests::process::{Walcast, WalcastConfig};
use walcast_tests::TestEnv;

use crate::common::*;

const OPERATOR_EXIT: i32 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_errors_are_reported_before_any_io() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let dir = tempfile::tempdir()?;
    let db = TestDb::create(env, "badcfg").await?;
    let base = WalcastConfig::for_db(env, &db, dir.path());
    for (cfg, needle) in [
        (
            base.clone().set("pipeline", "max_inflight", "3"),
            "max_inflight",
        ),
        (
            base.clone().set("postgres", "slot", "\"Bad-Slot\""),
            "postgres.slot",
        ),
        (
            base.clone().set("kafka", "bootstrap_servers", "\"\""),
            "bootstrap_servers",
        ),
        (
            base.clone()
                .set("outbox", "topic", "\"has space ${routedByValue}\""),
            "outbox.topic",
        ),
    ] {
        let (code, out) = run_to_exit(dir.path(), &cfg)?;
        assert_eq!(code, OPERATOR_EXIT, "{out}");
        assert!(out.contains(needle), "expected {needle:?} in: {out}");
    }
    // An unknown environment override is rejected too.
    let file = dir.path().join("ok.toml");
    std::fs::write(&file, &base.toml)?;
    let out = std::process::Command::new(bin())
        .args(["config", "--config", file.to_str().unwrap()])
        .env("WALCAST_KAFKA__NOPE", "1")
        .output()?;
    assert_eq!(out.status.code(), Some(OPERATOR_EXIT));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
    // `walcast config` prints the effective config with the password redacted.
    let out = std::process::Command::new(bin())
        .args(["config", "--config", file.to_str().unwrap()])
        .output()?;
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("password = \"<redacted>\""), "{text}");
    db.drop(env).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_database_state_is_reported_clearly() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let dir = tempfile::tempdir()?;
    let db = TestDb::create(env, "badstate").await?;
    let admin = db.admin(env).await?;
    let base = WalcastConfig::for_db(env, &db, dir.path());

    // Missing table.
    let (code, out) = run_to_exit(
        dir.path(),
        &base.clone().set("outbox", "tables", "[\"public.nope\"]"),
    )?;
    assert_eq!(code, OPERATOR_EXIT, "{out}");
    assert!(
        out.contains("outbox table public.nope does not exist"),
        "{out}"
    );

    // Missing column.
    admin
        .batch_execute(
            "CREATE TABLE outbox2 (id uuid, aggregatetype text, type text, payload jsonb)",
        )
        .await?;
    let (code, out) = run_to_exit(
        dir.path(),
        &base.clone().set("outbox", "tables", "[\"public.outbox2\"]"),
    )?;
    assert_eq!(code, OPERATOR_EXIT, "{out}");
    assert!(out.contains("has no column \"aggregateid\""), "{out}");

    // A generated column: logical replication does not carry its value.
    admin
        .batch_execute(
            "CREATE TABLE outbox3 (id uuid, aggregatetype text, type text, payload jsonb, \
             aggregateid text GENERATED ALWAYS AS (payload->>'account') STORED)",
        )
        .await?;
    let (code, out) = run_to_exit(
        dir.path(),
        &base.clone().set("outbox", "tables", "[\"public.outbox3\"]"),
    )?;
    assert_eq!(code, OPERATOR_EXIT, "{out}");
    assert!(
        out.contains("column \"aggregateid\" of outbox table public.outbox3 (named by outbox.columns.aggregateid) is a generated column"),
        "{out}"
    );

    // Wrong password.
    let (code, out) = run_to_exit(
        dir.path(),
        &base.clone().set("postgres", "password", "\"wrong\""),
    )?;
    assert_eq!(code, OPERATOR_EXIT, "{out}");
    assert!(out.contains("password"), "{out}");

    // A role without REPLICATION.
    let role = format!("norepl_{}", &db.slot[2..]);
    admin
        .batch_execute(&format!("CREATE ROLE {role} LOGIN PASSWORD 'pw'"))
        .await?;
    let (code, out) = run_to_exit(
        dir.path(),
        &base
            .clone()
            .set("postgres", "user", &format!("\"{role}\""))
            .set("postgres", "password", "\"pw\""),
    )?;
    assert_eq!(code, OPERATOR_EXIT, "{out}");
    assert!(
        out.contains(&format!("ALTER ROLE {role} REPLICATION")),
        "{out}"
    );

    // Publication missing and not creatable by walcast (not the table owner).
    let (code, out) = run_to_exit(
        dir.path(),
        &base
            .clone()
            .set("postgres", "publication", "\"p_missing\"")
            .set("postgres", "create_publication", "true"),
    )?;
    assert_eq!(code, OPERATOR_EXIT, "{out}");
    assert!(
        out.contains("cannot create publication p_missing") && out.contains("CREATE PUBLICATION"),
        "{out}"
    );

    // Slot active elsewhere: a second instance on the same slot fails clearly.
    let mut first = Walcast::start(&bin(), &dir.path().join("a"), &base)?;
    first.wait_streaming()?;
    let (code, out) = run_to_exit(
        dir.path(),
        &base.clone().set("postgres", "slot_wait_timeout_ms", "1500"),
    )?;
    assert_eq!(code, OPERATOR_EXIT, "{out}");
    assert!(out.contains("is in use by another connection"), "{out}");

    // Slot dropped after positions were confirmed on it: refuse, name the command.
    let mut reader = reader(env, &db).await?;
    let mut client = db.admin(env).await?;
    let mut writer = Writer::new(&client).await?;
    let mut rng = rng("badstate");
    writer.txn(&mut client, &mut rng, 5, 5, false).await?;
    assert!(
        wait_all(&mut reader, &writer, Duration::from_secs(60))?,
        "the first instance did not deliver 5 events in 60 s; its log:\n{}",
        first.log_text()
    );
    first.terminate()?;
    assert!(first.wait_exit(Duration::from_secs(30))?.success());
    admin
        .execute("SELECT pg_drop_replication_slot($1)", &[&db.slot])
        .await?;
    let (code, out) = run_to_exit(dir.path(), &base)?;
    assert_eq!(code, OPERATOR_EXIT, "{out}");
    assert!(
        out.contains("no longer exists") && out.contains("walcast slot accept-gap"),
        "{out}"
    );
    let slots: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.slot],
        )
        .await?
        .get(0);
    assert_eq!(slots, 0, "walcast must not silently recreate the slot");
    // Accepting the gap explicitly lets the next run start a new slot.
    // The file run_to_exit wrote the configuration to.
    let file = dir.path().join("run-to-exit.toml");
    let (status, out) = Walcast::run_to_exit(
        &bin(),
        &["slot", "accept-gap", "--config", file.to_str().unwrap()],
        Duration::from_secs(30),
    )?;
    assert!(status.success(), "{out}");
    assert!(out.contains("forgot walcast's record"), "{out}");
    let mut again = Walcast::start(&bin(), &dir.path().join("b"), &base)?;
    again.wait_streaming()?;
    assert!(
        again.log_text().contains("created_slot=true"),
        "{}",
        again.log_text()
    );
    again.kill9()?;
    drop(client);
    drop(admin);
    db.drop(env).await?;
    Ok(())
}

/// `wal_level` must be logical. Checked on the PostgreSQL 17 instance (which
/// this test switches to `replica` and back), so the shared 15 instance and
/// its slots are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_replica_is_refused() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.exclusive().await;
    let port = env.pg17_port();
    let admin =
        walcast_tests::pg::connect(env, port, "postgres", &env.admin_user, &env.admin_password)
            .await?;
    let slots: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_type = 'logical'",
            &[],
        )
        .await?
        .get(0);
    anyhow::ensure!(
        slots == 0,
        "PostgreSQL 17 has logical slots; wal_level cannot be lowered"
    );
    admin
        .batch_execute("ALTER SYSTEM SET wal_level = replica")
        .await?;
    drop(admin);
    env.control(&["restart", "pg17", "--mode", "fast"]);
    let result = async {
        let db = TestDb::create_on(env, port, "wallevel", true).await?;
        let dir = tempfile::tempdir()?;
        let cfg = WalcastConfig::for_db(env, &db, dir.path());
        let (code, out) = run_to_exit(dir.path(), &cfg)?;
        // `walcast check` names it too (issue 11).
        let check = crate::ops::walcast(dir.path(), Some(&cfg), &["check", "--json"])?;
        db.drop(env).await?;
        anyhow::Ok((code, out, check))
    }
    .await;
    let admin =
        walcast_tests::pg::connect(env, port, "postgres", &env.admin_user, &env.admin_password)
            .await?;
    admin.batch_execute("ALTER SYSTEM RESET wal_level").await?;
    drop(admin);
    env.control(&["restart", "pg17", "--mode", "fast"]);
    let (code, out, check) = result?;
    assert_eq!(code, OPERATOR_EXIT, "{out}");
    assert!(
        out.contains("wal_level = replica") && out.contains("wal_level = logical"),
        "{out}"
    );
    assert_eq!(check.code, OPERATOR_EXIT, "{}", check.text());
    let v = check.json();
    let failed: Vec<&serde_json::Value> = v["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["name"] == "postgres.wal_level" && c["status"] == "fail")
        .collect();
    assert_eq!(failed.len(), 1, "{}", check.stdout);
    assert!(
        failed[0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("runs with wal_level = replica"))
            && failed[0]["fix"]
                .as_str()
                .is_some_and(|f| f.contains("ALTER SYSTEM SET wal_level = logical")),
        "{}",
        check.stdout
    );
    Ok(())
}
