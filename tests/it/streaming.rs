//! `postgres.streaming`: large transactions sent by Postgres while they are
//! written (pgoutput protocol 2), held by walcast and published at commit.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio_postgres::Client;
use walcast_tests::checker::{check, Outcome, WrittenEvent, WrittenTxn};
use walcast_tests::pg::TestDb;
use walcast_tests::process::{Walcast, WalcastConfig};
use walcast_tests::TestEnv;

use crate::common::*;

/// Inserts `n` outbox rows (keys `k-0` … `k-{keys-1}` in turn, payloads of
/// about `pad` bytes) in the session's open transaction.
async fn insert_rows(
    client: &Client,
    n: usize,
    keys: usize,
    pad: usize,
    first: &mut usize,
) -> Result<Vec<WrittenEvent>> {
    let mut ids = Vec::with_capacity(n);
    let mut ks = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    let mut events = Vec::with_capacity(n);
    for i in *first..*first + n {
        let id = uuid::Uuid::new_v4().to_string();
        let key = format!("k-{}", i % keys);
        payloads.push(format!(
            "{{\"event\": {i}, \"aggregate\": \"{key}\", \"pad\": \"{}\"}}",
            "s".repeat(pad)
        ));
        ids.push(id.clone());
        ks.push(key.clone());
        events.push(WrittenEvent { id, key });
    }
    *first += n;
    client
        .execute(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) \
             SELECT i::uuid, $4, k, 'Streamed', p::jsonb FROM unnest($1::text[], $2::text[], $3::text[]) AS u(i, k, p)",
            &[&ids, &ks, &payloads, &AGG_TYPES[0]],
        )
        .await
        .context("inserting outbox rows")?;
    Ok(events)
}

/// The slot's streamed transactions so far (`pg_stat_replication_slots`).
async fn stream_txns(admin: &Client, slot: &str) -> Result<i64> {
    let row = admin
        .query_opt(
            "SELECT stream_txns FROM pg_stat_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| r.get(0)).unwrap_or(0))
}

async fn wait_streamed(admin: &Client, slot: &str, more_than: i64) -> Result<i64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n = stream_txns(admin, slot).await?;
        if n > more_than {
            return Ok(n);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "Postgres streamed no transaction on slot {slot} within 60 s (stream_txns = {n})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A transaction of ~1 MB (well past `logical_decoding_work_mem = 64kB`) is
/// streamed to walcast while it is written, with a rolled-back savepoint in
/// it; walcast is killed with SIGKILL while it holds the open transaction
/// (spilled past `stream_memory_bytes`) and restarted; a small transaction
/// commits in the middle, a second large one is rolled back. The checker
/// proves every committed event arrived in per-key commit order, none of the
/// rolled-back ones (savepoint or transaction) did, and nothing of the large
/// transaction was published before its commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transactions_stream_while_written_and_publish_at_commit() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    streamed_transactions(env, env.pg_port).await
}

/// The same on PostgreSQL 17.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transactions_stream_while_written_and_publish_at_commit_pg17() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    streamed_transactions(env, env.pg17_port()).await
}

