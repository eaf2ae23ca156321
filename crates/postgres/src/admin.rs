//! Operator commands on the server: the slot's status, creating, dropping
//! and advancing the slot, and bringing the publication to exactly the outbox
//! tables (`walcast status`, `walcast slot …`, `walcast publication sync`).
//!
//! Like `run`, everything runs on one `replication=database` session, so a
//! role with only `LOGIN REPLICATION` can use every read-only command. What
//! each command prints and whether it needs `--yes` is the binary's business;
//! this module only reads and acts.

use std::collections::BTreeSet;

use walcast_core::config::TableName;

use crate::sql::{quote_ident, quote_literal};
use walcast_core::state::{SlotKey, SlotRecord};
use walcast_core::{Error, Result};
use walcast_pgoutput::Lsn;

use crate::preflight::{
    create_publication_sql, lsn, open_session, publication_tables_sql, read_slot, row_filters,
    same_filter, ConnectOptions, Session,
};

/// A `replication=database` session for operator commands.
pub struct AdminSession<'a> {
    s: Session<'a>,
    system_identifier: String,
    timeline: u32,
    server_version_num: u32,
}

impl std::fmt::Debug for AdminSession<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminSession")
            .field("system_identifier", &self.system_identifier)
            .field("server_version_num", &self.server_version_num)
            .finish_non_exhaustive()
    }
}

/// The slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    /// Output plugin (`pgoutput` for walcast's).
    pub plugin: Option<String>,
    /// `logical` or `physical`.
    pub slot_type: Option<String>,
    /// Its database.
    pub database: Option<String>,
    /// Whether a connection holds it.
    pub active: bool,
    /// The walsender process holding it.
    pub active_pid: Option<u32>,
    /// The oldest WAL the slot keeps.
    pub restart_lsn: Option<Lsn>,
    /// What the consumer confirmed: nothing before it is sent again.
    pub confirmed_flush_lsn: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// Bytes of WAL that can still be written before the slot is in danger
    /// of losing WAL (`None` when `max_slot_wal_keep_size = -1`).
    pub safe_wal_size: Option<i64>,
    /// `server_lsn - confirmed_flush_lsn` in bytes.
    pub lag_bytes: Option<i64>,
}

/// What `walcast status` shows of the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotStatus {
    /// The configured slot name.
    pub slot: String,
    /// The server's current WAL position (`pg_current_wal_lsn()`; the replay
    /// position on a standby).
    pub server_lsn: Lsn,
    /// The slot, `None` when it does not exist.
    pub state: Option<SlotInfo>,
    /// `max_slot_wal_keep_size` (`-1`: unlimited).
    pub max_slot_wal_keep_size: Option<String>,
    /// walcast's own record of the slot (the newest of its copies in
    /// `pipeline.state_dir` and `pipeline.state_topic`).
    pub record: Option<SlotRecord>,
}

/// What `walcast publication sync` would do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicationPlan {
    /// The publication.
    pub publication: String,
    /// Whether it exists now.
    pub exists: bool,
    /// Its owner, when it exists.
    pub owner: Option<String>,
    /// The SQL, in order; empty when it already is what walcast needs.
    pub statements: Vec<String>,
    /// What the statements add (outbox tables, `publish` of inserts, ...).
    pub adds: Vec<String>,
    /// What they remove: tables, schemas or published actions that other
    /// subscribers of the publication stop receiving. Non-empty means the
    /// plan is destructive.
    pub removes: Vec<String>,
}

impl<'a> AdminSession<'a> {
    /// Opens the session (bounded by `postgres.connect_timeout_ms`).
    ///
    /// # Errors
    /// As `walcast run` reports a connection failure.
    pub async fn open(opts: &'a ConnectOptions) -> Result<Self> {
        let (mut s, system) = open_session(opts).await?;
        let server_version_num = s.server_version_num().await?;
        Ok(AdminSession {
            s,
            system_identifier: system.system_id,
            timeline: system.timeline,
            server_version_num,
        })
    }

    /// The configured slot's key (for walcast's record of it).
    pub fn slot_key(&self) -> SlotKey {
        let pg = &self.s.opts().pg;
        SlotKey {
            database: pg.database.clone(),
            slot: pg.slot.clone(),
        }
    }

