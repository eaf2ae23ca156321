//! Tools of the reliability suite: the scenario report, process signals and
//! memory readings, a reader that keeps only what the checker needs, the
//! observation taken at each kill, and topic creation with a replication
//! factor.
//!
//! The same tests are the short suite (CI: `scripts/dev test`) and the long
//! one (`scripts/dev chaos`): the long one sets `WALCAST_CHAOS_CYCLES` (more
//! cycles, larger transactions) and `WALCAST_CHAOS_REPORT` (a directory each
//! scenario appends its row to).

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::checker::{KillObservation, Observed, Report};
use crate::env::TestEnv;
use crate::pg::TestDb;

/// `WALCAST_CHAOS_CYCLES` when set (the long suite), else `short`.
pub fn cycles(short: usize) -> usize {
    std::env::var("WALCAST_CHAOS_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(short)
}

/// True when the long suite runs (`WALCAST_CHAOS_CYCLES` is set).
pub fn long_suite() -> bool {
    std::env::var_os("WALCAST_CHAOS_CYCLES").is_some()
}

/// `short` in CI, `long` in the long suite.
pub fn pick<T>(short: T, long: T) -> T {
    if long_suite() {
        long
    } else {
        short
    }
}

/// True when the suite runs against a build that is known to be broken
/// (`scripts/dev chaos --broken-build`): scenarios then assert that the
/// checker found violations instead of asserting that it found none.
pub fn expect_violations() -> bool {
    std::env::var("WALCAST_EXPECT_VIOLATIONS").is_ok_and(|v| v == "1")
}

/// One row of the report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScenarioResult {
    /// Scenario name.
    pub scenario: String,
    /// Fault cycles (kills, outages, …).
    pub cycles: usize,
    /// Committed events.
    pub events: usize,
    /// Records read from Kafka.
    pub observed: usize,
    /// Committed events missing from Kafka.
    pub lost: usize,
    /// Records of rolled-back transactions (or ids nobody wrote).
    pub phantom: usize,
    /// First occurrences out of commit order.
    pub reordered: usize,
    /// Records repeating an event.
    pub duplicates: usize,
    /// Duplicates that are not a replayed suffix.
    pub duplicates_not_suffix: usize,
    /// Ack-safety violations.
    pub ack_safety: usize,
    /// Peak resident memory of walcast (max VmHWM over its processes), bytes.
    pub peak_rss_bytes: Option<u64>,
    /// The bound it was checked against, bytes.
    pub rss_bound_bytes: Option<u64>,
    /// Wall time.
    pub seconds: f64,
    /// Anything else worth reading.
    pub notes: String,
}

impl ScenarioResult {
    /// A result for `scenario` from a checker report.
    pub fn new(scenario: &str, cycles: usize, report: &Report, started: Instant) -> Self {
        ScenarioResult {
            scenario: scenario.into(),
            cycles,
            events: report.committed,
            observed: report.observed,
            lost: report.lost.len(),
            phantom: report.phantom.len(),
            reordered: report.order_violations.len(),
            duplicates: report.duplicates,
            duplicates_not_suffix: report.duplicates_not_suffix.len(),
            ack_safety: report.ack_safety.len(),
            seconds: started.elapsed().as_secs_f64(),
            ..Default::default()
        }
    }

    /// Adds a note.
    pub fn note(mut self, note: impl AsRef<str>) -> Self {
        if !self.notes.is_empty() {
            self.notes.push_str("; ");
        }
        self.notes.push_str(note.as_ref());
        self
    }

    /// Sets the memory figures.
    pub fn rss(mut self, peak: Option<u64>, bound: Option<u64>) -> Self {
        self.peak_rss_bytes = peak;
        self.rss_bound_bytes = bound;
        self
    }

