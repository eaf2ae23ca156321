//! `walcast outbox prune`: delete old outbox rows (the insert mode) without
//! deleting a row whose event the slot has not confirmed (the rule and its
//! proof: `walcast_outbox::prune`).

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
    /// The table to prune (default: every table of outbox.tables).
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
    let OutboxCommand::Prune(args) = cmd;
    let cfg = crate::load(&args.config)?;
    let tables = if args.table.is_empty() {
        cfg.outbox.tables.clone()
    } else {
        args.table.clone()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let (mut client, conn) = tokio_postgres::connect(&args.database_url, tokio_postgres::NoTls)
            .await
            .context("connecting with --database-url")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
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
