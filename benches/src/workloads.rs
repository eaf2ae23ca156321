//! The three workloads: backlog drain, steady load, idle database with busy
//! neighbours. Each gives every selected system the same events.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::clock;
use crate::db::{self, Pace, WriterLive};
use crate::env::BenchEnv;
use crate::kafka::{self, Receipts, TopicConsumer};
use crate::progress::{group, mmss, rate, Progress, Ticker};
use crate::stats::Latency;
use crate::systems::{Proc, Spec, System, Tuning, Usage};

/// Width of the throughput-over-time buckets.
pub const BUCKET: Duration = Duration::from_millis(500);

/// Seconds of a steady window by default.
pub const STEADY_SECS: u64 = 20;

/// The rate (events/s) whose steady window is [`LONG_STEADY_SECS`] by default.
pub const LONG_STEADY_RATE: u64 = 10_000;

/// Seconds of the [`LONG_STEADY_RATE`] window by default: long enough to
/// catch periodic stalls (issue 14).
pub const LONG_STEADY_SECS: u64 = 60;

/// `backlog-200b-txn10-timeline.csv`: walcast's counter timeline of a
/// backlog configuration, in the work dir (the plot takes the same name
/// with `.svg`).
pub fn timeline_file_name(payload: u32, txn: u32) -> String {
    format!(
        "backlog-{}-txn{txn}-timeline.csv",
        size_label(payload).to_lowercase()
    )
}

/// A steady-load rate: events/s, or `None` for as fast as the writer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateSpec {
    /// Events per second (`None` = max).
    pub rate: Option<u64>,
    /// Events per transaction.
    pub txn: u64,
}

impl RateSpec {
    /// `1k/s`, `10k/s`, `max`.
    pub fn label(&self) -> String {
        match self.rate {
            None => "max".into(),
            Some(r) if r % 1000 == 0 => format!("{}k/s", r / 1000),
            Some(r) => format!("{r}/s"),
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Backlog events per configuration.
    pub events: u64,
    /// One configuration `(payload, txn, events)` run with more events (the
    /// issue's full size) than the others.
    pub headline: Option<(u32, u32, u64)>,
    /// Payload sizes (bytes).
    pub payloads: Vec<u32>,
    /// Transaction sizes (events).
    pub txn_sizes: Vec<u32>,
    /// Steady rates.
    pub rates: Vec<RateSpec>,
    /// Steady window of every rate (`--steady-secs`); `None`: [`Plan::steady_for`]'s defaults.
    pub steady_secs: Option<u64>,
    /// Small sizes and short windows.
    pub quick: bool,
    /// walcast's backlog drains write a 10 ms counter timeline
    /// (`WALCAST_DEBUG_TIMELINE`) into the work dir.
    pub timeline: bool,
    /// Steady payload.
    pub steady_payload: u32,
    /// Idle window.
    pub idle: Duration,
    /// Systems.
    pub systems: Vec<System>,
    /// Workloads.
    pub backlog: bool,
    /// See `backlog`.
    pub steady_load: bool,
    /// See `backlog`.
    pub idle_load: bool,
    /// The pipelines workload: pipeline counts to drain one burst with
    /// (empty: not run).
    pub pipelines: Vec<u32>,
    /// Events of the pipelines workload's burst.
    pub pipelines_events: u64,
    /// The large-txn workload: events of its one transaction (0: not run).
    pub large_txn_events: u64,
    /// Connections for the backlog fill.
    pub fill_conns: usize,
    /// Connections for the paced writer.
    pub writer_conns: usize,
}

impl Plan {
    /// Whether a system is selected.
    pub fn has(&self, s: System) -> bool {
        self.systems.contains(&s)
    }

    /// Backlog configurations `(payload, txn, events)`: every payload ×
    /// every transaction size, the headline one with its own size.
    pub fn backlog_configs(&self) -> Vec<(u32, u32, u64)> {
        let mut v = Vec::new();
        for &p in &self.payloads {
            for &t in &self.txn_sizes {
                let n = match self.headline {
                    Some((hp, ht, hn)) if hp == p && ht == t => hn,
                    _ => self.events,
                };
                v.push((p, t, n));
            }
        }
        v
    }

    /// Systems in backlog order: the limits first, the polling relay last
    /// (it deletes the rows).
    pub fn backlog_systems(&self) -> Vec<System> {
        [
            System::PgRecvlogical,
            System::PgDrain,
            System::Walcast,
            System::Debezium,
            System::KafkaLimit,
            System::Polling,
        ]
        .into_iter()
        .filter(|s| self.has(*s))
        .collect()
    }

    /// Whether pg-drain reads each backlog a second time, after the relays
    /// (whenever it runs beside a system that is not a limit).
    pub fn limit_again(&self) -> bool {
        self.has(System::PgDrain)
            && [
                System::Walcast,
                System::Debezium,
                System::KafkaLimit,
                System::Polling,
            ]
            .iter()
            .any(|s| self.has(*s))
    }

    /// The steady window of a rate: `--steady-secs` if given, else 5 s in
    /// quick mode, else [`LONG_STEADY_SECS`] at [`LONG_STEADY_RATE`] (long
    /// enough to catch periodic stalls) and [`STEADY_SECS`] at other rates.
    pub fn steady_for(&self, r: &RateSpec) -> Duration {
        Duration::from_secs(match self.steady_secs {
            Some(s) => s,
            None if self.quick => 5,
            None if r.rate == Some(LONG_STEADY_RATE) => LONG_STEADY_SECS,
            None => STEADY_SECS,
        })
    }

    /// The file walcast's timeline of a backlog configuration goes to (in
    /// the work dir), when `--timeline` is on.
    pub fn timeline_file(
        &self,
        work_dir: &std::path::Path,
        payload: u32,
        txn: u32,
    ) -> Option<PathBuf> {
        self.timeline
            .then(|| work_dir.join(timeline_file_name(payload, txn)))
    }

    /// Relays of the steady workload.
    pub fn steady_systems(&self) -> Vec<System> {
        [System::Walcast, System::Debezium, System::Polling]
            .into_iter()
            .filter(|s| self.has(*s))
            .collect()
    }

    /// Relays of the idle workload (slot-based only; Debezium twice: as
    /// configured and with heartbeats).
    pub fn idle_systems(&self) -> Vec<System> {
        let mut v = Vec::new();
        if self.has(System::Walcast) {
            v.push(System::Walcast);
        }
        if self.has(System::Debezium) {
            v.push(System::Debezium);
            v.push(System::DebeziumHeartbeat);
        }
        v
    }

    /// Rough seconds per system for one backlog configuration.
    fn drain_estimate(&self, s: System, payload: u32, txn: u32, events: u64) -> f64 {
        let n = events as f64;
        let big = if payload > 1000 { 2.0 } else { 1.0 };
        let small_txn = if txn == 1 { 1.6 } else { 1.0 };
        let (rate, startup) = match s {
            System::PgRecvlogical => (60_000.0, 0.5),
            System::PgDrain => (50_000.0, 0.5),
            System::Walcast => (30_000.0, 1.0),
            System::Debezium | System::DebeziumHeartbeat => (12_000.0, 12.0),
            System::KafkaLimit => (120_000.0, 1.0),
            System::Polling => (40_000.0, 1.0),
        };
        n / rate * big * small_txn + startup + 3.0
    }

    /// Estimated seconds of every phase, in order (for the progress line).
    pub fn estimates(&self) -> Vec<f64> {
        let mut v = vec![8.0];
        if self.backlog {
            for (p, t, n) in self.backlog_configs() {
                let fill_rate = match (p > 1000, t) {
                    (true, _) => 15_000.0,
                    (false, 1) => 12_000.0,
                    (false, _) => 50_000.0,
                };
                v.push(n as f64 / fill_rate + 3.0);
                for s in self.backlog_systems() {
                    v.push(self.drain_estimate(s, p, t, n));
                }
                if self.limit_again() {
                    v.push(self.drain_estimate(System::PgDrain, p, t, n));
                }
            }
        }
        if !self.pipelines.is_empty() {
            let n = self.pipelines_events as f64;
            v.push(n / 50_000.0 + 3.0);
            for _ in &self.pipelines {
                v.push(n / 30_000.0 + 4.0);
            }
        }
        if self.steady_load {
            for s in self.steady_systems() {
                let startup = if s == System::Debezium { 15.0 } else { 3.0 };
                let windows: f64 = self
                    .rates
                    .iter()
                    .map(|r| self.steady_for(r).as_secs_f64() + 5.0)
                    .sum();
                v.push(startup + windows);
            }
        }
        if self.idle_load {
            for s in self.idle_systems() {
                let startup = if s == System::Walcast { 3.0 } else { 15.0 };
                v.push(startup + self.idle.as_secs_f64() + 3.0);
            }
        }
        if self.large_txn_events > 0 {
            for _streaming in [false, true] {
                v.push(self.large_txn_events as f64 / 25_000.0 + 8.0);
            }
        }
        v
    }
}

/// Shared state of a run.
#[derive(Debug)]
pub struct Ctx {
    /// Services.
    pub env: BenchEnv,
    /// Contestant settings.
    pub tuning: Tuning,
    /// What to run.
    pub plan: Plan,
    /// Unique id of this run (topic names).
    pub run_id: String,
    /// Where configs and logs of every launch go.
    pub work_dir: PathBuf,
    /// Progress output.
    pub progress: Progress,
}

/// One system draining one backlog.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrainRun {
    /// Which.
    pub system: System,
    /// Every event arrived (or was decoded) before the timeout.
    pub complete: bool,
    /// Distinct events delivered (decoded, for the Postgres limits).
    pub events: u64,
    /// Records that arrived more than once.
    pub duplicates: u64,
    /// Spawn to streaming: the slot turned active (the polling relay and
    /// kafka-limit: when they report being connected and starting).
    pub startup_s: f64,
    /// Streaming to the last record in Kafka (pg_recvlogical: to its exit at
    /// --endpos; pg-drain: to its last decoded event).
    pub drain_s: f64,
    /// Spawn to the last record (or to the end, for the Postgres limits).
    pub total_s: f64,
    /// events / drain_s: the drain rate.
    pub rate_eps: f64,
    /// events / total_s: including startup.
    pub rate_total_eps: f64,
    /// Resources from spawn to done.
    pub usage: Usage,
    /// CPU seconds (user+sys of the system's process) per million events, spawn to done.
    pub cpu_s_per_mevent: f64,
    /// The same for the drain only (streaming to done): without startup.
    pub drain_cpu_s_per_mevent: f64,
    /// Postgres CPU seconds per million events.
    pub pg_cpu_s_per_mevent: f64,
    /// Resources from streaming to done (without startup), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_usage: Option<Usage>,
    /// Records per second in [`BUCKET`]s since spawn.
    pub throughput: Vec<f64>,
    /// walcast with `--timeline`: its counter timeline (CSV), relative to
    /// the report's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<String>,
    /// Anything odd.
    pub note: Option<String>,
    /// pg-drain's second reading of the limit, after the relays (from a
    /// slot of its own created with the others): the first reading pays
    /// for the first read of the backlog's WAL, so the limit is the faster.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub again: bool,
}

impl DrainRun {
    /// The system's name, `pg-drain (again)` for the second reading.
    pub fn name(&self) -> String {
        if self.again {
            format!("{} (again)", self.system.name())
        } else {
            self.system.name().to_string()
        }
    }
}

/// One backlog configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BacklogResult {
    /// Events.
    pub events: u64,
    /// Payload bytes.
    pub payload: u32,
    /// Events per transaction.
    pub txn: u32,
    /// Seconds to commit the backlog.
    pub fill_s: f64,
    /// WAL the backlog wrote (bytes).
    pub wal_bytes: u64,
    /// Every system's drain.
    pub runs: Vec<DrainRun>,
}

