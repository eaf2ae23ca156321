//! The reliability suite's writer and auditor.
//!
//! The [`Workload`] writes outbox transactions on its own thread (and its own
//! tokio runtime, so a test blocking its threads never slows the load) and
//! logs each one: committed, rolled back, or unknown (the connection broke
//! during COMMIT). Every event's payload carries its key and a per-key
//! sequence number; every transaction also inserts a marker row with a unique
//! tag into a table outside walcast's publication, and updates another row of
//! it, so walcast sees other tables in the same transactions.
//!
//! The [`Auditor`] is a second pgoutput slot on a publication of only that
//! marker table: it maps each tag to its transaction's commit end LSN from
//! Postgres's own WAL. That gives the ack-safety check its LSNs, resolves
//! unknown outcomes (a tag in the WAL committed), and orders transactions of
//! several connections by commit.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use rand::{Rng, SeedableRng};
use tokio_postgres::Client;
use walcast_pgoutput::{ColumnValue, Decoder, Message};

use crate::checker::{Outcome, WrittenEvent, WrittenTxn};
use crate::env::TestEnv;
use crate::pg::{connect, TestDb};

/// Aggregate types (one topic each: `<prefix>.<type>`).
pub const AGG_TYPES: [&str; 2] = ["Order", "Payment"];

/// The marker table (outside walcast's publication).
pub const MARKER_DDL: &str =
    "CREATE TABLE IF NOT EXISTS business (id bigserial PRIMARY KEY, tag text NOT NULL, note text)";

/// The topics a workload on `db` writes to.
pub fn topics(db: &TestDb) -> Vec<String> {
    AGG_TYPES
        .iter()
        .map(|a| format!("{}.{a}", db.topic_prefix))
        .collect()
}

/// The shape of the load.
#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    /// Aggregates (record keys) to spread events over.
    pub keys: usize,
    /// Events per transaction.
    pub txn_events: RangeInclusive<usize>,
    /// Padding bytes in each payload.
    pub pad: RangeInclusive<usize>,
    /// Fraction of transactions rolled back on purpose.
    pub rollback: f64,
    /// Pause between transactions.
    pub pause: Duration,
    /// Stop after committing this many events (None: until stopped).
    pub max_events: Option<u64>,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        WorkloadSpec {
            keys: 200,
            txn_events: 1..=40,
            pad: 0..=200,
            rollback: 0.05,
            pause: Duration::from_millis(20),
            max_events: None,
        }
    }
}

/// What the writer did, in the order it did it (one connection: commit order).
#[derive(Debug, Default)]
pub struct WriterLog {
    /// The transactions.
    pub txns: Vec<WrittenTxn>,
    /// Each transaction's marker tag (same index).
    pub tags: Vec<String>,
    /// Connection or statement errors the writer saw (and survived).
    pub errors: u64,
}

impl WriterLog {
    /// Adds a transaction written elsewhere (for example a large one).
    pub fn push(&mut self, txn: WrittenTxn, tag: String) {
        self.txns.push(txn);
        self.tags.push(tag);
    }

    /// Appends another log.
    pub fn extend(&mut self, other: WriterLog) {
        self.txns.extend(other.txns);
        self.tags.extend(other.tags);
        self.errors += other.errors;
    }

    /// Events of committed transactions.
    pub fn committed_events(&self) -> u64 {
        self.txns
            .iter()
            .filter(|t| t.outcome == Outcome::Committed)
            .map(|t| t.events.len() as u64)
            .sum()
    }

    /// Ids of committed events.
    pub fn committed_ids(&self) -> std::collections::HashSet<String> {
        self.txns
            .iter()
            .filter(|t| t.outcome == Outcome::Committed)
            .flat_map(|t| t.events.iter().map(|e| e.id.clone()))
            .collect()
    }

    /// Transactions whose outcome was unknown to the writer.
    pub fn unknown(&self) -> usize {
        self.txns
            .iter()
            .filter(|t| t.outcome == Outcome::Unknown)
            .count()
    }

