//! Issue 14, parallel slots: several pipelines (`[[pipelines]]`) in one
//! process, each with its own slot and publication over its own tables.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{ensure, Result};
use walcast_tests::kafka::{create_topics, TopicReader};
use walcast_tests::net::{free_port, http_get};
use walcast_tests::pg::TestDb;
use walcast_tests::process::{Walcast, WalcastConfig};
use walcast_tests::TestEnv;

use crate::common::*;

const EXIT_OPERATOR: i32 = 2;
const EXIT_PERMANENT: i32 = 3;

/// The slot's `confirmed_flush_lsn`, as a number.
async fn confirmed(admin: &tokio_postgres::Client, slot: &str) -> Result<Option<u64>> {
    let row = admin
        .query_opt(
            "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row
        .and_then(|r| r.get::<_, Option<i64>>(0))
        .map(|v| v as u64))
}

/// The `publication sync --print-sql` of one pipeline, as the tables' owner
/// would pipe it into psql: its SQL, then run by `admin`.
async fn sync_publication_as_owner(
    admin: &tokio_postgres::Client,
    file_arg: &str,
    slot: &str,
) -> Result<String> {
    let (status, sql) = Walcast::run_to_exit(
        &bin(),
        &[
            "publication",
            "sync",
            "--config",
            file_arg,
            "--pipeline",
            slot,
            "--print-sql",
        ],
        Duration::from_secs(30),
    )?;
    ensure!(status.code() == Some(0), "publication sync: {sql}");
    let statements: String = sql.lines().filter(|l| !l.starts_with("--")).collect();
    admin.batch_execute(&statements).await?;
    Ok(sql)
}

