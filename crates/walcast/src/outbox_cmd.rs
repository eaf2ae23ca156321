//! `walcast outbox prune`: delete old outbox rows (the insert mode) without
//! deleting a row whose event the slot has not confirmed (the rule and its
//! proof: `walcast_outbox::prune`). `walcast outbox rotate`: the same for an
//! outbox range-partitioned by `created_at`, by whole partitions
//! (`walcast_outbox::rotate`).

use std::time::Duration;

use anyhow::Context as _;
use walcast_core::Error;

use crate::ConfigArgs;

/// `walcast outbox …`
#[derive(Debug, clap::Subcommand)]
pub(crate) enum OutboxCommand {
    /// Delete rows older than --older-than whose events walcast has
    /// confirmed: only rows committed before a snapshot whose WAL position the
    /// slot's confirmed_flush_lsn has reached. Needs a `created_at` column
    /// and a role with DELETE on the table.
    Prune(PruneArgs),
    /// For an outbox partitioned by RANGE (created_at) (one partition per
    /// UTC day): create the partitions of today and --ahead days, and drop
    /// the partitions entirely older than --older-than once walcast has
    /// confirmed their events: DETACH, read the WAL position W, wait until
    /// the slot's confirmed_flush_lsn >= W, DROP. When the slot does not get
    /// there within --wait-timeout nothing is dropped (exit 1): the
    /// partitions stay detached and the next run drops them. Needs a role
    /// that owns the table.
    Rotate(RotateArgs),
}

/// `walcast outbox rotate` arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct RotateArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Drop partitions whose whole range is older than this: a number with
    /// ms, s, m, h or d (`7d`).
    #[arg(long, value_parser = parse_duration)]
    older_than: Duration,
    /// Days after today (UTC) that must already have a partition.
    #[arg(long, default_value_t = 3)]
    ahead: u32,
    /// A libpq-style connection string (`host=… dbname=… user=…`) of a role
    /// that owns the outbox table. Without TLS.
    #[arg(long, env = "WALCAST_OUTBOX_DATABASE_URL")]
    database_url: String,
    /// The table to rotate (default: every outbox table of the configuration:
    /// outbox.tables and the [[outbox.route]] tables).
    #[arg(long)]
    table: Vec<String>,
    /// How long to wait for the slot to confirm the position after the detach.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    wait_timeout: Duration,
    /// lock_timeout of each CREATE, DETACH and DROP (the application's
    /// writes to the outbox wait behind a DETACH that waits for its lock).
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    lock_timeout: Duration,
    /// Print the SQL it would run and change nothing.
    #[arg(long)]
    dry_run: bool,
}

/// `walcast outbox prune` arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct PruneArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Age of the rows to delete: a number with ms, s, m, h or d (`24h`).
    #[arg(long, value_parser = parse_duration)]
    older_than: Duration,
    /// A libpq-style connection string (`host=… dbname=… user=…`) of a role
    /// that may DELETE from the outbox (walcast's own replication role need
    /// not). Without TLS.
    #[arg(long, env = "WALCAST_OUTBOX_DATABASE_URL")]
    database_url: String,
    /// The table to prune (default: every outbox table of the configuration:
    /// outbox.tables and the [[outbox.route]] tables).
    #[arg(long)]
    table: Vec<String>,
    /// How long to wait for the slot to confirm the snapshot's position.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    wait_timeout: Duration,
}

/// Parses `500ms`, `90s`, `30m`, `24h`, `7d`.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?}: add a unit (ms, s, m, h or d), e.g. 24h"))?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected a number followed by ms, s, m, h or d"))?;
    let secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h or d)")),
    };
    Ok(Duration::from_secs(secs))
}

