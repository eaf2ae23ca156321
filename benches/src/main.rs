//! `walcast-bench`: walcast side by side with Debezium (Kafka Connect), a
//! polling relay and the hardware limits, on the real PostgreSQL and Kafka
//! of `scripts/dev`. Run it through `scripts/dev bench` (see benches/README.md).

mod clock;
mod db;
mod env;
mod kafka;
mod procstat;
mod progress;
mod relays;
mod report;
mod stats;
mod svg;
mod systems;
mod workloads;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

use crate::env::BenchEnv;
use crate::progress::{group, Progress};
use crate::report::{Meta, Results};
use crate::systems::{System, Tuning};
use crate::workloads::{Ctx, Plan, RateSpec};

/// The backlog size the issue asks for; the default run uses less (see `--events`).
const FULL_EVENTS: u64 = 1_000_000;

#[derive(Debug, Parser)]
#[command(
    name = "walcast-bench",
    about = "Benchmarks walcast against Debezium, a polling relay and the hardware limits, and writes a report."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the workloads and write results.json, report.md and SVG plots.
    Run(Box<RunArgs>),
    /// Re-render report.md and the plots of a results.json.
    Report {
        /// The results.json of a run (the report goes next to it).
        results: PathBuf,
    },
    /// (internal) the polling relay.
    #[command(hide = true)]
    PollRelay(relays::PollArgs),
    /// (internal) the bare Kafka producer.
    #[command(hide = true)]
    KafkaLimit(relays::KafkaLimitArgs),
    /// (internal) walcast's source and decoder without Kafka.
    #[command(hide = true)]
    PgDrain(relays::PgDrainArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Small sizes and short windows: the whole run in about two minutes (a smoke test).
    #[arg(long)]
    quick: bool,
    /// Backlog events per configuration [default: 200000, quick: 10000; the
    /// issue's size is 1000000, which takes about an hour with every configuration].
    #[arg(long)]
    events: Option<u64>,
    /// The headline backlog configuration, PAYLOAD:TXN, run with
    /// --headline-events instead of --events.
    #[arg(long, default_value = "200:10")]
    headline: String,
    /// Events of the headline configuration [default: 1000000, quick: like
    /// the others]; 0: like the others.
    #[arg(long)]
    headline_events: Option<u64>,
    /// Payload sizes of the backlog, bytes.
    #[arg(long, value_delimiter = ',', default_value = "200,2048")]
    payloads: Vec<u32>,
    /// Events per transaction of the backlog.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    txn_sizes: Vec<u32>,
    /// Steady rates: events/s or `max`, optionally `:<events per transaction>`
    /// [default txn: 1 up to 1000/s, else 10].
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,max")]
    rates: Vec<String>,
    /// Seconds of every steady rate [default: 60 at 10000/s (long enough to
    /// catch periodic stalls), 20 at the others; quick: 5].
    #[arg(long)]
    steady_secs: Option<u64>,
    /// Payload of the steady load, bytes.
    #[arg(long, default_value_t = 200)]
    steady_payload: u32,
    /// Seconds of the idle workload per relay [default: 30, quick: 8].
    #[arg(long)]
    idle_secs: Option<u64>,
    /// Systems to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "walcast,debezium,polling,pg-recvlogical,pg-drain,kafka-limit"
    )]
    systems: Vec<System>,
    /// Workloads to run: backlog, steady, idle, pipelines, large-txn.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "backlog,steady,idle,pipelines,large-txn"
    )]
    workloads: Vec<String>,
    /// Events of the large-txn workload's one transaction [default:
    /// 1,000,000; quick: 20,000].
    #[arg(long)]
    large_txn_events: Option<u64>,
    /// The pipelines workload: walcast drains one burst with each of these
    /// pipeline counts (1 to 4; the burst is over 4 outbox tables).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pipelines: Vec<u32>,
    /// Events of the pipelines workload's burst [default: 1,000,000; quick: 20,000].
    #[arg(long)]
    pipelines_events: Option<u64>,
    /// walcast's backlog drains write the pipeline's counters every 10 ms
    /// (WALCAST_DEBUG_TIMELINE) to work/backlog-<payload>-txn<N>-timeline.csv;
    /// the report plots acks per 10 ms and events in flight. Its steady run
    /// writes work/steady-timeline.csv (every rate; results.json has each
    /// window's start in walcast's time, `window_start_s`).
    #[arg(long)]
    timeline: bool,
    /// Report directory [default: <repo>/bench-report/<date>-<time>].
    #[arg(long)]
    out: Option<PathBuf>,
    /// The walcast binary [default: <target dir>/release/walcast].
    #[arg(long)]
    walcast_bin: Option<PathBuf>,
    /// Kafka Connect + Debezium jars (benches/run.sh resolves them with benches/debezium/pom.xml).
    #[arg(long, env = "WALCAST_BENCH_DEBEZIUM_LIBS")]
    debezium_libs: Option<PathBuf>,
    /// Java for Kafka Connect.
    #[arg(long, default_value = "java")]
    java: PathBuf,
    /// Directory of pg_recvlogical.
    #[arg(long, default_value = "/usr/lib/postgresql/15/bin")]
    pg_bindir: PathBuf,
    /// Polling relay: rows per poll.
    #[arg(long, default_value_t = 1000)]
    poll_batch: i64,
    /// Polling relay: sleep after a poll that was not full, ms.
    #[arg(long, default_value_t = 100)]
    poll_interval_ms: u64,
    /// Connections committing the backlog.
    #[arg(long, default_value_t = 2)]
    fill_conns: usize,
    /// Connections of the steady writer.
    #[arg(long, default_value_t = 2)]
    writer_conns: usize,
}

