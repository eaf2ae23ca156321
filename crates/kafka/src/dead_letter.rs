//! The dead-letter topics (`pipeline.dead_letter_topic`, a route's
//! `dead_letter_topic`): checked, or created when missing, before walcast
//! streams under the dead-letter policy.

use std::time::Duration;

use rdkafka::admin::{AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::error::RDKafkaErrorCode;
use walcast_core::config::KafkaConfig;
use walcast_core::{Error, ErrorKind, Result};

use crate::limits::{is_denied, Admin};

/// How long the topic's lookup and creation may take.
const TIMEOUT: Duration = Duration::from_secs(10);

fn create_command(bootstrap: &str, topic: &str) -> String {
    format!(
        "kafka-topics.sh --bootstrap-server {bootstrap} --create --topic {topic} --config cleanup.policy=delete"
    )
}

/// Makes sure the dead-letter topic `topic` (set by the option `option`,
/// e.g. `pipeline.dead_letter_topic`) exists and keeps every record (not
/// compacted: dead-letter records of one key must not replace each other).
/// A missing topic is created with the brokers' default partitions and
/// replication, `cleanup.policy=delete`.
///
/// # Errors
/// An operator error when the topic is compacted, or missing and walcast may
/// not create it (the message gives the `kafka-topics.sh` command); a
/// retryable one when Kafka does not answer.
pub async fn ensure_topic(cfg: &KafkaConfig, topic: &str, option: &str) -> Result<()> {
    let admin: Admin = crate::admin_config(cfg)
        .create()
        .map_err(crate::rejected_config)?;
    let opts = AdminOptions::new()
        .request_timeout(Some(TIMEOUT))
        .operation_timeout(Some(TIMEOUT));
    let bootstrap = &cfg.bootstrap_servers;
    let unavailable = |e: rdkafka::error::KafkaError| {
        Error::retryable(format!(
            "cannot read the dead-letter topic {topic:?} ({option}) at {bootstrap}"
        ))
        .with_source(e)
        .with_hint("walcast retries with backoff; check the brokers and kafka.bootstrap_servers")
    };
    // Whether it exists: from the cluster's metadata of all topics (asking
    // for the one topic could have the brokers auto-create it).
    let admin = std::sync::Arc::new(admin);
    let md_admin = admin.clone();
    let metadata =
        tokio::task::spawn_blocking(move || md_admin.inner().fetch_metadata(None, TIMEOUT))
            .await
            .map_err(|e| Error::retryable("metadata task failed").with_source(e))?
            .map_err(unavailable)?;
    let missing = !metadata.topics().iter().any(|t| t.name() == topic);
    let spec = ResourceSpecifier::Topic(topic);
    if !missing {
        let described = tokio::time::timeout(TIMEOUT * 2, admin.describe_configs([&spec], &opts))
            .await
            .map_err(|_| {
                Error::retryable(format!(
                    "Kafka did not describe the dead-letter topic {topic:?} in time"
                ))
            })?
            .map_err(unavailable)?;
        for r in described {
            match r {
                Ok(res) => {
                    let policy = res
                        .get("cleanup.policy")
                        .and_then(|e| e.value.clone())
                        .unwrap_or_default();
                    if policy.split(',').any(|p| p.trim() == "compact") {
                        return Err(Error::operator(format!(
                            "the dead-letter topic {topic:?} ({option}) has cleanup.policy = {policy:?}: compaction would drop dead-letter records of the same key"
                        ))
                        .with_hint(format!(
                            "use a topic with cleanup.policy=delete (kafka-configs.sh --bootstrap-server {bootstrap} --alter --entity-type topics --entity-name {topic} --add-config cleanup.policy=delete), or another {option}"
                        )));
                    }
                }
                Err(code) if is_denied(code) => {
                    tracing::warn!(
                        topic,
                        "walcast may not read the dead-letter topic's configuration ({code}); make sure it is not compacted. Grant walcast's principal DescribeConfigs on it"
                    );
                }
                Err(code) => {
                    return Err(Error::retryable(format!(
                        "Kafka could not describe the dead-letter topic {topic:?}: {code}"
                    )))
                }
            }
        }
    }
    if !missing {
        return Ok(());
    }
    let new = NewTopic::new(topic, -1, TopicReplication::Fixed(-1)).set("cleanup.policy", "delete");
    let results = admin
        .create_topics([&new], &opts)
        .await
        .map_err(unavailable)?;
    for r in results {
        match r {
            Ok(_) => {
                tracing::info!(topic, "created the dead-letter topic ({option})");
                // Wait (bounded) until the brokers describe the new topic's
                // max.message.bytes, so walcast checks dead-letter records
                // against it rather than an assumed limit.
                for _ in 0..20 {
                    let described = admin.describe_configs([&spec], &opts).await;
                    let known = matches!(&described, Ok(rs) if rs.iter().flatten().any(|r| {
                        r.get("max.message.bytes").and_then(|e| e.value.as_deref()).is_some_and(|v| !v.is_empty())
                    }));
                    if known {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                let kind = match code {
                    RDKafkaErrorCode::TopicAuthorizationFailed
                    | RDKafkaErrorCode::ClusterAuthorizationFailed
                    | RDKafkaErrorCode::PolicyViolation
                    | RDKafkaErrorCode::InvalidReplicationFactor
                    | RDKafkaErrorCode::InvalidPartitions
                    | RDKafkaErrorCode::InvalidConfig => ErrorKind::OperatorAction,
                    _ => ErrorKind::Retryable,
                };
                return Err(Error::new(
                    kind,
                    format!(
                        "the dead-letter topic {topic:?} ({option}) does not exist and walcast cannot create it: {code}"
                    ),
                )
                .with_hint(format!(
                    "create it as a Kafka administrator: {}; and grant walcast's principal Describe, DescribeConfigs and Write on it",
                    create_command(bootstrap, topic)
                )));
            }
        }
    }
    Ok(())
}
