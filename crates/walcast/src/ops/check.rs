//! `walcast check`.

use std::time::Duration;

use walcast_core::check::{CheckResult, CheckStatus};
use walcast_kafka::QueueLimits;

use super::Exit;
use crate::ConfigArgs;

/// `walcast check` arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct CheckArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// How long to wait for Kafka to answer.
    #[arg(long, default_value_t = 10_000)]
    kafka_timeout_ms: u64,
}

pub(crate) fn run(args: CheckArgs) -> anyhow::Result<()> {
    let cfg = crate::load_one(&args.config)?;
    let slots = crate::all_slots(&args.config)?;
    let ours: Vec<&str> = slots.iter().map(String::as_str).collect();
    let opts = crate::tool_options(&cfg)?;
    let template = cfg.routes()?;
    let dead_letter_topics = cfg.dead_letter_topics()?;
    let queue = QueueLimits {
        max_in_flight_events: cfg.pipeline.max_in_flight_events,
        max_in_flight_bytes: cfg.pipeline.max_in_flight_bytes,
    };
    let rt = super::runtime()?;
    let kafka_timeout = Duration::from_millis(args.kafka_timeout_ms);
    let (mut results, kafka, dead_letters, left_behind) = rt.block_on(async {
        tokio::join!(
            walcast_postgres::check::check(&opts),
            walcast_kafka::check::check(&cfg.kafka, &template, queue, kafka_timeout),
            walcast_kafka::check::check_dead_letter_topics(
                &cfg.kafka,
                &dead_letter_topics,
                kafka_timeout
            ),
            // Any age: an operator asks now (the relay waits 5 minutes, so
            // that a sibling process restarting is not taken for one).
            walcast_runtime::left_behind_slots(&cfg, &ours, Duration::ZERO)
        )
    });
    results.extend(kafka);
    results.extend(dead_letters);
    // A failure to look is the postgres checks' to report (they connect the
    // same way); a slot left behind is a warning: it fills the server's disk.
    for slot in left_behind.unwrap_or_default() {
        results.push(CheckResult::warn(
            format!("slot {} (left behind)", slot.slot),
            slot.describe(),
            slot.fix(),
        ));
    }
    if let Some(listen) = &cfg.metrics.listen {
        results.push(CheckResult::ok(
            "metrics.listen",
            format!("the relay serves /metrics, /healthz and /readyz on {listen}"),
        ));
    } else {
        results.push(CheckResult::warn(
            "metrics.listen",
            "no [metrics] listen: the relay exposes no metrics or health endpoints",
            "set [metrics] listen = \"127.0.0.1:9187\" (\"0.0.0.0:9187\" in a container) and scrape /metrics; see docs/operations.md",
        ));
    }
    let failed = results
        .iter()
        .filter(|r| r.status == CheckStatus::Fail)
        .count();
    let warned = results
        .iter()
        .filter(|r| r.status == CheckStatus::Warn)
        .count();
    if args.json {
        let checks: Vec<serde_json::Value> = results
            .iter()
            .map(|r| {
                serde_json::json!({
                    "name": r.name,
                    "status": r.status.as_str(),
                    "detail": r.detail,
                    "fix": r.fix,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "ok": failed == 0,
                "failed": failed,
                "warnings": warned,
                "checks": checks,
            }))?
        );
    } else {
        print!("{}", table(&results));
        println!(
            "\n{failed} failed, {warned} warning(s), {} ok",
            results.len() - failed - warned
        );
    }
    if failed > 0 {
        return Err(Exit(2).into());
    }
    Ok(())
}

/// The human table: status, check, what was found; the fix below.
fn table(results: &[CheckResult]) -> String {
    let width = results
        .iter()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(0)
        .min(44);
    let mut out = format!("{:<7}{:<width$}  DETAIL\n", "STATUS", "CHECK");
    for r in results {
        let status = match r.status {
            CheckStatus::Ok => "OK",
            CheckStatus::Warn => "WARN",
            CheckStatus::Fail => "FAIL",
        };
        out.push_str(&format!("{status:<7}{:<width$}  {}\n", r.name, r.detail));
        if let Some(fix) = &r.fix {
            out.push_str(&format!("{:<7}{:<width$}  fix: {fix}\n", "", ""));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_puts_the_fix_under_its_check() {
        let t = table(&[
            CheckResult::ok("a", "fine"),
            CheckResult::fail("bb.c", "broken", "mend it"),
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "STATUS CHECK  DETAIL");
        assert_eq!(lines[1], "OK     a     fine");
        assert_eq!(lines[2], "FAIL   bb.c  broken");
        assert_eq!(lines[3], "             fix: mend it");
    }
}
