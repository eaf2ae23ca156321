//! Watching the outbox tables' identity while walcast runs (rule 5a of
//! `docs/delivery-rules.md`).
//!
//! A publication holds tables by OID. An outbox table that is renamed and
//! replaced by a new table of the same name (a "swap") leaves the new table
//! outside the publication: its rows never reach the replication stream, so
//! the stream alone cannot show the loss. walcast therefore reads, at start
//! and then periodically on a short session of its own, each outbox table's
//! OID and whether the publication holds it, and stops (operator error) when
//! either changed.
//!
//! The same periodic session also reads the slot's `wal_status` and
//! `safe_wal_size` (for metrics and warnings) and writes walcast's heartbeat:
//! a non-transactional logical decoding message in the outbox database, so
//! the slot advances while the outbox is quiet and other databases of the
//! server write WAL (see [`watch_server`]).

use std::time::Duration;

use walcast_core::config::TableName;
use walcast_core::{Error, Result};

use crate::preflight::{open_session, ConnectOptions, Session};
use crate::sql::{quote_literal, quote_table};

/// One outbox table as the catalog shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogEntry {
    /// The configured table.
    pub table: TableName,
    /// Its OID (`None`: no such table now).
    pub oid: Option<u32>,
    /// Whether walcast's publication holds that OID.
    pub published: bool,
    /// The publication's row filter on it (`pg_get_expr`; PostgreSQL 15+).
    pub row_filter: Option<String>,
}

/// Reads every outbox table's OID and publication membership.
pub(crate) async fn read_catalog(s: &mut Session<'_>) -> Result<Vec<CatalogEntry>> {
    let publication = quote_literal(&s.opts().pg.publication);
    // Row filters exist from PostgreSQL 15 on.
    let row_filter = if s.server_version_num().await? >= 150_000 {
        format!(
            "(SELECT pg_catalog.pg_get_expr(pr.prqual, pr.prrelid) FROM pg_catalog.pg_publication_rel pr \
               JOIN pg_catalog.pg_publication p ON p.oid = pr.prpubid \
               WHERE p.pubname = {publication} AND pr.prrelid = c.oid)"
        )
    } else {
        "NULL".to_string()
    };
    let mut out = Vec::new();
    for t in s.opts().tables.clone() {
        let rows = s
            .query(
                &format!(
                    "SELECT c.oid, EXISTS (SELECT 1 FROM pg_catalog.pg_publication_rel pr \
                       JOIN pg_catalog.pg_publication p ON p.oid = pr.prpubid \
                       WHERE p.pubname = {publication} AND pr.prrelid = c.oid), {row_filter} \
                     FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = {} AND c.relname = {} AND c.relkind IN ('r', 'p')",
                    quote_literal(&t.schema),
                    quote_literal(&t.name)
                ),
                "reading the outbox tables' identity",
            )
            .await?;
        let row = rows.into_iter().next();
        let oid = row
            .as_ref()
            .and_then(|r| r.first().cloned().flatten())
            .and_then(|v| v.parse().ok());
        let published = row
            .as_ref()
            .and_then(|r| r.get(1).cloned().flatten())
            .as_deref()
            == Some("t");
        out.push(CatalogEntry {
            table: t,
            oid,
            published,
            row_filter: row.as_ref().and_then(|r| r.get(2).cloned().flatten()),
        });
    }
    Ok(out)
}

/// The operator error for a table whose identity changed, if one did.
pub fn compare(publication: &str, start: &[CatalogEntry], now: &[CatalogEntry]) -> Option<Error> {
    for (a, b) in start.iter().zip(now) {
        let t = &a.table;
        let what = match (a.oid, b.oid) {
            (_, None) => format!("outbox table {t} no longer exists (renamed or dropped)"),
            (Some(x), Some(y)) if x != y => format!(
                "outbox table {t} was replaced by another table of the same name (OID {x} -> {y})"
            ),
            _ if a.published && !b.published => {
                format!("outbox table {t} was removed from publication {publication}")
            }
            _ if a.published && b.published && a.row_filter != b.row_filter => {
                let show = |f: &Option<String>| {
                    f.as_deref()
                        .map_or("none".to_string(), |f| format!("WHERE {f}"))
                };
                return Some(
                    Error::operator(format!(
                        "the row filter of outbox table {t} in publication {publication} changed from {} to {} while walcast was running; rows the filter leaves out never reach the replication stream",
                        show(&a.row_filter),
                        show(&b.row_filter)
                    ))
                    .with_hint(
                        "restore the filter walcast set (`walcast publication sync` prints and applies it), then reconcile the rows written since the change with Kafka: those it left out were not relayed. walcast stops until then",
                    ),
                );
            }
            _ => continue,
        };
        return Some(
            Error::operator(format!(
                "{what} while walcast was running; rows written to a table outside the publication never reach the replication stream"
            ))
            .with_hint(format!(
                "make publication {publication} hold the table the application writes to (ALTER PUBLICATION \"{publication}\" ADD TABLE {}), \
                 then reconcile the rows that table received since the change with Kafka: they were not relayed. walcast stops until then",
                quote_table(t)
            )),
        );
    }
    None
}

