//! The systems under test: how each is configured, started, measured and
//! stopped. Every system runs as its own OS process, started by the harness.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::clock;
use crate::db::{
    split_publication, split_tables, AGGREGATE_TYPE, BENCH_DB, DEBEZIUM_PUBLICATION, PUBLICATION,
    SPLIT_TABLES,
};
use crate::env::BenchEnv;
use crate::procstat;

/// A contestant.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum System {
    /// walcast (release build), default settings.
    Walcast,
    /// Kafka Connect standalone + Debezium PostgreSQL connector + Outbox EventRouter.
    Debezium,
    /// The same Debezium with heartbeats and a heartbeat action query (idle workload only).
    DebeziumHeartbeat,
    /// The polling relay (SELECT … FOR UPDATE SKIP LOCKED, produce, DELETE).
    Polling,
    /// `pg_recvlogical` draining the slot to /dev/null: Postgres alone.
    PgRecvlogical,
    /// walcast's source + decoder + router without Kafka.
    PgDrain,
    /// A bare rdkafka producer: Kafka alone.
    KafkaLimit,
}

impl System {
    /// Short name used in tables, topics and file names.
    pub fn name(self) -> &'static str {
        match self {
            System::Walcast => "walcast",
            System::Debezium => "debezium",
            System::DebeziumHeartbeat => "debezium-heartbeat",
            System::Polling => "polling",
            System::PgRecvlogical => "pg-recvlogical",
            System::PgDrain => "pg-drain",
            System::KafkaLimit => "kafka-limit",
        }
    }

    /// Reads a replication slot (the harness creates it before the events).
    pub fn uses_slot(self) -> bool {
        matches!(
            self,
            System::Walcast
                | System::Debezium
                | System::DebeziumHeartbeat
                | System::PgRecvlogical
                | System::PgDrain
        )
    }

    /// Produces the benchmark topic (a consumer decides when it is done).
    pub fn produces(self) -> bool {
        !matches!(self, System::PgRecvlogical | System::PgDrain)
    }
}

/// Settings of the contestants that are not per run.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// The walcast binary (release build).
    pub walcast_bin: PathBuf,
    /// This harness's own binary (for the subcommand contestants).
    pub self_exe: PathBuf,
    /// Directory with the Kafka Connect + Debezium jars.
    pub debezium_libs: PathBuf,
    /// `java`.
    pub java: PathBuf,
    /// Directory with `pg_recvlogical`.
    pub pg_bindir: PathBuf,
    /// Polling relay: rows per poll.
    pub poll_batch: i64,
    /// Polling relay: sleep after a short poll.
    pub poll_interval_ms: u64,
}

/// One launch of a system.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Which.
    pub system: System,
    /// Directory for its configuration, state and log.
    pub dir: PathBuf,
    /// Its replication slot (slot systems).
    pub slot: String,
    /// Topic prefix: records go to `<prefix>.Order`.
    pub topic_prefix: String,
    /// Events to produce or decode (limit tools).
    pub events: u64,
    /// Payload bytes (kafka-limit).
    pub payload: u32,
    /// Stop position (pg_recvlogical).
    pub end_lsn: Option<String>,
    /// walcast only: the counter timeline's CSV file (`WALCAST_DEBUG_TIMELINE`).
    pub timeline: Option<PathBuf>,
    /// walcast only: 0 for one pipeline on `slot` over `public.outbox`; N
    /// for `[[pipelines]]` over the split tables, on slots `<slot>_<k>`.
    pub pipelines: u32,
    /// walcast only: `postgres.streaming = true` (the large-txn workload).
    pub streaming: bool,
}

impl Spec {
    /// The topic this launch writes.
    pub fn topic(&self) -> String {
        format!("{}.{AGGREGATE_TYPE}", self.topic_prefix)
    }
}

/// CPU and memory of a run.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Usage {
    /// user + sys seconds of the system's process.
    pub cpu_s: f64,
    /// Peak RSS (VmHWM) of the system's process.
    pub peak_rss_bytes: u64,
    /// user + sys seconds of all PostgreSQL processes during the run.
    pub pg_cpu_s: f64,
    /// user + sys seconds of the Kafka broker during the run.
    pub kafka_cpu_s: f64,
    /// Busy seconds of the whole machine (all cores) during the run.
    pub machine_busy_s: f64,
    /// user + sys seconds of the harness itself (writer, consumer, sampling).
    #[serde(default)]
    pub harness_cpu_s: f64,
    /// Wall-clock seconds of the run.
    pub wall_s: f64,
    /// 1-minute load average at the end of the run.
    pub load_avg: f64,
}

