//! Connecting, checking the setup, and positioning on the slot.

use std::time::Duration;

use bytes::Bytes;
use pgwire_replication::{ReplicationClient, ReplicationConfig, TlsConfig};
use walcast_core::config::{OutboxColumns, PostgresConfig, Secret, SslMode, TableName};
use walcast_core::state::{SlotIdentity, StateStore};
use walcast_core::{Error, Result};
use walcast_pgoutput::Lsn;

use crate::classify;
use crate::source::{to_pgwire, PgSource};
use crate::sql::{quote_ident, quote_literal, quote_table};

/// What to connect to and check.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// `[postgres]`
    pub pg: PostgresConfig,
    /// The resolved password.
    pub password: Option<Secret>,
    /// Outbox tables.
    pub tables: Vec<TableName>,
    /// Outbox column names.
    pub columns: OutboxColumns,
    /// Where slot records live.
    pub state: StateStore,
    /// `pipeline.max_row_bytes`: the largest replication message accepted.
    pub max_row_bytes: u64,
}

/// Facts about the server, read on the replication session.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    /// `IDENTIFY_SYSTEM` system identifier.
    pub system_identifier: String,
    /// Timeline.
    pub timeline: u32,
    /// `server_version_num`.
    pub server_version_num: u32,
    /// The server's WAL position when we connected.
    pub xlogpos: Lsn,
}

/// A started stream and where it starts.
#[derive(Debug)]
pub struct Connected {
    /// The stream.
    pub source: PgSource,
    /// The slot's confirmed flush LSN: nothing at or below it is replayed.
    pub start_lsn: Lsn,
    /// Server facts.
    pub info: ServerInfo,
    /// The slot's identity (for the state record).
    pub slot: SlotIdentity,
    /// True when this run created the slot.
    pub created_slot: bool,
    /// Partitions (at any depth) of partitioned outbox tables, each with its
    /// outbox table, as the catalog listed them at start.
    pub partitions: Vec<(TableName, TableName)>,
    /// The outbox tables' identity at start, for [`crate::watch_catalog`].
    pub catalog: Vec<crate::CatalogEntry>,
}

/// How long the replication client stays silent when it has nothing to report.
const IDLE_WAKEUP: Duration = Duration::from_secs(3600);

/// How long a replication connection may stay silent while walcast waits for
/// it before it counts as dead: `wal_sender_timeout * 1.5`. The server pings
/// an idle client every `wal_sender_timeout / 2` (see [`IDLE_WAKEUP`]), so this
/// is three missed pings. `None` when the server never pings (timeout 0).
fn silence_timeout(wal_sender_timeout_ms: u64) -> Option<Duration> {
    (wal_sender_timeout_ms > 0).then(|| Duration::from_millis(wal_sender_timeout_ms * 3 / 2))
}

/// Bytes of rows the replication connection may read ahead of the relay (the
/// hand-over buffer between the socket and the pipeline), outside the
/// pipeline's in-flight byte bound. The buffer is bounded by message count,
/// so its size in messages is this budget divided by `pipeline.max_row_bytes`
/// (see [`replication_buffer_messages`]).
pub const REPLICATION_READ_AHEAD_BYTES: u64 = 64 * 1024 * 1024;

/// Messages the replication connection reads ahead of the relay for a given
/// `pipeline.max_row_bytes`: `REPLICATION_READ_AHEAD_BYTES / max_row_bytes`,
/// between 4 and 64. walcast's memory can exceed the in-flight bound by this
/// many rows of at most `max_row_bytes` each. Small, because the relay
/// consumes far faster than one message per socket read; past it, the
/// server's sends block on TCP back-pressure.
pub fn replication_buffer_messages(max_row_bytes: u64) -> usize {
    (REPLICATION_READ_AHEAD_BYTES / max_row_bytes.max(1)).clamp(4, 64) as usize
}

