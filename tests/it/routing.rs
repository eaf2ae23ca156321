//! Per-table routing (`[[outbox.route]]`, Debezium Outbox EventRouter
//! options) end to end: record shape, headers, the bad inputs that stop
//! walcast at the row, and the columns checked at start and on a Relation
//! change.

use std::time::Duration;

use anyhow::Result;
use tokio_postgres::Client;
use walcast_tests::kafka::{create_topics, Record, TopicReader};
use walcast_tests::pg::TestDb;
use walcast_tests::process::{Walcast, WalcastConfig};
use walcast_tests::TestEnv;

use crate::common::*;

const EXIT_OPERATOR: i32 = 2;
const EXIT_PERMANENT: i32 = 3;

/// A test database with extra outbox tables (`ddl`) added to its publication.
async fn db_with(env: &TestEnv, tag: &str, ddl: &str, tables: &[&str]) -> Result<(TestDb, Client)> {
    let db = TestDb::create(env, tag).await?;
    let admin = db.admin(env).await?;
    admin.batch_execute(ddl).await?;
    for t in tables {
        admin
            .batch_execute(&format!(
                "ALTER PUBLICATION {} ADD TABLE {t}",
                db.publication
            ))
            .await?;
    }
    Ok((db, admin))
}

/// `base` with TOML appended (routes are arrays of tables: they go last).
fn with_routes(base: &WalcastConfig, routes: &str) -> WalcastConfig {
    let mut c = base.clone();
    c.toml.push('\n');
    c.toml.push_str(routes);
    c
}

fn header(r: &Record, name: &str) -> Option<String> {
    r.header(name)
}

fn value_str(r: &Record) -> String {
    String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Several outbox tables, each with its own shape: column mapping, topic by
/// regex, fixed topic, header/envelope/partition placements, JSON expansion,
/// record timestamp from a column or the commit time, schema version, trace
/// and correlation headers, bytea payloads and tombstones; the `[outbox]`
/// default route keeps working beside them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_table_routes_shape_records_like_the_event_router() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let (db, admin) = db_with(
        env,
        "routes",
        "CREATE TABLE orders_outbox (event_id uuid PRIMARY KEY, agg_type text, agg_id text, kind text, body text, \
           created timestamptz, version int, part int, trace text, corr text); \
         CREATE TABLE fixed_outbox (id text PRIMARY KEY, aggregateid text, payload bytea);",
        &["public.orders_outbox", "public.fixed_outbox"],
    )
    .await?;
    let p = &db.topic_prefix;
    let order_topic = format!("{p}.order");
    let fixed_topic = format!("{p}.fixed");
    let legacy_topic = format!("{p}.Order");
    create_topics(&env.kafka_bootstrap, &[order_topic.as_str()], 3).await?;
    create_topics(
        &env.kafka_bootstrap,
        &[fixed_topic.as_str(), legacy_topic.as_str()],
        1,
    )
    .await?;
    let mut reader = TopicReader::new(
        &env.kafka_bootstrap,
        &[
            order_topic.as_str(),
            fixed_topic.as_str(),
            legacy_topic.as_str(),
        ],
    )?;
    let state = tempfile::tempdir()?;
    let cfg = with_routes(
        &WalcastConfig::for_db(env, &db, state.path()),
        &format!(
            r#"
[[outbox.route]]
table = "public.orders_outbox"
table_field_event_id = "event_id"
table_field_event_key = "agg_id"
table_field_event_type = "kind"
table_field_event_payload = "body"
table_field_event_timestamp = "created"
table_field_event_schema_version = "version"
table_fields_additional_placement = "kind:header:eventType,kind:envelope:eventType,part:partition"
table_expand_json_payload = true
route_by_field = "agg_type"
route_topic_regex = "(?<kind>[a-z]+)-(?<region>.*)"
route_topic_replacement = "{p}.${{kind}}"
tracing_span_context_field = "trace"
correlation_id_field = "corr"

[[outbox.route]]
table = "public.fixed_outbox"
route_topic_replacement = "{fixed_topic}"
route_tombstone_on_empty_payload = true
"#
        ),
    );
    let mut w = Walcast::start(&bin(), state.path(), &cfg)?;
    w.wait_streaming()?;

    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let before = now_ms();
    admin
        .batch_execute(&format!(
            "BEGIN; \
             INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) \
               VALUES ('00000000-0000-0000-0000-00000000000a', 'Order', 'agg-1', 'Happened', '{{\"n\": 1}}'); \
             INSERT INTO orders_outbox VALUES ('00000000-0000-0000-0000-000000000001', 'order-eu', 'o-1', 'OrderCreated', \
               '{{\"total\": 42, \"items\": [\"a\", \"b c\"]}}', '2024-05-06 07:08:09.123456+00', 3, 2, \
               E'#Mon Jan 01 00:00:00 UTC 2024\\ntraceparent={tp}\\ntracestate=congo=t61rcWkgMzE\\n', 'req-1'); \
             INSERT INTO orders_outbox VALUES ('00000000-0000-0000-0000-000000000002', 'order-us', 'o-1', 'OrderPaid', \
               '[1, 2]', NULL, 4, 2, '{tp}', NULL); \
             INSERT INTO fixed_outbox VALUES ('f1', 'k1', '\\x00ff'::bytea), ('f2', 'k1', NULL), ('f3', 'k1', ''::bytea); \
             COMMIT;"
        ))
        .await?;
    assert!(
        reader.read_at_least(6, Duration::from_secs(60))?,
        "not every event arrived ({} of 6):\n{}",
        reader.records.len(),
        w.log_text()
    );
    reader.read_to_end(Duration::from_secs(3))?;
    let after = now_ms();
    assert_eq!(reader.records.len(), 6, "{:#?}", reader.records);
    let by_id = |id: &str| {
        reader
            .records
            .iter()
            .find(|r| r.header("id").as_deref() == Some(id))
            .unwrap_or_else(|| panic!("no record with id {id}: {:#?}", reader.records))
            .clone()
    };

    // The default route: as before, plus the source headers.
    let legacy = by_id("00000000-0000-0000-0000-00000000000a");
    assert_eq!(legacy.topic, legacy_topic);
    assert_eq!(legacy.key_str(), "agg-1");
    assert_eq!(value_str(&legacy), "{\"n\": 1}");
    assert_eq!(header(&legacy, "type").as_deref(), Some("Happened"));
    assert_eq!(legacy.headers[0].0, "id", "the id header comes first");
    let lsn = header(&legacy, "walcast.source.lsn").expect("source LSN header");
    assert!(lsn.contains('/'), "{lsn}");
    let commit = header(&legacy, "walcast.commit.time").expect("commit time header");
    assert!(commit.ends_with('Z') && commit.contains('T'), "{commit}");
    let ts = legacy.create_ms.expect("a CreateTime timestamp");
    assert!(
        ts >= before - 5_000 && ts <= after,
        "commit time {ts} not in [{before}, {after}]"
    );

    // Regex topic, envelope with the expanded payload, header and partition
    // placements, timestamp from a column, schema version, trace, correlation.
    let e1 = by_id("00000000-0000-0000-0000-000000000001");
    assert_eq!(e1.topic, order_topic);
    assert_eq!(e1.partition, 2);
    assert_eq!(e1.key_str(), "o-1");
    assert_eq!(
        value_str(&e1),
        r#"{"payload":{"total":42,"items":["a","b c"]},"eventType":"OrderCreated"}"#
    );
    assert_eq!(header(&e1, "eventType").as_deref(), Some("OrderCreated"));
    assert_eq!(header(&e1, "type").as_deref(), Some("OrderCreated"));
    assert_eq!(header(&e1, "schema_version").as_deref(), Some("3"));
    assert_eq!(header(&e1, "traceparent").as_deref(), Some(tp));
    assert_eq!(
        header(&e1, "tracestate").as_deref(),
        Some("congo=t61rcWkgMzE")
    );
    assert_eq!(header(&e1, "correlation_id").as_deref(), Some("req-1"));
    assert_eq!(e1.create_ms, Some(1_714_979_289_123));
    assert_eq!(
        header(&e1, "walcast.source.lsn"),
        Some(lsn.clone()),
        "one transaction, one LSN"
    );
    // NULL timestamp column: the commit time; a bare traceparent; no correlation id.
    let e2 = by_id("00000000-0000-0000-0000-000000000002");
    assert_eq!(e2.topic, order_topic);
    assert_eq!(e2.partition, 2);
    assert!(e2.offset > e1.offset, "one key's events keep their order");
    assert_eq!(
        value_str(&e2),
        r#"{"payload":[1,2],"eventType":"OrderPaid"}"#
    );
    assert_eq!(e2.create_ms, legacy.create_ms);
    assert_eq!(header(&e2, "traceparent").as_deref(), Some(tp));
    assert_eq!(header(&e2, "tracestate"), None);
    assert_eq!(header(&e2, "correlation_id"), None);

    // A fixed topic, bytea as-is, NULL and empty payloads as tombstones.
    let f1 = by_id("f1");
    assert_eq!(f1.topic, fixed_topic);
    assert_eq!(f1.value.as_deref(), Some(&[0u8, 255][..]));
    for id in ["f2", "f3"] {
        let t = by_id(id);
        assert_eq!(t.topic, fixed_topic);
        assert_eq!(t.key_str(), "k1");
        assert_eq!(t.value, None, "{id} is a tombstone");
    }
    let fixed: Vec<&Record> = reader
        .records
        .iter()
        .filter(|r| r.topic == fixed_topic)
        .collect();
    let order: Vec<String> = fixed.iter().map(|r| r.header("id").unwrap()).collect();
    assert_eq!(order, ["f1", "f2", "f3"]);

    w.terminate()?;
    w.wait_exit(Duration::from_secs(30))?;
    db.drop(env).await?;
    Ok(())
}