impl Usage {
    /// Cores used by processes outside the run (other users of the machine):
    /// machine busy time minus the system's, PostgreSQL's, the broker's and
    /// the harness's CPU, per second of the run.
    pub fn outside_cores(&self) -> f64 {
        if self.wall_s <= 0.0 {
            return 0.0;
        }
        let ours = self.cpu_s + self.pg_cpu_s + self.kafka_cpu_s + self.harness_cpu_s;
        ((self.machine_busy_s - ours) / self.wall_s).max(0.0)
    }
}

/// A started system.
#[derive(Debug)]
pub struct Proc {
    /// Which.
    pub system: System,
    child: Child,
    /// Its pid.
    pub pid: u32,
    /// Its log (stdout + stderr).
    pub log: PathBuf,
    /// When it was spawned (harness clock).
    pub spawned_ns: u64,
    peak_rss: Arc<AtomicU64>,
    sampler_stop: Arc<AtomicBool>,
    pg_pid: Option<u32>,
    kafka_pid: Option<u32>,
    pg_cpu0: f64,
    kafka_cpu0: f64,
    machine0: f64,
    harness0: f64,
    children0: f64,
    exit: Option<ExitStatus>,
    exit_cpu: Option<f64>,
}

/// CPU of this harness's reaped children (`cutime + cstime` of /proc/self).
fn reaped_children_cpu() -> f64 {
    procstat::stat(std::process::id())
        .map(|s| (s.cutime + s.cstime) as f64 / procstat::clock_ticks())
        .unwrap_or(0.0)
}

fn toml_str(s: &str) -> String {
    format!("{s:?}")
}

/// walcast's configuration for a launch: README defaults except the names.
pub fn walcast_toml(env: &BenchEnv, spec: &Spec) -> String {
    format!(
        r#"# walcast-bench: README defaults, only names and addresses set
[postgres]
host = {host}
port = {port}
database = {db}
user = {user}
password = {password}
slot = {slot}
publication = {publication}
create_slot = false
create_publication = false
streaming = {streaming}

[outbox]
tables = ["public.outbox"]
topic = {topic}

[kafka]
bootstrap_servers = {bootstrap}

[pipeline]
state_dir = {state}
# Each measurement recreates its slot under the same name: its own record topic.
state_topic = {state_topic}

[log]
level = "info"
"#,
        host = toml_str(&env.pg_host),
        port = env.pg_port,
        db = toml_str(BENCH_DB),
        user = toml_str(&env.repl_user),
        password = toml_str(&env.repl_password),
        slot = toml_str(&spec.slot),
        publication = toml_str(PUBLICATION),
        topic = toml_str(&format!("{}.${{routedByValue}}", spec.topic_prefix)),
        bootstrap = toml_str(&env.kafka_bootstrap),
        state = toml_str(&spec.dir.join("walcast-state").display().to_string()),
        state_topic = toml_str(&format!("{}.walcast-state", spec.topic_prefix)),
        streaming = spec.streaming,
    )
    .replace(
        "\nslot = ",
        if spec.pipelines > 0 {
            "\n# slot = "
        } else {
            "\nslot = "
        },
    )
    .replace(
        "\npublication = ",
        if spec.pipelines > 0 {
            "\n# publication = "
        } else {
            "\npublication = "
        },
    )
    .replace(
        "tables = [\"public.outbox\"]",
        &if spec.pipelines > 0 {
            let all: Vec<String> = (0..SPLIT_TABLES)
                .map(|t| toml_str(&format!("public.outbox_p{t}")))
                .collect();
            format!("tables = [{}]", all.join(", "))
        } else {
            "tables = [\"public.outbox\"]".into()
        },
    ) + &pipelines_toml(spec)
}

/// The `[[pipelines]]` entries of a pipelines-workload launch.
fn pipelines_toml(spec: &Spec) -> String {
    let mut out = String::new();
    for k in 0..spec.pipelines {
        let tables: Vec<String> = split_tables(spec.pipelines, k)
            .iter()
            .map(|t| toml_str(t))
            .collect();
        out.push_str(&format!(
            "\n[[pipelines]]\nslot = {}\npublication = {}\ntables = [{}]\n",
            toml_str(&format!("{}_{k}", spec.slot)),
            toml_str(&split_publication(spec.pipelines, k)),
            tables.join(", ")
        ));
    }
    out
}