    /// The markdown row (the header is [`MARKDOWN_HEADER`]).
    pub fn markdown_row(&self) -> String {
        let mib = |b: Option<u64>| {
            b.map(|b| format!("{:.0} MiB", b as f64 / 1048576.0))
                .unwrap_or_else(|| "-".into())
        };
        format!(
            "| {} | {} | {} | {} | {} | {} | {} ({}) | {} | {} / {} | {:.0} s | {} |",
            self.scenario,
            self.cycles,
            self.events,
            self.lost,
            self.phantom,
            self.reordered,
            self.duplicates,
            if self.duplicates_not_suffix == 0 {
                "replayed suffixes".to_string()
            } else {
                format!("{} NOT a replayed suffix", self.duplicates_not_suffix)
            },
            self.ack_safety,
            mib(self.peak_rss_bytes),
            mib(self.rss_bound_bytes),
            self.seconds,
            self.notes.replace('|', "/"),
        )
    }

    /// Prints the row and, when `WALCAST_CHAOS_REPORT` names a directory
    /// (`scripts/dev chaos`), appends it to `results.jsonl` and `rows.md` there.
    pub fn record(&self) {
        eprintln!("RELIABILITY {}", self.markdown_row());
        let Some(dir) = std::env::var_os("WALCAST_CHAOS_REPORT") else {
            return;
        };
        let dir = std::path::PathBuf::from(dir);
        let _ = std::fs::create_dir_all(&dir);
        let append = |name: &str, line: String| {
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(name))
            {
                let _ = writeln!(f, "{line}");
            }
        };
        append(
            "results.jsonl",
            serde_json::to_string(self).unwrap_or_default(),
        );
        if !dir.join("rows.md").exists() {
            append("rows.md", MARKDOWN_HEADER.to_string());
        }
        append("rows.md", self.markdown_row());
    }
}

/// The header of the markdown report.
pub const MARKDOWN_HEADER: &str = "| scenario | cycles | events | lost | phantom | reordered | duplicates | ack-safety | peak RSS / bound | time | notes |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |";

/// Sends a signal (`STOP`, `CONT`, `KILL`, …) to a process we started.
pub fn signal(pid: u32, sig: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()?;
    if !status.success() {
        bail!("kill -{sig} {pid} failed");
    }
    Ok(())
}

fn status_field(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line
        .trim_start_matches(field)
        .trim_start_matches(':')
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Peak resident memory (`VmHWM`) of a live process, bytes.
pub fn peak_rss(pid: u32) -> Option<u64> {
    status_field(pid, "VmHWM")
}

/// Current resident memory (`VmRSS`), bytes.
pub fn current_rss(pid: u32) -> Option<u64> {
    status_field(pid, "VmRSS")
}

/// The max of two optional readings.
pub fn max_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

pub use crate::kafka::create_topics_with as create_topics;

/// Reads topics from the beginning keeping only (id header, key, partition,
/// offset): what the checker needs, so a gigabyte of payloads costs nothing.
pub struct IdReader {
    consumer: BaseConsumer,
    topics: Vec<String>,
    /// Everything read, per partition in offset order.
    pub observed: Vec<Observed>,
    seen: HashSet<String>,
    /// When the broker first appended each id (ms since the epoch; the
    /// topics use `message.timestamp.type = LogAppendTime`).
    appended: HashMap<String, i64>,
    next: HashMap<(String, i32), i64>,
    bootstrap: String,
}

impl std::fmt::Debug for IdReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdReader")
            .field("topics", &self.topics)
            .field("observed", &self.observed.len())
            .finish()
    }
}

impl IdReader {
    /// Assigns every partition of `topics` (which must exist) from the beginning.
    pub fn new(bootstrap: &str, topics: &[String]) -> Result<IdReader> {
        let mut r = IdReader {
            consumer: checker_client(bootstrap)?,
            topics: topics.to_vec(),
            observed: Vec::new(),
            seen: HashSet::new(),
            appended: HashMap::new(),
            next: HashMap::new(),
            bootstrap: bootstrap.to_string(),
        };
        r.assign()?;
        Ok(r)
    }

