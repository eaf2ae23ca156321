//! PostgreSQL side of the harness: the benchmark database, slots, the backlog
//! generator, the paced writer and the busy neighbours.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use tokio_postgres::{Client, NoTls};

use crate::clock;
use crate::env::BenchEnv;

/// The benchmark database.
pub const BENCH_DB: &str = "walcast_bench";
/// A second database for the idle workload's neighbour.
pub const NEIGHBOUR_DB: &str = "walcast_bench_neighbour";
/// The publication walcast, the bare decoder and pg_recvlogical read.
pub const PUBLICATION: &str = "bench_outbox";
/// Debezium's own publication (same table, same `publish = 'insert'`, plus
/// the heartbeat table only the debezium-heartbeat variant writes).
pub const DEBEZIUM_PUBLICATION: &str = "bench_outbox_debezium";
/// The only aggregate type: every system routes to `<prefix>.Order`.
pub const AGGREGATE_TYPE: &str = "Order";

/// The schema: the README's outbox table (Debezium EventRouter column names)
/// plus `created_at` for the polling relay's ORDER BY; a table outside the
/// publication for same-database neighbour writes; and the backlog generator.
const SCHEMA: &str = r#"
CREATE TABLE public.outbox (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    aggregatetype text NOT NULL,
    aggregateid text NOT NULL,
    type text NOT NULL,
    payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE public.business (id bigserial PRIMARY KEY, note text NOT NULL);
-- The pipelines workload's tables (same shape), one transaction in each in turn.
CREATE TABLE public.outbox_p0 (LIKE public.outbox INCLUDING ALL);
CREATE TABLE public.outbox_p1 (LIKE public.outbox INCLUDING ALL);
CREATE TABLE public.outbox_p2 (LIKE public.outbox INCLUDING ALL);
CREATE TABLE public.outbox_p3 (LIKE public.outbox INCLUDING ALL);
-- Written only by Debezium's heartbeat.action.query (the debezium-heartbeat variant).
CREATE TABLE public.debezium_heartbeat (id bigserial PRIMARY KEY, ts timestamptz NOT NULL DEFAULT now());
-- Payload bodies: 4096 random order-like JSON documents per size, so every
-- event's payload is realistic JSON (compressible by field names, random
-- values) and repeats only every 4096 events (further apart than LZ4's
-- 64 KB window in any Kafka batch).
CREATE TABLE public.bench_payloads (size int, k int, body text NOT NULL, PRIMARY KEY (size, k));
CREATE PROCEDURE bench_payload_pool(size int) LANGUAGE sql AS $$
    INSERT INTO public.bench_payloads (size, k, body)
    SELECT size, k,
           '"items": [' || (
               SELECT string_agg('{"qty": ' || (1 + floor(random() * 9))::int
                   || ', "sku": "SKU-' || (100000 + floor(random() * 900000))::int
                   || '", "price": ' || floor(random() * 100000)::int || '}', ', ')
               FROM generate_series(1, greatest(1, round((size - 55) / 49.0)::int))
               WHERE k >= 0
           ) || '], "customer": "cust-' || (100000 + floor(random() * 900000))::int || '"'
    FROM generate_series(0, 4095) AS k
    ON CONFLICT DO NOTHING
$$;
-- n events with sequence numbers first.., `txn` events per transaction, each
-- committed on its own (a procedure may COMMIT): the same WAL as `txn`-row
-- application transactions, without a client round trip per transaction.
-- Payload: {"seq": N, "items": [...], "customer": "..."}, about `size` bytes.
CREATE PROCEDURE bench_fill(first bigint, n bigint, txn int, size int)
LANGUAGE plpgsql AS $$
DECLARE
    i bigint := first;
    last bigint := first + n;
BEGIN
    WHILE i < last LOOP
        INSERT INTO public.outbox (id, aggregatetype, aggregateid, type, payload)
        SELECT gen_random_uuid(), 'Order', j::text, 'BenchEvent',
               ('{"seq": ' || j || ', ' || (SELECT p.body FROM public.bench_payloads p
                                             WHERE p.size = bench_fill.size AND p.k = (j % 4096)::int) || '}')::jsonb
        FROM generate_series(i, least(i + txn, last) - 1) AS j;
        COMMIT;
        i := i + txn;
    END LOOP;
END $$;
-- Like bench_fill, transaction k into public.outbox_p<k mod 4>.
CREATE PROCEDURE bench_fill_split(first bigint, n bigint, txn int, size int)
LANGUAGE plpgsql AS $$
DECLARE
    i bigint := first;
    last bigint := first + n;
