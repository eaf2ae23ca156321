//! A `walcast` process under test: config file, logs, signals.

use std::fs::File;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::env::TestEnv;
use crate::pg::TestDb;

/// A walcast configuration for one test.
#[derive(Debug, Clone)]
pub struct WalcastConfig {
    /// The TOML text.
    pub toml: String,
}

impl WalcastConfig {
    /// The default config for `db`: slot, publication, topic prefix of the
    /// test; state in `state_dir`.
    pub fn for_db(env: &TestEnv, db: &TestDb, state_dir: &Path) -> Self {
        WalcastConfig {
            toml: format!(
                r#"
[postgres]
host = "{host}"
port = {port}
database = "{db}"
user = "{user}"
password = "{password}"
slot = "{slot}"
publication = "{publication}"
create_publication = false
status_interval_ms = 200

[outbox]
tables = ["public.outbox"]
topic = "{prefix}.${{routedByValue}}"

[kafka]
bootstrap_servers = "{bootstrap}"
linger_ms = 2
delivery_timeout_ms = 180000

[pipeline]
state_dir = "{state}"
restart_backoff_initial_ms = 200
restart_backoff_max_ms = 2000
shutdown_timeout_ms = 10000

[log]
level = "info,walcast=debug"
"#,
                host = env.pg_host,
                port = db.port,
                db = db.name,
                user = env.repl_user,
                password = env.repl_password,
                slot = db.slot,
                publication = db.publication,
                prefix = db.topic_prefix,
                bootstrap = env.kafka_bootstrap,
                state = state_dir.display(),
            ),
        }
    }

    /// Sets `section.key = value` (value in TOML syntax), replacing an existing key.
    pub fn set(mut self, section: &str, key: &str, value: &str) -> Self {
        let mut table: toml_edit_lite::Doc = toml_edit_lite::Doc::parse(&self.toml);
        table.set(section, key, value);
        self.toml = table.render();
        self
    }
}

/// Minimal line-based TOML editing for tests (sections and `key = value` lines).
mod toml_edit_lite {
    pub struct Doc {
        lines: Vec<String>,
    }
    impl Doc {
        pub fn parse(s: &str) -> Doc {
            Doc {
                lines: s.lines().map(str::to_string).collect(),
            }
        }
        pub fn set(&mut self, section: &str, key: &str, value: &str) {
            let header = format!("[{section}]");
            let start = match self.lines.iter().position(|l| l.trim() == header) {
                Some(i) => i,
                None => {
                    self.lines.push(header);
                    self.lines.len() - 1
                }
            };
            let end = self.lines[start + 1..]
                .iter()
                .position(|l| l.trim_start().starts_with('['))
                .map(|i| start + 1 + i)
                .unwrap_or(self.lines.len());
            let line = format!("{key} = {value}");
            for i in start + 1..end {
                if self.lines[i].split('=').next().map(str::trim) == Some(key) {
                    self.lines[i] = line;
                    return;
                }
            }
            self.lines.insert(end, line);
        }
        pub fn render(&self) -> String {
            self.lines.join("\n") + "\n"
        }
    }
}

/// A running (or exited) walcast process.
#[derive(Debug)]
pub struct Walcast {
    child: Child,
    /// Its log file (stderr).
    pub log: PathBuf,
    /// Its config file.
    pub config: PathBuf,
}

impl Walcast {
    /// Writes the config into `dir` and starts `bin run --config …`.
    pub fn start(bin: &Path, dir: &Path, cfg: &WalcastConfig) -> Result<Walcast> {
        Self::start_with(bin, dir, cfg, &[])
    }

    /// Like [`Walcast::start`] with extra environment variables.
    pub fn start_with(
        bin: &Path,
        dir: &Path,
        cfg: &WalcastConfig,
        env: &[(&str, &str)],
    ) -> Result<Walcast> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("walcast.toml");
        std::fs::write(&config, &cfg.toml)?;
        let n = std::fs::read_dir(dir)?.count();
        let log = dir.join(format!("walcast-{n}.log"));
        let stderr = File::create(&log)?;
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Walcast { child, log, config })
    }

    /// Runs `bin ARGS…` to completion (for one-shot commands and for runs
    /// expected to fail): exit status and stderr.
    pub fn run_to_exit(
        bin: &Path,
        args: &[&str],
        timeout: Duration,
    ) -> Result<(ExitStatus, String)> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("out.log");
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(File::create(&log)?)
            .stderr(File::create(dir.path().join("err.log"))?)
            .spawn()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                let mut out = std::fs::read_to_string(&log).unwrap_or_default();
                out.push_str(
                    &std::fs::read_to_string(dir.path().join("err.log")).unwrap_or_default(),
                );
                return Ok((status, out));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let err = std::fs::read_to_string(dir.path().join("err.log")).unwrap_or_default();
                bail!("walcast {args:?} did not exit within {timeout:?}; stderr:\n{err}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`, failing early if the process exits.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let f = File::open(&self.log)?;
            if BufReader::new(f)
                .lines()
                .map_while(|l| l.ok())
                .any(|l| l.contains(needle))
            {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "walcast exited ({status}) before logging {needle:?}:\n{}",
                    self.log_text()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "walcast did not log {needle:?} within {timeout:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the "streaming from the slot" line.
    pub fn wait_streaming(&mut self) -> Result<()> {
        self.wait_for_log("streaming from the slot", Duration::from_secs(60))
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) -> Result<()> {
        let _ = self.child.kill();
        self.child.wait()?;
        Ok(())
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) -> Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM {} failed", self.pid());
        }
        Ok(())
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                bail!(
                    "walcast did not exit within {timeout:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether it still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Walcast {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