impl BacklogResult {
    /// `200B × txn 10, 200k events`.
    pub fn label(&self) -> String {
        format!(
            "{} × txn {}, {} events",
            size_label(self.payload),
            self.txn,
            crate::svg::short(self.events as f64)
        )
    }

    /// The run of a system.
    pub fn run(&self, s: System) -> Option<&DrainRun> {
        self.runs.iter().find(|r| r.system == s)
    }
}

/// `200B`, `2KB`.
pub fn size_label(bytes: u32) -> String {
    if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{}KB", bytes / 1024)
    } else {
        format!("{bytes}B")
    }
}

/// The slot prefix of pg-drain's second reading of the limit.
const AGAIN: &str = "b2";

fn slot_name(prefix: &str, s: System) -> String {
    format!("{prefix}_{}", s.name().replace('-', "_"))
}

fn per_mevent(secs: f64, events: u64) -> f64 {
    if events == 0 {
        0.0
    } else {
        secs * 1e6 / events as f64
    }
}

/// Warms the broker up (its JIT, page cache and request paths) with the
/// bare producer and a consumer, so the first system measured does not pay
/// for a cold JVM on the Kafka side.
pub async fn warm_up_kafka(ctx: &mut Ctx, events: u64) -> Result<()> {
    let spec = Spec {
        system: System::KafkaLimit,
        dir: ctx.work_dir.join("warm-up"),
        slot: String::new(),
        topic_prefix: format!("bench.{}.warmup", ctx.run_id),
        events,
        payload: 200,
        end_lsn: None,
        timeline: None,
        pipelines: 0,
        streaming: false,
    };
    let topic = spec.topic();
    kafka::create_topics(&ctx.env.kafka_bootstrap, std::slice::from_ref(&topic)).await?;
    let consumer = TopicConsumer::start(&ctx.env.kafka_bootstrap, &topic)?;
    let mut proc = Proc::start(&ctx.env, &ctx.tuning, &spec)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while consumer.distinct() < events && Instant::now() < deadline {
        if proc.exited().is_some_and(|s| !s.success()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = consumer.distinct();
    proc.stop(Duration::from_secs(10))?;
    consumer.finish()?;
    kafka::delete_topics(&ctx.env.kafka_bootstrap, &[topic]).await?;
    ctx.progress.status(&format!(
        "broker warmed up with {} records through a producer and a consumer",
        group(got)
    ));
    Ok(())
}

/// A committed backlog: how long it took and the WAL it wrote.
struct Committed {
    fill_s: f64,
    /// `pg_current_wal_lsn()` after it (text).
    end_lsn: String,
    wal0: u64,
    wal1: u64,
}

/// Commits `n` events (`split`: into the pipelines workload's tables),
/// printing progress, then checkpoints.
async fn commit(ctx: &Ctx, payload: u32, txn: u32, n: u64, split: bool) -> Result<Committed> {
    let (_, wal0) = db::current_wal_lsn(&ctx.env).await?;
    let started = Instant::now();
    let last_print = Arc::new(std::sync::Mutex::new(Instant::now()));
    let t0 = ctx.progress.elapsed();
    db::fill(
        &ctx.env,
        1,
        n,
        txn,
        payload,
        ctx.plan.fill_conns,
        split,
        move |done| {
            let mut last = last_print.lock().unwrap_or_else(|p| p.into_inner());
            if last.elapsed() >= Duration::from_secs(2) || done >= n {
                *last = Instant::now();
                let secs = started.elapsed().as_secs_f64();
                let r = done as f64 / secs.max(1e-9);
                println!(
                    "    {} committed {}/{} ({} events/s, ETA {})",
                    mmss(t0 + secs),
                    group(done),
                    group(n),
                    rate(r),
                    mmss((n - done) as f64 / r.max(1.0))
                );
            }
        },
    )
    .await?;
    let fill_s = started.elapsed().as_secs_f64();
    db::checkpoint(&ctx.env).await?;
    let (end_lsn, wal1) = db::current_wal_lsn(&ctx.env).await?;
    ctx.progress.status(&format!(
        "{} committed in {fill_s:.1}s ({} events/s), {:.0} MB of WAL",
        if split { "burst" } else { "backlog" },
        rate(n as f64 / fill_s),
        (wal1 - wal0) as f64 / 1e6
    ));
    Ok(Committed {
        fill_s,
        end_lsn,
        wal0,
        wal1,
    })
}

/// Runs the backlog drain for one configuration.
pub async fn backlog(ctx: &mut Ctx, payload: u32, txn: u32, n: u64) -> Result<BacklogResult> {
    let label = format!("backlog {} × txn {txn}", size_label(payload));
    ctx.progress.phase(&format!(
        "{label}: committing {} events while every relay is stopped",
        group(n)
    ));
    db::create_databases(&ctx.env, &[payload]).await?;
    let systems = ctx.plan.backlog_systems();
    for s in &systems {
        if s.uses_slot() {
            db::create_slot(&ctx.env, &slot_name("b", *s)).await?;
        }
    }
    let again = ctx.plan.limit_again();
    if again {
        db::create_slot(&ctx.env, &slot_name(AGAIN, System::PgDrain)).await?;
    }
    if systems.contains(&System::Polling) {
        db::connect(&ctx.env.admin_conn(db::BENCH_DB))
            .await?
            .batch_execute(db::POLL_INDEX)
            .await?;
    }
    let c = commit(ctx, payload, txn, n, false).await?;
    let (fill_s, end_lsn, wal0, wal1) = (c.fill_s, c.end_lsn, c.wal0, c.wal1);
    let mut result = BacklogResult {
        events: n,
        payload,
        txn,
        fill_s,
        wal_bytes: wal1 - wal0,
        runs: Vec::new(),
    };
    let tag = format!("b{}t{txn}", size_label(payload).to_lowercase());
    let mut order: Vec<(System, bool)> = systems.iter().map(|s| (*s, false)).collect();
    if again {
        // Before the polling relay, which deletes the rows (its DELETEs
        // come after the backlog in the WAL either way).
        let at = order
            .iter()
            .position(|(s, _)| *s == System::Polling)
            .unwrap_or(order.len());
        order.insert(at, (System::PgDrain, true));
    }
    for (s, is_again) in order {
        let name = if is_again {
            format!("{} (again)", s.name())
        } else {
            s.name().to_string()
        };
        ctx.progress
            .phase(&format!("{label}: {name} drains the backlog"));
        let timeline = match s {
            System::Walcast => ctx.plan.timeline_file(&ctx.work_dir, payload, txn),
            _ => None,
        };
        let slot_prefix = if is_again { AGAIN } else { "b" };
        let run = drain(
            ctx,
            s,
            &tag,
            payload,
            n,
            &end_lsn,
            wal0,
            wal1,
            timeline,
            0,
            slot_prefix,
        )
        .await;
        if s.uses_slot() {
            db::drop_slot_named(&ctx.env, &slot_name(slot_prefix, s)).await?;
        }
        let mut run = match run {
            Ok(r) => r,
            Err(e) => {
                println!("    {name} FAILED: {e:#}");
                failed_drain(s, format!("{e:#}"))
            }
        };
        run.again = is_again;
        let line = if run.complete {
            format!(
                "{}: {} events in {:.2}s = {} events/s (startup {:.1}s), CPU {:.1}s/M events, peak RSS {:.0} MB",
                run.name(),
                group(run.events),
                run.drain_s,
                rate(run.rate_eps),
                run.startup_s,
                run.cpu_s_per_mevent,
                run.usage.peak_rss_bytes as f64 / 1e6
            )
        } else {
            format!(
                "{}: INCOMPLETE, {} of {} events ({})",
                run.name(),
                group(run.events),
                group(n),
                run.note.clone().unwrap_or_default()
            )
        };
        ctx.progress.status(&line);
        result.runs.push(run);
    }
    Ok(result)
}

/// The slot prefix of the pipelines workload's walcast with `n` pipelines
/// (pipeline `k` reads `<prefix>_<k>`).
fn pipelines_slot(n: u32) -> String {
    format!("p{n}_walcast")
}

/// walcast draining one burst with N pipelines.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PipelinesRun {
    /// Pipelines (slots) in the one walcast process.
    pub pipelines: u32,
    /// The drain (`usage` has walcast's, Postgres's and the broker's CPU).
    pub run: DrainRun,
}

impl PipelinesRun {
    /// Resources while streaming (spawn to done when that is unknown).
    pub fn usage(&self) -> &Usage {
        self.run.drain_usage.as_ref().unwrap_or(&self.run.usage)
    }

    /// Cores `cpu_s` of [`Self::usage`] is, on average (CPU seconds / wall seconds).
    pub fn cores(&self, cpu_s: impl Fn(&Usage) -> f64) -> f64 {
        let u = self.usage();
        if u.wall_s > 0.0 {
            cpu_s(u) / u.wall_s
        } else {
            0.0
        }
    }
}

/// The pipelines workload: one burst over four outbox tables, drained by
/// walcast with each pipeline count in turn.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PipelinesResult {
    /// Events of the burst.
    pub events: u64,
    /// Payload bytes.
    pub payload: u32,
    /// Events per transaction.
    pub txn: u32,
    /// Seconds to commit the burst.
    pub fill_s: f64,
    /// WAL the burst wrote (bytes).
    pub wal_bytes: u64,
    /// One drain per pipeline count.
    pub runs: Vec<PipelinesRun>,
}

