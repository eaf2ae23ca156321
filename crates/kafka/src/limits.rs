//! Record size limits: how large Kafka will let a record (batch) be, read from
//! the cluster, and how large walcast's records are.
//!
//! The broker checks each record batch (compressed, as written) against the
//! topic's `max.message.bytes`, and rejects the whole batch when it is larger.
//! So walcast (1) checks each event against its topic's limit before it is
//! produced, like the Java producer's `ensureValidRecordSize` (uncompressed
//! upper bound of a batch holding only that record), and (2) caps the
//! producer's `batch.size` below the smallest limit it knows, so that small
//! records never form a batch the broker rejects.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, OwnedResourceSpecifier, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::metadata::Metadata;
use rdkafka::types::RDKafkaErrorCode;
use walcast_core::route::{OutboxEvent, TopicMatcher};
use walcast_core::{Error, Result};

/// librdkafka's default `message.max.bytes` (the producer's own record limit).
pub const DEFAULT_PRODUCER_MESSAGE_MAX_BYTES: u64 = 1_000_000;
/// librdkafka's default `batch.size`.
pub const DEFAULT_BATCH_SIZE: u64 = 1_000_000;
/// Kafka's default broker `message.max.bytes` (the default of every topic's
/// `max.message.bytes`), assumed when the broker's configuration cannot be read.
pub const KAFKA_DEFAULT_MAX_MESSAGE_BYTES: u64 = 1_048_588;

/// The fixed part of a v2 record batch (Java's `RECORD_BATCH_OVERHEAD`).
const RECORD_BATCH_OVERHEAD: u64 = 61;
/// A record's largest fixed overhead (Java's `DefaultRecord.MAX_RECORD_OVERHEAD`:
/// length, attributes, timestamp and offset deltas).
const MAX_RECORD_OVERHEAD: u64 = 21;

/// Bytes of a zig-zag varint (the record format's lengths).
fn varint_len(v: i64) -> u64 {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    let mut n = 1;
    while z >= 0x80 {
        z >>= 7;
        n += 1;
    }
    n
}

/// The size of a record batch holding only this record, uncompressed: the
/// upper bound the Java producer checks (`estimateSizeInBytesUpperBound`)
/// and at least what librdkafka checks against `message.max.bytes`.
pub fn record_size_estimate<'a>(
    key_len: usize,
    value_len: usize,
    headers: impl IntoIterator<Item = (usize, usize)> + 'a,
) -> u64 {
    let (k, v) = (key_len as i64, value_len as i64);
    let mut size = RECORD_BATCH_OVERHEAD
        + MAX_RECORD_OVERHEAD
        + varint_len(k)
        + k as u64
        + varint_len(v)
        + v as u64;
    let mut count = 0;
    for (name, value) in headers {
        count += 1;
        size += varint_len(name as i64) + name as u64 + varint_len(value as i64) + value as u64;
    }
    size + varint_len(count)
}

/// [`record_size_estimate`] of an event.
pub fn event_size_estimate(event: &OutboxEvent) -> u64 {
    record_size_estimate(
        event.key.len(),
        event.payload.len(),
        event.headers.iter().map(|h| (h.name.len(), h.value.len())),
    )
}

/// The largest `batch.size` that keeps a batch of small records under a
/// topic limit of `limit` bytes: a margin for compression growth of
/// incompressible data (a few per mille for lz4/zstd/snappy/gzip) and for
/// framing, never below half the limit.
pub fn batch_cap(limit: u64) -> u64 {
    limit
        .saturating_sub(limit / 50 + 1024)
        .max(limit / 2)
        .max(1)
}

/// Where a topic's limit came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitSource {
    /// The topic's `max.message.bytes` as the cluster reported it.
    Topic,
    /// The topic does not exist yet: the brokers' `message.max.bytes`, which
    /// an auto-created topic gets.
    BrokerDefault,
    /// walcast could not read it (no DescribeConfigs permission): Kafka's
    /// default is assumed for sizing batches, but records are not refused
    /// by it (the broker remains the judge).
    Assumed,
}

/// One topic's record batch limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicLimit {
    /// Bytes.
    pub bytes: u64,
    /// Where it came from.
    pub source: LimitSource,
    /// The record timestamps the topic accepts (unbounded for a
    /// `LogAppendTime` topic), when walcast read its configuration; `None`:
    /// unknown, not checked before producing.
    pub timestamps: Option<TimestampWindow>,
}

