//! `walcast-consumer`: replay tools for groups of the idempotent consumer.

use clap::{Parser, Subcommand};
use walcast_consumer::RewindTo;

#[derive(Debug, Parser)]
#[command(
    name = "walcast-consumer",
    version,
    about = "Replay tools for walcast-consumer groups."
)]
struct Cli {
    /// Kafka bootstrap servers.
    #[arg(long, env = "WALCAST_CONSUMER_BOOTSTRAP_SERVERS")]
    bootstrap_servers: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Set a stopped group's offsets of a topic to an offset or a time, so
    /// its consumers re-consume from there (already processed events are
    /// skipped by their ids).
    Rewind {
        /// The consumer group.
        #[arg(long)]
        group: String,
        /// The topic.
        #[arg(long)]
        topic: String,
        /// Offset to start from on every partition.
        #[arg(long, conflicts_with = "to_timestamp_ms")]
        to_offset: Option<i64>,
        /// Time to start from, milliseconds since the epoch.
        #[arg(long)]
        to_timestamp_ms: Option<i64>,
    },
    /// Produce every record of a dead-letter topic back to its original
    /// topic (same key, value and id; the dead-letter headers removed).
    Redrive {
        /// The dead-letter topic.
        #[arg(long)]
        dead_letter_topic: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Rewind {
            group,
            topic,
            to_offset,
            to_timestamp_ms,
        } => {
            let to = match (to_offset, to_timestamp_ms) {
                (Some(o), None) => RewindTo::Offset(o),
                (None, Some(t)) => RewindTo::TimestampMs(t),
                _ => anyhow::bail!("give --to-offset or --to-timestamp-ms"),
            };
            for (p, o) in walcast_consumer::rewind(&cli.bootstrap_servers, &group, &topic, to)? {
                println!("{topic} partition {p}: next offset {o}");
            }
        }
        Command::Redrive { dead_letter_topic } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let n = rt.block_on(walcast_consumer::redrive(
                &cli.bootstrap_servers,
                &dead_letter_topic,
            ))?;
            println!("re-drove {n} records from {dead_letter_topic}");
        }
    }
    Ok(())
}
