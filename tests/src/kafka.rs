//! A real rdkafka consumer and admin helpers for assertions.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

/// One consumed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Value.
    pub value: Option<Vec<u8>>,
    /// Headers in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// When the broker appended it (ms since the epoch), on topics with
    /// `message.timestamp.type = LogAppendTime`; `None` on others.
    pub appended_ms: Option<i64>,
    /// The record's own timestamp (ms since the epoch) on topics with
    /// `CreateTime` (the default); `None` on others.
    pub create_ms: Option<i64>,
}

impl Record {
    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
    /// The key as text.
    pub fn key_str(&self) -> String {
        String::from_utf8_lossy(self.key.as_deref().unwrap_or_default()).into_owned()
    }
    /// The value parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(self.value.as_deref().unwrap_or_default())
            .unwrap_or(serde_json::Value::Null)
    }
}

/// Creates topics (idempotent) with `partitions` partitions, replication factor 1.
pub async fn create_topics(bootstrap: &str, topics: &[&str], partitions: i32) -> Result<()> {
    create_topics_with(bootstrap, topics, partitions, 1, &[]).await
}

/// Creates topics (idempotent) with a replication factor and topic configs.
pub async fn create_topics_with<S: AsRef<str>>(
    bootstrap: &str,
    topics: &[S],
    partitions: i32,
    replication: i32,
    configs: &[(&str, &str)],
) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .context("creating the admin client")?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| {
            let mut n = NewTopic::new(t.as_ref(), partitions, TopicReplication::Fixed(replication));
            for (k, v) in configs {
                n = n.set(k, v);
            }
            n
        })
        .collect();
    // A cluster that was just started may not have registered all of its
    // brokers yet: a replication factor above the brokers seen so far is
    // refused with InvalidReplicationFactor until they are (up to 60 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let results = admin
            .create_topics(
                &new,
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
            )
            .await
            .context("create_topics")?;
        let mut retry = false;
        for r in results {
            if let Err((topic, code)) = r {
                match code {
                    rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists => {}
                    rdkafka::types::RDKafkaErrorCode::InvalidReplicationFactor
                        if replication > 1 && std::time::Instant::now() < deadline =>
                    {
                        retry = true;
                    }
                    _ => bail!("creating topic {topic}: {code}"),
                }
            }
        }
        if !retry {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn admin(bootstrap: &str) -> Result<AdminClient<DefaultClientContext>> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .context("creating the admin client")
}

