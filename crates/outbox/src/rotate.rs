//! Partition rotation for an outbox range-partitioned by `created_at`
//! (`migrations/0001_outbox_range_partitioned.sql`): create daily partitions
//! ahead, drop whole partitions once they are old and walcast has confirmed
//! their events.
//!
//! **The rule.** For each partition whose upper bound is older than
//! `older_than`, in one transaction: `ALTER TABLE <root> DETACH PARTITION
//! <p>` (bounded by `lock_timeout`), then read `W =
//! pg_current_wal_insert_lsn()` and record it in the detached table's
//! comment. Then wait until the slot's `confirmed_flush_lsn >= W`; only then
//! `DROP TABLE <p>`.
//!
//! **Why it is safe.** `DETACH` takes an `ACCESS EXCLUSIVE` lock on the
//! partition, so it runs only after every transaction that wrote into it has
//! ended, and a transaction releases its locks only after its commit record
//! is in the WAL: every row of the partition committed at or before `W`.
//! After the detach no new row can reach it through the root. walcast
//! confirms a position only when every transaction that committed up to it
//! has all its events in Kafka (`docs/delivery-rules.md`, rule 1), so once
//! the slot passed `W` every row of the partition is in Kafka. walcast
//! decodes the rows written before the detach with the catalog of their own
//! time (still a partition of the root), so it relays them through the root's
//! route even while the partition is detached.
//!
//! **When the slot does not get there** (walcast stopped or far behind,
//! `wait_timeout`): nothing is dropped, and the partitions stay detached,
//! each with its `W` in its comment; their rows stay readable under the
//! partition's own name. The next rotation finds them (by that comment) and
//! drops each once the slot passed its `W`. Re-attaching instead would need
//! another lock on the root and a scan of the partition, and a crash between
//! the two steps would leave it detached anyway.

use std::time::Duration;

use tokio_postgres::{Client, GenericClient};

use crate::prune::wait_confirmed;
use crate::{db, Error, Result};

/// The start of the comment a detached partition carries until it is dropped.
const MARKER: &str = "walcast outbox rotate: detached from ";

/// What to rotate.
#[derive(Debug, Clone)]
pub struct RotateOptions {
    /// The range-partitioned outbox table (`name` or `schema.name`).
    pub table: String,
    /// The replication slot walcast confirms on.
    pub slot: String,
    /// Days after today (UTC) that must have a partition (0: today only).
    pub ahead_days: u32,
    /// Drop partitions whose whole range is older than this.
    pub older_than: Duration,
    /// How long to wait for the slot to confirm the detach position.
    pub wait_timeout: Duration,
    /// `lock_timeout` of each `CREATE … PARTITION OF`, `DETACH` and `DROP`:
    /// while one waits for its lock, the application's writes to the outbox
    /// queue behind it.
    pub lock_timeout: Duration,
}

/// What [`rotate`] will do: the SQL of [`RotatePlan::sql`] (`--dry-run`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotatePlan {
    /// The root, quoted (`"public"."outbox"`).
    pub root: String,
    /// Partitions to create: (quoted name, `CREATE TABLE` statement).
    pub create: Vec<(String, String)>,
    /// Partitions to detach (quoted names), oldest first.
    pub detach: Vec<String>,
    /// Partitions detached by an earlier rotation and not dropped yet:
    /// (quoted name, the `W` the slot must reach).
    pub pending: Vec<(String, String)>,
}

impl RotatePlan {
    /// The statements [`rotate`] runs, in order, with the wait as a comment.
    pub fn sql(&self, slot: &str) -> Vec<String> {
        let mut out: Vec<String> = self.create.iter().map(|(_, s)| s.clone()).collect();
        for p in &self.detach {
            out.push(format!(
                "ALTER TABLE {} DETACH PARTITION {p}; -- then W := pg_current_wal_insert_lsn(), kept in COMMENT ON TABLE {p}",
                self.root
            ));
        }
        for (p, w) in &self.pending {
            out.push(format!("-- {p} was detached earlier at W = {w}"));
        }
        let drops: Vec<&String> = self
            .detach
            .iter()
            .chain(self.pending.iter().map(|(p, _)| p))
            .collect();
        if !drops.is_empty() {
            out.push(format!(
                "-- wait until SELECT confirmed_flush_lsn >= W FROM pg_replication_slots WHERE slot_name = '{slot}'"
            ));
            out.extend(drops.iter().map(|p| format!("DROP TABLE {p};")));
        }
        out
    }
}

