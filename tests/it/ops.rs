//! Issue 11: the operator commands (`check`, `status`, `slot create|drop|advance`,
//! `publication sync`, `health`) against the real services. Each FAIL of
//! `check` that this machine can produce is produced here (wal_level on
//! PostgreSQL 17: `bad_setup::wal_level_replica_is_refused`).

use std::collections::HashSet;
use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;
use walcast_tests::kafka::create_topics_with;
use walcast_tests::net::free_port;
use walcast_tests::pg::TestDb;
use walcast_tests::process::{Walcast, WalcastConfig};
use walcast_tests::TestEnv;

use crate::common::*;

const OPERATOR_EXIT: i32 = 2;

/// What a one-shot walcast command did.
#[derive(Debug)]
pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    /// stdout and stderr, for assertion messages and searches.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
    /// stdout as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", self.text()))
    }
}

/// Runs `walcast ARGS…` with `cfg` written to `dir` (as `--config`) when given.
pub fn walcast(dir: &Path, cfg: Option<&WalcastConfig>, args: &[&str]) -> Result<Ran> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = Command::new(bin());
    cmd.args(args);
    if let Some(cfg) = cfg {
        let file = dir.join("ops.toml");
        std::fs::write(&file, &cfg.toml)?;
        cmd.arg("--config").arg(file);
    }
    let mut child = cmd
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let o = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let e = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            bail!("walcast {args:?} did not exit within 90s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let ran = Ran {
        code: status.code().unwrap_or(-1),
        stdout: o.join().unwrap(),
        stderr: e.join().unwrap(),
    };
    eprintln!("walcast {args:?} -> {}\n{}", ran.code, ran.text());
    Ok(ran)
}

/// The checks of a `check --json` answer with this name.
fn checks<'a>(v: &'a Value, name: &str) -> Vec<&'a Value> {
    v["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["name"] == name)
        .collect()
}

/// Asserts that `check --json` failed (exit 2) with a FAIL named `name`
/// whose detail contains `detail` and whose fix contains `fix`.
fn assert_fails(ran: &Ran, name: &str, detail: &str, fix: &str) {
    assert_eq!(ran.code, OPERATOR_EXIT, "{}", ran.text());
    let v = ran.json();
    assert_eq!(v["ok"], false, "{}", ran.stdout);
    let found = checks(&v, name).into_iter().any(|c| {
        c["status"] == "fail"
            && c["detail"].as_str().unwrap_or("").contains(detail)
            && c["fix"].as_str().unwrap_or("").contains(fix)
    });
    assert!(
        found,
        "no FAIL {name} with {detail:?} / fix {fix:?} in:\n{}",
        ran.stdout
    );
}

async fn slot_row(env: &TestEnv, db: &TestDb) -> Result<Option<(bool, Option<i32>, i64)>> {
    let c = db.admin(env).await?;
    Ok(c.query_opt(
        "SELECT active, active_pid, (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $1",
        &[&db.slot],
    )
    .await?
    .map(|r| (r.get(0), r.get(1), r.get(2))))
}