const BAD_DDL: &str = "CREATE TABLE bad_outbox (seq serial, id text, aggregatetype text, aggregateid text, payload text, part int, ts timestamptz)";

fn bad_route(prefix: &str) -> String {
    format!(
        r#"
[[outbox.route]]
table = "public.bad_outbox"
table_fields_additional_placement = "part:partition"
table_field_event_timestamp = "ts"
table_expand_json_payload = true
route_topic_replacement = "{prefix}.${{routedByValue}}"
"#
    )
}

/// Every row a route cannot publish is a permanent error that names the row:
/// walcast delivers and confirms what came before it, then exits 3 without
/// moving the slot past it; nothing after it is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_row_stops_walcast_at_that_row() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    // (values of id, aggregatetype, aggregateid, payload, part, ts; expected text)
    let cases: [(&str, &str); 8] = [
        (
            "'b1', 'A', NULL, '{}', 0, now()",
            "aggregateid column is NULL",
        ),
        ("'b1', 'A', 'k', NULL, 0, now()", "payload column is NULL"),
        (
            "NULL, 'A', 'k', '{}', 0, now()",
            "id column is NULL (the event id)",
        ),
        (
            "'b1', 'bad topic!', 'k', '{}', 0, now()",
            "which Kafka does not allow",
        ),
        (
            "'b1', 'A', 'k', 'not json', 0, now()",
            "table_expand_json_payload",
        ),
        (
            "'b1', 'A', 'k', '{}', -1, now()",
            "partition column \"part\"",
        ),
        (
            "'b1', 'A', 'k', '{}', 0, 'infinity'",
            "not a usable record timestamp",
        ),
        // A partition the topic (1 partition) does not have: found before it
        // is produced, also in a run whose producer has yet to learn the
        // topic's metadata (the first here).
        (
            "'b1', 'A', 'k', '{}', 5, now()",
            "chose partition 5 of topic",
        ),
    ];
    for (values, needle) in cases {
        let (db, admin) = db_with(env, "unroutable", BAD_DDL, &["public.bad_outbox"]).await?;
        let topic = format!("{}.A", db.topic_prefix);
        create_topics(&env.kafka_bootstrap, &[topic.as_str()], 1).await?;
        let mut reader = TopicReader::new(&env.kafka_bootstrap, &[topic.as_str()])?;
        let dir = tempfile::tempdir()?;
        let cfg = with_routes(
            &WalcastConfig::for_db(env, &db, dir.path()),
            &bad_route(&db.topic_prefix),
        );
        // Create the slot first, so the rows below are in its stream.
        let mut w = Walcast::start(&bin(), dir.path(), &cfg)?;
        w.wait_streaming()?;
        w.terminate()?;
        w.wait_exit(Duration::from_secs(30))?;
        admin
            .batch_execute(
                "INSERT INTO bad_outbox (id, aggregatetype, aggregateid, payload, part, ts) VALUES ('g1', 'A', 'k', '{}', 0, now())",
            )
            .await?;
        let before_bad = current_wal_lsn(&admin).await?;
        admin
            .batch_execute(&format!(
                "INSERT INTO bad_outbox (id, aggregatetype, aggregateid, payload, part, ts) VALUES ({values})"
            ))
            .await?;
        admin
            .batch_execute(
                "INSERT INTO bad_outbox (id, aggregatetype, aggregateid, payload, part, ts) VALUES ('g2', 'A', 'k', '{}', 0, now())",
            )
            .await?;
        let (code, out) = run_to_exit(dir.path(), &cfg)?;
        assert_eq!(code, EXIT_PERMANENT, "case {values}: {out}");
        assert!(
            out.contains(needle),
            "case {values}: expected {needle:?} in:\n{out}"
        );
        assert!(
            out.contains("public.bad_outbox"),
            "case {values}: the table is named:\n{out}"
        );
        reader.read_to_end(Duration::from_secs(3))?;
        let ids: Vec<String> = reader
            .records
            .iter()
            .filter_map(|r| r.header("id"))
            .collect();
        assert_eq!(
            ids,
            ["g1"],
            "case {values}: the row before is delivered, nothing after"
        );
        let confirmed = db.confirmed_flush_lsn(env).await?.unwrap_or(0);
        assert!(
            confirmed <= before_bad,
            "case {values}: the slot ({confirmed:X}) passed the bad row's transaction (starts after {before_bad:X})"
        );
        db.drop(env).await?;
    }
    Ok(())
}