    /// Uses the auditor's tag → end LSN map (the WAL's truth): sets end LSNs,
    /// resolves unknown outcomes, and orders committed transactions by commit.
    ///
    /// # Errors
    /// When the WAL contradicts the writer (a rolled-back tag committed, a
    /// committed tag missing): a bug in the suite, never ignored.
    pub fn resolve(&mut self, commits: &HashMap<String, u64>) -> Result<()> {
        for (t, tag) in self.txns.iter_mut().zip(&self.tags) {
            let end = commits.get(tag).copied();
            match (t.outcome, end) {
                (Outcome::Committed, None) => {
                    bail!("transaction {tag} committed but the auditor has no commit for it")
                }
                (Outcome::RolledBack, Some(_)) => {
                    bail!("transaction {tag} was rolled back but the auditor saw it commit")
                }
                (Outcome::Unknown, Some(_)) => t.outcome = Outcome::Committed,
                (Outcome::Unknown, None) => t.outcome = Outcome::RolledBack,
                _ => {}
            }
            t.end_lsn = end;
        }
        let mut order: Vec<usize> = (0..self.txns.len()).collect();
        order.sort_by_key(|&i| (self.txns[i].end_lsn.unwrap_or(u64::MAX), i));
        let txns = std::mem::take(&mut self.txns);
        let tags = std::mem::take(&mut self.tags);
        let mut slots: Vec<Option<(WrittenTxn, String)>> =
            txns.into_iter().zip(tags).map(Some).collect();
        for i in order {
            let (t, tag) = slots[i].take().expect("each index once");
            self.txns.push(t);
            self.tags.push(tag);
        }
        Ok(())
    }
}

/// A writer running on its own thread.
#[derive(Debug)]
pub struct Workload {
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    thread: Option<JoinHandle<Result<WriterLog>>>,
}

struct Target {
    env: TestEnv,
    port: u16,
    db: String,
}