pub(crate) fn run(cmd: OutboxCommand) -> anyhow::Result<()> {
    match cmd {
        OutboxCommand::Prune(args) => run_prune(args),
        OutboxCommand::Rotate(args) => run_rotate(args),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connecting with --database-url")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// `--table`, or else every outbox table of the configuration
/// (`outbox.tables` and the routes' tables).
fn tables(cfg: &walcast_core::config::Config, given: &[String]) -> anyhow::Result<Vec<String>> {
    if !given.is_empty() {
        return Ok(given.to_vec());
    }
    Ok(cfg
        .outbox_tables()?
        .into_iter()
        .map(|t| format!("{}.{}", t.schema, t.name))
        .collect())
}

fn run_prune(args: PruneArgs) -> anyhow::Result<()> {
    let cfg = crate::load_one(&args.config)?;
    let tables = tables(&cfg, &args.table)?;
    runtime()?.block_on(async {
        let mut client = connect(&args.database_url).await?;
        for table in tables {
            let opts = walcast_outbox::PruneOptions {
                table: table.clone(),
                slot: cfg.postgres.slot.clone(),
                older_than: args.older_than,
                wait_timeout: args.wait_timeout,
            };
            match walcast_outbox::prune(&mut client, &opts).await {
                Ok(r) => println!(
                    "{table}: deleted {} rows older than {:?} (safe up to {}, slot {} confirmed {})",
                    r.deleted, args.older_than, r.safe_lsn, opts.slot, r.confirmed_lsn
                ),
                Err(e @ walcast_outbox::Error::SlotBehind { .. }) => {
                    return Err(Error::retryable(e.to_string())
                        .with_hint("nothing was deleted; run it again when walcast has caught up")
                        .into());
                }
                Err(e @ walcast_outbox::Error::SlotMissing(_)) => {
                    return Err(Error::operator(e.to_string()).into());
                }
                Err(e) => return Err(anyhow::Error::new(e).context(format!("pruning {table}"))),
            }
        }
        Ok(())
    })
}

fn run_rotate(args: RotateArgs) -> anyhow::Result<()> {
    let cfg = crate::load_one(&args.config)?;
    let tables = tables(&cfg, &args.table)?;
    runtime()?.block_on(async {
        let mut client = connect(&args.database_url).await?;
        for table in tables {
            let opts = walcast_outbox::RotateOptions {
                table: table.clone(),
                slot: cfg.postgres.slot.clone(),
                ahead_days: args.ahead,
                older_than: args.older_than,
                wait_timeout: args.wait_timeout,
                lock_timeout: args.lock_timeout,
            };
            if args.dry_run {
                let plan = walcast_outbox::rotate_plan(&client, &opts)
                    .await
                    .map_err(|e| rotate_error(e, &table))?;
                println!("-- {table}: dry run, nothing changed");
                for line in plan.sql(&opts.slot) {
                    println!("{line}");
                }
                continue;
            }
            match walcast_outbox::rotate(&mut client, &opts).await {
                Ok(r) => {
                    let list = |v: &[String]| {
                        if v.is_empty() {
                            "none".to_string()
                        } else {
                            v.join(", ")
                        }
                    };
                    println!(
                        "{table}: created {}; detached {}; dropped {}{}",
                        list(&r.created),
                        list(&r.detached),
                        list(&r.dropped),
                        match (&r.safe_lsn, &r.confirmed_lsn) {
                            (Some(w), Some(c)) =>
                                format!(" (safe up to {w}, slot {} confirmed {c})", opts.slot),
                            _ => String::new(),
                        }
                    )
                }
                Err(e) => return Err(rotate_error(e, &table)),
            }
        }
        Ok(())
    })
}

fn rotate_error(e: walcast_outbox::Error, table: &str) -> anyhow::Error {
    use walcast_outbox::Error as E;
    let lock_timeout = matches!(&e, E::Db { source, .. }
        if source.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE));
    match e {
        E::DropPending { .. } => Error::retryable(e.to_string())
            .with_hint("nothing was dropped; run it again when walcast has caught up")
            .into(),
        _ if lock_timeout => Error::retryable(format!("rotating {table}: {e}"))
            .with_hint("a transaction on the outbox held its lock longer than --lock-timeout; that statement changed nothing; run it again")
            .into(),
        E::SlotMissing(_) | E::NotRotatable { .. } | E::InvalidTable(_) => {
            Error::operator(e.to_string()).into()
        }
        e => anyhow::Error::new(e).context(format!("rotating {table}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert!(parse_duration("24").is_err());
        assert!(parse_duration("1y").is_err());
    }
}
