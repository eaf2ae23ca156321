//! Issue 11, traces: walcast with `[tracing] otlp_endpoint` set sends one
//! span per relayed transaction to a real OTLP receiver (Jaeger all-in-one,
//! built by `scripts/jaeger`), with the transaction's attributes; the
//! event-level log lines carry the event id and never the payload; an
//! unreachable collector is a warning, never a failure.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use walcast_tests::jaeger::{tag, Jaeger};
use walcast_tests::pg::TestDb;
use walcast_tests::process::{Walcast, WalcastConfig};
use walcast_tests::TestEnv;

use crate::common::*;

/// Writes `n` outbox transactions, transaction `i` with `i + 1` events on
/// aggregate type `Order` (event ids `tx<i>-<j>`, payloads carrying
/// `marker`); returns each transaction's xid with its event ids.
async fn write_txns(
    client: &mut tokio_postgres::Client,
    n: usize,
    marker: &str,
) -> Result<Vec<(i64, Vec<String>)>> {
    let mut out = Vec::new();
    for i in 0..n {
        let tx = client.transaction().await?;
        let xid: i64 = tx
            .query_one("SELECT txid_current()", &[])
            .await?
            .get::<_, i64>(0);
        let mut ids = Vec::new();
        for _ in 0..=i {
            let id = uuid::Uuid::new_v4().to_string();
            tx.execute(
                "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) VALUES ($1::text::uuid, 'Order', $2, 'Placed', jsonb_build_object('secret', $3::text))",
                &[&id, &format!("agg-{i}"), &marker],
            )
            .await?;
            ids.push(id);
        }
        tx.commit().await?;
        out.push((xid & 0xFFFF_FFFF, ids));
    }
    Ok(out)
}

fn traced_config(
    env: &TestEnv,
    db: &TestDb,
    dir: &std::path::Path,
    otlp: &str,
    service: &str,
) -> WalcastConfig {
    WalcastConfig::for_db(env, db, dir)
        .set("tracing", "otlp_endpoint", &format!("\"http://{otlp}\""))
        .set("tracing", "service_name", &format!("\"{service}\""))
        .set("tracing", "export_interval_ms", "200")
}