/// Kafka Connect worker settings (standalone). Producer overrides are the
/// throughput tuning documented in benches/README.md.
pub fn connect_worker_properties(env: &BenchEnv, dir: &Path) -> String {
    format!(
        "# walcast-bench: Kafka Connect standalone worker
bootstrap.servers={bootstrap}
key.converter=org.apache.kafka.connect.storage.StringConverter
value.converter=org.apache.kafka.connect.storage.StringConverter
offset.storage.file.filename={offsets}
offset.flush.interval.ms=1000
listeners=http://127.0.0.1:0
plugin.discovery=service_load
# throughput: the Connect worker defaults to max.in.flight=1 and batch.size=16384
producer.acks=all
producer.enable.idempotence=true
producer.max.in.flight.requests.per.connection=5
producer.linger.ms=5
producer.batch.size=262144
producer.buffer.memory=67108864
producer.compression.type=lz4
",
        bootstrap = env.kafka_bootstrap,
        offsets = dir.join("connect.offsets").display(),
    )
}

/// The Debezium connector with the Outbox EventRouter, routing like walcast.
pub fn debezium_connector_properties(env: &BenchEnv, spec: &Spec, heartbeat: bool) -> String {
    let mut s = format!(
        "# walcast-bench: Debezium PostgreSQL connector (pgoutput) + Outbox EventRouter
name=walcast-bench-debezium
connector.class=io.debezium.connector.postgresql.PostgresConnector
tasks.max=1
plugin.name=pgoutput
database.hostname={host}
database.port={port}
database.user={user}
database.password={password}
database.dbname={db}
topic.prefix={prefix}
slot.name={slot}
publication.name={publication}
publication.autocreate.mode=disabled
snapshot.mode=no_data
table.include.list={tables}
tombstones.on.delete=false
# throughput: bigger batches and queue than the defaults (2048 / 8192),
# no 500 ms wait for a batch to fill (poll.interval.ms)
max.batch.size=8192
max.queue.size=32768
poll.interval.ms=10
# no __debezium.context.* headers: records like walcast's (key, value, id, type)
extended.headers.enabled=false
transforms=outbox
transforms.outbox.type=io.debezium.transforms.outbox.EventRouter
transforms.outbox.route.topic.replacement={topic_prefix}.${{routedByValue}}
transforms.outbox.table.fields.additional.placement=type:header:type
",
        host = env.pg_host,
        port = env.pg_port,
        user = env.admin_user,
        password = env.admin_password,
        db = BENCH_DB,
        prefix = spec.topic_prefix.replace('.', "_"),
        slot = spec.slot,
        publication = DEBEZIUM_PUBLICATION,
        topic_prefix = spec.topic_prefix,
        tables = if heartbeat {
            "public.outbox,public.debezium_heartbeat"
        } else {
            "public.outbox"
        },
    );
    if heartbeat {
        // Debezium's documented remedy for WAL growth while the captured
        // tables are quiet: heartbeats, and a heartbeat action query that
        // writes a captured table so the connector sees (and confirms) WAL
        // positions. The outbox router only handles the outbox's records.
        s.push_str(
            "# Debezium's documented remedy for WAL growth on quiet tables
heartbeat.interval.ms=1000
heartbeat.action.query=INSERT INTO public.debezium_heartbeat (ts) VALUES (now())
predicates=isOutbox
predicates.isOutbox.type=org.apache.kafka.connect.transforms.predicates.TopicNameMatches
predicates.isOutbox.pattern=.*\\\\.public\\\\.outbox
transforms.outbox.predicate=isOutbox
",
        );
    }
    s
}

const CONNECT_LOG4J: &str = "status = error
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = out
";

/// The JVM options of `connect-standalone.sh` (KAFKA_HEAP_OPTS and
/// KAFKA_JVM_PERFORMANCE_OPTS defaults of kafka-run-class.sh).
pub const CONNECT_JVM_OPTS: &[&str] = &[
    "-Xms256m",
    "-Xmx2g",
    "-server",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-XX:MaxInlineLevel=15",
    "-Djava.awt.headless=true",
];

