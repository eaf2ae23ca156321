//! Kafka for the reliability suite: the environment's brokers seen through
//! fault proxies, and a three-node KRaft cluster (replication factor 3,
//! `min.insync.replicas=2`) with per-node control.
//!
//! The cluster is the environment's own Kafka when it was started with
//! `WALCAST_KAFKA_NODES=3`; otherwise the suite starts one with `scripts/dev`
//! in `$WALCAST_DEV_DIR/kafka-cluster-3`, on ports 30 above the environment's
//! Kafka ports (so environments never collide), and stops it when done
//! (`scripts/dev env down` of the environment stops it too).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::env::{parse_exports, repo_dir, TestEnv};
use crate::proxy::FaultProxy;

/// One broker's ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokerPorts {
    /// Node id (1-based).
    pub node: u32,
    /// The PLAINTEXT listener.
    pub broker: u16,
    /// The PROXIED listener (what a proxy forwards to).
    pub proxied: u16,
    /// The port the PROXIED listener advertises (where the proxy listens).
    pub proxy_front: u16,
}

fn parse_brokers(bootstrap: &str, proxied: &str) -> Result<Vec<BrokerPorts>> {
    let brokers: Vec<u16> = bootstrap
        .split(',')
        .map(|hp| hp.rsplit(':').next().unwrap_or_default().parse())
        .collect::<Result<_, _>>()
        .with_context(|| format!("bootstrap {bootstrap:?}"))?;
    let pairs: Vec<(u16, u16)> = proxied
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|p| {
            let (a, b) = p.split_once(':').context("listener:front")?;
            Ok((a.parse()?, b.parse()?))
        })
        .collect::<Result<_>>()
        .with_context(|| format!("WALCAST_KAFKA_PROXIED_PORTS {proxied:?}"))?;
    if pairs.len() != brokers.len() {
        bail!("WALCAST_KAFKA_PROXIED_PORTS {proxied:?} does not match the bootstrap {bootstrap:?}: run scripts/dev env print from this checkout");
    }
    Ok(brokers
        .into_iter()
        .zip(pairs)
        .enumerate()
        .map(|(i, (broker, (proxied, proxy_front)))| BrokerPorts {
            node: i as u32 + 1,
            broker,
            proxied,
            proxy_front,
        })
        .collect())
}

/// The environment's brokers.
pub fn env_brokers(env: &TestEnv) -> Result<Vec<BrokerPorts>> {
    parse_brokers(
        &env.kafka_bootstrap,
        env.var("WALCAST_KAFKA_PROXIED_PORTS").unwrap_or_default(),
    )
}

static PROXY_PORTS: Mutex<()> = Mutex::new(());

/// A fault proxy in front of every broker (on the advertised PROXIED ports).
/// Those ports are fixed, so one test at a time holds them.
#[derive(Debug)]
pub struct KafkaProxies {
    /// One per broker, in node order.
    pub proxies: Vec<FaultProxy>,
    /// The bootstrap list through the proxies (for walcast's config).
    pub bootstrap: String,
    _ports: MutexGuard<'static, ()>,
}

impl KafkaProxies {
    /// Starts the proxies (waits for another test that holds them).
    pub fn start(brokers: &[BrokerPorts]) -> Result<KafkaProxies> {
        let guard = PROXY_PORTS.lock().unwrap_or_else(|p| p.into_inner());
        let mut proxies = Vec::new();
        for b in brokers {
            let listen = SocketAddr::from(([127, 0, 0, 1], b.proxy_front));
            let upstream = SocketAddr::from(([127, 0, 0, 1], b.proxied));
            proxies.push(FaultProxy::start_on(listen, upstream)?);
        }
        let bootstrap = brokers
            .iter()
            .map(|b| format!("127.0.0.1:{}", b.proxy_front))
            .collect::<Vec<_>>()
            .join(",");
        Ok(KafkaProxies {
            proxies,
            bootstrap,
            _ports: guard,
        })
    }

    /// Applies `f` to every proxy.
    pub fn each(&self, f: impl Fn(&FaultProxy)) {
        self.proxies.iter().for_each(f);
    }
}

/// A Kafka cluster with per-node control.
#[derive(Debug)]
pub struct KafkaCluster {
    /// `scripts/dev` settings of the cluster's environment (empty: the test
    /// environment itself).
    overrides: Vec<(String, String)>,
    /// Its bootstrap list.
    pub bootstrap: String,
    /// Its brokers.
    pub brokers: Vec<BrokerPorts>,
    /// True when this handle started it (and stops it on drop).
    owned: bool,
}