/// How far a record's timestamp may lie before or after the broker's clock
/// for a `CreateTime` topic (`message.timestamp.before.max.ms` and
/// `message.timestamp.after.max.ms`; Kafka 4 defaults the latter to one
/// hour). The broker refuses a record outside it with `INVALID_TIMESTAMP`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimestampWindow {
    /// `message.timestamp.before.max.ms`.
    pub before_ms: i64,
    /// `message.timestamp.after.max.ms`.
    pub after_ms: i64,
}

/// Clock difference walcast allows between its host and the brokers before
/// it refuses a record timestamp itself; closer to the window's edge the
/// broker decides (a refusal there is retryable, see `lib.rs`).
pub const TIMESTAMP_TOLERANCE_MS: i64 = 5_000;

impl TimestampWindow {
    /// A window that refuses nothing.
    pub const UNBOUNDED: TimestampWindow = TimestampWindow {
        before_ms: i64::MAX,
        after_ms: i64::MAX,
    };

    /// Why the topic refuses a record with timestamp `ts_ms` at `now_ms`
    /// (this host's clock): the setting it breaks and by how much, or `None`
    /// when it is inside the window (or within the tolerance of its edge).
    pub fn refuses(&self, ts_ms: i64, now_ms: i64) -> Option<(&'static str, i64, i64)> {
        let ahead = ts_ms.saturating_sub(now_ms);
        if ahead > self.after_ms.saturating_add(TIMESTAMP_TOLERANCE_MS) {
            return Some(("message.timestamp.after.max.ms", ahead, self.after_ms));
        }
        let behind = now_ms.saturating_sub(ts_ms);
        if behind > self.before_ms.saturating_add(TIMESTAMP_TOLERANCE_MS) {
            return Some(("message.timestamp.before.max.ms", behind, self.before_ms));
        }
        None
    }

    /// The window both `self` and `other` accept.
    pub fn narrower(self, other: TimestampWindow) -> TimestampWindow {
        TimestampWindow {
            before_ms: self.before_ms.min(other.before_ms),
            after_ms: self.after_ms.min(other.after_ms),
        }
    }

    /// Whether it bounds anything (Kafka's defaults before 4.0 did not).
    pub fn is_bounded(&self) -> bool {
        self.before_ms < i64::MAX || self.after_ms < i64::MAX
    }
}

/// A duration in ms as text for messages: whole days, hours or minutes
/// (rounded down from two units on, exact below), else milliseconds.
pub(crate) fn span(ms: i64) -> String {
    for (unit_ms, unit) in [(86_400_000, "day"), (3_600_000, "hour"), (60_000, "minute")] {
        if ms >= 2 * unit_ms || (ms >= unit_ms && ms % unit_ms == 0) {
            let n = ms / unit_ms;
            return format!("{n} {unit}{}", if n == 1 { "" } else { "s" });
        }
    }
    format!("{ms} ms")
}

/// The timestamp window in a topic's configuration (unbounded for a
/// `LogAppendTime` topic: the broker stamps records itself and checks
/// nothing), `None` when the settings are missing.
/// `prefix` is `""` for a topic's settings, `"log."` for a broker's
/// defaults (which a topic created later gets).
fn timestamp_window(res: &rdkafka::admin::ConfigResource, prefix: &str) -> Option<TimestampWindow> {
    let get = |k: &str| {
        res.get(&format!("{prefix}{k}"))
            .and_then(|e| e.value.as_deref())
    };
    if get("message.timestamp.type").is_some_and(|t| t.trim() == "LogAppendTime") {
        return Some(TimestampWindow::UNBOUNDED);
    }
    let ms = |k: &str| {
        get(k)
            .and_then(|v| v.trim().parse::<i64>().ok())
            .filter(|v| *v >= 0)
    };
    // Kafka before 3.6 had only message.timestamp.difference.max.ms, for
    // both directions.
    let both = ms("message.timestamp.difference.max.ms");
    Some(TimestampWindow {
        before_ms: ms("message.timestamp.before.max.ms").or(both)?,
        after_ms: ms("message.timestamp.after.max.ms").or(both)?,
    })
}

#[derive(Debug, Default)]
struct Known {
    topics: HashMap<String, TopicLimit>,
    broker_default: Option<u64>,
    broker_timestamps: Option<TimestampWindow>,
}

