//! `walcast check`, Postgres side: everything `walcast run` checks before it
//! streams (with the same messages: the rules live in [`crate::preflight`]),
//! plus what it does not refuse but an operator should know (free slots and
//! WAL senders, `max_slot_wal_keep_size`, who owns what). Read-only, on one
//! `replication=database` session.

use walcast_core::check::CheckResult;
use walcast_core::config::TableName;

use crate::sql::quote_literal;
use walcast_core::state::SlotKey;
use walcast_core::Result;

use crate::preflight::{
    check_tables, create_publication_sql, missing_publication_error, missing_slot_error,
    open_session, publication_problems, read_slot, row_filters, slot_problem, target,
    wal_level_error, ConnectOptions, Session,
};

/// Runs the Postgres checks. Never fails: a check that cannot run is a
/// failed check.
pub async fn check(opts: &ConnectOptions) -> Vec<CheckResult> {
    let pg = &opts.pg;
    let mut out = Vec::new();
    let (mut s, system) = match open_session(opts).await {
        Ok(v) => v,
        Err(e) => {
            // A role without REPLICATION (or LOGIN) is refused at connection.
            let name = if e.hint().is_some_and(|h| h.contains("REPLICATION")) {
                "postgres.role"
            } else {
                "postgres.connect"
            };
            out.push(CheckResult::from_error(name, &e));
            return out;
        }
    };
    let version = s.show("server_version").await.ok().flatten();
    let version_num = s.server_version_num().await.unwrap_or(0);
    out.push(CheckResult::ok(
        "postgres.connect",
        format!(
            "connected to {} as {} (PostgreSQL {}, system identifier {})",
            target(pg),
            pg.user,
            version.as_deref().unwrap_or("?"),
            system.system_id
        ),
    ));
    let id = SlotKey {
        database: pg.database.clone(),
        slot: pg.slot.clone(),
    };
    out.push(or_fail("postgres.wal_level", wal_level(&mut s).await));
    out.push(or_fail("postgres.role", role(&mut s).await));
    let slot_exists = read_slot(&mut s).await.ok().flatten().is_some();
    out.push(or_fail(
        "postgres.replication_slots",
        replication_slots(&mut s, slot_exists).await,
    ));
    out.push(or_fail(
        "postgres.wal_senders",
        wal_senders(&mut s, slot_exists).await,
    ));
    out.push(or_fail(
        "postgres.max_slot_wal_keep_size",
        max_slot_wal_keep_size(&mut s).await,
    ));
    let partitioned = match check_tables(&mut s).await {
        Ok(p) => {
            out.push(CheckResult::ok(
                "postgres.tables",
                format!(
                    "outbox table(s) {} exist with the outbox columns{}",
                    list(&opts.tables),
                    if p.is_empty() {
                        String::new()
                    } else {
                        format!(" ({} partitioned)", list(&p))
                    }
                ),
            ));
            p
        }
        Err(e) => {
            out.push(CheckResult::from_error("postgres.tables", &e));
            Vec::new()
        }
    };
    let can_manage = match ownership(&mut s).await {
        Ok((result, can_manage)) => {
            out.push(result);
            can_manage
        }
        Err(e) => {
            out.push(CheckResult::from_error("postgres.ownership", &e));
            false
        }
    };
    let problems = match row_filters(&mut s, version_num).await {
        Ok(filters) => publication_problems(&mut s, &partitioned, version_num, &filters)
            .await
            .map(|p| (filters, p)),
        Err(e) => Err(e),
    };
    match problems {
        Err(e) => out.push(CheckResult::from_error("postgres.publication", &e)),
        Ok((filters, None)) => {
            let create_sql = create_publication_sql(pg, &opts.tables, &filters);
            out.push(if !pg.create_publication {
                CheckResult::from_error(
                    "postgres.publication",
                    &missing_publication_error(pg, &create_sql),
                )
            } else if can_manage {
                CheckResult::ok(
                    "postgres.publication",
                    format!(
                        "publication {} does not exist yet; walcast creates it at start (postgres.create_publication = true): {create_sql}",
                        pg.publication
                    ),
                )
            } else {
                CheckResult::fail(
                    "postgres.publication",
                    format!(
                        "publication {} does not exist, and walcast's role {} cannot create it (it does not own the outbox tables)",
                        pg.publication, pg.user
                    ),
                    format!("as the tables' owner: {create_sql}"),
                )
            });
        }
        Ok((_, Some(problems))) if problems.is_empty() => out.push(CheckResult::ok(
            "postgres.publication",
            format!(
                "publication {} publishes INSERTs of exactly {}{}{}",
                pg.publication,
                list(&opts.tables),
                if partitioned.is_empty() {
                    ""
                } else {
                    ", via the partition root"
                },
                pg.key_hash
                    .map(|h| format!(
                        ", the rows whose key hashes to {} modulo {}",
                        h.remainder, h.modulus
                    ))
                    .unwrap_or_default()
            ),
        )),
        Ok((_, Some(problems))) => out.extend(
            problems
                .iter()
                .map(|e| CheckResult::from_error("postgres.publication", e)),
        ),
    }
    out.push(or_fail("postgres.slot", slot(&mut s, &id).await));
    out
}

