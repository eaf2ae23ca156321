//! TLS to Postgres: verify-full against the environment's CA works (and the
//! walsender's connection is encrypted); a certificate from another CA is
//! refused with a clear error, never downgraded to plaintext.

use std::time::Duration;

use anyhow::Result;
use walcast_tests::pg::TestDb;
use walcast_tests::process::{Walcast, WalcastConfig};
use walcast_tests::TestEnv;

use crate::common::*;

fn ca_cert() -> String {
    std::env::var("WALCAST_PG_CA_CERT").unwrap_or_else(|_| {
        walcast_tests::env::repo_dir()
            .join(".walcast/pg15/tls/ca.crt")
            .display()
            .to_string()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_streams_over_tls_and_refuses_a_foreign_ca() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let db = TestDb::create(env, "tls").await?;
    let dir = tempfile::tempdir()?;
    let base = WalcastConfig::for_db(env, &db, dir.path());

    // A certificate chain from an unrelated CA: refused, exit 2, no fallback.
    let foreign = dir.path().join("foreign-ca.crt");
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=foreign",
        ])
        .arg("-keyout")
        .arg(dir.path().join("foreign.key"))
        .arg("-out")
        .arg(&foreign)
        .output()?;
    assert!(status.status.success());
    let bad = base
        .clone()
        .set("postgres", "host", "\"localhost\"")
        .set("postgres", "sslmode", "\"verify-full\"")
        .set(
            "postgres",
            "ssl_root_cert",
            &format!("\"{}\"", foreign.display()),
        );
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, &bad.toml)?;
    let (status, out) = Walcast::run_to_exit(
        &bin(),
        &["run", "--config", file.to_str().unwrap()],
        Duration::from_secs(60),
    )?;
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(out.to_lowercase().contains("tls error"), "{out}");

    // verify-full with the right CA: streams, and the walsender is on TLS.
    let good = base
        .set("postgres", "sslmode", "\"verify-full\"")
        .set("postgres", "ssl_root_cert", &format!("\"{}\"", ca_cert()))
        .set("postgres", "application_name", &format!("\"{}\"", db.slot))
        // verify-full checks the host name: the dev certificate is for localhost.
        .set("postgres", "host", "\"localhost\"");
    let mut reader = reader(env, &db).await?;
    let mut w = Walcast::start(&bin(), &dir.path().join("run"), &good)?;
    w.wait_streaming()?;
    let admin = db.admin(env).await?;
    let ssl: bool = admin
        .query_one(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_replication r USING (pid) WHERE r.application_name = $1",
            &[&db.slot],
        )
        .await?
        .get(0);
    assert!(ssl, "the replication connection is not encrypted");
    let mut client = db.admin(env).await?;
    let mut writer = Writer::new(&client).await?;
    let mut rng = rng("tls");
    for _ in 0..5 {
        writer.txn(&mut client, &mut rng, 10, 10, false).await?;
    }
    assert!(
        wait_all(&mut reader, &writer, Duration::from_secs(60))?,
        "{}",
        w.log_text()
    );
    w.kill9()?;
    drop(client);
    drop(admin);
    db.drop(env).await?;
    Ok(())
}
