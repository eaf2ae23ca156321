//! The shared environment, started once per test run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Connection facts of the running environment (from `scripts/dev env print`).
#[derive(Debug, Clone)]
pub struct TestEnv {
    /// Repository root.
    pub repo: PathBuf,
    /// Postgres host.
    pub pg_host: String,
    /// Postgres 15 port.
    pub pg_port: u16,
    /// Superuser name.
    pub admin_user: String,
    /// Superuser password.
    pub admin_password: String,
    /// The connector's REPLICATION role.
    pub repl_user: String,
    /// Its password.
    pub repl_password: String,
    /// Kafka bootstrap servers.
    pub kafka_bootstrap: String,
    /// Postgres 17 port, when it runs.
    pub pg17_port: Option<u16>,
    /// Every `WALCAST_*` variable of the environment (`scripts/dev env print`).
    pub vars: HashMap<String, String>,
}

static ENV: OnceLock<TestEnv> = OnceLock::new();
static SERVICES: RwLock<()> = RwLock::const_new(());

/// The repository root (this crate is `<repo>/tests`).
pub fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn dev(args: &[&str]) -> String {
    let repo = repo_dir();
    let out = Command::new(repo.join("scripts/dev"))
        .args(args)
        .current_dir(&repo)
        .output()
        .unwrap_or_else(|e| panic!("cannot run scripts/dev {args:?}: {e}"));
    if !out.status.success() {
        panic!(
            "scripts/dev {args:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `export K=V` lines of `scripts/dev env print` (values quoted by
/// bash's `printf %q`: `'…'`, or backslash escapes such as `\,` in a list).
pub fn parse_exports(text: &str) -> HashMap<String, String> {
    let unquote = |v: &str| -> String {
        if let Some(inner) = v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
            return inner.to_string();
        }
        let mut out = String::new();
        let mut chars = v.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => out.extend(chars.next()),
                c => out.push(c),
            }
        }
        out
    };
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), unquote(v)))
        .collect()
}

impl TestEnv {
    /// The environment: uses the `WALCAST_PG_PORT`… variables when
    /// `scripts/dev test` exported them, otherwise starts the services with
    /// `scripts/dev env up` (idempotent) and reads `env print`.
    pub fn get() -> &'static TestEnv {
        ENV.get_or_init(|| {
            let mut vars: HashMap<String, String> = std::env::vars().collect();
            if !vars.contains_key("WALCAST_KAFKA_BOOTSTRAP")
                || !vars.contains_key("WALCAST_PG_ADMIN_PASSWORD")
            {
                dev(&["env", "up", "pg", "kafka"]);
                vars.extend(parse_exports(&dev(&["env", "print"])));
            }
            let get = |k: &str| {
                vars.get(k)
                    .cloned()
                    .unwrap_or_else(|| panic!("{k} is not set by scripts/dev env print"))
            };
            TestEnv {
                repo: repo_dir(),
                pg_host: get("WALCAST_PG_HOST"),
                pg_port: get("WALCAST_PG_PORT").parse().expect("WALCAST_PG_PORT"),
                admin_user: get("WALCAST_PG_ADMIN_USER"),
                admin_password: get("WALCAST_PG_ADMIN_PASSWORD"),
                repl_user: get("WALCAST_PG_REPL_USER"),
                repl_password: get("WALCAST_PG_REPL_PASSWORD"),
                kafka_bootstrap: get("WALCAST_KAFKA_BOOTSTRAP"),
                pg17_port: vars.get("WALCAST_PG17_PORT").and_then(|p| p.parse().ok()),
                vars: vars
                    .iter()
                    .filter(|(k, _)| k.starts_with("WALCAST_"))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            }
        })
    }

    /// Starts PostgreSQL 17 (from the npm package) if needed and returns its port.
    pub fn pg17_port(&self) -> u16 {
        if let Some(p) = self.pg17_port {
            return p;
        }
        dev(&["env", "up", "pg17"]);
        parse_exports(&dev(&["env", "print"]))
            .get("WALCAST_PG17_PORT")
            .and_then(|p| p.parse().ok())
            .expect("WALCAST_PG17_PORT after env up pg17")
    }

    /// Tests that only use the services share them (hold the guard for the
    /// whole test).
    pub async fn shared(&self) -> RwLockReadGuard<'static, ()> {
        SERVICES.read().await
    }

    /// Tests that stop, kill, pause or restart a service run alone.
    pub async fn exclusive(&self) -> RwLockWriteGuard<'static, ()> {
        SERVICES.write().await
    }

    /// A `WALCAST_*` variable of the environment.
    pub fn var(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    /// Runs `scripts/dev env ARGS…` (service control for fault tests).
    pub fn control(&self, args: &[&str]) {
        let mut full = vec!["env"];
        full.extend_from_slice(args);
        dev(&full);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_parse() {
        let m = parse_exports("export A=1\nexport B='x y'\n# c\nexport C=h:1\\,h:2\n");
        assert_eq!(m["A"], "1");
        assert_eq!(m["B"], "x y");
        assert_eq!(m["C"], "h:1,h:2", "printf %q escapes commas");
    }
}
