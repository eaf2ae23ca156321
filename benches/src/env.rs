//! The benchmark environment: connection facts exported by `scripts/dev env
//! print` (benches/run.sh exports them), and where the services' pids live.

use std::path::PathBuf;

use anyhow::{Context as _, Result};

/// Connection facts of the running bench environment.
#[derive(Debug, Clone)]
pub struct BenchEnv {
    /// Repository root.
    pub repo: PathBuf,
    /// The dev dir of the bench environment (pid files).
    pub dev_dir: PathBuf,
    /// Where Maven-resolved jars are cached.
    pub cache_dir: PathBuf,
    /// Postgres host.
    pub pg_host: String,
    /// Postgres port.
    pub pg_port: u16,
    /// Superuser.
    pub admin_user: String,
    /// Its password.
    pub admin_password: String,
    /// The REPLICATION role walcast uses.
    pub repl_user: String,
    /// Its password.
    pub repl_password: String,
    /// Kafka bootstrap servers.
    pub kafka_bootstrap: String,
}

fn var(name: &str) -> Result<String> {
    std::env::var(name).with_context(|| {
        format!("{name} is not set: run the harness through `scripts/dev bench` (benches/run.sh), which exports the bench environment")
    })
}

impl BenchEnv {
    /// Reads the `WALCAST_*` variables of `scripts/dev env print`.
    ///
    /// # Errors
    /// A variable is missing or malformed.
    pub fn from_env() -> Result<BenchEnv> {
        let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
        let cache_dir = std::env::var("WALCAST_CACHE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from(home).join(".cache/walcast"));
        Ok(BenchEnv {
            repo: PathBuf::from(var("WALCAST_REPO_DIR")?),
            dev_dir: PathBuf::from(var("WALCAST_DEV_DIR")?),
            cache_dir,
            pg_host: var("WALCAST_PG_HOST")?,
            pg_port: var("WALCAST_PG_PORT")?.parse().context("WALCAST_PG_PORT")?,
            admin_user: var("WALCAST_PG_ADMIN_USER")?,
            admin_password: var("WALCAST_PG_ADMIN_PASSWORD")?,
            repl_user: var("WALCAST_PG_REPL_USER")?,
            repl_password: var("WALCAST_PG_REPL_PASSWORD")?,
            kafka_bootstrap: var("WALCAST_KAFKA_BOOTSTRAP")?,
        })
    }

    /// The postmaster's pid (first line of `postmaster.pid`).
    pub fn postgres_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.dev_dir.join("pg15/data/postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// The Kafka broker JVM's pid.
    pub fn kafka_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.dev_dir.join("kafka/node-1/kafka.pid")).ok()?;
        text.trim().parse().ok()
    }

    /// A libpq-style connection string for `db` as the superuser.
    pub fn admin_conn(&self, db: &str) -> String {
        format!(
            "host={} port={} dbname={db} user={} password={} connect_timeout=10",
            self.pg_host, self.pg_port, self.admin_user, self.admin_password
        )
    }
}