/// The record size limits walcast knows, shared by the sinks of one process:
/// a limit learnt by one pipeline run sizes the producer of the next.
#[derive(Debug, Clone, Default)]
pub struct TopicLimits {
    inner: Arc<Mutex<Known>>,
}

impl TopicLimits {
    /// The limit recorded for `topic`.
    pub fn get(&self, topic: &str) -> Option<TopicLimit> {
        self.inner.lock().unwrap().topics.get(topic).copied()
    }

    /// Records `topic`'s limit.
    pub fn insert(&self, topic: &str, limit: TopicLimit) {
        self.inner
            .lock()
            .unwrap()
            .topics
            .insert(topic.to_string(), limit);
    }

    /// The brokers' default (`message.max.bytes`), when read.
    pub fn broker_default(&self) -> Option<u64> {
        self.inner.lock().unwrap().broker_default
    }

    /// Records the brokers' default.
    pub fn set_broker_default(&self, bytes: u64) {
        self.inner.lock().unwrap().broker_default = Some(bytes);
    }

    /// The brokers' default timestamp window (`log.message.timestamp.*`),
    /// when read.
    pub fn broker_timestamps(&self) -> Option<TimestampWindow> {
        self.inner.lock().unwrap().broker_timestamps
    }

    /// The smallest limit known (topics and the brokers' default), if any.
    pub fn smallest(&self) -> Option<u64> {
        let k = self.inner.lock().unwrap();
        k.topics
            .values()
            .map(|l| l.bytes)
            .chain(k.broker_default)
            .min()
    }
}

/// The admin client walcast reads topic configurations with.
pub(crate) type Admin = AdminClient<DefaultClientContext>;

fn parse_bytes(v: Option<&str>) -> Option<u64> {
    v.and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&v| v > 0)
}

pub(crate) fn is_denied(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::GroupAuthorizationFailed
    )
}

pub(crate) fn lookup_error(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::retryable(format!("cannot read {what} from Kafka"))
        .with_source(e)
        .with_hint("walcast reads each outbox topic's max.message.bytes to check record sizes before producing; it retries with backoff. Check the brokers and that walcast's principal may DescribeConfigs")
}

/// The cluster's metadata (brokers, topics, partitions and replicas).
///
/// # Errors
/// A retryable error naming `bootstrap` when the cluster does not answer
/// within `timeout`.
pub(crate) async fn fetch_metadata(
    admin: &Arc<Admin>,
    bootstrap: &str,
    timeout: Duration,
) -> Result<Metadata> {
    let admin = admin.clone();
    blocking_metadata(move || admin.inner().fetch_metadata(None, timeout))
        .await?
        .map_err(|e| {
            Error::retryable(format!(
                "cannot reach Kafka at {bootstrap} within {}s",
                timeout.as_secs()
            ))
            .with_source(e)
            .with_hint("check that the brokers run and that kafka.bootstrap_servers (and security settings in kafka.properties) are right; walcast retries with backoff")
        })
}

/// Runs a (blocking) metadata request of librdkafka's off the async threads.
async fn blocking_metadata(
    fetch: impl FnOnce() -> rdkafka::error::KafkaResult<Metadata> + Send + 'static,
) -> Result<rdkafka::error::KafkaResult<Metadata>> {
    tokio::task::spawn_blocking(fetch)
        .await
        .map_err(|e| Error::retryable("the Kafka metadata request's task failed").with_source(e))
}

/// The number of partitions of `topic`, `None` when the cluster does not
/// know the topic (it may be created when first produced to). Asked
/// through `client`, whose own view of the topic it also refreshes (the
/// producer's: a partition added since it last looked becomes usable).
///
/// # Errors
/// A retryable error naming `bootstrap` when the cluster does not answer
/// within `timeout`.
pub(crate) async fn partition_count(
    client: &crate::SinkProducer,
    bootstrap: &str,
    topic: &str,
    timeout: Duration,
) -> Result<Option<i32>> {
    use rdkafka::producer::Producer;
    let client = client.clone();
    let name = topic.to_string();
    let md = blocking_metadata(move || client.client().fetch_metadata(Some(&name), timeout))
        .await?
        .map_err(|e| {
            Error::retryable(format!(
                "cannot read topic {topic:?}'s partitions from Kafka at {bootstrap} within {}s",
                timeout.as_secs()
            ))
            .with_source(e)
            .with_hint("walcast checks the partition a row chose against its topic before producing; it retries with backoff. Check the brokers")
        })?;
    Ok(md
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
        .map(|t| i32::try_from(t.partitions().len()).unwrap_or(i32::MAX)))
}