fn parse_rate(s: &str) -> Result<RateSpec> {
    let (r, txn) = match s.split_once(':') {
        Some((r, t)) => (r, Some(t.parse::<u64>().context("events per transaction")?)),
        None => (s, None),
    };
    let rate = if r == "max" {
        None
    } else {
        Some(r.parse::<u64>().with_context(|| format!("rate {r:?}"))?)
    };
    let txn = txn.unwrap_or(match rate {
        Some(r) if r <= 1000 => 1,
        _ => 10,
    });
    if txn == 0 || rate == Some(0) {
        bail!("rates and transaction sizes must be positive");
    }
    Ok(RateSpec { rate, txn })
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| procstat::parse_status_kb(&t, "MemTotal"))
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    format!(
        "{cpus} CPUs ({model}), {:.0} GB RAM, Linux {}",
        mem as f64 / 1024.0 / 1024.0,
        sh("uname", &["-r"])
    )
}

fn jar_version(dir: &Path, prefix: &str) -> String {
    std::fs::read_dir(dir)
        .ok()
        .and_then(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .find(|n| n.starts_with(prefix) && n.ends_with(".jar"))
        })
        .map(|n| n[prefix.len()..n.len() - 4].to_string())
        .unwrap_or_else(|| "?".into())
}

fn settings(t: &Tuning, plan: &Plan) -> Vec<(String, String)> {
    vec![
        (
            "walcast".into(),
            "release build, README defaults: compression lz4, linger_ms 5, max_in_flight_events 10000, max_in_flight_bytes 64 MiB, status_interval_ms 1000; idempotent producer (acks=all), murmur2_random".into(),
        ),
        (
            "Debezium".into(),
            format!(
                "Kafka Connect standalone, one task, JVM {}; StringConverter for keys and values; connector: plugin.name=pgoutput, snapshot.mode=no_data, own slot and publication (publish=insert), max.batch.size=8192, max.queue.size=32768, poll.interval.ms=10, extended.headers.enabled=false, Outbox EventRouter (route.topic.replacement like walcast's topic, type as a header); worker producer: acks=all, enable.idempotence=true, max.in.flight.requests.per.connection=5, linger.ms=5, batch.size=262144, compression lz4, buffer.memory 64 MiB; offset.flush.interval.ms=1000",
                systems::CONNECT_JVM_OPTS.join(" ")
            ),
        ),
        (
            "polling relay".into(),
            format!(
                "one worker; per transaction: SELECT … ORDER BY created_at LIMIT {} FOR UPDATE SKIP LOCKED, produce every row, await every ack, DELETE by id, COMMIT; polls again at once after a full batch, else sleeps {} ms; index on created_at; the same producer settings as walcast",
                t.poll_batch, t.poll_interval_ms
            ),
        ),
        (
            "pg-recvlogical".into(),
            "pg_recvlogical --start -o proto_version=1 -o publication_names=… -f - (to /dev/null) -F 0 --endpos=<end of backlog>: PostgreSQL's walsender decoding the slot with pgoutput, nothing else".into(),
        ),
        (
            "pg-drain".into(),
            "walcast's own replication source, outbox filter and router (walcast-postgres + walcast-core), confirming every commit, producing nothing".into(),
        ),
        (
            "kafka-limit".into(),
            "one rdkafka producer built by walcast-kafka's client_config with walcast's defaults (the same record shape: key = sequence number, headers id and type, order-like JSON values of the same size and shape), at most 10000 records in flight".into(),
        ),
        (
            "events".into(),
            format!(
                "key = aggregateid = a sequence number, one aggregatetype (one topic of 3 partitions per system and run), type header, jsonb payload {{\"seq\": N, \"items\": [{{\"qty\", \"sku\", \"price\"}}, …], \"customer\": …}} with random values (~200 B: 3 items, ~2 KB: 40 items; 4096 distinct bodies used in turn); backlog committed by a PL/pgSQL procedure over {} connections (COMMIT per transaction); steady writer: {} connections, one INSERT … SELECT per transaction, open-loop schedule",
                plan.fill_conns, plan.writer_conns
            ),
        ),
        (
            "consumer".into(),
            "one rdkafka consumer in the harness process per system run, reading its topic from offset 0 (its CPU is not attributed to any system)".into(),
        ),
    ]
}