fn replication_config(opts: &ConnectOptions) -> ReplicationConfig {
    let pg = &opts.pg;
    let tls = match pg.sslmode {
        SslMode::Disable => TlsConfig::disabled(),
        SslMode::Require => TlsConfig::require(),
        SslMode::VerifyCa => TlsConfig::verify_ca(pg.ssl_root_cert.clone()),
        SslMode::VerifyFull => TlsConfig::verify_full(pg.ssl_root_cert.clone()),
    };
    ReplicationConfig::new(
        pg.host.clone(),
        pg.user.clone(),
        opts.password.as_ref().map(|s| s.expose().to_string()).unwrap_or_default(),
        pg.database.clone(),
        pg.slot.clone(),
        pg.publication.clone(),
    )
    .with_port(pg.port)
    .with_tls(tls)
    .with_application_name(pg.application_name.clone())
    .with_status_interval(Duration::from_millis(pg.status_interval_ms))
    // Let the server do the idle pinging: a client that sends nothing on its
    // own for wal_sender_timeout / 2 gets a keepalive requesting a reply, so a
    // healthy connection is never silent for longer than that (which
    // `PgSource` relies on to detect a dead one). Status updates for a
    // confirmed LSN still go out within status_interval_ms.
    .with_wakeup_interval(IDLE_WAKEUP)
    .with_buffer_size(replication_buffer_messages(opts.max_row_bytes))
    // A row larger than this is refused before it is buffered (the stream
    // ends with a permanent error naming pipeline.max_row_bytes).
    .with_max_message_size(usize::try_from(opts.max_row_bytes).unwrap_or(usize::MAX))
    // Text output must not depend on the server's defaults.
    .with_options("-c datestyle=ISO,YMD -c timezone=UTC -c intervalstyle=iso_8601 -c extra_float_digits=3 -c bytea_output=hex")
}

pub(crate) struct Session<'a> {
    client: ReplicationClient,
    opts: &'a ConnectOptions,
}

impl Session<'_> {
    pub(crate) fn opts(&self) -> &ConnectOptions {
        self.opts
    }

    pub(crate) async fn query(
        &mut self,
        sql: &str,
        what: &str,
    ) -> Result<Vec<Vec<Option<String>>>> {
        let rows = self
            .client
            .simple_query(sql)
            .await
            .map_err(|e| classify(e, what, &self.opts.pg.user))?;
        Ok(rows
            .into_iter()
            .map(|row| {
                row.into_iter()
                    .map(|v: Option<Bytes>| v.map(|b| String::from_utf8_lossy(&b).into_owned()))
                    .collect()
            })
            .collect())
    }
}

fn lsn(s: &str, what: &str) -> Result<Lsn> {
    s.parse::<Lsn>().map_err(|e| {
        Error::permanent(format!("server returned an invalid LSN {s:?} for {what}")).with_source(e)
    })
}

/// Opens the gated replication session (bounded by `connect_timeout_ms`) and
/// identifies the server.
pub(crate) async fn open_session(
    opts: &ConnectOptions,
) -> Result<(Session<'_>, pgwire_replication::IdentifySystem)> {
    let pg = &opts.pg;
    let target = format!("{}:{} (database {})", pg.host, pg.port, pg.database);
    let timeout = Duration::from_millis(pg.connect_timeout_ms);
    let client = tokio::time::timeout(
        timeout,
        ReplicationClient::connect_gated(replication_config(opts)),
    )
    .await
    .map_err(|_| {
        Error::retryable(format!(
            "connecting to Postgres at {target} timed out after {}ms",
            pg.connect_timeout_ms
        ))
        .with_hint("check postgres.host/port and the network; walcast retries with backoff")
    })?
    .map_err(|e| {
        classify(
            e,
            &format!("cannot connect to Postgres at {target} as {}", pg.user),
            &pg.user,
        )
    })?;
    let mut s = Session { client, opts };
    let system = s.client.identify_system().await.map_err(|e| {
        classify(
            e,
            &format!("cannot connect to Postgres at {target} as {}", pg.user),
            &pg.user,
        )
    })?;
    Ok((s, system))
}