    /// Assigns every partition of the topics, each from the offset after the
    /// last record read (the beginning when none was).
    fn assign(&mut self) -> Result<()> {
        let mut tpl = TopicPartitionList::new();
        for t in &self.topics {
            for p in 0..partitions(&self.consumer, &self.bootstrap, t)? {
                let offset = match self.next.get(&(t.clone(), p)) {
                    Some(&o) => Offset::Offset(o),
                    None => Offset::Beginning,
                };
                tpl.add_partition_offset(t, p, offset)?;
            }
        }
        self.consumer.assign(&tpl).context("assign")?;
        Ok(())
    }

    /// Replaces the client with a new one that goes on where this one is.
    /// Seen after a broker pause: one client kept answering "Unknown
    /// partition" for minutes while the broker served everyone else, even
    /// after metadata refreshes. A new client asks the broker afresh.
    fn reconnect(&mut self) -> Result<()> {
        eprintln!("checker: replacing its Kafka client (no progress with the old one)");
        self.consumer = checker_client(&self.bootstrap)?;
        self.assign()
    }

    /// Polls one record; returns its id when one arrived.
    fn poll_once(&mut self, timeout: Duration) -> Option<String> {
        match self.consumer.poll(timeout) {
            None | Some(Err(_)) => None,
            Some(Ok(m)) => {
                let id = m
                    .headers()
                    .and_then(|h| {
                        h.iter()
                            .find(|h| h.key == "id")
                            .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()))
                    })
                    .unwrap_or_default();
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                self.next
                    .insert((m.topic().to_string(), m.partition()), m.offset() + 1);
                // Only the broker's append time fences the ack-safety check;
                // a record with another timestamp type makes every append
                // time unknown (i64::MAX: "after any kill").
                let appended = match m.timestamp() {
                    rdkafka::Timestamp::LogAppendTime(ms) => ms,
                    _ => i64::MAX,
                };
                self.appended.entry(id.clone()).or_insert(appended);
                self.seen.insert(id.clone());
                self.observed.push(Observed {
                    id: id.clone(),
                    key,
                    partition: m.partition(),
                    offset: m.offset(),
                });
                Some(id)
            }
        }
    }

    /// Distinct ids read so far.
    pub fn ids(&self) -> &HashSet<String> {
        &self.seen
    }

    /// Distinct ids the broker had appended at or before `at_ms` (ms since
    /// the epoch): what Kafka held at that moment, whatever produce requests
    /// in flight then landed later. Needs topics with
    /// `message.timestamp.type = LogAppendTime` ([`APPEND_TIME_TOPIC_CONFIG`]).
    pub fn ids_appended_by(&self, at_ms: i64) -> HashSet<String> {
        self.appended
            .iter()
            .filter(|(_, t)| **t <= at_ms)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Reads until any id of `want` was seen; false on timeout.
    pub fn wait_any(&mut self, want: &HashSet<String>, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        if want.iter().any(|id| self.seen.contains(id)) {
            return true;
        }
        while Instant::now() < deadline {
            if let Some(id) = self.poll_once(Duration::from_millis(100)) {
                if want.contains(&id) {
                    return true;
                }
            }
        }
        false
    }

    /// Reads until every id of `want` was seen; false on timeout.
    pub fn wait_for(&mut self, want: &HashSet<String>, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut missing: HashSet<&str> = want
            .iter()
            .map(String::as_str)
            .filter(|id| !self.seen.contains(*id))
            .collect();
        while !missing.is_empty() {
            if Instant::now() >= deadline {
                return false;
            }
            if let Some(id) = self.poll_once(Duration::from_millis(100)) {
                missing.remove(id.as_str());
            }
        }
        true
    }

    /// Reads up to the high watermarks the partitions have now.
    pub fn read_to_end(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut high: HashMap<(String, i32), i64> = HashMap::new();
        for t in self.topics.clone() {
            for p in 0..partitions(&self.consumer, &self.bootstrap, &t)? {
                // Right after a broker restart or pause, leaders may be
                // unavailable for a few seconds: retry until the deadline.
                let mut failures = 0u32;
                let h = loop {
                    match self
                        .consumer
                        .fetch_watermarks(&t, p, Duration::from_secs(5))
                    {
                        Ok((_, h)) => break h,
                        Err(e) if Instant::now() >= deadline => {
                            return Err(e).with_context(|| {
                                format!("watermarks of {t}/{p}\n{}", kafka_diagnostics())
                            })
                        }
                        Err(e) => {
                            // A cached view from while the brokers were
                            // away may lack the partition ("Unknown
                            // partition"): ask for fresh metadata, and
                            // after a few failures start a new client.
                            failures += 1;
                            eprintln!("checker: watermarks of {t}/{p}: {e} (attempt {failures})");
                            if failures.is_multiple_of(8) {
                                self.reconnect()?;
                            } else {
                                let _ = self
                                    .consumer
                                    .fetch_metadata(Some(&t), Duration::from_secs(5));
                            }
                            std::thread::sleep(Duration::from_millis(250))
                        }
                    }
                };
                high.insert((t.clone(), p), h);
            }
        }
        let mut progress = Instant::now();
        loop {
            let done = high
                .iter()
                .all(|(k, h)| *h == 0 || self.next.get(k).copied().unwrap_or(0) >= *h);
            if done {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "could not read to the high watermarks {high:?} in time\n{}",
                    kafka_diagnostics()
                );
            }
            if self.poll_once(Duration::from_millis(100)).is_some() {
                progress = Instant::now();
            } else if progress.elapsed() >= Duration::from_secs(15) {
                self.reconnect()?;
                progress = Instant::now();
            }
        }
    }
}