/// The pipelines workload's payload and transaction size.
pub const PIPELINES_PAYLOAD: u32 = 200;
/// See [`PIPELINES_PAYLOAD`].
pub const PIPELINES_TXN: u32 = 10;

/// Commits one burst into `public.outbox_p0..3` (transaction k into table
/// k mod 4) while walcast is stopped, then drains it with 1, 2, 4… pipelines
/// (`[[pipelines]]`, table t on pipeline t mod N), each from its own slots
/// created before the burst.
pub async fn pipelines(ctx: &mut Ctx) -> Result<PipelinesResult> {
    let (payload, txn, n) = (PIPELINES_PAYLOAD, PIPELINES_TXN, ctx.plan.pipelines_events);
    let counts = ctx.plan.pipelines.clone();
    ctx.progress.phase(&format!(
        "pipelines: committing a burst of {} events over 4 outbox tables while walcast is stopped",
        group(n)
    ));
    db::create_databases(&ctx.env, &[payload]).await?;
    for &p in &counts {
        db::create_split_publications(&ctx.env, p).await?;
        for k in 0..p {
            db::create_slot(&ctx.env, &format!("{}_{k}", pipelines_slot(p))).await?;
        }
    }
    let c = commit(ctx, payload, txn, n, true).await?;
    let (fill_s, end_lsn, wal0, wal1) = (c.fill_s, c.end_lsn, c.wal0, c.wal1);
    let mut result = PipelinesResult {
        events: n,
        payload,
        txn,
        fill_s,
        wal_bytes: wal1 - wal0,
        runs: Vec::new(),
    };
    for &p in &counts {
        ctx.progress.phase(&format!(
            "pipelines: walcast drains the burst with {p} pipeline(s)"
        ));
        let tag = format!("pipelines{p}");
        let run = drain(
            ctx,
            System::Walcast,
            &tag,
            payload,
            n,
            &end_lsn,
            wal0,
            wal1,
            None,
            p,
            "b",
        )
        .await;
        for k in 0..p {
            db::drop_slot_named(&ctx.env, &format!("{}_{k}", pipelines_slot(p))).await?;
        }
        let run = match run {
            Ok(r) => r,
            Err(e) => {
                println!("    {p} pipeline(s) FAILED: {e:#}");
                failed_drain(System::Walcast, format!("{e:#}"))
            }
        };
        let r = PipelinesRun { pipelines: p, run };
        let line = if r.run.complete {
            format!(
                "{p} pipeline(s): {} events in {:.2}s = {} events/s; cores: walcast {:.2}, Postgres {:.2}, Kafka {:.2}, machine {:.2} of 2",
                group(r.run.events),
                r.run.drain_s,
                rate(r.run.rate_eps),
                r.cores(|u| u.cpu_s),
                r.cores(|u| u.pg_cpu_s),
                r.cores(|u| u.kafka_cpu_s),
                r.cores(|u| u.machine_busy_s),
            )
        } else {
            format!(
                "{p} pipeline(s): INCOMPLETE, {} of {} events ({})",
                group(r.run.events),
                group(n),
                r.run.note.clone().unwrap_or_default()
            )
        };
        ctx.progress.status(&line);
        result.runs.push(r);
    }
    Ok(result)
}