async fn streamed_transactions(env: &TestEnv, port: u16) -> Result<()> {
    let db = TestDb::create_on(env, port, "stream", true).await?;
    let admin = db.admin(env).await?;
    // The walsender of this database decodes with a small budget, so any
    // transaction past 64 kB is streamed.
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} SET logical_decoding_work_mem = '64kB'",
            db.name
        ))
        .await?;
    let mut reader = reader(env, &db).await?;
    let state = tempfile::tempdir()?;
    let cfg = WalcastConfig::for_db(env, &db, state.path())
        .set("postgres", "streaming", "true")
        .set("postgres", "stream_memory_bytes", "262144");
    let mut w = Walcast::start(&bin(), state.path(), &cfg)?;
    w.wait_streaming()?;
    let streamed_before = stream_txns(&admin, &db.slot).await?;

    let keys = 40;
    let mut next = 0usize;
    // The large transaction, left open.
    let big = db.admin(env).await?;
    big.batch_execute("BEGIN").await?;
    let mut big_events = insert_rows(&big, 1_500, keys, 300, &mut next).await?;
    big.batch_execute("SAVEPOINT s1").await?;
    let undone = insert_rows(&big, 300, keys, 300, &mut next).await?;
    big.batch_execute("ROLLBACK TO SAVEPOINT s1").await?;
    big_events.extend(insert_rows(&big, 1_500, keys, 300, &mut next).await?);
    let streamed = wait_streamed(&admin, &db.slot, streamed_before).await?;

    // A small transaction commits while the large one is open: it is
    // published at once, the large one's events are not.
    let small = db.admin(env).await?;
    small.batch_execute("BEGIN").await?;
    let small_events = insert_rows(&small, 10, keys, 20, &mut next).await?;
    small.batch_execute("COMMIT").await?;
    let small_ids: HashSet<String> = small_events.iter().map(|e| e.id.clone()).collect();
    assert!(
        wait_ids(&mut reader, &small_ids, Duration::from_secs(60))?,
        "the small transaction did not arrive while the large one was open:\n{}",
        w.log_text()
    );
    let big_ids: HashSet<String> = big_events
        .iter()
        .chain(&undone)
        .map(|e| e.id.clone())
        .collect();
    assert!(
        distinct_ids(&reader.records).is_disjoint(&big_ids),
        "events of the open transaction reached Kafka before its commit"
    );
    assert!(
        w.log_text().contains("spill file"),
        "the open transaction (~1 MB) did not spill past stream_memory_bytes = 256 KiB:\n{}",
        w.log_text()
    );

    // SIGKILL while walcast holds the open transaction, then a new process:
    // Postgres streams the transaction again from the slot.
    w.kill9()?;
    let _ = w.wait_exit(Duration::from_secs(10));
    let mut w = Walcast::start(&bin(), state.path(), &cfg)?;
    w.wait_streaming()?;
    big_events.extend(insert_rows(&big, 200, keys, 300, &mut next).await?);
    big.batch_execute("COMMIT").await?;

    // A large transaction that is rolled back after it was streamed.
    let aborted = db.admin(env).await?;
    aborted.batch_execute("BEGIN").await?;
    let aborted_events = insert_rows(&aborted, 3_000, keys, 300, &mut next).await?;
    wait_streamed(&admin, &db.slot, streamed).await?;
    aborted.batch_execute("ROLLBACK").await?;

    small.batch_execute("BEGIN").await?;
    let last_events = insert_rows(&small, 10, keys, 20, &mut next).await?;
    small.batch_execute("COMMIT").await?;

    let txn = |events: Vec<WrittenEvent>, outcome| WrittenTxn {
        events,
        outcome,
        end_lsn: None,
    };
    // In commit order; rolled-back events anywhere.
    let txns = vec![
        txn(small_events, Outcome::Committed),
        txn(big_events, Outcome::Committed),
        txn(last_events, Outcome::Committed),
        txn(undone, Outcome::RolledBack),
        txn(aborted_events, Outcome::RolledBack),
    ];
    let want: HashSet<String> = txns
        .iter()
        .filter(|t| t.outcome == Outcome::Committed)
        .flat_map(|t| t.events.iter().map(|e| e.id.clone()))
        .collect();
    assert!(
        wait_ids(&mut reader, &want, Duration::from_secs(120))?,
        "not every committed event arrived:\n{}",
        w.log_text()
    );
    reader.read_to_end(Duration::from_secs(10))?;
    let report = check(&txns, &observed(&reader.records), &[]);
    eprintln!("streaming: {report}");
    assert!(report.is_clean(), "{report}\n{}", w.log_text());
    assert_eq!(report.committed, 3_220);
    let total = stream_txns(&admin, &db.slot).await?;
    eprintln!(
        "streaming: Postgres streamed {} transactions on the slot",
        total - streamed_before
    );
    // Spill files have no name: nothing is left in the state directory.
    let spill = state.path().join("spill");
    assert!(
        std::fs::read_dir(&spill)
            .with_context(|| format!("reading {}", spill.display()))?
            .next()
            .is_none(),
        "files left in {}",
        spill.display()
    );

    confirm_idle_then_stop(env, &db, &admin, &mut w).await?;
    drop((big, small, aborted, admin));
    db.drop(env).await?;
    Ok(())
}