/// Reads the brokers' `message.max.bytes` and the `max.message.bytes` of every
/// existing topic `template` can render into `limits`.
///
/// # Errors
/// A retryable error when the cluster cannot be reached or does not answer.
pub(crate) async fn read_cluster_limits(
    admin: &Arc<Admin>,
    bootstrap: &str,
    template: &dyn TopicMatcher,
    limits: &TopicLimits,
    timeout: Duration,
) -> Result<()> {
    let md = fetch_metadata(admin, bootstrap, timeout).await?;
    let brokers: Vec<i32> = md.brokers().iter().map(|b| b.id()).collect();
    let topics: Vec<String> = md
        .topics()
        .iter()
        .map(|t| t.name())
        .filter(|n| !n.starts_with("__") && template.may_render(n))
        .map(str::to_string)
        .collect();
    let opts = AdminOptions::new().request_timeout(Some(timeout));
    // The brokers' default: the smallest over the brokers (each enforces its
    // own). One request per broker: librdkafka sends a BROKER resource to that
    // broker, so two of them in one request fail with "Conflicting use".
    if !brokers.is_empty() {
        let mut smallest: Option<u64> = None;
        // Each broker's timestamp window (`None`: unknown).
        let mut windows: Vec<Option<TimestampWindow>> = Vec::new();
        for b in &brokers {
            let specs = [ResourceSpecifier::Broker(*b)];
            let results = tokio::time::timeout(timeout * 2, admin.describe_configs(&specs, &opts))
                .await
                .map_err(|e| lookup_error("the brokers' configuration", e))?
                .map_err(|e| lookup_error("the brokers' configuration", e))?;
            for r in results {
                match r {
                    Ok(res) => {
                        if let Some(v) = parse_bytes(
                            res.get("message.max.bytes")
                                .and_then(|e| e.value.as_deref()),
                        ) {
                            smallest = Some(smallest.map_or(v, |s| s.min(v)));
                        }
                        windows.push(timestamp_window(&res, "log."));
                    }
                    Err(code) if is_denied(code) => {
                        windows.push(None);
                        tracing::warn!(
                            "walcast may not read the brokers' configuration ({code}); it assumes Kafka's default message.max.bytes of {KAFKA_DEFAULT_MAX_MESSAGE_BYTES} for topics it has yet to create. Grant walcast's principal DescribeConfigs on the cluster to have it read"
                        );
                    }
                    Err(code) => {
                        return Err(lookup_error(
                            "the brokers' configuration",
                            rdkafka::error::KafkaError::AdminOp(code),
                        ))
                    }
                }
            }
        }
        limits.set_broker_default(smallest.unwrap_or(KAFKA_DEFAULT_MAX_MESSAGE_BYTES));
        // The narrowest, when every broker's is known.
        limits.inner.lock().unwrap().broker_timestamps = windows
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .and_then(|ws| ws.into_iter().reduce(TimestampWindow::narrower));
    }
    for chunk in topics.chunks(200) {
        let specs: Vec<ResourceSpecifier> = chunk
            .iter()
            .map(|t| ResourceSpecifier::Topic(t.as_str()))
            .collect();
        let results = tokio::time::timeout(timeout * 2, admin.describe_configs(&specs, &opts))
            .await
            .map_err(|e| lookup_error("the outbox topics' configuration", e))?
            .map_err(|e| lookup_error("the outbox topics' configuration", e))?;
        for (topic, r) in chunk.iter().zip(results) {
            let limit = topic_limit(topic, r, limits)?;
            limits.insert(topic, limit);
        }
    }
    Ok(())
}

/// Reads one topic's limit (the first time walcast sees the topic).
pub(crate) async fn read_topic_limit(
    admin: &Admin,
    topic: &str,
    limits: &TopicLimits,
    timeout: Duration,
) -> Result<TopicLimit> {
    let opts = AdminOptions::new().request_timeout(Some(timeout));
    let what = format!("topic {topic:?}'s configuration");
    let mut results = tokio::time::timeout(
        timeout * 2,
        admin.describe_configs(&[ResourceSpecifier::Topic(topic)], &opts),
    )
    .await
    .map_err(|e| lookup_error(&what, e))?
    .map_err(|e| lookup_error(&what, e))?;
    let r = results.pop().ok_or_else(|| {
        Error::retryable(format!(
            "Kafka returned no configuration for topic {topic:?}"
        ))
    })?;
    let limit = topic_limit(topic, r, limits)?;
    limits.insert(topic, limit);
    Ok(limit)
}