/// Waits until every slot is confirmed at or past `end` (30 s).
async fn wait_slots_past(
    admin: &tokio_postgres::Client,
    slots: &[&str],
    end: u64,
    w: &Walcast,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for slot in slots {
        while confirmed(admin, slot).await?.unwrap_or(0) < end {
            ensure!(
                tokio::time::Instant::now() < deadline,
                "slot {slot} not confirmed past {end}\n{}",
                w.log_text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// The configuration without `postgres.slot` and `postgres.publication`
/// (they move into the `[[pipelines]]` entries).
fn without_slot_and_publication(toml: &str) -> impl Iterator<Item = &str> {
    toml.lines()
        .filter(|l| !l.starts_with("slot = ") && !l.starts_with("publication = "))
}

/// Two pipelines in one process: each table's events arrive exactly once and
/// in order, on the pipeline that owns it; table-less events only from the
/// pipeline with `messages = true`; both slots are confirmed past the last
/// commit; `/metrics` labels both; the operator commands ask which pipeline
/// to act on; a permanent error on one pipeline stops the whole process
/// (exit 3) without its slot passing the row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pipelines_relay_their_own_tables_on_their_own_slots() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let db = TestDb::create(env, "pipelines").await?;
    let admin = db.admin(env).await?;
    let p = db.topic_prefix.clone();
    let (slot_a, slot_b) = (format!("{}_a", db.slot), format!("{}_b", db.slot));
    let (pub_a, pub_b) = (
        format!("{}_a", db.publication),
        format!("{}_b", db.publication),
    );
    admin
        .batch_execute(&format!(
            "CREATE TABLE orders_outbox (id text PRIMARY KEY, aggregateid text, payload text); \
             CREATE PUBLICATION {pub_a} FOR TABLE public.outbox WITH (publish = 'insert'); \
             CREATE PUBLICATION {pub_b} FOR TABLE public.orders_outbox WITH (publish = 'insert');"
        ))
        .await?;
    let order_topic = format!("{p}.Order");
    let fixed_topic = format!("{p}.fixed");
    let msg_topic = format!("{p}.msg");
    let topics = [
        order_topic.as_str(),
        fixed_topic.as_str(),
        msg_topic.as_str(),
    ];
    create_topics(&env.kafka_bootstrap, &topics, 3).await?;
    let mut reader = TopicReader::new(&env.kafka_bootstrap, &topics)?;
    let state = tempfile::tempdir()?;
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let mut cfg = WalcastConfig::for_db(env, &db, state.path()).set(
        "metrics",
        "listen",
        &format!("\"{addr}\""),
    );
    // The slot and publication move into the [[pipelines]] entries.
    cfg.toml = without_slot_and_publication(&cfg.toml)
        .collect::<Vec<_>>()
        .join("\n");
    cfg.toml.push_str(&format!(
        r#"

[[outbox.route]]
table = "public.orders_outbox"
route_topic_replacement = "{fixed_topic}"

[[outbox.message_route]]
prefix = "walcast"
route_topic_replacement = "{msg_topic}"

[[pipelines]]
slot = "{slot_a}"
publication = "{pub_a}"
tables = ["public.outbox"]

[[pipelines]]
slot = "{slot_b}"
publication = "{pub_b}"
tables = ["public.orders_outbox"]
messages = true
"#
    ));
    let file = state.path().join("pipelines.toml");
    std::fs::write(&file, &cfg.toml)?;
    let file_arg = file.to_str().unwrap().to_string();
    // The single slot a switch to pipelines leaves behind: created by the
    // single-pipeline configuration, its record last written an hour ago.
    let single = WalcastConfig::for_db(env, &db, state.path());
    let ran = crate::ops::walcast(state.path(), Some(&single), &["slot", "create"])?;
    assert_eq!(ran.code, 0, "{}", ran.text());
    let record = state.path().join(format!("{}.{}.json", db.name, db.slot));
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&record)?)?;
    let an_hour_ago = v["updated_at_unix"].as_u64().unwrap_or_default() - 3600;
    v["updated_at_unix"] = an_hour_ago.into();
    std::fs::write(&record, serde_json::to_vec(&v)?)?;

    // A command that changes or checks one pipeline refuses to guess which.
    let (status, out) = Walcast::run_to_exit(
        &bin(),
        &["check", "--config", &file_arg],
        Duration::from_secs(30),
    )?;
    assert_eq!(status.code(), Some(EXIT_OPERATOR), "{out}");
    assert!(out.contains("--pipeline"), "{out}");

    let mut w = Walcast::start(&bin(), state.path(), &cfg)?;
    for slot in [&slot_a, &slot_b] {
        w.wait_for_log(
            &format!("streaming from the slot slot={slot} "),
            Duration::from_secs(60),
        )?;
    }
    // Once both stream, walcast names the slot left behind and the fix.
    w.wait_for_log(
        &format!("replication slot {} was walcast's", db.slot),
        Duration::from_secs(30),
    )?;
    assert!(
        !w.log_text()
            .contains(&format!("replication slot {slot_a} was walcast's")),
        "{}",
        w.log_text()
    );
    // Transactions writing to one table, to the other, and to both plus a
    // table-less event.
    let mut want_a: Vec<String> = Vec::new();
    let mut want_b: Vec<String> = Vec::new();
    let mut want_msg: Vec<String> = Vec::new();
    for t in 0..60 {
        let mut sql = String::from("BEGIN;");
        for e in 0..5 {
            let n = t * 5 + e;
            if t % 3 != 1 {
                let id = uuid::Uuid::new_v4().to_string();
                sql.push_str(&format!(
                    "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) VALUES ('{id}', 'Order', 'agg-{}', 'Created', '{{\"n\": {n}}}');",
                    n % 4
                ));
                want_a.push(id);
            }
            if t % 3 != 0 {
                let id = format!("b-{n}");
                sql.push_str(&format!(
                    "INSERT INTO orders_outbox VALUES ('{id}', 'agg-{}', 'n{n}');",
                    n % 4
                ));
                want_b.push(id);
            }
        }
        if t % 10 == 0 {
            let id = format!("m-{t}");
            sql.push_str(&format!(
                "SELECT pg_logical_emit_message(true, 'walcast', json_build_object('event_id', '{id}', 'aggregate_type', 'Order', 'aggregate_id', 'agg-m', 'event_type', 'Noted', 'payload', json_build_object('t', {t}))::text);"
            ));
            want_msg.push(id);
        }
        sql.push_str("COMMIT;");
        admin.batch_execute(&sql).await?;
    }
    let end = current_wal_lsn(&admin).await?;
    let total = want_a.len() + want_b.len() + want_msg.len();
    assert!(
        reader.read_at_least(total, Duration::from_secs(90))?,
        "{} of {total} records arrived:\n{}",
        reader.records.len(),
        w.log_text()
    );
    reader.read_to_end(Duration::from_secs(3))?;
    let ids = |topic: &str| -> Vec<String> {
        reader
            .records
            .iter()
            .filter(|r| r.topic == topic)
            .filter_map(|r| r.header("id"))
            .collect()
    };
    // Exactly once per table; the per-key order is the commit order.
    for (topic, want) in [
        (&order_topic, &want_a),
        (&fixed_topic, &want_b),
        (&msg_topic, &want_msg),
    ] {
        let got = ids(topic);
        let unique: HashSet<&String> = got.iter().collect();
        assert_eq!(got.len(), want.len(), "{topic}: {got:?}");
        assert_eq!(unique.len(), want.len(), "{topic}: duplicates in {got:?}");
        let mut by_key: HashMap<String, Vec<String>> = HashMap::new();
        for r in reader.records.iter().filter(|r| &r.topic == topic) {
            by_key
                .entry(r.key_str())
                .or_default()
                .push(r.header("id").unwrap_or_default());
        }
        for (key, got) in by_key {
            let expected: Vec<String> =
                want.iter().filter(|id| got.contains(id)).cloned().collect();
            assert_eq!(got, expected, "{topic} key {key}: out of commit order");
        }
    }
    // Both slots move past the last commit.
    wait_slots_past(&admin, &[&slot_a, &slot_b], end, &w).await?;
    // One /metrics page, each pipeline's series labelled.
    let (code, text) = http_get(&addr, "/metrics")?;
    assert_eq!(code, 200, "{text}");
    for (slot, topic, n) in [
        (&slot_a, &order_topic, want_a.len()),
        (&slot_b, &fixed_topic, want_b.len()),
    ] {
        let line =
            format!("walcast_events_produced_total{{pipeline=\"{slot}\",topic=\"{topic}\"}} {n}");
        assert!(text.contains(&line), "no {line:?} in:\n{text}");
    }
    let type_lines = text
        .lines()
        .filter(|l| l.starts_with("# TYPE walcast_lsn "))
        .count();
    assert_eq!(type_lines, 1, "one metric family per name:\n{text}");
    let (code, ready) = http_get(&addr, "/readyz")?;
    assert_eq!(code, 200, "{ready}");
    // An operator command on one pipeline.
    let (status, out) = Walcast::run_to_exit(
        &bin(),
        &[
            "status",
            "--config",
            &file_arg,
            "--pipeline",
            &slot_b,
            "--json",
        ],
        Duration::from_secs(30),
    )?;
    assert_eq!(status.code(), Some(0), "{out}");
    assert!(out.contains(&slot_b) && !out.contains(&slot_a), "{out}");
    // status without --pipeline reports on every pipeline.
    let ran = crate::ops::walcast(
        state.path(),
        None,
        &["status", "--config", &file_arg, "--json"],
    )?;
    let out = ran.text();
    assert_eq!(ran.code, 0, "{out}");
    let v = ran.json();
    let names: Vec<&str> = v["pipelines"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["slot_name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, [slot_a.as_str(), slot_b.as_str()], "{out}");
    for p in v["pipelines"].as_array().into_iter().flatten() {
        assert_eq!(p["slot"]["active"], true, "{out}");
        assert_eq!(p["relay"]["reachable"], true, "{out}");
    }

    // A row pipeline b can never publish (no key) stops walcast as a whole.
    let before_b = confirmed(&admin, &slot_b).await?.unwrap_or(0);
    admin
        .batch_execute("INSERT INTO orders_outbox VALUES ('b-null', NULL, 'x')")
        .await?;
    // At or after the end of the row's commit.
    let row_end = current_wal_lsn(&admin).await?;
    let exit = w.wait_exit(Duration::from_secs(60))?;
    assert_eq!(exit.code(), Some(EXIT_PERMANENT), "{}", w.log_text());
    let log = w.log_text();
    assert!(
        log.contains("stopping the other pipelines"),
        "the other pipeline was not stopped:\n{log}"
    );
    let after_b = confirmed(&admin, &slot_b).await?.unwrap_or(0);
    assert!(
        after_b < row_end && after_b >= before_b,
        "slot {slot_b} passed the row it could not publish: {after_b} (before {before_b}, row's commit ended by {row_end})"
    );
    assert!(
        !ids(&fixed_topic).contains(&"b-null".to_string()),
        "the unpublishable row reached Kafka"
    );
    // walcast has stopped: all three slots are inactive. `check` on one
    // pipeline names the slot left behind, not the configuration's own two.
    let ran = crate::ops::walcast(
        state.path(),
        None,
        &[
            "check",
            "--config",
            &file_arg,
            "--pipeline",
            &slot_a,
            "--json",
        ],
    )?;
    let out = ran.text();
    let v = ran.json();
    let flagged: Vec<&str> = v["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["status"] == "warn")
        .filter_map(|c| c["name"].as_str())
        .filter(|n| n.ends_with("(left behind)"))
        .collect();
    assert_eq!(
        flagged,
        [format!("slot {} (left behind)", db.slot)],
        "{out}"
    );
    walcast_tests::pg::drop_slots(&admin, &[&slot_a, &slot_b, &db.slot]).await
}

/// Issue 14: one hash-partitioned outbox table (in its own schema, with its
/// own column names and a uuid key) split by key hash over three pipelines.
/// Each pipeline's publication filters the rows to its share; every event
/// arrives exactly once, each key's events in commit order and all from the
/// one pipeline its hash names; a changed filter stops walcast, and a
/// publication without this pipeline's filter is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_split_by_key_hash_relays_each_key_on_one_pipeline() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    key_hash_split(env, env.pg_port).await
}

/// The same on PostgreSQL 17 (its row filters are deparsed by another
/// version of `pg_get_expr`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_split_by_key_hash_relays_each_key_on_one_pipeline_pg17() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    key_hash_split(env, env.pg17_port()).await
}

async fn key_hash_split(env: &TestEnv, port: u16) -> Result<()> {
    let db = TestDb::create_on(env, port, "keyhash", true).await?;
    let admin = db.admin(env).await?;
    let p = db.topic_prefix.clone();
    admin
        .batch_execute(
            "CREATE SCHEMA ledger; \
             CREATE TABLE ledger.entries (event_id uuid NOT NULL, account uuid NOT NULL, kind text, body jsonb, \
               PRIMARY KEY (event_id, account)) PARTITION BY HASH (account); \
             CREATE TABLE ledger.entries_0 PARTITION OF ledger.entries FOR VALUES WITH (MODULUS 4, REMAINDER 0); \
             CREATE TABLE ledger.entries_1 PARTITION OF ledger.entries FOR VALUES WITH (MODULUS 4, REMAINDER 1); \
             CREATE TABLE ledger.entries_2 PARTITION OF ledger.entries FOR VALUES WITH (MODULUS 4, REMAINDER 2); \
             CREATE TABLE ledger.entries_3 PARTITION OF ledger.entries FOR VALUES WITH (MODULUS 4, REMAINDER 3);",
        )
        .await?;
    let topic = format!("{p}.ledger");
    create_topics(&env.kafka_bootstrap, &[topic.as_str()], 3).await?;
    let mut reader = TopicReader::new(&env.kafka_bootstrap, &[topic.as_str()])?;
    let state = tempfile::tempdir()?;
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let mut cfg = WalcastConfig::for_db(env, &db, state.path())
        .set("metrics", "listen", &format!("\"{addr}\""))
        .set("postgres", "catalog_check_interval_ms", "500");
    cfg.toml = without_slot_and_publication(&cfg.toml)
        .map(|l| {
            if l.starts_with("tables = ") {
                "tables = []"
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let slots: Vec<String> = (0..3).map(|i| format!("{}_h{i}", db.slot)).collect();
    cfg.toml.push_str(&format!(
        r#"

[[outbox.route]]
table = "ledger.entries"
table_field_event_id = "event_id"
table_field_event_key = "account"
table_field_event_type = "kind"
table_field_event_payload = "body"
route_topic_replacement = "{topic}"
"#
    ));
    for (i, slot) in slots.iter().enumerate() {
        cfg.toml.push_str(&format!(
            "\n[[pipelines]]\nslot = \"{slot}\"\npublication = \"{slot}\"\ntables = [\"ledger.entries\"]\nhash_modulus = 3\nhash_remainder = {i}\n"
        ));
    }
    let file = state.path().join("keyhash.toml");
    std::fs::write(&file, &cfg.toml)?;
    let file_arg = file.to_str().unwrap().to_string();
    // The tables' owner runs the SQL walcast prints for each pipeline.
    for slot in &slots {
        let sql = sync_publication_as_owner(&admin, &file_arg, slot).await?;
        assert!(
            sql.contains("WHERE (((COALESCE(uuid_hash(\"account\"), 0) & 2147483647) % 3)"),
            "{sql}"
        );
    }
    check_names_the_share(&file_arg, &slots[1])?;

    let mut w = Walcast::start(&bin(), state.path(), &cfg)?;
    for slot in &slots {
        w.wait_for_log(
            &format!("streaming from the slot slot={slot} "),
            Duration::from_secs(60),
        )?;
    }
    let accounts: Vec<uuid::Uuid> = (0..24).map(|_| uuid::Uuid::new_v4()).collect();
    let mut want: Vec<String> = Vec::new();
    for t in 0..40 {
        let mut sql = String::from("BEGIN;");
        for e in 0..5 {
            let n = t * 5 + e;
            let id = uuid::Uuid::new_v4().to_string();
            sql.push_str(&format!(
                "INSERT INTO ledger.entries VALUES ('{id}', '{}', 'Posted', '{{\"n\": {n}}}');",
                accounts[(n * 7) % accounts.len()]
            ));
            want.push(id);
        }
        sql.push_str("COMMIT;");
        admin.batch_execute(&sql).await?;
    }
    let end = current_wal_lsn(&admin).await?;
    assert!(
        reader.read_at_least(want.len(), Duration::from_secs(90))?,
        "{} of {} records arrived:\n{}",
        reader.records.len(),
        want.len(),
        w.log_text()
    );
    reader.read_to_end(Duration::from_secs(3))?;
    let got: Vec<String> = reader
        .records
        .iter()
        .filter_map(|r| r.header("id"))
        .collect();
    let unique: HashSet<&String> = got.iter().collect();
    assert_eq!(got.len(), want.len(), "exactly once: {got:?}");
    assert_eq!(unique.len(), want.len(), "duplicates in {got:?}");
    let mut by_key: HashMap<String, Vec<String>> = HashMap::new();
    for r in &reader.records {
        by_key
            .entry(r.key_str())
            .or_default()
            .push(r.header("id").unwrap_or_default());
    }
    for (key, got) in &by_key {
        let expected: Vec<String> = want.iter().filter(|id| got.contains(id)).cloned().collect();
        assert_eq!(got, &expected, "key {key}: out of commit order");
    }
    // Each pipeline relayed exactly the events of its share of the keys.
    let mut per_share = [0usize; 3];
    for (key, ids) in &by_key {
        let row = admin
            .query_one(
                "SELECT (COALESCE(uuid_hash($1::text::uuid), 0) & 2147483647) % 3",
                &[key],
            )
            .await?;
        per_share[row.get::<_, i32>(0) as usize] += ids.len();
    }
    let (code, text) = http_get(&addr, "/metrics")?;
    assert_eq!(code, 200, "{text}");
    for (slot, n) in slots.iter().zip(per_share) {
        assert!(n > 0, "no key hashed to {slot}'s share: {per_share:?}");
        let line =
            format!("walcast_events_produced_total{{pipeline=\"{slot}\",topic=\"{topic}\"}} {n}");
        assert!(text.contains(&line), "no {line:?} in:\n{text}");
    }
    let slot_names: Vec<&str> = slots.iter().map(String::as_str).collect();
    wait_slots_past(&admin, &slot_names, end, &w).await?;

    // Someone drops pipeline 1's filter while it runs: its slot would relay
    // the other shares' rows (and another change could make it miss rows).
    admin
        .batch_execute(&format!(
            "ALTER PUBLICATION {} SET TABLE ledger.entries",
            slots[1]
        ))
        .await?;
    let exit = w.wait_exit(Duration::from_secs(60))?;
    let log = w.log_text();
    assert_eq!(exit.code(), Some(EXIT_OPERATOR), "{log}");
    assert!(
        log.contains(&format!(
            "the row filter of outbox table ledger.entries in publication {} changed",
            slots[1]
        )),
        "{log}"
    );
    // At start, that publication is refused until its filter is back.
    let (status, out) = Walcast::run_to_exit(
        &bin(),
        &["run", "--config", &file_arg],
        Duration::from_secs(60),
    )?;
    assert_eq!(status.code(), Some(EXIT_OPERATOR), "{out}");
    assert!(
        out.contains(&format!(
            "publication {} does not filter outbox table ledger.entries to this pipeline's share of the key hash (hash_modulus = 3, hash_remainder = 1)",
            slots[1]
        )),
        "{out}"
    );
    // `publication sync` puts it back.
    let sql = sync_publication_as_owner(&admin, &file_arg, &slots[1]).await?;
    let want = format!(
        "ALTER PUBLICATION \"{}\" SET TABLE \"ledger\".\"entries\" WHERE (((COALESCE(uuid_hash(\"account\"), 0) & 2147483647) % 3) = 1);",
        slots[1]
    );
    assert!(sql.contains(&want), "{sql}");
    check_names_the_share(&file_arg, &slots[1])?;
    walcast_tests::pg::drop_slots(&admin, &slots).await
}

/// `walcast check` of the key-hash test's second pipeline (of three) names
/// the rows it relays.
fn check_names_the_share(file_arg: &str, slot: &str) -> Result<()> {
    let (status, out) = Walcast::run_to_exit(
        &bin(),
        &["check", "--config", file_arg, "--pipeline", slot],
        Duration::from_secs(30),
    )?;
    assert!(
        out.contains("the rows whose key hashes to 1 modulo 3"),
        "{status:?} {out}"
    );
    Ok(())
}

/// A publication that filters walcast's rows (a row filter) or leaves out a
/// column walcast reads (a column list) is refused at start: the rows or
/// values it leaves out would never be relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_that_filters_rows_or_columns_is_refused() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let db = TestDb::create(env, "pubfilter").await?;
    let admin = db.admin(env).await?;
    let state = tempfile::tempdir()?;
    let cfg = WalcastConfig::for_db(env, &db, state.path());
    let publication = &db.publication;
    let cases = [
        (
            "WHERE (aggregatetype <> 'Internal')",
            format!("publication {publication} filters the rows of outbox table public.outbox (WHERE (aggregatetype <> 'Internal'::text)): the rows it leaves out would never be relayed"),
        ),
        (
            "(id, aggregatetype, aggregateid, type)",
            format!("publication {publication} publishes only some columns of outbox table public.outbox and leaves out payload, which walcast reads"),
        ),
    ];
    for (filter, expected) in cases {
        admin
            .batch_execute(&format!(
                "ALTER PUBLICATION {publication} SET TABLE public.outbox {filter}"
            ))
            .await?;
        let (code, out) = run_to_exit(state.path(), &cfg)?;
        assert_eq!(code, EXIT_OPERATOR, "{out}");
        assert!(out.contains(&expected), "{out}");
    }
    Ok(())
}
