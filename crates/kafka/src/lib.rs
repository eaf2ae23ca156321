//! walcast's Kafka sink: an idempotent rdkafka producer whose delivery reports
//! feed the relay's ack tracker.
//!
//! Guarantees (the [`EventSink`] contract): `enable.idempotence=true` (which
//! implies `acks=all`), Java-compatible key partitioning (`murmur2_random`), so
//! one aggregate's events land in one partition in order; a delivery future
//! resolves `Ok` only on a successful delivery report. Settings the guarantee
//! depends on cannot be overridden through `kafka.properties`.
#![warn(missing_docs)]

mod state;

pub use state::KafkaRecordStore;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer, PurgeConfig};
use walcast_core::config::KafkaConfig;
use walcast_core::route::OutboxEvent;
use walcast_core::sink::EventSink;
use walcast_core::{Error, ErrorKind, Result};

/// Settings derived from the pipeline that size the producer's queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// The pipeline's `max_in_flight_events`.
    pub max_in_flight_events: u64,
    /// The pipeline's `max_in_flight_bytes`.
    pub max_in_flight_bytes: u64,
}

/// The librdkafka configuration walcast uses: its own guarantees first, then
/// the user's pass-through properties (protected keys were rejected by config
/// validation).
pub fn client_config(cfg: &KafkaConfig, limits: QueueLimits) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.bootstrap_servers)
        .set("client.id", "walcast")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("compression.type", &cfg.compression)
        .set("linger.ms", cfg.linger_ms.to_string())
        // Never time a message out inside librdkafka: on a message timeout
        // the idempotent producer bumps its epoch and goes on sending the
        // younger messages of the same partition, which then land in Kafka
        // before the timed-out ones were ever written (the pipeline replays
        // those after its restart): a reordering. The pipeline enforces
        // kafka.delivery_timeout_ms itself, and restarts after purging
        // everything queued (PipelineSettings::delivery_timeout).
        .set("message.timeout.ms", "0")
        // The pipeline bounds what is in flight; the producer's queue must
        // never be the tighter limit (a full queue is not an error we want).
        .set(
            "queue.buffering.max.messages",
            (limits.max_in_flight_events.saturating_mul(2))
                .clamp(100_000, 2_147_483_647)
                .to_string(),
        )
        .set(
            "queue.buffering.max.kbytes",
            (limits.max_in_flight_bytes.saturating_mul(2) / 1024)
                .clamp(65_536, 2_147_483_647)
                .to_string(),
        );
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    c
}

/// The Kafka sink.
pub struct KafkaSink {
    producer: FutureProducer,
    bootstrap: String,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("bootstrap", &self.bootstrap)
            .finish_non_exhaustive()
    }
}

impl KafkaSink {
    /// Creates the producer (no network I/O yet).
    ///
    /// # Errors
    /// An operator error when librdkafka rejects the configuration.
    pub fn new(cfg: &KafkaConfig, limits: QueueLimits) -> Result<Self> {
        let producer: FutureProducer = client_config(cfg, limits).create().map_err(|e| {
            Error::operator("the Kafka producer configuration was rejected")
                .with_source(e)
                .with_hint(
                    "check [kafka] and kafka.properties against librdkafka's CONFIGURATION.md",
                )
        })?;
        Ok(KafkaSink {
            producer,
            bootstrap: cfg.bootstrap_servers.clone(),
        })
    }

    /// Asks the cluster for its metadata, so an unreachable broker is reported
    /// clearly before any event is read.
    ///
    /// # Errors
    /// A retryable error naming the bootstrap servers.
    pub async fn check_reachable(&self, timeout: Duration) -> Result<()> {
        let producer = self.producer.clone();
        let bootstrap = self.bootstrap.clone();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, timeout)
                .map(|_| ())
                .map_err(|e| {
                    Error::retryable(format!(
                        "cannot reach Kafka at {bootstrap} within {}s",
                        timeout.as_secs()
                    ))
                    .with_source(e)
                    .with_hint("check that the brokers run and that kafka.bootstrap_servers (and security settings in kafka.properties) are right; walcast retries with backoff")
                })
        })
        .await
        .map_err(|e| Error::retryable("metadata check task failed").with_source(e))?
    }

    /// The underlying producer (for tools and tests).
    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }
}

/// Sorts a Kafka error into walcast's kinds.
pub fn classify(err: &KafkaError) -> ErrorKind {
    let code = match err {
        KafkaError::MessageProduction(code) => Some(*code),
        other => other.rdkafka_error_code(),
    };
    match code {
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::InvalidMessage,
        ) => ErrorKind::Permanent,
        Some(
            RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::PolicyViolation,
        ) => ErrorKind::OperatorAction,
        _ => ErrorKind::Retryable,
    }
}

