//! The report: `results.json` (everything measured), `report.md` (tables and
//! where walcast stands against the targets) and SVG plots.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::progress::group;
use crate::svg::{Chart, Series};
use crate::systems::System;
use crate::workloads::{
    size_label, BacklogResult, DrainRun, IdleRun, PipelinesResult, SteadyRun, BUCKET,
};

/// Facts about the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Meta {
    /// Unique id (topic names).
    pub run_id: String,
    /// Seconds since the epoch at the start.
    pub started_unix: u64,
    /// Wall-clock seconds of the whole run.
    pub duration_s: f64,
    /// `--quick`.
    pub quick: bool,
    /// Command line.
    pub command: String,
    /// CPUs, memory, kernel.
    pub machine: String,
    /// Load average at the start and at the end.
    pub load_start: f64,
    /// See `load_start`.
    pub load_end: f64,
    /// Highest 1-minute load average seen at the end of a measurement.
    pub load_max: f64,
    /// walcast's git revision.
    pub walcast_rev: String,
    /// The Debezium and Kafka Connect versions.
    pub debezium: String,
    /// Settings of every system, as text.
    pub settings: Vec<(String, String)>,
    /// Caveats worth reading.
    pub notes: Vec<String>,
}

/// Everything a run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Results {
    /// Facts.
    pub meta: Meta,
    /// Backlog drains, one per configuration.
    pub backlog: Vec<BacklogResult>,
    /// Steady load, one per relay and rate.
    pub steady: Vec<SteadyRun>,
    /// Idle outbox with busy neighbours, one per relay.
    pub idle: Vec<IdleRun>,
    /// One burst drained by walcast with 1, 2, 4 pipelines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipelines: Option<PipelinesResult>,
    /// One large transaction relayed by walcast, streaming off and on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub large_txn: Vec<crate::workloads::LargeTxnRun>,
}

/// Bytes as decimal megabytes, the unit of every MB in the report.
pub(crate) fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0 && a > 0.0).then(|| a / b)
}

fn fmt_ratio(r: Option<f64>) -> String {
    match r {
        Some(r) => format!("{r:.2}×"),
        None => "n/a".into(),
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "**met**"
    } else {
        "**not met**"
    }
}

/// The Postgres limit of a backlog configuration: the faster of the two
/// bare readers of the slot (pg_recvlogical, walcast's own decoder).
/// Every reading counts (pg-drain reads each backlog twice when relays run
/// too: before them and after them).
pub fn postgres_limit(b: &BacklogResult) -> Option<(String, f64)> {
    b.runs
        .iter()
        .filter(|r| r.complete && matches!(r.system, System::PgRecvlogical | System::PgDrain))
        .map(|r| (r.name(), r.rate_eps))
        .max_by(|a, b| a.1.total_cmp(&b.1))
}

/// The lower of the two hardware limits (Postgres, Kafka) of a backlog configuration.
pub fn lower_limit(b: &BacklogResult) -> Option<(String, f64)> {
    let kafka = b
        .run(System::KafkaLimit)
        .filter(|r| r.complete)
        .map(|r| (r.name(), r.rate_eps));
    [postgres_limit(b), kafka]
        .into_iter()
        .flatten()
        .min_by(|a, b| a.1.total_cmp(&b.1))
}

/// A drain's rate in each whole second of streaming (the 500 ms buckets
/// paired), without the partial first and last seconds.
pub fn per_second_rates(run: &DrainRun) -> Vec<f64> {
    let per = (1.0 / BUCKET.as_secs_f64()).round().max(1.0) as usize;
    let first = run.throughput.iter().position(|&x| x > 0.0).unwrap_or(0);
    let last = run.throughput.iter().rposition(|&x| x > 0.0).unwrap_or(0);
    if last <= first {
        return Vec::new();
    }
    let secs: Vec<f64> = run.throughput[first..=last]
        .chunks(per)
        .filter(|c| c.len() == per)
        .map(|c| c.iter().sum::<f64>() / per as f64)
        .collect();
    if secs.len() < 3 {
        return Vec::new();
    }
    secs[1..secs.len() - 1].to_vec()
}

