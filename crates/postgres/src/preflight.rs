//! Connecting, checking the setup, and positioning on the slot.

use std::time::Duration;

use bytes::Bytes;
use pgwire_replication::{ReplicationClient, ReplicationConfig, TlsConfig};
use walcast_core::config::{KeyHash, PostgresConfig, Secret, SslMode, TableName};
use walcast_core::state::{BackendId, SlotKey, SlotRecord};
use walcast_core::{Error, Result};
use walcast_pgoutput::Lsn;

use crate::classify;
use crate::gate::{spawn_writer, Gate};
use crate::source::{from_pgwire, to_pgwire, PgSource};
use crate::sql::{quote_ident, quote_literal, quote_table};
use crate::state::{decide, Plan, ServerIdentity, SlotFacts, SlotState};

/// What to connect to and check.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// `[postgres]`
    pub pg: PostgresConfig,
    /// The resolved password.
    pub password: Option<Secret>,
    /// Outbox tables.
    pub tables: Vec<TableName>,
    /// The columns each outbox table must have: `(table, [(option, column)])`
    /// (from `walcast_core::route::Routes::required_columns`).
    pub columns: Vec<(TableName, Vec<(String, String)>)>,
    /// Each outbox table's key column (from
    /// `walcast_core::route::Routes::key_columns`): what a key-hash split
    /// (`pg.key_hash`) filters the publication's rows by.
    pub keys: Vec<(TableName, String)>,
    /// Where walcast's slot records live, and this process's sessions.
    pub state: SlotState,
    /// `pipeline.max_row_bytes`: the largest replication message accepted.
    pub max_row_bytes: u64,
    /// Where streamed transactions (`pg.streaming`) spill past
    /// `pg.stream_memory_bytes`: unnamed temporary files, gone when closed.
    pub spill_dir: std::path::PathBuf,
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
    /// The slot's key (for the state record).
    pub slot: SlotKey,
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
    // Protocol 2 with streaming (crate::stream), or protocol 1.
    .with_streaming(pg.streaming)
    // Text output must not depend on the server's defaults.
    .with_options("-c datestyle=ISO,YMD -c timezone=UTC -c intervalstyle=iso_8601 -c extra_float_digits=3 -c bytea_output=hex")
}

pub(crate) struct Session<'a> {
    client: ReplicationClient,
    opts: &'a ConnectOptions,
}

impl<'a> Session<'a> {
    pub(crate) fn opts(&self) -> &'a ConnectOptions {
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

    /// The first column of the first row, if any.
    pub(crate) async fn query_value(&mut self, sql: &str, what: &str) -> Result<Option<String>> {
        Ok(self
            .query(sql, what)
            .await?
            .into_iter()
            .next()
            .and_then(|r| r.into_iter().next().flatten()))
    }

    /// `SHOW name`.
    pub(crate) async fn show(&mut self, name: &str) -> Result<Option<String>> {
        self.query_value(&format!("SHOW {name}"), &format!("reading {name}"))
            .await
    }