fn command(env: &BenchEnv, tuning: &Tuning, spec: &Spec) -> Result<Command> {
    std::fs::create_dir_all(&spec.dir)?;
    let cmd = match spec.system {
        System::Walcast => {
            let cfg = spec.dir.join("walcast.toml");
            std::fs::write(&cfg, walcast_toml(env, spec))?;
            let mut c = Command::new(&tuning.walcast_bin);
            c.arg("run").arg("--config").arg(cfg).env_remove("RUST_LOG");
            match &spec.timeline {
                Some(file) => c.env("WALCAST_DEBUG_TIMELINE", file),
                None => c.env_remove("WALCAST_DEBUG_TIMELINE"),
            };
            c
        }
        System::Debezium | System::DebeziumHeartbeat => {
            let worker = spec.dir.join("worker.properties");
            let connector = spec.dir.join("connector.properties");
            let log4j = spec.dir.join("log4j2.properties");
            std::fs::write(&worker, connect_worker_properties(env, &spec.dir))?;
            std::fs::write(
                &connector,
                debezium_connector_properties(env, spec, spec.system == System::DebeziumHeartbeat),
            )?;
            std::fs::write(&log4j, CONNECT_LOG4J)?;
            let mut c = Command::new(&tuning.java);
            c.args(CONNECT_JVM_OPTS)
                .arg(format!("-Dlog4j2.configurationFile={}", log4j.display()))
                .arg("-cp")
                .arg(format!("{}/*", tuning.debezium_libs.display()))
                .arg("org.apache.kafka.connect.cli.ConnectStandalone")
                .arg(worker)
                .arg(connector);
            c
        }
        System::Polling => {
            let mut c = Command::new(&tuning.self_exe);
            c.arg("poll-relay")
                .arg("--conn")
                .arg(env.admin_conn(BENCH_DB))
                .arg("--bootstrap")
                .arg(&env.kafka_bootstrap)
                .arg("--topic")
                .arg(format!("{}.${{routedByValue}}", spec.topic_prefix))
                .arg("--batch")
                .arg(tuning.poll_batch.to_string())
                .arg("--interval-ms")
                .arg(tuning.poll_interval_ms.to_string());
            c
        }
        System::PgRecvlogical => {
            let mut c = Command::new(tuning.pg_bindir.join("pg_recvlogical"));
            c.args(["-h", &env.pg_host, "-p", &env.pg_port.to_string()])
                .args(["-U", &env.repl_user, "-d", BENCH_DB])
                .arg(format!("--slot={}", spec.slot))
                .arg("--start")
                .args(["-o", "proto_version=1", "-o"])
                .arg(format!("publication_names={PUBLICATION}"))
                .args(["-f", "-", "-F", "0", "-s", "1", "--no-loop"])
                .env("PGPASSWORD", &env.repl_password);
            if let Some(end) = &spec.end_lsn {
                c.arg(format!("--endpos={end}"));
            }
            c
        }
        System::PgDrain => {
            let cfg = spec.dir.join("walcast.toml");
            std::fs::write(&cfg, walcast_toml(env, spec))?;
            let mut c = Command::new(&tuning.self_exe);
            c.arg("pg-drain")
                .arg("--config")
                .arg(cfg)
                .arg("--events")
                .arg(spec.events.to_string());
            c
        }
        System::KafkaLimit => {
            let mut c = Command::new(&tuning.self_exe);
            c.arg("kafka-limit")
                .arg("--bootstrap")
                .arg(&env.kafka_bootstrap)
                .arg("--topic")
                .arg(spec.topic())
                .arg("--events")
                .arg(spec.events.to_string())
                .arg("--payload")
                .arg(spec.payload.to_string());
            c
        }
    };
    Ok(cmd)
}