/// A running walcast whose route dead-letters, after the rows g1, b1, g2.
struct DeadLettered {
    db: TestDb,
    admin: Client,
    w: Walcast,
    /// The route's topic (one partition).
    topic: String,
    /// The dead-letter topic, read up to b1's record.
    dead: TopicReader,
    /// walcast's state directory (kept while it runs).
    _dir: tempfile::TempDir,
}

/// Runs walcast on a `bad_outbox` whose route dead-letters to
/// `<prefix>-dead-letters` (its topic created with `topic_configs`), writes
/// g1, the row `bad` (VALUES of `BAD_DDL`'s columns, id `b1`) and g2, and
/// checks that b1 is dead-lettered with `reason` and a message holding each
/// of `needles`, g1 and g2 reach the topic in order, the slot passes them
/// and walcast keeps running.
async fn dead_lettered_between_good_rows(
    env: &'static TestEnv,
    tag: &str,
    topic_configs: &[(&str, &str)],
    bad: &str,
    reason: &str,
    needles: &[&str],
) -> Result<DeadLettered> {
    let (db, admin) = db_with(env, tag, BAD_DDL, &["public.bad_outbox"]).await?;
    let topic = format!("{}.A", db.topic_prefix);
    let dlq = format!("{}-dead-letters", db.topic_prefix);
    walcast_tests::kafka::create_topics_with(
        &env.kafka_bootstrap,
        &[topic.as_str()],
        1,
        1,
        topic_configs,
    )
    .await?;
    let dir = tempfile::tempdir()?;
    let route = bad_route(&db.topic_prefix)
        + &format!("on_permanent_error = \"dead-letter\"\ndead_letter_topic = \"{dlq}\"\n");
    let cfg = with_routes(&WalcastConfig::for_db(env, &db, dir.path()), &route);
    let mut w = Walcast::start(&bin(), dir.path(), &cfg)?;
    w.wait_streaming()?;
    let columns = "INSERT INTO bad_outbox (id, aggregatetype, aggregateid, payload, part, ts)";
    for values in [
        "'g1', 'A', 'k', '{}', 0, now()",
        bad,
        "'g2', 'A', 'k', '{}', 0, now()",
    ] {
        admin
            .batch_execute(&format!("{columns} VALUES ({values})"))
            .await?;
    }
    let after = current_wal_lsn(&admin).await?;
    let mut main = TopicReader::new(&env.kafka_bootstrap, &[topic.as_str()])?;
    let want = ["g1".to_string(), "g2".to_string()].into();
    assert!(
        wait_ids(&mut main, &want, Duration::from_secs(60))?,
        "g1 and g2 did not arrive:\n{}",
        w.log_text()
    );
    let mut dead = TopicReader::new(&env.kafka_bootstrap, &[dlq.as_str()])?;
    assert!(
        wait_ids(
            &mut dead,
            &["b1".to_string()].into(),
            Duration::from_secs(60)
        )?,
        "no dead-letter record of b1:\n{}",
        w.log_text()
    );
    assert!(
        wait_confirmed(env, &db, after, Duration::from_secs(30)).await?,
        "the slot did not pass the dead-lettered row"
    );
    assert!(w.is_running(), "walcast stopped:\n{}", w.log_text());
    let ids: Vec<String> = main.records.iter().filter_map(|r| r.header("id")).collect();
    assert_eq!(ids, ["g1", "g2"], "in order, once each");
    let r = &dead.records[0];
    assert_eq!(r.header("walcast.error.reason").as_deref(), Some(reason));
    let message = r.header("walcast.error.message").unwrap_or_default();
    for needle in needles {
        assert!(message.contains(needle), "{needle:?} missing in: {message}");
    }
    Ok(DeadLettered {
        db,
        admin,
        w,
        topic,
        dead,
        _dir: dir,
    })
}

