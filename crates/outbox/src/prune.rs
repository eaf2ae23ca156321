//! Pruning the outbox of the insert mode without touching unconfirmed rows.
//!
//! walcast reads the WAL, not the table, so deleting a row never changes what
//! it publishes. The rows matter when the slot is lost: they are what an
//! operator reconciles from (`walcast slot accept-gap`). So a row may be
//! deleted only once walcast has confirmed its event.
//!
//! **The rule.** In one `REPEATABLE READ` transaction: the first statement
//! takes the snapshot and reads `W = pg_current_wal_insert_lsn()`; prune waits
//! until the slot's `confirmed_flush_lsn >= W`, then deletes the old rows. The
//! `DELETE` sees exactly the rows of the snapshot.
//!
//! **Why it is safe.** A transaction becomes visible to a snapshot only after
//! its commit record was inserted into the WAL (Postgres writes the commit
//! record, then removes the transaction from the running set). So every row
//! the snapshot sees belongs to a transaction whose commit record ends at or
//! before `W`, which was read after the snapshot was taken. walcast confirms
//! a position only when every transaction whose commit ends at or below it
//! has all its events in Kafka (`docs/delivery-rules.md`, rule 1), so
//! `confirmed_flush_lsn >= W` means every row the `DELETE` can see is in
//! Kafka. Rows committed after the snapshot are invisible to the `DELETE`
//! and stay. A transaction still open (or one that commits later) is never
//! visible, whatever its `created_at`.

use std::time::{Duration, Instant};

use tokio_postgres::{Client, GenericClient, IsolationLevel};

use crate::{db, Error, Result};

/// What to prune.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// The outbox table (`name` or `schema.name`).
    pub table: String,
    /// The replication slot walcast confirms on.
    pub slot: String,
    /// Delete rows whose `created_at` is older than this.
    pub older_than: Duration,
    /// How long to wait for the slot to confirm the snapshot's position.
    pub wait_timeout: Duration,
}

/// What [`prune`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PruneReport {
    /// Rows deleted.
    pub deleted: u64,
    /// The position the slot had to reach (`pg_current_wal_insert_lsn()` after the snapshot).
    pub safe_lsn: String,
    /// The slot's `confirmed_flush_lsn` when the rows were deleted.
    pub confirmed_lsn: String,
}

/// Deletes rows of `opts.table` older than `opts.older_than` whose events the
/// slot has confirmed (see the module's rule). Needs `DELETE` on the table
/// and may read `pg_replication_slots`.
pub async fn prune(client: &mut Client, opts: &PruneOptions) -> Result<PruneReport> {
    if !crate::valid_table(&opts.table) {
        return Err(Error::InvalidTable(opts.table.clone()));
    }
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .start()
        .await
        .map_err(db("BEGIN ISOLATION LEVEL REPEATABLE READ"))?;
    // The first statement takes the transaction's snapshot; W is read after it.
    let w: String = tx
        .query_one("SELECT pg_catalog.pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(db("reading the WAL insert position"))?
        .get(0);
    let confirmed = match wait_confirmed(&tx, &opts.slot, &w, opts.wait_timeout).await? {
        Ok(confirmed) => confirmed,
        Err((confirmed, waited_ms)) => {
            return Err(Error::SlotBehind {
                slot: opts.slot.clone(),
                confirmed,
                needed: w,
                waited_ms,
            })
        }
    };
    let deleted = tx
        .execute(
            &format!(
                "DELETE FROM {} WHERE created_at < now() - make_interval(secs => $1)",
                opts.table
            ),
            &[&opts.older_than.as_secs_f64()],
        )
        .await
        .map_err(db(format!("DELETE FROM {}", opts.table)))?;
    tx.commit().await.map_err(db("COMMIT"))?;
    Ok(PruneReport {
        deleted,
        safe_lsn: w,
        confirmed_lsn: confirmed,
    })
}

/// Waits until `slot`'s `confirmed_flush_lsn >= w` (at most `timeout`):
/// `Ok(confirmed)` when it got there, `Err((confirmed or "none", waited ms))`
/// when not.
pub(crate) async fn wait_confirmed<C: GenericClient + Sync>(
    client: &C,
    slot: &str,
    w: &str,
    timeout: Duration,
) -> Result<Result<String, (String, u128)>> {
    let started = Instant::now();
    loop {
        // pg_replication_slots reads shared memory: live, not a snapshot.
        let row = client
            .query_opt(
                "SELECT confirmed_flush_lsn::text, confirmed_flush_lsn >= $2::text::pg_lsn \
                 FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                &[&slot, &w],
            )
            .await
            .map_err(db("reading the slot's confirmed position"))?
            .ok_or_else(|| Error::SlotMissing(slot.to_string()))?;
        let confirmed: Option<String> = row.get(0);
        let safe: Option<bool> = row.get(1);
        if safe == Some(true) {
            return Ok(Ok(confirmed.unwrap_or_default()));
        }
        if started.elapsed() >= timeout {
            return Ok(Err((
                confirmed.unwrap_or_else(|| "none".into()),
                started.elapsed().as_millis(),
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