impl Proc {
    /// Starts a system; stdout goes to `<dir>/<name>.out` (pg_recvlogical's
    /// stream to /dev/null), stderr to `<dir>/<name>.log`.
    pub fn start(env: &BenchEnv, tuning: &Tuning, spec: &Spec) -> Result<Proc> {
        let mut cmd = command(env, tuning, spec)?;
        let log = spec.dir.join(format!("{}.log", spec.system.name()));
        let out: Stdio = match spec.system {
            System::PgRecvlogical => Stdio::null(),
            System::Debezium | System::DebeziumHeartbeat => File::create(&log)?.into(),
            _ => File::create(spec.dir.join(format!("{}.out", spec.system.name())))?.into(),
        };
        let err: Stdio = match spec.system {
            System::Debezium | System::DebeziumHeartbeat => {
                File::options().append(true).open(&log)?.into()
            }
            _ => File::create(&log)?.into(),
        };
        let pg_pid = env.postgres_pid();
        let kafka_pid = env.kafka_pid();
        let pg_cpu0 = pg_pid.and_then(procstat::tree_cpu_secs).unwrap_or(0.0);
        let kafka_cpu0 = kafka_pid.and_then(procstat::cpu_secs).unwrap_or(0.0);
        let machine0 = procstat::machine_busy_secs().unwrap_or(0.0);
        let harness0 = procstat::cpu_secs(std::process::id()).unwrap_or(0.0);
        let children0 = reaped_children_cpu();
        let spawned_ns = clock::now_ns();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", spec.system.name()))?;
        let pid = child.id();
        let peak_rss = Arc::new(AtomicU64::new(0));
        let sampler_stop = Arc::new(AtomicBool::new(false));
        {
            let (peak, stop) = (peak_rss.clone(), sampler_stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match procstat::peak_rss_bytes(pid) {
                        Some(b) => {
                            peak.fetch_max(b, Ordering::Relaxed);
                        }
                        None => break,
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
        Ok(Proc {
            system: spec.system,
            child,
            pid,
            log,
            spawned_ns,
            peak_rss,
            sampler_stop,
            pg_pid,
            kafka_pid,
            pg_cpu0,
            kafka_cpu0,
            machine0,
            harness0,
            children0,
            exit: None,
            exit_cpu: None,
        })
    }

    /// The exit status if it exited (reaps it and keeps its CPU time).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            // A zombie still has its final stat; read it before reaping.
            let before = procstat::stat(self.pid)
                .filter(|s| s.state == 'Z')
                .map(|s| (s.utime + s.stime) as f64 / procstat::clock_ticks());
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exit = Some(status);
                let reaped = reaped_children_cpu() - self.children0;
                self.exit_cpu = Some(before.unwrap_or(0.0).max(reaped));
            }
        }
        self.exit
    }