/// A row choosing a partition its topic does not have, under a route whose
/// policy is `dead-letter`: the event goes to the dead-letter topic (reason
/// `unroutable`, the message naming the partition count) in the same run,
/// the rows around it reach their topic in order, the slot passes it and
/// walcast goes on. Then the topic gets more partitions while walcast runs:
/// a row choosing one of the new partitions is delivered there (the count
/// is read again, not refused from the one walcast knew).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_the_topic_lacks_is_dead_lettered_and_a_new_one_is_used() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let d = dead_lettered_between_good_rows(
        env,
        "nopartition",
        &[],
        "'b1', 'A', 'k', '{}', 3, now()",
        "unroutable",
        &["chose partition 3", "which has 1 partition"],
    )
    .await?;
    let DeadLettered {
        db,
        admin,
        mut w,
        topic,
        mut dead,
        _dir,
    } = d;
    let insert = |id: &str, part: i32| {
        format!("INSERT INTO bad_outbox (id, aggregatetype, aggregateid, payload, part, ts) VALUES ('{id}', 'A', 'k', '{{}}', {part}, now())")
    };

    // The topic grows to 4 partitions: partition 3 now exists.
    walcast_tests::kafka::add_partitions(&env.kafka_bootstrap, &topic, 4).await?;
    admin.batch_execute(&insert("n3", 3)).await?;
    let after = current_wal_lsn(&admin).await?;
    let mut main = TopicReader::new(&env.kafka_bootstrap, &[topic.as_str()])?;
    assert!(
        wait_ids(
            &mut main,
            &["n3".to_string()].into(),
            Duration::from_secs(60)
        )?,
        "n3 did not arrive in the grown topic:\n{}",
        w.log_text()
    );
    let n3 = main
        .records
        .iter()
        .find(|r| r.header("id").as_deref() == Some("n3"))
        .expect("n3");
    assert_eq!(n3.partition, 3, "the partition the row chose");
    assert!(wait_confirmed(env, &db, after, Duration::from_secs(30)).await?);
    dead.read_to_end(Duration::from_secs(3))?;
    assert_eq!(dead.records.len(), 1, "only b1 was dead-lettered");
    w.terminate()?;
    w.wait_exit(Duration::from_secs(30))?;
    db.drop(env).await?;
    Ok(())
}

/// A record timestamp (here from the route's timestamp column) that its
/// topic refuses: more than `message.timestamp.after.max.ms` ahead (Kafka 4
/// defaults it to one hour). Found before producing from the window walcast
/// read (exit 3 naming the row, nothing after it, the slot before it); when
/// the window was narrowed while walcast ran, the broker's refusal restarts
/// walcast, which reads the window again and stops the same way; under
/// `dead-letter` the row goes to the dead-letter topic and walcast goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timestamp_the_topic_refuses_stops_walcast_or_is_dead_lettered() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let insert = |id: &str, ts: &str| {
        format!("INSERT INTO bad_outbox (id, aggregatetype, aggregateid, payload, part, ts) VALUES ('{id}', 'A', 'k', '{{}}', 0, {ts})")
    };
    let ahead = "now() + interval '2 days'";
    let hour = [("message.timestamp.after.max.ms", "3600000")];
    let unbounded = [("message.timestamp.after.max.ms", "9223372036854775807")];
    // (case, the topic's settings at start, narrowed to one hour while walcast runs)
    for (case, settings, narrowed) in [("checked", &hour, false), ("narrowed", &unbounded, true)] {
        let (db, admin) = db_with(env, "timestamp", BAD_DDL, &["public.bad_outbox"]).await?;
        let topic = format!("{}.A", db.topic_prefix);
        walcast_tests::kafka::create_topics_with(
            &env.kafka_bootstrap,
            &[topic.as_str()],
            1,
            1,
            settings,
        )
        .await?;
        let dir = tempfile::tempdir()?;
        let cfg = with_routes(
            &WalcastConfig::for_db(env, &db, dir.path()),
            &bad_route(&db.topic_prefix),
        );
        let mut w = Walcast::start(&bin(), dir.path(), &cfg)?;
        w.wait_streaming()?;
        admin.batch_execute(&insert("g1", "now()")).await?;
        let mut reader = TopicReader::new(&env.kafka_bootstrap, &[topic.as_str()])?;
        assert!(
            wait_ids(
                &mut reader,
                &["g1".to_string()].into(),
                Duration::from_secs(60)
            )?,
            "{case}: g1 did not arrive:\n{}",
            w.log_text()
        );
        if narrowed {
            walcast_tests::kafka::alter_topic_config(&env.kafka_bootstrap, &topic, &hour).await?;
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let before_bad = current_wal_lsn(&admin).await?;
        admin.batch_execute(&insert("b1", ahead)).await?;
        admin.batch_execute(&insert("g2", "now()")).await?;
        let status = w.wait_exit(Duration::from_secs(120))?;
        let log = w.log_text();
        assert_eq!(status.code(), Some(EXIT_PERMANENT), "{case}: {log}");
        let last = log
            .lines()
            .rev()
            .find(|l| l.starts_with("walcast: error"))
            .unwrap_or_default();
        for needle in [
            "event b1 from public.bad_outbox",
            " ahead of this host's clock, and topic",
            "message.timestamp.after.max.ms = 3600000",
        ] {
            assert!(
                last.contains(needle),
                "{case}: {needle:?} missing in:\n{log}"
            );
        }
        if narrowed {
            assert!(
                log.contains("which walcast found inside the topic's"),
                "{case}: the broker's refusal was not what stopped the first run:\n{log}"
            );
        }
        reader.read_to_end(Duration::from_secs(3))?;
        let ids: Vec<String> = reader
            .records
            .iter()
            .filter_map(|r| r.header("id"))
            .collect();
        assert_eq!(
            ids,
            ["g1"],
            "{case}: the row before is delivered, nothing after"
        );
        let confirmed = db.confirmed_flush_lsn(env).await?.unwrap_or(0);
        assert!(
            confirmed <= before_bad,
            "{case}: the slot ({confirmed:X}) passed the refused row (after {before_bad:X})"
        );
        db.drop(env).await?;
    }

    // Under dead-letter: the row goes there, the others reach the topic.
    let d = dead_lettered_between_good_rows(
        env,
        "timestampdl",
        &hour,
        &format!("'b1', 'A', 'k', '{{}}', 0, {ahead}"),
        "invalid_record",
        &["message.timestamp.after.max.ms"],
    )
    .await?;
    let mut w = d.w;
    w.terminate()?;
    w.wait_exit(Duration::from_secs(30))?;
    d.db.drop(env).await?;
    Ok(())
}

