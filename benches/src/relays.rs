//! The harness's own contestants, each run as a separate process (a
//! subcommand of this binary) so its CPU and memory are measured like the
//! others':
//!
//! - `poll-relay`: the polling outbox relay as users write it;
//! - `kafka-limit`: a bare rdkafka producer sending the same records as fast
//!   as Kafka accepts them (the Kafka side of the hardware limit);
//! - `pg-drain`: walcast's replication source and decoder draining the slot
//!   without producing (what the Postgres side gives walcast's code).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use rand::Rng;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use walcast_core::config::{Config, KafkaConfig};
use walcast_core::outbox::{OutboxFilter, Row};
use walcast_core::route::{Router, TopicTemplate};
use walcast_core::source::{ReplicationSource, SourceEvent};
use walcast_kafka::QueueLimits;

/// walcast's default in-flight limits (README): the bare producer keeps the
/// same bound so it measures what Kafka accepts at walcast's concurrency.
pub const DEFAULT_MAX_IN_FLIGHT_EVENTS: u64 = 10_000;
const DEFAULT_MAX_IN_FLIGHT_BYTES: u64 = 64 * 1024 * 1024;

/// A producer configured exactly like walcast's sink with its default
/// `[kafka]` settings (idempotent, acks=all, murmur2_random, lz4, linger 5 ms):
/// built by walcast-kafka's own `client_config`.
pub fn walcast_like_producer(bootstrap: &str) -> Result<FutureProducer> {
    let cfg: KafkaConfig = toml::from_str(&format!("bootstrap_servers = {bootstrap:?}"))
        .context("building the Kafka settings")?;
    walcast_kafka::client_config(
        &cfg,
        QueueLimits {
            max_in_flight_events: DEFAULT_MAX_IN_FLIGHT_EVENTS,
            max_in_flight_bytes: DEFAULT_MAX_IN_FLIGHT_BYTES,
        },
    )
    .create()
    .context("creating the Kafka producer")
}

/// Prints `{"ready_s": …}`: when, since the process started, the contestant
/// was connected and started working (the harness's drain starts there).
fn print_ready() {
    println!(
        "{}",
        serde_json::json!({"ready_s": crate::clock::secs(0, crate::clock::now_ns())})
    );
}

/// `poll-relay` settings.
#[derive(Debug, Clone, clap::Args)]
pub struct PollArgs {
    /// libpq-style connection string of the database with `public.outbox`.
    #[arg(long)]
    pub conn: String,
    /// Kafka bootstrap servers.
    #[arg(long)]
    pub bootstrap: String,
    /// Topic template, `${routedByValue}` = aggregatetype.
    #[arg(long)]
    pub topic: String,
    /// Rows per poll (one transaction: SELECT … FOR UPDATE SKIP LOCKED,
    /// produce, wait for every ack, DELETE, COMMIT).
    #[arg(long, default_value_t = 1000)]
    pub batch: i64,
    /// Sleep after a poll that returned less than a full batch.
    #[arg(long, default_value_t = 100)]
    pub interval_ms: u64,
}

/// The polling relay: the loop users write. Order per aggregate is kept by
/// `ORDER BY created_at` and one worker; rows are deleted once Kafka acked
/// every record of the batch, in the same transaction that locked them.
pub async fn poll_relay(a: PollArgs) -> Result<()> {
    let (mut client, connection) = tokio_postgres::connect(&a.conn, tokio_postgres::NoTls)
        .await
        .context("connecting to PostgreSQL")?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("poll-relay: connection: {e}");
        }
    });
    let producer = walcast_like_producer(&a.bootstrap)?;
    let select = client
        .prepare(
            "SELECT id::text, aggregatetype, aggregateid, type, payload::text \
             FROM public.outbox ORDER BY created_at LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .await?;
    let delete = client
        .prepare("DELETE FROM public.outbox WHERE id = ANY($1::text[]::uuid[])")
        .await?;
    let mut topics: HashMap<String, String> = HashMap::new();
    print_ready();
    let interval = Duration::from_millis(a.interval_ms);
    loop {
        let tx = client.transaction().await?;
        let rows = tx.query(&select, &[&a.batch]).await?;
        if rows.is_empty() {
            tx.commit().await?;
            tokio::time::sleep(interval).await;
            continue;
        }
        let mut ids: Vec<String> = Vec::with_capacity(rows.len());
        let mut acks = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: &str = row.get(0);
            let agg_type: &str = row.get(1);
            let key: &str = row.get(2);
            let event_type: &str = row.get(3);
            let payload: &str = row.get(4);
            let topic = topics
                .entry(agg_type.to_string())
                .or_insert_with(|| a.topic.replace("${routedByValue}", agg_type));
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "id",
                    value: Some(id),
                })
                .insert(Header {
                    key: "type",
                    value: Some(event_type),
                });
            let record = FutureRecord::to(topic)
                .key(key)
                .payload(payload)
                .headers(headers);
            match producer.send_result(record) {
                Ok(f) => acks.push(f),
                Err((e, _)) => bail!("enqueueing a record: {e}"),
            }
            ids.push(id.to_string());
        }
        for ack in acks {
            match ack.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => bail!("Kafka did not accept a record: {e}"),
                Err(_) => bail!("the producer dropped a delivery"),
            }
        }
        tx.execute(&delete, &[&ids]).await?;
        tx.commit().await?;
        if (rows.len() as i64) < a.batch {
            tokio::time::sleep(interval).await;
        }
    }
}