/// The prefix of walcast's heartbeat messages.
pub const HEARTBEAT_PREFIX: &str = "walcast.heartbeat";

/// The statement that writes a heartbeat: a non-transactional logical
/// decoding message, which is WAL in the outbox database that the slot's
/// walsender decodes (and walcast ignores), so the slot's position follows.
pub const HEARTBEAT_SQL: &str =
    "SELECT pg_catalog.pg_logical_emit_message(false, 'walcast.heartbeat', '')";

/// What the periodic check read about walcast's slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotFacts {
    /// `pg_replication_slots.wal_status` (`reserved`, `extended`,
    /// `unreserved`, `lost`); `None` when the slot is gone.
    pub wal_status: Option<String>,
    /// `pg_replication_slots.safe_wal_size` in bytes: WAL that can still be
    /// written before the slot is in danger of being invalidated; `None`
    /// when `max_slot_wal_keep_size = -1` (no limit).
    pub safe_wal_size: Option<i64>,
    /// `max_slot_wal_keep_size` in bytes; `None` when unlimited.
    pub max_slot_wal_keep_size: Option<i64>,
}

/// Reads the slot's WAL facts.
pub(crate) async fn read_slot_facts(s: &mut Session<'_>) -> Result<SlotFacts> {
    let rows = s
        .query(
            &format!(
                "SELECT s.wal_status, s.safe_wal_size, \
                   (SELECT setting FROM pg_catalog.pg_settings WHERE name = 'max_slot_wal_keep_size') \
                 FROM (SELECT 1) AS one LEFT JOIN pg_catalog.pg_replication_slots s ON s.slot_name = {}",
                quote_literal(&s.opts().pg.slot)
            ),
            "reading the slot's wal_status and safe_wal_size",
        )
        .await?;
    let row = rows.into_iter().next().unwrap_or_default();
    let get = |i: usize| row.get(i).cloned().flatten();
    Ok(SlotFacts {
        wal_status: get(0),
        safe_wal_size: get(1).and_then(|v| v.parse().ok()),
        // pg_settings reports it in MB; -1 means no limit.
        max_slot_wal_keep_size: get(2)
            .and_then(|v| v.parse::<i64>().ok())
            .filter(|mb| *mb >= 0)
            .map(|mb| mb * 1024 * 1024),
    })
}

/// Writes one heartbeat on `s`.
pub(crate) async fn write_heartbeat(s: &mut Session<'_>) -> Result<()> {
    s.query(HEARTBEAT_SQL, "writing the heartbeat")
        .await
        .map(|_| ())
}

/// What [`watch_server`] does, and how often. `None`: never.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchSettings {
    /// Check the outbox tables' identity and read the slot's facts
    /// (`postgres.catalog_check_interval_ms`).
    pub catalog_every: Option<Duration>,
    /// Write a heartbeat (`postgres.heartbeat_interval_ms`).
    pub heartbeat_every: Option<Duration>,
}

/// What [`watch_server`] reports while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerReport {
    /// The slot's facts, read at each catalog check.
    Slot(SlotFacts),
    /// A heartbeat was written.
    Heartbeat,
}

/// Re-reads the catalog every `every` and resolves with the error of the
/// first change from `start`. A check that cannot connect (Postgres
/// restarting, no free walsender) is logged and retried; it never stops
/// walcast on its own.
pub async fn watch_catalog(
    opts: &ConnectOptions,
    start: Vec<CatalogEntry>,
    every: Duration,
) -> Error {
    let settings = WatchSettings {
        catalog_every: Some(every),
        heartbeat_every: None,
    };
    watch_server(opts, start, settings, |_| {}).await
}