/// The checker's consumer: no group membership, offsets assigned by hand.
fn checker_client(bootstrap: &str) -> Result<BaseConsumer> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set(
            "group.id",
            format!("walcast-chaos-{}", uuid::Uuid::new_v4()),
        )
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.max.bytes", "52428800")
        // Right after a broker pause or restart, a connection whose
        // request the broker never answered is given up after 10 s and
        // reopened (the default, 60 s, is as long as the whole wait).
        .set("socket.timeout.ms", "10000")
        .set("socket.connection.setup.timeout.ms", "10000")
        .create()
        .context("creating the consumer")
}

fn partitions(consumer: &BaseConsumer, bootstrap: &str, topic: &str) -> Result<i32> {
    // The checker reads while brokers are paused, killed or just resumed: a
    // transport failure is retried for a while, not taken as the answer.
    // Every third attempt asks through a new client, so a client stuck on a
    // connection from before the resume cannot hold the check up.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(180);
    let mut attempt = 0u32;
    let md = loop {
        attempt += 1;
        let fresh = attempt
            .is_multiple_of(3)
            .then(|| checker_client(bootstrap))
            .transpose()?;
        match fresh
            .as_ref()
            .unwrap_or(consumer)
            .fetch_metadata(Some(topic), Duration::from_secs(10))
        {
            Ok(md) => break md,
            Err(e) if Instant::now() < deadline => {
                eprintln!(
                    "metadata for {topic}{}: {e}; retrying ({:.1} s so far; raw ApiVersions: {})",
                    if fresh.is_some() { " (new client)" } else { "" },
                    started.elapsed().as_secs_f64(),
                    probe_brokers(bootstrap).1
                );
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "metadata for {topic} (no broker answered for {:.0} s)\n{}",
                        started.elapsed().as_secs_f64(),
                        kafka_diagnostics()
                    )
                })
            }
        }
    };
    let n = md
        .topics()
        .first()
        .map(|m| m.partitions().len())
        .unwrap_or(0);
    if n == 0 {
        bail!("topic {topic} has no partitions (does it exist?)");
    }
    Ok(n as i32)
}

