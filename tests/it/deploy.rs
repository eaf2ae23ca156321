//! Issue 11: the deployment files agree with walcast and with each other
//! (no services needed). The alert rules themselves are checked by
//! Prometheus's own tool: `scripts/promtool check`.

use std::collections::BTreeSet;

use anyhow::{Context as _, Result};
use walcast_core::config::{Config, PipelineConfig};
use walcast_tests::env::repo_dir;

fn read(path: &str) -> Result<String> {
    std::fs::read_to_string(repo_dir().join(path)).with_context(|| format!("reading {path}"))
}

/// The metric names of docs/metrics.md's table.
fn contract() -> Result<BTreeSet<String>> {
    let names: BTreeSet<String> = read("docs/metrics.md")?
        .lines()
        .filter_map(|l| l.strip_prefix("| walcast_"))
        .filter_map(|l| l.split('|').next())
        .map(|n| format!("walcast_{}", n.trim()))
        .collect();
    anyhow::ensure!(names.len() >= 19, "the contract lists {names:?}");
    Ok(names)
}

/// Every `walcast_…` token in `text`, histogram series mapped to their metric.
fn referenced(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("walcast_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let before = rest[..i].chars().next_back();
        // Not part of a longer identifier (e.g. a runbook anchor).
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '#') {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            out.insert(base.to_string());
        }
        rest = &tail[end..];
    }
    out
}

fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                        out.push(s.clone())
                    }
                    _ => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[test]
fn the_alerts_and_the_dashboard_use_only_the_contracts_metrics() -> Result<()> {
    let contract = contract()?;
    // The dashboard is valid JSON with a query in every panel.
    let dashboard: serde_json::Value = serde_json::from_str(&read("deploy/grafana/walcast.json")?)
        .context("deploy/grafana/walcast.json is not valid JSON")?;
    let panels = dashboard["panels"].as_array().context("panels")?;
    assert!(panels.len() >= 10);
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_i64()), "duplicate panel id: {p}");
        let mut e = Vec::new();
        exprs(&p["targets"], &mut e);
        assert!(!e.is_empty(), "panel without a query: {}", p["title"]);
    }
    let mut e = Vec::new();
    exprs(&dashboard, &mut e);
    let in_dashboard = referenced(&e.join("\n"));
    let in_alerts = referenced(&read("deploy/prometheus/alerts.yml")?);
    for (what, names) in [
        ("deploy/grafana/walcast.json", &in_dashboard),
        ("deploy/prometheus/alerts.yml", &in_alerts),
    ] {
        let unknown: Vec<&String> = names.difference(&contract).collect();
        assert!(
            unknown.is_empty(),
            "{what} uses metrics that docs/metrics.md does not list: {unknown:?}"
        );
    }
    // The alerts cover what issue 11 asks for.
    for name in [
        "walcast_replication_lag_bytes",
        "walcast_slot_safe_wal_size_bytes",
        "walcast_last_ack_age_seconds",
        "walcast_in_flight_events",
        "walcast_kafka_blocked_seconds",
        "walcast_slot_wal_status",
        "walcast_dead_lettered_total",
        "walcast_ready",
        "walcast_pipeline_restarts_total",
    ] {
        assert!(in_alerts.contains(name), "no alert on {name}");
    }
    // The dashboard shows every metric of the contract.
    let missing: Vec<&String> = contract.difference(&in_dashboard).collect();
    assert!(
        missing.is_empty(),
        "the dashboard does not show {missing:?}"
    );
    Ok(())
}

/// `45s`, `1m30s` as seconds.
fn seconds(s: &str) -> u64 {
    let mut total = 0;
    let mut n = 0;
    for c in s.trim().trim_matches('"').chars() {
        match c {
            '0'..='9' => n = n * 10 + u64::from(c as u8 - b'0'),
            'h' => (total, n) = (total + n * 3600, 0),
            'm' => (total, n) = (total + n * 60, 0),
            's' => (total, n) = (total + n, 0),
            _ => {}
        }
    }
    total + n
}

