//! Reading the running relay's own view from its `/metrics` endpoint
//! (Prometheus text format; names in docs/metrics.md).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use walcast_core::Lsn;

/// One sample: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sample {
    pub(crate) name: String,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) value: f64,
}

/// Parses the Prometheus text exposition format (comments and `# HELP` /
/// `# TYPE` lines skipped; a line that does not parse is skipped).
pub(crate) fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices().peekable();
        let mut key = String::new();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '}' => {
                    end = Some(i + 1);
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    // A quoted value with \\, \" and \n escapes.
                    if chars.next()?.1 != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        let (_, c) = chars.next()?;
                        match c {
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            '"' => break,
                            c => value.push(c),
                        }
                    }
                    labels.insert(std::mem::take(&mut key), value);
                }
                c => key.push(c),
            }
        }
        rest = &r[end?..];
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// The relay's view of one pipeline, as `walcast status` shows it.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct RelayView {
    /// `walcast_lsn{position=…}` as LSNs, by position.
    pub(crate) lsn: BTreeMap<String, Lsn>,
    pub(crate) replication_lag_bytes: Option<f64>,
    pub(crate) in_flight_events: Option<f64>,
    pub(crate) in_flight_bytes: Option<f64>,
    pub(crate) last_ack_age_seconds: Option<f64>,
    pub(crate) kafka_blocked_seconds: Option<f64>,
    pub(crate) ready: Option<f64>,
    pub(crate) restarts: Option<f64>,
}

impl RelayView {
    /// The samples of pipeline `pipeline` (the slot name). When no sample
    /// carries that label, samples without a `pipeline` label are used.
    pub(crate) fn from_samples(samples: &[Sample], pipeline: &str) -> RelayView {
        let any_ours = samples
            .iter()
            .any(|s| s.labels.get("pipeline").map(String::as_str) == Some(pipeline));
        let ours = |s: &&Sample| match s.labels.get("pipeline") {
            Some(p) => p == pipeline,
            None => !any_ours,
        };
        let mut v = RelayView::default();
        for s in samples.iter().filter(ours) {
            match s.name.as_str() {
                "walcast_lsn" => {
                    if let Some(pos) = s.labels.get("position") {
                        if s.value.is_finite() && s.value >= 0.0 {
                            v.lsn.insert(pos.clone(), Lsn::new(s.value as u64));
                        }
                    }
                }
                "walcast_replication_lag_bytes" => v.replication_lag_bytes = Some(s.value),
                "walcast_in_flight_events" => v.in_flight_events = Some(s.value),
                "walcast_in_flight_bytes" => v.in_flight_bytes = Some(s.value),
                "walcast_last_ack_age_seconds" => v.last_ack_age_seconds = Some(s.value),
                "walcast_kafka_blocked_seconds" => v.kafka_blocked_seconds = Some(s.value),
                "walcast_ready" => v.ready = Some(s.value),
                "walcast_pipeline_restarts_total" => {
                    *v.restarts.get_or_insert(0.0) += s.value;
                }
                _ => {}
            }
        }
        v
    }
}

/// The URL of `/metrics` on `listen`: a wildcard address is reached on
/// loopback.
pub(crate) fn metrics_url(listen: &str) -> String {
    match listen.parse::<SocketAddr>() {
        Ok(SocketAddr::V4(a)) if a.ip().is_unspecified() => {
            format!("http://127.0.0.1:{}/metrics", a.port())
        }
        Ok(SocketAddr::V6(a)) if a.ip().is_unspecified() => {
            format!("http://[::1]:{}/metrics", a.port())
        }
        _ => format!("http://{listen}/metrics"),
    }
}

/// What `walcast status` could read from the relay.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Relay {
    /// No `[metrics] listen` in the configuration.
    NotConfigured,
    /// Configured, but the endpoint did not answer (walcast not running, or
    /// another address).
    Unreachable { url: String, error: String },
    /// Its view.
    View { url: String, view: RelayView },
}

/// Fetches and reads the relay's view.
pub(crate) fn read(listen: Option<&str>, pipeline: &str, timeout: Duration) -> Relay {
    let Some(listen) = listen else {
        return Relay::NotConfigured;
    };
    let url = metrics_url(listen);
    match super::http::get(&url, timeout) {
        Ok(r) if r.status == 200 => Relay::View {
            view: RelayView::from_samples(&parse(&r.body), pipeline),
            url,
        },
        Ok(r) => Relay::Unreachable {
            error: format!(
                "HTTP {}: {}",
                r.status,
                r.body.lines().next().unwrap_or_default()
            ),
            url,
        },
        Err(e) => Relay::Unreachable {
            error: format!("{e:#}"),
            url,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP walcast_lsn The LSN ladder.
# TYPE walcast_lsn gauge
walcast_lsn{pipeline="walcast",position="server_wal_end"} 26352848
walcast_lsn{pipeline="walcast",position="confirmed"} 26352640
walcast_lsn{pipeline="other",position="confirmed"} 1
walcast_replication_lag_bytes{pipeline="walcast"} 208
walcast_in_flight_events{pipeline="walcast"} 3
walcast_ready{pipeline="walcast"} 1
walcast_pipeline_restarts_total{pipeline="walcast",cause="kafka"} 2
walcast_pipeline_restarts_total{pipeline="walcast",cause="postgres"} 1
walcast_commit_to_ack_seconds_bucket{pipeline="walcast",le="+Inf"} 7
weird{a="x\"y\\z",b="1"} 2.5e3 1700000000000
"#;

    #[test]
    fn the_exposition_format_parses() {
        let s = parse(TEXT);
        assert_eq!(s.len(), 10);
        let w = s.iter().find(|s| s.name == "weird").unwrap();
        assert_eq!(w.labels["a"], "x\"y\\z");
        assert_eq!(w.value, 2500.0);
        let inf = s.iter().find(|s| s.name.ends_with("_bucket")).unwrap();
        assert_eq!(inf.labels["le"], "+Inf");
    }

    #[test]
    fn the_view_is_of_one_pipeline() {
        let v = RelayView::from_samples(&parse(TEXT), "walcast");
        assert_eq!(v.lsn["confirmed"], Lsn::new(26352640));
        assert_eq!(v.lsn["confirmed"].to_string(), "0/1921C00");
        assert_eq!(v.lsn.len(), 2);
        assert_eq!(v.replication_lag_bytes, Some(208.0));
        assert_eq!(v.in_flight_events, Some(3.0));
        assert_eq!(v.ready, Some(1.0));
        assert_eq!(v.restarts, Some(3.0));
        assert_eq!(v.kafka_blocked_seconds, None);
    }

    #[test]
    fn wildcard_listeners_are_reached_on_loopback() {
        assert_eq!(metrics_url("0.0.0.0:9187"), "http://127.0.0.1:9187/metrics");
        assert_eq!(metrics_url("[::]:9187"), "http://[::1]:9187/metrics");
        assert_eq!(metrics_url("10.1.2.3:9187"), "http://10.1.2.3:9187/metrics");
    }
}
