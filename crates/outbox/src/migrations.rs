//! The canonical tables as SQL (the same text as the files in
//! `crates/outbox/migrations/`, which can be applied with `psql` or any
//! migration tool) and [`apply`] to run them from Rust. Every statement is
//! `IF NOT EXISTS`, so applying twice is harmless.

use tokio_postgres::GenericClient;

use crate::{db, Result};

/// The plain outbox table (`outbox`, walcast's default columns plus
/// `correlation_id`, `tracingspancontext` and `created_at`).
pub const OUTBOX: &str = include_str!("../migrations/0001_outbox.sql");
/// The outbox table hash-partitioned by aggregate id (4 partitions).
pub const OUTBOX_PARTITIONED: &str = include_str!("../migrations/0001_outbox_partitioned.sql");
/// The outbox table range-partitioned by `created_at`, one partition per
/// UTC day (`outbox_pYYYYMMDD`; today and the next 3 days): rotated with
/// [`rotate`](crate::rotate).
pub const OUTBOX_RANGE_PARTITIONED: &str =
    include_str!("../migrations/0001_outbox_range_partitioned.sql");
/// Adds `correlation_id` and `tracingspancontext` to an outbox table created
/// by an earlier [`OUTBOX`] (one with `headers jsonb`); a no-op otherwise.
pub const OUTBOX_TRACE_COLUMNS: &str = include_str!("../migrations/0003_outbox_trace_columns.sql");
/// The consumer's deduplication table `processed_events`.
pub const PROCESSED_EVENTS: &str = include_str!("../migrations/0002_processed_events.sql");

/// walcast's `[outbox]` routes for the canonical table and the table-less
/// mode (`crates/outbox/walcast.toml`): paste them into walcast's
/// configuration so every [`Mode`](crate::Mode) gives the same record.
pub const WALCAST_CONFIG: &str = include_str!("../walcast.toml");

/// Which outbox layout [`apply`] creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// [`OUTBOX`].
    Plain,
    /// [`OUTBOX_PARTITIONED`].
    HashPartitioned,
    /// [`OUTBOX_RANGE_PARTITIONED`].
    RangePartitioned,
    /// No outbox table (a consumer-only database): only `processed_events`.
    None,
}

/// Creates the outbox table of `layout` (upgrading one from an earlier
/// version: [`OUTBOX_TRACE_COLUMNS`]) and `processed_events` in the
/// client's current schema (`search_path`). Does not create the publication:
/// walcast does (`postgres.create_publication`), or see the README.
pub async fn apply<C: GenericClient + Sync>(client: &C, layout: Layout) -> Result<()> {
    let outbox = match layout {
        Layout::Plain => Some(OUTBOX),
        Layout::HashPartitioned => Some(OUTBOX_PARTITIONED),
        Layout::RangePartitioned => Some(OUTBOX_RANGE_PARTITIONED),
        Layout::None => None,
    };
    if let Some(sql) = outbox {
        client
            .batch_execute(sql)
            .await
            .map_err(db("creating the outbox table"))?;
        client
            .batch_execute(OUTBOX_TRACE_COLUMNS)
            .await
            .map_err(db(
                "adding correlation_id and tracingspancontext to the outbox table",
            ))?;
    }
    client
        .batch_execute(PROCESSED_EVENTS)
        .await
        .map_err(db("creating processed_events"))
}