/// The value of the first `key: value` line under `  walcast:` in the compose file.
fn compose_walcast(compose: &str, key: &str) -> Option<String> {
    let start = compose.find("\n  walcast:\n")?;
    compose[start..]
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with("    ") || l.trim().is_empty())
        .find_map(|l| l.trim().strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_string())
}

#[test]
fn the_container_and_the_unit_can_stop_and_keep_state() -> Result<()> {
    let cfg = Config::from_toml(&read("deploy/walcast.compose.toml")?)?;
    let compose = read("docker-compose.yml")?;
    let dockerfile = read("Dockerfile")?;
    let state = cfg
        .pipeline
        .state_dir
        .as_ref()
        .context("deploy/walcast.compose.toml sets pipeline.state_dir")?
        .display()
        .to_string();

    // The state directory: created and owned by the image's user, and the volume's mount point.
    assert!(
        dockerfile.contains(&format!(
            "install -d -o walcast -g walcast -m 0750 /var/lib/walcast {state}"
        )),
        "the Dockerfile does not create {state} for its user"
    );
    assert!(dockerfile.contains("USER walcast"));
    assert!(
        compose.contains(&format!("- walcast-state:{state}\n")),
        "docker-compose.yml does not mount the state volume at {state}"
    );
    // Health: /readyz on the configured listener, checked with walcast itself.
    let listen = cfg.metrics.listen.as_deref().context("[metrics] listen")?;
    assert_eq!(listen, "0.0.0.0:9187");
    let port = listen.rsplit(':').next().unwrap();
    let health = compose_walcast(&compose, "test").context("walcast healthcheck")?;
    assert!(
        health.contains("walcast\", \"health\"")
            && health.contains(&format!("http://127.0.0.1:{port}/readyz")),
        "{health}"
    );
    // Stopping: the grace period covers the shutdown timeout with a margin.
    let grace =
        seconds(&compose_walcast(&compose, "stop_grace_period").context("stop_grace_period")?);
    let shutdown = cfg.pipeline.shutdown_timeout_ms / 1000;
    assert!(
        grace >= shutdown + 10,
        "stop_grace_period {grace}s < shutdown_timeout_ms {shutdown}s + 10s"
    );

    // systemd: the default shutdown timeout fits; exits 2 and 3 are not restarted.
    let unit = read("deploy/walcast.service")?;
    let get = |k: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(str::to_string)
    };
    let stop = seconds(&get("TimeoutStopSec").context("TimeoutStopSec")?);
    let default_shutdown = PipelineConfig::default().shutdown_timeout_ms / 1000;
    assert!(stop >= default_shutdown + 10, "TimeoutStopSec {stop}s");
    assert_eq!(get("Restart").as_deref(), Some("on-failure"));
    let prevent = get("RestartPreventExitStatus").context("RestartPreventExitStatus")?;
    let codes: BTreeSet<&str> = prevent.split_whitespace().collect();
    assert!(codes.contains("2") && codes.contains("3"), "{prevent}");
    assert_eq!(get("StateDirectory").as_deref(), Some("walcast"));
    assert!(get("User").is_some_and(|u| u != "root"));
    assert_eq!(
        get("Environment").as_deref(),
        Some("WALCAST_PIPELINE__STATE_DIR=/var/lib/walcast/state")
    );
    Ok(())
}

#[test]
fn metric_names_are_found_in_queries() {
    let r = referenced(
        "rate(walcast_events_produced_total[5m]) / walcast_commit_to_ack_seconds_bucket{le=\"1\"} docs/operations.md#walcaststalled",
    );
    assert_eq!(
        r.into_iter().collect::<Vec<_>>(),
        [
            "walcast_commit_to_ack_seconds",
            "walcast_events_produced_total"
        ]
    );
    assert_eq!(seconds("45s"), 45);
    assert_eq!(seconds("1m30s"), 90);
    assert_eq!(seconds("45"), 45);
}
