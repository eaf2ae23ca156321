//! A real OTLP receiver for the tracing tests: Jaeger all-in-one (built from
//! Go modules by `scripts/jaeger`, cached), started per test on free local
//! ports with in-memory storage, and its query API.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::env::repo_dir;
use crate::net::{free_port, http_get};

/// A running Jaeger; killed on drop.
#[derive(Debug)]
pub struct Jaeger {
    child: Child,
    /// `127.0.0.1:PORT` of the OTLP/HTTP receiver.
    pub otlp_http: String,
    /// `127.0.0.1:PORT` of the query API and UI.
    pub query: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// The Jaeger binary `scripts/jaeger` built, or an error naming the command
/// that builds it.
pub fn binary() -> Result<PathBuf> {
    let out = Command::new(repo_dir().join("scripts/jaeger"))
        .arg("path")
        .output()
        .context("running scripts/jaeger path")?;
    if !out.status.success() {
        bail!(
            "Jaeger, the real OTLP receiver this test sends spans to, is not built: run `scripts/jaeger install` (or `scripts/dev env up jaeger`; `scripts/dev test` does it) once, it builds Jaeger from Go modules into ~/.cache/walcast/go/bin. ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

impl Jaeger {
    /// Starts Jaeger with only the OTLP receivers, the in-memory store and
    /// the query API, each on a free port, and waits until it answers.
    pub fn start() -> Result<Jaeger> {
        let bin = binary()?;
        let dir = tempfile::tempdir()?;
        let [otlp_http, otlp_grpc, query_http, query_grpc, health] =
            [(); 5].map(|_| free_port().map(|p| format!("127.0.0.1:{p}")));
        let (otlp_http, otlp_grpc, query_http, query_grpc, health) =
            (otlp_http?, otlp_grpc?, query_http?, query_grpc?, health?);
        let config = format!(
            r#"service:
  extensions: [jaeger_storage, jaeger_query, healthcheckv2]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  healthcheckv2:
    use_v2: true
    http:
      endpoint: "{health}"
  jaeger_query:
    storage:
      traces: mem
    http:
      endpoint: "{query_http}"
    grpc:
      endpoint: "{query_grpc}"
  jaeger_storage:
    backends:
      mem:
        memory:
          max_traces: 100000
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: "{otlp_grpc}"
      http:
        endpoint: "{otlp_http}"
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: mem
"#
        );
        let cfg = dir.path().join("jaeger.yaml");
        std::fs::write(&cfg, config)?;
        let log = dir.path().join("jaeger.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(&bin)
            // Jaeger's own traces (of its query service) are not wanted.
            .env("OTEL_TRACES_EXPORTER", "none")
            .env("OTEL_SDK_DISABLED", "true")
            .arg("--config")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut j = Jaeger {
            child,
            otlp_http,
            query: query_http,
            log,
            _dir: dir,
        };
        j.wait_ready(Duration::from_secs(60))?;
        Ok(j)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("Jaeger exited ({status}):\n{}", self.log_text());
            }
            let otlp = TcpStream::connect(&self.otlp_http).is_ok();
            if otlp && matches!(http_get(&self.query, "/api/services"), Ok((200, _))) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "Jaeger did not answer within {timeout:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Jaeger's own log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The spans of `service` Jaeger holds (`/api/traces`), as JSON objects
    /// (`operationName`, `tags`, `references`, …).
    pub fn spans(&self, service: &str) -> Result<Vec<serde_json::Value>> {
        let (status, body) = http_get(
            &self.query,
            &format!("/api/traces?service={service}&limit=1000&lookback=1h"),
        )?;
        if status == 404 || body.contains("service not found") {
            return Ok(Vec::new());
        }
        if status != 200 {
            bail!("Jaeger query answered {status}: {body}");
        }
        let v: serde_json::Value = serde_json::from_str(&body)
            .with_context(|| format!("Jaeger's answer is not JSON: {body}"))?;
        let mut spans = Vec::new();
        for trace in v["data"].as_array().into_iter().flatten() {
            spans.extend(trace["spans"].as_array().into_iter().flatten().cloned());
        }
        Ok(spans)
    }
}

impl Drop for Jaeger {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A span tag's value (`tags: [{key, type, value}]`).
pub fn tag<'a>(span: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    span["tags"]
        .as_array()?
        .iter()
        .find(|t| t["key"] == key)
        .map(|t| &t["value"])
}