/// What [`rotate`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RotateReport {
    /// Partitions created (quoted names).
    pub created: Vec<String>,
    /// Partitions detached by this run.
    pub detached: Vec<String>,
    /// Partitions dropped (detached by this run or an earlier one).
    pub dropped: Vec<String>,
    /// The position the slot had to reach before the drops (the highest `W`).
    pub safe_lsn: Option<String>,
    /// The slot's `confirmed_flush_lsn` when the partitions were dropped.
    pub confirmed_lsn: Option<String>,
}

/// Double-quotes an identifier.
fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// A `pg_lsn` text (`16/B374D848`).
fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    let hi = u32::from_str_radix(hi, 16).ok()?;
    let lo = u32::from_str_radix(lo, 16).ok()?;
    Some((u64::from(hi) << 32) | u64::from(lo))
}

/// The bounds of a range partition as `(lower, upper)` text, read back as
/// timestamptz in SQL; NULL for MINVALUE/MAXVALUE or DEFAULT partitions,
/// which rotation never drops.
const BOUNDS: &str = "regexp_match(pg_catalog.pg_get_expr(c.relpartbound, c.oid), \
     'FROM \\(''([^'']+)''\\) TO \\(''([^'']+)''\\)')";

struct Root {
    oid: u32,
    schema: String,
    name: String,
}

async fn resolve<C: GenericClient + Sync>(client: &C, table: &str) -> Result<Root> {
    if !crate::valid_table(table) {
        return Err(Error::InvalidTable(table.to_string()));
    }
    let not = |reason: String| Error::NotRotatable {
        table: table.to_string(),
        reason,
    };
    let row = client
        .query_opt(
            "SELECT c.oid, n.nspname::text, c.relname::text, p.partstrat::text, p.partnatts::int, \
                    pg_catalog.format_type(a.atttypid, a.atttypmod) \
             FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             LEFT JOIN pg_catalog.pg_partitioned_table p ON p.partrelid = c.oid \
             LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum = p.partattrs[0] \
             WHERE c.oid = pg_catalog.to_regclass($1)",
            &[&table],
        )
        .await
        .map_err(db(format!("looking up {table}")))?
        .ok_or_else(|| not("no such table".into()))?;
    let strategy: Option<String> = row.get(3);
    let natts: Option<i32> = row.get(4);
    let key_type: Option<String> = row.get(5);
    if strategy.as_deref() != Some("r") || natts != Some(1) {
        return Err(not("it is not partitioned by RANGE of one column".into()));
    }
    if key_type.as_deref() != Some("timestamp with time zone") {
        return Err(not(format!(
            "its partition key is {}, not a timestamptz column",
            key_type.unwrap_or_else(|| "an expression".into())
        )));
    }
    let name: String = row.get(2);
    if name.len() + "_p20260101".len() > 63 {
        return Err(not(format!(
            "partition names {name}_pYYYYMMDD would be longer than 63 bytes"
        )));
    }
    Ok(Root {
        oid: row.get(0),
        schema: row.get(1),
        name,
    })
}

impl Root {
    fn quoted(&self) -> String {
        format!("{}.{}", quote(&self.schema), quote(&self.name))
    }
    fn partition(&self, name: &str) -> String {
        format!("{}.{}", quote(&self.schema), quote(name))
    }
    fn marker(&self) -> String {
        format!("{MARKER}{}.{};", self.schema, self.name)
    }
}

async fn plan_for<C: GenericClient + Sync>(
    client: &C,
    root: &Root,
    opts: &RotateOptions,
) -> Result<RotatePlan> {
    // The days from today (UTC) to today + ahead that no partition covers.
    let ahead = i32::try_from(opts.ahead_days.min(3650)).unwrap_or(3650);
    let create = client
        .query(
            &format!(
                "SELECT to_char(d, 'YYYYMMDD'), to_char(d, 'YYYY-MM-DD') || ' 00:00:00+00', \
                        to_char(d + 1, 'YYYY-MM-DD') || ' 00:00:00+00' \
                 FROM (SELECT (now() AT TIME ZONE 'UTC')::date + i AS d \
                       FROM generate_series(0, $2::int) AS i) AS days \
                 WHERE NOT EXISTS ( \
                     SELECT 1 FROM pg_catalog.pg_inherits h \
                     JOIN pg_catalog.pg_class c ON c.oid = h.inhrelid, \
                     LATERAL {BOUNDS} AS b \
                     WHERE h.inhparent = $1::oid AND b IS NOT NULL \
                       AND b[1]::timestamptz < (d + 1)::timestamp AT TIME ZONE 'UTC' \
                       AND b[2]::timestamptz > d::timestamp AT TIME ZONE 'UTC') \
                 ORDER BY d"
            ),
            &[&root.oid, &ahead],
        )
        .await
        .map_err(db("listing the days without a partition"))?
        .iter()
        .map(|r| {
            let day: String = r.get(0);
            let p = root.partition(&format!("{}_p{day}", root.name));
            let sql = format!(
                "CREATE TABLE {p} PARTITION OF {} FOR VALUES FROM ('{}') TO ('{}');",
                root.quoted(),
                r.get::<_, String>(1),
                r.get::<_, String>(2)
            );
            (p, sql)
        })
        .collect();
    let detach = client
        .query(
            &format!(
                "SELECT c.relname::text FROM pg_catalog.pg_inherits h \
                 JOIN pg_catalog.pg_class c ON c.oid = h.inhrelid, \
                 LATERAL {BOUNDS} AS b \
                 WHERE h.inhparent = $1::oid AND b IS NOT NULL \
                   AND b[2]::timestamptz <= now() - make_interval(secs => $2) \
                 ORDER BY b[1]::timestamptz"
            ),
            &[&root.oid, &opts.older_than.as_secs_f64()],
        )
        .await
        .map_err(db("listing the partitions older than --older-than"))?
        .iter()
        .map(|r| root.partition(r.get(0)))
        .collect();
    let pending = pending(client, root).await?;
    Ok(RotatePlan {
        root: root.quoted(),
        create,
        detach,
        pending,
    })
}