impl Workload {
    /// Starts writing to `db` with `spec`; `seed` makes it replayable.
    pub fn start(env: &TestEnv, db: &TestDb, spec: WorkloadSpec, seed: u64) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let target = Target {
            env: env.clone(),
            port: db.port,
            db: db.name.clone(),
        };
        let (s, c) = (stop.clone(), committed.clone());
        let thread = std::thread::Builder::new()
            .name("workload".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(write_loop(target, spec, seed, s, c))
            })
            .expect("spawning the workload thread");
        Workload {
            stop,
            committed,
            thread: Some(thread),
        }
    }

    /// Events committed so far.
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    /// Whether the writer thread is done (reached `max_events` or failed).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Blocks until at least `n` events are committed (or the timeout).
    pub fn wait_committed(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.committed() < n {
            if Instant::now() >= deadline || self.is_finished() {
                return self.committed() >= n;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Stops the writer (the transaction in progress finishes) and returns its log.
    ///
    /// # Errors
    /// When the writer itself failed (not a connection error, which it survives).
    pub fn stop(mut self) -> Result<WriterLog> {
        self.stop.store(true, Ordering::Relaxed);
        let t = self.thread.take().expect("stopped once");
        t.join()
            .map_err(|_| anyhow::anyhow!("the workload thread panicked"))?
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A transaction's events: ids, keys, payloads.
#[derive(Debug)]
pub struct TxnRows {
    /// Event ids.
    pub ids: Vec<String>,
    /// Aggregate types.
    pub types: Vec<String>,
    /// Keys.
    pub keys: Vec<String>,
    /// Payloads (JSON text).
    pub payloads: Vec<String>,
}

impl TxnRows {
    /// The checker's view of these rows.
    pub fn events(&self) -> Vec<WrittenEvent> {
        self.ids
            .iter()
            .zip(&self.keys)
            .map(|(id, key)| WrittenEvent {
                id: id.clone(),
                key: key.clone(),
            })
            .collect()
    }
}

/// Makes one transaction's rows: random keys, per-key sequence numbers from `seqs`.
pub fn make_rows(
    rng: &mut impl Rng,
    spec: &WorkloadSpec,
    seqs: &mut HashMap<String, u64>,
) -> TxnRows {
    let size = rng.random_range(spec.txn_events.clone());
    let mut rows = TxnRows {
        ids: Vec::with_capacity(size),
        types: Vec::with_capacity(size),
        keys: Vec::with_capacity(size),
        payloads: Vec::with_capacity(size),
    };
    for _ in 0..size {
        let agg = rng.random_range(0..spec.keys.max(1));
        let key = format!("agg-{agg}");
        let seq = seqs.entry(key.clone()).or_insert(0);
        *seq += 1;
        let pad = "x".repeat(rng.random_range(spec.pad.clone()));
        rows.payloads.push(format!(
            "{{\"key\": \"{key}\", \"seq\": {seq}, \"pad\": \"{pad}\"}}"
        ));
        rows.ids.push(uuid::Uuid::new_v4().to_string());
        rows.types
            .push(AGG_TYPES[agg % AGG_TYPES.len()].to_string());
        rows.keys.push(key);
    }
    rows
}

/// Inserts `rows` into the outbox inside `tx`, with the marker row `tag`.
pub async fn insert_rows(
    tx: &tokio_postgres::Transaction<'_>,
    tag: &str,
    rows: &TxnRows,
) -> Result<()> {
    tx.execute(
        "INSERT INTO business (tag, note) VALUES ($1, 'before')",
        &[&tag],
    )
    .await?;
    tx.execute(
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) \
         SELECT i::uuid, t, k, 'Happened', p::jsonb FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS u(i, t, k, p)",
        &[&rows.ids, &rows.types, &rows.keys, &rows.payloads],
    )
    .await?;
    tx.execute(
        "UPDATE business SET note = 'after' WHERE id = (SELECT max(id) FROM business)",
        &[],
    )
    .await?;
    Ok(())
}

async fn write_loop(
    target: Target,
    spec: WorkloadSpec,
    seed: u64,
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
) -> Result<WriterLog> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut log = WriterLog::default();
    let mut seqs: HashMap<String, u64> = HashMap::new();
    let mut client: Option<Client> = None;
    let env = &target.env;
    while !stop.load(Ordering::Relaxed) {
        if spec
            .max_events
            .is_some_and(|m| committed.load(Ordering::Relaxed) >= m)
        {
            break;
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            match connect(
                env,
                target.port,
                &target.db,
                &env.admin_user,
                &env.admin_password,
            )
            .await
            {
                Ok(c) => client = Some(c),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        let c = client.as_mut().expect("connected above");
        let rows = make_rows(&mut rng, &spec, &mut seqs);
        let rollback = rng.random_bool(spec.rollback);
        let tag = uuid::Uuid::new_v4().to_string();
        // Errors before COMMIT leave nothing committed; an error during
        // COMMIT leaves the outcome unknown.
        let outcome = async {
            let tx = match c.transaction().await {
                Ok(tx) => tx,
                Err(_) => return Outcome::RolledBack,
            };
            if insert_rows(&tx, &tag, &rows).await.is_err() {
                return Outcome::RolledBack;
            }
            if rollback {
                let _ = tx.rollback().await;
                return Outcome::RolledBack;
            }
            match tx.commit().await {
                Ok(()) => Outcome::Committed,
                Err(_) => Outcome::Unknown,
            }
        }
        .await;
        if outcome == Outcome::Committed {
            committed.fetch_add(rows.ids.len() as u64, Ordering::Relaxed);
        } else if !rollback || outcome == Outcome::Unknown {
            log.errors += 1;
            client = None;
        }
        log.push(
            WrittenTxn {
                events: rows.events(),
                outcome,
                end_lsn: None,
            },
            tag,
        );
        if !spec.pause.is_zero() {
            tokio::time::sleep(spec.pause).await;
        }
    }
    Ok(log)
}

/// Writes one large transaction of `n` events over `keys` keys, built in SQL
/// (ids derived from a random prefix, so nothing large crosses the wire),
/// with `pad` bytes of payload padding each. Returns its log entry.
///
/// # Errors
/// Any database error (the transaction then did not commit, unless the error
/// came from COMMIT: the entry says `Unknown` then).
pub async fn write_large_txn(
    client: &mut Client,
    n: u64,
    keys: u64,
    pad: usize,
) -> Result<(WrittenTxn, String)> {
    let prefix = {
        let u = uuid::Uuid::new_v4().simple().to_string();
        format!(
            "{}-{}-4{}-8{}-",
            &u[0..8],
            &u[8..12],
            &u[13..16],
            &u[17..20]
        )
    };
    let tag = uuid::Uuid::new_v4().to_string();
    let id_of = |i: u64| format!("{prefix}{i:012x}");
    let key_of = |i: u64| format!("big-{}", i % keys);
    let events: Vec<WrittenEvent> = (0..n)
        .map(|i| WrittenEvent {
            id: id_of(i),
            key: key_of(i),
        })
        .collect();
    let tx = client.transaction().await?;
    tx.execute(
        "INSERT INTO business (tag, note) VALUES ($1, 'large')",
        &[&tag],
    )
    .await?;
    tx.execute(
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) \
         SELECT ($1 || lpad(to_hex(i), 12, '0'))::uuid, \
                CASE WHEN i % 2 = 0 THEN 'Order' ELSE 'Payment' END, \
                'big-' || (i % $2), 'Large', \
                jsonb_build_object('key', 'big-' || (i % $2), 'seq', i / $2, 'pad', repeat('y', $3)) \
         FROM generate_series(0::bigint, $4::bigint - 1) AS i",
        &[&prefix, &(keys as i64), &(pad as i32), &(n as i64)],
    )
    .await
    .context("inserting the large transaction")?;
    let outcome = match tx.commit().await {
        Ok(()) => Outcome::Committed,
        Err(_) => Outcome::Unknown,
    };
    Ok((
        WrittenTxn {
            events,
            outcome,
            end_lsn: None,
        },
        tag,
    ))
}

/// A pgoutput slot on a publication of only the marker table.
#[derive(Debug, Clone)]
pub struct Auditor {
    /// Slot name.
    pub slot: String,
    /// Publication name.
    pub publication: String,
}

impl Auditor {
    /// Creates the marker table, its publication and the auditor slot (as
    /// superuser), before any transaction is written.
    pub async fn create(admin: &Client, db: &TestDb) -> Result<Auditor> {
        let a = Auditor {
            slot: format!("{}_audit", db.slot),
            publication: format!("{}_audit", db.publication),
        };
        admin.batch_execute(MARKER_DDL).await?;
        admin
            .batch_execute(&format!(
                "CREATE PUBLICATION {} FOR TABLE business WITH (publish = 'insert')",
                a.publication
            ))
            .await?;
        admin
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&a.slot],
            )
            .await?;
        Ok(a)
    }

    /// Tag → commit end LSN of every committed transaction with a marker row
    /// (peeks; the slot keeps everything for the next call).
    pub async fn commits(&self, admin: &Client) -> Result<HashMap<String, u64>> {
        let rows = admin
            .query(
                "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL, 'proto_version', '1', 'publication_names', $2)",
                &[&self.slot, &self.publication],
            )
            .await
            .context("peeking the auditor slot")?;
        let mut decoder = Decoder::new(1);
        let mut current: Vec<String> = Vec::new();
        let mut out = HashMap::new();
        for row in rows {
            let data: Vec<u8> = row.get(0);
            match decoder.decode(&Bytes::from(data))? {
                Message::Begin(_) => current.clear(),
                Message::Insert(ins) => {
                    if let Some(ColumnValue::Text(tag)) = ins.new.get(1) {
                        current.push(String::from_utf8_lossy(tag).into_owned());
                    }
                }
                Message::Commit(c) => {
                    for tag in current.drain(..) {
                        out.insert(tag, c.end_lsn.as_u64());
                    }
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// Drops the slot (the publication goes with the database).
    pub async fn drop(&self, admin: &Client) -> Result<()> {
        admin
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await?;
        Ok(())
    }
}