    /// walcast's records of the slot, the newest (highest upper bound) first.
    async fn records(&self) -> Result<Vec<SlotRecord>> {
        let mut records = self.s.opts().state.load(&self.slot_key()).await?;
        records.sort_by_key(|r| std::cmp::Reverse(r.confirmed_upper));
        Ok(records)
    }

    /// The logical slots of the configured database that no session uses,
    /// with the WAL each retains (bytes from its `restart_lsn` to the
    /// server's position; `None` when unknown), by name.
    ///
    /// # Errors
    /// When the query fails.
    pub async fn inactive_slots(&mut self) -> Result<Vec<(String, Option<i64>)>> {
        let db = quote_literal(&self.s.opts().pg.database);
        let rows = self
            .s
            .query(
                &format!(
                    "SELECT slot_name, (CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn() \
                     ELSE pg_catalog.pg_current_wal_lsn() END - restart_lsn)::bigint \
                     FROM pg_catalog.pg_replication_slots \
                     WHERE slot_type = 'logical' AND database = {db} AND NOT active ORDER BY slot_name"
                ),
                "reading the database's replication slots",
            )
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                let name = r.first().cloned().flatten()?;
                Some((
                    name,
                    r.get(1).cloned().flatten().and_then(|v| v.parse().ok()),
                ))
            })
            .collect())
    }

    /// The `IDENTIFY_SYSTEM` system identifier of the server.
    pub fn system_identifier(&self) -> &str {
        &self.system_identifier
    }

    /// `server_version_num`.
    pub fn server_version_num(&self) -> u32 {
        self.server_version_num
    }

    /// The server's current WAL position (the replay position on a standby).
    ///
    /// # Errors
    /// When the query fails.
    pub async fn server_lsn(&mut self) -> Result<Lsn> {
        let v = self
            .s
            .query_value(
                "SELECT CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn() \
                 ELSE pg_catalog.pg_current_wal_lsn() END",
                "reading the server's WAL position",
            )
            .await?
            .unwrap_or_default();
        lsn(&v, "the server's WAL position")
    }

    /// The slot, the server's position and walcast's record.
    ///
    /// # Errors
    /// When a query fails or the record cannot be read.
    pub async fn slot_status(&mut self) -> Result<SlotStatus> {
        let slot = self.s.opts().pg.slot.clone();
        let rows = self
            .s
            .query(
                &format!(
                    "SELECT plugin, slot_type, database, active, active_pid, restart_lsn, confirmed_flush_lsn, wal_status, safe_wal_size, \
                     pg_catalog.pg_wal_lsn_diff(CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn() \
                       ELSE pg_catalog.pg_current_wal_lsn() END, confirmed_flush_lsn)::bigint \
                     FROM pg_catalog.pg_replication_slots WHERE slot_name = {}",
                    quote_literal(&slot)
                ),
                "reading the replication slot",
            )
            .await?;
        let state = match rows.into_iter().next() {
            None => None,
            Some(r) => {
                let g = |i: usize| r.get(i).cloned().flatten();
                let opt_lsn = |i: usize, what: &str| -> Result<Option<Lsn>> {
                    g(i).map(|v| lsn(&v, what)).transpose()
                };
                Some(SlotInfo {
                    plugin: g(0),
                    slot_type: g(1),
                    database: g(2),
                    active: g(3).as_deref() == Some("t"),
                    active_pid: g(4).and_then(|v| v.parse().ok()),
                    restart_lsn: opt_lsn(5, "the slot's restart_lsn")?,
                    confirmed_flush_lsn: opt_lsn(6, "the slot's confirmed_flush_lsn")?,
                    wal_status: g(7),
                    safe_wal_size: g(8).and_then(|v| v.parse().ok()),
                    lag_bytes: g(9).and_then(|v| v.parse().ok()),
                })
            }
        };
        let server_lsn = self.server_lsn().await?;
        let max_slot_wal_keep_size = self
            .s
            .query_value(
                "SELECT setting FROM pg_catalog.pg_settings WHERE name = 'max_slot_wal_keep_size'",
                "reading max_slot_wal_keep_size",
            )
            .await?;
        let record = self.records().await?.into_iter().next();
        Ok(SlotStatus {
            slot,
            server_lsn,
            state,
            max_slot_wal_keep_size,
            record,
        })
    }

    /// Creates the configured slot (pgoutput) and records it in
    /// `pipeline.state_dir`, as `walcast run` does when it creates one.
    /// Returns the consistent point, or `None` when the slot already exists
    /// (nothing done).
    ///
    /// # Errors
    /// Refuses (operator error) when walcast confirmed positions on a slot of
    /// this name that no longer exists: that gap must be accepted first
    /// (`walcast slot accept-gap`). Also when the server refuses.
    pub async fn create_slot(&mut self) -> Result<Option<Lsn>> {
        let slot = self.s.opts().pg.slot.clone();
        let records = self.records().await?;
        if read_slot(&mut self.s).await?.is_some() {
            return Ok(None);
        }
        if let Some(rec) = records.first() {
            return Err(crate::state::gap_error(
                &slot,
                "no longer exists",
                rec.confirmed_upper,
                &rec.origin,
            ));
        }
        let start = crate::preflight::create_slot(&mut self.s, &slot).await?;
        let opts = self.s.opts();
        let key = self.slot_key();
        opts.state
            .save(SlotRecord {
                database: key.database,
                slot: key.slot,
                system_identifier: self.system_identifier.clone(),
                timeline: self.timeline,
                confirmed_upper: start,
                confirmed_lower: start,
                walsender: None,
                application_name: opts.pg.application_name.clone(),
                updated_at_unix: SlotRecord::now_unix(),
                origin: String::new(),
            })
            .await?;
        Ok(Some(start))
    }

    /// Drops the configured slot. walcast's record of it stays, so the next
    /// `walcast run` refuses to start until `walcast slot accept-gap`.
    ///
    /// # Errors
    /// When the slot does not exist, is held by a connection, or the server
    /// refuses.
    pub async fn drop_slot(&mut self) -> Result<()> {
        let slot = self.s.opts().pg.slot.clone();
        self.require_idle_slot().await?;
        self.s
            .query(
                &format!("DROP_REPLICATION_SLOT {}", quote_ident(&slot)),
                "dropping the replication slot",
            )
            .await?;
        tracing::warn!(slot = %slot, "dropped replication slot");
        Ok(())
    }

    /// Moves the slot's confirmed position forward to `to`
    /// (`pg_replication_slot_advance`); returns the new position. The
    /// changes between the old and the new position are never decoded, so
    /// walcast never relays their events. walcast's record follows.
    ///
    /// # Errors
    /// When the slot does not exist, is held by a connection, `to` is not
    /// after its confirmed position or is beyond the server's, or the
    /// server refuses.
    pub async fn advance_slot(&mut self, to: Lsn) -> Result<Lsn> {
        let slot = self.s.opts().pg.slot.clone();
        let state = self.require_idle_slot().await?;
        let confirmed = state.confirmed_flush_lsn.unwrap_or_default();
        if to <= confirmed {
            return Err(Error::operator(format!(
                "slot {slot} is already at {confirmed}; it cannot move back to {to}"
            ))
            .with_hint("a slot only moves forward: give --to a position after its confirmed_flush_lsn (see `walcast status`)"));
        }
        let server = self.server_lsn().await?;
        if to > server {
            return Err(Error::operator(format!(
                "{to} is beyond the server's current WAL position {server}"
            ))
            .with_hint("give --to a position the server has written, or --to current"));
        }
        let v = self
            .s
            .query_value(
                &format!(
                    "SELECT end_lsn FROM pg_catalog.pg_replication_slot_advance({}, {})",
                    quote_literal(&slot),
                    quote_literal(&to.to_string())
                ),
                "advancing the replication slot",
            )
            .await?
            .unwrap_or_default();
        let now = lsn(&v, "the advanced slot's position")?;
        // walcast's record follows (its upper bound must cover the slot, or
        // the next run would refuse a slot "ahead of the record").
        if let Some(mut rec) = self.records().await?.into_iter().next() {
            rec.confirmed_upper = rec.confirmed_upper.max(now);
            rec.confirmed_lower = now;
            rec.updated_at_unix = SlotRecord::now_unix();
            self.s.opts().state.save(rec).await?;
        }
        tracing::warn!(slot = %slot, from = %confirmed, to = %now, "advanced replication slot");
        Ok(now)
    }

    async fn require_idle_slot(&mut self) -> Result<SlotInfo> {
        let slot = self.s.opts().pg.slot.clone();
        let Some(state) = self.slot_status().await?.state else {
            return Err(
                Error::operator(format!("replication slot {slot} does not exist"))
                    .with_hint("check postgres.slot (and `walcast status`)"),
            );
        };
        if state.active {
            return Err(Error::operator(format!(
                "replication slot {slot} is in use by a connection (pid {})",
                state
                    .active_pid
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "?".into())
            ))
            .with_hint(
                "stop the walcast that reads it first (see pg_stat_replication for who holds it)",
            ));
        }
        Ok(state)
    }

    /// What `walcast publication sync` would change so that the publication
    /// publishes INSERTs of exactly the outbox tables via their root.
    ///
    /// # Errors
    /// Refuses a `FOR ALL TABLES` publication (Postgres cannot narrow one);
    /// query failures.
    pub async fn publication_plan(&mut self) -> Result<PublicationPlan> {
        let opts = self.s.opts();
        let pg = &opts.pg;
        let name = quote_literal(&pg.publication);
        let ident = quote_ident(&pg.publication);
        let wanted: BTreeSet<TableName> = opts.tables.iter().cloned().collect();
        let rows = self
            .s
            .query(
                &format!(
                    "SELECT pubinsert, pubupdate, pubdelete, pubtruncate, puballtables, pubviaroot, pg_catalog.pg_get_userbyid(pubowner) \
                     FROM pg_catalog.pg_publication WHERE pubname = {name}"
                ),
                "reading the publication",
            )
            .await?;
        let opts = self.s.opts();
        let pg = &opts.pg;
        let mut plan = PublicationPlan {
            publication: pg.publication.clone(),
            exists: false,
            owner: None,
            statements: Vec::new(),
            adds: Vec::new(),
            removes: Vec::new(),
        };
        let filters = row_filters(&mut self.s, self.server_version_num).await?;
        let opts = self.s.opts();
        let pg = &opts.pg;
        let Some(row) = rows.into_iter().next() else {
            plan.statements
                .push(create_publication_sql(pg, &opts.tables, &filters));
            plan.adds
                .extend(wanted.iter().map(|t| format!("table {t}")));
            return Ok(plan);
        };
        let flag = |i: usize| row.get(i).cloned().flatten().as_deref() == Some("t");
        plan.exists = true;
        plan.owner = row.get(6).cloned().flatten();
        if flag(4) {
            return Err(Error::operator(format!(
                "publication {} is FOR ALL TABLES; Postgres cannot narrow such a publication to some tables",
                pg.publication
            ))
            .with_hint(format!(
                "give walcast its own publication: set postgres.publication to a new name and run `walcast publication sync`; \
                 or, if nothing else uses it, as its owner: DROP PUBLICATION {ident}; then `walcast publication sync`. \
                 A slot decodes a publication only in WAL written after the publication was created, so do it while walcast is caught up"
            )));
        }
        // Row filters exist from PostgreSQL 15 on.
        let qual = if self.server_version_num >= 150_000 {
            "pg_catalog.pg_get_expr(pr.prqual, pr.prrelid)"
        } else {
            "NULL"
        };
        let members = self
            .s
            .query(
                &format!(
                    "SELECT n.nspname, c.relname, {qual} FROM pg_catalog.pg_publication_rel pr \
                     JOIN pg_catalog.pg_publication p ON p.oid = pr.prpubid \
                     JOIN pg_catalog.pg_class c ON c.oid = pr.prrelid \
                     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE p.pubname = {name}"
                ),
                "reading the publication's tables",
            )
            .await?;
        let members: Vec<(TableName, Option<String>)> = members
            .into_iter()
            .filter_map(|r| {
                Some((
                    TableName {
                        schema: r.first().cloned().flatten()?,
                        name: r.get(1).cloned().flatten()?,
                    },
                    r.get(2).cloned().flatten(),
                ))
            })
            .collect();
        let current: BTreeSet<TableName> = members.iter().map(|(t, _)| t.clone()).collect();
        // Tables in both whose row filter is not the one this pipeline needs.
        let refilter: Vec<(TableName, Option<String>)> = opts
            .tables
            .iter()
            .zip(&filters)
            .filter_map(|(t, want)| {
                let (_, have) = members.iter().find(|(m, _)| m == t)?;
                (!same_filter(have.as_deref(), want.as_deref())).then(|| (t.clone(), want.clone()))
            })
            .collect();
        let schemas: Vec<String> = if self.server_version_num >= 150_000 {
            self.s
                .query(
                    &format!(
                        "SELECT n.nspname FROM pg_catalog.pg_publication_namespace pn \
                         JOIN pg_catalog.pg_publication p ON p.oid = pn.pnpubid \
                         JOIN pg_catalog.pg_namespace n ON n.oid = pn.pnnspid WHERE p.pubname = {name}"
                    ),
                    "reading the publication's schemas",
                )
                .await?
                .into_iter()
                .filter_map(|r| r.into_iter().next().flatten())
                .collect()
        } else {
            Vec::new()
        };
        let opts = self.s.opts();
        let extra: Vec<&TableName> = current.difference(&wanted).collect();
        let missing: Vec<&TableName> = wanted.difference(&current).collect();
        plan.removes
            .extend(extra.iter().map(|t| format!("table {t}")));
        plan.removes.extend(
            schemas
                .iter()
                .map(|s| format!("every table of schema {s} (FOR TABLES IN SCHEMA)")),
        );
        plan.adds
            .extend(missing.iter().map(|t| format!("table {t}")));
        for (t, want) in &refilter {
            // The filter to drop is a removal; the one to set, an addition.
            match want {
                Some(w) => plan
                    .adds
                    .push(format!("row filter of table {t}: WHERE ({w})")),
                None => plan.removes.push(format!("row filter of table {t}")),
            }
        }
        if !plan.removes.is_empty() || !refilter.is_empty() {
            plan.statements.push(format!(
                "ALTER PUBLICATION {ident} SET TABLE {}",
                publication_tables_sql(&opts.tables, &filters)
            ));
        } else if !missing.is_empty() {
            let (missing, missing_filters): (Vec<TableName>, Vec<Option<String>>) = opts
                .tables
                .iter()
                .zip(&filters)
                .filter(|(t, _)| missing.contains(t))
                .map(|(t, f)| (t.clone(), f.clone()))
                .unzip();
            plan.statements.push(format!(
                "ALTER PUBLICATION {ident} ADD TABLE {}",
                publication_tables_sql(&missing, &missing_filters)
            ));
        }
        let dropped: Vec<&str> = [(1, "update"), (2, "delete"), (3, "truncate")]
            .into_iter()
            .filter(|(i, _)| flag(*i))
            .map(|(_, a)| a)
            .collect();
        let mut options = Vec::new();
        if !flag(0) || !dropped.is_empty() {
            options.push("publish = 'insert'");
            if !flag(0) {
                plan.adds.push("publish = 'insert'".into());
            }
            if !dropped.is_empty() {
                plan.removes.push(format!(
                    "publishing of {} (walcast skips them; other subscribers of the publication stop receiving them)",
                    dropped.join(", ")
                ));
            }
        }
        if !flag(5) {
            options.push("publish_via_partition_root = true");
            plan.adds.push("publish_via_partition_root = true".into());
        }
        if !options.is_empty() {
            plan.statements.push(format!(
                "ALTER PUBLICATION {ident} SET ({})",
                options.join(", ")
            ));
        }
        Ok(plan)
    }

    /// Runs a plan's statements in order.
    ///
    /// # Errors
    /// An operator error naming the statement and who may run it (the owner
    /// of the publication and of the outbox tables).
    pub async fn apply_publication_plan(&mut self, plan: &PublicationPlan) -> Result<()> {
        let user = self.s.opts().pg.user.clone();
        for sql in &plan.statements {
            self.s
                .query(sql, "changing the publication")
                .await
                .map_err(|e| {
                    let owner = plan
                        .owner
                        .as_deref()
                        .map(|o| format!(" ({o})"))
                        .unwrap_or_default();
                    Error::operator(format!(
                        "cannot change publication {} as {user}: {}",
                        plan.publication,
                        e.message()
                    ))
                    .with_hint(format!(
                        "have the owner of the publication{owner} and of the outbox tables run it: \
                         `walcast publication sync --print-sql --config <file> | psql -U <owner> …`, i.e. {}; \
                         or run `walcast publication sync` as a role that owns them and has REPLICATION (--set postgres.user=…)",
                        plan.statements.join("; ")
                    ))
                })?;
            tracing::info!(publication = %plan.publication, "{sql}");
        }
        Ok(())
    }
}
