//! The Kafka copy of walcast's slot record (delivery rule 5): a compacted
//! topic (`pipeline.state_topic`) with one record per (database, slot), so
//! the record survives the loss of walcast's state directory (a new
//! container, a new host).
//!
//! The key is the JSON array `[database, slot]`, the value the record as
//! JSON; forgetting writes a tombstone. Reading scans the topic from the
//! beginning to its end (compaction keeps it small) and takes the last value
//! of the key. Writes are acknowledged by all in-sync replicas (idempotent
//! producer) before [`SlotRecordStore::save`] returns.

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use walcast_core::config::KafkaConfig;
use walcast_core::state::{SlotKey, SlotRecord, SlotRecordStore};
use walcast_core::{Error, ErrorKind, Result};

/// How long one state read or write may take before it fails (retryable).
const STATE_IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Topic settings walcast creates the state topic with: compacted, with
/// segments rolled hourly so old values are compacted away.
const TOPIC_CONFIGS: &[(&str, &str)] = &[("cleanup.policy", "compact"), ("segment.ms", "3600000")];

/// The Kafka store of slot records.
pub struct KafkaRecordStore {
    topic: String,
    bootstrap: String,
    producer: FutureProducer,
    reader_config: ClientConfig,
}

impl std::fmt::Debug for KafkaRecordStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaRecordStore")
            .field("topic", &self.topic)
            .field("bootstrap", &self.bootstrap)
            .finish_non_exhaustive()
    }
}

/// User properties that also apply to consumers and admin clients
/// (security and connection settings), as `walcast tail` uses them.
fn common_properties(cfg: &KafkaConfig, c: &mut ClientConfig) {
    const PREFIXES: &[&str] = &[
        "security.",
        "sasl.",
        "ssl.",
        "socket.",
        "broker.",
        "client.",
        "reconnect.",
        "metadata.",
        "api.version",
        "enable.ssl",
    ];
    for (k, v) in &cfg.properties {
        if PREFIXES.iter().any(|p| k.starts_with(p)) {
            c.set(k, v);
        }
    }
}

/// The reader's context: reaching the end of a partition is how a read
/// ends, not an error worth a log line.
#[derive(Debug, Clone, Copy, Default)]
struct ReaderContext;

impl ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let eof = matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        );
        if !eof {
            tracing::error!("librdkafka (state topic reader): {error}: {reason}");
        }
    }
}

impl ConsumerContext for ReaderContext {}

type Reader = BaseConsumer<ReaderContext>;

fn reader(config: &ClientConfig) -> Result<Reader> {
    config.create_with_context(ReaderContext).map_err(|e| {
        Error::operator("the Kafka consumer configuration was rejected")
            .with_source(e)
            .with_hint("check [kafka] and kafka.properties")
    })
}

/// Partitions of `topic`; `None` when it does not exist.
fn partitions(consumer: &Reader, topic: &str, bootstrap: &str) -> Result<Option<Vec<i32>>> {
    let md = consumer
        .fetch_metadata(Some(topic), STATE_IO_TIMEOUT)
        .map_err(|e| {
            kafka_error(
                ErrorKind::Retryable,
                format!(
                    "cannot read the metadata of Kafka topic {topic} (pipeline.state_topic) at {bootstrap}"
                ),
                e,
            )
        })?;
    let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    match t.error().map(RDKafkaErrorCode::from) {
        None => Ok(Some(t.partitions().iter().map(|p| p.id()).collect())),
        Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => Ok(None),
        Some(RDKafkaErrorCode::TopicAuthorizationFailed) => Err(Error::operator(format!(
            "walcast may not read Kafka topic {topic} (pipeline.state_topic)"
        ))
        .with_hint(format!(
            "grant walcast's principal Describe, Read and Write on topic {topic} (it keeps walcast's slot records there)"
        ))),
        Some(other) => Err(Error::retryable(format!(
            "Kafka topic {topic} (pipeline.state_topic) is not available: {other}"
        ))),
    }
}

fn key_bytes(key: &SlotKey) -> Vec<u8> {
    serde_json::to_vec(&(&key.database, &key.slot)).unwrap_or_default()
}

fn create_command(bootstrap: &str, topic: &str) -> String {
    let configs: Vec<String> = TOPIC_CONFIGS
        .iter()
        .map(|(k, v)| format!("--config {k}={v}"))
        .collect();
    format!(
        "kafka-topics.sh --bootstrap-server {bootstrap} --create --topic {topic} --partitions 1 {}",
        configs.join(" ")
    )
}