/// The `ready_s` line a contestant printed (seconds after its start).
fn ready_s(out: &std::path::Path) -> Option<f64> {
    std::fs::read_to_string(out)
        .ok()?
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v["ready_s"].as_f64())
}

fn failed_drain(system: System, note: String) -> DrainRun {
    DrainRun {
        system,
        complete: false,
        events: 0,
        duplicates: 0,
        startup_s: 0.0,
        drain_s: 0.0,
        total_s: 0.0,
        rate_eps: 0.0,
        rate_total_eps: 0.0,
        usage: Usage::default(),
        cpu_s_per_mevent: 0.0,
        drain_cpu_s_per_mevent: 0.0,
        pg_cpu_s_per_mevent: 0.0,
        drain_usage: None,
        throughput: Vec::new(),
        timeline: None,
        note: Some(note),
        again: false,
    }
}

/// How long a drain may take before it counts as incomplete.
fn drain_timeout(n: u64) -> Duration {
    Duration::from_secs(90 + n / 1500)
}

#[allow(clippy::too_many_arguments)]
async fn drain(
    ctx: &mut Ctx,
    system: System,
    tag: &str,
    payload: u32,
    n: u64,
    end_lsn: &str,
    wal0: u64,
    wal1: u64,
    timeline: Option<PathBuf>,
    pipelines: u32,
    slot_prefix: &str,
) -> Result<DrainRun> {
    if let Some(file) = &timeline {
        let _ = std::fs::remove_file(file);
    }
    let prefix = format!("bench.{}.{tag}.{}", ctx.run_id, system.name());
    let spec = Spec {
        system,
        dir: ctx
            .work_dir
            .join(tag)
            .join(format!("{}-{slot_prefix}", system.name())),
        slot: if pipelines > 0 {
            pipelines_slot(pipelines)
        } else {
            slot_name(slot_prefix, system)
        },
        topic_prefix: prefix,
        events: n,
        payload,
        end_lsn: Some(end_lsn.to_string()),
        timeline: timeline.clone(),
        pipelines,
        streaming: false,
    };
    let topic = spec.topic();
    let consumer = if system.produces() {
        kafka::create_topics(&ctx.env.kafka_bootstrap, std::slice::from_ref(&topic)).await?;
        Some(TopicConsumer::start(&ctx.env.kafka_bootstrap, &topic)?)
    } else {
        None
    };
    let admin = db::connect(&ctx.env.admin_conn("postgres")).await?;
    let mut proc = Proc::start(&ctx.env, &ctx.tuning, &spec)?;
    // When the system starts streaming: its slot turns active (systems
    // without a slot start working when spawned).
    let stream_start = Arc::new(AtomicU64::new(0));
    let watcher = if system.uses_slot() {
        // several pipelines: the first one's slot turning active
        let slot = if pipelines > 0 {
            format!("{}_0", spec.slot)
        } else {
            spec.slot.clone()
        };
        let (env, at) = (ctx.env.clone(), stream_start.clone());
        Some(tokio::spawn(async move {
            db::wait_slot_active(&env, &slot, &at).await
        }))
    } else {
        // refined at the end with the `ready_s` the contestant prints
        stream_start.store(proc.spawned_ns, Ordering::Relaxed);
        None
    };
    let deadline = Instant::now() + drain_timeout(n);
    let mut ticker = Ticker::new(Duration::from_secs(2));
    let mut at_first: Option<Usage> = None;
    let mut note = None;
    let mut complete = false;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let done = match &consumer {
            Some(c) => c.distinct(),
            None => 0,
        };
        if at_first.is_none() && stream_start.load(Ordering::Relaxed) != 0 {
            at_first = Some(proc.usage());
        }
        if consumer.is_some() && done >= n {
            complete = true;
            break;
        }
        if let Some(status) = proc.exited() {
            if consumer.is_none() {
                complete = status.success();
                if !complete {
                    note = Some(format!("exited with {status}: {}", proc.log_tail(5)));
                }
                break;
            }
            if !status.success() {
                note = Some(format!("exited with {status}: {}", proc.log_tail(5)));
                break;
            }
        }
        if Instant::now() >= deadline {
            note = Some(format!("timed out after {}s", drain_timeout(n).as_secs()));
            break;
        }
        if ticker.due() {
            let secs = clock::secs(proc.spawned_ns, clock::now_ns());
            let line = match &consumer {
                Some(_) => {
                    let r = done as f64 / secs.max(1e-9);
                    format!(
                        "{}: {}/{} events in Kafka ({} events/s since start, ETA {})",
                        system.name(),
                        group(done),
                        group(n),
                        rate(r),
                        if done == 0 {
                            "starting".into()
                        } else {
                            mmss((n - done) as f64 / r)
                        }
                    )
                }
                None => {
                    let row = admin
                        .query_opt(
                            "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $1",
                            &[&spec.slot],
                        )
                        .await?;
                    let confirmed =
                        row.and_then(|r| r.get::<_, Option<i64>>(0)).unwrap_or(0) as u64;
                    let frac =
                        (confirmed.saturating_sub(wal0)) as f64 / (wal1 - wal0).max(1) as f64;
                    format!(
                        "{}: slot confirmed {:.0}% of the backlog's WAL",
                        system.name(),
                        frac.clamp(0.0, 1.0) * 100.0
                    )
                }
            };
            ctx.progress.status(&line);
        }
    }
    let usage = proc.usage();
    let spawned = proc.spawned_ns;
    let out_path = spec.dir.join(format!("{}.out", system.name()));
    proc.stop(Duration::from_secs(30))?;
    let receipts = match consumer {
        Some(c) => c.finish()?,
        None => Receipts::default(),
    };
    if system.produces() {
        kafka::delete_topics(&ctx.env.kafka_bootstrap, &[topic]).await?;
    }
    if let Some(w) = watcher {
        w.abort();
    }
    let mut started_ns = match stream_start.load(Ordering::Relaxed) {
        0 => spawned,
        t => t,
    };
    if !system.uses_slot() {
        if let Some(ready) = ready_s(&out_path) {
            started_ns = spawned + (ready * 1e9) as u64;
        }
    }
    // startup: spawn → streaming; drain: streaming → last record in Kafka
    // (pg-drain: its own clock; pg_recvlogical: → exit at --endpos)
    let (events, startup_s, drain_s, total_s) = if system.produces() {
        let startup = clock::secs(spawned, started_ns);
        let drain = clock::secs(started_ns, receipts.last_ns);
        let total = clock::secs(spawned, receipts.last_ns);
        (receipts.distinct, startup, drain, total)
    } else if system == System::PgDrain {
        let text = std::fs::read_to_string(&out_path).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_default();
        let streaming = v["streaming_s"].as_f64().unwrap_or(0.0);
        let elapsed = v["elapsed_s"].as_f64().unwrap_or(usage.wall_s);
        let events = v["events"].as_u64().unwrap_or(if complete { n } else { 0 });
        (events, streaming, elapsed - streaming, elapsed)
    } else {
        // pg_recvlogical: reaching --endpos means the whole backlog was streamed.
        let events = if complete { n } else { 0 };
        let startup = clock::secs(spawned, started_ns);
        (events, startup, usage.wall_s - startup, usage.wall_s)
    };
    let throughput = if system.produces() {
        receipts
            .per_bucket(spawned, BUCKET, 1..=n)
            .into_iter()
            .map(|c| c as f64 / BUCKET.as_secs_f64())
            .collect()
    } else {
        Vec::new()
    };
    let drain_cpu = match at_first {
        Some(f) => usage.cpu_s - f.cpu_s,
        None => usage.cpu_s,
    };
    Ok(DrainRun {
        system,
        complete,
        events,
        duplicates: receipts.duplicates,
        startup_s,
        drain_s,
        total_s,
        rate_eps: events as f64 / drain_s.max(1e-9),
        rate_total_eps: events as f64 / total_s.max(1e-9),
        cpu_s_per_mevent: per_mevent(usage.cpu_s, events),
        drain_cpu_s_per_mevent: per_mevent(drain_cpu, events),
        pg_cpu_s_per_mevent: per_mevent(usage.pg_cpu_s, events),
        drain_usage: at_first.as_ref().map(|f| usage.since(f)),
        usage,
        throughput,
        timeline: timeline.filter(|f| f.exists()).and_then(|f| {
            f.file_name()
                .map(|n| format!("work/{}", n.to_string_lossy()))
        }),
        note,
        again: false,
    })
}

