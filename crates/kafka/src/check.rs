//! `walcast check`, Kafka side: the producer configuration walcast builds
//! (and the durability settings it enforces), whether the cluster answers,
//! and for each existing outbox topic (and the brokers' defaults for topics
//! created later): replication factor against `min.insync.replicas`, and
//! `max.message.bytes` against the producer's record limit. The limits are
//! read with the same code the sink sizes its producer with ([`crate::limits`]).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::error::RDKafkaErrorCode;
use walcast_core::check::CheckResult;
use walcast_core::config::KafkaConfig;
use walcast_core::route::TopicMatcher;

use crate::limits::{self, is_denied, lookup_error, LimitSource, TopicLimits};
use crate::{
    batch_size_for, client_config, create_admin, producer_message_max_bytes, KafkaSink, QueueLimits,
};

/// The producer settings walcast's guarantees depend on (protected from
/// `kafka.properties`), shown by `walcast check`.
const ENFORCED: &[&str] = &[
    "enable.idempotence",
    "acks",
    "enable.gapless.guarantee",
    "message.timeout.ms",
    "partitioner",
    "compression.type",
    "linger.ms",
];

/// Runs the Kafka checks. Never fails: a check that cannot run is a failed
/// check.
pub async fn check(
    cfg: &KafkaConfig,
    template: &dyn TopicMatcher,
    queue: QueueLimits,
    timeout: Duration,
) -> Vec<CheckResult> {
    let mut out = Vec::new();
    let producer_max = producer_message_max_bytes(cfg);
    // The producer exactly as `run` builds it (librdkafka validates it).
    match KafkaSink::new(cfg, queue, TopicLimits::default()) {
        Ok(sink) => {
            drop(sink);
            let c = client_config(cfg, queue);
            let enforced: Vec<String> = ENFORCED
                .iter()
                .map(|k| format!("{k}={}", c.get(k).unwrap_or("?")))
                .collect();
            out.push(CheckResult::ok(
                "kafka.producer",
                format!(
                    "{}; message.max.bytes={producer_max}; kafka.delivery_timeout_ms={} (enforced by walcast, which restarts from the slot)",
                    enforced.join(", "),
                    cfg.delivery_timeout_ms
                ),
            ));
        }
        Err(e) => out.push(CheckResult::from_error("kafka.producer", &e)),
    }
    let admin = match create_admin(cfg) {
        Ok(a) => Arc::new(a),
        Err(e) => {
            out.push(CheckResult::from_error("kafka.connect", &e));
            return out;
        }
    };
    let md = match limits::fetch_metadata(&admin, &cfg.bootstrap_servers, timeout).await {
        Ok(md) => md,
        Err(e) => {
            out.push(CheckResult::from_error("kafka.connect", &e));
            return out;
        }
    };
    let brokers: Vec<i32> = md.brokers().iter().map(|b| b.id()).collect();
    out.push(CheckResult::ok(
        "kafka.connect",
        format!(
            "reached {} broker(s) at {} (ids {})",
            brokers.len(),
            cfg.bootstrap_servers,
            brokers
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ));
    // (topic, partitions, replication factor): the smallest replica count
    // over its partitions.
    let mut topics: Vec<(String, usize, i64)> = md
        .topics()
        .iter()
        .filter(|t| !t.name().starts_with("__") && template.may_render(t.name()))
        .map(|t| {
            let rf = t
                .partitions()
                .iter()
                .map(|p| p.replicas().len() as i64)
                .min()
                .unwrap_or(0);
            (t.name().to_string(), t.partitions().len(), rf)
        })
        .collect();
    topics.sort();

    // max.message.bytes of the topics and the brokers' default, read as the sink reads them.
    let limits = TopicLimits::default();
    if let Err(e) =
        limits::read_cluster_limits(&admin, &cfg.bootstrap_servers, template, &limits, timeout)
            .await
    {
        out.push(CheckResult::from_error("kafka.topic_limits", &e));
    }
    let opts = AdminOptions::new().request_timeout(Some(timeout));

    // The brokers' defaults, which topics created later get.
    let specs: Vec<ResourceSpecifier> = brokers
        .iter()
        .map(|b| ResourceSpecifier::Broker(*b))
        .collect();
    match tokio::time::timeout(timeout * 2, admin.describe_configs(&specs, &opts)).await {
        Ok(Ok(results)) => {
            let mut min_isr: Option<i64> = None;
            let mut rf: Option<i64> = None;
            let mut auto_create = None;
            let mut partitions = None;
            let mut denied = false;
            for r in results {
                match r {
                    Ok(res) => {
                        let num = |k: &str| {
                            res.get(k)
                                .and_then(|e| e.value.as_deref())
                                .and_then(|v| v.trim().parse::<i64>().ok())
                        };
                        // The strictest broker decides.
                        if let Some(v) = num("min.insync.replicas") {
                            min_isr = Some(min_isr.map_or(v, |m| m.max(v)));
                        }
                        if let Some(v) = num("default.replication.factor") {
                            rf = Some(rf.map_or(v, |m| m.min(v)));
                        }
                        partitions = partitions.or(num("num.partitions"));
                        auto_create = auto_create.or(res
                            .get("auto.create.topics.enable")
                            .and_then(|e| e.value.clone()));
                    }
                    Err(code) if is_denied(code) => denied = true,
                    Err(code) => out.push(CheckResult::from_error(
                        "kafka.topic_defaults",
                        &lookup_error(
                            "the brokers' configuration",
                            rdkafka::error::KafkaError::AdminOp(code),
                        ),
                    )),
                }
            }
            if denied {
                out.push(CheckResult::warn(
                    "kafka.topic_defaults",
                    "walcast's principal may not read the brokers' configuration",
                    "grant it DescribeConfigs on the cluster, so walcast knows the limit of topics it has yet to create",
                ));
            } else if let Some(rf) = rf {
                let subject = format!(
                    "topics created later (auto.create.topics.enable = {}, num.partitions = {}, default.replication.factor = {rf})",
                    auto_create.as_deref().unwrap_or("?"),
                    partitions.map(|p| p.to_string()).unwrap_or_else(|| "?".into())
                );
                out.push(durability(
                    "kafka.topic_defaults",
                    &subject,
                    rf,
                    min_isr,
                    &|n| format!("kafka-configs.sh --bootstrap-server <broker> --alter --entity-type brokers --entity-default --add-config min.insync.replicas={n}"),
                    "set default.replication.factor in the brokers' configuration, or create the outbox topics yourself with kafka-topics.sh --create --replication-factor 3",
                ));
                if auto_create.as_deref() == Some("false") && topics.is_empty() {
                    out.push(CheckResult::warn(
                        "kafka.topics",
                        "no outbox topic exists and the brokers do not create topics (auto.create.topics.enable = false): an event for a missing topic waits, and walcast restarts after kafka.delivery_timeout_ms until the topic exists",
                        "create each outbox topic before its first event (kafka-topics.sh --create --topic <topic> --replication-factor 3 --config min.insync.replicas=2)",
                    ));
                }
            }
        }
        Ok(Err(e)) => out.push(CheckResult::from_error(
            "kafka.topic_defaults",
            &lookup_error("the brokers' configuration", e),
        )),
        Err(e) => out.push(CheckResult::from_error(
            "kafka.topic_defaults",
            &lookup_error("the brokers' configuration", e),
        )),
    }
    if topics.is_empty() {
        out.push(CheckResult::ok(
            "kafka.topics",
            "no outbox topic exists yet (they are checked here once they do)",
        ));
        return out;
    }

    // min.insync.replicas of each outbox topic.
    for chunk in topics.chunks(200) {
        let specs: Vec<ResourceSpecifier> = chunk
            .iter()
            .map(|(t, _, _)| ResourceSpecifier::Topic(t.as_str()))
            .collect();
        let results =
            match tokio::time::timeout(timeout * 2, admin.describe_configs(&specs, &opts)).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    out.push(CheckResult::from_error(
                        "kafka.topics",
                        &lookup_error("the outbox topics' configuration", e),
                    ));
                    return out;
                }
                Err(e) => {
                    out.push(CheckResult::from_error(
                        "kafka.topics",
                        &lookup_error("the outbox topics' configuration", e),
                    ));
                    return out;
                }
            };
        for ((topic, partitions, rf), r) in chunk.iter().zip(results) {
            let min_isr = match &r {
                Ok(res) => res
                    .get("min.insync.replicas")
                    .and_then(|e| e.value.as_deref())
                    .and_then(|v| v.trim().parse::<i64>().ok()),
                Err(_) => None,
            };
            let subject =
                format!("topic {topic} ({partitions} partitions, replication factor {rf})");
            out.push(durability(
                &format!("kafka.topic[{topic}].durability"),
                &subject,
                *rf,
                min_isr,
                &|n| format!("kafka-configs.sh --bootstrap-server <broker> --alter --entity-type topics --entity-name {topic} --add-config min.insync.replicas={n}"),
                "add replicas with kafka-reassign-partitions.sh",
            ));
            out.push(record_limit(
                topic,
                limits.get(topic),
                producer_max,
                batch_size_for(cfg, limits.get(topic).map(|l| l.bytes)),
            ));
            if let Some(w) = limits.get(topic).and_then(|l| l.timestamps) {
                out.push(timestamp_window(topic, w));
            }
        }
    }
    out
}