    /// Measures the run so far: call when the work is done, before stopping.
    pub fn usage(&mut self) -> Usage {
        let own = match self.exited() {
            Some(_) => self.exit_cpu.unwrap_or(0.0),
            None => procstat::cpu_secs(self.pid).unwrap_or(0.0),
        };
        if self.exit.is_none() {
            if let Some(b) = procstat::peak_rss_bytes(self.pid) {
                self.peak_rss.fetch_max(b, Ordering::Relaxed);
            }
        }
        Usage {
            cpu_s: own,
            peak_rss_bytes: self.peak_rss.load(Ordering::Relaxed),
            pg_cpu_s: self
                .pg_pid
                .and_then(procstat::tree_cpu_secs)
                .map(|c| c - self.pg_cpu0)
                .unwrap_or(0.0),
            kafka_cpu_s: self
                .kafka_pid
                .and_then(procstat::cpu_secs)
                .map(|c| c - self.kafka_cpu0)
                .unwrap_or(0.0),
            machine_busy_s: procstat::machine_busy_secs().unwrap_or(0.0) - self.machine0,
            harness_cpu_s: procstat::cpu_secs(std::process::id()).unwrap_or(0.0) - self.harness0,
            wall_s: clock::secs(self.spawned_ns, clock::now_ns()),
            load_avg: procstat::load_average().unwrap_or(0.0),
        }
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(mut self, grace: Duration) -> Result<Option<ExitStatus>> {
        self.sampler_stop.store(true, Ordering::Relaxed);
        if let Some(s) = self.exited() {
            return Ok(Some(s));
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait()? {
                return Ok(Some(s));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "  {} did not stop within {}s of SIGTERM: SIGKILL",
            self.system.name(),
            grace.as_secs()
        );
        let _ = self.child.kill();
        Ok(self.child.wait().ok())
    }

    /// The last lines of its log (for failures).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.sampler_stop.store(true, Ordering::Relaxed);
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> BenchEnv {
        BenchEnv {
            repo: "/r".into(),
            dev_dir: "/d".into(),
            cache_dir: "/c".into(),
            pg_host: "127.0.0.1".into(),
            pg_port: 5432,
            admin_user: "postgres".into(),
            admin_password: "pw".into(),
            repl_user: "walcast".into(),
            repl_password: "w".into(),
            kafka_bootstrap: "127.0.0.1:9092".into(),
        }
    }

    fn spec(system: System) -> Spec {
        Spec {
            system,
            dir: "/tmp/x".into(),
            slot: "s1".into(),
            topic_prefix: "bench.t.walcast".into(),
            events: 10,
            payload: 200,
            end_lsn: None,
            timeline: None,
            pipelines: 0,
            streaming: false,
        }
    }

    #[test]
    fn walcast_config_of_the_pipelines_workload_splits_the_tables() {
        let mut spec = spec(System::Walcast);
        spec.pipelines = 2;
        let cfg = walcast_core::config::Config::from_toml(&walcast_toml(&env(), &spec))
            .unwrap_or_else(|e| panic!("{e}"));
        let split = cfg.pipeline_configs().unwrap();
        let got: Vec<(String, String, Vec<String>)> = split
            .iter()
            .map(|c| {
                (
                    c.postgres.slot.clone(),
                    c.postgres.publication.clone(),
                    c.outbox.tables.clone(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    "s1_0".to_string(),
                    "bench_split2_0".to_string(),
                    vec![
                        "public.outbox_p0".to_string(),
                        "public.outbox_p2".to_string()
                    ]
                ),
                (
                    "s1_1".to_string(),
                    "bench_split2_1".to_string(),
                    vec![
                        "public.outbox_p1".to_string(),
                        "public.outbox_p3".to_string()
                    ]
                ),
            ]
        );
        assert!(
            !cfg.postgres.create_slot,
            "the slots exist before the burst"
        );
    }

    #[test]
    fn walcast_config_is_valid() {
        let text = walcast_toml(&env(), &spec(System::Walcast));
        let dir = std::env::temp_dir().join(format!("walcast-bench-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("walcast.toml");
        std::fs::write(&path, text).unwrap();
        let cfg = walcast_core::config::Config::load(Some(&path), std::iter::empty(), &[])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.postgres.slot, "s1");
        assert_eq!(cfg.outbox.topic, "bench.t.walcast.${routedByValue}");
        assert!(!cfg.postgres.streaming, "README defaults: streaming off");
        let mut streaming = spec(System::Walcast);
        streaming.streaming = true;
        let cfg = walcast_core::config::Config::from_toml(&walcast_toml(&env(), &streaming))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(cfg.postgres.streaming);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn walcast_gets_the_timeline_variable_only_when_asked() {
        let dir = std::env::temp_dir().join(format!("walcast-bench-tl-{}", std::process::id()));
        let tuning = Tuning {
            walcast_bin: "/bin/true".into(),
            self_exe: "/bin/true".into(),
            debezium_libs: "/nonexistent".into(),
            java: "java".into(),
            pg_bindir: "/nonexistent".into(),
            poll_batch: 1,
            poll_interval_ms: 1,
        };
        let var = |spec: &Spec| {
            command(&env(), &tuning, spec)
                .unwrap()
                .get_envs()
                .find(|(k, _)| *k == "WALCAST_DEBUG_TIMELINE")
                .map(|(_, v)| v.map(|v| v.to_os_string()))
        };
        let mut s = spec(System::Walcast);
        s.dir = dir.clone();
        // Removed (not inherited from the harness's environment) when off.
        assert_eq!(var(&s), Some(None));
        s.timeline = Some(dir.join("t.csv"));
        assert_eq!(var(&s), Some(Some(dir.join("t.csv").into_os_string())));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn debezium_routes_like_walcast() {
        let p = debezium_connector_properties(&env(), &spec(System::Debezium), false);
        assert!(p.contains("plugin.name=pgoutput"));
        assert!(p.contains(
            "transforms.outbox.route.topic.replacement=bench.t.walcast.${routedByValue}"
        ));
        assert!(p.contains("topic.prefix=bench_t_walcast"));
        assert!(!p.contains("heartbeat"));
        let hb = debezium_connector_properties(&env(), &spec(System::Debezium), true);
        assert!(hb.contains("heartbeat.interval.ms=1000"));
        assert!(
            hb.contains("predicates.isOutbox.pattern=.*\\\\.public\\\\.outbox"),
            "{hb}"
        );
    }
}