fn lsn_value(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').expect("an LSN");
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_a_good_setup_and_names_the_risks() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let dir = tempfile::tempdir()?;
    let db = TestDb::create(env, "chkok").await?;
    let _reader = reader(env, &db).await?; // the two outbox topics, 3 partitions, RF 1
    let cfg = WalcastConfig::for_db(env, &db, dir.path());

    let ran = walcast(dir.path(), Some(&cfg), &["check", "--json"])?;
    assert_eq!(ran.code, 0, "{}", ran.text());
    let v = ran.json();
    assert_eq!(v["ok"], true);
    assert_eq!(v["failed"], 0);
    for name in [
        "postgres.connect",
        "postgres.wal_level",
        "postgres.role",
        "postgres.replication_slots",
        "postgres.wal_senders",
        "postgres.tables",
        "postgres.ownership",
        "postgres.publication",
        "postgres.slot",
        "kafka.producer",
        "kafka.connect",
    ] {
        let c = checks(&v, name);
        assert_eq!(c.len(), 1, "{name} in {}", ran.stdout);
        assert_eq!(c[0]["status"], "ok", "{name}: {}", c[0]);
    }
    let producer = checks(&v, "kafka.producer")[0]["detail"].as_str().unwrap();
    for enforced in [
        "enable.idempotence=true",
        "acks=all",
        "enable.gapless.guarantee=true",
        "message.timeout.ms=0",
        "partitioner=murmur2_random",
    ] {
        assert!(producer.contains(enforced), "{producer}");
    }
    // The dev cluster's single broker: replication factor 1 is a warning.
    for topic in topics(&db) {
        let d = checks(&v, &format!("kafka.topic[{topic}].durability"));
        assert_eq!(d.len(), 1, "{topic} in {}", ran.stdout);
        assert_eq!(d[0]["status"], "warn", "{}", d[0]);
        assert!(d[0]["detail"]
            .as_str()
            .unwrap()
            .contains("3 partitions, replication factor 1"));
        let m = checks(&v, &format!("kafka.topic[{topic}].max_message_bytes"));
        assert_eq!(m[0]["status"], "ok", "{}", m[0]);
    }
    // The dev server keeps WAL without limit: named, with the fix.
    let keep = checks(&v, "postgres.max_slot_wal_keep_size")[0];
    assert_eq!(keep["status"], "warn", "{keep}");
    assert!(keep["fix"]
        .as_str()
        .unwrap()
        .contains("ALTER SYSTEM SET max_slot_wal_keep_size"));

    // The table: one line per check, the summary at the end.
    let ran = walcast(dir.path(), Some(&cfg), &["check"])?;
    assert_eq!(ran.code, 0, "{}", ran.text());
    assert!(ran.stdout.starts_with("STATUS CHECK"), "{}", ran.stdout);
    assert!(ran.stdout.contains("\nOK     postgres.publication"));
    assert!(ran
        .stdout
        .contains("\nWARN   postgres.max_slot_wal_keep_size"));
    assert!(ran.stdout.trim_end().ends_with(" ok"), "{}", ran.stdout);
    db.drop(env).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_each_postgres_misconfiguration_with_its_fix() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let dir = tempfile::tempdir()?;
    let db = TestDb::create(env, "chkpg").await?;
    let admin = db.admin(env).await?;
    let base = WalcastConfig::for_db(env, &db, dir.path());
    let check = |cfg: &WalcastConfig| walcast(dir.path(), Some(cfg), &["check", "--json"]);

    // No publication (and walcast may not create it).
    let ran = check(&base.clone().set("postgres", "publication", "\"p_missing\""))?;
    assert_fails(
        &ran,
        "postgres.publication",
        "publication p_missing does not exist",
        "CREATE PUBLICATION \"p_missing\" FOR TABLE \"public\".\"outbox\" WITH (publish = 'insert', publish_via_partition_root = true)",
    );

    // An outbox table that does not exist.
    let ran = check(&base.clone().set("outbox", "tables", "[\"public.nope\"]"))?;
    assert_fails(
        &ran,
        "postgres.tables",
        "outbox table public.nope does not exist",
        "outbox.tables",
    );

    // A publication with a table that is not an outbox.
    admin
        .batch_execute(&format!(
            "CREATE TABLE business (id bigserial PRIMARY KEY, note text); ALTER PUBLICATION {} ADD TABLE business",
            db.publication
        ))
        .await?;
    let ran = check(&base)?;
    assert_fails(
        &ran,
        "postgres.publication",
        "also publishes public.business, which is not in outbox.tables",
        "DROP TABLE \"public\".\"business\"",
    );
    admin
        .batch_execute(&format!(
            "ALTER PUBLICATION {} DROP TABLE business",
            db.publication
        ))
        .await?;

    // A partitioned outbox published under its partitions' names.
    admin
        .batch_execute(&format!(
            "CREATE TABLE pout (LIKE outbox) PARTITION BY HASH (aggregateid);
             CREATE TABLE pout_0 PARTITION OF pout FOR VALUES WITH (MODULUS 2, REMAINDER 0);
             CREATE TABLE pout_1 PARTITION OF pout FOR VALUES WITH (MODULUS 2, REMAINDER 1);
             CREATE PUBLICATION {}_part FOR TABLE pout WITH (publish = 'insert')",
            db.publication
        ))
        .await?;
    let ran = check(
        &base
            .clone()
            .set("outbox", "tables", "[\"public.pout\"]")
            .set(
                "postgres",
                "publication",
                &format!("\"{}_part\"", db.publication),
            ),
    )?;
    assert_fails(
        &ran,
        "postgres.publication",
        "publishes the partitioned outbox table(s) public.pout under their partitions' names (publish_via_partition_root = false)",
        "SET (publish_via_partition_root = true)",
    );

    // A role without REPLICATION.
    let role = format!("norepl_{}", &db.slot[2..]);
    admin
        .batch_execute(&format!("CREATE ROLE {role} LOGIN PASSWORD 'pw'"))
        .await?;
    let ran = check(
        &base
            .clone()
            .set("postgres", "user", &format!("\"{role}\""))
            .set("postgres", "password", "\"pw\""),
    )?;
    assert_fails(
        &ran,
        "postgres.role",
        "must be superuser or replication role",
        &format!("ALTER ROLE {role} REPLICATION"),
    );
    admin.batch_execute(&format!("DROP ROLE {role}")).await?;

    // A slot of that name that is not walcast's kind.
    admin
        .execute(
            "SELECT pg_create_physical_replication_slot($1)",
            &[&db.slot],
        )
        .await?;
    let ran = check(&base)?;
    assert_fails(
        &ran,
        "postgres.slot",
        "is a physical slot with plugin none",
        "choose another postgres.slot name",
    );
    admin
        .execute("SELECT pg_drop_replication_slot($1)", &[&db.slot])
        .await?;

    // A slot walcast confirmed positions on, dropped since: the gap.
    let ran = walcast(dir.path(), Some(&base), &["slot", "create"])?;
    assert_eq!(ran.code, 0, "{}", ran.text());
    admin
        .execute("SELECT pg_drop_replication_slot($1)", &[&db.slot])
        .await?;
    let ran = check(&base)?;
    assert_fails(
        &ran,
        "postgres.slot",
        "no longer exists after walcast confirmed positions on it",
        "walcast slot accept-gap",
    );
    // The table shows the failure and its fix, and says how many failed.
    let ran = walcast(dir.path(), Some(&base), &["check"])?;
    assert_eq!(ran.code, OPERATOR_EXIT);
    assert!(
        ran.stdout.contains("\nFAIL   postgres.slot"),
        "{}",
        ran.stdout
    );
    assert!(ran
        .stdout
        .contains("fix: walcast will not silently start over"));
    assert!(ran.stdout.contains("\n1 failed"), "{}", ran.stdout);
    drop(admin);
    db.drop(env).await?;
    Ok(())
}