fn kafka_error(kind: ErrorKind, message: String, e: KafkaError) -> Error {
    Error::new(kind, message).with_source(e)
}

impl KafkaRecordStore {
    /// Connects to the cluster and makes sure the state topic exists and is
    /// compacted (creates it when it is missing).
    ///
    /// # Errors
    /// An operator error when the topic is missing and cannot be created (it
    /// names the `kafka-topics.sh` command), or exists without compaction; a
    /// retryable one when Kafka is unreachable.
    pub async fn open(cfg: &KafkaConfig, topic: &str) -> Result<Self> {
        let mut reader_config = ClientConfig::new();
        reader_config
            .set("bootstrap.servers", &cfg.bootstrap_servers)
            .set("client.id", "walcast-state")
            .set("group.id", "walcast-state-reader")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            // The read ends with an empty fetch: do not let the broker hold it.
            .set("fetch.wait.max.ms", "10")
            .set("auto.offset.reset", "earliest")
            .set("allow.auto.create.topics", "false");
        common_properties(cfg, &mut reader_config);
        let mut producer_config = ClientConfig::new();
        producer_config
            .set("bootstrap.servers", &cfg.bootstrap_servers)
            .set("client.id", "walcast-state");
        for (k, v) in &cfg.properties {
            producer_config.set(k, v);
        }
        producer_config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "0")
            .set(
                "message.timeout.ms",
                STATE_IO_TIMEOUT.as_millis().to_string(),
            );
        let producer: FutureProducer = producer_config.create().map_err(|e| {
            Error::operator("the Kafka producer configuration was rejected")
                .with_source(e)
                .with_hint("check [kafka] and kafka.properties")
        })?;
        let store = KafkaRecordStore {
            topic: topic.to_string(),
            bootstrap: cfg.bootstrap_servers.clone(),
            producer,
            reader_config,
        };
        store.ensure_topic(cfg).await?;
        Ok(store)
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    fn reader(&self) -> Result<Reader> {
        reader(&self.reader_config)
    }

    fn partitions(&self, consumer: &Reader) -> Result<Option<Vec<i32>>> {
        partitions(consumer, &self.topic, &self.bootstrap)
    }