/// The target lines of the report, one per target and configuration
/// (issue 14: the stream limit, a steady drain, CPU, tail latency, memory).
pub fn targets(r: &Results) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "| target | where | walcast | reference | ratio | |");
    let _ = writeln!(t, "| --- | --- | ---: | ---: | ---: | --- |");
    for b in &r.backlog {
        let (Some(w), Some((ls, lr))) = (b.run(System::Walcast), postgres_limit(b)) else {
            continue;
        };
        let x = ratio(w.rate_eps, lr);
        let _ = writeln!(
            t,
            "| drain ≥ 90% of the stream limit | backlog {} | {} ev/s | {} ev/s ({}) | {} | {} |",
            b.label(),
            group(w.rate_eps as u64),
            group(lr as u64),
            ls,
            x.map(|x| format!("{:.0}%", x * 100.0))
                .unwrap_or("n/a".into()),
            yes(x.is_some_and(|x| x >= 0.9))
        );
    }
    for b in &r.backlog {
        let Some(w) = b.run(System::Walcast).filter(|w| w.complete) else {
            continue;
        };
        let secs = per_second_rates(w);
        if secs.is_empty() {
            let _ = writeln!(
                t,
                "| no second below half the median rate | backlog {} | too short to judge (< 3 whole seconds) | | | |",
                b.label()
            );
            continue;
        }
        let mut sorted = secs.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        let min = sorted[0];
        let _ = writeln!(
            t,
            "| no second below half the median rate | backlog {} | slowest second {} ev/s | median {} ev/s ({} s) | {:.2} | {} |",
            b.label(),
            group(min as u64),
            group(median as u64),
            secs.len(),
            min / median,
            yes(min >= median / 2.0)
        );
    }
    for b in &r.backlog {
        let (Some(w), Some(d)) = (b.run(System::Walcast), b.run(System::Debezium)) else {
            continue;
        };
        let x = ratio(w.cpu_s_per_mevent, d.cpu_s_per_mevent);
        let _ = writeln!(
            t,
            "| CPU per event ≤ 1/5 of Debezium's | backlog {} | {:.1} s/M ev | {:.1} s/M ev | {} | {} |",
            b.label(),
            w.cpu_s_per_mevent,
            d.cpu_s_per_mevent,
            x.map(|x| format!("1/{:.1}", 1.0 / x)).unwrap_or("n/a".into()),
            yes(x.is_some_and(|x| x <= 0.2))
        );
    }
    for b in r.backlog.iter().filter(|b| b.payload <= 200 && b.txn >= 10) {
        let Some(w) = b.run(System::Walcast) else {
            continue;
        };
        let _ = writeln!(
            t,
            "| CPU per event ≤ 10 µs (≤ 200 B, ≥ 10 events/txn) | backlog {} | {:.1} µs | 10 µs | | {} |",
            b.label(),
            w.cpu_s_per_mevent,
            yes(w.cpu_s_per_mevent <= 10.0)
        );
    }
    let moonshot: Vec<_> = r
        .backlog
        .iter()
        .filter(|b| b.payload <= 128 && b.txn == 10)
        .collect();
    if moonshot.is_empty() {
        let _ = writeln!(
            t,
            "| moonshot: drain ≥ 127,000 ev/s at 128 B × txn 10 | not in this run (--payloads 128 --txn-sizes 10) | | | | |"
        );
    }
    for b in moonshot {
        if let Some(w) = b.run(System::Walcast) {
            let _ = writeln!(
                t,
                "| moonshot: drain ≥ 127,000 ev/s at 128 B × txn 10 | backlog {} | {} ev/s | 127,000 ev/s | {:.2} | {} |",
                b.label(),
                group(w.rate_eps as u64),
                w.rate_eps / 127_000.0,
                yes(w.rate_eps >= 127_000.0)
            );
        }
    }
    // Peak RSS over every run of each system.
    let peak = |s: System| -> u64 {
        let a = r
            .backlog
            .iter()
            .filter_map(|b| b.run(s))
            .map(|x| x.usage.peak_rss_bytes);
        let c = r
            .steady
            .iter()
            .filter(|x| x.system == s)
            .map(|x| x.usage.peak_rss_bytes);
        a.chain(c).max().unwrap_or(0)
    };
    let (w, d) = (peak(System::Walcast), peak(System::Debezium));
    if w > 0 && d > 0 {
        let x = w as f64 / d as f64;
        let _ = writeln!(
            t,
            "| peak RSS ≤ 1/10 of Debezium's | largest of every run | {:.0} MB | {:.0} MB | 1/{:.1} | {} |",
            mb(w),
            mb(d),
            1.0 / x,
            yes(x <= 0.1)
        );
    }
    if w > 0 {
        let _ = writeln!(
            t,
            "| peak RSS < 100 MB at default in-flight limits | largest of every run | {:.0} MB | 100 MB | | {} |",
            mb(w),
            yes(mb(w) < 100.0)
        );
    }
    let at = |s: System, rate: u64| {
        r.steady
            .iter()
            .find(|x| x.system == s && x.rate.rate == Some(rate))
    };
    if let Some(w) = at(System::Walcast, 1000) {
        let _ = writeln!(
            t,
            "| p99 commit→Kafka ≤ 10 ms at 1k events/s | steady 1k/s | {:.1} ms | 10 ms | | {} |",
            w.latency.p99_ms,
            yes(w.latency.p99_ms <= 10.0)
        );
        if let Some(p) = at(System::Polling, 1000) {
            let x = ratio(p.latency.p50_ms, w.latency.p50_ms);
            let _ = writeln!(
                t,
                "| p50 ≥ 10× lower than the polling relay at 1k events/s | steady 1k/s | {:.1} ms | {:.1} ms | {} lower | {} |",
                w.latency.p50_ms,
                p.latency.p50_ms,
                fmt_ratio(x),
                yes(x.is_some_and(|x| x >= 10.0))
            );
        }
    }
    if let Some(w) = at(System::Walcast, 10_000) {
        let _ = writeln!(
            t,
            "| p99 commit→Kafka ≤ 15 ms at 10k events/s | steady 10k/s | {:.1} ms | 15 ms | | {} |",
            w.latency.p99_ms,
            yes(w.latency.p99_ms <= 15.0)
        );
        let _ = writeln!(
            t,
            "| p99.9 commit→Kafka ≤ 25 ms at 10k events/s | steady 10k/s | {:.1} ms | 25 ms | | {} |",
            w.latency.p999_ms,
            yes(w.latency.p999_ms <= 25.0)
        );
    }
    let max_of = |s: System| {
        r.steady
            .iter()
            .find(|x| x.system == s && x.rate.rate.is_none())
    };
    if let (Some(w), Some(d)) = (max_of(System::Walcast), max_of(System::Debezium)) {
        let _ = writeln!(
            t,
            "| p99 below Debezium's at the maximum rate | steady max (written: walcast {} ev/s, Debezium {} ev/s) | {:.1} ms | {:.1} ms | {} | {} |",
            group(w.write_rate_eps as u64),
            group(d.write_rate_eps as u64),
            w.latency.p99_ms,
            d.latency.p99_ms,
            fmt_ratio(ratio(w.latency.p99_ms, d.latency.p99_ms)),
            yes(w.latency.p99_ms < d.latency.p99_ms && w.write_rate_eps >= d.write_rate_eps * 0.95)
        );
    }
    let idle_of = |s: System| r.idle.iter().find(|x| x.system == s);
    if let (Some(w), Some(d)) = (idle_of(System::Walcast), idle_of(System::Debezium)) {
        let x = ratio(w.max_lag_bytes as f64, d.max_lag_bytes as f64);
        let _ = writeln!(
            t,
            "| idle-slot lag ≤ 1/10 of Debezium's | idle outbox, busy neighbours (max lag) | {:.2} MB | {:.2} MB | {} | {} |",
            mb(w.max_lag_bytes.max(0) as u64),
            mb(d.max_lag_bytes.max(0) as u64),
            x.map(|x| format!("1/{:.1}", 1.0 / x)).unwrap_or("n/a".into()),
            yes(x.is_some_and(|x| x <= 0.1))
        );
    }
    if let Some(p) = &r.pipelines {
        let of = |n: u32| p.runs.iter().find(|x| x.pipelines == n && x.run.complete);
        let most = p.runs.iter().map(|x| x.pipelines).max().unwrap_or(1);
        if let (Some(one), Some(top)) = (of(1), of(most).filter(|_| most > 1)) {
            let x = ratio(top.run.rate_eps, one.run.rate_eps);
            let _ = writeln!(
                t,
                "| {most} pipelines ≥ 1.5× one, or which process saturates the cores | pipelines burst {} | {} ev/s | {} ev/s | {} | {} |",
                group(p.events),
                group(top.run.rate_eps as u64),
                group(one.run.rate_eps as u64),
                fmt_ratio(x),
                if x.is_some_and(|x| x >= 1.5) {
                    "yes".to_string()
                } else {
                    format!("**not met**; {}", saturation(top))
                }
            );
        }
    }
    t
}