/// A column a route needs is checked in the catalog at start (exit 2, naming
/// the column, the option and the table), and again when a Relation message
/// describes the table anew (a column dropped while walcast runs): walcast
/// stops there without skipping the row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_route_column_stops_walcast_at_start_and_mid_stream() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let (db, admin) = db_with(
        env,
        "routecols",
        "CREATE TABLE r_outbox (id text, aggregatetype text, aggregateid text, payload text, corr text, part text)",
        &["public.r_outbox"],
    )
    .await?;
    let dir = tempfile::tempdir()?;
    let base = WalcastConfig::for_db(env, &db, dir.path());
    let route = |extra: &str| {
        with_routes(
            &base,
            &format!(
                "[[outbox.route]]\ntable = \"public.r_outbox\"\nroute_topic_replacement = \"{}.${{routedByValue}}\"\n{extra}\n",
                db.topic_prefix
            ),
        )
    };

    // At start: a column the table does not have.
    let (code, out) = run_to_exit(dir.path(), &route("correlation_id_field = \"nope\""))?;
    assert_eq!(code, EXIT_OPERATOR, "{out}");
    assert!(
        out.contains("outbox table public.r_outbox has no column \"nope\""),
        "{out}"
    );
    assert!(
        out.contains("outbox.route[public.r_outbox].correlation_id_field"),
        "{out}"
    );

    // A partition column that is not an integer: refused at its Relation message.
    let topic = format!("{}.A", db.topic_prefix);
    create_topics(&env.kafka_bootstrap, &[topic.as_str()], 3).await?;
    let mut reader = TopicReader::new(&env.kafka_bootstrap, &[topic.as_str()])?;
    let bad_type = route("table_fields_additional_placement = \"part:partition\"");
    let mut w = Walcast::start(&bin(), dir.path(), &bad_type)?;
    w.wait_streaming()?;
    admin
        .batch_execute("INSERT INTO r_outbox VALUES ('t1', 'A', 'k', '{}', NULL, '1')")
        .await?;
    let status = w.wait_exit(Duration::from_secs(60))?;
    assert_eq!(status.code(), Some(EXIT_OPERATOR), "{}", w.log_text());
    assert!(
        w.log_text().contains("must be an integer type"),
        "{}",
        w.log_text()
    );
    admin.batch_execute("DELETE FROM r_outbox").await?;

    // Mid-stream: the correlation column is dropped while walcast runs
    // (same slot: the row above is relayed now, its partition column unused).
    let good = route("correlation_id_field = \"corr\"");
    admin
        .batch_execute("ALTER TABLE r_outbox DROP COLUMN part")
        .await?;
    let mut w = Walcast::start(&bin(), dir.path(), &good)?;
    w.wait_streaming()?;
    admin
        .batch_execute("INSERT INTO r_outbox VALUES ('c1', 'A', 'k', '{}', 'corr-1')")
        .await?;
    assert!(
        wait_ids(
            &mut reader,
            &["c1".to_string()].into(),
            Duration::from_secs(60)
        )?,
        "{}",
        w.log_text()
    );
    assert_eq!(
        reader
            .records
            .iter()
            .find(|r| r.header("id").as_deref() == Some("c1"))
            .and_then(|r| r.header("correlation_id"))
            .as_deref(),
        Some("corr-1")
    );
    admin
        .batch_execute(
            "ALTER TABLE r_outbox DROP COLUMN corr; INSERT INTO r_outbox VALUES ('c2', 'A', 'k', '{}')",
        )
        .await?;
    let status = w.wait_exit(Duration::from_secs(60))?;
    assert_eq!(status.code(), Some(EXIT_OPERATOR), "{}", w.log_text());
    let log = w.log_text();
    assert!(
        log.contains("outbox table public.r_outbox has no column \"corr\" (named by outbox.route[public.r_outbox].correlation_id_field)"),
        "{log}"
    );
    reader.read_to_end(Duration::from_secs(3))?;
    assert!(
        reader
            .records
            .iter()
            .all(|r| r.header("id").as_deref() != Some("c2")),
        "the row after the change is not published without its column"
    );
    db.drop(env).await?;
    Ok(())
}