    async fn ensure_topic(&self, cfg: &KafkaConfig) -> Result<()> {
        let (config, topic, bootstrap) = (
            self.reader_config.clone(),
            self.topic.clone(),
            self.bootstrap.clone(),
        );
        let existing =
            tokio::task::spawn_blocking(move || partitions(&reader(&config)?, &topic, &bootstrap))
                .await
                .map_err(|e| {
                    Error::retryable("reading the state topic's metadata failed").with_source(e)
                })??;
        let mut admin_config = ClientConfig::new();
        admin_config.set("bootstrap.servers", &cfg.bootstrap_servers);
        common_properties(cfg, &mut admin_config);
        let admin: AdminClient<DefaultClientContext> = admin_config.create().map_err(|e| {
            Error::operator("the Kafka admin client configuration was rejected").with_source(e)
        })?;
        let opts = AdminOptions::new().operation_timeout(Some(STATE_IO_TIMEOUT));
        if existing.is_none() {
            let mut new = NewTopic::new(&self.topic, 1, TopicReplication::Fixed(-1));
            for (k, v) in TOPIC_CONFIGS {
                new = new.set(k, v);
            }
            let results = admin.create_topics([&new], &opts).await.map_err(|e| {
                kafka_error(
                    ErrorKind::Retryable,
                    format!(
                        "cannot create Kafka topic {} (pipeline.state_topic)",
                        self.topic
                    ),
                    e,
                )
            })?;
            for r in results {
                match r {
                    Ok(_) => {
                        tracing::info!(topic = %self.topic, "created the compacted state topic (walcast's slot records)");
                    }
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((_, code)) => {
                        let kind = match code {
                            RDKafkaErrorCode::TopicAuthorizationFailed
                            | RDKafkaErrorCode::ClusterAuthorizationFailed
                            | RDKafkaErrorCode::PolicyViolation
                            | RDKafkaErrorCode::InvalidReplicationFactor
                            | RDKafkaErrorCode::InvalidConfig => ErrorKind::OperatorAction,
                            _ => ErrorKind::Retryable,
                        };
                        return Err(Error::new(
                            kind,
                            format!(
                                "Kafka topic {} (pipeline.state_topic) does not exist and walcast cannot create it: {code}",
                                self.topic
                            ),
                        )
                        .with_hint(format!(
                            "create it as a Kafka administrator: {}; and grant walcast's principal Describe, Read and Write on it. walcast keeps its slot records there so that a lost slot is never silently replaced",
                            create_command(&self.bootstrap, &self.topic)
                        )));
                    }
                }
            }
        }
        if existing.is_none() {
            // Created just now with cleanup.policy=compact. On a cluster of
            // several brokers the one that answers the next metadata request
            // may not know the topic yet: wait until it shows (reading the
            // records right after would call the new topic missing).
            let deadline = std::time::Instant::now() + STATE_IO_TIMEOUT;
            loop {
                let (config, topic, bootstrap) = (
                    self.reader_config.clone(),
                    self.topic.clone(),
                    self.bootstrap.clone(),
                );
                let seen = tokio::task::spawn_blocking(move || {
                    partitions(&reader(&config)?, &topic, &bootstrap)
                })
                .await
                .map_err(|e| {
                    Error::retryable("reading the state topic's metadata failed").with_source(e)
                })?;
                if matches!(seen, Ok(Some(ref p)) if !p.is_empty()) {
                    return Ok(());
                }
                if std::time::Instant::now() >= deadline {
                    return Err(Error::retryable(format!(
                        "Kafka topic {} (pipeline.state_topic) was created but the brokers do not show it yet",
                        self.topic
                    ))
                    .with_hint("walcast retries with backoff; if this persists, check the cluster's controller and brokers"));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        // An existing topic must be compacted, or its records expire.
        let spec = ResourceSpecifier::Topic(&self.topic);
        let mut described = admin.describe_configs([&spec], &opts).await;
        for _ in 0..10 {
            // No value yet: the answering broker has not caught up with the
            // topic's configuration (right after it was created elsewhere).
            let unknown = matches!(&described, Ok(results) if results.iter().flatten().any(|r| {
                r.get("cleanup.policy").and_then(|e| e.value.as_deref()).unwrap_or("").is_empty()
            }));
            if !unknown {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            described = admin.describe_configs([&spec], &opts).await;
        }
        match described {
            Ok(results) => {
                for r in results.into_iter().flatten() {
                    let policy = r
                        .get("cleanup.policy")
                        .and_then(|e| e.value.clone())
                        .unwrap_or_default();
                    if policy.is_empty() {
                        tracing::warn!(topic = %self.topic, "Kafka does not show the state topic's cleanup.policy yet; make sure it is compacted (cleanup.policy=compact)");
                        continue;
                    }
                    if !policy.split(',').any(|p| p.trim() == "compact") {
                        return Err(Error::operator(format!(
                            "Kafka topic {} (pipeline.state_topic) has cleanup.policy = {policy:?}: walcast's slot records would expire",
                            self.topic
                        ))
                        .with_hint(format!(
                            "make it compacted: kafka-configs.sh --bootstrap-server {} --alter --entity-type topics --entity-name {} --add-config cleanup.policy=compact; or point pipeline.state_topic at a compacted topic",
                            self.bootstrap, self.topic
                        )));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(topic = %self.topic, error = %e, "cannot read the state topic's configuration; make sure it is compacted (cleanup.policy=compact)");
            }
        }
        Ok(())
    }

    fn read_last(&self, key: &SlotKey) -> Result<Option<SlotRecord>> {
        let consumer = self.reader()?;
        let Some(partitions) = self.partitions(&consumer)? else {
            return Err(Error::operator(format!(
                "Kafka topic {} (pipeline.state_topic) does not exist",
                self.topic
            ))
            .with_hint(format!(
                "it holds walcast's slot records; if it was deleted, walcast can no longer tell whether its slots were replaced. Recreate it ({}) and restore the state directory's copy",
                create_command(&self.bootstrap, &self.topic)
            )));
        };
        let unavailable = |e: KafkaError| {
            kafka_error(
                ErrorKind::Retryable,
                format!(
                    "cannot read Kafka topic {} (pipeline.state_topic)",
                    self.topic
                ),
                e,
            )
        };
        let mut tpl = TopicPartitionList::new();
        let mut pending = std::collections::HashSet::new();
        for p in partitions {
            let (low, high) = consumer
                .fetch_watermarks(&self.topic, p, STATE_IO_TIMEOUT)
                .map_err(unavailable)?;
            if high > low {
                tpl.add_partition_offset(&self.topic, p, Offset::Beginning)
                    .map_err(unavailable)?;
                pending.insert(p);
            }
        }
        if pending.is_empty() {
            return Ok(None);
        }
        consumer.assign(&tpl).map_err(unavailable)?;
        let want = key_bytes(key);
        let mut last: Option<Option<Vec<u8>>> = None;
        let deadline = Instant::now() + STATE_IO_TIMEOUT;
        while !pending.is_empty() {
            if Instant::now() >= deadline {
                return Err(Error::retryable(format!(
                    "reading Kafka topic {} (pipeline.state_topic) did not reach its end within {}s",
                    self.topic,
                    STATE_IO_TIMEOUT.as_secs()
                )));
            }
            match consumer.poll(Duration::from_millis(200)) {
                None => {}
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    pending.remove(&p);
                }
                Some(Err(e)) => return Err(unavailable(e)),
                Some(Ok(m)) if m.key() == Some(&want[..]) => {
                    last = Some(m.payload().map(<[u8]>::to_vec));
                }
                Some(Ok(_)) => {}
            }
        }
        let Some(Some(bytes)) = last else {
            return Ok(None);
        };
        let mut rec: SlotRecord = serde_json::from_slice(&bytes).map_err(|e| {
            Error::operator(format!(
                "walcast's record of {key} in Kafka topic {} is corrupt",
                self.topic
            ))
            .with_source(e)
            .with_hint("restore it, or write a tombstone for its key only if the state directory's copy is intact")
        })?;
        rec.origin = self.describe(key);
        Ok(Some(rec))
    }

    fn write(&self, key: &SlotKey, value: Option<&[u8]>) -> Result<()> {
        let k = key_bytes(key);
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).key(&k[..]);
        if let Some(v) = value {
            record = record.payload(v);
        }
        let delivery = self.producer.send_result(record).map_err(|(e, _)| {
            kafka_error(
                crate::classify(&e),
                format!(
                    "cannot write walcast's slot record to Kafka topic {}",
                    self.topic
                ),
                e,
            )
        })?;
        match futures::executor::block_on(delivery) {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => {
                let kind = crate::classify(&e);
                Err(kafka_error(
                    kind,
                    format!(
                        "Kafka did not accept walcast's slot record for topic {}",
                        self.topic
                    ),
                    e,
                )
                .with_hint(match kind {
                    ErrorKind::OperatorAction => {
                        format!("grant walcast's principal Write on topic {}", self.topic)
                    }
                    _ => "walcast retries; the slot is not advanced until the record is written"
                        .into(),
                }))
            }
            Err(_) => Err(Error::retryable(
                "the state producer was closed before the slot record was acknowledged",
            )),
        }
    }
}

impl SlotRecordStore for KafkaRecordStore {
    fn describe(&self, _key: &SlotKey) -> String {
        format!("Kafka topic {}", self.topic)
    }

    fn load(&self, key: &SlotKey) -> Result<Option<SlotRecord>> {
        let rec = self.read_last(key)?;
        if let Some(r) = &rec {
            if r.key() != *key {
                return Err(Error::operator(format!(
                    "walcast's record for {key} in Kafka topic {} names {}",
                    self.topic,
                    r.key()
                )));
            }
        }
        Ok(rec)
    }

    fn save(&self, record: &SlotRecord) -> Result<()> {
        let bytes = serde_json::to_vec(record)
            .map_err(|e| Error::operator("cannot encode the slot record").with_source(e))?;
        self.write(&record.key(), Some(&bytes))
    }

    fn forget(&self, key: &SlotKey) -> Result<bool> {
        let had = self.read_last(key)?.is_some();
        if had {
            self.write(key, None)?;
        }
        Ok(had)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unambiguous_json() {
        let a = key_bytes(&SlotKey {
            database: "a\",\"b".into(),
            slot: "c".into(),
        });
        let b = key_bytes(&SlotKey {
            database: "a".into(),
            slot: "b\",\"c".into(),
        });
        assert_ne!(a, b);
        assert_eq!(
            key_bytes(&SlotKey {
                database: "app".into(),
                slot: "walcast".into()
            }),
            br#"["app","walcast"]"#
        );
    }

    #[test]
    fn the_create_command_names_compaction() {
        let c = create_command("k:9092", "walcast.state");
        assert!(
            c.contains("--topic walcast.state") && c.contains("cleanup.policy=compact"),
            "{c}"
        );
    }
}