/// Connects, checks `wal_level`, privileges, tables, publication and slot,
/// creates what is missing and allowed, then starts streaming at the slot's
/// confirmed flush LSN.
///
/// # Errors
/// Operator errors name the fix (wrong password, no REPLICATION attribute,
/// `wal_level`, missing table or column, slot state); retryable errors cover
/// an unreachable server and a slot briefly held by another connection.
pub async fn connect(opts: &ConnectOptions) -> Result<Connected> {
    let pg = &opts.pg;
    let target = format!("{}:{} (database {})", pg.host, pg.port, pg.database);
    let timeout = Duration::from_millis(pg.connect_timeout_ms);
    let (mut s, system) = open_session(opts).await?;
    let version = s
        .query("SHOW server_version_num", "reading server_version_num")
        .await?;
    let server_version_num: u32 = version
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let info = ServerInfo {
        system_identifier: system.system_id.clone(),
        timeline: system.timeline,
        server_version_num,
        xlogpos: Lsn::new(system.xlogpos.as_u64()),
    };

    // wal_level
    let wal = s.query("SHOW wal_level", "reading wal_level").await?;
    let wal_level = wal
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .unwrap_or_default();
    if wal_level != "logical" {
        return Err(Error::operator(format!(
            "Postgres at {target} runs with wal_level = {wal_level}; logical replication needs wal_level = logical"
        ))
        .with_hint("set wal_level = logical in postgresql.conf (ALTER SYSTEM SET wal_level = logical) and restart Postgres"));
    }

    // The server's ping interval is half of this session's wal_sender_timeout.
    let wst = s
        .query(
            "SELECT setting FROM pg_catalog.pg_settings WHERE name = 'wal_sender_timeout'",
            "reading wal_sender_timeout",
        )
        .await?;
    let wal_sender_timeout_ms: u64 = wst
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);

    let partitioned = check_tables(&mut s).await?;
    let partitions = list_partitions(&mut s, &partitioned).await?;
    ensure_publication(&mut s, &partitioned, server_version_num).await?;
    let catalog = crate::catalog::read_catalog(&mut s).await?;

    let slot_id = SlotIdentity {
        system_identifier: info.system_identifier.clone(),
        database: pg.database.clone(),
        slot: pg.slot.clone(),
    };
    let (start_lsn, created_slot) = ensure_slot(&mut s, &slot_id).await?;
    opts.state.save(&slot_id, start_lsn)?;

    let mut client = s.client;
    client.start().await.map_err(|e| {
        classify(
            e,
            &format!("START_REPLICATION on slot {} failed", pg.slot),
            &pg.user,
        )
    })?;
    tokio::time::timeout(timeout, client.wait_started())
        .await
        .map_err(|_| Error::retryable("START_REPLICATION was not confirmed in time"))?
        .map_err(|e| {
            classify(
                e,
                &format!("START_REPLICATION on slot {} failed", pg.slot),
                &pg.user,
            )
        })?;
    // Until the relay confirms more, report the slot's own position.
    client.update_applied_lsn(to_pgwire(start_lsn));
    let source = PgSource::new(
        client,
        pg.user.clone(),
        Duration::from_millis(pg.status_interval_ms),
        start_lsn,
        silence_timeout(wal_sender_timeout_ms),
    );
    Ok(Connected {
        source,
        start_lsn,
        info,
        slot: slot_id,
        created_slot,
        partitions,
        catalog,
    })
}