/// `kafka-limit` settings.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaLimitArgs {
    /// Kafka bootstrap servers.
    #[arg(long)]
    pub bootstrap: String,
    /// Topic.
    #[arg(long)]
    pub topic: String,
    /// Records (sequence numbers 1..=N).
    #[arg(long)]
    pub events: u64,
    /// Approximate value size (same JSON shape as the outbox payloads).
    #[arg(long)]
    pub payload: u32,
    /// Records in flight at most.
    #[arg(long, default_value_t = DEFAULT_MAX_IN_FLIGHT_EVENTS)]
    pub max_in_flight: u64,
}

/// A payload body like the Postgres pools' (`bench_payload_pool`): order
/// items with random values and a customer, about `size` bytes in all.
fn body(rng: &mut impl Rng, size: u32) -> String {
    let items = ((f64::from(size) - 55.0) / 49.0).round().max(1.0) as usize;
    let list: Vec<String> = (0..items)
        .map(|_| {
            format!(
                "{{\"qty\": {}, \"sku\": \"SKU-{}\", \"price\": {}}}",
                rng.random_range(1..=9),
                rng.random_range(100_000..1_000_000),
                rng.random_range(0..100_000)
            )
        })
        .collect();
    format!(
        "\"items\": [{}], \"customer\": \"cust-{}\"",
        list.join(", "),
        rng.random_range(100_000..1_000_000)
    )
}

/// The JSON value of event `seq` (the jsonb text Postgres sends).
fn value(seq: u64, body: &str) -> String {
    format!("{{\"seq\": {seq}, {body}}}")
}

/// Produces N records with the outbox records' shape (key = sequence number,
/// headers `id` and `type`) as fast as Kafka acknowledges them.
pub async fn kafka_limit(a: KafkaLimitArgs) -> Result<()> {
    let producer = walcast_like_producer(&a.bootstrap)?;
    // Connect and learn the partitions first, like a relay that is up.
    {
        let (p, topic) = (producer.clone(), a.topic.clone());
        tokio::task::spawn_blocking(move || {
            p.client()
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
                .map(|_| ())
        })
        .await?
        .context("fetching the topic's metadata")?;
    }
    // 4096 bodies, used in turn, like the payload pools in Postgres.
    let mut rng = rand::rng();
    let pool: Vec<String> = (0..4096).map(|_| body(&mut rng, a.payload)).collect();
    print_ready();
    let started = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    let mut acked = 0u64;
    for seq in 1..=a.events {
        while in_flight.len() as u64 >= a.max_in_flight {
            if let Some(r) = in_flight.next().await {
                check(r)?;
                acked += 1;
            }
        }
        let key = seq.to_string();
        let id = uuid::Uuid::new_v4().to_string();
        let payload = value(seq, &pool[seq as usize % pool.len()]);
        let mut record = FutureRecord::to(&a.topic)
            .key(&key)
            .payload(&payload)
            .headers(
                OwnedHeaders::new()
                    .insert(Header {
                        key: "id",
                        value: Some(&id),
                    })
                    .insert(Header {
                        key: "type",
                        value: Some("BenchEvent"),
                    }),
            );
        loop {
            match producer.send_result(record) {
                Ok(f) => {
                    in_flight.push(f);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    if let Some(r) = in_flight.next().await {
                        check(r)?;
                        acked += 1;
                    }
                }
                Err((e, _)) => bail!("enqueueing record {seq}: {e}"),
            }
        }
    }
    while let Some(r) = in_flight.next().await {
        check(r)?;
        acked += 1;
    }
    println!(
        "{}",
        serde_json::json!({"acked": acked, "elapsed_s": started.elapsed().as_secs_f64()})
    );
    Ok(())
}

