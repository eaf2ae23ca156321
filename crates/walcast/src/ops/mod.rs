//! Operator commands: `check`, `status`, `slot create|drop|advance`,
//! `publication sync`, `health`. Each reads the normal configuration
//! (`--config`, `WALCAST_*`, `--set`), prints a human table by default and
//! JSON with `--json`. The queries and rules live in the Postgres and Kafka
//! crates; this module prints and asks for `--yes`.

pub(crate) mod check;
pub(crate) mod health;
mod http;
mod metrics;
pub(crate) mod publication;
pub(crate) mod slot;
pub(crate) mod status;

use anyhow::Context as _;
use clap::Subcommand;

/// The operator commands that are top-level subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum OpsCommand {
    /// Check the setup against everything walcast needs (changes nothing).
    ///
    /// Postgres (wal_level, free slots and WAL senders, the role,
    /// the outbox tables, the publication, ownership,
    /// max_slot_wal_keep_size, the slot) and Kafka (reachability, the
    /// producer's durability settings, each outbox topic's replication and
    /// record size limit). Prints OK/WARN/FAIL with a fix for each; exits 0
    /// when nothing failed, 2 otherwise.
    Check(check::CheckArgs),
    /// Show the slot's position and lag, and the running relay's own view.
    ///
    /// The slot as Postgres sees it (active, positions, lag, wal_status,
    /// safe_wal_size), and the relay's /metrics when `[metrics] listen` is
    /// configured. With several [[pipelines]]: every pipeline, or the one
    /// --pipeline names.
    Status(status::StatusArgs),
    /// Publication maintenance.
    Publication {
        #[command(subcommand)]
        command: publication::PublicationCommand,
    },
    /// GET a health endpoint: exit 0 on a 2xx answer, 1 otherwise.
    ///
    /// Default: the relay's /readyz on 127.0.0.1:9187. For container health
    /// checks (the image has no curl).
    Health(health::HealthArgs),
}

/// Runs an operator command.
pub(crate) fn run(cmd: OpsCommand) -> anyhow::Result<()> {
    match cmd {
        OpsCommand::Check(args) => check::run(args),
        OpsCommand::Status(args) => status::run(args),
        OpsCommand::Publication {
            command: publication::PublicationCommand::Sync(args),
        } => publication::sync(args),
        OpsCommand::Health(args) => health::run(args),
    }
}

/// Ends the process with this code; the command already said why.
#[derive(Debug)]
pub(crate) struct Exit(pub(crate) i32);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}", self.0)
    }
}

impl std::error::Error for Exit {}

/// A current-thread runtime for one command.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    // Logs only when asked for (RUST_LOG): the commands print their own result.
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// `1234567` as `1.2 MiB`.
pub(crate) fn human_bytes(b: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut i = 0;
    while v.abs() >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b:.0} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_well() {
        assert_eq!(human_bytes(0.0), "0 B");
        assert_eq!(human_bytes(1023.0), "1023 B");
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
        assert_eq!(human_bytes(5.0 * 1024.0 * 1024.0 * 1024.0), "5.0 GiB");
    }
}