/// Checks that every outbox table exists with the required columns; returns
/// the partitioned ones.
async fn check_tables(s: &mut Session<'_>) -> Result<Vec<TableName>> {
    let cols = &s.opts.columns;
    let mut partitioned = Vec::new();
    for t in &s.opts.tables {
        let rows = s
            .query(
                &format!(
                    "SELECT a.attname, c.relkind FROM pg_catalog.pg_class c \
                     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                     LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                     WHERE n.nspname = {} AND c.relname = {} AND c.relkind IN ('r', 'p')",
                    quote_literal(&t.schema),
                    quote_literal(&t.name)
                ),
                "reading the outbox table's columns",
            )
            .await?;
        if rows.is_empty() {
            return Err(Error::operator(format!(
                "outbox table {t} does not exist in database {}",
                s.opts.pg.database
            ))
            .with_hint(format!(
                "create it (see README: the outbox table), or fix outbox.tables; walcast reads the columns {}, {}, {}, {}, {}",
                cols.id, cols.aggregatetype, cols.aggregateid, cols.r#type, cols.payload
            )));
        }
        if rows
            .first()
            .and_then(|r| r.get(1).cloned().flatten())
            .as_deref()
            == Some("p")
        {
            partitioned.push(t.clone());
        }
        let names: Vec<String> = rows
            .into_iter()
            .filter_map(|r| r.into_iter().next().flatten())
            .collect();
        for (opt, col) in [
            ("id", &cols.id),
            ("aggregatetype", &cols.aggregatetype),
            ("aggregateid", &cols.aggregateid),
            ("payload", &cols.payload),
        ] {
            if !names.iter().any(|n| n == col) {
                return Err(Error::operator(format!(
                    "outbox table {t} has no column {col:?} (the {opt} column)"
                ))
                .with_hint(format!(
                    "add it (ALTER TABLE {} ADD COLUMN {} ...) or set outbox.columns.{opt} to the column that holds it; the table has: {}",
                    quote_table(t),
                    quote_ident(col),
                    names.join(", ")
                )));
            }
        }
    }
    Ok(partitioned)
}

/// Every partition (at any depth) of the partitioned outbox tables, with its
/// outbox table: their rows are events of that table even when published
/// under the partition's own name (WAL written before the publication was
/// switched to `publish_via_partition_root`).
async fn list_partitions(
    s: &mut Session<'_>,
    partitioned: &[TableName],
) -> Result<Vec<(TableName, TableName)>> {
    let mut out = Vec::new();
    for root in partitioned {
        // The catalogs only: walcast's role may lack USAGE on the schema.
        let rows = s
            .query(
                &format!(
                    "WITH RECURSIVE tree(relid) AS ( \
                       SELECT c.oid FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                       WHERE n.nspname = {} AND c.relname = {} \
                       UNION ALL SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree t ON i.inhparent = t.relid) \
                     SELECT n.nspname, c.relname FROM tree t \
                     JOIN pg_catalog.pg_class c ON c.oid = t.relid \
                     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                     WHERE NOT (n.nspname = {} AND c.relname = {})",
                    quote_literal(&root.schema),
                    quote_literal(&root.name),
                    quote_literal(&root.schema),
                    quote_literal(&root.name)
                ),
                "listing the outbox table's partitions",
            )
            .await?;
        for r in rows {
            if let (Some(schema), Some(name)) =
                (r.first().cloned().flatten(), r.get(1).cloned().flatten())
            {
                out.push((TableName { schema, name }, root.clone()));
            }
        }
    }
    Ok(out)
}