/// A new user's schema: quoted mixed-case names (`"Sales"."Outbox"` with
/// `"Id"`, `"AggregateId"`, …). `check` names every column the defaults miss
/// at once and the exact settings for the differently cased ones, without a
/// misleading publication failure (the publication has no column list);
/// with those settings the events arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_case_outbox_is_checked_and_relayed() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let dir = tempfile::tempdir()?;
    let db = TestDb::create(env, "mixedcase").await?;
    let admin = db.admin(env).await?;
    admin
        .batch_execute(&format!(
            "CREATE SCHEMA \"Sales\"; \
             CREATE TABLE \"Sales\".\"Outbox\" (\"Id\" uuid PRIMARY KEY DEFAULT gen_random_uuid(), \"AggregateType\" text NOT NULL, \
               \"AggregateId\" text NOT NULL, \"EventType\" text NOT NULL, \"Payload\" jsonb NOT NULL); \
             GRANT USAGE ON SCHEMA \"Sales\" TO {user}; GRANT SELECT ON ALL TABLES IN SCHEMA \"Sales\" TO {user}; \
             ALTER PUBLICATION {publication} SET TABLE \"Sales\".\"Outbox\"",
            user = env.repl_user,
            publication = db.publication
        ))
        .await?;
    let base =
        WalcastConfig::for_db(env, &db, dir.path()).set("outbox", "tables", "[\"Sales.Outbox\"]");
    let ran = walcast(dir.path(), Some(&base), &["check", "--json"])?;
    assert_fails(
        &ran,
        "postgres.tables",
        "outbox table Sales.Outbox has no column \"id\" (named by outbox.columns.id), \"aggregateid\" (named by outbox.columns.aggregateid)",
        "set outbox.columns.id = \"Id\", outbox.columns.aggregateid = \"AggregateId\"",
    );
    let v = ran.json();
    assert!(
        checks(&v, "postgres.publication")
            .iter()
            .all(|c| c["status"] != "fail"),
        "the publication has no column list:\n{}",
        ran.stdout
    );
    let cfg = base
        .set("outbox.columns", "id", "\"Id\"")
        .set("outbox.columns", "aggregatetype", "\"AggregateType\"")
        .set("outbox.columns", "aggregateid", "\"AggregateId\"")
        .set("outbox.columns", "type", "\"EventType\"")
        .set("outbox.columns", "payload", "\"Payload\"");
    let ran = walcast(dir.path(), Some(&cfg), &["check", "--json"])?;
    assert_eq!(ran.json()["failed"], 0, "{}", ran.stdout);
    // Created first: a reader of a topic that does not exist yet fails.
    let topic = format!("{}.Order", db.topic_prefix);
    walcast_tests::kafka::create_topics(&env.kafka_bootstrap, &[topic.as_str()], 1).await?;
    let mut w = Walcast::start(&bin(), dir.path(), &cfg)?;
    w.wait_streaming()?;
    let ids: Vec<String> = admin
        .query(
            "INSERT INTO \"Sales\".\"Outbox\" (\"AggregateType\", \"AggregateId\", \"EventType\", \"Payload\") \
             VALUES ('Order', 'o-1', 'Created', '{\"n\": 1}'), ('Order', 'o-1', 'Paid', '{\"n\": 2}') RETURNING \"Id\"::text",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut reader =
        walcast_tests::kafka::TopicReader::new(&env.kafka_bootstrap, &[topic.as_str()])?;
    let want: HashSet<String> = ids.iter().cloned().collect();
    assert!(
        wait_ids(&mut reader, &want, Duration::from_secs(60))?,
        "the events did not arrive:\n{}",
        w.log_text()
    );
    let got: Vec<(String, String, Option<String>)> = reader
        .records
        .iter()
        .map(|r| {
            (
                r.header("id").unwrap_or_default(),
                r.key_str(),
                r.header("type"),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                ids[0].clone(),
                "o-1".to_string(),
                Some("Created".to_string())
            ),
            (ids[1].clone(), "o-1".to_string(), Some("Paid".to_string()))
        ]
    );
    w.terminate()?;
    w.wait_exit(Duration::from_secs(30))?;
    db.drop(env).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_each_kafka_misconfiguration_with_its_fix() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let dir = tempfile::tempdir()?;
    let db = TestDb::create(env, "chkkafka").await?;
    let base = WalcastConfig::for_db(env, &db, dir.path());
    let t = topics(&db);
    // One topic that cannot take an acks=all write, one whose record limit
    // is below the producer's.
    create_topics_with(
        &env.kafka_bootstrap,
        &t[..1],
        3,
        1,
        &[("min.insync.replicas", "2")],
    )
    .await?;
    create_topics_with(
        &env.kafka_bootstrap,
        &t[1..],
        3,
        1,
        &[
            ("max.message.bytes", "500000"),
            ("message.timestamp.before.max.ms", "86400000"),
        ],
    )
    .await?;
    let ran = walcast(dir.path(), Some(&base), &["check", "--json"])?;
    // A bound on old records: a backlog older than a day would be refused.
    let v = ran.json();
    let window = checks(&v, &format!("kafka.topic[{}].timestamps", t[1]));
    assert!(
        window.iter().any(|c| c["status"] == "warn"
            && c["detail"]
                .as_str()
                .unwrap_or("")
                .contains("more than 1 day old")
            && c["fix"]
                .as_str()
                .unwrap_or("")
                .contains("message.timestamp.type=LogAppendTime")),
        "no timestamp warning for {}:\n{}",
        t[1],
        ran.stdout
    );
    let window = checks(&v, &format!("kafka.topic[{}].timestamps", t[0]));
    assert!(
        window.iter().any(|c| c["status"] == "ok"
            && c["detail"]
                .as_str()
                .unwrap_or("")
                .contains("records of any age")),
        "Kafka's defaults are fine for {}:\n{}",
        t[0],
        ran.stdout
    );
    assert_fails(
        &ran,
        &format!("kafka.topic[{}].durability", t[0]),
        "replication factor 1), min.insync.replicas = 2: more in-sync replicas required than exist",
        &format!("--entity-name {} --add-config min.insync.replicas=1", t[0]),
    );
    assert_fails(
        &ran,
        &format!("kafka.topic[{}].max_message_bytes", t[1]),
        "at most 500000 bytes (max.message.bytes), less than walcast's producer limit of 1000000",
        &format!(
            "--entity-name {} --add-config max.message.bytes=1000000",
            t[1]
        ),
    );
    // Exactly those two failed: the Postgres side is fine.
    assert_eq!(ran.json()["failed"], 2, "{}", ran.stdout);

    // Kafka unreachable.
    let ran = walcast(
        dir.path(),
        Some(
            &base
                .clone()
                .set("kafka", "bootstrap_servers", "\"127.0.0.1:1\""),
        ),
        &["check", "--json", "--kafka-timeout-ms", "3000"],
    )?;
    assert_fails(
        &ran,
        "kafka.connect",
        "cannot reach Kafka at 127.0.0.1:1 within 3s",
        "kafka.bootstrap_servers",
    );
    assert_eq!(
        checks(&ran.json(), "postgres.connect")[0]["status"],
        "ok",
        "Postgres is still checked"
    );

    // A producer configuration librdkafka rejects.
    let ran = walcast(
        dir.path(),
        Some(
            &base
                .clone()
                .set("kafka.properties", "\"no.such.property\"", "\"1\""),
        ),
        &["check", "--json"],
    )?;
    assert_fails(
        &ran,
        "kafka.producer",
        "the Kafka producer configuration was rejected",
        "kafka.properties",
    );
    db.drop(env).await?;
    Ok(())
}