/// One relay under one steady rate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SteadyRun {
    /// Which.
    pub system: System,
    /// The rate asked for.
    pub rate: RateSpec,
    /// Events committed in the window.
    pub written: u64,
    /// Events per second committed.
    pub write_rate_eps: f64,
    /// Committed events that reached Kafka.
    pub delivered: u64,
    /// Records that arrived more than once.
    pub duplicates: u64,
    /// Commit (COMMIT returned to the writer) to receipt by the consumer.
    pub latency: Latency,
    /// p50 and p99 latency (ms) of the events committed in each second of the window.
    pub latency_per_second: Vec<(f64, f64)>,
    /// Events committed but not yet in Kafka when the writer stopped.
    pub backlog_at_end: u64,
    /// Seconds from the writer's stop until the last event was in Kafka.
    pub catch_up_s: f64,
    /// Delivered everything within a second of the writer stopping.
    pub keeps_up: bool,
    /// Resources during the window (and catch-up).
    pub usage: Usage,
    /// CPU seconds per million events during the window.
    pub cpu_s_per_mevent: f64,
    /// Records per second in [`BUCKET`]s since the window started.
    pub throughput: Vec<f64>,
    /// Seconds from spawn until the probe event was in Kafka.
    pub ready_s: f64,
    /// Seconds from the relay's spawn to the start of this window: second
    /// `i` of `latency_per_second` is at `t_ms / 1000 - window_start_s` of
    /// walcast's `--timeline` CSV (`work/steady-timeline.csv`).
    #[serde(default)]
    pub window_start_s: f64,
    /// Anything odd.
    pub note: Option<String>,
}

impl Usage {
    /// `self - earlier` for the cumulative fields (peak RSS and load stay).
    pub fn since(&self, earlier: &Usage) -> Usage {
        Usage {
            cpu_s: self.cpu_s - earlier.cpu_s,
            peak_rss_bytes: self.peak_rss_bytes,
            pg_cpu_s: self.pg_cpu_s - earlier.pg_cpu_s,
            kafka_cpu_s: self.kafka_cpu_s - earlier.kafka_cpu_s,
            machine_busy_s: self.machine_busy_s - earlier.machine_busy_s,
            harness_cpu_s: self.harness_cpu_s - earlier.harness_cpu_s,
            wall_s: self.wall_s - earlier.wall_s,
            load_avg: self.load_avg,
        }
    }
}

