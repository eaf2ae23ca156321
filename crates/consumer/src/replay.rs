//! Replay: re-consume a topic from an offset or a time, and re-drive
//! dead-lettered records to their original topic.
//!
//! Replaying is safe because the consumer is idempotent: a record whose
//! event id is already in `processed_events` for the group is skipped. To
//! re-consume, stop the group's consumers, [`rewind`] the group, and run
//! them again; to apply events again on purpose (after fixing a handler's
//! bug), run a consumer with another `group_id` (its own dedupe rows).

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::message::{Header, Headers as _, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use crate::Error;

/// Where [`rewind`] puts a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewindTo {
    /// This offset on every partition (clamped by Kafka to the log's start).
    Offset(i64),
    /// The first record at or after this time (milliseconds since the
    /// epoch) on each partition; the end of a partition with none.
    TimestampMs(i64),
}

/// The headers [`redrive`] removes before producing a record back: the
/// consumer's dead-letter headers and those the relay adds to its own
/// dead-letter records (`pipeline.on_permanent_error = "dead-letter"`), so
/// either kind of dead-letter topic can be re-driven.
pub const DEAD_LETTER_HEADERS: [&str; 9] = [
    "walcast.error.reason",
    "walcast.error.kind",
    "walcast.error.message",
    "walcast.original.topic",
    "walcast.original.partition",
    "walcast.original.offset",
    "walcast.failed.at",
    "walcast.source.table",
    VALUE_OMITTED,
];

/// Set by the relay on a dead-letter record whose value did not fit the
/// dead-letter topic: such a record is never re-driven (its value is gone).
const VALUE_OMITTED: &str = "walcast.value.omitted.bytes";

fn timeout() -> Duration {
    Duration::from_secs(30)
}

fn partitions(c: &BaseConsumer, topic: &str) -> Result<Vec<i32>, Error> {
    let md = c.fetch_metadata(Some(topic), timeout())?;
    let parts: Vec<i32> = md
        .topics()
        .first()
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if parts.is_empty() {
        return Err(Error::Config(format!(
            "topic {topic:?} has no partitions (does it exist?)"
        )));
    }
    Ok(parts)
}

/// Commits `group`'s offsets of `topic` to `to`, so its consumers re-consume
/// from there. Stop the group's consumers first: Kafka refuses the commit
/// while the group has members. Returns the offsets set, per partition.
pub fn rewind(
    bootstrap_servers: &str,
    group: &str,
    topic: &str,
    to: RewindTo,
) -> Result<Vec<(i32, i64)>, Error> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap_servers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let parts = partitions(&c, topic)?;
    let mut tpl = TopicPartitionList::new();
    for &p in &parts {
        let o = match to {
            RewindTo::Offset(o) => Offset::Offset(o),
            RewindTo::TimestampMs(t) => Offset::Offset(t),
        };
        tpl.add_partition_offset(topic, p, o)?;
    }
    if let RewindTo::TimestampMs(_) = to {
        tpl = c.offsets_for_times(tpl, timeout())?;
    }
    let mut out = Vec::new();
    let mut commit = TopicPartitionList::new();
    for e in tpl.elements() {
        let o = match e.offset() {
            Offset::Offset(o) => o,
            // No record at or after the time: the partition's end.
            _ => c.fetch_watermarks(topic, e.partition(), timeout())?.1,
        };
        let (low, high) = c.fetch_watermarks(topic, e.partition(), timeout())?;
        let o = o.clamp(low, high);
        commit.add_partition_offset(topic, e.partition(), Offset::Offset(o))?;
        out.push((e.partition(), o));
    }
    c.commit(&commit, CommitMode::Sync)?;
    out.sort();
    Ok(out)
}

/// Produces every record of `dead_letter_topic` (from its beginning up to its
/// end when called) back to its `original.topic`, with its key, value and
/// headers minus [`DEAD_LETTER_HEADERS`] (so the same `id`: an event that was
/// processed meanwhile is skipped by the consumer). Records without
/// `original.topic` are left out. Returns how many were re-driven. Each is
/// acknowledged by Kafka (idempotent producer) before the next is read.
pub async fn redrive(bootstrap_servers: &str, dead_letter_topic: &str) -> Result<u64, Error> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap_servers)
        .set("group.id", "walcast-redrive")
        .set("enable.auto.commit", "false")
        .create()?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap_servers)
        .set("enable.idempotence", "true")
        .create()?;
    let parts = partitions(&c, dead_letter_topic)?;
    let mut tpl = TopicPartitionList::new();
    let mut ends = std::collections::HashMap::new();
    for &p in &parts {
        let (low, high) = c.fetch_watermarks(dead_letter_topic, p, timeout())?;
        if high > low {
            tpl.add_partition_offset(dead_letter_topic, p, Offset::Offset(low))?;
            ends.insert(p, high);
        }
    }
    let mut n = 0;
    if ends.is_empty() {
        return Ok(0);
    }
    c.assign(&tpl)?;
    let mut next: std::collections::HashMap<i32, i64> = std::collections::HashMap::new();
    while ends
        .iter()
        .any(|(p, end)| next.get(p).copied().unwrap_or(0) < *end)
    {
        let Some(m) = c.poll(Duration::from_millis(500)) else {
            continue;
        };
        let m = m?;
        next.insert(m.partition(), m.offset() + 1);
        let mut original = None;
        let mut omitted = false;
        let mut headers = OwnedHeaders::new();
        if let Some(h) = m.headers() {
            for h in h.iter() {
                omitted |= h.key == VALUE_OMITTED;
                if h.key == "walcast.original.topic" {
                    original = h.value.map(|v| String::from_utf8_lossy(v).into_owned());
                }
                if !DEAD_LETTER_HEADERS.contains(&h.key) {
                    headers = headers.insert(Header {
                        key: h.key,
                        value: h.value,
                    });
                }
            }
        }
        let Some(topic) = original else {
            tracing::warn!(
                offset = m.offset(),
                partition = m.partition(),
                "dead-letter record without walcast.original.topic left in the dead-letter topic (not re-driven)"
            );
            continue;
        };
        if omitted {
            tracing::warn!(
                offset = m.offset(),
                partition = m.partition(),
                "dead-letter record without its value (walcast.value.omitted.bytes: it was too large for the dead-letter topic) left in the dead-letter topic (not re-driven); republish it from the outbox row"
            );
            continue;
        }
        let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic).headers(headers);
        if let Some(k) = m.key() {
            rec = rec.key(k);
        }
        if let Some(v) = m.payload() {
            rec = rec.payload(v);
        }
        producer
            .send(rec, timeout())
            .await
            .map_err(|(e, _)| Error::Kafka(e))?;
        n += 1;
    }
    Ok(n)
}