BEGIN
    WHILE i < last LOOP
        EXECUTE format('INSERT INTO public.outbox_p%s (id, aggregatetype, aggregateid, type, payload)
            SELECT gen_random_uuid(), ''Order'', j::text, ''BenchEvent'',
                   (''{"seq": '' || j || '', '' || (SELECT p.body FROM public.bench_payloads p
                                                 WHERE p.size = $1 AND p.k = (j %% 4096)::int) || ''}'')::jsonb
            FROM generate_series($2, $3) AS j', (i / txn) % 4)
        USING size, i, least(i + txn, last) - 1;
        COMMIT;
        i := i + txn;
    END LOOP;
END $$;
"#;

/// The pipelines workload's tables (`public.outbox_p0..3`).
pub const SPLIT_TABLES: u32 = 4;

/// The publication of pipeline `k` of `n` (of [`SPLIT_TABLES`] tables, table
/// `t` goes to pipeline `t mod n`).
pub fn split_publication(n: u32, k: u32) -> String {
    format!("bench_split{n}_{k}")
}

/// The tables of pipeline `k` of `n`.
pub fn split_tables(n: u32, k: u32) -> Vec<String> {
    (0..SPLIT_TABLES)
        .filter(|t| t % n == k)
        .map(|t| format!("public.outbox_p{t}"))
        .collect()
}

/// Creates the publications of `n` pipelines over the split tables.
pub async fn create_split_publications(env: &BenchEnv, n: u32) -> Result<()> {
    let db = connect(&env.admin_conn(BENCH_DB)).await?;
    for k in 0..n {
        db.batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert')",
            split_publication(n, k),
            split_tables(n, k).join(", ")
        ))
        .await
        .context("creating a pipeline's publication")?;
    }
    Ok(())
}

/// The index the polling relay's `ORDER BY created_at` needs (log-based
/// relays do not).
pub const POLL_INDEX: &str =
    "CREATE INDEX IF NOT EXISTS outbox_created_at ON public.outbox (created_at)";
/// Drops [`POLL_INDEX`].
pub const DROP_POLL_INDEX: &str = "DROP INDEX IF EXISTS public.outbox_created_at";