fn delivery_error(err: KafkaError, topic: &str, event_id: &str, size: usize) -> Error {
    let kind = classify(&err);
    let hint = match kind {
        ErrorKind::Permanent => format!(
            "the event is {size} bytes: raise the producer's kafka.properties.\"message.max.bytes\" and the topic's max.message.bytes, or make the payload smaller; walcast stops without moving the slot past it"
        ),
        ErrorKind::OperatorAction => format!(
            "create topic {topic:?} (or enable auto.create.topics.enable) and grant walcast's principal Write on it"
        ),
        _ => "walcast restarts from the slot's confirmed position with backoff; nothing is skipped".to_string(),
    };
    Error::new(
        kind,
        format!("Kafka did not accept event {event_id} for topic {topic:?}"),
    )
    .with_source(err)
    .with_hint(hint)
}

/// Resolves when Kafka acknowledged (or failed) one event.
pub struct KafkaDelivery {
    inner: DeliveryFuture,
    topic: std::sync::Arc<str>,
    event_id: String,
    size: usize,
}

impl std::fmt::Debug for KafkaDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaDelivery")
            .field("topic", &self.topic)
            .field("event_id", &self.event_id)
            .finish_non_exhaustive()
    }
}

impl Future for KafkaDelivery {
    type Output = Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Ok(_delivery))) => Poll::Ready(Ok(())),
            Poll::Ready(Ok(Err((err, _msg)))) => Poll::Ready(Err(delivery_error(
                err,
                &this.topic,
                &this.event_id,
                this.size,
            ))),
            Poll::Ready(Err(_canceled)) => Poll::Ready(Err(Error::retryable(format!(
                "the producer was closed before event {} was acknowledged",
                this.event_id
            )))),
        }
    }
}

impl EventSink for KafkaSink {
    type Delivery = KafkaDelivery;

    fn send(&mut self, event: OutboxEvent) -> Result<KafkaDelivery> {
        let mut headers = OwnedHeaders::new_with_capacity(event.headers.len());
        for h in &event.headers {
            headers = headers.insert(Header {
                key: &h.name,
                value: Some(&h.value[..]),
            });
        }
        let size = event.size_bytes() as usize;
        let event_id = String::from_utf8_lossy(event.event_id()).into_owned();
        let record = FutureRecord::to(&event.topic)
            .key(&event.key[..])
            .payload(&event.payload[..])
            .headers(headers);
        match self.producer.send_result(record) {
            Ok(inner) => Ok(KafkaDelivery {
                inner,
                topic: event.topic.clone(),
                event_id,
                size,
            }),
            Err((err, _record)) => Err(delivery_error(err, &event.topic, &event_id, size)),
        }
    }

    fn abort(self) {
        self.producer
            .purge(PurgeConfig::default().queue().inflight());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guarantees_are_set_and_user_properties_pass_through() {
        let mut cfg = KafkaConfig {
            bootstrap_servers: "127.0.0.1:1".into(),
            compression: "zstd".into(),
            linger_ms: 7,
            delivery_timeout_ms: 1234,
            properties: Default::default(),
        };
        cfg.properties
            .insert("socket.keepalive.enable".into(), "true".into());
        let c = client_config(
            &cfg,
            QueueLimits {
                max_in_flight_events: 10,
                max_in_flight_bytes: 10,
            },
        );
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("partitioner"), Some("murmur2_random"));
        assert_eq!(
            c.get("message.timeout.ms"),
            Some("0"),
            "librdkafka never times a message out"
        );
        assert_eq!(c.get("compression.type"), Some("zstd"));
        assert_eq!(c.get("socket.keepalive.enable"), Some("true"));
        // The producer builds with this config (librdkafka validates it).
        KafkaSink::new(
            &cfg,
            QueueLimits {
                max_in_flight_events: 10,
                max_in_flight_bytes: 10,
            },
        )
        .unwrap();
    }

    #[test]
    fn errors_are_classified() {
        let e = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert_eq!(classify(&e), ErrorKind::Permanent);
        let e = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert_eq!(classify(&e), ErrorKind::Retryable);
        let e = KafkaError::MessageProduction(RDKafkaErrorCode::TopicAuthorizationFailed);
        assert_eq!(classify(&e), ErrorKind::OperatorAction);
        let err = delivery_error(e, "t", "id-1", 5);
        assert!(err.to_string().contains("id-1"), "{err}");
    }
}