/// What the environment's Kafka looked like: `scripts/dev env status` and
/// the tail of each node's server log (for a checker that cannot reach it).
pub fn kafka_diagnostics() -> String {
    let repo = crate::env::repo_dir();
    let mut out = String::new();
    if let Ok(o) = std::process::Command::new(repo.join("scripts/dev"))
        .args(["env", "status"])
        .current_dir(&repo)
        .output()
    {
        out.push_str(&String::from_utf8_lossy(&o.stdout));
    }
    // A raw ApiVersions request to each bootstrap address: an answer in time
    // means the broker serves requests and the client side is at fault.
    let (_, probes) = probe_brokers(&crate::env::TestEnv::get().kafka_bootstrap);
    out.push_str(&format!("--- raw ApiVersions: {probes}\n"));
    // The brokers' sockets: a listener's accept queue (Recv-Q) that is full,
    // or connections stuck in SYN-SENT or connected to themselves, tell a
    // hung broker from a client problem.
    let env = crate::env::TestEnv::get();
    for hp in env.kafka_bootstrap.split(',') {
        if let Some(port) = hp.rsplit(':').next() {
            if let Ok(o) = std::process::Command::new("ss")
                .args(["-tan", &format!("( sport = :{port} or dport = :{port} )")])
                .output()
            {
                let text = String::from_utf8_lossy(&o.stdout);
                let lines: Vec<&str> = text.lines().collect();
                out.push_str(&format!(
                    "--- sockets of port {port} ({} lines, first 30)\n",
                    lines.len()
                ));
                for l in lines.iter().take(30) {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
    }
    // A broker that runs (not state T) yet answers nothing: its threads say
    // where it waits (`jstack` of each node's JVM, from its pid file).
    let dev_dir = env
        .var("WALCAST_DEV_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| repo.join(".walcast"));
    if let Ok(nodes) = std::fs::read_dir(dev_dir.join("kafka")) {
        for node in nodes.flatten() {
            let Some(pid) = std::fs::read_to_string(node.path().join("kafka.pid"))
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok())
            else {
                continue;
            };
            if let Ok(o) = std::process::Command::new("jstack")
                .arg(pid.to_string())
                .output()
            {
                let text = String::from_utf8_lossy(&o.stdout);
                out.push_str(&format!("--- jstack {pid} (first 300 lines)\n"));
                for l in text.lines().take(300) {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
    }
    let dev = dev_dir;
    if let Ok(nodes) = std::fs::read_dir(dev.join("kafka")) {
        for node in nodes.flatten() {
            let log = node.path().join("logs/server.log");
            if let Ok(text) = std::fs::read_to_string(&log) {
                let lines: Vec<&str> = text.lines().collect();
                let from = lines.len().saturating_sub(40);
                out.push_str(&format!("--- last lines of {}\n", log.display()));
                for l in &lines[from..] {
                    out.push_str(&l.chars().take(300).collect::<String>());
                    out.push('\n');
                }
            }
        }
    }
    out
}

/// Sends a Kafka ApiVersions request (v0) over a plain TCP connection and
/// waits up to 5 s for the answer's header: tells a broker that accepts
/// connections but serves nothing from a client that cannot reach it.
/// `Ok`: how long the answer took; `Err`: what happened instead.
pub fn probe_broker(addr: &str) -> std::result::Result<Duration, String> {
    use std::io::Read as _;
    use std::net::{TcpStream, ToSocketAddrs};
    let started = Instant::now();
    let sa = addr
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| format!("cannot resolve {addr}"))?;
    let mut stream = TcpStream::connect_timeout(&sa, Duration::from_secs(5))
        .map_err(|e| format!("connect failed: {e}"))?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let client = b"walcast-probe";
    let mut req = Vec::new();
    req.extend_from_slice(&18i16.to_be_bytes()); // ApiVersions
    req.extend_from_slice(&0i16.to_be_bytes()); // version 0
    req.extend_from_slice(&7i32.to_be_bytes()); // correlation id
    req.extend_from_slice(&(client.len() as i16).to_be_bytes());
    req.extend_from_slice(client);
    let mut frame = (req.len() as i32).to_be_bytes().to_vec();
    frame.extend_from_slice(&req);
    stream
        .write_all(&frame)
        .map_err(|e| format!("connected, write failed: {e}"))?;
    // The response header: its size and the correlation id.
    let mut head = [0u8; 8];
    stream.read_exact(&mut head).map_err(|e| {
        format!(
            "connected, NO ANSWER within {} ms: {e}",
            started.elapsed().as_millis()
        )
    })?;
    Ok(started.elapsed())
}

/// [`probe_broker`] for each address of `bootstrap`: whether every broker
/// answered, and one line saying what each did.
pub fn probe_brokers(bootstrap: &str) -> (bool, String) {
    let mut all = true;
    let text = bootstrap
        .split(',')
        .map(|hp| match probe_broker(hp) {
            Ok(d) => format!("{hp} answered in {} ms", d.as_millis()),
            Err(e) => {
                all = false;
                format!("{hp}: {e}")
            }
        })
        .collect::<Vec<_>>()
        .join("; ");
    (all, text)
}

/// Waits until no connection holds the test's slot.
pub async fn wait_slot_released(env: &TestEnv, db: &TestDb, timeout: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    while db.slot_active(env).await? {
        if tokio::time::Instant::now() >= deadline {
            bail!("slot {} is still active after {timeout:?}", db.slot);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Ok(())
}

/// What the test sees right after walcast died: the slot's confirmed LSN
/// (once the walsender let go of it) and every id Kafka holds (`reader`
/// reads on from where it stopped at the previous kill, up to the current
/// high watermarks).
pub async fn observe_kill(
    env: &TestEnv,
    db: &TestDb,
    reader: &mut IdReader,
    died_at_ms: i64,
) -> Result<KillObservation> {
    wait_slot_released(env, db, Duration::from_secs(30)).await?;
    let confirmed_lsn = db
        .confirmed_flush_lsn(env)
        .await?
        .context("the slot disappeared")?;
    tokio::task::block_in_place(|| reader.read_to_end(Duration::from_secs(120)))?;
    Ok(KillObservation {
        confirmed_lsn,
        // Fenced: records that produce requests in flight at the kill wrote
        // afterwards do not count as "in Kafka when the LSN was confirmed".
        ids_in_kafka: reader.ids_appended_by(died_at_ms),
    })
}

/// The topic config that makes the broker stamp each record with its append
/// time, which [`IdReader::ids_appended_by`] fences the ack-safety check with.
pub const APPEND_TIME_TOPIC_CONFIG: (&str, &str) = ("message.timestamp.type", "LogAppendTime");

/// Milliseconds since the Unix epoch (the broker's clock: same machine).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The walsender serving the test's slot (None when nobody holds it).
pub async fn walsender_pid(env: &TestEnv, db: &TestDb) -> Result<Option<i32>> {
    let c = db.admin(env).await?;
    let row = c
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.slot],
        )
        .await?;
    Ok(row.and_then(|r| r.get(0)))
}

/// `pg_terminate_backend` of the walsender serving the test's slot.
pub async fn terminate_walsender(env: &TestEnv, db: &TestDb) -> Result<bool> {
    let c = db.admin(env).await?;
    let row = c
        .query_one(
            "SELECT coalesce(bool_or(pg_terminate_backend(active_pid)), false) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL",
            &[&db.slot],
        )
        .await?;
    Ok(row.get(0))
}

/// Samples a process's peak resident memory (`VmHWM`) until it exits or the
/// probe is finished: the peak of a process that is about to be killed or
/// abort itself, which cannot be read afterwards.
#[derive(Debug)]
pub struct RssProbe {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Option<u64>>,
}

impl RssProbe {
    /// Starts sampling `pid` every 50 ms.
    pub fn start(pid: u32) -> RssProbe {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = None;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                match peak_rss(pid) {
                    Some(v) => peak = max_opt(peak, Some(v)),
                    None => break,
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        });
        RssProbe { stop, thread }
    }

    /// The highest peak seen.
    pub fn finish(self) -> Option<u64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().ok().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_tells_a_silent_listener_from_a_closed_port() {
        // Accepts connections (the kernel's backlog) and never answers: a
        // hung broker.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap().to_string();
        let err = probe_broker(&addr).unwrap_err();
        assert!(err.starts_with("connected, NO ANSWER"), "{err}");
        let (all, text) = probe_brokers(&addr);
        assert!(!all, "{text}");
        drop(silent);
        let err = probe_broker(&addr).unwrap_err();
        assert!(err.starts_with("connect failed"), "{err}");
    }
}