/// Whether the cluster has `topic` (from the metadata of all topics: asking
/// for the one topic could have the brokers create it).
fn topic_exists(env: &TestEnv, topic: &str) -> Result<bool> {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.kafka_bootstrap)
        .create()?;
    let md = c.fetch_metadata(None, Duration::from_secs(10))?;
    Ok(md.topics().iter().any(|t| t.name() == topic))
}

/// `walcast check` checks every dead-letter topic in use (the pipeline's and
/// each route's) as walcast's start treats it: a missing one must be
/// creatable (asked of the brokers, nothing created), an existing one must
/// not be compacted, and gets the outbox topics' durability and record
/// limit checks; each check names the option that sets the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_checks_each_dead_letter_topic() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let dir = tempfile::tempdir()?;
    let db = TestDb::create(env, "chkdlq").await?;
    let admin = db.admin(env).await?;
    admin
        .batch_execute(&format!(
            "CREATE TABLE orders_outbox (LIKE outbox INCLUDING ALL); ALTER PUBLICATION {} ADD TABLE orders_outbox",
            db.publication
        ))
        .await?;
    let p = &db.topic_prefix;
    let missing = format!("{p}-dead-letters");
    let compacted = format!("{p}-orders-compacted");
    let good = format!("{p}-orders-dead-letters");
    create_topics_with(
        &env.kafka_bootstrap,
        &[compacted.as_str()],
        1,
        1,
        &[("cleanup.policy", "compact"), ("min.insync.replicas", "2")],
    )
    .await?;
    create_topics_with(&env.kafka_bootstrap, &[good.as_str()], 2, 1, &[]).await?;
    let cfg = |route_dlq: &str| {
        let mut c = WalcastConfig::for_db(env, &db, dir.path())
            .set("pipeline", "on_permanent_error", "\"dead-letter\"")
            .set("pipeline", "dead_letter_topic", &format!("\"{missing}\""));
        c.toml.push_str(&format!(
            "\n[[outbox.route]]\ntable = \"public.orders_outbox\"\nroute_topic_replacement = \"{p}.orders\"\ndead_letter_topic = \"{route_dlq}\"\n"
        ));
        c
    };

    let ran = walcast(dir.path(), Some(&cfg(&compacted)), &["check", "--json"])?;
    let v = ran.json();
    let one = |name: &str| -> Value {
        let found = checks(&v, name);
        assert_eq!(found.len(), 1, "{name} in:\n{}", ran.stdout);
        found[0].clone()
    };
    // Missing: walcast's principal may create it; check creates nothing.
    let c = one(&format!("kafka.dead_letter_topic[{missing}]"));
    assert_eq!(c["status"], "ok", "{c}");
    let detail = c["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(
            "(pipeline.dead_letter_topic) does not exist yet; walcast creates it at start"
        ),
        "{detail}"
    );
    assert!(
        !topic_exists(env, &missing)?,
        "walcast check created {missing}"
    );
    // Compacted, and min.insync.replicas above its replicas.
    assert_fails(
        &ran,
        &format!("kafka.dead_letter_topic[{compacted}]"),
        &format!("dead-letter topic {compacted} (outbox.route[public.orders_outbox].dead_letter_topic) has cleanup.policy = \"compact\""),
        &format!("--entity-name {compacted} --add-config cleanup.policy=delete"),
    );
    assert_fails(
        &ran,
        &format!("kafka.dead_letter_topic[{compacted}].durability"),
        "min.insync.replicas = 2: more in-sync replicas required than exist",
        &format!("--entity-name {compacted} --add-config min.insync.replicas=1"),
    );

    // A good one: exists, not compacted, the brokers' record limit.
    let ran = walcast(dir.path(), Some(&cfg(&good)), &["check", "--json"])?;
    let v = ran.json();
    let found = checks(&v, &format!("kafka.dead_letter_topic[{good}]"));
    assert!(
        found.len() == 1 && found[0]["status"] == "ok",
        "{}",
        ran.stdout
    );
    let detail = found[0]["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("(outbox.route[public.orders_outbox].dead_letter_topic) exists (2 partitions, cleanup.policy = delete)"),
        "{detail}"
    );
    let limit = checks(
        &v,
        &format!("kafka.dead_letter_topic[{good}].max_message_bytes"),
    );
    assert!(
        limit.len() == 1 && limit[0]["status"] == "ok",
        "{}",
        ran.stdout
    );
    assert_eq!(
        checks(&v, &format!("kafka.dead_letter_topic[{good}].durability")).len(),
        1,
        "{}",
        ran.stdout
    );
    assert!(
        v["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .all(|c| c["name"] != format!("kafka.dead_letter_topic[{compacted}]")),
        "a topic no longer configured is not checked"
    );
    drop(admin);
    db.drop(env).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_slot_and_the_relays_view() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let dir = tempfile::tempdir()?;
    let db = TestDb::create(env, "status").await?;
    let mut reader = reader(env, &db).await?;
    let cfg = WalcastConfig::for_db(env, &db, &dir.path().join("state"));
    let mut w = Walcast::start(&bin(), &dir.path().join("run"), &cfg)?;
    w.wait_streaming()?;
    let mut client = db.admin(env).await?;
    let mut writer = Writer::new(&client).await?;
    let mut rng = rng("status");
    writer.txn(&mut client, &mut rng, 20, 5, false).await?;
    assert!(wait_all(&mut reader, &writer, Duration::from_secs(60))?);

    // Running: held by walcast's walsender.
    let (_, pid, _) = slot_row(env, &db).await?.expect("slot");
    let ran = walcast(dir.path(), Some(&cfg), &["status", "--json"])?;
    assert_eq!(ran.code, 0, "{}", ran.text());
    let v = ran.json();
    assert_eq!(v["slot"]["active"], true, "{v}");
    assert_eq!(v["slot"]["active_pid"].as_i64(), pid.map(i64::from));
    assert_eq!(v["slot"]["plugin"], "pgoutput");
    assert_eq!(v["slot"]["wal_status"], "reserved");
    assert_eq!(v["relay"]["configured"], false);

    // Stopped, with events written since: they are the lag.
    w.terminate()?;
    assert!(w.wait_exit(Duration::from_secs(30))?.success());
    writer.txn(&mut client, &mut rng, 30, 5, false).await?;
    let (active, _, confirmed) = slot_row(env, &db).await?.expect("slot");
    assert!(!active);
    let ran = walcast(dir.path(), Some(&cfg), &["status", "--json"])?;
    let after = current_wal_lsn(&client).await?;
    let v = ran.json();
    assert_eq!(v["slot"]["active"], false, "{v}");
    assert!(v["slot"]["active_pid"].is_null());
    let status_confirmed = lsn_value(v["slot"]["confirmed_flush_lsn"].as_str().unwrap());
    assert_eq!(status_confirmed, confirmed as u64, "{v}");
    let lag = v["slot"]["lag_bytes"].as_i64().expect("lag_bytes");
    let server = lsn_value(v["server_lsn"].as_str().unwrap());
    assert!(
        lag > 0,
        "30 events were written after the last confirmation: {v}"
    );
    assert_eq!(lag as u64, server - status_confirmed, "{v}");
    assert!(server <= after);
    assert!(lsn_value(v["slot"]["restart_lsn"].as_str().unwrap()) <= status_confirmed);
    assert!(v["record"]["confirmed_lsn"].is_string(), "{v}");

    // The table says the same, and that there is no relay view.
    let ran = walcast(dir.path(), Some(&cfg), &["status"])?;
    assert_eq!(ran.code, 0);
    for needle in [
        "inactive (no walcast reading it)",
        "wal_status          reserved",
        "\n  lag                 ",
        "Relay: not configured (no [metrics] listen)",
    ] {
        assert!(
            ran.stdout.contains(needle),
            "{needle:?} in:\n{}",
            ran.stdout
        );
    }

    // A configured endpoint nobody serves: said so, Postgres view still shown.
    let port = free_port()?;
    let with_metrics = cfg
        .clone()
        .set("metrics", "listen", &format!("\"127.0.0.1:{port}\""));
    let ran = walcast(dir.path(), Some(&with_metrics), &["status", "--json"])?;
    let v = ran.json();
    assert_eq!(v["relay"]["reachable"], false, "{v}");
    assert_eq!(v["slot"]["active"], false);
    let ran = walcast(dir.path(), Some(&with_metrics), &["status"])?;
    assert!(
        ran.stdout.contains(&format!(
            "Relay: http://127.0.0.1:{port}/metrics not reachable"
        )),
        "{}",
        ran.stdout
    );

    // The relay's view, read from an endpoint serving the contract's names
    // (docs/metrics.md) for this pipeline and another.
    let body = format!(
        "# TYPE walcast_lsn gauge\n\
         walcast_lsn{{pipeline=\"{s}\",position=\"server_wal_end\"}} 4294967552\n\
         walcast_lsn{{pipeline=\"{s}\",position=\"confirmed\"}} 4294967296\n\
         walcast_lsn{{pipeline=\"other\",position=\"confirmed\"}} 7\n\
         walcast_replication_lag_bytes{{pipeline=\"{s}\"}} 256\n\
         walcast_in_flight_events{{pipeline=\"{s}\"}} 4\n\
         walcast_ready{{pipeline=\"{s}\"}} 0\n",
        s = db.slot
    );
    let (port, server) = serve(vec![(200, body.clone()), (200, body)])?;
    let with_metrics = cfg
        .clone()
        .set("metrics", "listen", &format!("\"127.0.0.1:{port}\""));
    let v = walcast(dir.path(), Some(&with_metrics), &["status", "--json"])?.json();
    assert_eq!(v["relay"]["reachable"], true, "{v}");
    assert_eq!(v["relay"]["lsn"]["confirmed"], "1/0");
    assert_eq!(v["relay"]["lsn"]["server_wal_end"], "1/100");
    assert_eq!(v["relay"]["replication_lag_bytes"], 256.0);
    assert_eq!(v["relay"]["in_flight_events"], 4.0);
    assert_eq!(v["relay"]["ready"], false);
    let ran = walcast(dir.path(), Some(&with_metrics), &["status"])?;
    assert!(
        ran.stdout.contains("lsn confirmed       1/0"),
        "{}",
        ran.stdout
    );
    assert!(
        ran.stdout.contains("ready               no"),
        "{}",
        ran.stdout
    );
    server.join().unwrap();

    drop(client);
    db.drop(env).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_commands_create_advance_and_drop() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let dir = tempfile::tempdir()?;
    let db = TestDb::create(env, "slotcmd").await?;
    let state = dir.path().join("state");
    let cfg = WalcastConfig::for_db(env, &db, &state);
    let mut reader = reader(env, &db).await?;

    // create: the slot, and walcast's record of it.
    let ran = walcast(dir.path(), Some(&cfg), &["slot", "create"])?;
    assert_eq!(ran.code, 0, "{}", ran.text());
    assert!(ran.stdout.contains("created replication slot"));
    let (_, _, created_at) = slot_row(env, &db).await?.expect("the slot exists");
    assert_eq!(
        std::fs::read_dir(&state).map(|d| d.count()).unwrap_or(0),
        1,
        "walcast's record of the new slot"
    );
    let ran = walcast(dir.path(), Some(&cfg), &["slot", "create"])?;
    assert_eq!(ran.code, 0);
    assert!(ran.stdout.contains("already exists (nothing done)"));

    // Events written while no walcast runs, then skipped on purpose.
    let mut client = db.admin(env).await?;
    let mut skipped = Writer::new(&client).await?;
    let mut rng = rng("slotcmd");
    skipped.txn(&mut client, &mut rng, 10, 5, false).await?;
    let written_up_to = current_wal_lsn(&client).await?;
    let ran = walcast(
        dir.path(),
        Some(&cfg),
        &["slot", "advance", "--to", "current"],
    )?;
    assert_eq!(ran.code, 1, "without --yes nothing is done: {}", ran.text());
    assert!(ran.stdout.contains("Would advance"), "{}", ran.stdout);
    assert!(ran.stdout.contains("is never relayed"), "{}", ran.stdout);
    assert!(ran.stdout.contains("--yes"));
    assert_eq!(slot_row(env, &db).await?.unwrap().2, created_at);
    let ran = walcast(
        dir.path(),
        Some(&cfg),
        &["slot", "advance", "--to", "0/10", "--yes"],
    )?;
    assert_eq!(ran.code, OPERATOR_EXIT, "{}", ran.text());
    assert!(ran.text().contains("cannot move back"));
    let ran = walcast(
        dir.path(),
        Some(&cfg),
        &["slot", "advance", "--to", "current", "--yes"],
    )?;
    assert_eq!(ran.code, 0, "{}", ran.text());
    let advanced = slot_row(env, &db).await?.unwrap().2 as u64;
    assert!(advanced >= written_up_to, "{advanced} < {written_up_to}");

    // walcast relays what comes after, and never the skipped events.
    let mut w = Walcast::start(&bin(), &dir.path().join("run"), &cfg)?;
    w.wait_streaming()?;
    let mut after = Writer::new(&client).await?;
    after.txn(&mut client, &mut rng, 10, 5, false).await?;
    assert!(wait_all(&mut reader, &after, Duration::from_secs(60))?);
    reader.read_to_end(Duration::from_secs(3))?;
    let seen = distinct_ids(&reader.records);
    let skipped_ids: HashSet<String> = skipped
        .txns
        .iter()
        .flat_map(|t| t.events.iter().map(|e| e.id.clone()))
        .collect();
    assert!(seen.is_disjoint(&skipped_ids), "advanced over, yet relayed");

    // A held slot is neither advanced nor dropped.
    let ran = walcast(dir.path(), Some(&cfg), &["slot", "drop", "--yes"])?;
    assert_eq!(ran.code, OPERATOR_EXIT, "{}", ran.text());
    assert!(ran.text().contains("is in use by a connection"));
    w.terminate()?;
    assert!(w.wait_exit(Duration::from_secs(30))?.success());

    // drop: says what is lost and what the next run does; --yes does it.
    let ran = walcast(dir.path(), Some(&cfg), &["slot", "drop"])?;
    assert_eq!(ran.code, 1, "{}", ran.text());
    assert!(ran.stdout.contains("Would drop replication slot"));
    assert!(ran.stdout.contains("walcast slot accept-gap"));
    assert!(
        slot_row(env, &db).await?.is_some(),
        "not dropped without --yes"
    );
    let ran = walcast(dir.path(), Some(&cfg), &["slot", "drop", "--yes"])?;
    assert_eq!(ran.code, 0, "{}", ran.text());
    assert!(slot_row(env, &db).await?.is_none());
    // The record stays: the next run refuses instead of starting over.
    let ran = walcast(dir.path(), Some(&cfg), &["run"])?;
    assert_eq!(ran.code, OPERATOR_EXIT, "{}", ran.text());
    assert!(ran.text().contains("no longer exists"));
    assert!(slot_row(env, &db).await?.is_none());
    drop(client);
    db.drop(env).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publication_sync_makes_the_publication_exactly_the_outbox() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let dir = tempfile::tempdir()?;
    let db = TestDb::create(env, "pubsync").await?;
    let admin = db.admin(env).await?;
    let base = WalcastConfig::for_db(env, &db, dir.path());
    // The tables' owner (the superuser here) runs it.
    let owner = base
        .clone()
        .set("postgres", "user", &format!("\"{}\"", env.admin_user))
        .set(
            "postgres",
            "password",
            &format!("\"{}\"", env.admin_password),
        );
    let publication = |name: String| {
        let admin = &admin;
        async move {
            let row = admin
                .query_opt(
                    "SELECT pubinsert, pubupdate, pubviaroot, \
                       (SELECT array_agg(c.relname::text ORDER BY c.relname) FROM pg_publication_rel pr JOIN pg_class c ON c.oid = pr.prrelid WHERE pr.prpubid = p.oid) \
                     FROM pg_publication p WHERE pubname = $1",
                    &[&name],
                )
                .await?;
            anyhow::Ok(row.map(|r| {
                (
                    r.get::<_, bool>(0),
                    r.get::<_, bool>(1),
                    r.get::<_, bool>(2),
                    r.get::<_, Option<Vec<String>>>(3).unwrap_or_default(),
                )
            }))
        }
    };

    // Missing: created with exactly the outbox, inserts only, via the root.
    let fresh = format!("{}_new", db.publication);
    let cfg = owner
        .clone()
        .set("postgres", "publication", &format!("\"{fresh}\""));
    let ran = walcast(dir.path(), Some(&cfg), &["publication", "sync"])?;
    assert_eq!(ran.code, 0, "{}", ran.text());
    assert!(ran.stdout.contains("CREATE PUBLICATION"));
    assert_eq!(
        publication(fresh.clone()).await?,
        Some((true, false, true, vec!["outbox".to_string()]))
    );
    let ran = walcast(dir.path(), Some(&cfg), &["publication", "sync"])?;
    assert_eq!(ran.code, 0);
    assert!(ran.stdout.contains("nothing to do"), "{}", ran.stdout);

    // Existing, with another table and updates: removing needs --yes.
    admin
        .batch_execute(&format!(
            "CREATE TABLE business (id bigserial PRIMARY KEY, note text);
             ALTER PUBLICATION {p} ADD TABLE business;
             ALTER PUBLICATION {p} SET (publish = 'insert, update')",
            p = db.publication
        ))
        .await?;
    let ran = walcast(dir.path(), Some(&owner), &["publication", "sync"])?;
    assert_eq!(ran.code, 1, "{}", ran.text());
    assert!(ran.stdout.contains("Would run"), "{}", ran.stdout);
    assert!(ran.stdout.contains("Removes: table public.business"));
    assert!(ran.stdout.contains("Removes: publishing of update"));
    assert_eq!(
        publication(db.publication.clone()).await?,
        Some((
            true,
            true,
            false,
            vec!["business".to_string(), "outbox".to_string()]
        )),
        "nothing changed without --yes"
    );
    // walcast's own role does not own them: refused, with the SQL for the owner.
    let ran = walcast(dir.path(), Some(&base), &["publication", "sync", "--yes"])?;
    assert_eq!(ran.code, OPERATOR_EXIT, "{}", ran.text());
    assert!(ran.text().contains("must be owner"), "{}", ran.text());
    assert!(ran.text().contains("--print-sql"));
    let ran = walcast(
        dir.path(),
        Some(&base),
        &["publication", "sync", "--print-sql"],
    )?;
    assert_eq!(ran.code, 0);
    assert!(ran.stdout.contains("-- removes table public.business"));
    assert!(ran.stdout.contains(&format!(
        "ALTER PUBLICATION \"{}\" SET TABLE \"public\".\"outbox\";",
        db.publication
    )));

    let ran = walcast(dir.path(), Some(&owner), &["publication", "sync", "--yes"])?;
    assert_eq!(ran.code, 0, "{}", ran.text());
    assert_eq!(
        publication(db.publication.clone()).await?,
        Some((true, false, true, vec!["outbox".to_string()]))
    );
    let ran = walcast(dir.path(), Some(&base), &["check", "--json"])?;
    assert_eq!(
        checks(&ran.json(), "postgres.publication")[0]["status"],
        "ok",
        "{}",
        ran.stdout
    );
    drop(admin);
    db.drop(env).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_exits_by_the_endpoints_answer() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (port, server) = serve(vec![
        (200, "ready\n".into()),
        (503, "not ready: Kafka producer not connected\n".into()),
    ])?;
    let url = format!("http://127.0.0.1:{port}/readyz");
    let ran = walcast(dir.path(), None, &["health", "--url", &url])?;
    assert_eq!(ran.code, 0, "{}", ran.text());
    assert_eq!(ran.stdout.trim(), "200 ready");
    let ran = walcast(dir.path(), None, &["health", "--url", &url])?;
    assert_eq!(ran.code, 1, "{}", ran.text());
    assert_eq!(
        ran.stdout.trim(),
        "503 not ready: Kafka producer not connected"
    );
    server.join().unwrap();
    let ran = walcast(
        dir.path(),
        None,
        &[
            "health",
            "--url",
            &format!("http://127.0.0.1:{}/readyz", free_port()?),
        ],
    )?;
    assert_eq!(ran.code, 1, "{}", ran.text());
    assert!(ran.stdout.starts_with("unreachable:"), "{}", ran.stdout);
    Ok(())
}

