//! Kafka side of the harness: topic admin and the consumer that decides when a
//! system is done and when each event became visible.
//!
//! Every benchmark event's record key is its sequence number (the outbox
//! `aggregateid`), so one consumer can tell, for any system, which events
//! arrived, when, and whether any arrived twice.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::clock;

/// Partitions of every benchmark topic (the dev broker's default).
pub const PARTITIONS: i32 = 3;

fn admin(bootstrap: &str) -> Result<AdminClient<DefaultClientContext>> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .context("creating the Kafka admin client")
}

/// Creates topics with [`PARTITIONS`] partitions (existing ones are kept).
pub async fn create_topics(bootstrap: &str, topics: &[String]) -> Result<()> {
    let admin = admin(bootstrap)?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, PARTITIONS, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in admin
        .create_topics(&new, &opts)
        .await
        .context("create_topics")?
    {
        if let Err((topic, code)) = r {
            if code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                bail!("creating topic {topic}: {code}");
            }
        }
    }
    Ok(())
}

/// Deletes topics (missing ones are ignored), so a long run does not fill the
/// broker's disk and page cache with finished runs.
pub async fn delete_topics(bootstrap: &str, topics: &[String]) -> Result<()> {
    if topics.is_empty() {
        return Ok(());
    }
    let admin = admin(bootstrap)?;
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let _ = admin
        .delete_topics(&refs, &opts)
        .await
        .context("delete_topics")?;
    Ok(())
}

/// What the consumer saw of one topic.
#[derive(Debug, Default, Clone)]
pub struct Receipts {
    /// Receipt time (ns on the harness clock) per sequence number; 0 = not seen.
    pub recv_ns: Vec<u64>,
    /// Distinct sequence numbers seen.
    pub distinct: u64,
    /// Records whose sequence number was already seen.
    pub duplicates: u64,
    /// Records whose key is not a sequence number.
    pub foreign: u64,
    /// Receipt time of the first and the last new sequence number.
    pub first_ns: u64,
    /// See `first_ns`.
    pub last_ns: u64,
    /// Consumer errors (logged, not fatal).
    pub errors: u64,
}

impl Receipts {
    fn record(&mut self, seq: u64, now: u64) {
        let i = seq as usize;
        if i >= self.recv_ns.len() {
            let len = (i + 1).max(self.recv_ns.len() * 2).max(1024);
            self.recv_ns.resize(len, 0);
        }
        if self.recv_ns[i] != 0 {
            self.duplicates += 1;
            return;
        }
        self.recv_ns[i] = now.max(1);
        self.distinct += 1;
        if self.first_ns == 0 {
            self.first_ns = now;
        }
        self.last_ns = now;
    }

    /// Whether every sequence number in `range` was seen.
    #[cfg(test)]
    pub fn has_all(&self, range: std::ops::RangeInclusive<u64>) -> bool {
        range
            .into_iter()
            .all(|s| self.recv_ns.get(s as usize).is_some_and(|t| *t != 0))
    }

    /// Distinct records per `bucket` since `origin_ns` (for throughput plots).
    pub fn per_bucket(
        &self,
        origin_ns: u64,
        bucket: Duration,
        seqs: std::ops::RangeInclusive<u64>,
    ) -> Vec<u64> {
        let width = bucket.as_nanos() as u64;
        let mut out: Vec<u64> = Vec::new();
        for s in seqs {
            let Some(&t) = self.recv_ns.get(s as usize) else {
                continue;
            };
            if t == 0 {
                continue;
            }
            let b = (t.saturating_sub(origin_ns) / width) as usize;
            if b >= out.len() {
                out.resize(b + 1, 0);
            }
            out[b] += 1;
        }
        out
    }
}