/// Which processes used the cores during a pipelines drain.
fn saturation(r: &crate::workloads::PipelinesRun) -> String {
    let mut v = [
        ("Postgres", r.cores(|u| u.pg_cpu_s)),
        ("walcast", r.cores(|u| u.cpu_s)),
        ("Kafka", r.cores(|u| u.kafka_cpu_s)),
        ("harness", r.cores(|u| u.harness_cpu_s)),
    ];
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    format!(
        "machine busy {:.2} of {} cores: {}",
        r.cores(|u| u.machine_busy_s),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        v.iter()
            .map(|(n, c)| format!("{n} {c:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The pipelines workload's table.
fn pipelines_table(t: &mut String, p: &PipelinesResult) {
    let _ = writeln!(t, "### Parallel pipelines\n");
    let _ = writeln!(
        t,
        "One burst of {} events ({} × txn {}, {:.0} MB of WAL, committed in {:.1} s) over four \
         outbox tables (transaction k into `outbox_p<k mod 4>`), drained by one walcast process \
         with N `[[pipelines]]` (table t on pipeline t mod N), each on its own slot created \
         before the burst. Every walsender decodes the whole WAL and filters by its \
         publication, so Postgres's decoding work grows with N. Cores = CPU seconds ÷ wall \
         seconds while streaming (first slot active to the last record in Kafka).\n",
        group(p.events),
        size_label(p.payload),
        p.txn,
        mb(p.wal_bytes),
        p.fill_s
    );
    let _ = writeln!(
        t,
        "| pipelines | events/s | vs 1 | walcast cores | Postgres cores | Kafka cores | harness cores | machine busy (cores) | CPU s / M ev | Postgres CPU s / M ev | peak RSS MB | complete |"
    );
    let _ = writeln!(
        t,
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    let one = p
        .runs
        .iter()
        .find(|x| x.pipelines == 1 && x.run.complete)
        .map(|x| x.run.rate_eps);
    for x in &p.runs {
        let r = &x.run;
        let _ = writeln!(
            t,
            "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} | {:.0} | {} |",
            x.pipelines,
            group(r.rate_eps as u64),
            fmt_ratio(one.and_then(|o| ratio(r.rate_eps, o))),
            x.cores(|u| u.cpu_s),
            x.cores(|u| u.pg_cpu_s),
            x.cores(|u| u.kafka_cpu_s),
            x.cores(|u| u.harness_cpu_s),
            x.cores(|u| u.machine_busy_s),
            r.drain_cpu_s_per_mevent,
            r.pg_cpu_s_per_mevent,
            mb(r.usage.peak_rss_bytes),
            if r.complete {
                format!("yes ({})", group(r.events))
            } else {
                format!("NO: {}", r.note.clone().unwrap_or_default())
            }
        );
    }
    let _ = writeln!(t);
}

/// The large-txn workload's table.
fn large_txn_table(t: &mut String, runs: &[crate::workloads::LargeTxnRun]) {
    let _ = writeln!(t, "### One large transaction\n");
    let _ = writeln!(
        t,
        "One transaction of {} events ({} payloads, one INSERT … SELECT) committed while \
         walcast runs with `postgres.streaming` off (Postgres decodes the transaction after its \
         commit, spilling what exceeds `logical_decoding_work_mem` to its disk) and on (Postgres \
         streams it while it is written; walcast holds it in memory up to \
         `stream_memory_bytes`, then in its own spill file, and publishes at commit). Times \
         are from COMMIT returning to the writer. Lag = `pg_current_wal_lsn() − \
         confirmed_flush_lsn`, sampled every 250 ms from BEGIN; Postgres's spill and stream \
         bytes are the slot's `pg_stat_replication_slots`; CPU (walcast's and all of \
         PostgreSQL's) and walcast's RSS are from BEGIN to the last event.\n",
        group(runs.first().map(|r| r.events).unwrap_or(0)),
        size_label(runs.first().map(|r| r.payload).unwrap_or(0)),
    );
    let _ = writeln!(
        t,
        "| streaming | write s | commit → first event s | commit → last event s | max lag MB | Postgres spilled MB | Postgres streamed MB (txns) | walcast spilled MB | walcast CPU s | Postgres CPU s | peak RSS MB | complete |"
    );
    let _ = writeln!(
        t,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    for r in runs {
        let _ = writeln!(
            t,
            "| {} | {:.1} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} ({}) | {:.1} | {:.1} | {:.1} | {:.0} | {} |",
            if r.streaming { "on" } else { "off" },
            r.write_s,
            r.commit_to_first_s,
            r.commit_to_last_s,
            r.max_lag_bytes as f64 / 1e6,
            r.pg_spill_bytes as f64 / 1e6,
            r.pg_stream_bytes as f64 / 1e6,
            r.pg_stream_txns,
            mb(r.walcast_spilled_bytes),
            r.usage.cpu_s,
            r.usage.pg_cpu_s,
            mb(r.usage.peak_rss_bytes),
            match &r.note {
                None => format!("yes ({})", group(r.delivered)),
                Some(n) => format!("NO: {n}"),
            }
        );
    }
    let _ = writeln!(t);
}

/// The markdown tables of every workload.
pub fn tables(r: &Results) -> String {
    let mut t = String::new();
    if !r.backlog.is_empty() {
        let _ = writeln!(t, "### Backlog drain\n");
        let _ = writeln!(
            t,
            "Events/s = events ÷ drain time; the drain starts when the system starts streaming \
             (its slot turns active; the polling relay and kafka-limit report when they are connected) and ends \
             with the last record in Kafka (pg-recvlogical: its exit at --endpos; pg-drain: its \
             last decoded event). \"incl. startup\" counts from the process spawn (JVM, \
             preflight, connections). The Postgres limit is the faster of pg-recvlogical and \
             pg-drain; \"vs lower limit\" compares with the lower of it and kafka-limit. CPU = \
             user+sys of the system's own process from spawn to the last record (\"drain only\": \
             from streaming on); Postgres CPU = all PostgreSQL processes over the same interval. \
             \"other load\" = cores busy with processes outside the run (the machine's busy time \
             minus the system's, PostgreSQL's, the broker's and the harness's CPU): well above 0, \
             someone else's work shared the cores and the row is disturbed.\n"
        );
        let _ = writeln!(
            t,
            "| backlog | system | events/s | incl. startup | startup s | vs lower limit | CPU s / M ev | CPU s / M ev (drain only) | peak RSS MB | Postgres CPU s / M ev | broker CPU s | other load (cores) | complete |"
        );
        let _ = writeln!(
            t,
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
        );
        for b in &r.backlog {
            let limit = lower_limit(b).map(|l| l.1);
            for run in &b.runs {
                let vs = match limit {
                    Some(l) if run.complete => format!("{:.0}%", run.rate_eps / l * 100.0),
                    _ => "".into(),
                };
                let _ = writeln!(
                    t,
                    "| {} | {} | {} | {} | {:.1} | {} | {:.1} | {:.1} | {:.0} | {:.1} | {:.1} | {:.2} | {} |",
                    b.label(),
                    run.name(),
                    group(run.rate_eps as u64),
                    group(run.rate_total_eps as u64),
                    run.startup_s,
                    vs,
                    run.cpu_s_per_mevent,
                    run.drain_cpu_s_per_mevent,
                    mb(run.usage.peak_rss_bytes),
                    run.pg_cpu_s_per_mevent,
                    run.usage.kafka_cpu_s,
                    run.usage.outside_cores(),
                    if run.complete {
                        format!("yes ({})", group(run.events))
                    } else {
                        format!("NO: {}", run.note.clone().unwrap_or_default())
                    }
                );
            }
        }
        let _ = writeln!(t);
        let _ = writeln!(t, "| backlog | events | committed in | WAL |");
        let _ = writeln!(t, "| --- | ---: | ---: | ---: |");
        for b in &r.backlog {
            let _ = writeln!(
                t,
                "| {} | {} | {:.1} s | {:.0} MB |",
                b.label(),
                group(b.events),
                b.fill_s,
                mb(b.wal_bytes)
            );
        }
        let _ = writeln!(t);
    }
    if !r.steady.is_empty() {
        let _ = writeln!(t, "### Steady load\n");
        let _ = writeln!(
            t,
            "Latency = from COMMIT returning to the writer to the consumer receiving the record \
             (one clock, one process). \"keeps up\" = every event in Kafka within 1 s of the \
             writer stopping. CPU over the window and the catch-up. \"other load\" as above.\n"
        );
        let _ = writeln!(
            t,
            "| rate | system | written ev/s | p50 ms | p99 ms | p99.9 ms | max ms | behind at end | caught up after | keeps up | CPU s / M ev | peak RSS MB | Postgres CPU s | other load (cores) |"
        );
        let _ = writeln!(
            t,
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"
        );
        for s in &r.steady {
            let _ = writeln!(
                t,
                "| {} (txn {}) | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.2} s | {} | {:.1} | {:.0} | {:.1} | {:.2} |",
                s.rate.label(),
                s.rate.txn,
                s.system.name(),
                group(s.write_rate_eps as u64),
                s.latency.p50_ms,
                s.latency.p99_ms,
                s.latency.p999_ms,
                s.latency.max_ms,
                group(s.backlog_at_end),
                s.catch_up_s,
                if s.keeps_up { "yes" } else { "**no**" },
                s.cpu_s_per_mevent,
                mb(s.usage.peak_rss_bytes),
                s.usage.pg_cpu_s,
                s.usage.outside_cores()
            );
        }
        let _ = writeln!(t);
    }
    if let Some(p) = &r.pipelines {
        pipelines_table(&mut t, p);
    }
    if !r.large_txn.is_empty() {
        large_txn_table(&mut t, &r.large_txn);
    }
    if !r.idle.is_empty() {
        let _ = writeln!(t, "### Idle outbox, busy neighbours\n");
        let _ = writeln!(
            t,
            "Neighbours commit small transactions into a table outside the publication and into \
             another database. Lag = `pg_current_wal_lsn() − confirmed_flush_lsn`; retained = \
             `pg_current_wal_lsn() − restart_lsn` (WAL Postgres must keep for the slot). The \
             polling relay has no slot and retains nothing.\n"
        );
        let _ = writeln!(
            t,
            "| system | neighbour WAL MB | max lag MB | final lag MB | max retained MB | final retained MB | CPU s |"
        );
        let _ = writeln!(t, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
        for i in &r.idle {
            let _ = writeln!(
                t,
                "| {} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                i.system.name(),
                mb(i.wal_written_bytes),
                i.max_lag_bytes as f64 / 1e6,
                i.final_lag_bytes as f64 / 1e6,
                i.max_retained_bytes as f64 / 1e6,
                i.final_retained_bytes as f64 / 1e6,
                i.usage.cpu_s
            );
        }
        let _ = writeln!(t);
    }
    t
}

fn throughput_series(runs: impl Iterator<Item = (System, Vec<f64>)>) -> Vec<Series> {
    runs.filter(|(_, v)| !v.is_empty())
        .map(|(s, v)| Series {
            name: s.name().into(),
            points: v
                .iter()
                .enumerate()
                .map(|(i, r)| ((i as f64 + 0.5) * BUCKET.as_secs_f64(), *r))
                .collect(),
        })
        .collect()
}

/// Points of a line: `(x, y)`.
type Points = Vec<(f64, f64)>;

/// Acks per 10 ms and events in flight, each over seconds since walcast
/// started, from its counter timeline (`WALCAST_DEBUG_TIMELINE` CSV; the
/// columns are found by name). Acks are the growth of `events_delivered`
/// between two rows, scaled to 10 ms (a late sample does not look like a
/// burst). Rows that do not parse (a line cut off by a kill) are skipped.
pub fn timeline_series(csv: &str) -> Result<(Points, Points)> {
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().context("empty timeline")?.split(',').collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .with_context(|| format!("the timeline has no column {name}"))
    };
    let (t, delivered, in_flight) = (
        col("t_ms")?,
        col("events_delivered")?,
        col("in_flight_events")?,
    );
    let (mut acks, mut flight) = (Vec::new(), Vec::new());
    let mut prev: Option<(f64, f64)> = None;
    for line in lines {
        let v: Vec<&str> = line.split(',').collect();
        let num = |c: usize| v.get(c).and_then(|x| x.parse::<f64>().ok());
        let (Some(t_ms), Some(d), Some(f)) = (num(t), num(delivered), num(in_flight)) else {
            continue;
        };
        if let Some((pt, pd)) = prev {
            if t_ms <= pt {
                continue;
            }
            acks.push((t_ms / 1000.0, (d - pd).max(0.0) * 10.0 / (t_ms - pt)));
        }
        flight.push((t_ms / 1000.0, f));
        prev = Some((t_ms, d));
    }
    Ok((acks, flight))
}

/// Writes every plot into `dir`; returns `(file, caption)` pairs.
pub fn plots(r: &Results, dir: &Path) -> Result<Vec<(String, String)>> {
    let mut files = Vec::new();
    let mut write = |name: String, caption: String, chart: Chart| -> Result<()> {
        std::fs::write(dir.join(&name), chart.render())
            .with_context(|| format!("writing {name}"))?;
        files.push((name, caption));
        Ok(())
    };
    for b in &r.backlog {
        let name = format!(
            "backlog-{}-txn{}-throughput.svg",
            size_label(b.payload).to_lowercase(),
            b.txn
        );
        write(
            name,
            format!(
                "Backlog {}: records arriving in Kafka per second",
                b.label()
            ),
            Chart {
                title: format!("Backlog drain, {}", b.label()),
                x_label: "seconds since the system was started".into(),
                y_label: "events/s into Kafka".into(),
                x_log: false,
                series: throughput_series(b.runs.iter().map(|x| (x.system, x.throughput.clone()))),
                y2: None,
            },
        )?;
        let Some(csv) = b.run(System::Walcast).and_then(|w| w.timeline.as_deref()) else {
            continue;
        };
        let series = std::fs::read_to_string(dir.join(csv))
            .map_err(anyhow::Error::from)
            .and_then(|text| timeline_series(&text));
        let (acks, flight) = match series {
            Ok(s) => s,
            Err(e) => {
                eprintln!(
                    "walcast-bench: no timeline plot for {}: {csv}: {e:#}",
                    b.label()
                );
                continue;
            }
        };
        write(
            format!(
                "backlog-{}-txn{}-timeline.svg",
                size_label(b.payload).to_lowercase(),
                b.txn
            ),
            format!(
                "Backlog {}: walcast's acks per 10 ms and events in flight ([CSV]({csv}))",
                b.label()
            ),
            Chart {
                title: format!("walcast's drain timeline, {}", b.label()),
                x_label: "seconds since walcast started".into(),
                y_label: "acks per 10 ms".into(),
                x_log: false,
                series: vec![Series {
                    name: "acks per 10 ms".into(),
                    points: acks,
                }],
                y2: Some((
                    "events in flight".into(),
                    vec![Series {
                        name: "in flight".into(),
                        points: flight,
                    }],
                )),
            },
        )?;
    }
    // One set of plots per offered rate, in first-seen order. (Runs are
    // grouped by system, not by rate, so `dedup` of neighbours listed every
    // rate once per system.)
    let mut rates = Vec::new();
    for s in &r.steady {
        if !rates.contains(&s.rate) {
            rates.push(s.rate);
        }
    }
    for rate in rates {
        let runs: Vec<&SteadyRun> = r.steady.iter().filter(|s| s.rate == rate).collect();
        let tag = rate.label().replace("/s", "ps");
        write(
            format!("steady-{tag}-latency-cdf.svg"),
            format!("Steady {}: commit→Kafka latency CDF", rate.label()),
            Chart {
                title: format!(
                    "Commit → visible in Kafka, {} (txn {})",
                    rate.label(),
                    rate.txn
                ),
                x_label: "latency (ms, log scale)".into(),
                y_label: "fraction of events".into(),
                x_log: true,
                series: runs
                    .iter()
                    .map(|s| Series {
                        name: s.system.name().into(),
                        points: s.latency.cdf.clone(),
                    })
                    .collect(),
                y2: None,
            },
        )?;
        write(
            format!("steady-{tag}-latency-over-time.svg"),
            format!(
                "Steady {}: p99 latency of the events committed in each second",
                rate.label()
            ),
            Chart {
                title: format!("p99 commit → Kafka per second, {}", rate.label()),
                x_label: "second of the window".into(),
                y_label: "p99 latency (ms)".into(),
                x_log: false,
                series: runs
                    .iter()
                    .map(|s| Series {
                        name: s.system.name().into(),
                        points: s
                            .latency_per_second
                            .iter()
                            .enumerate()
                            .map(|(i, (_, p99))| (i as f64 + 0.5, *p99))
                            .collect(),
                    })
                    .collect(),
                y2: None,
            },
        )?;
        write(
            format!("steady-{tag}-throughput.svg"),
            format!(
                "Steady {}: records arriving in Kafka per second",
                rate.label()
            ),
            Chart {
                title: format!("Steady load {}: throughput", rate.label()),
                x_label: "seconds since the window started".into(),
                y_label: "events/s into Kafka".into(),
                x_log: false,
                series: throughput_series(runs.iter().map(|s| (s.system, s.throughput.clone()))),
                y2: None,
            },
        )?;
    }
    if !r.idle.is_empty() {
        write(
            "idle-slot-lag.svg".into(),
            "Idle outbox, busy neighbours: WAL retained for each relay's slot".into(),
            Chart {
                title: "Idle outbox, busy neighbours: WAL behind the slot (confirmed lag)".into(),
                x_label: "seconds".into(),
                y_label: "MB of WAL".into(),
                x_log: false,
                series: r
                    .idle
                    .iter()
                    .map(|i| Series {
                        name: i.system.name().into(),
                        points: i
                            .samples
                            .iter()
                            .map(|(t, lag, _)| (*t, *lag as f64 / 1e6))
                            .collect(),
                    })
                    .collect(),
                y2: None,
            },
        )?;
    }
    Ok(files)
}

/// The whole markdown report.
pub fn markdown(r: &Results, plots: &[(String, String)]) -> String {
    let m = &r.meta;
    let mut t = String::new();
    let _ = writeln!(t, "# walcast benchmark report\n");
    let _ = writeln!(
        t,
        "Run `{}` ({}), {:.1} minutes, on {}. walcast {}; {}.\n",
        m.run_id,
        if m.quick { "quick mode" } else { "full run" },
        m.duration_s / 60.0,
        m.machine,
        m.walcast_rev,
        m.debezium
    );
    let _ = writeln!(
        t,
        "Load average: {:.2} at the start, {:.2} at the end, at most {:.2} at the end of a measurement.\n",
        m.load_start, m.load_end, m.load_max
    );
    let outside: Vec<f64> = r
        .backlog
        .iter()
        .flat_map(|b| b.runs.iter().map(|x| x.usage.outside_cores()))
        .chain(r.steady.iter().map(|s| s.usage.outside_cores()))
        .collect();
    if !outside.is_empty() {
        let _ = writeln!(
            t,
            "Cores busy with processes outside the run (other users of the machine) during the measurements: {:.2} on average, {:.2} at most (of {}).\n",
            outside.iter().sum::<f64>() / outside.len() as f64,
            outside.iter().copied().fold(0.0, f64::max),
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
        );
    }
    let _ = writeln!(t, "Command: `{}`\n", m.command);
    if !m.notes.is_empty() {
        let _ = writeln!(t, "Notes:\n");
        for n in &m.notes {
            let _ = writeln!(t, "- {n}");
        }
        let _ = writeln!(t);
    }
    let _ = writeln!(t, "## Targets\n");
    let _ = writeln!(t, "{}", targets(r));
    let _ = writeln!(t, "## Results\n");
    t.push_str(&tables(r));
    if !plots.is_empty() {
        let _ = writeln!(t, "## Plots\n");
        for (f, c) in plots {
            let _ = writeln!(t, "- [{c}]({f})");
        }
        let _ = writeln!(t);
    }
    let _ = writeln!(t, "## Settings\n");
    for (k, v) in &m.settings {
        let _ = writeln!(t, "- **{k}**: {v}");
    }
    t
}

/// Writes results.json, report.md and the plots into `dir`.
pub fn write_all(r: &Results, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("results.json"), serde_json::to_vec_pretty(r)?)?;
    let plots = plots(r, dir)?;
    std::fs::write(dir.join("report.md"), markdown(r, &plots))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Latency;
    use crate::systems::Usage;
    use crate::workloads::{DrainRun, RateSpec};

    fn drain(system: System, rate: f64, cpu: f64, rss: u64) -> DrainRun {
        DrainRun {
            system,
            complete: true,
            events: 1000,
            duplicates: 0,
            startup_s: 1.0,
            drain_s: 1000.0 / rate,
            total_s: 1.0 + 1000.0 / rate,
            rate_eps: rate,
            rate_total_eps: rate / 2.0,
            usage: Usage {
                peak_rss_bytes: rss,
                ..Usage::default()
            },
            cpu_s_per_mevent: cpu,
            drain_cpu_s_per_mevent: cpu,
            pg_cpu_s_per_mevent: 1.0,
            drain_usage: None,
            throughput: vec![rate; 12],
            timeline: None,
            note: None,
            again: false,
        }
    }

    fn sample() -> Results {
        let steady = |system, p50: f64| SteadyRun {
            system,
            rate: RateSpec {
                rate: Some(1000),
                txn: 1,
            },
            written: 100,
            write_rate_eps: 1000.0,
            delivered: 100,
            duplicates: 0,
            latency: Latency::from_ns(vec![(p50 * 1e6) as u64; 10]),
            latency_per_second: vec![(p50, p50)],
            backlog_at_end: 0,
            catch_up_s: 0.01,
            keeps_up: true,
            usage: Usage {
                peak_rss_bytes: 20_000_000,
                ..Usage::default()
            },
            cpu_s_per_mevent: 1.0,
            throughput: vec![1000.0],
            ready_s: 0.5,
            window_start_s: 1.0,
            note: None,
        };
        Results {
            backlog: vec![BacklogResult {
                events: 1000,
                payload: 200,
                txn: 10,
                fill_s: 1.0,
                wal_bytes: 1_000_000,
                runs: vec![
                    drain(System::PgRecvlogical, 100_000.0, 1.0, 5_000_000),
                    drain(System::KafkaLimit, 80_000.0, 1.0, 30_000_000),
                    drain(System::Walcast, 95_000.0, 2.0, 30_000_000),
                    drain(System::Debezium, 10_000.0, 20.0, 900_000_000),
                ],
            }],
            steady: vec![steady(System::Walcast, 3.0), steady(System::Polling, 60.0)],
            ..Results::default()
        }
    }

    #[test]
    fn targets_compare_against_the_right_references() {
        let r = sample();
        let t = targets(&r);
        // The stream limit is pg-recvlogical's 100k, not kafka-limit's 80k.
        assert!(
            t.contains("95,000 ev/s | 100,000 ev/s (pg-recvlogical) | 95%"),
            "{t}"
        );
        assert!(t.contains("1/10.0"), "{t}");
        assert!(t.contains("20.00× lower"), "{t}");
        assert!(t.contains("slowest second 95,000 ev/s"), "{t}");
        assert!(!t.contains("not met"), "{t}");
    }

    #[test]
    fn the_stream_limit_is_the_faster_of_every_reading() {
        let mut r = sample();
        // pg-drain read the backlog twice: slower than pg_recvlogical first,
        // faster after the relays.
        r.backlog[0]
            .runs
            .push(drain(System::PgDrain, 90_000.0, 1.0, 5_000_000));
        let mut again = drain(System::PgDrain, 110_000.0, 1.0, 5_000_000);
        again.again = true;
        r.backlog[0].runs.push(again);
        let t = targets(&r);
        assert!(
            t.contains("95,000 ev/s | 110,000 ev/s (pg-drain (again)) | 86% | **not met**"),
            "{t}"
        );
        let m = markdown(&r, &[]);
        assert!(m.contains("| pg-drain (again) | 110,000 |"), "{m}");
    }

    #[test]
    fn pipelines_that_do_not_scale_name_what_used_the_cores() {
        use crate::workloads::{PipelinesResult, PipelinesRun};
        let mut r = sample();
        let run = |pipelines, rate, pg_cpu_s| {
            let mut d = drain(System::Walcast, rate, 1.0, 30_000_000);
            d.drain_usage = Some(Usage {
                cpu_s: 5.0,
                pg_cpu_s,
                kafka_cpu_s: 2.0,
                machine_busy_s: 19.0,
                wall_s: 10.0,
                ..Usage::default()
            });
            PipelinesRun { pipelines, run: d }
        };
        r.pipelines = Some(PipelinesResult {
            events: 1_000_000,
            payload: 200,
            txn: 10,
            fill_s: 10.0,
            wal_bytes: 300_000_000,
            runs: vec![run(1, 100_000.0, 8.0), run(4, 120_000.0, 12.0)],
        });
        let t = targets(&r);
        assert!(
            t.contains("| 4 pipelines ≥ 1.5× one, or which process saturates the cores | pipelines burst 1,000,000 | 120,000 ev/s | 100,000 ev/s | 1.20× | **not met**; machine busy 1.90 of "),
            "{t}"
        );
        assert!(
            t.contains("cores: Postgres 1.20, walcast 0.50, Kafka 0.20"),
            "{t}"
        );
        let tables = tables(&r);
        assert!(
            tables.contains("| 4 | 120,000 | 1.20× | 0.50 | 1.20 | 0.20 |"),
            "{tables}"
        );
        // scaling that reaches the target says so
        r.pipelines.as_mut().unwrap().runs[1].run.rate_eps = 160_000.0;
        assert!(targets(&r).contains("| 1.60× | yes |"), "{}", targets(&r));
    }

    #[test]
    fn a_stop_and_go_drain_and_a_slow_tail_miss_their_targets() {
        let mut r = sample();
        let w = r.backlog[0]
            .runs
            .iter_mut()
            .find(|x| x.system == System::Walcast)
            .unwrap();
        // 500 ms buckets: steady 100k/s, but one whole second at 40k/s.
        w.throughput = vec![
            100e3, 100e3, 100e3, 100e3, 40e3, 40e3, 100e3, 100e3, 100e3, 100e3,
        ];
        assert_eq!(per_second_rates(w), vec![100e3, 40e3, 100e3]);
        r.steady[0].latency = Latency::from_ns(vec![12_000_000; 10]);
        let t = targets(&r);
        assert!(
            t.contains(
                "slowest second 40,000 ev/s | median 100,000 ev/s (3 s) | 0.40 | **not met**"
            ),
            "{t}"
        );
        assert!(
            t.contains("| p99 commit→Kafka ≤ 10 ms at 1k events/s | steady 1k/s | 12.0 ms | 10 ms | | **not met** |"),
            "{t}"
        );
    }

    #[test]
    fn each_plot_is_listed_once_whatever_the_run_order() {
        let mut r = sample();
        // Runs come grouped by system: rate A, rate B, then rate A again.
        let mut other = r.steady[0].clone();
        other.rate = RateSpec {
            rate: Some(10_000),
            txn: 1,
        };
        let mut again = r.steady[1].clone();
        again.system = System::Debezium;
        r.steady = vec![r.steady[0].clone(), other, again];
        let dir = std::env::temp_dir().join(format!("walcast-bench-plots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = plots(&r, &dir).unwrap();
        let mut names: Vec<&str> = files.iter().map(|(f, _)| f.as_str()).collect();
        let all = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all, "a plot is listed twice: {files:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn timeline_rows_become_acks_per_10_ms_and_in_flight() {
        let csv = "t_ms,events_sent,events_delivered,in_flight_events,in_flight_bytes\n\
                   10.000,100,0,100,20000\n\
                   20.000,200,50,150,30000\n\
                   40.000,200,200,0,0\n\
                   50.0";
        let (acks, flight) = timeline_series(csv).unwrap();
        // 50 acks in 10 ms; 150 in 20 ms = 75 per 10 ms; the cut-off row is skipped.
        assert_eq!(acks, vec![(0.02, 50.0), (0.04, 75.0)]);
        assert_eq!(flight, vec![(0.01, 100.0), (0.02, 150.0), (0.04, 0.0)]);
        assert!(timeline_series("t_ms,events_sent\n1,2").is_err());
    }

    #[test]
    fn a_walcast_timeline_is_plotted() {
        let dir = std::env::temp_dir().join(format!("walcast-bench-tl-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("work")).unwrap();
        std::fs::write(
            dir.join("work/backlog-200b-txn10-timeline.csv"),
            "t_ms,events_sent,events_delivered,in_flight_events\n10.0,5,0,5\n20.0,9,9,0\n",
        )
        .unwrap();
        let mut r = sample();
        for run in &mut r.backlog[0].runs {
            if run.system == System::Walcast {
                run.timeline = Some("work/backlog-200b-txn10-timeline.csv".into());
            }
        }
        let files = plots(&r, &dir).unwrap();
        let svg = std::fs::read_to_string(dir.join("backlog-200b-txn10-timeline.svg")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            files
                .iter()
                .any(|(f, _)| f == "backlog-200b-txn10-timeline.svg"),
            "{files:?}"
        );
        assert!(svg.contains("in flight (right)"), "{svg}");
    }

    #[test]
    fn writes_every_file() {
        let dir = std::env::temp_dir().join(format!("walcast-bench-report-{}", std::process::id()));
        write_all(&sample(), &dir).unwrap();
        for f in [
            "results.json",
            "report.md",
            "backlog-200b-txn10-throughput.svg",
            "steady-1kps-latency-cdf.svg",
        ] {
            assert!(dir.join(f).exists(), "{f}");
        }
        let back: Results =
            serde_json::from_slice(&std::fs::read(dir.join("results.json")).unwrap()).unwrap();
        assert_eq!(back.backlog.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