fn or_fail(name: &str, r: Result<CheckResult>) -> CheckResult {
    r.unwrap_or_else(|e| CheckResult::from_error(name, &e))
}

fn list(tables: &[TableName]) -> String {
    tables
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

async fn setting(s: &mut Session<'_>, name: &str) -> Result<Option<String>> {
    s.query_value(
        &format!(
            "SELECT setting FROM pg_catalog.pg_settings WHERE name = {}",
            quote_literal(name)
        ),
        &format!("reading {name}"),
    )
    .await
}

async fn wal_level(s: &mut Session<'_>) -> Result<CheckResult> {
    let level = s.show("wal_level").await?.unwrap_or_default();
    Ok(match wal_level_error(&target(&s.opts().pg), &level) {
        Some(e) => CheckResult::from_error("postgres.wal_level", &e),
        None => CheckResult::ok("postgres.wal_level", "wal_level = logical"),
    })
}

async fn role(s: &mut Session<'_>) -> Result<CheckResult> {
    let rows = s
        .query(
            "SELECT rolname, rolcanlogin, rolreplication, rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user",
            "reading the role's attributes",
        )
        .await?;
    let r = rows.into_iter().next().unwrap_or_default();
    let flag = |i: usize| r.get(i).cloned().flatten().as_deref() == Some("t");
    let name = r.first().cloned().flatten().unwrap_or_default();
    Ok(if flag(3) {
        CheckResult::warn(
            "postgres.role",
            format!("role {name} is a superuser"),
            "give walcast a role with only LOGIN REPLICATION (CREATE ROLE walcast LOGIN REPLICATION PASSWORD '…'); it needs nothing else once the publication exists",
        )
    } else {
        // The connection itself proves both: a role without them is refused.
        CheckResult::ok(
            "postgres.role",
            format!(
                "role {name} has LOGIN{} and REPLICATION{} (and is not a superuser)",
                if flag(1) { "" } else { "?" },
                if flag(2) { "" } else { "?" }
            ),
        )
    })
}

async fn replication_slots(s: &mut Session<'_>, slot_exists: bool) -> Result<CheckResult> {
    let max: i64 = setting(s, "max_replication_slots")
        .await?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let used: i64 = s
        .query_value(
            "SELECT count(*) FROM pg_catalog.pg_replication_slots",
            "counting replication slots",
        )
        .await?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let detail = format!("{used} of max_replication_slots = {max} in use");
    Ok(if slot_exists {
        CheckResult::ok(
            "postgres.replication_slots",
            format!("{detail} (walcast's slot among them)"),
        )
    } else if used >= max {
        CheckResult::fail(
            "postgres.replication_slots",
            format!("{detail}: no free slot for walcast's"),
            "drop an unused slot (SELECT slot_name, active, restart_lsn FROM pg_replication_slots), or raise max_replication_slots (ALTER SYSTEM SET max_replication_slots = …; restart Postgres)",
        )
    } else {
        CheckResult::ok(
            "postgres.replication_slots",
            format!("{detail}; {} free", max - used),
        )
    })
}

async fn wal_senders(s: &mut Session<'_>, slot_exists: bool) -> Result<CheckResult> {
    let max: i64 = setting(s, "max_wal_senders")
        .await?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // Every WAL sender but this check's own session.
    let used: i64 = s
        .query_value(
            "SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE backend_type = 'walsender' AND pid <> pg_catalog.pg_backend_pid()",
            "counting WAL senders",
        )
        .await?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let free = max - used;
    // The stream, plus the short sessions of the catalog check.
    let catalog = i64::from(s.opts().pg.catalog_check_interval_ms > 0);
    let detail = format!(
        "{used} of max_wal_senders = {max} in use by other sessions; walcast needs 1 for its stream{}",
        if catalog == 1 {
            " and 1 now and then for its catalog check"
        } else {
            ""
        }
    );
    let fix = "raise max_wal_senders (ALTER SYSTEM SET max_wal_senders = …; restart Postgres), or end unused replication connections (SELECT pid, application_name FROM pg_stat_replication)";
    Ok(if free < 1 {
        CheckResult::fail("postgres.wal_senders", format!("{detail}: none free"), fix)
    } else if free < 1 + catalog && !slot_exists {
        CheckResult::warn(
            "postgres.wal_senders",
            format!("{detail}: only {free} free"),
            fix,
        )
    } else {
        CheckResult::ok("postgres.wal_senders", format!("{detail}; {free} free"))
    })
}

async fn max_slot_wal_keep_size(s: &mut Session<'_>) -> Result<CheckResult> {
    let name = "postgres.max_slot_wal_keep_size";
    Ok(match s.show("max_slot_wal_keep_size").await {
        Ok(Some(v)) if v.trim() == "-1" => CheckResult::warn(
            name,
            "max_slot_wal_keep_size = -1: Postgres keeps every WAL segment walcast's slot still needs, without limit, so a stopped or stalled walcast can fill the disk",
            "ALTER SYSTEM SET max_slot_wal_keep_size = '<size>'; SELECT pg_reload_conf(); size it for the longest walcast outage to survive. A slot past it is invalidated and walcast then refuses to start (README: Lost slots)",
        ),
        Ok(Some(v)) => CheckResult::ok(
            name,
            format!("max_slot_wal_keep_size = {v}: past it the slot is invalidated (walcast then refuses to start until `walcast slot accept-gap`); watch safe_wal_size (`walcast status`)"),
        ),
        // Before PostgreSQL 13 there is no such setting.
        Ok(None) | Err(_) => CheckResult::warn(
            name,
            "this server has no max_slot_wal_keep_size: a stopped walcast can fill the disk",
            "watch the slot's lag (`walcast status`) and disk space",
        ),
    })
}

/// Who owns the outbox tables and the publication, and whether walcast's
/// role can create or alter the publication (it must own the tables, and
/// the publication to alter it).
async fn ownership(s: &mut Session<'_>) -> Result<(CheckResult, bool)> {
    let opts = s.opts();
    let user = &opts.pg.user;
    let mut owners = Vec::new();
    let mut can_manage = true;
    for t in &opts.tables {
        let rows = s
            .query(
                &format!(
                    "SELECT pg_catalog.pg_get_userbyid(c.relowner), pg_catalog.pg_has_role(current_user, c.relowner, 'USAGE') \
                     FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = {} AND c.relname = {}",
                    quote_literal(&t.schema),
                    quote_literal(&t.name)
                ),
                "reading the outbox tables' owners",
            )
            .await?;
        if let Some(r) = rows.into_iter().next() {
            let owner = r.first().cloned().flatten().unwrap_or_default();
            can_manage &= r.get(1).cloned().flatten().as_deref() == Some("t");
            owners.push(format!("{t} is owned by {owner}"));
        }
    }
    let rows = s
        .query(
            &format!(
                "SELECT pg_catalog.pg_get_userbyid(pubowner), pg_catalog.pg_has_role(current_user, pubowner, 'USAGE') \
                 FROM pg_catalog.pg_publication WHERE pubname = {}",
                quote_literal(&opts.pg.publication)
            ),
            "reading the publication's owner",
        )
        .await?;
    if let Some(r) = rows.into_iter().next() {
        let owner = r.first().cloned().flatten().unwrap_or_default();
        can_manage &= r.get(1).cloned().flatten().as_deref() == Some("t");
        owners.push(format!(
            "publication {} is owned by {owner}",
            opts.pg.publication
        ));
    }
    let who = if can_manage {
        format!("walcast's role {user} can create and alter the publication")
    } else {
        format!(
            "walcast's role {user} cannot create or alter the publication: the owner runs the SQL of `walcast publication sync --print-sql`"
        )
    };
    let detail = if owners.is_empty() {
        who
    } else {
        format!("{}; {who}", owners.join(", "))
    };
    Ok((CheckResult::ok("postgres.ownership", detail), can_manage))
}

async fn slot(s: &mut Session<'_>, id: &SlotKey) -> Result<CheckResult> {
    let name = "postgres.slot";
    let pg = &s.opts().pg;
    let record = s
        .opts()
        .state
        .load(id)
        .await?
        .into_iter()
        .max_by_key(|r| r.confirmed_upper);
    let Some(slot) = read_slot(s).await? else {
        if let Some(rec) = &record {
            return Ok(CheckResult::from_error(
                name,
                &crate::state::gap_error(
                    &pg.slot,
                    "no longer exists",
                    rec.confirmed_upper,
                    &rec.origin,
                ),
            ));
        }
        if !pg.create_slot {
            return Ok(CheckResult::from_error(name, &missing_slot_error(pg)));
        }
        return Ok(CheckResult::ok(
            name,
            format!(
                "slot {} does not exist yet; walcast creates it at start (postgres.create_slot = true), or now: `walcast slot create`",
                pg.slot
            ),
        ));
    };
    if let Some(e) = slot_problem(pg, &slot, record.as_ref()) {
        return Ok(CheckResult::from_error(name, &e));
    }
    let held = if slot.active {
        format!("held by pid {}", slot.active_pid.as_deref().unwrap_or("?"))
    } else {
        "not held by any connection".to_string()
    };
    let wal_status = slot.wal_status.as_deref().unwrap_or("?");
    let detail = format!(
        "slot {} (pgoutput) at {}, wal_status = {wal_status}, {held}",
        pg.slot,
        slot.confirmed_flush_lsn.as_deref().unwrap_or("?")
    );
    Ok(match wal_status {
        "unreserved" => CheckResult::warn(
            name,
            format!("{detail}: it is about to lose WAL it needs (past max_slot_wal_keep_size)"),
            "get walcast streaming and caught up now (`walcast status` shows the lag); raise max_slot_wal_keep_size if it cannot catch up in time",
        ),
        "extended" => CheckResult::warn(
            name,
            format!("{detail}: it holds more WAL than max_wal_size (walcast is behind)"),
            "check that walcast runs and catches up (`walcast status`)",
        ),
        _ => CheckResult::ok(name, detail),
    })
}