/// UPDATE and DELETE of an outbox table follow the route's behaviour:
/// `warn` (UPDATE's default) logs and skips, `ignore` (DELETE's default)
/// skips silently, `stop` exits 3 before the slot passes the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_and_delete_follow_the_routes_behaviour() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    for stop in [false, true] {
        let (db, admin) = db_with(
            env,
            "routeops",
            "CREATE TABLE u_outbox (id text PRIMARY KEY, aggregatetype text, aggregateid text, payload text)",
            &["public.u_outbox"],
        )
        .await?;
        admin
            .batch_execute(&format!(
                "ALTER PUBLICATION {} SET (publish = 'insert, update, delete')",
                db.publication
            ))
            .await?;
        let topic = format!("{}.A", db.topic_prefix);
        create_topics(&env.kafka_bootstrap, &[topic.as_str()], 1).await?;
        let mut reader = TopicReader::new(&env.kafka_bootstrap, &[topic.as_str()])?;
        let dir = tempfile::tempdir()?;
        let cfg = with_routes(
            &WalcastConfig::for_db(env, &db, dir.path()),
            &format!(
                "[[outbox.route]]\ntable = \"public.u_outbox\"\nroute_topic_replacement = \"{}.${{routedByValue}}\"\n{}\n",
                db.topic_prefix,
                if stop { "table_op_invalid_behavior = \"stop\"" } else { "" }
            ),
        );
        let mut w = Walcast::start(&bin(), dir.path(), &cfg)?;
        w.wait_streaming()?;
        // One transaction each.
        for sql in [
            "INSERT INTO u_outbox VALUES ('e1', 'A', 'k', '{}')",
            "DELETE FROM u_outbox WHERE id = 'e1'",
            "INSERT INTO u_outbox VALUES ('e2', 'A', 'k', '{}')",
            "UPDATE u_outbox SET payload = '{\"x\": 1}' WHERE id = 'e2'",
            "INSERT INTO u_outbox VALUES ('e3', 'A', 'k', '{}')",
        ] {
            admin.batch_execute(sql).await?;
        }
        if stop {
            let status = w.wait_exit(Duration::from_secs(60))?;
            let log = w.log_text();
            assert_eq!(status.code(), Some(EXIT_PERMANENT), "{log}");
            assert!(
                log.contains("UPDATE on outbox table public.u_outbox"),
                "{log}"
            );
            assert!(
                log.contains("table_op_invalid_behavior = \\\"stop\\\"")
                    || log.contains("table_op_invalid_behavior = \"stop\""),
                "{log}"
            );
            reader.read_to_end(Duration::from_secs(3))?;
            let ids: Vec<String> = reader
                .records
                .iter()
                .filter_map(|r| r.header("id"))
                .collect();
            assert_eq!(
                ids,
                ["e1", "e2"],
                "what came before the UPDATE is delivered, nothing after"
            );
        } else {
            assert!(
                wait_ids(
                    &mut reader,
                    &["e1".to_string(), "e2".to_string(), "e3".to_string()].into(),
                    Duration::from_secs(60)
                )?,
                "{}",
                w.log_text()
            );
            w.wait_for_log(
                "UPDATE on outbox table public.u_outbox",
                Duration::from_secs(10),
            )?;
            let log = w.log_text();
            assert!(
                !log.contains("DELETE on outbox table"),
                "DELETE is ignored silently by default: {log}"
            );
            w.terminate()?;
            w.wait_exit(Duration::from_secs(30))?;
        }
        db.drop(env).await?;
    }
    Ok(())
}

/// `walcast config from-debezium`: a supported connector becomes a config
/// `walcast config` accepts (exit 0); an unsupported option is named and the
/// command exits 2 without printing a config.
#[test]
fn config_from_debezium_converts_or_names_what_it_cannot() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let good = "name=o\nconnector.class=io.debezium.connector.postgresql.PostgresConnector\n\
        database.hostname=db\ndatabase.dbname=app\ndatabase.user=dbz\ndatabase.password=pw\n\
        table.include.list=public.outbox\ntransforms=outbox\n\
        transforms.outbox.type=io.debezium.transforms.outbox.EventRouter\n\
        transforms.outbox.route.topic.replacement=events.${routedByValue}\n\
        value.converter=org.apache.kafka.connect.storage.StringConverter\n";
    let file = dir.path().join("good.properties");
    std::fs::write(&file, good)?;
    let out = std::process::Command::new(bin())
        .args(["config", "from-debezium", file.to_str().unwrap()])
        .output()?;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let toml_path = dir.path().join("walcast.toml");
    std::fs::write(&toml_path, &out.stdout)?;
    let check = std::process::Command::new(bin())
        .args(["config", "--config", toml_path.to_str().unwrap()])
        .output()?;
    assert_eq!(
        check.status.code(),
        Some(0),
        "the converted config is valid: {}\n{}",
        String::from_utf8_lossy(&check.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&check.stdout).contains("events.${routedByValue}"));

    let bad = format!("{good}snapshot.mode=always\ntransforms.outbox.table.json.payload.null.behavior=optional_bytes\n");
    std::fs::write(&file, bad)?;
    let out = std::process::Command::new(bin())
        .args(["config", "from-debezium", file.to_str().unwrap()])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_OPERATOR), "{err}");
    assert!(out.stdout.is_empty(), "no config is printed");
    assert!(err.contains("snapshot.mode = always"), "{err}");
    assert!(
        err.contains("table.json.payload.null.behavior = optional_bytes"),
        "{err}"
    );
    Ok(())
}