/// Tables of the root's schema that an earlier rotation detached and did
/// not drop: (quoted name, W).
async fn pending<C: GenericClient + Sync>(
    client: &C,
    root: &Root,
) -> Result<Vec<(String, String)>> {
    let marker = root.marker();
    let rows = client
        .query(
            "SELECT c.relname::text, pg_catalog.obj_description(c.oid, 'pg_class') \
             FROM pg_catalog.pg_class c \
             WHERE c.relnamespace = (SELECT relnamespace FROM pg_catalog.pg_class WHERE oid = $1::oid) \
               AND c.relkind = 'r' AND NOT c.relispartition \
               AND starts_with(pg_catalog.obj_description(c.oid, 'pg_class'), $2) \
             ORDER BY c.relname",
            &[&root.oid, &marker],
        )
        .await
        .map_err(db("listing partitions detached earlier"))?;
    let mut out = Vec::new();
    for r in rows {
        let name: String = r.get(0);
        let comment: String = r.get(1);
        let w = comment
            .rsplit(">= ")
            .next()
            .map(str::trim)
            .filter(|w| parse_lsn(w).is_some())
            .ok_or_else(|| Error::NotRotatable {
                table: root.quoted(),
                reason: format!(
                    "{name} carries the detach marker but no position in its comment ({comment:?}); \
                     drop it by hand once walcast has confirmed its events"
                ),
            })?;
        out.push((root.partition(&name), w.to_string()));
    }
    Ok(out)
}

/// What [`rotate`] would do now, without changing anything.
pub async fn plan<C: GenericClient + Sync>(client: &C, opts: &RotateOptions) -> Result<RotatePlan> {
    let root = resolve(client, &opts.table).await?;
    plan_for(client, &root, opts).await
}