/// Answers one HTTP request per `(status, body)` on a loopback port, in
/// order (chunked, as HTTP/1.1 servers often answer).
fn serve(answers: Vec<(u16, String)>) -> Result<(u16, std::thread::JoinHandle<()>)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding")?;
    let port = listener.local_addr()?.port();
    let handle = std::thread::spawn(move || {
        for (status, body) in answers {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut buf = [0u8; 4096];
            let mut req = Vec::new();
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = conn.read(&mut buf).expect("read");
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&buf[..n]);
            }
            let reason = if status == 200 {
                "OK"
            } else {
                "Service Unavailable"
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                body.len()
            );
        }
    });
    Ok((port, handle))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reads_the_running_relays_own_endpoint() -> Result<()> {
    // The relay view of `walcast status` against the real runtime's
    // /metrics (not a stand-in server): it must agree with Postgres.
    let env = TestEnv::get();
    let _g = env.shared().await;
    let dir = tempfile::tempdir()?;
    let db = TestDb::create(env, "statuslive").await?;
    let mut reader = reader(env, &db).await?;
    let port = free_port()?;
    let cfg = WalcastConfig::for_db(env, &db, &dir.path().join("state")).set(
        "metrics",
        "listen",
        &format!("\"127.0.0.1:{port}\""),
    );
    let mut w = Walcast::start(&bin(), &dir.path().join("run"), &cfg)?;
    w.wait_streaming()?;
    let mut client = db.admin(env).await?;
    let mut writer = Writer::new(&client).await?;
    let mut rng = rng("statuslive");
    writer.txn(&mut client, &mut rng, 20, 5, false).await?;
    assert!(wait_all(&mut reader, &writer, Duration::from_secs(60))?);
    let written_up_to = current_wal_lsn(&client).await?;

    // Once idle, the relay's confirmed position is the slot's, and both
    // are past every event written.
    let deadline = Instant::now() + Duration::from_secs(30);
    let v = loop {
        let ran = walcast(dir.path(), Some(&cfg), &["status", "--json"])?;
        assert_eq!(ran.code, 0, "{}", ran.text());
        let v = ran.json();
        let relay = v["relay"]["lsn"]["confirmed"].as_str().map(lsn_value);
        let slot = v["slot"]["confirmed_flush_lsn"].as_str().map(lsn_value);
        if relay.is_some() && relay == slot && relay >= Some(written_up_to) {
            break v;
        }
        if Instant::now() > deadline {
            bail!("the relay's view never matched the slot's past {written_up_to:#x}: {v}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(v["relay"]["reachable"], true, "{v}");
    assert_eq!(
        v["relay"]["url"],
        format!("http://127.0.0.1:{port}/metrics"),
        "{v}"
    );
    assert_eq!(v["relay"]["ready"], true, "{v}");
    assert_eq!(v["relay"]["in_flight_events"], 0.0, "{v}");
    assert_eq!(v["slot"]["active"], true, "{v}");
    let ran = walcast(dir.path(), Some(&cfg), &["status"])?;
    assert!(
        ran.stdout.contains("ready               yes"),
        "{}",
        ran.stdout
    );

    w.terminate()?;
    assert!(w.wait_exit(Duration::from_secs(30))?.success());
    drop(client);
    db.drop(env).await?;
    Ok(())
}