/// The periodic work on short sessions of walcast's own, each due item on
/// one session: the catalog check (resolves with the error of the first
/// change from `start`), the slot's facts (reported), and heartbeats
/// (reported). A session that cannot connect (Postgres restarting, no free
/// walsender) is logged and retried; it never stops walcast on its own. A
/// heartbeat the server refuses for want of a privilege stops walcast with an
/// operator error naming the fix. Never resolves when nothing is to be done.
pub async fn watch_server(
    opts: &ConnectOptions,
    start: Vec<CatalogEntry>,
    settings: WatchSettings,
    mut report: impl FnMut(ServerReport) + Send,
) -> Error {
    let now = tokio::time::Instant::now();
    let mut next_catalog = settings.catalog_every.map(|d| now + d);
    let mut next_heartbeat = settings.heartbeat_every.map(|d| now + d);
    loop {
        let Some(wake) = [next_catalog, next_heartbeat].into_iter().flatten().min() else {
            return std::future::pending().await;
        };
        tokio::time::sleep_until(wake).await;
        let now = tokio::time::Instant::now();
        let catalog_due = next_catalog.is_some_and(|t| t <= now);
        let heartbeat_due = next_heartbeat.is_some_and(|t| t <= now);
        if catalog_due {
            next_catalog = settings.catalog_every.map(|d| now + d);
        }
        if heartbeat_due {
            next_heartbeat = settings.heartbeat_every.map(|d| now + d);
        }
        let result = async {
            let (mut s, _) = open_session(opts).await?;
            if heartbeat_due {
                match write_heartbeat(&mut s).await {
                    Ok(()) => report(ServerReport::Heartbeat),
                    Err(e) if e.kind() == walcast_core::ErrorKind::OperatorAction => {
                        return Ok(Some(
                            Error::operator(format!(
                                "walcast cannot write its heartbeat into database {}: {}",
                                opts.pg.database,
                                e.message()
                            ))
                            .with_hint(format!(
                                "walcast runs {HEARTBEAT_SQL:?} on a replication connection every postgres.heartbeat_interval_ms, so its slot advances while the outbox is quiet; \
                                 grant its role the right to run pg_logical_emit_message (GRANT EXECUTE ON FUNCTION pg_catalog.pg_logical_emit_message(boolean, text, text) TO {}), \
                                 or set postgres.heartbeat_interval_ms = 0 (then a quiet outbox can pin WAL while other databases write)",
                                opts.pg.user
                            )),
                        ))
                    }
                    Err(e) => return Err(e),
                }
            }
            if catalog_due {
                let now = read_catalog(&mut s).await?;
                if let Some(e) = compare(&opts.pg.publication, &start, &now) {
                    return Ok(Some(e));
                }
                report(ServerReport::Slot(read_slot_facts(&mut s).await?));
            }
            Ok::<_, Error>(None)
        }
        .await;
        match result {
            Ok(Some(e)) => return e.or_origin(walcast_core::Origin::Postgres),
            Ok(None) => {}
            Err(e) => tracing::warn!(
                "the periodic check of the outbox tables, the slot and the heartbeat failed (retried): {e}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_row_filter_stops_walcast() {
        let mut a = e(Some(1), true);
        a.row_filter = Some("((COALESCE(hashtext(k), 0) & 2147483647) % 2) = 0".into());
        let mut b = a.clone();
        assert!(compare("p", &[a.clone()], &[b.clone()]).is_none());
        b.row_filter = None;
        let err = compare("p", &[a], &[b]).unwrap().to_string();
        assert!(
            err.contains("the row filter of outbox table public.outbox in publication p changed from WHERE ((COALESCE"),
            "{err}"
        );
        assert!(err.contains("to none"), "{err}");
    }

    fn e(oid: Option<u32>, published: bool) -> CatalogEntry {
        CatalogEntry {
            table: TableName::parse("public.outbox").unwrap(),
            oid,
            published,
            row_filter: None,
        }
    }

    #[test]
    fn changes_are_named() {
        let start = [e(Some(10), true)];
        assert!(compare("p", &start, &[e(Some(10), true)]).is_none());
        let err = compare("p", &start, &[e(Some(11), false)]).unwrap();
        assert!(err.to_string().contains("replaced"), "{err}");
        assert!(
            err.to_string().contains("ADD TABLE \"public\".\"outbox\""),
            "{err}"
        );
        let err = compare("p", &start, &[e(None, false)]).unwrap();
        assert!(err.to_string().contains("no longer exists"), "{err}");
        let err = compare("p", &start, &[e(Some(10), false)]).unwrap();
        assert!(
            err.to_string().contains("removed from publication"),
            "{err}"
        );
    }
}