/// Creates the publication, or checks an existing one: it must publish
/// INSERTs of exactly the outbox tables (rule 5a: walcast stops at a row of
/// any other relation, so a publication of more tables would stop it), and
/// publish partitioned outbox tables via their root.
async fn ensure_publication(
    s: &mut Session<'_>,
    partitioned: &[TableName],
    server_version_num: u32,
) -> Result<()> {
    let pg = &s.opts.pg;
    let name = quote_literal(&pg.publication);
    let tables_sql = s
        .opts
        .tables
        .iter()
        .map(quote_table)
        .collect::<Vec<_>>()
        .join(", ");
    let rows = s
        .query(
            &format!("SELECT pubinsert, puballtables, pubviaroot FROM pg_catalog.pg_publication WHERE pubname = {name}"),
            "reading the publication",
        )
        .await?;
    let create_sql = format!(
        "CREATE PUBLICATION {} FOR TABLE {tables_sql} WITH (publish = 'insert', publish_via_partition_root = true)",
        quote_ident(&pg.publication)
    );
    let Some(row) = rows.into_iter().next() else {
        if !pg.create_publication {
            return Err(Error::operator(format!("publication {} does not exist", pg.publication))
                .with_hint(format!("create it as the tables' owner: {create_sql}; or set postgres.create_publication = true")));
        }
        s.query(&create_sql, "creating the publication").await.map_err(|e| {
            Error::operator(format!(
                "cannot create publication {}: {}",
                pg.publication,
                e.message()
            ))
            .with_hint(format!(
                "run as the owner of the outbox tables: {create_sql}; walcast's role only needs REPLICATION once it exists"
            ))
        })?;
        tracing::info!(publication = %pg.publication, tables = %tables_sql, "created publication (publish = 'insert', publish_via_partition_root = true)");
        return Ok(());
    };
    let publication = quote_ident(&pg.publication);
    if row.first().cloned().flatten().as_deref() != Some("t") {
        return Err(Error::operator(format!(
            "publication {} does not publish INSERTs",
            pg.publication
        ))
        .with_hint(format!(
            "ALTER PUBLICATION {} SET (publish = 'insert')",
            quote_ident(&pg.publication)
        )));
    }
    if row.get(1).cloned().flatten().as_deref() == Some("t") {
        return Err(Error::operator(format!(
            "publication {} is FOR ALL TABLES; walcast needs a publication of only its outbox tables",
            pg.publication
        ))
        .with_hint(format!(
            "walcast stops at a change of any table it does not relay (so a renamed or swapped outbox is never mistaken for another table). \
             Give walcast its own publication: set postgres.publication to a new name (walcast creates it), or as the tables' owner: {create_sql}"
        )));
    }
    if server_version_num >= 150_000 {
        let schemas = s
            .query(
                &format!(
                    "SELECT n.nspname FROM pg_catalog.pg_publication_namespace pn \
                     JOIN pg_catalog.pg_publication p ON p.oid = pn.pnpubid \
                     JOIN pg_catalog.pg_namespace n ON n.oid = pn.pnnspid WHERE p.pubname = {name}"
                ),
                "reading the publication's schemas",
            )
            .await?;
        if let Some(schema) = schemas.first().and_then(|r| r.first().cloned().flatten()) {
            return Err(Error::operator(format!(
                "publication {} publishes every table of schema {schema} (FOR TABLES IN SCHEMA); walcast needs a publication of only its outbox tables",
                pg.publication
            ))
            .with_hint(format!(
                "give walcast its own publication: set postgres.publication to a new name (walcast creates it), or as the tables' owner: {create_sql}"
            )));
        }
    }
    if !partitioned.is_empty() && row.get(2).cloned().flatten().as_deref() != Some("t") {
        let list = partitioned
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        return Err(Error::operator(format!(
            "publication {} publishes the partitioned outbox table(s) {list} under their partitions' names (publish_via_partition_root = false)",
            pg.publication
        ))
        .with_hint(format!(
            "as the publication's owner: ALTER PUBLICATION {publication} SET (publish_via_partition_root = true); then start walcast again. \
             (Rows already written under the partitions' names are still relayed as events of their outbox table.)"
        )));
    }
    let published = s
        .query(
            &format!("SELECT schemaname, tablename FROM pg_catalog.pg_publication_tables WHERE pubname = {name}"),
            "reading the publication's tables",
        )
        .await?;
    let configured: std::collections::HashSet<(&str, &str)> = s
        .opts
        .tables
        .iter()
        .map(|t| (t.schema.as_str(), t.name.as_str()))
        .collect();
    let extra: Vec<TableName> = published
        .iter()
        .filter_map(|r| {
            Some(TableName {
                schema: r.first().cloned().flatten()?,
                name: r.get(1).cloned().flatten()?,
            })
        })
        .filter(|t| !configured.contains(&(t.schema.as_str(), t.name.as_str())))
        .collect();
    if !extra.is_empty() {
        let list = extra
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let quoted = extra.iter().map(quote_table).collect::<Vec<_>>().join(", ");
        return Err(Error::operator(format!(
            "publication {} also publishes {list}, which {} not in outbox.tables",
            pg.publication,
            if extra.len() == 1 { "is" } else { "are" }
        ))
        .with_hint(format!(
            "walcast stops at a change of any table it does not relay. If {list} should be relayed, add it to outbox.tables; \
             otherwise, as the publication's owner: ALTER PUBLICATION {publication} DROP TABLE {quoted}; or give walcast its own publication"
        )));
    }
    for t in &s.opts.tables {
        let found = published.iter().any(|r| {
            r.first().cloned().flatten().as_deref() == Some(t.schema.as_str())
                && r.get(1).cloned().flatten().as_deref() == Some(t.name.as_str())
        });
        if !found {
            return Err(Error::operator(format!(
                "publication {} does not include outbox table {t}",
                pg.publication
            ))
            .with_hint(format!(
                "ALTER PUBLICATION {} ADD TABLE {} (as the table's owner)",
                quote_ident(&pg.publication),
                quote_table(t)
            )));
        }
    }
    Ok(())
}

