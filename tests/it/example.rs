//! The withdrawal example end to end (issue 13): 10,000 withdrawals through
//! the real walcast and the two consumers while walcast and the notification
//! consumer (a child process) are each killed with SIGKILL and restarted;
//! every withdrawal is synced and notified exactly once.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use walcast_consumer::{Consumer, ConsumerConfig};
use walcast_example_withdrawals as ex;
use walcast_tests::kafka::create_topics;
use walcast_tests::pg::TestDb;
use walcast_tests::process::Walcast;
use walcast_tests::TestEnv;

use crate::common::*;

const CHILD_ENV: &str = "WALCAST_TEST_EXAMPLE_CHILD";

fn pg_url(env: &TestEnv, db: &TestDb) -> String {
    format!(
        "host={} port={} dbname={} user={} password={}",
        env.pg_host, db.port, db.name, env.admin_user, env.admin_password
    )
}

fn consumer_cfg(bootstrap: &str, group: &str, topic: &str, pg: &str) -> ConsumerConfig {
    let mut c = ConsumerConfig::new(bootstrap, group, vec![topic.to_string()], pg);
    c.commit_interval = Duration::from_millis(300);
    c
}

/// Not a test on its own: the notification consumer process of
/// `example_withdrawals_exactly_once_through_kills`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of the example test"]
async fn example_notification_child() -> Result<()> {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return Ok(());
    };
    let v: serde_json::Value = serde_json::from_str(&spec)?;
    let s = |k: &str| v[k].as_str().unwrap().to_string();
    let cfg = consumer_cfg(&s("bootstrap"), "notification", &s("topic"), &s("pg"));
    Consumer::new(cfg, ex::Notification)?
        .run(std::future::pending())
        .await?;
    Ok(())
}

fn start_child(spec: &serde_json::Value) -> Result<Child> {
    Command::new(std::env::current_exe()?)
        .args([
            "example::example_notification_child",
            "--exact",
            "--ignored",
        ])
        .env(CHILD_ENV, spec.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the notification consumer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_withdrawals_exactly_once_through_kills() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let db = TestDb::create_on(env, env.pg_port, "example", false).await?;
    let mut client = db.admin(env).await?;
    ex::setup(&client, &db.publication).await?;
    let topic = format!("{}.{}", db.topic_prefix, ex::AGGREGATE);
    create_topics(&env.kafka_bootstrap, &[topic.as_str()], 3).await?;
    let state = tempfile::tempdir()?;
    // The writer's documented walcast routes (README "Libraries").
    let cfg = crate::writer::library_config(env, &db, state.path());
    let mut w = Walcast::start(&bin(), state.path(), &cfg)?;
    w.wait_streaming()?;
    let pg = pg_url(env, &db);
    let partner = Consumer::new(
        consumer_cfg(&env.kafka_bootstrap, "partner-sync", &topic, &pg),
        ex::PartnerSync,
    )?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let partner = tokio::spawn(partner.run(async move {
        let _ = stop_rx.await;
    }));
    let spec = serde_json::json!({"bootstrap": env.kafka_bootstrap, "topic": topic, "pg": pg});
    let mut child = start_child(&spec)?;

    let total = 10_000;
    for i in 0..total {
        let tx = client.transaction().await?;
        ex::record_withdrawal(
            &tx,
            &format!("wd-{i}"),
            &format!("acct-{}", i % 100),
            100 + i as i64,
        )
        .await?;
        tx.commit().await?;
        if i == 3_000 {
            w.kill9()?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            w = Walcast::start(&bin(), state.path(), &cfg)?;
            w.wait_streaming()?;
        }
        if i == 6_000 {
            child.kill()?; // SIGKILL
            child.wait()?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            child = start_child(&spec)?;
        }
    }
    let start = Instant::now();
    let report = loop {
        let r = ex::verify(&client).await?;
        if r.exactly_once() || start.elapsed() > Duration::from_secs(180) {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // Anything repeated late would show now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report_after = ex::verify(&client).await?;
    eprintln!("example: {report_after}");
    child.kill()?;
    child.wait()?;
    let _ = stop_tx.send(());
    partner.await??;
    w.kill9()?;
    assert_eq!(report.withdrawals, total as i64);
    assert!(
        report_after.exactly_once(),
        "{report_after}\n{}",
        w.log_text()
    );
    drop(client);
    db.drop(env).await?;
    Ok(())
}
