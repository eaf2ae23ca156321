//! `walcast slot create|drop|advance`.

use clap::Subcommand;
use walcast_core::{Error, Lsn};
use walcast_postgres::AdminSession;

use super::{human_bytes, Exit};
use crate::ConfigArgs;

/// Slot commands besides `accept-gap`.
#[derive(Debug, Subcommand)]
pub(crate) enum SlotManage {
    /// Create the slot (pgoutput) now.
    ///
    /// Postgres keeps the WAL from this point on, before walcast first runs.
    /// walcast records the slot in pipeline.state_dir, as `run` does.
    Create(ConfigArgs),
    /// Drop the slot (walcast stopped; needs --yes).
    ///
    /// Events committed after its confirmed position that walcast has not
    /// relayed are never relayed; walcast's record of the slot stays, so the
    /// next `walcast run` refuses to start until `walcast slot accept-gap`.
    Drop(DropArgs),
    /// Move the slot's position forward (walcast stopped; needs --yes).
    ///
    /// The events committed between the old and the new position are never
    /// relayed.
    Advance(AdvanceArgs),
}

/// `walcast slot drop` arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct DropArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Do it (without: print what would be done and exit 1).
    #[arg(long)]
    yes: bool,
}

/// `walcast slot advance` arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct AdvanceArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// The new position: an LSN (`16/B374D848`) or `current` (the server's
    /// current WAL position).
    #[arg(long, value_name = "LSN")]
    to: String,
    /// Do it (without: print what would be done and exit 1).
    #[arg(long)]
    yes: bool,
}

pub(crate) fn run(cmd: SlotManage) -> anyhow::Result<()> {
    match cmd {
        SlotManage::Create(args) => create(args),
        SlotManage::Drop(args) => drop_slot(args),
        SlotManage::Advance(args) => advance(args),
    }
}

fn create(args: ConfigArgs) -> anyhow::Result<()> {
    let cfg = crate::load_one(&args)?;
    super::runtime()?.block_on(async {
        let opts = crate::tool_options_writing(&cfg).await?;
        let mut s = AdminSession::open(&opts).await?;
        match s.create_slot().await? {
            Some(at) => println!(
                "created replication slot {} (pgoutput) at {at}; Postgres keeps the WAL from there until walcast confirms it. \
                 walcast's record of the slot is in {}: `walcast run` streams from {at}",
                cfg.postgres.slot,
                opts.state.describe(&s.slot_key())
            ),
            None => println!(
                "replication slot {} already exists (nothing done)",
                cfg.postgres.slot
            ),
        }
        Ok(())
    })
}

fn not_done(what: &str) -> anyhow::Error {
    println!("\nNothing was done. Run again with --yes to {what}.");
    Exit(1).into()
}

fn drop_slot(args: DropArgs) -> anyhow::Result<()> {
    let cfg = crate::load_one(&args.config)?;
    let slot = &cfg.postgres.slot;
    super::runtime()?.block_on(async {
        let opts = crate::tool_options_writing(&cfg).await?;
        let mut s = AdminSession::open(&opts).await?;
        let status = s.slot_status().await?;
        let Some(state) = &status.state else {
            return Err(Error::operator(format!("replication slot {slot} does not exist"))
                .with_hint("check postgres.slot (`walcast status` shows the slot walcast uses)")
                .into());
        };
        let confirmed = state
            .confirmed_flush_lsn
            .map(|l| l.to_string())
            .unwrap_or_else(|| "?".into());
        let lag = state.lag_bytes.unwrap_or(0);
        println!(
            "{} replication slot {slot} (confirmed_flush_lsn {confirmed}, {} of WAL after it).",
            if args.yes { "Dropping" } else { "Would drop" },
            human_bytes(lag as f64)
        );
        println!(
            "Skipped: Postgres forgets the slot's position and frees that WAL; events committed after {confirmed} \
             that walcast has not relayed are never relayed."
        );
        match &status.record {
            Some(r) => println!(
                "walcast's record of the slot (last confirmed at most {}) stays in {}: the next `walcast run` refuses to start \
                 until `walcast slot accept-gap`, which starts a new slot at the then current position.",
                r.confirmed_upper,
                r.origin
            ),
            None => println!(
                "walcast has no record of the slot (pipeline.state_dir, pipeline.state_topic = {}): the next `walcast run` creates a new slot at the then current position{}.",
                cfg.pipeline.state_topic,
                if cfg.postgres.create_slot { "" } else { " (with postgres.create_slot = true)" }
            ),
        }
        if state.active {
            return Err(Error::operator(format!(
                "replication slot {slot} is in use by a connection (pid {})",
                state.active_pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into())
            ))
            .with_hint("stop the walcast that reads it first")
            .into());
        }
        if !args.yes {
            return Err(not_done("drop the slot"));
        }
        s.drop_slot().await?;
        println!("Dropped replication slot {slot}.");
        Ok(())
    })
}

fn advance(args: AdvanceArgs) -> anyhow::Result<()> {
    let cfg = crate::load_one(&args.config)?;
    let slot = &cfg.postgres.slot;
    let target = args.to.trim().to_string();
    let parsed: Option<Lsn> = if target.eq_ignore_ascii_case("current") {
        None
    } else {
        Some(target.parse::<Lsn>().map_err(|e| {
            Error::operator(format!("--to {target:?} is not an LSN"))
                .with_source(e)
                .with_hint("write it as Postgres does (16/B374D848), or --to current")
        })?)
    };
    super::runtime()?.block_on(async {
        let opts = crate::tool_options_writing(&cfg).await?;
        let mut s = AdminSession::open(&opts).await?;
        let status = s.slot_status().await?;
        let Some(state) = &status.state else {
            return Err(Error::operator(format!("replication slot {slot} does not exist"))
                .with_hint("check postgres.slot (`walcast status` shows the slot walcast uses)")
                .into());
        };
        let to = parsed.unwrap_or(status.server_lsn);
        let from = state.confirmed_flush_lsn.unwrap_or_default();
        if to <= from {
            return Err(Error::operator(format!(
                "replication slot {slot} is already at {from}; it cannot move back to {to}"
            ))
            .with_hint("a slot only moves forward: give --to a position after its confirmed_flush_lsn (see `walcast status`)")
            .into());
        }
        if to > status.server_lsn {
            return Err(Error::operator(format!(
                "{to} is beyond the server's current WAL position {}",
                status.server_lsn
            ))
            .with_hint("give --to a position the server has written, or --to current")
            .into());
        }
        if state.active {
            return Err(Error::operator(format!(
                "replication slot {slot} is in use by a connection (pid {})",
                state.active_pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into())
            ))
            .with_hint("stop the walcast that reads it first")
            .into());
        }
        println!(
            "{} replication slot {slot} from {from} to {to} ({} of WAL).",
            if args.yes { "Advancing" } else { "Would advance" },
            human_bytes(to.saturating_sub(from) as f64)
        );
        println!(
            "Skipped: every event committed between {from} and {to} is never relayed: Postgres does not decode \
             that WAL for the slot again. Reconcile those outbox rows with Kafka yourself if they matter."
        );
        if !args.yes {
            return Err(not_done("advance the slot"));
        }
        let now = s.advance_slot(to).await?;
        println!("Advanced replication slot {slot} to {now}.");
        Ok(())
    })
}