struct SlotRow {
    plugin: Option<String>,
    slot_type: Option<String>,
    database: Option<String>,
    active: bool,
    active_pid: Option<String>,
    wal_status: Option<String>,
    confirmed_flush_lsn: Option<String>,
}

async fn read_slot(s: &mut Session<'_>) -> Result<Option<SlotRow>> {
    let rows = s
        .query(
            &format!(
                "SELECT plugin, slot_type, database, active, active_pid, wal_status, confirmed_flush_lsn \
                 FROM pg_catalog.pg_replication_slots WHERE slot_name = {}",
                quote_literal(&s.opts.pg.slot)
            ),
            "reading the replication slot",
        )
        .await?;
    Ok(rows.into_iter().next().map(|r| {
        let g = |i: usize| r.get(i).cloned().flatten();
        SlotRow {
            plugin: g(0),
            slot_type: g(1),
            database: g(2),
            active: g(3).as_deref() == Some("t"),
            active_pid: g(4),
            wal_status: g(5),
            confirmed_flush_lsn: g(6),
        }
    }))
}

fn gap_error(slot: &str, what: &str, last: &str) -> Error {
    Error::operator(format!(
        "replication slot {slot} {what} after walcast confirmed positions on it (last confirmed {last}). \
         Changes committed after that position may never have reached Kafka, and Postgres no longer has them"
    ))
    .with_hint(format!(
        "walcast will not silently start over. Reconcile the outbox rows committed after {last} with Kafka, then run \
         `walcast slot accept-gap --config <file>` to accept the gap; the next `walcast run` creates a new slot at the current position"
    ))
}

