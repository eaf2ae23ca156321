//! Shared helpers of the integration tests.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use rand::{Rng, SeedableRng};
use tokio_postgres::Client;
use walcast_pgoutput::{Decoder, Message};
use walcast_tests::checker::{Observed, Outcome, WrittenEvent, WrittenTxn};
use walcast_tests::kafka::{create_topics, Record, TopicReader};
use walcast_tests::pg::TestDb;
use walcast_tests::process::{Walcast, WalcastConfig};
use walcast_tests::TestEnv;

/// The walcast binary Cargo built for these tests.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_walcast"))
}

/// Aggregate types the workload routes by (one topic each).
pub const AGG_TYPES: [&str; 2] = ["Order", "Payment"];

/// The topics of a test database.
pub fn topics(db: &TestDb) -> Vec<String> {
    AGG_TYPES
        .iter()
        .map(|a| format!("{}.{a}", db.topic_prefix))
        .collect()
}

/// Creates the test's topics (3 partitions each) and a reader on them.
pub async fn reader(env: &TestEnv, db: &TestDb) -> Result<TopicReader> {
    let t = topics(db);
    let refs: Vec<&str> = t.iter().map(String::as_str).collect();
    create_topics(&env.kafka_bootstrap, &refs, 3).await?;
    TopicReader::new(&env.kafka_bootstrap, &refs)
}

/// A seeded RNG; the seed is printed so a failure can be replayed with WALCAST_TEST_SEED.
pub fn rng(test: &str) -> rand::rngs::StdRng {
    let seed = std::env::var("WALCAST_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random::<u64>());
    eprintln!("{test}: WALCAST_TEST_SEED={seed}");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// Writes outbox transactions. Each transaction has `1..=max_txn` events over
/// `aggregates` keys, interleaved with writes to a table outside the
/// publication; `rollback_pct` percent are rolled back.
pub struct Writer {
    /// The log, in commit order.
    pub txns: Vec<WrittenTxn>,
    next_event: u64,
}

impl Writer {
    /// A writer for `db` (creates the neighbour table).
    pub async fn new(client: &Client) -> Result<Writer> {
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS business (id bigserial PRIMARY KEY, note text)",
            )
            .await?;
        Ok(Writer {
            txns: Vec::new(),
            next_event: 0,
        })
    }

    /// Writes one transaction.
    pub async fn txn(
        &mut self,
        client: &mut Client,
        rng: &mut impl Rng,
        size: usize,
        aggregates: usize,
        rollback: bool,
    ) -> Result<()> {
        let mut ids = Vec::with_capacity(size);
        let mut types = Vec::with_capacity(size);
        let mut keys = Vec::with_capacity(size);
        let mut payloads = Vec::with_capacity(size);
        let mut events = Vec::with_capacity(size);
        for _ in 0..size {
            let id = uuid::Uuid::new_v4().to_string();
            let agg = rng.random_range(0..aggregates);
            let agg_type = AGG_TYPES[agg % AGG_TYPES.len()];
            let key = format!("agg-{agg}");
            self.next_event += 1;
            payloads.push(format!(
                "{{\"event\": {}, \"aggregate\": \"{key}\", \"pad\": \"{}\"}}",
                self.next_event,
                "x".repeat(rng.random_range(0..200))
            ));
            ids.push(id.clone());
            types.push(agg_type.to_string());
            keys.push(key.clone());
            events.push(WrittenEvent { id, key });
        }
        let tx = client.transaction().await?;
        tx.execute("INSERT INTO business (note) VALUES ('before')", &[])
            .await?;
        tx.execute(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) \
             SELECT i::uuid, t, k, 'Happened', p::jsonb FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS u(i, t, k, p)",
            &[&ids, &types, &keys, &payloads],
        )
        .await
        .context("inserting outbox rows")?;
        tx.execute(
            "UPDATE business SET note = 'after' WHERE id = (SELECT max(id) FROM business)",
            &[],
        )
        .await?;
        let outcome = if rollback {
            tx.rollback().await?;
            Outcome::RolledBack
        } else {
            tx.commit().await?;
            Outcome::Committed
        };
        self.txns.push(WrittenTxn {
            events,
            outcome,
            end_lsn: None,
        });
        Ok(())
    }

    /// Committed events.
    pub fn committed(&self) -> usize {
        self.txns
            .iter()
            .filter(|t| t.outcome == Outcome::Committed)
            .map(|t| t.events.len())
            .sum()
    }

    /// Fills in each committed transaction's commit end LSN from an auditor
    /// slot (pgoutput, same publication) created before the writes, decoded
    /// with our decoder: the ground truth from Postgres's own WAL.
    pub async fn attach_end_lsns(
        &mut self,
        admin: &Client,
        auditor_slot: &str,
        publication: &str,
    ) -> Result<()> {
        let rows = admin
            .query(
                "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL, 'proto_version', '1', 'publication_names', $2)",
                &[&auditor_slot, &publication],
            )
            .await
            .context("peeking the auditor slot")?;
        let mut decoder = Decoder::new(1);
        let mut current: Vec<String> = Vec::new();
        let mut end_of: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
        for row in rows {
            let data: Vec<u8> = row.get(0);
            match decoder.decode(&Bytes::from(data))? {
                Message::Begin(_) => current.clear(),
                Message::Insert(ins) => {
                    if let Some(walcast_pgoutput::ColumnValue::Text(id)) = ins.new.get(0) {
                        current.push(String::from_utf8_lossy(id).into_owned());
                    }
                }
                Message::Commit(c) => {
                    for id in current.drain(..) {
                        end_of.insert(id, c.end_lsn.as_u64());
                    }
                }
                _ => {}
            }
        }
        for t in &mut self.txns {
            if t.outcome == Outcome::Committed {
                t.end_lsn = t.events.first().and_then(|e| end_of.get(&e.id).copied());
                anyhow::ensure!(
                    t.end_lsn.is_some(),
                    "auditor slot has no commit for a committed transaction"
                );
            }
        }
        Ok(())
    }
}