/// Creates the missing daily partitions of `opts.table` from today (UTC) to
/// `opts.ahead_days` ahead, detaches the partitions entirely older than
/// `opts.older_than`, and drops them (and any detached by an earlier run)
/// once the slot confirmed the position after their detach (the module's
/// rule). When the slot does not get there within `opts.wait_timeout`
/// nothing is dropped: [`Error::DropPending`], the partitions stay detached
/// and the next call drops them. Needs ownership of the table.
pub async fn rotate(client: &mut Client, opts: &RotateOptions) -> Result<RotateReport> {
    let root = resolve(&*client, &opts.table).await?;
    let plan = plan_for(&*client, &root, opts).await?;
    let mut report = RotateReport::default();
    let lock_timeout = format!(
        "SET LOCAL lock_timeout = '{}ms'",
        opts.lock_timeout.as_millis()
    );
    for (p, sql) in &plan.create {
        // CREATE … PARTITION OF locks the root too: bounded like DETACH.
        let tx = client.transaction().await.map_err(db("BEGIN"))?;
        tx.batch_execute(&lock_timeout)
            .await
            .map_err(db("SET LOCAL lock_timeout"))?;
        tx.batch_execute(sql)
            .await
            .map_err(db(format!("creating partition {p}")))?;
        tx.commit().await.map_err(db("COMMIT"))?;
        report.created.push(p.clone());
    }
    for p in &plan.detach {
        let tx = client.transaction().await.map_err(db("BEGIN"))?;
        tx.batch_execute(&lock_timeout)
            .await
            .map_err(db("SET LOCAL lock_timeout"))?;
        tx.batch_execute(&format!("ALTER TABLE {} DETACH PARTITION {p}", plan.root))
            .await
            .map_err(db(format!(
                "ALTER TABLE {} DETACH PARTITION {p} (nothing was detached; a long transaction on the outbox holds its lock? retry, or raise --lock-timeout)",
                plan.root
            )))?;
        // Read after the lock was granted: every writer of p has committed
        // (or aborted) before this position.
        let w: String = tx
            .query_one("SELECT pg_catalog.pg_current_wal_insert_lsn()::text", &[])
            .await
            .map_err(db("reading the WAL insert position"))?
            .get(0);
        tx.batch_execute(&format!(
            "COMMENT ON TABLE {p} IS '{} drop once the slot confirmed_flush_lsn >= {w}'",
            root.marker().replace('\'', "''")
        ))
        .await
        .map_err(db(format!("COMMENT ON TABLE {p}")))?;
        tx.commit().await.map_err(db("COMMIT"))?;
        report.detached.push(p.clone());
    }
    let pending = pending(&*client, &root).await?;
    let Some(needed) = pending
        .iter()
        .max_by_key(|(_, w)| parse_lsn(w))
        .map(|(_, w)| w.clone())
    else {
        return Ok(report);
    };
    let confirmed = match wait_confirmed(&*client, &opts.slot, &needed, opts.wait_timeout).await? {
        Ok(c) => c,
        Err((confirmed, waited_ms)) => {
            return Err(Error::DropPending {
                slot: opts.slot.clone(),
                confirmed,
                needed,
                waited_ms,
                tables: pending.into_iter().map(|(p, _)| p).collect(),
            })
        }
    };
    for (p, _) in &pending {
        let tx = client.transaction().await.map_err(db("BEGIN"))?;
        tx.batch_execute(&lock_timeout)
            .await
            .map_err(db("SET LOCAL lock_timeout"))?;
        tx.batch_execute(&format!("LOCK TABLE {p} IN ACCESS EXCLUSIVE MODE"))
            .await
            .map_err(db(format!("LOCK TABLE {p}")))?;
        // Still the detached table this rotation marked (not re-attached by hand)?
        let still: bool = tx
            .query_one(
                &format!(
                    "SELECT NOT c.relispartition \
                       AND coalesce(starts_with(pg_catalog.obj_description(c.oid, 'pg_class'), $1), false) \
                     FROM pg_catalog.pg_class c WHERE c.oid = '{}'::regclass",
                    p.replace('\'', "''")
                ),
                &[&root.marker()],
            )
            .await
            .map_err(db(format!("checking {p} before dropping it")))?
            .get(0);
        if !still {
            tracing::warn!(partition = %p, "not dropped: it is a partition again or lost its detach comment");
            continue;
        }
        tx.batch_execute(&format!("DROP TABLE {p}"))
            .await
            .map_err(db(format!("DROP TABLE {p}")))?;
        tx.commit().await.map_err(db("COMMIT"))?;
        report.dropped.push(p.clone());
    }
    report.safe_lsn = Some(needed);
    report.confirmed_lsn = Some(confirmed);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns() {
        assert_eq!(parse_lsn("0/16B3748"), Some(0x16B3748));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert!(parse_lsn("16B3748").is_none());
        assert!(parse_lsn("x/1").is_none());
        assert!(parse_lsn("1/0").unwrap() > parse_lsn("0/FFFFFFFF").unwrap());
    }

    #[test]
    fn quoting() {
        assert_eq!(quote("outbox"), "\"outbox\"");
        assert_eq!(quote("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn plan_sql_waits_before_dropping() {
        let plan = RotatePlan {
            root: "\"public\".\"outbox\"".into(),
            create: vec![("c".into(), "CREATE TABLE c ...;".into())],
            detach: vec!["\"public\".\"outbox_p20260101\"".into()],
            pending: vec![("\"public\".\"outbox_p20251231\"".into(), "0/10".into())],
        };
        let sql = plan.sql("walcast");
        let wait = sql
            .iter()
            .position(|s| s.contains("confirmed_flush_lsn >= W"))
            .unwrap();
        let first_drop = sql
            .iter()
            .position(|s| s.starts_with("DROP TABLE"))
            .unwrap();
        assert!(sql[0].starts_with("CREATE TABLE"));
        assert!(sql[1].contains("DETACH PARTITION \"public\".\"outbox_p20260101\""));
        assert!(wait < first_drop);
        assert_eq!(
            sql.iter().filter(|s| s.starts_with("DROP TABLE")).count(),
            2
        );
    }
}