/// Checks each dead-letter topic `(topic, option)` (the option that sets
/// it, e.g. `pipeline.dead_letter_topic`) as walcast's start treats it
/// ([`crate::dead_letter::ensure_topic`]): an existing one must not be
/// compacted, and gets the outbox topics' durability and record limit
/// checks; a missing one must be creatable by walcast's principal (asked of
/// the brokers with a validate-only CreateTopics: nothing is created). Never
/// fails: a check that cannot run is a failed check.
pub async fn check_dead_letter_topics(
    cfg: &KafkaConfig,
    topics: &[(String, String)],
    timeout: Duration,
) -> Vec<CheckResult> {
    let mut out = Vec::new();
    if topics.is_empty() {
        return out;
    }
    let admin = match create_admin(cfg) {
        Ok(a) => Arc::new(a),
        Err(e) => {
            out.push(CheckResult::from_error("kafka.dead_letter_topics", &e));
            return out;
        }
    };
    let md = match limits::fetch_metadata(&admin, &cfg.bootstrap_servers, timeout).await {
        Ok(md) => md,
        Err(e) => {
            out.push(CheckResult::from_error("kafka.dead_letter_topics", &e));
            return out;
        }
    };
    let producer_max = producer_message_max_bytes(cfg);
    let bootstrap = &cfg.bootstrap_servers;
    let opts = AdminOptions::new()
        .request_timeout(Some(timeout))
        .operation_timeout(Some(timeout));
    let limits = TopicLimits::default();
    for (topic, option) in topics {
        let name = format!("kafka.dead_letter_topic[{topic}]");
        let Some(found) = md.topics().iter().find(|t| t.name() == topic) else {
            // Missing: walcast creates it at start; ask the brokers whether
            // it may (authorization, policies) without creating it.
            let new = NewTopic::new(topic, -1, TopicReplication::Fixed(-1))
                .set("cleanup.policy", "delete");
            let validate = AdminOptions::new()
                .request_timeout(Some(timeout))
                .operation_timeout(Some(timeout))
                .validate_only(true);
            let result =
                tokio::time::timeout(timeout * 2, admin.create_topics([&new], &validate)).await;
            let verdict = match result {
                Ok(Ok(mut rs)) => match rs.pop() {
                    Some(Ok(_)) => Ok(true),
                    // Not in the metadata walcast's principal sees, yet there.
                    Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => Ok(false),
                    Some(Err((_, code))) => Err(code.to_string()),
                    None => Err("no answer".into()),
                },
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            out.push(match verdict {
                Ok(false) => CheckResult::warn(
                    name,
                    format!(
                        "dead-letter topic {topic} ({option}) exists, but walcast's principal does not see it in the cluster's metadata"
                    ),
                    format!("grant walcast's principal Describe, DescribeConfigs and Write on {topic}"),
                ),
                Ok(true) => CheckResult::ok(
                    name,
                    format!(
                        "dead-letter topic {topic} ({option}) does not exist yet; walcast creates it at start (cleanup.policy=delete, the brokers' default partitions and replication), which the brokers accept for walcast's principal"
                    ),
                ),
                Err(why) => CheckResult::fail(
                    name,
                    format!(
                        "dead-letter topic {topic} ({option}) does not exist and walcast cannot create it: {why}; walcast would refuse to start (exit 2)"
                    ),
                    format!(
                        "create it as a Kafka administrator: kafka-topics.sh --bootstrap-server {bootstrap} --create --topic {topic} --config cleanup.policy=delete; and grant walcast's principal Describe, DescribeConfigs and Write on it"
                    ),
                ),
            });
            continue;
        };
        let partitions = found.partitions().len();
        let rf = found
            .partitions()
            .iter()
            .map(|p| p.replicas().len() as i64)
            .min()
            .unwrap_or(0);
        let described = tokio::time::timeout(
            timeout * 2,
            admin.describe_configs([&ResourceSpecifier::Topic(topic)], &opts),
        )
        .await;
        let config = match described {
            Ok(Ok(mut rs)) => match rs.pop() {
                Some(Ok(res)) => Ok(res),
                Some(Err(code)) if is_denied(code) => Err(None),
                Some(Err(code)) => Err(Some(code.to_string())),
                None => Err(Some("no answer".into())),
            },
            Ok(Err(e)) => Err(Some(e.to_string())),
            Err(e) => Err(Some(e.to_string())),
        };
        let res = match config {
            Ok(res) => res,
            Err(None) => {
                out.push(CheckResult::warn(
                    name,
                    format!("dead-letter topic {topic} ({option}) exists, but walcast's principal may not read its configuration: walcast cannot tell whether it is compacted"),
                    format!("grant walcast's principal DescribeConfigs on {topic} (and Describe and Write)"),
                ));
                continue;
            }
            Err(Some(why)) => {
                out.push(CheckResult::fail(
                    name,
                    format!("cannot read the configuration of dead-letter topic {topic} ({option}): {why}"),
                    "check the brokers and that walcast's principal may DescribeConfigs on the topic",
                ));
                continue;
            }
        };
        let policy = res
            .get("cleanup.policy")
            .and_then(|e| e.value.clone())
            .unwrap_or_default();
        if policy.split(',').any(|p| p.trim() == "compact") {
            out.push(CheckResult::fail(
                name,
                format!("dead-letter topic {topic} ({option}) has cleanup.policy = {policy:?}: compaction would drop dead-letter records of the same key, so walcast refuses to start (exit 2)"),
                format!("kafka-configs.sh --bootstrap-server {bootstrap} --alter --entity-type topics --entity-name {topic} --add-config cleanup.policy=delete; or another {option}"),
            ));
        } else {
            out.push(CheckResult::ok(
                name,
                format!("dead-letter topic {topic} ({option}) exists ({partitions} partitions, cleanup.policy = {policy})"),
            ));
        }
        let min_isr = res
            .get("min.insync.replicas")
            .and_then(|e| e.value.as_deref())
            .and_then(|v| v.trim().parse::<i64>().ok());
        out.push(durability(
            &format!("kafka.dead_letter_topic[{topic}].durability"),
            &format!("dead-letter topic {topic} ({partitions} partitions, replication factor {rf})"),
            rf,
            min_isr,
            &|n| format!("kafka-configs.sh --bootstrap-server <broker> --alter --entity-type topics --entity-name {topic} --add-config min.insync.replicas={n}"),
            "add replicas with kafka-reassign-partitions.sh",
        ));
        // A dead-letter record over the topic's limit is sent without its
        // value (README "Dead-letter topic"): a warning, not a failure.
        let limit_name = format!("kafka.dead_letter_topic[{topic}].max_message_bytes");
        match limits::read_topic_limit(&admin, topic, &limits, timeout).await {
            Ok(l) if l.source == LimitSource::Topic && l.bytes < producer_max => {
                out.push(CheckResult::warn(
                    limit_name,
                    format!("dead-letter topic {topic} takes record batches of at most {} bytes (max.message.bytes), less than walcast's producer limit of {producer_max}: the dead-letter record of a larger event is sent without its value (walcast.value.omitted.bytes)", l.bytes),
                    format!("kafka-configs.sh --bootstrap-server <broker> --alter --entity-type topics --entity-name {topic} --add-config max.message.bytes={producer_max}"),
                ));
            }
            Ok(l) => {
                let mut c = record_limit(
                    topic,
                    Some(l),
                    producer_max,
                    batch_size_for(cfg, Some(l.bytes)),
                );
                c.name = limit_name;
                out.push(c);
            }
            Err(e) => out.push(CheckResult::from_error(limit_name, &e)),
        }
    }
    out
}

/// Replication factor against `min.insync.replicas` (walcast produces with
/// `acks=all`). `set_isr(n)` says how to set `min.insync.replicas` to `n`,
/// `raise_rf` how to raise the replication factor.
pub fn durability(
    name: &str,
    subject: &str,
    rf: i64,
    min_isr: Option<i64>,
    set_isr: &dyn Fn(i64) -> String,
    raise_rf: &str,
) -> CheckResult {
    let Some(m) = min_isr else {
        return CheckResult::warn(
            name,
            format!("{subject}: min.insync.replicas could not be read"),
            "grant walcast's principal DescribeConfigs on the topics and the cluster",
        );
    };
    let detail = format!("{subject}, min.insync.replicas = {m}");
    if m > rf {
        return CheckResult::fail(
            name,
            format!("{detail}: more in-sync replicas required than exist, so every acks=all write fails (NOT_ENOUGH_REPLICAS): walcast delivers nothing there and restarts after kafka.delivery_timeout_ms, again and again"),
            format!("{} (or raise the replication factor to {m}: {raise_rf})", set_isr(rf)),
        );
    }
    if rf <= 1 {
        return CheckResult::warn(
            name,
            format!("{detail}: one copy of each event; losing that broker's disk loses events Kafka acknowledged"),
            format!("use replication factor 3 ({raise_rf}), then {}", set_isr(2)),
        );
    }
    if m <= 1 {
        return CheckResult::warn(
            name,
            format!("{detail}: acks=all is satisfied by the leader alone, so a leader failure can lose acknowledged events"),
            set_isr(2),
        );
    }
    if m >= rf {
        return CheckResult::warn(
            name,
            format!(
                "{detail}: one broker down stops every write (walcast stalls until it is back)"
            ),
            format!(
                "{} (or raise the replication factor: {raise_rf})",
                set_isr(rf - 1)
            ),
        );
    }
    CheckResult::ok(name, detail)
}

/// The topic's `max.message.bytes` against the producer's record limit.
pub fn record_limit(
    topic: &str,
    limit: Option<limits::TopicLimit>,
    producer_max: u64,
    batch_size: u64,
) -> CheckResult {
    let name = format!("kafka.topic[{topic}].max_message_bytes");
    match limit {
        Some(l) if l.source == LimitSource::Topic => {
            if l.bytes < producer_max {
                CheckResult::fail(
                    name,
                    format!(
                        "topic {topic} takes record batches of at most {} bytes (max.message.bytes), less than walcast's producer limit of {producer_max} (kafka.properties.\"message.max.bytes\"): an event between the two sizes stops walcast (exit 3) although the producer would take it",
                        l.bytes
                    ),
                    format!(
                        "raise the topic's limit: kafka-configs.sh --bootstrap-server <broker> --alter --entity-type topics --entity-name {topic} --add-config max.message.bytes={producer_max}; or make the producer's the same: kafka.properties.\"message.max.bytes\" = \"{}\"",
                        l.bytes
                    ),
                )
            } else {
                CheckResult::ok(
                    name,
                    format!(
                        "max.message.bytes = {} (producer limit {producer_max}; batch.size capped at {batch_size})",
                        l.bytes
                    ),
                )
            }
        }
        _ => CheckResult::warn(
            name,
            format!("topic {topic}'s max.message.bytes could not be read; walcast assumes Kafka's default and leaves the record size check to the broker"),
            "grant walcast's principal DescribeConfigs on the topic",
        ),
    }
}

/// The record timestamps the topic accepts. walcast stamps records with
/// the commit time (or a route's timestamp column), so a bound behind the
/// broker's clock refuses a backlog older than it: a warning.
pub fn timestamp_window(topic: &str, w: limits::TimestampWindow) -> CheckResult {
    let name = format!("kafka.topic[{topic}].timestamps");
    let ahead = if w.after_ms == i64::MAX {
        "any timestamp ahead".to_string()
    } else {
        format!("timestamps up to {} ahead of the broker's clock (message.timestamp.after.max.ms; a route's timestamp column further ahead is refused)", limits::span(w.after_ms))
    };
    if w.before_ms == i64::MAX {
        return CheckResult::ok(name, format!("records of any age, {ahead}"));
    }
    CheckResult::warn(
        name,
        format!(
            "topic {topic} refuses records more than {} old (message.timestamp.before.max.ms = {}); it accepts {ahead}. walcast stamps records with their commit time, so after an outage longer than that the backlog's first event stops walcast (exit 3), or is dead-lettered, with every later one",
            limits::span(w.before_ms),
            w.before_ms
        ),
        format!(
            "let the broker stamp records (kafka-configs.sh --bootstrap-server <broker> --alter --entity-type topics --entity-name {topic} --add-config message.timestamp.type=LogAppendTime), or remove the bound (--delete-config message.timestamp.before.max.ms)"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_on_old_records_is_a_warning() {
        let w = |before_ms, after_ms| limits::TimestampWindow {
            before_ms,
            after_ms,
        };
        let r = timestamp_window("t", w(i64::MAX, 3_600_000));
        assert_eq!(r.status, CheckStatus::Ok);
        assert!(r.detail.contains("up to 1 hour ahead"), "{}", r.detail);
        let r = timestamp_window("t", w(86_400_000, i64::MAX));
        assert_eq!(r.status, CheckStatus::Warn);
        assert!(
            r.detail.contains("more than 1 day old") && r.detail.contains("any timestamp ahead"),
            "{}",
            r.detail
        );
        assert!(r
            .fix
            .as_deref()
            .unwrap_or_default()
            .contains("LogAppendTime"));
    }
    use walcast_core::check::CheckStatus;

    #[test]
    fn durability_rules() {
        let how = |n| format!("isr={n}");
        let st = |rf, m| durability("n", "topic t", rf, Some(m), &how, "rf").status;
        assert_eq!(st(1, 2), CheckStatus::Fail);
        assert_eq!(st(3, 4), CheckStatus::Fail);
        assert_eq!(st(1, 1), CheckStatus::Warn);
        assert_eq!(st(3, 1), CheckStatus::Warn);
        assert_eq!(st(3, 3), CheckStatus::Warn);
        assert_eq!(st(3, 2), CheckStatus::Ok);
        let fail = durability("n", "topic t", 1, Some(2), &how, "rf");
        assert!(fail.fix.unwrap().starts_with("isr=1"));
        assert_eq!(
            durability("n", "t", 3, None, &how, "rf").status,
            CheckStatus::Warn
        );
    }

    #[test]
    fn a_topic_limit_below_the_producers_fails() {
        let l = |bytes| {
            Some(limits::TopicLimit {
                bytes,
                source: LimitSource::Topic,
                timestamps: None,
            })
        };
        let c = record_limit("t", l(500_000), 1_000_000, 1);
        assert_eq!(c.status, CheckStatus::Fail);
        assert!(c.fix.unwrap().contains("max.message.bytes=1000000"));
        assert_eq!(
            record_limit("t", l(1_048_588), 1_000_000, 1).status,
            CheckStatus::Ok
        );
        assert_eq!(
            record_limit("t", None, 1_000_000, 1).status,
            CheckStatus::Warn
        );
    }
}