fn check(
    r: Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >,
) -> Result<()> {
    match r {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => bail!("Kafka did not accept a record: {e}"),
        Err(_) => bail!("the producer dropped a delivery"),
    }
}

/// `pg-drain` settings.
#[derive(Debug, Clone, clap::Args)]
pub struct PgDrainArgs {
    /// A walcast configuration file (its `[postgres]` and `[outbox]` sections).
    #[arg(long)]
    pub config: PathBuf,
    /// Stop after this many outbox events.
    #[arg(long)]
    pub events: u64,
}

/// Reads the slot through walcast's own source (`walcast-postgres`),
/// decodes and routes every outbox INSERT with walcast's filter and router,
/// confirms each commit, and produces nothing.
pub async fn pg_drain(a: PgDrainArgs) -> Result<()> {
    let cfg = Config::load(Some(&a.config), std::iter::empty(), &[])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let opts = walcast_postgres::ConnectOptions {
        pg: cfg.postgres.clone(),
        password: cfg
            .postgres_password()
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        tables: cfg.outbox_tables().map_err(|e| anyhow::anyhow!("{e}"))?,
        columns: cfg.routes()?.required_columns(),
        keys: cfg.routes()?.key_columns(),
        // The drain is a measurement tool: its record lives only in the
        // state directory (no Kafka copy).
        state: walcast_postgres::SlotState::new(vec![std::sync::Arc::new(
            walcast_postgres::FileStore::new(
                cfg.state_dir(|k| std::env::var_os(k))
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
            ),
        )]),
        max_row_bytes: cfg.pipeline.max_row_bytes,
        spill_dir: std::env::temp_dir(),
    };
    let started = Instant::now();
    let connected = walcast_postgres::connect(&opts)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let streaming_s = started.elapsed().as_secs_f64();
    let mut source = connected.source;
    let mut filter = OutboxFilter::new(
        cfg.outbox_tables().map_err(|e| anyhow::anyhow!("{e}"))?,
        cfg.outbox.columns.clone(),
    )
    .with_partitions(connected.partitions.clone());
    let mut router =
        Router::new(TopicTemplate::parse(&cfg.outbox.topic).map_err(|e| anyhow::anyhow!("{e}"))?);
    let mut events = 0u64;
    let mut bytes = 0u64;
    let mut first: Option<Instant> = None;
    let mut commit_lsn = walcast_core::Lsn::from(0u64);
    while events < a.events {
        let Some(ev) = source.recv().await.map_err(|e| anyhow::anyhow!("{e}"))? else {
            bail!("the server ended the stream after {events} events");
        };
        match ev {
            SourceEvent::Begin { final_lsn, .. } => commit_lsn = final_lsn,
            SourceEvent::Data { data, .. } => {
                if let Row::OutboxInsert { table, row } =
                    filter.decode(&data).map_err(|e| anyhow::anyhow!("{e}"))?
                {
                    let event = router
                        .route(&table, commit_lsn, 0, row)
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    bytes += event.size_bytes();
                    events += 1;
                    first.get_or_insert_with(Instant::now);
                }
            }
            SourceEvent::Commit { end_lsn, .. } => source.confirm(end_lsn),
            _ => {}
        }
    }
    let first_s = first.map(|f| (f - started).as_secs_f64()).unwrap_or(0.0);
    let elapsed = started.elapsed().as_secs_f64();
    let _ = source.shutdown().await;
    println!(
        "{}",
        serde_json::json!({
            "events": events,
            "bytes": bytes,
            "streaming_s": streaming_s,
            "first_event_s": first_s,
            "elapsed_s": elapsed
        })
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_have_the_outbox_shape() {
        let mut rng = rand::rng();
        for size in [200u32, 2048] {
            let v = value(7, &body(&mut rng, size));
            let json: serde_json::Value = serde_json::from_str(&v).unwrap();
            assert_eq!(json["seq"], 7);
            assert!(json["items"].as_array().is_some_and(|a| !a.is_empty()));
            let len = v.len() as f64;
            assert!(
                (len - f64::from(size)).abs() < f64::from(size) * 0.15,
                "{size}: {len}"
            );
        }
    }

    #[test]
    fn the_producer_is_configured_like_walcast() {
        // No broker needed: creating the client does no I/O.
        assert!(walcast_like_producer("127.0.0.1:1").is_ok());
    }
}