    /// `server_version_num` (0 if unreadable).
    pub(crate) async fn server_version_num(&mut self) -> Result<u32> {
        Ok(self
            .show("server_version_num")
            .await?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }
}

pub(crate) fn lsn(s: &str, what: &str) -> Result<Lsn> {
    s.parse::<Lsn>().map_err(|e| {
        Error::permanent(format!("server returned an invalid LSN {s:?} for {what}")).with_source(e)
    })
}

/// Opens the gated replication session (bounded by `connect_timeout_ms`) and
/// identifies the server.
/// `host:port (database d)`, as errors name the server.
pub(crate) fn target(pg: &PostgresConfig) -> String {
    format!("{}:{} (database {})", pg.host, pg.port, pg.database)
}

/// The refusal of a server whose `wal_level` is not `logical`.
pub(crate) fn wal_level_error(target: &str, wal_level: &str) -> Option<Error> {
    (wal_level != "logical").then(|| {
        Error::operator(format!(
            "Postgres at {target} runs with wal_level = {wal_level}; logical replication needs wal_level = logical"
        ))
        .with_hint("set wal_level = logical in postgresql.conf (ALTER SYSTEM SET wal_level = logical) and restart Postgres")
    })
}

pub(crate) async fn open_session(
    opts: &ConnectOptions,
) -> Result<(Session<'_>, pgwire_replication::IdentifySystem)> {
    let pg = &opts.pg;
    let target = target(pg);
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
    let target = target(pg);
    let timeout = Duration::from_millis(pg.connect_timeout_ms);
    let (mut s, system) = open_session(opts).await?;
    let server_version_num = s.server_version_num().await?;
    let info = ServerInfo {
        system_identifier: system.system_id.clone(),
        timeline: system.timeline,
        server_version_num,
        xlogpos: Lsn::new(system.xlogpos.as_u64()),
    };

    if pg.streaming && server_version_num != 0 && server_version_num < 140_000 {
        return Err(Error::operator(format!(
            "postgres.streaming = true needs PostgreSQL 14 or newer; {target} runs server_version_num {server_version_num}"
        ))
        .with_hint("set postgres.streaming = false (Postgres then sends large transactions when they commit)"));
    }
    let streams = if pg.streaming {
        std::fs::create_dir_all(&opts.spill_dir).map_err(|e| {
            Error::operator(format!(
                "cannot create the spill directory {} for streamed transactions: {e}",
                opts.spill_dir.display()
            ))
            .with_hint("point pipeline.state_dir at a writable directory, or set postgres.streaming = false")
        })?;
        Some(crate::stream::Streams::new(
            pg.stream_memory_bytes,
            opts.spill_dir.clone(),
        ))
    } else {
        None
    };

    // wal_level
    let wal_level = s.show("wal_level").await?.unwrap_or_default();
    if let Some(e) = wal_level_error(&target, &wal_level) {
        return Err(e);
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

    let key = SlotKey {
        database: pg.database.clone(),
        slot: pg.slot.clone(),
    };
    let session = own_session(&mut s).await?;
    opts.state.remember_session(session.clone());
    let server = ServerIdentity {
        system_identifier: info.system_identifier.clone(),
        timeline: info.timeline,
    };
    let (start_lsn, created_slot) = ensure_slot(
        &mut s,
        &key,
        &server,
        Duration::from_millis(wal_sender_timeout_ms),
    )
    .await?;
    // Written before anything streams: from now on a record exists, and it
    // allows reporting up to the start position.
    let record = SlotRecord {
        database: key.database.clone(),
        slot: key.slot.clone(),
        system_identifier: info.system_identifier.clone(),
        timeline: info.timeline,
        confirmed_upper: start_lsn,
        confirmed_lower: start_lsn,
        walsender: Some(session),
        application_name: pg.application_name.clone(),
        updated_at_unix: SlotRecord::now_unix(),
        origin: String::new(),
    };
    opts.state.save(record.clone()).await?;

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
    let status_interval = Duration::from_millis(pg.status_interval_ms);
    let gate = Gate::new(start_lsn);
    let metrics = client.metrics();
    let writer = spawn_writer(
        gate.clone(),
        opts.state.clone(),
        record,
        move || from_pgwire(metrics.last_applied_lsn()),
        status_interval,
    );
    let source = PgSource::new(
        client,
        pg.user.clone(),
        status_interval,
        start_lsn,
        silence_timeout(wal_sender_timeout_ms),
        gate,
        writer,
        streams,
    );
    Ok(Connected {
        source,
        start_lsn,
        info,
        slot: key,
        created_slot,
        partitions,
        catalog,
    })
}

/// Checks that every outbox table exists with the required columns; returns
/// the partitioned ones.
pub(crate) async fn check_tables(s: &mut Session<'_>) -> Result<Vec<TableName>> {
    let mut partitioned = Vec::new();
    for t in &s.opts.tables {
        let cols: Vec<(String, String)> = s
            .opts
            .columns
            .iter()
            .find(|(table, _)| table == t)
            .map(|(_, c)| c.clone())
            .unwrap_or_default();
        let rows = s
            .query(
                &format!(
                    "SELECT a.attname, c.relkind, a.attgenerated FROM pg_catalog.pg_class c \
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
                "create it (see README: the outbox table), or fix outbox.tables / [[outbox.route]]; walcast reads the columns {}",
                cols.iter().map(|(_, c)| c.as_str()).collect::<Vec<_>>().join(", ")
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
        // Generated columns are not in the replication stream (pgoutput
        // leaves them out before PostgreSQL 18, and from 18 on unless the
        // publication asks for them).
        let generated: Vec<String> = rows
            .iter()
            .filter(|r| r.get(2).cloned().flatten().is_some_and(|g| !g.is_empty()))
            .filter_map(|r| r.first().cloned().flatten())
            .collect();
        let names: Vec<String> = rows
            .into_iter()
            .filter_map(|r| r.into_iter().next().flatten())
            .collect();
        for (opt, col) in &cols {
            if generated.iter().any(|g| g == col) {
                return Err(Error::operator(format!(
                    "column {col:?} of outbox table {t} (named by {opt}) is a generated column, which logical replication does not carry: walcast would never see its value"
                ))
                .with_hint(format!(
                    "make it a plain column the application fills (or a BEFORE INSERT trigger sets): ALTER TABLE {} ALTER COLUMN {} DROP EXPRESSION; or set {opt} to a plain column",
                    quote_table(t),
                    quote_ident(col)
                )));
            }
        }
        // Every missing column at once, so one fix covers them.
        let missing: Vec<&(String, String)> = cols
            .iter()
            .filter(|(_, col)| !names.iter().any(|n| n == col))
            .collect();
        if !missing.is_empty() {
            let list = missing
                .iter()
                .map(|(opt, col)| format!("{col:?} (named by {opt})"))
                .collect::<Vec<_>>()
                .join(", ");
            // A quoted mixed-case name ("Id") is not the lower-case one.
            let other_case: Vec<String> = missing
                .iter()
                .filter_map(|(opt, col)| {
                    names
                        .iter()
                        .find(|n| n.eq_ignore_ascii_case(col))
                        .map(|n| format!("{opt} = {n:?}"))
                })
                .collect();
            let case_hint = if other_case.is_empty() {
                String::new()
            } else {
                format!(
                    "the table has such columns in another case (a quoted name keeps its case in PostgreSQL): set {}; ",
                    other_case.join(", ")
                )
            };
            return Err(Error::operator(format!(
                "outbox table {t} has no column {list}"
            ))
            .with_hint(format!(
                "{case_hint}add a missing column (ALTER TABLE {} ADD COLUMN {} ...) or set its option to the column that holds it; the table has: {}",
                quote_table(t),
                quote_ident(&missing[0].1),
                names.join(", ")
            )));
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

/// The SQL that creates walcast's publication of exactly the outbox tables
/// (each with its row filter from [`row_filters`]).
pub(crate) fn create_publication_sql(
    pg: &PostgresConfig,
    tables: &[TableName],
    filters: &[Option<String>],
) -> String {
    format!(
        "CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert', publish_via_partition_root = true)",
        quote_ident(&pg.publication),
        publication_tables_sql(tables, filters)
    )
}

/// Tables quoted and comma-separated, each followed by its row filter
/// (`WHERE (...)`) when it has one, for `FOR TABLE`/`SET TABLE`.
pub(crate) fn publication_tables_sql(tables: &[TableName], filters: &[Option<String>]) -> String {
    tables
        .iter()
        .enumerate()
        .map(|(i, t)| match filters.get(i) {
            Some(Some(f)) => format!("{} WHERE ({f})", quote_table(t)),
            _ => quote_table(t),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The row filter that keeps one share of a key-hash split: the rows whose
/// key column, hashed by `func` (one of PostgreSQL's built-in, immutable
/// hash functions, as publication row filters require), falls on
/// `h.remainder` modulo `h.modulus`. A NULL key counts as hash 0, so its row
/// reaches exactly one pipeline (which then reports it). The mask keeps the
/// hash non-negative without `abs`, which would overflow on `i32::MIN`.
pub(crate) fn key_hash_filter(func: &str, column: &str, h: KeyHash) -> String {
    format!(
        "((COALESCE({func}({}), 0) & 2147483647) % {}) = {}",
        quote_ident(column),
        h.modulus,
        h.remainder
    )
}

/// Whether the publication's row filter (`have`, deparsed) is the one
/// walcast needs (`want`, from [`row_filters`]).
pub(crate) fn same_filter(have: Option<&str>, want: Option<&str>) -> bool {
    match (have, want) {
        (None, None) => true,
        (Some(h), Some(w)) => filter_fingerprint(h) == filter_fingerprint(w),
        _ => false,
    }
}

/// A row filter as PostgreSQL deparses it (`pg_get_expr`), reduced to what
/// decides its meaning here: no spaces, parentheses, identifier quotes or
/// the implicit `::text` of a `varchar` key.
pub(crate) fn filter_fingerprint(filter: &str) -> String {
    filter
        .replace("::text", "")
        .chars()
        .filter(|c| !c.is_whitespace() && !matches!(c, '(' | ')' | '"'))
        .collect()
}

/// The row filter walcast's publication has on each outbox table, in
/// `opts.tables` order: none unless this pipeline is one share of a key-hash
/// split (`pg.key_hash`); then [`key_hash_filter`] on the table's key column,
/// with the hash function of its type.
///
/// # Errors
/// An operator error when the split needs what the server or table lacks:
/// PostgreSQL before 15 (no row filters) or a key column of a type without
/// a built-in hash function.
pub(crate) async fn row_filters(
    s: &mut Session<'_>,
    server_version_num: u32,
) -> Result<Vec<Option<String>>> {
    let opts = s.opts();
    let Some(h) = opts.pg.key_hash else {
        return Ok(vec![None; opts.tables.len()]);
    };
    let version = server_version_num;
    if version < 150_000 {
        return Err(Error::operator(format!(
            "pipeline {} splits its tables by key hash (hash_modulus = {}), which needs publication row filters: PostgreSQL 15 or newer; this server is {}",
            opts.pg.slot,
            h.modulus,
            version / 10_000
        ))
        .with_hint("upgrade Postgres, or split the outbox tables between the pipelines whole (remove hash_modulus and hash_remainder)"));
    }
    let mut out = Vec::with_capacity(opts.tables.len());
    for t in &opts.tables {
        let key = opts
            .keys
            .iter()
            .find(|(k, _)| k == t)
            .map(|(_, c)| c.clone())
            .ok_or_else(|| Error::permanent(format!("no key column known for outbox table {t}")))?;
        let typ = s
            .query_value(
                &format!(
                    "SELECT ty.typname FROM pg_catalog.pg_class c \
                     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                     JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                     JOIN pg_catalog.pg_type ty ON ty.oid = a.atttypid \
                     WHERE n.nspname = {} AND c.relname = {} AND a.attname = {}",
                    quote_literal(&t.schema),
                    quote_literal(&t.name),
                    quote_literal(&key)
                ),
                "reading the outbox table's key column type",
            )
            .await?;
        let func = match typ.as_deref() {
            Some("text" | "varchar") => "hashtext",
            Some("bpchar") => "hashbpchar",
            Some("uuid") => "uuid_hash",
            Some("int8") => "hashint8",
            Some("int4") => "hashint4",
            Some("int2") => "hashint2",
            other => {
                return Err(Error::operator(format!(
                    "pipeline {} splits {t} by the hash of its key column {key:?}, whose type {} has no built-in hash function a publication row filter may use",
                    opts.pg.slot,
                    other.unwrap_or("(unknown: no such column)")
                ))
                .with_hint("split by a key of type text, varchar, char, uuid, bigint, integer or smallint, or split the outbox tables between the pipelines whole (remove hash_modulus and hash_remainder)"))
            }
        };
        out.push(Some(key_hash_filter(func, &key, h)));
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
    let filters = row_filters(s, server_version_num).await?;
    let pg = &s.opts.pg;
    let create_sql = create_publication_sql(pg, &s.opts.tables, &filters);
    let Some(problems) = publication_problems(s, partitioned, server_version_num, &filters).await?
    else {
        let pg = &s.opts.pg;
        if !pg.create_publication {
            return Err(missing_publication_error(pg, &create_sql));
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
        let tables_sql = publication_tables_sql(&s.opts.tables, &filters);
        tracing::info!(publication = %pg.publication, tables = %tables_sql, "created publication (publish = 'insert', publish_via_partition_root = true)");
        return Ok(());
    };
    match problems.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The refusal of a missing publication walcast may not create.
pub(crate) fn missing_publication_error(pg: &PostgresConfig, create_sql: &str) -> Error {
    Error::operator(format!("publication {} does not exist", pg.publication)).with_hint(format!(
        "create it as the tables' owner: {create_sql}; or set postgres.create_publication = true"
    ))
}

/// What is wrong with the existing publication, in the order `run` reports
/// it (it refuses to start at the first); `None` when it does not exist.
/// `filters` are the row filters walcast needs ([`row_filters`]).
pub(crate) async fn publication_problems(
    s: &mut Session<'_>,
    partitioned: &[TableName],
    server_version_num: u32,
    filters: &[Option<String>],
) -> Result<Option<Vec<Error>>> {
    let pg = &s.opts.pg;
    let name = quote_literal(&pg.publication);
    let rows = s
        .query(
            &format!("SELECT pubinsert, puballtables, pubviaroot FROM pg_catalog.pg_publication WHERE pubname = {name}"),
            "reading the publication",
        )
        .await?;
    let Some(row) = rows.into_iter().next() else {
        return Ok(None);
    };
    let pg = &s.opts.pg;
    let create_sql = create_publication_sql(pg, &s.opts.tables, filters);
    let publication = quote_ident(&pg.publication);
    let mut problems = Vec::new();
    if row.first().cloned().flatten().as_deref() != Some("t") {
        problems.push(
            Error::operator(format!(
                "publication {} does not publish INSERTs",
                pg.publication
            ))
            .with_hint(format!(
                "ALTER PUBLICATION {} SET (publish = 'insert')",
                quote_ident(&pg.publication)
            )),
        );
    }
    if row.get(1).cloned().flatten().as_deref() == Some("t") {
        problems.push(Error::operator(format!(
            "publication {} is FOR ALL TABLES; walcast needs a publication of only its outbox tables",
            pg.publication
        ))
        .with_hint(format!(
            "walcast stops at a change of any table it does not relay (so a renamed or swapped outbox is never mistaken for another table). \
             Give walcast its own publication: set postgres.publication to a new name (walcast creates it), or as the tables' owner: {create_sql}"
        )));
        return Ok(Some(problems));
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
            let pg = &s.opts.pg;
            problems.push(Error::operator(format!(
                "publication {} publishes every table of schema {schema} (FOR TABLES IN SCHEMA); walcast needs a publication of only its outbox tables",
                pg.publication
            ))
            .with_hint(format!(
                "give walcast its own publication: set postgres.publication to a new name (walcast creates it), or as the tables' owner: {create_sql}"
            )));
            return Ok(Some(problems));
        }
    }
    let pg = &s.opts.pg;
    if !partitioned.is_empty() && row.get(2).cloned().flatten().as_deref() != Some("t") {
        let list = partitioned
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        problems.push(Error::operator(format!(
            "publication {} publishes the partitioned outbox table(s) {list} under their partitions' names (publish_via_partition_root = false)",
            pg.publication
        ))
        .with_hint(format!(
            "as the publication's owner: ALTER PUBLICATION {publication} SET (publish_via_partition_root = true); then start walcast again. \
             (Rows already written under the partitions' names are still relayed as events of their outbox table.)"
        )));
        // pg_publication_tables lists the partitions then, not the roots.
        return Ok(Some(problems));
    }
    // Row filters and column lists exist from PostgreSQL 15 on.
    let published = s
        .query(
            &if server_version_num >= 150_000 {
                // The table's own columns too: a column walcast needs that
                // the table lacks is the tables check's finding, not a
                // column list's.
                format!("SELECT schemaname, tablename, rowfilter, attnames, \
                         (SELECT array_agg(a.attname) FROM pg_catalog.pg_attribute a \
                          JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
                          JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                          WHERE n.nspname = schemaname AND c.relname = tablename \
                          AND a.attnum > 0 AND NOT a.attisdropped) \
                         FROM pg_catalog.pg_publication_tables WHERE pubname = {name}")
            } else {
                format!("SELECT schemaname, tablename FROM pg_catalog.pg_publication_tables WHERE pubname = {name}")
            },
            "reading the publication's tables",
        )
        .await?;
    let pg = &s.opts.pg;
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
        problems.push(Error::operator(format!(
            "publication {} also publishes {list}, which {} not in outbox.tables",
            pg.publication,
            if extra.len() == 1 { "is" } else { "are" }
        ))
        .with_hint(format!(
            "walcast stops at a change of any table it does not relay. If {list} should be relayed, add it to outbox.tables; \
             otherwise, as the publication's owner: ALTER PUBLICATION {publication} DROP TABLE {quoted}; or give walcast its own publication"
        )));
    }
    let all_tables = publication_tables_sql(&s.opts.tables, filters);
    for (i, t) in s.opts.tables.iter().enumerate() {
        let Some(row) = published.iter().find(|r| {
            r.first().cloned().flatten().as_deref() == Some(t.schema.as_str())
                && r.get(1).cloned().flatten().as_deref() == Some(t.name.as_str())
        }) else {
            problems.push(
                Error::operator(format!(
                    "publication {} does not include outbox table {t}",
                    pg.publication
                ))
                .with_hint(format!(
                    "ALTER PUBLICATION {} ADD TABLE {} (as the table's owner)",
                    quote_ident(&pg.publication),
                    publication_tables_sql(std::slice::from_ref(t), &filters[i..=i])
                )),
            );
            continue;
        };
        let have = row.get(2).cloned().flatten();
        let want = filters.get(i).cloned().flatten();
        if !same_filter(have.as_deref(), want.as_deref()) {
            let what = match (&have, pg.key_hash) {
                (Some(h), None) => format!(
                    "publication {} filters the rows of outbox table {t} (WHERE {h}): the rows it leaves out would never be relayed",
                    pg.publication
                ),
                (have, Some(k)) => format!(
                    "publication {} does not filter outbox table {t} to this pipeline's share of the key hash (hash_modulus = {}, hash_remainder = {}){}: it would relay other pipelines' rows or miss some of its own",
                    pg.publication,
                    k.modulus,
                    k.remainder,
                    have.as_ref().map(|h| format!(" but WHERE {h}")).unwrap_or_default()
                ),
                (None, None) => unreachable!("equal filters"),
            };
            problems.push(Error::operator(what).with_hint(format!(
                "as the publication's owner: ALTER PUBLICATION {publication} SET TABLE {all_tables} (or `walcast publication sync`). \
                 If the pipelines' hash split changed, their slots stand at different positions: see README \"Several pipelines\" before changing it"
            )));
        }
        // A column list must keep every column walcast reads.
        if let Some(attnames) = row.get(3).cloned().flatten() {
            let names = |list: &str| -> Vec<String> {
                list.trim_matches(|c| c == '{' || c == '}')
                    .split(',')
                    .map(|c| c.trim_matches('"').to_string())
                    .collect()
            };
            let published = names(&attnames);
            let in_table = row.get(4).cloned().flatten().map(|l| names(&l));
            let needed = s
                .opts
                .columns
                .iter()
                .find(|(table, _)| table == t)
                .map(|(_, c)| c.as_slice())
                .unwrap_or_default();
            let left_out: Vec<&str> = needed
                .iter()
                .filter(|(_, c)| !published.iter().any(|p| p == c))
                .filter(|(_, c)| in_table.as_ref().is_none_or(|cols| cols.contains(c)))
                .map(|(_, c)| c.as_str())
                .collect();
            if !left_out.is_empty() {
                problems.push(Error::operator(format!(
                    "publication {} publishes only some columns of outbox table {t} and leaves out {}, which walcast reads",
                    pg.publication,
                    left_out.join(", ")
                ))
                .with_hint(format!(
                    "as the publication's owner: ALTER PUBLICATION {publication} SET TABLE {all_tables} (or `walcast publication sync`)"
                )));
            }
        }
    }
    Ok(Some(problems))
}

/// A row of `pg_replication_slots`.
#[derive(Debug, Clone)]
pub(crate) struct SlotRow {
    pub(crate) plugin: Option<String>,
    pub(crate) slot_type: Option<String>,
    pub(crate) database: Option<String>,
    pub(crate) active: bool,
    pub(crate) active_pid: Option<String>,
    pub(crate) wal_status: Option<String>,
    pub(crate) confirmed_flush_lsn: Option<String>,
}

pub(crate) async fn read_slot(s: &mut Session<'_>) -> Result<Option<SlotRow>> {
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

/// `backend_start` as microseconds since the epoch (text): the same for
/// every session whatever its DateStyle.
const BACKEND_START_US: &str = "(extract(epoch from a.backend_start) * 1000000)::bigint::text";

/// This replication session's identity (its walsender once streaming).
async fn own_session(s: &mut Session<'_>) -> Result<BackendId> {
    let rows = s
        .query(
            &format!(
                "SELECT a.pid, {BACKEND_START_US} FROM pg_catalog.pg_stat_activity a WHERE a.pid = pg_catalog.pg_backend_pid()"
            ),
            "reading this session's pid",
        )
        .await?;
    let row = rows.into_iter().next().unwrap_or_default();
    let pid = row
        .first()
        .cloned()
        .flatten()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| Error::permanent("pg_stat_activity does not show walcast's own session"))?;
    Ok(BackendId {
        pid,
        backend_start: row.get(1).cloned().flatten().unwrap_or_default(),
    })
}

/// The session holding the slot, as `pg_stat_activity` and
/// `pg_stat_replication` show it.
#[derive(Debug, Clone)]
struct Holder {
    id: BackendId,
    application_name: String,
    /// `pg_stat_replication.reply_time` (µs since the epoch, the client's clock).
    reply_time: Option<String>,
    /// Milliseconds since that reply by the server's clock.
    reply_age_ms: Option<i64>,
}

async fn read_holder(s: &mut Session<'_>, pid: i32) -> Result<Option<Holder>> {
    let rows = s
        .query(
            &format!(
                "SELECT a.pid, {BACKEND_START_US}, a.application_name, \
                 (extract(epoch from r.reply_time) * 1000000)::bigint::text, \
                 (extract(epoch from (pg_catalog.clock_timestamp() - r.reply_time)) * 1000)::bigint \
                 FROM pg_catalog.pg_stat_activity a LEFT JOIN pg_catalog.pg_stat_replication r ON r.pid = a.pid \
                 WHERE a.pid = {pid}"
            ),
            "reading the session that holds the slot",
        )
        .await?;
    Ok(rows.into_iter().next().map(|r| {
        let g = |i: usize| r.get(i).cloned().flatten();
        Holder {
            id: BackendId {
                pid,
                backend_start: g(1).unwrap_or_default(),
            },
            application_name: g(2).unwrap_or_default(),
            reply_time: g(3),
            reply_age_ms: g(4).and_then(|v| v.parse().ok()),
        }
    }))
}

async fn terminate(s: &mut Session<'_>, pid: i32) -> Result<bool> {
    let rows = s
        .query(
            &format!("SELECT pg_catalog.pg_terminate_backend({pid})"),
            "ending a stale replication session",
        )
        .await?;
    Ok(rows
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .as_deref()
        == Some("t"))
}

/// Extra time on top of `wal_sender_timeout` that walcast waits for a
/// stale walsender of its own previous process.
const STALE_MARGIN: Duration = Duration::from_secs(5);

/// What one look at the session holding the slot showed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Observation {
    /// `pg_stat_replication.reply_time`: `None` when not visible (it is
    /// shown only to superusers and members of `pg_read_all_stats`).
    reply_time: Option<String>,
    /// Milliseconds since that reply, by the server's clock.
    reply_age_ms: Option<i64>,
    /// The slot's `confirmed_flush_lsn` (moves when the holder reports progress).
    slot_position: Option<String>,
}

/// A walsender of walcast's previous process that holds the slot, watched
/// from the first look on.
#[derive(Debug)]
struct StaleWatch {
    id: BackendId,
    first: Observation,
    since: tokio::time::Instant,
    alive: bool,
}

/// What to do about the session holding the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HolderAction {
    /// This process streamed on it before: end it (a reconnect after a
    /// network failure the server has not noticed yet).
    EndOwnSession,
    /// walcast's previous process streamed on it and it has been silent
    /// towards the server for longer than `wal_sender_timeout`: end it.
    EndStaleSession,
    /// walcast's previous process streamed on it and it may be dead: wait
    /// (also past `slot_wait_timeout_ms`) for the server to end it.
    WaitForServer,
    /// Another holder, or one that is alive: the usual wait, then exit 2.
    Usual,
}

/// Judges the holder of the slot from one more look. Pure, so every branch
/// has a unit test. `watch` carries what earlier looks saw; it is reset when
/// the holder changes.
fn judge_holder(
    own: bool,
    previous_walcast: Option<&BackendId>,
    look: &Observation,
    watch: &mut Option<StaleWatch>,
    now: tokio::time::Instant,
    wal_sender_timeout: Duration,
) -> HolderAction {
    if own {
        return HolderAction::EndOwnSession;
    }
    // wal_sender_timeout = 0: the server never ends a dead session, and
    // walcast cannot tell a dead one from a quiet live one.
    let Some(id) = previous_walcast.filter(|_| !wal_sender_timeout.is_zero()) else {
        return HolderAction::Usual;
    };
    let w = match watch {
        Some(w) if w.id == *id => w,
        _ => watch.insert(StaleWatch {
            id: id.clone(),
            first: look.clone(),
            since: now,
            alive: false,
        }),
    };
    // Any sign of life: a new reply, or the slot moved (the holder reported progress).
    if look.reply_time != w.first.reply_time || look.slot_position != w.first.slot_position {
        w.alive = true;
    }
    if w.alive {
        return HolderAction::Usual;
    }
    let limit_ms = wal_sender_timeout.as_millis() as i64;
    if look.reply_time.is_some()
        && now - w.since > wal_sender_timeout
        && look.reply_age_ms.is_some_and(|ms| ms > limit_ms)
    {
        return HolderAction::EndStaleSession;
    }
    if now < w.since + wal_sender_timeout + STALE_MARGIN {
        return HolderAction::WaitForServer;
    }
    HolderAction::Usual
}

/// What to do when the slot is still active but `pg_stat_replication` has
/// no row for its holder: while walcast watches its previous, silent
/// session, that is the server ending it (a walsender leaves
/// `pg_stat_replication` a moment before it releases the slot), so keep
/// waiting for the slot to come free instead of counting it as another
/// instance.
fn holder_gone(
    watch: Option<&StaleWatch>,
    now: tokio::time::Instant,
    wal_sender_timeout: Duration,
) -> HolderAction {
    match watch {
        Some(w) if !w.alive && now < w.since + wal_sender_timeout + STALE_MARGIN => {
            HolderAction::WaitForServer
        }
        _ => HolderAction::Usual,
    }
}

/// Positions on the slot (creating it when allowed and nothing speaks
/// against it); returns the start LSN and whether it was created.
///
/// A slot held by another session is waited for up to
/// `slot_wait_timeout_ms`, except (see [`judge_holder`]):
/// - held by a replication session this process streamed on before (a
///   reconnect after a network failure that the server did not notice yet):
///   that session is ended at once;
/// - held by the session recorded as walcast's last one, with walcast's
///   application name (this process restarted after a network failure): it
///   is watched; if it shows a sign of life (a reply, the slot moving) it is
///   another instance and the usual wait applies; otherwise walcast waits up
///   to `wal_sender_timeout` + a margin (the server ends a dead one by then),
///   and ends it itself only when `pg_stat_replication` shows it silent for
///   longer than `wal_sender_timeout`.
///
/// walcast's records are read again after the slot was seen free, so the
/// decision never compares the slot with a record older than the slot's
/// position.
/// Creates the logical slot (pgoutput); returns its consistent point.
pub(crate) async fn create_slot(s: &mut Session<'_>, slot: &str) -> Result<Lsn> {
    let rows = s
        .query(
            &format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput NOEXPORT_SNAPSHOT",
                quote_ident(slot)
            ),
            "creating the replication slot",
        )
        .await?;
    let point = rows
        .first()
        .and_then(|r| r.get(1).cloned().flatten())
        .ok_or_else(|| Error::permanent("CREATE_REPLICATION_SLOT returned no consistent point"))?;
    let start = lsn(&point, "the new slot's consistent point")?;
    tracing::info!(slot = %slot, lsn = %start, "created replication slot (pgoutput)");
    Ok(start)
}

/// The refusal of a missing slot walcast may not create.
pub(crate) fn missing_slot_error(pg: &PostgresConfig) -> Error {
    Error::operator(format!("replication slot {} does not exist", pg.slot)).with_hint(format!(
        "create it: SELECT pg_create_logical_replication_slot({}, 'pgoutput'); or set postgres.create_slot = true",
        quote_literal(&pg.slot)
    ))
}

/// What makes an existing slot unusable for walcast: another kind of slot,
/// another database, or invalidated (a gap). `record` is walcast's record of
/// the slot, for the last confirmed position the gap error names.
pub(crate) fn slot_problem(
    pg: &PostgresConfig,
    slot: &SlotRow,
    record: Option<&SlotRecord>,
) -> Option<Error> {
    if slot.slot_type.as_deref() != Some("logical") || slot.plugin.as_deref() != Some("pgoutput") {
        return Some(Error::operator(format!(
            "replication slot {} exists but is a {} slot with plugin {}; walcast needs a logical slot with pgoutput",
            pg.slot,
            slot.slot_type.as_deref().unwrap_or("?"),
            slot.plugin.as_deref().unwrap_or("none")
        ))
        .with_hint("choose another postgres.slot name, or drop that slot if nothing else uses it"));
    }
    if slot.database.as_deref() != Some(pg.database.as_str()) {
        return Some(
            Error::operator(format!(
                "replication slot {} belongs to database {}, not {}",
                pg.slot,
                slot.database.as_deref().unwrap_or("?"),
                pg.database
            ))
            .with_hint("choose another postgres.slot name"),
        );
    }
    if slot.wal_status.as_deref() == Some("lost") {
        let what = "was invalidated (wal_status = lost: the WAL it needed was removed, see max_slot_wal_keep_size)";
        return Some(match record {
            Some(r) => crate::state::gap_error(&pg.slot, what, r.confirmed_upper, &r.origin),
            None => crate::state::gap_error(
                &pg.slot,
                what,
                slot.confirmed_flush_lsn
                    .as_deref()
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(Lsn::ZERO),
                "the slot itself",
            ),
        });
    }
    None
}

async fn ensure_slot(
    s: &mut Session<'_>,
    key: &SlotKey,
    server: &ServerIdentity,
    wal_sender_timeout: Duration,
) -> Result<(Lsn, bool)> {
    let pg = s.opts.pg.clone();
    let wait_until = tokio::time::Instant::now() + Duration::from_millis(pg.slot_wait_timeout_ms);
    // The records as of the first time the slot was seen held (whose walsender).
    let mut held_records: Option<Vec<SlotRecord>> = None;
    let mut watch: Option<StaleWatch> = None;
    let mut announced: Option<HolderAction> = None;
    loop {
        let slot = read_slot(s).await?;
        if let Some(slot) = &slot {
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
            if slot.active && slot.wal_status.as_deref() != Some("lost") {
                if announced.is_none() {
                    tracing::info!(slot = %pg.slot, pid = slot.active_pid.as_deref().unwrap_or("?"), "slot is in use by another connection; waiting");
                    announced = Some(HolderAction::Usual);
                }
                if held_records.is_none() {
                    held_records = Some(s.opts.state.load(key).await?);
                }
                let records = held_records.as_deref().unwrap_or_default();
                let pid: Option<i32> = slot.active_pid.as_deref().and_then(|p| p.parse().ok());
                let holder = match pid {
                    Some(pid) => read_holder(s, pid).await?,
                    None => None,
                };
                let now = tokio::time::Instant::now();
                let action = match &holder {
                    None => holder_gone(watch.as_ref(), now, wal_sender_timeout),
                    Some(h) => {
                        let previous = (h.application_name == pg.application_name
                            && records.iter().any(|r| r.walsender.as_ref() == Some(&h.id)))
                        .then_some(&h.id);
                        let look = Observation {
                            reply_time: h.reply_time.clone(),
                            reply_age_ms: h.reply_age_ms,
                            slot_position: slot.confirmed_flush_lsn.clone(),
                        };
                        judge_holder(
                            s.opts.state.is_own_session(&h.id),
                            previous,
                            &look,
                            &mut watch,
                            now,
                            wal_sender_timeout,
                        )
                    }
                };
                let pid_text = slot.active_pid.as_deref().unwrap_or("?");
                match (action, &holder) {
                    (HolderAction::EndOwnSession, Some(h)) => {
                        tracing::info!(
                            slot = %pg.slot,
                            pid = h.id.pid,
                            "the slot is held by this process's previous replication session (the server has not noticed yet that the connection broke); ending that session"
                        );
                        if terminate(s, h.id.pid).await? {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    }
                    (HolderAction::EndStaleSession, Some(h)) => {
                        tracing::warn!(
                            slot = %pg.slot,
                            pid = h.id.pid,
                            "the slot is held by walcast's previous replication session, which has not answered the server for longer than wal_sender_timeout; ending it"
                        );
                        if terminate(s, h.id.pid).await? {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    }
                    (HolderAction::WaitForServer, _) => {
                        if announced != Some(action) {
                            tracing::info!(
                                slot = %pg.slot,
                                pid = pid_text,
                                wal_sender_timeout_ms = wal_sender_timeout.as_millis() as u64,
                                "the slot is held by walcast's previous replication session (a restart after a network failure?); waiting up to wal_sender_timeout for the server to end it (if it shows a sign of life, it is another instance)"
                            );
                            announced = Some(action);
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                    _ => {}
                }
                if now >= wait_until {
                    let who = holder
                        .as_ref()
                        .map(|h| {
                            format!(
                                "pid {}, application_name {:?}",
                                h.id.pid, h.application_name
                            )
                        })
                        .unwrap_or_else(|| format!("pid {pid_text}"));
                    let mut hint = "only one walcast may read a slot: stop the other instance, or give this one its own postgres.slot; see pg_stat_replication for who holds it".to_string();
                    if wal_sender_timeout.is_zero() {
                        hint.push_str(". wal_sender_timeout is 0, so Postgres never ends a replication session whose client vanished: if the holder is a dead walcast, end it with SELECT pg_terminate_backend(<pid>)");
                    }
                    return Err(Error::operator(format!(
                        "replication slot {} is in use by another connection ({who})",
                        pg.slot
                    ))
                    .with_hint(hint));
                }
                if announced != Some(HolderAction::Usual) {
                    tracing::info!(slot = %pg.slot, pid = pid_text, "slot is in use by another connection; waiting");
                    announced = Some(HolderAction::Usual);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        }
        // The slot is free (or missing): nobody advances it now, so records
        // read from here on bound it.
        let records = s.opts.state.load(key).await?;
        tracing::debug!(
            slot = %pg.slot,
            records = ?records.iter().map(|r| (r.origin.clone(), r.confirmed_lower, r.confirmed_upper)).collect::<Vec<_>>(),
            "walcast's records of the slot"
        );
        let facts = slot.as_ref().map(|slot| SlotFacts {
            confirmed_flush: slot
                .confirmed_flush_lsn
                .as_deref()
                .and_then(|l| l.parse().ok()),
            lost: slot.wal_status.as_deref() == Some("lost"),
        });
        match decide(&pg.slot, &records, facts.as_ref(), server, pg.create_slot)? {
            Plan::Resume { start, warnings } => {
                for w in warnings {
                    tracing::warn!(slot = %pg.slot, "{w}");
                }
                return Ok((start, false));
            }
            Plan::Create => {
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
            }
        }
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
    let (mut s, _system) = open_session(opts).await?;
    let key = SlotKey {
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
            done.push(format!(
                "slot {} exists and is valid (kept; the next run streams from its position {})",
                pg.slot,
                slot.confirmed_flush_lsn.as_deref().unwrap_or("?")
            ));
        }
    }
    let records = opts.state.load(&key).await?;
    let forgotten = opts.state.forget(&key).await?;
    if !forgotten.is_empty() {
        let last: Vec<String> = records
            .iter()
            .map(|r| format!("{} .. {}", r.confirmed_lower, r.confirmed_upper))
            .collect();
        done.push(format!(
            "forgot walcast's record of slot {} (last confirmed {}) in {}",
            pg.slot,
            last.join(", "),
            forgotten.join(" and ")
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
    fn key_hash_filters_match_what_postgres_deparses() {
        let h = KeyHash {
            modulus: 4,
            remainder: 0,
        };
        let ours = key_hash_filter("hashtext", "aggregate_id", h);
        assert_eq!(
            ours,
            "((COALESCE(hashtext(\"aggregate_id\"), 0) & 2147483647) % 4) = 0"
        );
        // As PostgreSQL 15 lists them in pg_publication_tables.rowfilter, for
        // a text and a varchar key.
        for stored in [
            "(((COALESCE(hashtext(aggregate_id), 0) & 2147483647) % 4) = 0)",
            "(((COALESCE(hashtext((aggregate_id)::text), 0) & 2147483647) % 4) = 0)",
        ] {
            assert_eq!(filter_fingerprint(stored), filter_fingerprint(&ours));
        }
        // Another share, modulus or column is another filter.
        for other in [
            key_hash_filter(
                "hashtext",
                "aggregate_id",
                KeyHash {
                    modulus: 4,
                    remainder: 1,
                },
            ),
            key_hash_filter(
                "hashtext",
                "aggregate_id",
                KeyHash {
                    modulus: 2,
                    remainder: 0,
                },
            ),
            key_hash_filter("hashtext", "id", h),
            key_hash_filter("uuid_hash", "aggregate_id", h),
        ] {
            assert_ne!(filter_fingerprint(&other), filter_fingerprint(&ours));
        }
        let sql = publication_tables_sql(
            &[
                TableName::parse("public.a").unwrap(),
                TableName::parse("public.b").unwrap(),
            ],
            &[Some("x = 1".into()), None],
        );
        assert_eq!(sql, "\"public\".\"a\" WHERE (x = 1), \"public\".\"b\"");
    }

    fn id(pid: i32) -> BackendId {
        BackendId {
            pid,
            backend_start: "1700000000000000".into(),
        }
    }

    fn look(reply: Option<&str>, age_ms: Option<i64>, slot: &str) -> Observation {
        Observation {
            reply_time: reply.map(str::to_string),
            reply_age_ms: age_ms,
            slot_position: Some(slot.to_string()),
        }
    }

    const WST: Duration = Duration::from_secs(10);

    #[test]
    fn this_process_ends_its_own_previous_session() {
        let mut w = None;
        let t = tokio::time::Instant::now();
        let l = look(None, None, "0/1");
        assert_eq!(
            judge_holder(true, None, &l, &mut w, t, WST),
            HolderAction::EndOwnSession
        );
        assert_eq!(
            judge_holder(true, Some(&id(1)), &l, &mut w, t, Duration::ZERO),
            HolderAction::EndOwnSession
        );
    }

    #[test]
    fn an_unknown_holder_gets_the_usual_wait() {
        let mut w = None;
        let t = tokio::time::Instant::now();
        let l = look(Some("1"), Some(100), "0/1");
        assert_eq!(
            judge_holder(false, None, &l, &mut w, t, WST),
            HolderAction::Usual
        );
        // Without wal_sender_timeout a dead session is never ended by the server.
        assert_eq!(
            judge_holder(false, Some(&id(1)), &l, &mut w, t, Duration::ZERO),
            HolderAction::Usual
        );
    }

    #[test]
    fn a_previous_session_that_shows_life_is_another_instance() {
        let mut w = None;
        let t = tokio::time::Instant::now();
        let p = id(1);
        assert_eq!(
            judge_holder(
                false,
                Some(&p),
                &look(Some("1"), Some(10), "0/1"),
                &mut w,
                t,
                WST
            ),
            HolderAction::WaitForServer
        );
        // A new reply.
        assert_eq!(
            judge_holder(
                false,
                Some(&p),
                &look(Some("2"), Some(10), "0/1"),
                &mut w,
                t + Duration::from_secs(1),
                WST
            ),
            HolderAction::Usual
        );
        // Stays alive even if it goes quiet later.
        assert_eq!(
            judge_holder(
                false,
                Some(&p),
                &look(Some("2"), Some(60_000), "0/1"),
                &mut w,
                t + Duration::from_secs(60),
                WST
            ),
            HolderAction::Usual
        );
        // Without pg_read_all_stats the reply time is hidden: the slot moving counts.
        let mut w = None;
        judge_holder(false, Some(&p), &look(None, None, "0/1"), &mut w, t, WST);
        assert_eq!(
            judge_holder(
                false,
                Some(&p),
                &look(None, None, "0/2"),
                &mut w,
                t + Duration::from_secs(1),
                WST
            ),
            HolderAction::Usual
        );
    }

    #[test]
    fn a_watched_session_leaving_pg_stat_replication_is_waited_for() {
        let t = tokio::time::Instant::now();
        let p = id(1);
        // Nothing watched: a holder without a row is someone else.
        assert_eq!(holder_gone(None, t, WST), HolderAction::Usual);
        let mut w = None;
        let silent = look(Some("1"), Some(3_000), "0/1");
        judge_holder(false, Some(&p), &silent, &mut w, t, WST);
        // The watched silent session is going away: wait for the slot.
        assert_eq!(
            holder_gone(w.as_ref(), t + Duration::from_secs(9), WST),
            HolderAction::WaitForServer
        );
        // Not beyond the margin.
        assert_eq!(
            holder_gone(w.as_ref(), t + WST + STALE_MARGIN, WST),
            HolderAction::Usual
        );
        // A session that showed life is another instance.
        judge_holder(
            false,
            Some(&p),
            &look(Some("2"), Some(10), "0/1"),
            &mut w,
            t + Duration::from_secs(1),
            WST,
        );
        assert_eq!(
            holder_gone(w.as_ref(), t + Duration::from_secs(2), WST),
            HolderAction::Usual
        );
    }

    #[test]
    fn a_silent_previous_session_is_waited_for_then_ended_only_when_visibly_silent() {
        let t = tokio::time::Instant::now();
        let p = id(1);
        let mut w = None;
        let silent = look(Some("1"), Some(3_000), "0/1");
        assert_eq!(
            judge_holder(false, Some(&p), &silent, &mut w, t, WST),
            HolderAction::WaitForServer
        );
        // Silent to us for longer than wal_sender_timeout, and the server's
        // clock agrees: ended.
        let later = look(Some("1"), Some(13_500), "0/1");
        assert_eq!(
            judge_holder(
                false,
                Some(&p),
                &later,
                &mut w,
                t + Duration::from_millis(10_500),
                WST
            ),
            HolderAction::EndStaleSession
        );
        // The server's clock disagrees (its reply is recent): not ended.
        let mut w = None;
        judge_holder(false, Some(&p), &silent, &mut w, t, WST);
        let recent = look(Some("1"), Some(2_000), "0/1");
        assert_eq!(
            judge_holder(
                false,
                Some(&p),
                &recent,
                &mut w,
                t + Duration::from_millis(10_500),
                WST
            ),
            HolderAction::WaitForServer
        );
        // Reply time hidden: never ended by walcast; waited for up to
        // wal_sender_timeout + the margin, then the usual rules.
        let mut w = None;
        let hidden = look(None, None, "0/1");
        judge_holder(false, Some(&p), &hidden, &mut w, t, WST);
        assert_eq!(
            judge_holder(
                false,
                Some(&p),
                &hidden,
                &mut w,
                t + Duration::from_secs(14),
                WST
            ),
            HolderAction::WaitForServer
        );
        assert_eq!(
            judge_holder(
                false,
                Some(&p),
                &hidden,
                &mut w,
                t + WST + STALE_MARGIN,
                WST
            ),
            HolderAction::Usual
        );
        // Another holder starts a new watch.
        assert_eq!(
            judge_holder(
                false,
                Some(&id(2)),
                &hidden,
                &mut w,
                t + Duration::from_secs(30),
                WST
            ),
            HolderAction::WaitForServer
        );
    }

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