async fn ensure_slot(s: &mut Session<'_>, id: &SlotIdentity) -> Result<(Lsn, bool)> {
    let pg = s.opts.pg.clone();
    let record = s.opts.state.load(id)?;
    let wait_until = tokio::time::Instant::now() + Duration::from_millis(pg.slot_wait_timeout_ms);
    loop {
        let slot = read_slot(s).await?;
        let Some(slot) = slot else {
            if let Some(rec) = &record {
                return Err(gap_error(&pg.slot, "no longer exists", &rec.confirmed_lsn));
            }
            if !pg.create_slot {
                return Err(Error::operator(format!("replication slot {} does not exist", pg.slot))
                    .with_hint(format!(
                        "create it: SELECT pg_create_logical_replication_slot({}, 'pgoutput'); or set postgres.create_slot = true",
                        quote_literal(&pg.slot)
                    )));
            }
            let rows = s
                .query(
                    &format!(
                        "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput NOEXPORT_SNAPSHOT",
                        quote_ident(&pg.slot)
                    ),
                    "creating the replication slot",
                )
                .await?;
            let point = rows
                .first()
                .and_then(|r| r.get(1).cloned().flatten())
                .ok_or_else(|| {
                    Error::permanent("CREATE_REPLICATION_SLOT returned no consistent point")
                })?;
            let start = lsn(&point, "the new slot's consistent point")?;
            tracing::info!(slot = %pg.slot, lsn = %start, "created replication slot (pgoutput)");
            return Ok((start, true));
        };
        if slot.slot_type.as_deref() != Some("logical")
            || slot.plugin.as_deref() != Some("pgoutput")
        {
            return Err(Error::operator(format!(
                "replication slot {} exists but is a {} slot with plugin {}; walcast needs a logical slot with pgoutput",
                pg.slot,
                slot.slot_type.as_deref().unwrap_or("?"),
                slot.plugin.as_deref().unwrap_or("none")
            ))
            .with_hint("choose another postgres.slot name, or drop that slot if nothing else uses it"));
        }
        if slot.database.as_deref() != Some(pg.database.as_str()) {
            return Err(Error::operator(format!(
                "replication slot {} belongs to database {}, not {}",
                pg.slot,
                slot.database.as_deref().unwrap_or("?"),
                pg.database
            ))
            .with_hint("choose another postgres.slot name"));
        }
        if slot.wal_status.as_deref() == Some("lost") {
            let last = record
                .as_ref()
                .map(|r| r.confirmed_lsn.clone())
                .or(slot.confirmed_flush_lsn.clone())
                .unwrap_or_else(|| "unknown".into());
            return Err(gap_error(
                &pg.slot,
                "was invalidated (wal_status = lost: the WAL it needed was removed, see max_slot_wal_keep_size)",
                &last,
            ));
        }
        if slot.active {
            if tokio::time::Instant::now() >= wait_until {
                return Err(Error::operator(format!(
                    "replication slot {} is in use by another connection (pid {})",
                    pg.slot,
                    slot.active_pid.as_deref().unwrap_or("?")
                ))
                .with_hint("only one walcast may read a slot: stop the other instance, or give this one its own postgres.slot; see pg_stat_replication for who holds it"));
            }
            tracing::info!(slot = %pg.slot, pid = ?slot.active_pid, "slot is in use by another connection; waiting");
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        let confirmed = slot.confirmed_flush_lsn.ok_or_else(|| {
            Error::permanent(format!("slot {} has no confirmed_flush_lsn", pg.slot))
        })?;
        return Ok((lsn(&confirmed, "the slot's confirmed_flush_lsn")?, false));
    }
}

/// Accepts a gap on a dropped or invalidated slot: drops the slot if it is
/// invalidated and forgets walcast's record of it, so the next run starts a
/// new slot at the current position. Returns what was done.
///
/// # Errors
/// When the server cannot be reached or the slot cannot be dropped.
pub async fn accept_slot_gap(opts: &ConnectOptions) -> Result<String> {
    let pg = &opts.pg;
    let (mut s, system) = open_session(opts).await?;
    let id = SlotIdentity {
        system_identifier: system.system_id.clone(),
        database: pg.database.clone(),
        slot: pg.slot.clone(),
    };
    let mut done = Vec::new();
    if let Some(slot) = read_slot(&mut s).await? {
        if slot.wal_status.as_deref() == Some("lost") {
            s.query(
                &format!("DROP_REPLICATION_SLOT {}", quote_ident(&pg.slot)),
                "dropping the invalidated slot",
            )
            .await?;
            done.push(format!("dropped invalidated slot {}", pg.slot));
        } else {
            done.push(format!("slot {} exists and is valid (kept)", pg.slot));
        }
    }
    let last = opts.state.load(&id)?.map(|r| r.confirmed_lsn);
    if opts.state.forget(&id)? {
        done.push(format!(
            "forgot walcast's record of slot {} (last confirmed {})",
            pg.slot,
            last.unwrap_or_default()
        ));
    }
    if done.is_empty() {
        done.push("nothing to do: no record and no slot".into());
    }
    Ok(done.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_connection_is_dead_after_three_missed_pings() {
        assert_eq!(silence_timeout(10_000), Some(Duration::from_secs(15)));
        assert_eq!(silence_timeout(60_000), Some(Duration::from_secs(90)));
        assert_eq!(silence_timeout(0), None, "no pings, no timeout");
        assert!(
            IDLE_WAKEUP > Duration::from_secs(60),
            "the server must ping first"
        );
    }
}