/// Live counters of a running consumer.
#[derive(Debug, Default)]
pub struct Live {
    /// Distinct sequence numbers seen so far.
    pub distinct: AtomicU64,
    /// Receipt time of the newest new sequence number.
    pub last_ns: AtomicU64,
    /// Set when sequence number 0 (the readiness probe) arrived.
    pub probe_seen: AtomicBool,
}

/// A consumer thread reading one topic from the beginning.
#[derive(Debug)]
pub struct TopicConsumer {
    stop: Arc<AtomicBool>,
    /// Live counters.
    pub live: Arc<Live>,
    thread: Option<JoinHandle<Result<Receipts>>>,
}

impl TopicConsumer {
    /// Starts reading `topic` (which must exist) from offset 0 of every partition.
    pub fn start(bootstrap: &str, topic: &str) -> Result<TopicConsumer> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set(
                "group.id",
                format!("walcast-bench-{}", uuid::Uuid::new_v4()),
            )
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "50")
            .set("topic.metadata.refresh.interval.ms", "1000")
            .create()
            .context("creating the consumer")?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl).context("assigning partitions")?;
        let stop = Arc::new(AtomicBool::new(false));
        let live = Arc::new(Live::default());
        let (stop2, live2) = (stop.clone(), live.clone());
        let thread = std::thread::Builder::new()
            .name("bench-consumer".into())
            .spawn(move || {
                let mut r = Receipts::default();
                while !stop2.load(Ordering::Relaxed) {
                    match consumer.poll(Duration::from_millis(100)) {
                        None => {}
                        Some(Err(e)) => {
                            r.errors += 1;
                            if r.errors <= 5 {
                                eprintln!("  consumer: {e} (ignored)");
                            }
                        }
                        Some(Ok(m)) => {
                            let now = clock::now_ns();
                            match m.key().and_then(parse_seq) {
                                Some(seq) => {
                                    let before = r.distinct;
                                    r.record(seq, now);
                                    if r.distinct != before {
                                        live2.distinct.store(r.distinct, Ordering::Relaxed);
                                        live2.last_ns.store(now, Ordering::Relaxed);
                                        if seq == 0 {
                                            live2.probe_seen.store(true, Ordering::Relaxed);
                                        }
                                    }
                                }
                                None => r.foreign += 1,
                            }
                        }
                    }
                }
                Ok(r)
            })?;
        Ok(TopicConsumer {
            stop,
            live,
            thread: Some(thread),
        })
    }

    /// Distinct sequence numbers seen so far.
    pub fn distinct(&self) -> u64 {
        self.live.distinct.load(Ordering::Relaxed)
    }

    /// Stops the thread and returns what it saw.
    pub fn finish(mut self) -> Result<Receipts> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("the consumer thread panicked"))?,
            None => Ok(Receipts::default()),
        }
    }
}

impl Drop for TopicConsumer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A record key that is a decimal sequence number.
pub fn parse_seq(key: &[u8]) -> Option<u64> {
    if key.is_empty() || key.len() > 19 {
        return None;
    }
    let mut v: u64 = 0;
    for b in key {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u64::from(b - b'0');
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse() {
        assert_eq!(parse_seq(b"0"), Some(0));
        assert_eq!(parse_seq(b"1234567"), Some(1_234_567));
        assert_eq!(parse_seq(b""), None);
        assert_eq!(parse_seq(b"12a"), None);
        assert_eq!(parse_seq(b"\"12\""), None);
    }

    #[test]
    fn receipts_count_distinct_and_duplicates() {
        let mut r = Receipts::default();
        r.record(1, 10);
        r.record(3, 20);
        r.record(1, 30);
        r.record(2, 40);
        assert_eq!(r.distinct, 3);
        assert_eq!(r.duplicates, 1);
        assert_eq!(r.first_ns, 10);
        assert_eq!(r.last_ns, 40);
        assert!(r.has_all(1..=3));
        assert!(!r.has_all(1..=4));
        assert_eq!(r.per_bucket(0, Duration::from_nanos(25), 1..=3), vec![2, 1]);
    }
}