fn topic_limit(
    topic: &str,
    r: rdkafka::admin::ConfigResourceResult,
    limits: &TopicLimits,
) -> Result<TopicLimit> {
    match r {
        Ok(res) => {
            debug_assert!(matches!(&res.specifier, OwnedResourceSpecifier::Topic(t) if t == topic));
            let timestamps = timestamp_window(&res, "");
            match parse_bytes(
                res.get("max.message.bytes")
                    .and_then(|e| e.value.as_deref()),
            ) {
                Some(bytes) => Ok(TopicLimit {
                    bytes,
                    source: LimitSource::Topic,
                    timestamps,
                }),
                None => Ok(TopicLimit {
                    bytes: limits
                        .broker_default()
                        .unwrap_or(KAFKA_DEFAULT_MAX_MESSAGE_BYTES),
                    source: LimitSource::Assumed,
                    timestamps,
                }),
            }
        }
        Err(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
            Ok(TopicLimit {
                bytes: limits
                    .broker_default()
                    .unwrap_or(KAFKA_DEFAULT_MAX_MESSAGE_BYTES),
                source: LimitSource::BrokerDefault,
                timestamps: limits.broker_timestamps(),
            })
        }
        Err(code) if is_denied(code) => {
            tracing::warn!(
                topic,
                "walcast may not read topic {topic:?}'s configuration ({code}); it sizes its batches for a max.message.bytes of {KAFKA_DEFAULT_MAX_MESSAGE_BYTES}, and a record the topic cannot take is found by the broker (walcast then stops at it) instead of before it is produced. Grant walcast's principal DescribeConfigs on the topic"
            );
            Ok(TopicLimit {
                bytes: KAFKA_DEFAULT_MAX_MESSAGE_BYTES,
                source: LimitSource::Assumed,
                timestamps: None,
            })
        }
        Err(code) => Err(lookup_error(
            &format!("topic {topic:?}'s configuration"),
            rdkafka::error::KafkaError::AdminOp(code),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_have_the_record_formats_lengths() {
        assert_eq!(varint_len(0), 1);
        assert_eq!(varint_len(63), 1);
        assert_eq!(varint_len(64), 2);
        assert_eq!(varint_len(-1), 1);
        // Zig-zag: 1.6 M becomes 3.2 M, 22 bits, four bytes.
        assert_eq!(varint_len(1_600_000), 4);
    }

    #[test]
    fn the_estimate_is_the_java_producers_upper_bound() {
        // Java: 61 + 21 + sizeOf(key 3, value 5, one header "id" = 36 bytes):
        // (1 + 3) + (1 + 5) + 1 + (1 + 2 + 1 + 36) = 51 -> 133.
        assert_eq!(record_size_estimate(3, 5, [(2, 36)]), 133);
        // A 1.6 MB value: four bytes of length.
        assert_eq!(
            record_size_estimate(0, 1_600_000, []),
            61 + 21 + 1 + 4 + 1_600_000 + 1
        );
        // It is never below what librdkafka itself checks against
        // message.max.bytes (RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD = 36 bytes +
        // key + value + serialized headers).
        for (k, v) in [(0usize, 0usize), (10, 100), (100, 99_000)] {
            let headers = (1 + 2 + 1 + 36) + (1 + 4 + 1 + 12);
            assert!(
                record_size_estimate(k, v, [(2, 36), (4, 12)]) >= (36 + k + v + headers) as u64
            );
        }
    }

    #[test]
    fn batches_stay_below_the_limit() {
        assert_eq!(batch_cap(100_000), 100_000 - 2_000 - 1024);
        assert!(batch_cap(1_048_588) > DEFAULT_BATCH_SIZE);
        assert_eq!(batch_cap(1_000), 500);
        assert_eq!(batch_cap(0), 1);
    }

    #[test]
    fn the_smallest_limit_counts_the_broker_default() {
        let l = TopicLimits::default();
        assert_eq!(l.smallest(), None);
        l.set_broker_default(1_048_588);
        l.insert(
            "a",
            TopicLimit {
                bytes: 100_000,
                source: LimitSource::Topic,
                timestamps: None,
            },
        );
        assert_eq!(l.smallest(), Some(100_000));
        assert_eq!(l.clone().get("a").unwrap().bytes, 100_000);
    }

    fn resource(entries: &[(&str, &str)]) -> rdkafka::admin::ConfigResource {
        rdkafka::admin::ConfigResource {
            specifier: OwnedResourceSpecifier::Topic("t".into()),
            entries: entries
                .iter()
                .map(|(k, v)| rdkafka::admin::ConfigEntry {
                    name: k.to_string(),
                    value: Some(v.to_string()),
                    source: rdkafka::admin::ConfigSource::Default,
                    is_read_only: false,
                    is_default: true,
                    is_sensitive: false,
                })
                .collect(),
        }
    }

    #[test]
    fn a_topics_timestamp_window_is_read_as_kafka_applies_it() {
        let max = i64::MAX.to_string();
        // Kafka 4's defaults: one hour ahead, unbounded behind.
        let w = timestamp_window(
            &resource(&[
                ("message.timestamp.type", "CreateTime"),
                ("message.timestamp.before.max.ms", &max),
                ("message.timestamp.after.max.ms", "3600000"),
            ]),
            "",
        )
        .expect("bounded");
        assert_eq!((w.before_ms, w.after_ms), (i64::MAX, 3_600_000));
        // LogAppendTime: the broker stamps records and checks nothing.
        assert_eq!(
            timestamp_window(
                &resource(&[
                    ("message.timestamp.type", "LogAppendTime"),
                    ("message.timestamp.after.max.ms", "3600000"),
                ]),
                ""
            ),
            Some(TimestampWindow::UNBOUNDED)
        );
        assert!(!TimestampWindow::UNBOUNDED.is_bounded());
        // Over brokers: the narrowest in each direction.
        let a = TimestampWindow {
            before_ms: 10,
            after_ms: i64::MAX,
        };
        let b = TimestampWindow {
            before_ms: 20,
            after_ms: 5,
        };
        assert_eq!(
            a.narrower(b),
            TimestampWindow {
                before_ms: 10,
                after_ms: 5
            }
        );
        // Not read: unknown.
        assert_eq!(timestamp_window(&resource(&[]), ""), None);
        // Kafka 3.5 and older: one setting for both directions.
        let w = timestamp_window(
            &resource(&[("log.message.timestamp.difference.max.ms", "60000")]),
            "log.",
        )
        .expect("bounded");
        assert_eq!((w.before_ms, w.after_ms), (60_000, 60_000));
        // Kafka 3.x's defaults bound nothing.
        assert_eq!(
            timestamp_window(
                &resource(&[
                    ("message.timestamp.before.max.ms", &max),
                    ("message.timestamp.after.max.ms", &max),
                ]),
                ""
            ),
            Some(TimestampWindow::UNBOUNDED)
        );
    }

    #[test]
    fn spans_read_as_people_write_them() {
        assert_eq!(span(86_400_000), "1 day");
        assert_eq!(span(2 * 86_400_000 - 1), "47 hours");
        assert_eq!(span(3_600_000), "1 hour");
        assert_eq!(span(7_200_000), "2 hours");
        assert_eq!(span(90_000), "90000 ms");
        assert_eq!(span(i64::MAX), "106751991167 days");
    }

    #[test]
    fn a_timestamp_is_refused_only_beyond_the_window_and_the_tolerance() {
        let w = TimestampWindow {
            before_ms: 60_000,
            after_ms: 3_600_000,
        };
        let now = 1_800_000_000_000;
        assert_eq!(w.refuses(now, now), None);
        let edge = now + 3_600_000 + TIMESTAMP_TOLERANCE_MS;
        assert_eq!(w.refuses(edge, now), None, "the broker decides at the edge");
        assert_eq!(
            w.refuses(edge + 1, now),
            Some(("message.timestamp.after.max.ms", edge + 1 - now, 3_600_000))
        );
        let old = now - 60_000 - TIMESTAMP_TOLERANCE_MS;
        assert_eq!(w.refuses(old, now), None);
        assert_eq!(
            w.refuses(old - 1, now),
            Some(("message.timestamp.before.max.ms", now - old + 1, 60_000))
        );
        let open = TimestampWindow {
            before_ms: i64::MAX,
            after_ms: 3_600_000,
        };
        assert_eq!(open.refuses(0, now), None, "no overflow, no bound behind");
        assert_eq!(
            open.refuses(i64::MAX, now).map(|r| r.0),
            Some("message.timestamp.after.max.ms")
        );
    }
}