/// Sets topic configs (AlterConfigs: the listed keys replace the topic's
/// overrides) and waits until the cluster reports them.
pub async fn alter_topic_config(
    bootstrap: &str,
    topic: &str,
    configs: &[(&str, &str)],
) -> Result<()> {
    let admin = admin(bootstrap)?;
    let mut alter = AlterConfig::new(ResourceSpecifier::Topic(topic));
    for (k, v) in configs {
        alter = alter.set(k, v);
    }
    let results = admin
        .alter_configs(
            [&alter],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .context("alter_configs")?;
    for r in results {
        if let Err((_, code)) = r {
            bail!("altering topic {topic}: {code}");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut all = true;
        for (k, v) in configs {
            all &= topic_config(bootstrap, topic, k).await?.as_deref() == Some(*v);
        }
        if all {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("topic {topic} does not report {configs:?} after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Grows `topic` to `partitions` partitions and waits until the cluster's
/// metadata reports them.
pub async fn add_partitions(bootstrap: &str, topic: &str, partitions: usize) -> Result<()> {
    let admin = admin(bootstrap)?;
    let results = admin
        .create_partitions(
            [&rdkafka::admin::NewPartitions::new(topic, partitions)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .context("create_partitions")?;
    for r in results {
        if let Err((_, code)) = r {
            bail!("adding partitions to topic {topic}: {code}");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let md = admin
            .inner()
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .with_context(|| format!("metadata for {topic}"))?;
        if md.topics().first().map(|t| t.partitions().len()) == Some(partitions) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("topic {topic} does not report {partitions} partitions after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One config value of a topic, as the cluster reports it.
pub async fn topic_config(bootstrap: &str, topic: &str, key: &str) -> Result<Option<String>> {
    let admin = admin(bootstrap)?;
    let mut results = admin
        .describe_configs(
            [&ResourceSpecifier::Topic(topic)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .context("describe_configs")?;
    let r = results
        .pop()
        .context("no result")?
        .map_err(|code| anyhow::anyhow!("describing topic {topic}: {code}"))?;
    Ok(r.get(key).and_then(|e| e.value.clone()))
}

/// Reads topics from the beginning and keeps what it read.
pub struct TopicReader {
    consumer: BaseConsumer,
    topics: Vec<String>,
    /// Everything read so far, in arrival order (per partition: offset order).
    pub records: Vec<Record>,
    /// The offset after the last record read, per partition: a record below
    /// it (fetched again after a seek) is not kept twice.
    next: HashMap<(String, i32), i64>,
    /// When a record was last read (or the reader last looked for stalls).
    progress: Instant,
}

/// How long the reader may read nothing, while the broker has records it has
/// not read, before it looks for partitions its fetcher stopped on.
const STALL: Duration = Duration::from_secs(10);

impl std::fmt::Debug for TopicReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicReader")
            .field("topics", &self.topics)
            .field("records", &self.records.len())
            .finish()
    }
}

impl TopicReader {
    /// Assigns every partition of `topics` from the beginning. The topics
    /// must exist (see [`create_topics`]).
    pub fn new(bootstrap: &str, topics: &[&str]) -> Result<TopicReader> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", format!("walcast-test-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest")
            .create()
            .context("creating the consumer")?;
        let mut tpl = TopicPartitionList::new();
        for t in topics {
            let md = consumer
                .fetch_metadata(Some(t), Duration::from_secs(10))
                .with_context(|| format!("metadata for {t}"))?;
            let parts = md
                .topics()
                .first()
                .map(|m| m.partitions().len())
                .unwrap_or(0);
            if parts == 0 {
                bail!("topic {t} has no partitions (does it exist?)");
            }
            for p in 0..parts as i32 {
                tpl.add_partition_offset(t, p, Offset::Beginning)?;
            }
        }
        consumer.assign(&tpl).context("assign")?;
        Ok(TopicReader {
            consumer,
            topics: topics.iter().map(|s| s.to_string()).collect(),
            records: Vec::new(),
            next: HashMap::new(),
            progress: Instant::now(),
        })
    }

    /// After [`STALL`] without a record: each partition whose high watermark
    /// is above what was read is sought back to the first offset not read,
    /// and the positions are printed. A fetcher that stopped on a partition
    /// (seen under the suite's load: records in the broker that the consumer
    /// never returned) resumes; records it already fetched are not kept
    /// twice (see `next`), so this can neither invent nor hide a record.
    fn unstick_if_stalled(&mut self) {
        if self.progress.elapsed() < STALL {
            return;
        }
        self.progress = Instant::now();
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        let positions = self.consumer.position().ok();
        for e in assignment.elements() {
            let (t, p) = (e.topic().to_string(), e.partition());
            let Ok((low, high)) = self
                .consumer
                .fetch_watermarks(&t, p, Duration::from_secs(5))
            else {
                continue;
            };
            let at = self.next.get(&(t.clone(), p)).copied().unwrap_or(0);
            if at >= high {
                continue;
            }
            let position = positions
                .as_ref()
                .and_then(|l| l.find_partition(&t, p))
                .map(|e| format!("{:?}", e.offset()));
            let to = if at <= low {
                Offset::Beginning
            } else {
                Offset::Offset(at)
            };
            eprintln!(
                "TopicReader: nothing read for {STALL:?} while {t}/{p} has records {at}..{high} unread (consumer position {position:?}); seeking to {to:?}"
            );
            if let Err(e) = self.consumer.seek(&t, p, to, Duration::from_secs(5)) {
                eprintln!("TopicReader: seeking {t}/{p}: {e}");
            }
        }
    }

    fn poll_once(&mut self, timeout: Duration) -> Result<bool> {
        match self.consumer.poll(timeout) {
            None => Ok(false),
            Some(Err(e)) => {
                // Transient broker errors while a broker restarts are expected.
                eprintln!("consumer error (ignored): {e}");
                Ok(false)
            }
            Some(Ok(m)) => {
                let next = self
                    .next
                    .entry((m.topic().to_string(), m.partition()))
                    .or_insert(0);
                if m.offset() < *next {
                    // Fetched again after a seek.
                    return Ok(false);
                }
                *next = m.offset() + 1;
                self.progress = Instant::now();
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (
                                    h.key.to_string(),
                                    h.value.map(|v| v.to_vec()).unwrap_or_default(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                self.records.push(Record {
                    topic: m.topic().to_string(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(|k| k.to_vec()),
                    value: m.payload().map(|v| v.to_vec()),
                    headers,
                    appended_ms: match m.timestamp() {
                        rdkafka::Timestamp::LogAppendTime(ms) => Some(ms),
                        _ => None,
                    },
                    create_ms: match m.timestamp() {
                        rdkafka::Timestamp::CreateTime(ms) => Some(ms),
                        _ => None,
                    },
                });
                Ok(true)
            }
        }
    }

    /// Reads until `done(&records)` or the timeout; returns whether `done` held.
    pub fn read_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&[Record]) -> bool,
    ) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        self.progress = Instant::now();
        while !done(&self.records) {
            if Instant::now() >= deadline {
                return Ok(false);
            }
            if !self.poll_once(Duration::from_millis(200))? {
                self.unstick_if_stalled();
            }
        }
        Ok(true)
    }

    /// Reads until at least `n` records arrived (or the timeout).
    pub fn read_at_least(&mut self, n: usize, timeout: Duration) -> Result<bool> {
        self.read_until(timeout, |r| r.len() >= n)
    }

    /// Reads everything up to the partitions' current high watermarks: after
    /// this, `records` holds all that Kafka had when it was called.
    pub fn read_to_end(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        self.progress = Instant::now();
        let mut high: HashMap<(String, i32), i64> = HashMap::new();
        for t in self.topics.clone() {
            let md = self
                .consumer
                .fetch_metadata(Some(&t), Duration::from_secs(10))?;
            let parts = md
                .topics()
                .first()
                .map(|m| m.partitions().len())
                .unwrap_or(0);
            for p in 0..parts as i32 {
                let (_, h) = self
                    .consumer
                    .fetch_watermarks(&t, p, Duration::from_secs(10))
                    .with_context(|| format!("watermarks of {t}/{p}"))?;
                high.insert((t.clone(), p), h);
            }
        }
        loop {
            let next = &self.next;
            let done = high
                .iter()
                .all(|(k, h)| *h == 0 || next.get(k).copied().unwrap_or(0) >= *h);
            if done {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let positions = self.consumer.position().ok().map(|l| {
                    l.elements()
                        .iter()
                        .map(|e| format!("{}/{}: {:?}", e.topic(), e.partition(), e.offset()))
                        .collect::<Vec<_>>()
                });
                bail!(
                    "could not read to the high watermarks {high:?} in time (at {next:?}; consumer positions {positions:?})"
                );
            }
            if !self.poll_once(Duration::from_millis(200))? {
                self.unstick_if_stalled();
            }
        }
    }
}

/// The key of walcast's slot record in its state topic (`["database","slot"]`).
pub fn state_key(database: &str, slot: &str) -> Vec<u8> {
    serde_json::to_vec(&(database, slot)).expect("a JSON array of two strings")
}

/// walcast's slot record for (database, slot) in the state topic: the last
/// value of its key (`None`: no record, or a tombstone).
pub fn read_state_record(
    bootstrap: &str,
    topic: &str,
    database: &str,
    slot: &str,
) -> Result<Option<serde_json::Value>> {
    let mut reader = TopicReader::new(bootstrap, &[topic])?;
    reader.read_to_end(Duration::from_secs(60))?;
    let key = state_key(database, slot);
    Ok(reader
        .records
        .iter()
        .rev()
        .find(|r| r.key.as_deref() == Some(&key[..]))
        .and_then(|r| r.value.as_deref())
        .map(serde_json::from_slice)
        .transpose()?)
}

/// Writes walcast's slot record for (database, slot) to the state topic
/// (`None`: a tombstone), as a test doctoring the record.
pub async fn write_state_record(
    bootstrap: &str,
    topic: &str,
    database: &str,
    slot: &str,
    value: Option<&serde_json::Value>,
) -> Result<()> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .create()
        .context("creating the producer")?;
    let key = state_key(database, slot);
    let bytes = value.map(serde_json::to_vec).transpose()?;
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).key(&key[..]);
    if let Some(b) = &bytes {
        record = record.payload(&b[..]);
    }
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| anyhow::anyhow!("writing the state record: {e}"))?;
    Ok(())
}
