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

use std::time::Duration;

use walcast_core::config::{quote_literal, TableName};
use walcast_core::{Error, Result};

use crate::preflight::{open_session, ConnectOptions, Session};

/// One outbox table as the catalog shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogEntry {
    /// The configured table.
    pub table: TableName,
    /// Its OID (`None`: no such table now).
    pub oid: Option<u32>,
    /// Whether walcast's publication holds that OID.
    pub published: bool,
}

/// Reads every outbox table's OID and publication membership.
pub(crate) async fn read_catalog(s: &mut Session<'_>) -> Result<Vec<CatalogEntry>> {
    let publication = quote_literal(&s.opts().pg.publication);
    let mut out = Vec::new();
    for t in s.opts().tables.clone() {
        let rows = s
            .query(
                &format!(
                    "SELECT c.oid, EXISTS (SELECT 1 FROM pg_catalog.pg_publication_rel pr \
                       JOIN pg_catalog.pg_publication p ON p.oid = pr.prpubid \
                       WHERE p.pubname = {publication} AND pr.prrelid = c.oid) \
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
            _ => continue,
        };
        return Some(
            Error::operator(format!(
                "{what} while walcast was running; rows written to a table outside the publication never reach the replication stream"
            ))
            .with_hint(format!(
                "make publication {publication} hold the table the application writes to (ALTER PUBLICATION \"{publication}\" ADD TABLE {}), \
                 then reconcile the rows that table received since the change with Kafka: they were not relayed. walcast stops until then",
                t.quoted()
            )),
        );
    }
    None
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
    loop {
        tokio::time::sleep(every).await;
        let now = async {
            let (mut s, _) = open_session(opts).await?;
            read_catalog(&mut s).await
        }
        .await;
        match now {
            Ok(now) => {
                if let Some(e) = compare(&opts.pg.publication, &start, &now) {
                    return e;
                }
            }
            Err(e) => tracing::warn!("checking the outbox tables' identity failed (retried): {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(oid: Option<u32>, published: bool) -> CatalogEntry {
        CatalogEntry {
            table: TableName::parse("public.outbox").unwrap(),
            oid,
            published,
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