fn run_dev(overrides: &[(String, String)], args: &[&str]) -> Result<String> {
    let repo = repo_dir();
    let mut cmd = Command::new(repo.join("scripts/dev"));
    cmd.args(args).current_dir(&repo);
    for (k, v) in overrides {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .with_context(|| format!("running scripts/dev {args:?}"))?;
    if !out.status.success() {
        bail!(
            "scripts/dev {args:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl KafkaCluster {
    /// A three-node cluster: the environment's Kafka if it has three nodes,
    /// else one started for the suite (about 20 s).
    pub fn three_nodes(env: &TestEnv) -> Result<KafkaCluster> {
        if env
            .var("WALCAST_KAFKA_NODES")
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(1)
            >= 3
        {
            return Ok(KafkaCluster {
                overrides: Vec::new(),
                bootstrap: env.kafka_bootstrap.clone(),
                brokers: env_brokers(env)?,
                owned: false,
            });
        }
        let dev_dir = PathBuf::from(
            env.var("WALCAST_DEV_DIR")
                .context("WALCAST_DEV_DIR is not set by scripts/dev env print")?,
        );
        let base = env_brokers(env)?
            .first()
            .context("the environment has no broker")?
            .broker;
        let controller: u16 = env
            .var("WALCAST_KAFKA_CONTROLLER_PORT")
            .and_then(|p| p.parse().ok())
            .unwrap_or(base + 1);
        let overrides: Vec<(String, String)> = [
            (
                "WALCAST_DEV_DIR",
                dev_dir.join("kafka-cluster-3").display().to_string(),
            ),
            ("WALCAST_KAFKA_NODES", "3".into()),
            ("WALCAST_KAFKA_PORT", (base + 30).to_string()),
            (
                "WALCAST_KAFKA_CONTROLLER_PORT",
                (controller + 30).to_string(),
            ),
            ("WALCAST_KAFKA_HEAP_OPTS", "-Xmx512m -Xms128m".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        run_dev(&overrides, &["env", "up", "kafka"])?;
        let vars = parse_exports(&run_dev(&overrides, &["env", "print"])?);
        let bootstrap = vars
            .get("WALCAST_KAFKA_BOOTSTRAP")
            .context("cluster bootstrap")?
            .clone();
        let brokers = parse_brokers(
            &bootstrap,
            vars.get("WALCAST_KAFKA_PROXIED_PORTS")
                .map(String::as_str)
                .unwrap_or_default(),
        )?;
        Ok(KafkaCluster {
            overrides,
            bootstrap,
            brokers,
            owned: true,
        })
    }

    /// `scripts/dev env ARGS…` on the cluster's environment, e.g.
    /// `["kill", "kafka:2"]`, `["start", "kafka:2"]`, `["pause", "kafka"]`.
    pub fn control(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["env"];
        full.extend_from_slice(args);
        run_dev(&self.overrides, &full).map(|_| ())
    }

    /// The node leading `topic`'s `partition` (from the cluster's metadata).
    pub fn leader_of(&self, topic: &str, partition: i32) -> Result<i32> {
        Ok(self.partition_state(topic, partition)?.0)
    }

    /// In-sync replicas of `topic`'s `partition`.
    pub fn isr_of(&self, topic: &str, partition: i32) -> Result<Vec<i32>> {
        Ok(self.partition_state(topic, partition)?.1)
    }

    /// Leader and in-sync replicas of `topic`'s `partition` (cluster metadata).
    fn partition_state(&self, topic: &str, partition: i32) -> Result<(i32, Vec<i32>)> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()?;
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let t = md.topics().first().context("no such topic")?;
        let p = t
            .partitions()
            .iter()
            .find(|p| p.id() == partition)
            .context("no such partition")?;
        Ok((p.leader(), p.isr().to_vec()))
    }

    /// Stops the cluster if this handle started it.
    pub fn stop(mut self) -> Result<()> {
        if self.owned {
            self.owned = false;
            run_dev(&self.overrides, &["env", "down"])?;
        }
        Ok(())
    }
}

impl Drop for KafkaCluster {
    fn drop(&mut self) {
        if self.owned {
            let _ = run_dev(&self.overrides, &["env", "down"]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_ports_parse() {
        let b =
            parse_brokers("127.0.0.1:61092,127.0.0.1:61102", "61094:61095,61104:61105").unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(
            b[1],
            BrokerPorts {
                node: 2,
                broker: 61102,
                proxied: 61104,
                proxy_front: 61105
            }
        );
        assert!(parse_brokers("127.0.0.1:1", "").is_err());
    }
}
