//! `walcast-example-withdrawals`: records withdrawals and runs the two
//! consumers until every withdrawal was synced and notified exactly once.
//! Start walcast on the same database first (examples/withdrawals/run.sh
//! does all of it).

use std::time::{Duration, Instant};

use clap::Parser;
use walcast_consumer::{Consumer, ConsumerConfig};
use walcast_example_withdrawals as ex;

#[derive(Debug, Parser)]
struct Args {
    /// tokio-postgres connection string of the application database.
    #[arg(long)]
    pg: String,
    /// Kafka bootstrap servers.
    #[arg(long)]
    kafka: String,
    /// The topic walcast routes the withdrawal events to.
    #[arg(long, default_value = "outbox.event.Withdrawal")]
    topic: String,
    /// The publication walcast reads (created if missing).
    #[arg(long, default_value = "walcast_outbox")]
    publication: String,
    /// Withdrawals to record.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let a = Args::parse();
    let (mut client, conn) = tokio_postgres::connect(&a.pg, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    ex::setup(&client, &a.publication).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut consumers = Vec::new();
    for (group, handler) in [("partner-sync", 0), ("notification", 1)] {
        let mut cfg = ConsumerConfig::new(&a.kafka, group, vec![a.topic.clone()], &a.pg);
        cfg.commit_interval = Duration::from_millis(500);
        let mut rx = stop_rx.clone();
        let stop = async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        consumers.push(if handler == 0 {
            tokio::spawn(Consumer::new(cfg, ex::PartnerSync)?.run(stop))
        } else {
            tokio::spawn(Consumer::new(cfg, ex::Notification)?.run(stop))
        });
    }
    let base = ex::verify(&client).await?.withdrawals;
    println!(
        "recording {} withdrawals (one transaction each: the row and its event)",
        a.count
    );
    for i in 0..a.count {
        let id = format!("wd-{}-{i}", std::process::id());
        let tx = client.transaction().await?;
        ex::record_withdrawal(&tx, &id, &format!("acct-{}", i % 100), 100 + i as i64).await?;
        tx.commit().await?;
    }
    let start = Instant::now();
    let report = loop {
        let r = ex::verify(&client).await?;
        if (r.exactly_once() && r.withdrawals >= base + a.count as i64)
            || start.elapsed() > Duration::from_secs(a.timeout_s)
        {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let _ = stop_tx.send(true);
    for c in consumers {
        c.await??;
    }
    println!("{report}");
    anyhow::ensure!(
        report.exactly_once(),
        "not every withdrawal was handled exactly once"
    );
    println!("every withdrawal was synced with the partner and notified exactly once");
    Ok(())
}