async fn run(args: RunArgs) -> Result<()> {
    let env = BenchEnv::from_env()?;
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| env.repo.join("target"));
    let events = args
        .events
        .unwrap_or(if args.quick { 10_000 } else { 200_000 });
    let idle = Duration::from_secs(args.idle_secs.unwrap_or(if args.quick { 8 } else { 30 }));
    let rates = args
        .rates
        .iter()
        .map(|r| parse_rate(r))
        .collect::<Result<Vec<_>>>()?;
    for w in &args.workloads {
        if !["backlog", "steady", "idle", "pipelines", "large-txn"].contains(&w.as_str()) {
            bail!("unknown workload {w:?} (backlog, steady, idle, pipelines, large-txn)");
        }
    }
    if let Some(p) = args
        .pipelines
        .iter()
        .find(|p| !(1..=db::SPLIT_TABLES).contains(*p))
    {
        bail!(
            "--pipelines {p}: between 1 and {} (the burst is over {} tables)",
            db::SPLIT_TABLES,
            db::SPLIT_TABLES
        );
    }
    let headline = {
        let (p, t) = args
            .headline
            .split_once(':')
            .context("--headline is PAYLOAD:TXN, e.g. 200:10")?;
        let (p, t): (u32, u32) = (p.parse()?, t.parse()?);
        let n = args
            .headline_events
            .unwrap_or(if args.quick { 0 } else { FULL_EVENTS });
        (n > events).then_some((p, t, n))
    };
    let plan = Plan {
        events,
        headline,
        payloads: args.payloads.clone(),
        txn_sizes: args.txn_sizes.clone(),
        rates,
        steady_secs: args.steady_secs,
        quick: args.quick,
        timeline: args.timeline,
        steady_payload: args.steady_payload,
        idle,
        systems: args.systems.clone(),
        backlog: args.workloads.iter().any(|w| w == "backlog"),
        steady_load: args.workloads.iter().any(|w| w == "steady"),
        idle_load: args.workloads.iter().any(|w| w == "idle"),
        pipelines: if args.workloads.iter().any(|w| w == "pipelines")
            && args.systems.contains(&System::Walcast)
        {
            args.pipelines.clone()
        } else {
            Vec::new()
        },
        pipelines_events: args.pipelines_events.unwrap_or(if args.quick {
            20_000
        } else {
            1_000_000
        }),
        large_txn_events: if args.workloads.iter().any(|w| w == "large-txn")
            && args.systems.contains(&System::Walcast)
        {
            args.large_txn_events
                .unwrap_or(if args.quick { 20_000 } else { 1_000_000 })
        } else {
            0
        },
        fill_conns: args.fill_conns,
        writer_conns: args.writer_conns,
    };
    let started_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let stamp = sh("date", &["-u", "+%Y%m%d-%H%M%S"]);
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| env.repo.join("bench-report").join(&stamp));
    let debezium_libs = args
        .debezium_libs
        .clone()
        .unwrap_or_else(|| env.cache_dir.join("debezium/libs"));
    let tuning = Tuning {
        walcast_bin: args
            .walcast_bin
            .clone()
            .unwrap_or_else(|| target.join("release/walcast")),
        self_exe: std::env::current_exe().context("locating walcast-bench")?,
        debezium_libs: debezium_libs.clone(),
        java: args.java.clone(),
        pg_bindir: args.pg_bindir.clone(),
        poll_batch: args.poll_batch,
        poll_interval_ms: args.poll_interval_ms,
    };
    if plan.has(System::Walcast) && !tuning.walcast_bin.exists() {
        bail!(
            "{} does not exist: cargo build --release -p walcast (scripts/dev bench does it)",
            tuning.walcast_bin.display()
        );
    }
    if plan.has(System::Debezium) && !debezium_libs.join("connect-runtime-4.3.1.jar").exists() {
        // any version will do; only check that the directory has jars
        let has_jars = std::fs::read_dir(&debezium_libs)
            .map(|d| d.count() > 10)
            .unwrap_or(false);
        if !has_jars {
            bail!(
                "no Kafka Connect/Debezium jars in {}: scripts/dev bench resolves them with benches/debezium/pom.xml",
                debezium_libs.display()
            );
        }
    }
    if plan.has(System::PgRecvlogical) && !tuning.pg_bindir.join("pg_recvlogical").exists() {
        bail!(
            "no pg_recvlogical in {} (--pg-bindir)",
            tuning.pg_bindir.display()
        );
    }
    std::fs::create_dir_all(&out)?;
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let mut meta = Meta {
        run_id: run_id.clone(),
        started_unix,
        quick: args.quick,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: machine(),
        load_start: procstat::load_average().unwrap_or(0.0),
        walcast_rev: {
            let rev = sh(
                "git",
                &[
                    "-C",
                    &env.repo.display().to_string(),
                    "rev-parse",
                    "--short",
                    "HEAD",
                ],
            );
            let dirty = !sh(
                "git",
                &[
                    "-C",
                    &env.repo.display().to_string(),
                    "status",
                    "--porcelain",
                    "--untracked-files=no",
                ],
            )
            .is_empty();
            match std::env::var("WALCAST_BENCH_REV") {
                Ok(r) if !r.is_empty() => r,
                _ if rev.is_empty() => {
                    "(unknown revision: not a git checkout; set WALCAST_BENCH_REV)".into()
                }
                _ if dirty => format!("{rev} (with uncommitted changes)"),
                _ => rev,
            }
        },
        debezium: format!(
            "Debezium PostgreSQL connector {} on Kafka Connect {}, Kafka broker 4.3.1",
            jar_version(&debezium_libs, "debezium-connector-postgres-"),
            jar_version(&debezium_libs, "connect-runtime-")
        ),
        settings: settings(&tuning, &plan),
        ..Meta::default()
    };
    if plan.backlog && events < FULL_EVENTS {
        let headline = match plan.headline {
            Some((p, t, n)) if plan.payloads.contains(&p) && plan.txn_sizes.contains(&t) => {
                format!(
                    " except the headline configuration {} × txn {t}, which runs {}",
                    workloads::size_label(p),
                    group(n)
                )
            }
            _ => String::new(),
        };
        meta.notes.push(format!(
            "Backlog size {} events per configuration{headline}, not the issue's {} everywhere: the full matrix at 1,000,000 takes about an hour on a 2-core machine and the default run has to fit in 30 minutes. `--events 1000000` runs the full size for every configuration.",
            group(events),
            group(FULL_EVENTS)
        ));
    }
    if plan.timeline && plan.has(System::Walcast) {
        meta.notes.push("walcast's backlog drains and steady run ran with `--timeline` (WALCAST_DEBUG_TIMELINE): one more task waking every 10 ms to copy its counters and a thread writing them to a file.".into());
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    meta.notes.push(format!(
        "Everything (PostgreSQL, Kafka, the system under test, the writer and the consumer) shares the same {cores} cores, so a system's rate includes the cost of its neighbours; the `limits` run alone with the services."
    ));
    println!(
        "walcast-bench: run {run_id}, report in {}\n  {}\n  workloads: {}; systems: {}; backlog {} events{} × payload {:?} × txn {:?}; steady {}; idle {}s",
        out.display(),
        meta.machine,
        args.workloads.join(","),
        plan.systems.iter().map(|s| s.name()).collect::<Vec<_>>().join(","),
        group(events),
        match plan.headline {
            Some((p, t, n)) => format!(" ({} for {}B × txn {t})", group(n), p),
            None => String::new(),
        },
        plan.payloads,
        plan.txn_sizes,
        plan.rates
            .iter()
            .map(|r| format!("{} for {}s", r.label(), plan.steady_for(r).as_secs()))
            .collect::<Vec<_>>()
            .join(", "),
        idle.as_secs()
    );
    let estimates = plan.estimates();
    let mut ctx = Ctx {
        env,
        tuning,
        plan,
        run_id,
        work_dir: out.join("work"),
        progress: Progress::new(estimates),
    };
    ctx.progress
        .phase("preparing the bench databases and warming the broker up");
    db::create_databases(&ctx.env, &[ctx.plan.steady_payload]).await?;
    workloads::warm_up_kafka(&mut ctx, if args.quick { 20_000 } else { 500_000 }).await?;
    let mut results = Results {
        meta,
        ..Results::default()
    };
    let foreign = db::foreign_slots(&ctx.env).await?;
    if let Some(note) = db::foreign_slots_note(&foreign) {
        eprintln!("walcast-bench: warning: {note}");
        results.meta.notes.push(note);
    }
    let mut load_max: f64 = 0.0;
    let save = |results: &mut Results, ctx: &Ctx, load_max: f64| -> Result<()> {
        results.meta.duration_s = ctx.progress.elapsed();
        results.meta.load_end = procstat::load_average().unwrap_or(0.0);
        results.meta.load_max = load_max;
        report::write_all(results, &out)
    };
    if ctx.plan.backlog {
        for (payload, txn, n) in ctx.plan.backlog_configs() {
            let b = workloads::backlog(&mut ctx, payload, txn, n).await?;
            for r in &b.runs {
                load_max = load_max.max(r.usage.load_avg);
            }
            results.backlog.push(b);
            save(&mut results, &ctx, load_max)?;
        }
    }
    if !ctx.plan.pipelines.is_empty() {
        match workloads::pipelines(&mut ctx).await {
            Ok(p) => {
                for r in &p.runs {
                    load_max = load_max.max(r.run.usage.load_avg);
                }
                results.pipelines = Some(p);
            }
            Err(e) => {
                println!("    pipelines workload FAILED: {e:#}");
                results
                    .meta
                    .notes
                    .push(format!("pipelines workload failed: {e:#}"));
            }
        }
        save(&mut results, &ctx, load_max)?;
    }
    if ctx.plan.steady_load || ctx.plan.idle_load {
        db::create_databases(&ctx.env, &[ctx.plan.steady_payload]).await?;
    }
    if ctx.plan.steady_load {
        for s in ctx.plan.steady_systems() {
            match workloads::steady(&mut ctx, s).await {
                Ok(runs) => {
                    for r in &runs {
                        load_max = load_max.max(r.usage.load_avg);
                    }
                    results.steady.extend(runs);
                }
                Err(e) => {
                    println!("    steady load with {} FAILED: {e:#}", s.name());
                    results
                        .meta
                        .notes
                        .push(format!("steady load with {} failed: {e:#}", s.name()));
                }
            }
            save(&mut results, &ctx, load_max)?;
        }
    }
    if ctx.plan.idle_load {
        for s in ctx.plan.idle_systems() {
            match workloads::idle(&mut ctx, s).await {
                Ok(r) => {
                    load_max = load_max.max(r.usage.load_avg);
                    results.idle.push(r);
                }
                Err(e) => {
                    println!("    idle workload with {} FAILED: {e:#}", s.name());
                    results
                        .meta
                        .notes
                        .push(format!("idle workload with {} failed: {e:#}", s.name()));
                }
            }
            save(&mut results, &ctx, load_max)?;
        }
    }
    if ctx.plan.large_txn_events > 0 {
        db::create_databases(&ctx.env, &[db::PROBE_PAYLOAD]).await?;
        for streaming in [false, true] {
            match workloads::large_txn(&mut ctx, streaming).await {
                Ok(r) => {
                    load_max = load_max.max(r.usage.load_avg);
                    results.large_txn.push(r);
                }
                Err(e) => {
                    let what = if streaming { "on" } else { "off" };
                    println!("    large-txn workload, streaming {what}, FAILED: {e:#}");
                    results.meta.notes.push(format!(
                        "large-txn workload, streaming {what}, failed: {e:#}"
                    ));
                }
            }
            save(&mut results, &ctx, load_max)?;
        }
    }
    db::drop_all(&ctx.env).await?;
    save(&mut results, &ctx, load_max)?;
    println!(
        "\ndone in {}: {}\n\n{}",
        progress::mmss(ctx.progress.elapsed()),
        out.join("report.md").display(),
        report::targets(&results)
    );
    Ok(())
}