/// Creates the auditor slot.
pub async fn create_auditor(admin: &Client, db: &TestDb) -> Result<String> {
    let name = format!("{}_audit", db.slot);
    admin
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&name],
        )
        .await?;
    Ok(name)
}

/// Drops the auditor slot.
pub async fn drop_auditor(admin: &Client, name: &str) -> Result<()> {
    walcast_tests::pg::drop_slots(admin, &[name]).await
}

/// Records as checker observations (id from the `id` header).
pub fn observed(records: &[Record]) -> Vec<Observed> {
    records
        .iter()
        .map(|r| Observed {
            id: r.header("id").unwrap_or_default(),
            key: r.key_str(),
            partition: r.partition,
            offset: r.offset,
        })
        .collect()
}

/// Distinct event ids among records.
pub fn distinct_ids(records: &[Record]) -> HashSet<String> {
    records.iter().filter_map(|r| r.header("id")).collect()
}

/// Waits until the reader holds every committed event of `writer`.
pub fn wait_all(reader: &mut TopicReader, writer: &Writer, timeout: Duration) -> Result<bool> {
    let want: HashSet<String> = writer
        .txns
        .iter()
        .filter(|t| t.outcome == Outcome::Committed)
        .flat_map(|t| t.events.iter().map(|e| e.id.clone()))
        .collect();
    wait_ids(reader, &want, timeout)
}

/// Waits until the reader holds a record of every event id in `want`.
pub fn wait_ids(
    reader: &mut TopicReader,
    want: &HashSet<String>,
    timeout: Duration,
) -> Result<bool> {
    let mut have: HashSet<String> = HashSet::new();
    let mut counted = 0;
    reader.read_until(timeout, |recs| {
        for r in &recs[counted..] {
            if let Some(id) = r.header("id") {
                have.insert(id);
            }
        }
        counted = recs.len();
        want.iter().all(|id| have.contains(id))
    })
}

/// Runs `walcast run` with `cfg` (written to `dir`) to completion: its exit
/// code (-1 when killed) and its output.
pub fn run_to_exit(dir: &std::path::Path, cfg: &WalcastConfig) -> Result<(i32, String)> {
    std::fs::create_dir_all(dir)?;
    let file = dir.join("run-to-exit.toml");
    std::fs::write(&file, &cfg.toml)?;
    let (status, out) = Walcast::run_to_exit(
        &bin(),
        &["run", "--config", file.to_str().unwrap()],
        Duration::from_secs(60),
    )?;
    Ok((status.code().unwrap_or(-1), out))
}

/// Waits until the slot's confirmed flush LSN reaches `lsn`.
pub async fn wait_confirmed(
    env: &TestEnv,
    db: &TestDb,
    lsn: u64,
    timeout: Duration,
) -> Result<bool> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if db.confirmed_flush_lsn(env).await?.unwrap_or(0) >= lsn {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Idle again: waits until the slot confirms the server's current position
/// (delivery rule 2), then stops walcast gracefully and asserts exit 0.
/// Returns that position.
pub async fn confirm_idle_then_stop(
    env: &TestEnv,
    db: &TestDb,
    admin: &Client,
    w: &mut Walcast,
) -> Result<u64> {
    let end = current_wal_lsn(admin).await?;
    assert!(
        wait_confirmed(env, db, end, Duration::from_secs(20)).await?,
        "slot did not reach {end:X}:\n{}",
        w.log_text()
    );
    w.terminate()?;
    let status = w.wait_exit(Duration::from_secs(30))?;
    assert!(status.success(), "exit status {status}:\n{}", w.log_text());
    Ok(end)
}

/// `pg_current_wal_lsn()` as a number.
pub async fn current_wal_lsn(admin: &Client) -> Result<u64> {
    let row = admin
        .query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[])
        .await?;
    Ok(row.get::<_, i64>(0) as u64)
}
