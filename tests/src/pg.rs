//! Per-test Postgres isolation: a fresh database with an outbox table and a
//! publication, a unique slot name, and cleanup.

use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio_postgres::{Client, NoTls};

use crate::env::TestEnv;

/// The outbox table every test uses (Debezium EventRouter column names).
pub const OUTBOX_DDL: &str = "CREATE TABLE public.outbox (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    aggregatetype text NOT NULL,
    aggregateid text NOT NULL,
    type text NOT NULL,
    payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
)";

/// Drops each of `slots` (each must exist and be inactive): the end of a
/// test that created slots besides its [`TestDb`]'s own.
pub async fn drop_slots<S: AsRef<str>>(admin: &Client, slots: &[S]) -> Result<()> {
    for slot in slots {
        let slot = slot.as_ref();
        admin
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .with_context(|| format!("dropping slot {slot}"))?;
    }
    Ok(())
}

/// Connects to `db` on `port` as `user`.
pub async fn connect(
    env: &TestEnv,
    port: u16,
    db: &str,
    user: &str,
    password: &str,
) -> Result<Client> {
    let conn = format!(
        "host={} port={port} dbname={db} user={user} password={password} connect_timeout=10",
        env.pg_host
    );
    let (client, connection) = tokio_postgres::connect(&conn, NoTls)
        .await
        .with_context(|| format!("connecting to {db} as {user} on port {port}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A database of one test.
#[derive(Debug)]
pub struct TestDb {
    /// Database name.
    pub name: String,
    /// Slot name for this test.
    pub slot: String,
    /// Publication name for this test.
    pub publication: String,
    /// Topic prefix for this test (topics are `<prefix>.<aggregatetype>`).
    pub topic_prefix: String,
    /// Port of the server the database lives on.
    pub port: u16,
}

fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}_{}", &id[..12])
}

impl TestDb {
    /// Creates `wt_<tag>_<random>` on Postgres 15 with the outbox table and a
    /// publication for it (as the superuser, as a DBA would).
    pub async fn create(env: &TestEnv, tag: &str) -> Result<TestDb> {
        Self::create_on(env, env.pg_port, tag, true).await
    }

    /// Like [`TestDb::create`], on any port; `with_outbox` = false leaves the
    /// database empty.
    pub async fn create_on(
        env: &TestEnv,
        port: u16,
        tag: &str,
        with_outbox: bool,
    ) -> Result<TestDb> {
        let name = unique(&format!("wt_{tag}"));
        let admin = connect(env, port, "postgres", &env.admin_user, &env.admin_password).await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .context("CREATE DATABASE")?;
        let db = TestDb {
            slot: unique("s"),
            publication: unique("p"),
            topic_prefix: unique("t"),
            name,
            port,
        };
        if with_outbox {
            let c = db.admin(env).await?;
            c.batch_execute(OUTBOX_DDL)
                .await
                .context("creating the outbox table")?;
            c.batch_execute(&format!(
                "CREATE PUBLICATION {} FOR TABLE public.outbox WITH (publish = 'insert')",
                db.publication
            ))
            .await
            .context("creating the publication")?;
        }
        Ok(db)
    }

    /// A superuser connection to this database.
    pub async fn admin(&self, env: &TestEnv) -> Result<Client> {
        connect(
            env,
            self.port,
            &self.name,
            &env.admin_user,
            &env.admin_password,
        )
        .await
    }

    /// The slot's `confirmed_flush_lsn` (None when the slot does not exist).
    pub async fn confirmed_flush_lsn(&self, env: &TestEnv) -> Result<Option<u64>> {
        let c = self.admin(env).await?;
        let row = c
            .query_opt(
                "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await?;
        Ok(row
            .and_then(|r| r.get::<_, Option<i64>>(0))
            .map(|v| v as u64))
    }

    /// Bytes of WAL the slot holds back: `pg_current_wal_lsn() - confirmed_flush_lsn`.
    pub async fn slot_lag_bytes(&self, env: &TestEnv) -> Result<i64> {
        let c = self.admin(env).await?;
        let row = c
            .query_one(
                "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Whether the slot is held by a connection.
    pub async fn slot_active(&self, env: &TestEnv) -> Result<bool> {
        let c = self.admin(env).await?;
        let row = c
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await?;
        Ok(row.map(|r| r.get(0)).unwrap_or(false))
    }

    /// Drops the slot (waiting for it to be released) and the database.
    pub async fn drop(self, env: &TestEnv) -> Result<()> {
        let admin = connect(
            env,
            self.port,
            "postgres",
            &env.admin_user,
            &env.admin_password,
        )
        .await?;
        for _ in 0..100 {
            let r = admin
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active",
                    &[&self.slot],
                )
                .await;
            let left = admin
                .query_opt(
                    "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
                    &[&self.slot],
                )
                .await?;
            if r.is_ok() && left.is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .context("DROP DATABASE")?;
        Ok(())
    }
}