async fn wait_ready(consumer: &TopicConsumer, proc: &mut Proc, timeout: Duration) -> Result<f64> {
    let deadline = Instant::now() + timeout;
    while !consumer.live.probe_seen.load(Ordering::Relaxed) {
        if let Some(status) = proc.exited() {
            bail!(
                "{} exited ({status}) before it was ready:\n{}",
                proc.system.name(),
                proc.log_tail(15)
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "{} did not deliver the probe event within {}s:\n{}",
                proc.system.name(),
                timeout.as_secs(),
                proc.log_tail(15)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(clock::secs(proc.spawned_ns, clock::now_ns()))
}

/// walcast's counter timeline of the steady workload (`--timeline`), in the work dir.
pub const STEADY_TIMELINE: &str = "steady-timeline.csv";

/// Starts a relay on a fresh slot and topic, and waits until it delivered the probe.
async fn start_relay(
    ctx: &mut Ctx,
    system: System,
    tag: &str,
    slot_prefix: &str,
    streaming: bool,
) -> Result<(Spec, TopicConsumer, Proc, f64)> {
    let spec = Spec {
        system,
        dir: ctx.work_dir.join(tag).join(system.name()),
        slot: slot_name(slot_prefix, system),
        topic_prefix: format!("bench.{}.{tag}.{}", ctx.run_id, system.name()),
        events: 0,
        payload: 0,
        end_lsn: None,
        // The steady process runs every rate: one timeline for all of them.
        timeline: (ctx.plan.timeline && system == System::Walcast && tag == "steady")
            .then(|| ctx.work_dir.join(STEADY_TIMELINE)),
        pipelines: 0,
        streaming,
    };
    db::reset_outbox(&ctx.env, system == System::Polling).await?;
    if system.uses_slot() {
        db::drop_slot_named(&ctx.env, &spec.slot).await?;
        db::create_slot(&ctx.env, &spec.slot).await?;
    }
    let topic = spec.topic();
    kafka::create_topics(&ctx.env.kafka_bootstrap, std::slice::from_ref(&topic)).await?;
    let consumer = TopicConsumer::start(&ctx.env.kafka_bootstrap, &topic)?;
    let mut proc = Proc::start(&ctx.env, &ctx.tuning, &spec)?;
    db::probe(&ctx.env).await?;
    let ready = wait_ready(&consumer, &mut proc, Duration::from_secs(180)).await?;
    ctx.progress.status(&format!(
        "{} is live: the probe event was in Kafka {ready:.1}s after spawn",
        system.name()
    ));
    Ok((spec, consumer, proc, ready))
}

async fn stop_relay(
    ctx: &Ctx,
    spec: &Spec,
    consumer: TopicConsumer,
    proc: Proc,
) -> Result<Receipts> {
    proc.stop(Duration::from_secs(30))?;
    let receipts = consumer.finish()?;
    kafka::delete_topics(&ctx.env.kafka_bootstrap, &[spec.topic()]).await?;
    if spec.system.uses_slot() {
        db::drop_slot_named(&ctx.env, &spec.slot).await?;
    }
    Ok(receipts)
}

/// Steady load: one relay, every rate in turn on the same running process.
pub async fn steady(ctx: &mut Ctx, system: System) -> Result<Vec<SteadyRun>> {
    ctx.progress.phase(&format!(
        "steady load: {} at {}",
        system.name(),
        ctx.plan
            .rates
            .iter()
            .map(|r| format!("{} for {}s", r.label(), ctx.plan.steady_for(r).as_secs()))
            .collect::<Vec<_>>()
            .join(", "),
    ));
    let (spec, consumer, mut proc, ready) = start_relay(ctx, system, "steady", "st", false).await?;
    let spawned_ns = proc.spawned_ns;
    let mut runs = Vec::new();
    let mut next_seq = 1u64;
    let rates = ctx.plan.rates.clone();
    // (first seq, commits, window start, writer stop, usage at start)
    let mut windows = Vec::new();
    for r in &rates {
        let window = ctx.plan.steady_for(r);
        let u0 = proc.usage();
        let live = Arc::new(WriterLive::default());
        let pace = Pace {
            rate: r.rate,
            txn: r.txn,
            payload: ctx.plan.steady_payload,
            duration: window,
            conns: ctx.plan.writer_conns,
        };
        let start_ns = clock::now_ns();
        let base = consumer.distinct();
        let writer = {
            let env = ctx.env.clone();
            let live = live.clone();
            let first = next_seq;
            tokio::spawn(async move { db::paced_writer(&env, pace, live, first).await })
        };
        let mut ticker = Ticker::new(Duration::from_secs(2));
        while !writer.is_finished() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if ticker.due() {
                let committed = live.committed.load(Ordering::Relaxed);
                let delivered = consumer.distinct() - base;
                let secs = clock::secs(start_ns, clock::now_ns());
                ctx.progress.status(&format!(
                    "{} @ {}: committed {} ({} events/s), in Kafka {}, behind {}, {}s left",
                    system.name(),
                    r.label(),
                    group(committed),
                    rate(committed as f64 / secs.max(1e-9)),
                    group(delivered),
                    group(committed.saturating_sub(delivered)),
                    (window.as_secs_f64() - secs).max(0.0).round()
                ));
            }
        }
        let commits = writer.await??;
        let stop_ns = clock::now_ns();
        let written: u64 = commits.iter().map(|c| c.len).sum();
        let last_seq = next_seq + written - 1;
        let backlog_at_end = written - (consumer.distinct() - base).min(written);
        // catch up: wait until everything written is in Kafka
        let catch_deadline = Instant::now() + window.max(Duration::from_secs(30));
        while consumer.distinct() - base < written && Instant::now() < catch_deadline {
            if proc.exited().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let caught_ns = if consumer.distinct() - base >= written {
            consumer.live.last_ns.load(Ordering::Relaxed)
        } else {
            clock::now_ns()
        };
        let u1 = proc.usage();
        windows.push((
            next_seq,
            commits,
            start_ns,
            stop_ns,
            caught_ns,
            u1.since(&u0),
            *r,
        ));
        ctx.progress.status(&format!(
            "{} @ {}: {} events committed, {} behind at the end, caught up {:.2}s later",
            system.name(),
            r.label(),
            group(written),
            group(backlog_at_end),
            clock::secs(stop_ns, caught_ns)
        ));
        next_seq = last_seq + 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let receipts = stop_relay(ctx, &spec, consumer, proc).await?;
    for (first, commits, start_ns, stop_ns, caught_ns, usage, r) in windows {
        let written: u64 = commits.iter().map(|c| c.len).sum();
        let mut lat = Vec::with_capacity(written as usize);
        let mut per_second: Vec<Vec<u64>> = Vec::new();
        let mut missing = 0u64;
        for c in &commits {
            let sec = (c.commit_ns.saturating_sub(start_ns) / 1_000_000_000) as usize;
            if sec >= per_second.len() {
                per_second.resize_with(sec + 1, Vec::new);
            }
            for seq in c.first..c.first + c.len {
                match receipts.recv_ns.get(seq as usize) {
                    Some(&t) if t != 0 => {
                        let l = t.saturating_sub(c.commit_ns);
                        lat.push(l);
                        per_second[sec].push(l);
                    }
                    _ => missing += 1,
                }
            }
        }
        let latency_per_second = per_second
            .into_iter()
            .map(|mut v| {
                v.sort_unstable();
                (
                    crate::stats::quantile(&v, 0.5) as f64 / 1e6,
                    crate::stats::quantile(&v, 0.99) as f64 / 1e6,
                )
            })
            .collect();
        let delivered = written - missing;
        let behind = commits
            .iter()
            .flat_map(|c| c.first..c.first + c.len)
            .filter(|&s| {
                receipts
                    .recv_ns
                    .get(s as usize)
                    .is_none_or(|&t| t == 0 || t > stop_ns)
            })
            .count() as u64;
        let catch_up_s = clock::secs(stop_ns, caught_ns);
        let throughput = receipts
            .per_bucket(start_ns, BUCKET, first..=first + written.saturating_sub(1))
            .into_iter()
            .map(|c| c as f64 / BUCKET.as_secs_f64())
            .collect();
        let window_s = clock::secs(start_ns, stop_ns);
        runs.push(SteadyRun {
            system,
            rate: r,
            written,
            write_rate_eps: written as f64 / window_s.max(1e-9),
            delivered,
            duplicates: receipts.duplicates,
            latency: Latency::from_ns(lat),
            latency_per_second,
            backlog_at_end: behind,
            catch_up_s,
            keeps_up: missing == 0 && catch_up_s <= 1.0,
            cpu_s_per_mevent: per_mevent(usage.cpu_s, delivered),
            usage,
            throughput,
            ready_s: ready,
            window_start_s: clock::secs(spawned_ns, start_ns),
            note: (missing > 0)
                .then(|| format!("{missing} events not in Kafka after the catch-up wait")),
        });
    }
    for r in &runs {
        ctx.progress.status(&format!(
            "{} @ {}: p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, {}",
            system.name(),
            r.rate.label(),
            r.latency.p50_ms,
            r.latency.p99_ms,
            r.latency.p999_ms,
            if r.keeps_up {
                "keeps up"
            } else {
                "falls behind"
            }
        ));
    }
    Ok(runs)
}

/// One relay on an idle outbox while neighbours write WAL.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdleRun {
    /// Which.
    pub system: System,
    /// WAL the neighbours wrote during the window (bytes).
    pub wal_written_bytes: u64,
    /// `(seconds, confirmed lag bytes, retained bytes)` once a second.
    pub samples: Vec<(f64, i64, i64)>,
    /// Largest `pg_current_wal_lsn() - confirmed_flush_lsn`.
    pub max_lag_bytes: i64,
    /// The same at the end of the window.
    pub final_lag_bytes: i64,
    /// Largest `pg_current_wal_lsn() - restart_lsn` (WAL the slot retains).
    pub max_retained_bytes: i64,
    /// The same at the end of the window.
    pub final_retained_bytes: i64,
    /// Resources during the window.
    pub usage: Usage,
    /// Anything odd.
    pub note: Option<String>,
}

/// Idle outbox, busy neighbours: how much WAL does the relay's slot hold?
pub async fn idle(ctx: &mut Ctx, system: System) -> Result<IdleRun> {
    ctx.progress.phase(&format!(
        "idle outbox, busy neighbours: {} for {}s",
        system.name(),
        ctx.plan.idle.as_secs()
    ));
    let (spec, consumer, mut proc, _ready) = start_relay(ctx, system, "idle", "id", false).await?;
    let admin = db::connect(&ctx.env.admin_conn("postgres")).await?;
    let u0 = proc.usage();
    let (_, wal0) = db::current_wal_lsn(&ctx.env).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let neighbours = {
        let env = ctx.env.clone();
        let stop = stop.clone();
        tokio::spawn(async move { db::neighbours(&env, stop).await })
    };
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut ticker = Ticker::new(Duration::from_secs(5));
    while started.elapsed() < ctx.plan.idle {
        tick.tick().await;
        if let Some((lag, retained)) = db::slot_lag(&admin, &spec.slot).await? {
            samples.push((started.elapsed().as_secs_f64(), lag, retained));
            if ticker.due() {
                ctx.progress.status(&format!(
                    "{}: slot lag {:.1} MB, WAL retained {:.1} MB, {}s left",
                    system.name(),
                    lag as f64 / 1e6,
                    retained as f64 / 1e6,
                    (ctx.plan.idle.as_secs_f64() - started.elapsed().as_secs_f64()).round()
                ));
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    neighbours.await?.context("the neighbour writer")?;
    let (_, wal1) = db::current_wal_lsn(&ctx.env).await?;
    let usage = proc.usage().since(&u0);
    let _ = stop_relay(ctx, &spec, consumer, proc).await?;
    let max_lag = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let max_ret = samples.iter().map(|s| s.2).max().unwrap_or(0);
    let last = samples.last().copied().unwrap_or((0.0, 0, 0));
    ctx.progress.status(&format!(
        "{}: neighbours wrote {:.0} MB of WAL; slot lag max {:.1} MB, at the end {:.1} MB",
        system.name(),
        (wal1 - wal0) as f64 / 1e6,
        max_lag as f64 / 1e6,
        last.1 as f64 / 1e6
    ));
    Ok(IdleRun {
        system,
        wal_written_bytes: wal1 - wal0,
        max_lag_bytes: max_lag,
        final_lag_bytes: last.1,
        max_retained_bytes: max_ret,
        final_retained_bytes: last.2,
        samples,
        usage,
        note: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spilled_bytes_sums_the_log_lines() {
        let log = "2026-12-03T16:00:00Z  INFO walcast_postgres::stream: a streamed transaction exceeds postgres.stream_memory_bytes xid=7\n\
                   2026-12-03T16:00:01Z  INFO walcast_postgres::stream: streamed transaction committed; handing over its spilled changes xid=7 spilled_changes=10 spilled_bytes=123456\n\
                   2026-12-03T16:00:02Z  INFO walcast_postgres::stream: streamed transaction committed xid=9 spilled_changes=1 spilled_bytes=44\n";
        assert_eq!(spilled_bytes(log), 123_500);
        assert_eq!(spilled_bytes("nothing spilled"), 0);
    }

    fn plan(steady_secs: Option<u64>, quick: bool) -> Plan {
        Plan {
            events: 10,
            headline: None,
            payloads: vec![200],
            txn_sizes: vec![10],
            rates: Vec::new(),
            steady_secs,
            quick,
            timeline: true,
            steady_payload: 200,
            idle: Duration::from_secs(1),
            systems: vec![System::Walcast],
            backlog: true,
            steady_load: true,
            idle_load: false,
            pipelines: Vec::new(),
            pipelines_events: 0,
            large_txn_events: 0,
            fill_conns: 1,
            writer_conns: 1,
        }
    }

    #[test]
    fn the_10k_rate_runs_a_minute_by_default() {
        let rate = |r: Option<u64>| RateSpec { rate: r, txn: 10 };
        let p = plan(None, false);
        assert_eq!(p.steady_for(&rate(Some(10_000))), Duration::from_secs(60));
        assert_eq!(p.steady_for(&rate(Some(1_000))), Duration::from_secs(20));
        assert_eq!(p.steady_for(&rate(None)), Duration::from_secs(20));
        // --steady-secs overrides every rate; quick mode keeps short windows.
        let p = plan(Some(7), false);
        assert_eq!(p.steady_for(&rate(Some(10_000))), Duration::from_secs(7));
        let p = plan(None, true);
        assert_eq!(p.steady_for(&rate(Some(10_000))), Duration::from_secs(5));
    }

    #[test]
    fn timeline_files_are_per_configuration_in_the_work_dir() {
        let p = plan(None, false);
        let w = std::path::Path::new("/r/work");
        assert_eq!(
            p.timeline_file(w, 2048, 100),
            Some(PathBuf::from("/r/work/backlog-2kb-txn100-timeline.csv"))
        );
        let off = Plan {
            timeline: false,
            ..p
        };
        assert_eq!(off.timeline_file(w, 200, 1), None);
    }
}

/// One large transaction relayed by walcast, with `postgres.streaming` off
/// or on (the large-txn workload).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LargeTxnRun {
    /// `postgres.streaming`.
    pub streaming: bool,
    /// Events (rows) of the transaction.
    pub events: u64,
    /// Payload bytes per event.
    pub payload: u32,
    /// Seconds from BEGIN until COMMIT returned.
    pub write_s: f64,
    /// Seconds from COMMIT returning until the transaction's first event was
    /// in Kafka.
    pub commit_to_first_s: f64,
    /// … until its last event was in Kafka.
    pub commit_to_last_s: f64,
    /// Distinct events in Kafka.
    pub delivered: u64,
    /// Records seen twice.
    pub duplicates: u64,
    /// `(seconds since BEGIN, confirmed lag bytes, retained bytes)` every 250 ms.
    pub samples: Vec<(f64, i64, i64)>,
    /// Largest `pg_current_wal_lsn() - confirmed_flush_lsn`.
    pub max_lag_bytes: i64,
    /// Largest `pg_current_wal_lsn() - restart_lsn`.
    pub max_retained_bytes: i64,
    /// `pg_stat_replication_slots` of the slot afterwards: bytes the
    /// walsender spilled to its disk…
    pub pg_spill_bytes: i64,
    /// … bytes it streamed before commit, and streamed transactions.
    pub pg_stream_bytes: i64,
    /// See `pg_stream_bytes`.
    pub pg_stream_txns: i64,
    /// Bytes walcast spilled to its own file (from its log; 0 if none).
    pub walcast_spilled_bytes: u64,
    /// walcast's resources from BEGIN until the last event.
    pub usage: Usage,
    /// Anything odd.
    pub note: Option<String>,
}

/// The `spilled_bytes=` of walcast's "streamed transaction committed" log lines.
fn spilled_bytes(log: &str) -> u64 {
    log.lines()
        .filter_map(|l| l.split("spilled_bytes=").nth(1))
        .filter_map(|v| {
            v.split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|d| d.parse::<u64>().ok())
        })
        .sum()
}

/// One transaction of `ctx.plan.large_txn_events` events, committed while
/// walcast runs with `postgres.streaming` off or on: how long after COMMIT
/// its first and last events are in Kafka, and what the slot holds.
pub async fn large_txn(ctx: &mut Ctx, streaming: bool) -> Result<LargeTxnRun> {
    let n = ctx.plan.large_txn_events;
    let payload = db::PROBE_PAYLOAD;
    let label = if streaming {
        "streaming on"
    } else {
        "streaming off"
    };
    ctx.progress.phase(&format!(
        "one transaction of {} events: walcast, {label}",
        group(n)
    ));
    let tag = if streaming { "large-on" } else { "large-off" };
    let (spec, consumer, mut proc, _ready) =
        start_relay(ctx, System::Walcast, tag, "lt", streaming).await?;
    let admin = db::connect(&ctx.env.admin_conn(db::BENCH_DB)).await?;
    let writer = db::connect(&ctx.env.admin_conn(db::BENCH_DB)).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let begin_ns = clock::now_ns();
    let sampler = {
        let stop = stop.clone();
        let slot = spec.slot.clone();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(Some((lag, retained))) = db::slot_lag(&admin, &slot).await {
                    samples.push((clock::secs(begin_ns, clock::now_ns()), lag, retained));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            (admin, samples)
        })
    };
    let u0 = proc.usage();
    let base = consumer.distinct();
    writer
        .batch_execute(&db::txn_sql(1, n, payload))
        .await
        .context("writing the large transaction")?;
    let commit_ns = clock::now_ns();
    ctx.progress.status(&format!(
        "{label}: {} events committed in {:.1}s",
        group(n),
        clock::secs(begin_ns, commit_ns)
    ));
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut ticker = Ticker::new(Duration::from_secs(2));
    while consumer.distinct() - base < n && Instant::now() < deadline {
        if let Some(status) = proc.exited() {
            bail!("walcast exited ({status}):\n{}", proc.log_tail(15));
        }
        if ticker.due() {
            ctx.progress.status(&format!(
                "{label}: {} of {} in Kafka",
                group(consumer.distinct() - base),
                group(n)
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let usage = proc.usage().since(&u0);
    // The walsender reports the slot's statistics at its next flush.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let (admin, samples) = sampler.await?;
    let stats = admin
        .query_opt(
            "SELECT spill_bytes, stream_bytes, stream_txns FROM pg_stat_replication_slots WHERE slot_name = $1",
            &[&spec.slot],
        )
        .await?;
    let (pg_spill_bytes, pg_stream_bytes, pg_stream_txns) = stats
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .unwrap_or((0, 0, 0));
    let walcast_spilled_bytes =
        spilled_bytes(&std::fs::read_to_string(&proc.log).unwrap_or_default());
    let receipts = stop_relay(ctx, &spec, consumer, proc).await?;
    let times: Vec<u64> = (1..=n)
        .filter_map(|seq| receipts.recv_ns.get(seq as usize).copied())
        .filter(|&t| t != 0)
        .collect();
    let delivered = times.len() as u64;
    let first = times.iter().min().copied().unwrap_or(0);
    let last = times.iter().max().copied().unwrap_or(0);
    let since_commit = |t: u64| {
        if t == 0 {
            -1.0
        } else {
            (t as f64 - commit_ns as f64) / 1e9
        }
    };
    let run = LargeTxnRun {
        streaming,
        events: n,
        payload,
        write_s: clock::secs(begin_ns, commit_ns),
        commit_to_first_s: since_commit(first),
        commit_to_last_s: since_commit(last),
        delivered,
        duplicates: receipts.duplicates,
        max_lag_bytes: samples.iter().map(|s| s.1).max().unwrap_or(0),
        max_retained_bytes: samples.iter().map(|s| s.2).max().unwrap_or(0),
        samples,
        pg_spill_bytes,
        pg_stream_bytes,
        pg_stream_txns,
        walcast_spilled_bytes,
        usage,
        note: (delivered < n).then(|| {
            format!(
                "{} of {} events were not in Kafka after 600 s",
                n - delivered,
                n
            )
        }),
    };
    ctx.progress.status(&format!(
        "{label}: first event {:.2}s and last {:.2}s after COMMIT; Postgres spilled {:.0} MB and streamed {:.0} MB; walcast spilled {:.0} MB, peak RSS {:.0} MB",
        run.commit_to_first_s,
        run.commit_to_last_s,
        run.pg_spill_bytes as f64 / 1e6,
        run.pg_stream_bytes as f64 / 1e6,
        run.walcast_spilled_bytes as f64 / 1e6,
        run.usage.peak_rss_bytes as f64 / 1e6,
    ));
    Ok(run)
}