/// Connects with a libpq-style string; the connection runs on the runtime.
pub async fn connect(conn: &str) -> Result<Client> {
    let (client, connection) = tokio_postgres::connect(conn, NoTls)
        .await
        .with_context(|| format!("connecting to PostgreSQL ({})", redact(conn)))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

fn redact(conn: &str) -> String {
    conn.split_whitespace()
        .map(|kv| {
            if kv.starts_with("password=") {
                "password=…"
            } else {
                kv
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Drops every slot of the bench databases and the databases themselves.
pub async fn drop_all(env: &BenchEnv) -> Result<()> {
    let admin = connect(&env.admin_conn("postgres")).await?;
    for db in [BENCH_DB, NEIGHBOUR_DB] {
        let slots = admin
            .query(
                "SELECT slot_name, active_pid FROM pg_replication_slots WHERE database = $1",
                &[&db],
            )
            .await?;
        for row in slots {
            let name: String = row.get(0);
            drop_slot(&admin, &name).await?;
        }
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .await
            .with_context(|| format!("dropping database {db}"))?;
    }
    Ok(())
}

/// A replication slot the run did not create (another tool's, or one left
/// behind by hand): while it lags, PostgreSQL keeps the WAL after its
/// `restart_lsn` and cannot recycle segments.
#[derive(Debug)]
pub struct ForeignSlot {
    /// The slot's name.
    pub name: String,
    /// Its database (`None` for a physical slot).
    pub database: Option<String>,
    /// Whether a walsender is attached.
    pub active: bool,
    /// WAL retained for it: the current WAL position minus its `restart_lsn`.
    pub retained_bytes: u64,
}

/// Every replication slot outside the bench databases, largest retained WAL
/// first.
pub async fn foreign_slots(env: &BenchEnv) -> Result<Vec<ForeignSlot>> {
    let admin = connect(&env.admin_conn("postgres")).await?;
    let rows = admin
        .query(
            "SELECT slot_name::text, database::text, active, \
                    COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint \
             FROM pg_replication_slots \
             WHERE database IS DISTINCT FROM $1 AND database IS DISTINCT FROM $2 \
             ORDER BY 4 DESC, 1",
            &[&BENCH_DB, &NEIGHBOUR_DB],
        )
        .await
        .context("listing the replication slots outside the bench databases")?;
    Ok(rows
        .iter()
        .map(|r| ForeignSlot {
            name: r.get(0),
            database: r.get(1),
            active: r.get(2),
            retained_bytes: r.get::<_, i64>(3).max(0) as u64,
        })
        .collect())
}

/// The report's note on slots outside the run, `None` when there are none.
pub fn foreign_slots_note(slots: &[ForeignSlot]) -> Option<String> {
    if slots.is_empty() {
        return None;
    }
    let total: u64 = slots.iter().map(|s| s.retained_bytes).sum();
    let list = slots
        .iter()
        .map(|s| {
            format!(
                "`{}` ({}, {}, {:.1} MB)",
                s.name,
                s.database
                    .as_deref()
                    .map_or("physical".to_string(), |d| format!("database {d}")),
                if s.active { "active" } else { "inactive" },
                crate::report::mb(s.retained_bytes)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    Some(format!(
        "Replication slots outside the run held {:.1} MB of WAL at its start: {list}. While a slot lags, PostgreSQL cannot recycle WAL segments and creates (and zero-fills) new ones, which the run's commits and walsenders share; drop slots nobody reads (`SELECT pg_drop_replication_slot('<name>')`) before taking figures as evidence.",
        crate::report::mb(total)
    ))
}

/// Creates the bench database (after [`drop_all`]) with the schema, both
/// publications and payload pools for `payload_sizes`, and the neighbour database.
pub async fn create_databases(env: &BenchEnv, payload_sizes: &[u32]) -> Result<()> {
    drop_all(env).await?;
    let admin = connect(&env.admin_conn("postgres")).await?;
    for db in [BENCH_DB, NEIGHBOUR_DB] {
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .with_context(|| format!("creating database {db}"))?;
    }
    let db = connect(&env.admin_conn(BENCH_DB)).await?;
    db.batch_execute(SCHEMA)
        .await
        .context("creating the schema")?;
    db.batch_execute(&format!(
        "CREATE PUBLICATION {PUBLICATION} FOR TABLE public.outbox WITH (publish = 'insert');
         CREATE PUBLICATION {DEBEZIUM_PUBLICATION} FOR TABLE public.outbox, public.debezium_heartbeat WITH (publish = 'insert');"
    ))
    .await
    .context("creating the publications")?;
    let mut sizes = payload_sizes.to_vec();
    sizes.push(PROBE_PAYLOAD);
    sizes.sort_unstable();
    sizes.dedup();
    for size in sizes {
        db.batch_execute(&format!("CALL bench_payload_pool({size})"))
            .await
            .context("generating the payload pool")?;
    }
    let n = connect(&env.admin_conn(NEIGHBOUR_DB)).await?;
    n.batch_execute("CREATE TABLE public.busy (id bigserial PRIMARY KEY, note text NOT NULL)")
        .await
        .context("creating the neighbour table")?;
    Ok(())
}

/// Empties the outbox (between runs) and sets the polling index as wanted.
pub async fn reset_outbox(env: &BenchEnv, poll_index: bool) -> Result<()> {
    let db = connect(&env.admin_conn(BENCH_DB)).await?;
    db.batch_execute("TRUNCATE public.outbox, public.business")
        .await?;
    db.batch_execute(if poll_index {
        POLL_INDEX
    } else {
        DROP_POLL_INDEX
    })
    .await?;
    Ok(())
}

/// Creates a pgoutput slot in the bench database; returns its position.
pub async fn create_slot(env: &BenchEnv, name: &str) -> Result<String> {
    let db = connect(&env.admin_conn(BENCH_DB)).await?;
    let row = db
        .query_one(
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&name],
        )
        .await
        .with_context(|| format!("creating slot {name}"))?;
    Ok(row.get(0))
}

/// Drops a slot if it exists, waiting for (then terminating) a connection
/// still holding it.
pub async fn drop_slot(admin: &Client, name: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let row = admin
            .query_opt(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                &[&name],
            )
            .await?;
        let Some(row) = row else { return Ok(()) };
        let pid: Option<i32> = row.get(0);
        match pid {
            None => {
                admin
                    .execute("SELECT pg_drop_replication_slot($1)", &[&name])
                    .await
                    .with_context(|| format!("dropping slot {name}"))?;
                return Ok(());
            }
            Some(pid) if Instant::now() >= deadline => {
                admin
                    .execute("SELECT pg_terminate_backend($1)", &[&pid])
                    .await?;
            }
            Some(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Drops a slot by name (own connection).
pub async fn drop_slot_named(env: &BenchEnv, name: &str) -> Result<()> {
    let admin = connect(&env.admin_conn("postgres")).await?;
    drop_slot(&admin, name).await
}

/// `pg_current_wal_lsn()` as text and as a number.
pub async fn current_wal_lsn(env: &BenchEnv) -> Result<(String, u64)> {
    let admin = connect(&env.admin_conn("postgres")).await?;
    let row = admin
        .query_one(
            "SELECT pg_current_wal_lsn()::text, (pg_current_wal_lsn() - '0/0')::bigint",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get::<_, i64>(1) as u64))
}

/// `CHECKPOINT`, so a checkpoint triggered by the backlog does not run
/// during the measurement.
pub async fn checkpoint(env: &BenchEnv) -> Result<()> {
    let admin = connect(&env.admin_conn("postgres")).await?;
    admin.batch_execute("CHECKPOINT").await?;
    Ok(())
}

/// Commits `n` events with sequence numbers `first..first+n`, `txn` per
/// transaction, `payload` bytes each, over `conns` connections in parallel
/// (each takes chunks of the range). `progress(done)` is called as chunks end.
/// `split`: into the pipelines workload's tables (`bench_fill_split`).
#[allow(clippy::too_many_arguments)]
pub async fn fill(
    env: &BenchEnv,
    first: u64,
    n: u64,
    txn: u32,
    payload: u32,
    conns: usize,
    split: bool,
    progress: impl Fn(u64) + Send + Sync + 'static,
) -> Result<()> {
    let procedure = if split {
        "bench_fill_split"
    } else {
        "bench_fill"
    };
    // Chunks are multiples of the transaction size so every transaction has
    // exactly `txn` events (except the very last one).
    let chunk = (20_000 / u64::from(txn)).max(1) * u64::from(txn);
    let next = Arc::new(AtomicU64::new(first));
    let done = Arc::new(AtomicU64::new(0));
    let progress = Arc::new(progress);
    let end = first + n;
    let mut tasks = Vec::new();
    for _ in 0..conns.max(1) {
        let client = connect(&env.admin_conn(BENCH_DB)).await?;
        let (next, done, progress) = (next.clone(), done.clone(), progress.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let start = next.fetch_add(chunk, Ordering::Relaxed);
                if start >= end {
                    return Ok::<(), anyhow::Error>(());
                }
                let len = chunk.min(end - start);
                client
                    .batch_execute(&format!(
                        "CALL {procedure}({start}, {len}, {txn}, {payload})"
                    ))
                    .await
                    .context("bench_fill")?;
                let d = done.fetch_add(len, Ordering::Relaxed) + len;
                progress(d);
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// One committed transaction of the paced writer.
#[derive(Debug, Clone, Copy)]
pub struct Committed {
    /// First sequence number.
    pub first: u64,
    /// Number of events.
    pub len: u64,
    /// When COMMIT returned (harness clock).
    pub commit_ns: u64,
}

/// Payload size of the readiness probe (its pool always exists).
pub const PROBE_PAYLOAD: u32 = 200;

/// The SQL of one transaction with events `first..first+len` (payload pool
/// `payload` must exist).
pub fn txn_sql(first: u64, len: u64, payload: u32) -> String {
    format!(
        "BEGIN; INSERT INTO public.outbox (id, aggregatetype, aggregateid, type, payload) \
         SELECT gen_random_uuid(), 'Order', j::text, 'BenchEvent', \
         ('{{\"seq\": ' || j || ', ' || (SELECT p.body FROM public.bench_payloads p \
         WHERE p.size = {payload} AND p.k = (j % 4096)::int) || '}}')::jsonb \
         FROM generate_series({first}, {last}) AS j; COMMIT;",
        last = first + len - 1
    )
}

/// Commits the readiness probe: one event with sequence number 0.
pub async fn probe(env: &BenchEnv) -> Result<()> {
    let db = connect(&env.admin_conn(BENCH_DB)).await?;
    db.batch_execute(&txn_sql(0, 1, PROBE_PAYLOAD)).await?;
    Ok(())
}

/// The paced writer's settings.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Events per second; `None` = as fast as the connections go.
    pub rate: Option<u64>,
    /// Events per transaction.
    pub txn: u64,
    /// Payload bytes.
    pub payload: u32,
    /// How long to write.
    pub duration: Duration,
    /// Connections.
    pub conns: usize,
}

/// Live counters of the paced writer.
#[derive(Debug, Default)]
pub struct WriterLive {
    /// Events committed so far.
    pub committed: AtomicU64,
}

/// Writes events `first_seq..` at a fixed rate (open loop: transaction `i` is due at
/// `start + i * txn / rate`; a late writer catches up without waiting) or as
/// fast as it can, for `pace.duration`. Returns every commit, in no order.
pub async fn paced_writer(
    env: &BenchEnv,
    pace: Pace,
    live: Arc<WriterLive>,
    first_seq: u64,
) -> Result<Vec<Committed>> {
    let next_txn = Arc::new(AtomicU64::new(0));
    let start = tokio::time::Instant::now();
    let deadline = start + pace.duration;
    let mut tasks = Vec::new();
    for _ in 0..pace.conns.max(1) {
        let client = connect(&env.admin_conn(BENCH_DB)).await?;
        let (next_txn, live) = (next_txn.clone(), live.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next_txn.fetch_add(1, Ordering::Relaxed);
                if let Some(rate) = pace.rate {
                    let due =
                        start + Duration::from_secs_f64(i as f64 * pace.txn as f64 / rate as f64);
                    if due >= deadline {
                        break;
                    }
                    tokio::time::sleep_until(due).await;
                } else if tokio::time::Instant::now() >= deadline {
                    break;
                }
                let first = first_seq + i * pace.txn;
                client
                    .batch_execute(&txn_sql(first, pace.txn, pace.payload))
                    .await
                    .context("writing a transaction")?;
                out.push(Committed {
                    first,
                    len: pace.txn,
                    commit_ns: clock::now_ns(),
                });
                live.committed.fetch_add(pace.txn, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(out)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}

/// Writes WAL outside the outbox until `stop`: small transactions into a
/// table of the bench database that is in no publication and into a second
/// database. Returns the number of transactions.
pub async fn neighbours(env: &BenchEnv, stop: Arc<AtomicBool>) -> Result<u64> {
    let same = connect(&env.admin_conn(BENCH_DB)).await?;
    let other = connect(&env.admin_conn(NEIGHBOUR_DB)).await?;
    let mut n = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        // ~10 KB of row data per tick and database: about 2 MB/s of WAL.
        same.batch_execute(
            "INSERT INTO public.business (note) SELECT repeat(md5(random()::text), 32) FROM generate_series(1, 10)",
        )
        .await?;
        other
            .batch_execute(
                "INSERT INTO public.busy (note) SELECT repeat(md5(random()::text), 32) FROM generate_series(1, 10)",
            )
            .await?;
        n += 2;
    }
    Ok(n)
}

/// Polls until `slot` is active (a walsender streams from it) and stores
/// when that happened into `at` (harness clock).
pub async fn wait_slot_active(env: &BenchEnv, slot: &str, at: &AtomicU64) -> Result<()> {
    let admin = connect(&env.admin_conn("postgres")).await?;
    let query = admin
        .prepare("SELECT active FROM pg_replication_slots WHERE slot_name = $1")
        .await?;
    loop {
        let active = admin
            .query_opt(&query, &[&slot])
            .await?
            .is_some_and(|r| r.get::<_, bool>(0));
        if active {
            at.store(clock::now_ns(), Ordering::Relaxed);
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A slot's lag: WAL between the server's position and the slot's
/// `confirmed_flush_lsn`, and WAL the slot retains (`restart_lsn`), in bytes.
pub async fn slot_lag(admin: &Client, slot: &str) -> Result<Option<(i64, i64)>> {
    let row = admin
        .query_opt(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint, \
                    (pg_current_wal_lsn() - restart_lsn)::bigint \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_foreign_slot_means_no_note() {
        assert_eq!(foreign_slots_note(&[]), None);
    }

    #[test]
    fn the_note_names_each_foreign_slot_and_the_wal_it_holds() {
        let slots = [
            ForeignSlot {
                name: "nu1_slot".into(),
                database: Some("nu1".into()),
                active: false,
                retained_bytes: 34_000_000_000,
            },
            ForeignSlot {
                name: "standby".into(),
                database: None,
                active: true,
                retained_bytes: 2_500_000,
            },
        ];
        let note = foreign_slots_note(&slots).expect("a note");
        assert!(note.contains("held 34002.5 MB of WAL"), "{note}");
        assert!(
            note.contains("`nu1_slot` (database nu1, inactive, 34000.0 MB)"),
            "{note}"
        );
        assert!(
            note.contains("`standby` (physical, active, 2.5 MB)"),
            "{note}"
        );
        assert!(note.contains("pg_drop_replication_slot"), "{note}");
    }
}