/// The table-less outbox: transactional `pg_logical_emit_message(true,
/// prefix, envelope)` messages of a configured prefix are events, in their
/// place in the transaction's order among its outbox rows; the value is the
/// envelope's payload or the whole envelope with its source position; a
/// rolled-back message never appears; other prefixes are only counted; a
/// message that is not an envelope stops walcast at it (exit 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_less_outbox_messages_are_events_in_transaction_order() -> Result<()> {
    use prost_free::decode_envelope;
    let env = TestEnv::get();
    let _g = env.shared().await;
    let db = TestDb::create(env, "messages").await?;
    let admin = db.admin(env).await?;
    let p = db.topic_prefix.clone();
    let topic = format!("{p}.Order");
    let env_topic = format!("{p}.env");
    create_topics(&env.kafka_bootstrap, &[topic.as_str()], 3).await?;
    create_topics(&env.kafka_bootstrap, &[env_topic.as_str()], 1).await?;
    let mut reader = TopicReader::new(&env.kafka_bootstrap, &[topic.as_str(), env_topic.as_str()])?;
    let state = tempfile::tempdir()?;
    let cfg = with_routes(
        &WalcastConfig::for_db(env, &db, state.path()),
        &format!(
            r#"
[[outbox.message_route]]
prefix = "walcast"
route_topic_replacement = "{p}.${{routedByValue}}"

[[outbox.message_route]]
prefix = "walcast.env"
route_topic_replacement = "{env_topic}"
value = "envelope"
"#
        ),
    );
    let mut w = Walcast::start(&bin(), state.path(), &cfg)?;
    w.wait_streaming()?;
    let msg = |id: &str, extra: &str| {
        format!(
            "SELECT pg_logical_emit_message(true, 'walcast', json_build_object('event_id', '{id}', 'aggregate_type', 'Order', \
             'aggregate_id', 'agg-1', 'event_type', 'Shipped', 'payload', json_build_object('n', '{id}'){extra})::text)"
        )
    };
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    admin
        .batch_execute(&format!(
            "BEGIN; \
             INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) VALUES ('00000000-0000-0000-0000-000000000001', 'Order', 'agg-1', 'Created', '{{}}'); \
             {}; \
             INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) VALUES ('00000000-0000-0000-0000-000000000002', 'Order', 'agg-1', 'Paid', '{{}}'); \
             SELECT pg_logical_emit_message(true, 'someone.else', 'not ours'); \
             SELECT pg_logical_emit_message(true, 'walcast.env', '{{\"event_id\": \"e-env\", \"aggregate_id\": \"agg-9\", \"payload\": {{\"x\": 1}}}}'); \
             COMMIT; \
             BEGIN; {}; ROLLBACK;",
            msg(
                "m-1",
                &format!(", 'timestamp_unix_micros', '1714979289123456', 'correlation_id', 'req-7', 'traceparent', '{tp}', \
                 'headers', json_build_array(json_build_object('key', 'tenant', 'value', 'acme'))")
            ),
            msg("m-rolled-back", ""),
        ))
        .await?;
    assert!(
        reader.read_at_least(4, Duration::from_secs(60))?,
        "not every event arrived:\n{}",
        w.log_text()
    );
    reader.read_to_end(Duration::from_secs(3))?;
    let order: Vec<String> = reader
        .records
        .iter()
        .filter(|r| r.topic == topic)
        .filter_map(|r| r.header("id"))
        .collect();
    assert_eq!(
        order,
        ["00000000-0000-0000-0000-000000000001", "m-1", "00000000-0000-0000-0000-000000000002"],
        "the message keeps its place between the transaction's rows; the rolled-back one never appears"
    );
    let m1 = reader
        .records
        .iter()
        .find(|r| r.header("id").as_deref() == Some("m-1"))
        .unwrap();
    assert_eq!(m1.key_str(), "agg-1");
    assert_eq!(
        value_str(m1),
        r#"{"n" : "m-1"}"#,
        "the payload byte for byte as written"
    );
    assert_eq!(m1.header("type").as_deref(), Some("Shipped"));
    assert_eq!(m1.header("tenant").as_deref(), Some("acme"));
    assert_eq!(m1.header("correlation_id").as_deref(), Some("req-7"));
    assert_eq!(m1.header("traceparent").as_deref(), Some(tp));
    assert_eq!(m1.create_ms, Some(1_714_979_289_123));
    assert!(m1.header("walcast.source.lsn").is_some());
    let e = reader
        .records
        .iter()
        .find(|r| r.topic == env_topic)
        .expect("the envelope record");
    let decoded = decode_envelope(e.value.as_deref().unwrap_or_default())?;
    assert_eq!(decoded.event_id, "e-env");
    assert_eq!(decoded.payload, br#"{"x": 1}"#.to_vec());
    let src = decoded
        .source
        .expect("walcast fills in the source position");
    assert!(
        src.lsn > 0 && src.commit_lsn >= src.lsn && src.xid > 0,
        "{src:?}"
    );
    assert!(src.commit_time_unix_micros > 0);

    // Content that is not an envelope: exit 3 naming the prefix; nothing after it.
    admin
        .batch_execute(
            "SELECT pg_logical_emit_message(true, 'walcast', 'not an envelope'); \
             INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) VALUES ('00000000-0000-0000-0000-000000000003', 'Order', 'agg-1', 'Late', '{}');",
        )
        .await?;
    let status = w.wait_exit(Duration::from_secs(60))?;
    let log = w.log_text();
    assert_eq!(status.code(), Some(EXIT_PERMANENT), "{log}");
    assert!(
        log.contains("transactional message with prefix \"walcast\""),
        "{log}"
    );
    reader.read_to_end(Duration::from_secs(3))?;
    assert!(
        reader
            .records
            .iter()
            .all(|r| r.header("id").as_deref() != Some("00000000-0000-0000-0000-000000000003")),
        "nothing after the bad message is published"
    );
    db.drop(env).await?;
    Ok(())
}

mod prost_free {
    /// Decodes a protobuf envelope with walcast's envelope crate.
    pub fn decode_envelope(bytes: &[u8]) -> anyhow::Result<walcast_envelope::Envelope> {
        Ok(walcast_envelope::decode(bytes)?)
    }
}