async fn until_signal() -> Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await?;
    Ok(())
}

fn main() {
    // the harness clock starts with the process (contestants report times on it)
    clock::now_ns();
    let cli = Cli::parse();
    // pg-drain measures walcast's read side, so it runs on the runtime
    // `walcast run` uses (one thread); the harness itself uses two.
    let built = if matches!(cli.command, Cmd::PgDrain(_)) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    };
    let rt = match built {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("walcast-bench: {e}");
            std::process::exit(1);
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Cmd::Run(args) => {
                // Dropping the run on a signal drops every started system,
                // which kills it: nothing is left running.
                tokio::select! {
                    r = run(*args) => r,
                    s = until_signal() => { s?; bail!("interrupted") }
                }
            }
            Cmd::Report { results } => {
                let r: Results = serde_json::from_slice(
                    &std::fs::read(&results)
                        .with_context(|| format!("reading {}", results.display()))?,
                )?;
                let dir = results.parent().unwrap_or(Path::new("."));
                report::write_all(&r, dir)?;
                println!("{}", dir.join("report.md").display());
                Ok(())
            }
            Cmd::PollRelay(a) => relays::poll_relay(a).await,
            Cmd::KafkaLimit(a) => relays::kafka_limit(a).await,
            Cmd::PgDrain(a) => relays::pg_drain(a).await,
        }
    });
    if let Err(e) = result {
        eprintln!("walcast-bench: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!(
            parse_rate("1000").unwrap(),
            RateSpec {
                rate: Some(1000),
                txn: 1
            }
        );
        assert_eq!(
            parse_rate("10000").unwrap(),
            RateSpec {
                rate: Some(10000),
                txn: 10
            }
        );
        assert_eq!(
            parse_rate("max:100").unwrap(),
            RateSpec {
                rate: None,
                txn: 100
            }
        );
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("0").is_err());
    }

    #[test]
    fn the_cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "walcast-bench",
            "run",
            "--quick",
            "--systems",
            "walcast,kafka-limit",
        ])
        .unwrap();
        let Cmd::Run(a) = cli.command else {
            panic!("not run")
        };
        assert!(a.quick);
        assert_eq!(a.systems, vec![System::Walcast, System::KafkaLimit]);
    }
}