/// N transactions in, N `walcast.transaction` spans out at Jaeger, each
/// with its xid, event count, topic, commit LSNs and commit time, status
/// not an error; every event's id is a field of its log lines (the
/// producer's debug lines), the payload is in none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_span_per_relayed_transaction_reaches_a_real_otlp_receiver() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let jaeger = Jaeger::start()?;
    let db = TestDb::create(env, "traces").await?;
    let mut reader = reader(env, &db).await?;
    let state = tempfile::tempdir()?;
    let service = format!("walcast-{}", db.slot);
    let mut w = Walcast::start(
        &bin(),
        state.path(),
        &traced_config(env, &db, state.path(), &jaeger.otlp_http, &service),
    )?;
    w.wait_streaming()?;
    let mut client = db.admin(env).await?;
    const N: usize = 5;
    let marker = format!("payload-marker-{}", uuid::Uuid::new_v4());
    let txns = write_txns(&mut client, N, &marker).await?;
    let all: HashSet<String> = txns.iter().flat_map(|(_, ids)| ids.clone()).collect();
    assert!(
        wait_ids(&mut reader, &all, Duration::from_secs(60))?,
        "not every event reached Kafka:\n{}",
        w.log_text()
    );
    // Spans are exported every 200 ms; Jaeger stores them shortly after.
    let deadline = Instant::now() + Duration::from_secs(30);
    let spans = loop {
        let spans: Vec<_> = jaeger
            .spans(&service)?
            .into_iter()
            .filter(|s| s["operationName"] == "walcast.transaction")
            .collect();
        if spans.len() >= N || Instant::now() >= deadline {
            break spans;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let log = w.log_text();
    w.terminate()?;
    w.wait_exit(Duration::from_secs(30))?;
    eprintln!("{} spans at Jaeger for {N} transactions", spans.len());
    if spans.len() != N {
        bail!(
            "Jaeger holds {} transaction spans of service {service}, want {N}: {spans:#?}\nwalcast:\n{log}\nJaeger:\n{}",
            spans.len(),
            jaeger.log_text()
        );
    }
    let by_xid: HashMap<i64, &serde_json::Value> = spans
        .iter()
        .filter_map(|s| Some((tag(s, "walcast.xid")?.as_i64()?, s)))
        .collect();
    let topic = format!("{}.Order", db.topic_prefix);
    for (xid, ids) in &txns {
        let Some(span) = by_xid.get(xid) else {
            bail!("no span with walcast.xid = {xid}: {spans:#?}");
        };
        assert_eq!(
            tag(span, "walcast.event_count").and_then(|v| v.as_i64()),
            Some(ids.len() as i64),
            "{span:#}"
        );
        let topics = tag(span, "walcast.topics")
            .map(|v| v.to_string())
            .unwrap_or_default();
        assert!(
            topics.contains(&topic),
            "walcast.topics {topics} lacks {topic}"
        );
        for key in ["walcast.commit_lsn", "walcast.commit_end_lsn"] {
            let lsn = tag(span, key).and_then(|v| v.as_str()).unwrap_or_default();
            assert!(
                lsn.split_once('/')
                    .is_some_and(|(a, b)| u64::from_str_radix(a, 16).is_ok()
                        && u64::from_str_radix(b, 16).is_ok()),
                "{key} = {lsn:?}"
            );
        }
        assert_eq!(
            tag(span, "walcast.pipeline").and_then(|v| v.as_str()),
            Some(db.slot.as_str())
        );
        assert!(
            tag(span, "walcast.commit_time")
                .and_then(|v| v.as_str())
                .is_some_and(|t| t.starts_with("20") && t.ends_with("+00")),
            "{span:#}"
        );
        assert_ne!(
            tag(span, "error"),
            Some(&serde_json::Value::Bool(true)),
            "{span:#}"
        );
        assert_eq!(
            tag(span, "span.kind").and_then(|v| v.as_str()),
            Some("producer")
        );
        // Event-level log lines carry the event id as a field.
        for id in ids {
            assert!(
                log.lines()
                    .any(|l| l.contains("event handed to the Kafka producer")
                        && l.contains(&format!("event_id={id}"))),
                "no producer log line with event_id={id}:\n{log}"
            );
            assert!(
                log.lines()
                    .any(|l| l.contains("Kafka acknowledged the event")
                        && l.contains(&format!("event_id={id}"))),
                "no acknowledgement log line with event_id={id}:\n{log}"
            );
        }
    }
    assert!(!log.contains(&marker), "a payload reached the log:\n{log}");
    db.drop(env).await?;
    Ok(())
}

/// The collector is unreachable: walcast relays every event all the same,
/// warns once that it cannot export spans, and keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_is_a_warning_not_a_failure() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let db = TestDb::create(env, "traces_down").await?;
    let mut reader = reader(env, &db).await?;
    let state = tempfile::tempdir()?;
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut w = Walcast::start(
        &bin(),
        state.path(),
        &traced_config(
            env,
            &db,
            state.path(),
            &format!("127.0.0.1:{port}"),
            "walcast-down",
        ),
    )?;
    w.wait_streaming()?;
    let mut client = db.admin(env).await?;
    let txns = write_txns(&mut client, 3, "x").await?;
    let all: HashSet<String> = txns.iter().flat_map(|(_, ids)| ids.clone()).collect();
    assert!(
        wait_ids(&mut reader, &all, Duration::from_secs(60))?,
        "events wait for traces:\n{}",
        w.log_text()
    );
    w.wait_for_log("cannot export transaction spans", Duration::from_secs(20))?;
    assert!(w.is_running(), "walcast stopped:\n{}", w.log_text());
    let log = w.log_text();
    assert_eq!(
        log.matches("cannot export transaction spans").count(),
        1,
        "one warning while the collector stays down:\n{log}"
    );
    w.terminate()?;
    let status = w.wait_exit(Duration::from_secs(30))?;
    assert!(status.success(), "exit {status}:\n{}", w.log_text());
    db.drop(env).await?;
    Ok(())
}