/// A partitioned outbox table with its own route: rows of every partition
/// (published via the root) follow the root's route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_outbox_follows_its_roots_route() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let (db, admin) = db_with(
        env,
        "routepart",
        "CREATE TABLE p_outbox (id text, kind text, agg text, body text, region text) PARTITION BY LIST (region); \
         CREATE TABLE p_outbox_eu PARTITION OF p_outbox FOR VALUES IN ('eu'); \
         CREATE TABLE p_outbox_us PARTITION OF p_outbox FOR VALUES IN ('us');",
        &["public.p_outbox"],
    )
    .await?;
    admin
        .batch_execute(&format!(
            "ALTER PUBLICATION {} SET (publish_via_partition_root = true)",
            db.publication
        ))
        .await?;
    let topic = format!("{}.parts", db.topic_prefix);
    create_topics(&env.kafka_bootstrap, &[topic.as_str()], 1).await?;
    let mut reader = TopicReader::new(&env.kafka_bootstrap, &[topic.as_str()])?;
    let state = tempfile::tempdir()?;
    let cfg = with_routes(
        &WalcastConfig::for_db(env, &db, state.path()),
        &format!(
            "[[outbox.route]]\ntable = \"public.p_outbox\"\ntable_field_event_key = \"agg\"\ntable_field_event_type = \"kind\"\n\
             table_field_event_payload = \"body\"\nroute_topic_replacement = \"{topic}\"\n\
             table_fields_additional_placement = \"region:header\"\n"
        ),
    );
    let mut w = Walcast::start(&bin(), state.path(), &cfg)?;
    w.wait_streaming()?;
    admin
        .batch_execute(
            "INSERT INTO p_outbox VALUES ('p1', 'A', 'k', 'one', 'eu'), ('p2', 'B', 'k', 'two', 'us'), ('p3', 'C', 'k', 'three', 'eu')",
        )
        .await?;
    assert!(
        reader.read_at_least(3, Duration::from_secs(60))?,
        "{}",
        w.log_text()
    );
    let got: Vec<(String, String, String, String)> = reader
        .records
        .iter()
        .map(|r| {
            (
                r.header("id").unwrap_or_default(),
                r.header("type").unwrap_or_default(),
                r.header("region").unwrap_or_default(),
                value_str(r),
            )
        })
        .collect();
    let want = [
        ("p1", "A", "eu", "one"),
        ("p2", "B", "us", "two"),
        ("p3", "C", "eu", "three"),
    ];
    assert_eq!(
        got,
        want.map(|(a, b, c, d)| (a.to_string(), b.to_string(), c.to_string(), d.to_string())),
        "every partition's rows, in commit order, shaped by the root's route"
    );
    w.terminate()?;
    w.wait_exit(Duration::from_secs(30))?;
    db.drop(env).await?;
    Ok(())
}

/// `walcast tail` (no `--topic-regex`) follows the topics of every route in
/// use: the `[outbox]` template, a route's fixed topic and a route's regex
/// replacement; and only those (a topic that merely shares a prefix is not
/// read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_follows_every_routes_topics() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let (db, admin) = db_with(
        env,
        "tailroutes",
        "CREATE TABLE orders_outbox (LIKE outbox INCLUDING ALL); \
         CREATE TABLE pay_outbox (LIKE outbox INCLUDING ALL);",
        &["public.orders_outbox", "public.pay_outbox"],
    )
    .await?;
    let p = &db.topic_prefix;
    let legacy = format!("{p}.Order");
    let fixed = format!("{p}-orders");
    let by_regex = format!("{p}-pay.card");
    let decoy = format!("{p}-orders-x");
    create_topics(
        &env.kafka_bootstrap,
        &[
            legacy.as_str(),
            fixed.as_str(),
            by_regex.as_str(),
            decoy.as_str(),
        ],
        1,
    )
    .await?;
    let state = tempfile::tempdir()?;
    let cfg = with_routes(
        &WalcastConfig::for_db(env, &db, state.path()),
        &format!(
            r#"
[[outbox.route]]
table = "public.orders_outbox"
route_topic_replacement = "{fixed}"

[[outbox.route]]
table = "public.pay_outbox"
route_topic_regex = "(?<kind>[a-z]+)-(?<region>.*)"
route_topic_replacement = "{p}-pay.${{kind}}"
"#
        ),
    );
    let mut w = Walcast::start(&bin(), state.path(), &cfg)?;
    tokio::task::block_in_place(|| w.wait_streaming())?;
    admin
        .batch_execute(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('Order', 'o1', 'T', '{\"t\": \"legacy\"}');
             INSERT INTO orders_outbox (aggregatetype, aggregateid, type, payload) VALUES ('Order', 'o2', 'T', '{\"t\": \"fixed\"}');
             INSERT INTO pay_outbox (aggregatetype, aggregateid, type, payload) VALUES ('card-eu', 'o3', 'T', '{\"t\": \"regex\"}');",
        )
        .await?;
    let mut reader = TopicReader::new(
        &env.kafka_bootstrap,
        &[legacy.as_str(), fixed.as_str(), by_regex.as_str()],
    )?;
    anyhow::ensure!(
        tokio::task::block_in_place(|| reader.read_at_least(3, Duration::from_secs(60)))?,
        "walcast did not relay the three rows: {:?}",
        reader.records
    );
    w.kill9()?;
    // A record in a topic no route renders.
    {
        use rdkafka::producer::{FutureProducer, FutureRecord};
        let producer: FutureProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &env.kafka_bootstrap)
            .create()?;
        producer
            .send(
                FutureRecord::to(&decoy)
                    .key("d")
                    .payload("{\"t\": \"decoy\"}"),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    let ran = tokio::task::block_in_place(|| {
        crate::ops::walcast(
            state.path(),
            Some(&cfg),
            &["tail", "--max-records", "4", "--idle-timeout-ms", "8000"],
        )
    })?;
    assert_eq!(ran.code, 0, "{}", ran.text());
    let lines: Vec<&str> = ran
        .stdout
        .lines()
        .filter(|l| l.starts_with("topic="))
        .collect();
    for topic in [&legacy, &fixed, &by_regex] {
        assert!(
            lines
                .iter()
                .filter(|l| l.starts_with(&format!("topic={topic} ")))
                .count()
                == 1,
            "tail did not print the record of {topic}:\n{}",
            ran.text()
        );
    }
    assert_eq!(lines.len(), 3, "tail read other topics:\n{}", ran.stdout);
    drop(admin);
    db.drop(env).await
}
