//! Issue 10: outbox setups unlike the default one, tried as a new user would.
//! A partitioned outbox in another schema with its own column names, a
//! publication that carries more than the outbox, a renamed outbox, a row
//! above `pipeline.max_row_bytes`, transactional logical messages, and
//! savepoints, deletes and TRUNCATE around outbox inserts.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Result;
use tokio_postgres::Client;
use walcast_tests::checker::{check, Observed, Outcome, WrittenEvent, WrittenTxn};
use walcast_tests::kafka::{create_topics, TopicReader};
use walcast_tests::pg::TestDb;
use walcast_tests::process::{Walcast, WalcastConfig};
use walcast_tests::TestEnv;

use crate::common::*;

const EXIT_OPERATOR: i32 = 2;
const EXIT_PERMANENT: i32 = 3;

/// A hash-partitioned outbox `billing.events` (4 partitions, one of them
/// partitioned again) with Debezium-unlike column names.
const PARTITIONED_DDL: &str = "
CREATE SCHEMA billing;
CREATE TABLE billing.events (
    event_id uuid NOT NULL,
    stream text NOT NULL,
    stream_key text NOT NULL,
    kind text NOT NULL,
    body jsonb NOT NULL,
    written_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_key, event_id)
) PARTITION BY HASH (stream_key);
CREATE TABLE billing.events_p0 PARTITION OF billing.events FOR VALUES WITH (MODULUS 4, REMAINDER 0);
CREATE TABLE billing.events_p1 PARTITION OF billing.events FOR VALUES WITH (MODULUS 4, REMAINDER 1);
CREATE TABLE billing.events_p2 PARTITION OF billing.events FOR VALUES WITH (MODULUS 4, REMAINDER 2);
CREATE TABLE billing.events_p3 PARTITION OF billing.events FOR VALUES WITH (MODULUS 4, REMAINDER 3)
    PARTITION BY HASH (event_id);
CREATE TABLE billing.events_p3_a PARTITION OF billing.events_p3 FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE billing.events_p3_b PARTITION OF billing.events_p3 FOR VALUES WITH (MODULUS 2, REMAINDER 1);
";

fn partitioned_config(env: &TestEnv, db: &TestDb, dir: &std::path::Path) -> WalcastConfig {
    WalcastConfig::for_db(env, db, dir)
        .set("outbox", "tables", "[\"billing.events\"]")
        .set("outbox.columns", "id", "\"event_id\"")
        .set("outbox.columns", "aggregatetype", "\"stream\"")
        .set("outbox.columns", "aggregateid", "\"stream_key\"")
        .set("outbox.columns", "type", "\"kind\"")
        .set("outbox.columns", "payload", "\"body\"")
}

/// Commits `txns` transactions of `size` events over `keys` keys into
/// `billing.events`, logging them for the checker.
async fn write_partitioned(
    c: &mut Client,
    log: &mut Vec<WrittenTxn>,
    txns: usize,
    size: usize,
    keys: usize,
) -> Result<()> {
    let mut seq = log.iter().map(|t| t.events.len()).sum::<usize>();
    for _ in 0..txns {
        let tx = c.transaction().await?;
        let mut events = Vec::new();
        for _ in 0..size {
            let id = uuid::Uuid::new_v4().to_string();
            let key = format!("acct-{}", seq % keys);
            let agg = AGG_TYPES[seq % AGG_TYPES.len()];
            tx.execute(
                "INSERT INTO billing.events (event_id, stream, stream_key, kind, body) VALUES ($1::text::uuid, $2, $3, 'Posted', jsonb_build_object('key', $3::text, 'seq', $4::bigint))",
                &[&id, &agg, &key, &(seq as i64)],
            )
            .await?;
            events.push(WrittenEvent { id, key });
            seq += 1;
        }
        tx.commit().await?;
        log.push(WrittenTxn {
            events,
            outcome: Outcome::Committed,
            end_lsn: None,
        });
    }
    Ok(())
}

fn observed_of(reader: &TopicReader) -> Vec<Observed> {
    observed(&reader.records)
}

fn wanted(log: &[WrittenTxn]) -> HashSet<String> {
    log.iter()
        .flat_map(|t| t.events.iter().map(|e| e.id.clone()))
        .collect()
}

/// Issue 10 item 1: a partitioned outbox in its own schema with custom column
/// names. A publication created the usual way (without
/// `publish_via_partition_root`) is refused at start with the SQL to fix it;
/// once fixed every event arrives, in commit order per key, including rows
/// that reached the WAL under the partitions' own names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_outbox_relays_every_event() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let db = TestDb::create_on(env, env.pg_port, "parted", false).await?;
    let mut c = db.admin(env).await?;
    c.batch_execute(PARTITIONED_DDL).await?;
    c.batch_execute(&format!(
        "CREATE PUBLICATION {} FOR TABLE billing.events WITH (publish = 'insert')",
        db.publication
    ))
    .await?;
    let t = topics(&db);
    let refs: Vec<&str> = t.iter().map(String::as_str).collect();
    create_topics(&env.kafka_bootstrap, &refs, 3).await?;
    let mut reader = TopicReader::new(&env.kafka_bootstrap, &refs)?;
    let dir = tempfile::tempdir()?;
    let cfg = partitioned_config(env, &db, dir.path());

    // 1. Refused at start, nothing created, with the exact fix.
    let (code, out) = run_to_exit(dir.path(), &cfg)?;
    assert_eq!(code, EXIT_OPERATOR, "{out}");
    assert!(
        out.contains(&format!(
            "ALTER PUBLICATION \"{}\" SET (publish_via_partition_root = true)",
            db.publication
        )),
        "{out}"
    );
    assert_eq!(db.confirmed_flush_lsn(env).await?, None, "no slot created");

    // 2. Fixed: events in every partition (and the sub-partitioned one) arrive.
    c.batch_execute(&format!(
        "ALTER PUBLICATION {} SET (publish_via_partition_root = true)",
        db.publication
    ))
    .await?;
    let mut w = Walcast::start(&bin(), dir.path(), &cfg)?;
    w.wait_streaming()?;
    let mut log = Vec::new();
    write_partitioned(&mut c, &mut log, 100, 10, 40).await?;
    assert!(
        wait_ids(&mut reader, &wanted(&log), Duration::from_secs(60))?,
        "not every event of the partitioned outbox arrived:\n{}",
        w.log_text()
    );

    // 3. Rows written while the publication published the partitions under
    // their own names (WAL the slot has not passed yet) are events too.
    w.terminate()?;
    assert!(
        w.wait_exit(Duration::from_secs(30))?.success(),
        "{}",
        w.log_text()
    );
    c.batch_execute(&format!(
        "ALTER PUBLICATION {} SET (publish_via_partition_root = false)",
        db.publication
    ))
    .await?;
    write_partitioned(&mut c, &mut log, 20, 5, 40).await?;
    c.batch_execute(&format!(
        "ALTER PUBLICATION {} SET (publish_via_partition_root = true)",
        db.publication
    ))
    .await?;
    write_partitioned(&mut c, &mut log, 20, 5, 40).await?;
    let mut w = Walcast::start(&bin(), dir.path(), &cfg)?;
    w.wait_streaming()?;
    assert!(
        wait_ids(&mut reader, &wanted(&log), Duration::from_secs(60))?,
        "events written under the partitions' names did not arrive:\n{}",
        w.log_text()
    );
    reader.read_to_end(Duration::from_secs(5))?;
    let report = check(&log, &observed_of(&reader), &[]);
    assert!(report.is_clean(), "{report}");
    for r in &reader.records {
        assert_eq!(r.header("type").as_deref(), Some("Posted"));
        assert_eq!(r.json()["key"].as_str(), Some(r.key_str().as_str()));
    }
    w.terminate()?;
    assert!(
        w.wait_exit(Duration::from_secs(30))?.success(),
        "{}",
        w.log_text()
    );
    drop(c);
    db.drop(env).await?;
    Ok(())
}

/// Issue 10 item 1: a change walcast cannot attribute to an outbox table is
/// never skipped. A publication with another table, or FOR ALL TABLES, is
/// refused at start; an outbox renamed while walcast runs stops it (exit 2)
/// before the slot passes the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_walcast_cannot_attribute_stops_it() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let db = TestDb::create(env, "foreign").await?;
    let c = db.admin(env).await?;
    let dir = tempfile::tempdir()?;
    let cfg = WalcastConfig::for_db(env, &db, dir.path());

    // A publication that also carries another table.
    c.batch_execute(&format!(
        "CREATE TABLE ledger (id bigserial PRIMARY KEY, note text);
         ALTER PUBLICATION {} ADD TABLE ledger",
        db.publication
    ))
    .await?;
    let (code, out) = run_to_exit(dir.path(), &cfg)?;
    assert_eq!(code, EXIT_OPERATOR, "{out}");
    assert!(
        out.contains("also publishes public.ledger")
            && out.contains(&format!(
                "ALTER PUBLICATION \"{}\" DROP TABLE \"public\".\"ledger\"",
                db.publication
            )),
        "{out}"
    );
    // FOR ALL TABLES.
    let all = format!("{}_all", db.publication);
    c.batch_execute(&format!("CREATE PUBLICATION {all} FOR ALL TABLES"))
        .await?;
    let (code, out) = run_to_exit(
        dir.path(),
        &cfg.clone()
            .set("postgres", "publication", &format!("\"{all}\"")),
    )?;
    assert_eq!(code, EXIT_OPERATOR, "{out}");
    assert!(out.contains("is FOR ALL TABLES"), "{out}");
    c.batch_execute(&format!(
        "ALTER PUBLICATION {} DROP TABLE ledger",
        db.publication
    ))
    .await?;

    // Renamed while running: the next row of the renamed table stops walcast.
    let t = topics(&db);
    let refs: Vec<&str> = t.iter().map(String::as_str).collect();
    create_topics(&env.kafka_bootstrap, &refs, 3).await?;
    let mut reader = TopicReader::new(&env.kafka_bootstrap, &refs)?;
    let mut w = Walcast::start(&bin(), dir.path(), &cfg)?;
    w.wait_streaming()?;
    let insert = "INSERT INTO {T} (aggregatetype, aggregateid, type, payload) VALUES ('Order', 'k', 'T', '{}') RETURNING id::text";
    let before: String = c
        .query_one(&insert.replace("{T}", "outbox"), &[])
        .await?
        .get(0);
    c.batch_execute("ALTER TABLE outbox RENAME TO outbox_retired")
        .await?;
    // The bound: the WAL insert position after the INSERT, before its
    // COMMIT. Logical decoding sends a transaction again when its commit
    // record lies at or past the slot's confirmed position, so the change
    // is passed only if the slot confirmed beyond this point. (walcast may
    // confirm keepalive positions up to here while the transaction is open.)
    c.batch_execute("BEGIN").await?;
    c.query_one(&insert.replace("{T}", "outbox_retired"), &[])
        .await?;
    let lsn_before = c
        .query_one("SELECT (pg_current_wal_insert_lsn() - '0/0')::bigint", &[])
        .await?
        .get::<_, i64>(0) as u64;
    c.batch_execute("COMMIT").await?;
    let status = w.wait_exit(Duration::from_secs(60))?;
    let text = w.log_text();
    assert_eq!(status.code(), Some(EXIT_OPERATOR), "{text}");
    assert!(
        text.contains("INSERT on public.outbox_retired"),
        "the error names the relation: {text}"
    );
    let confirmed = db.confirmed_flush_lsn(env).await?.unwrap_or(0);
    assert!(
        confirmed <= lsn_before,
        "the slot passed the unattributed change: {confirmed:X} > {lsn_before:X}"
    );
    let want: HashSet<String> = [before].into_iter().collect();
    assert!(
        wait_ids(&mut reader, &want, Duration::from_secs(30))?,
        "the event before the rename was not delivered"
    );
    // A restart does not get past it either: walcast stops again before
    // streaming (the configured table is gone), and the slot stays before
    // the change.
    let (code, out) = run_to_exit(dir.path(), &cfg)?;
    assert_eq!(code, EXIT_OPERATOR, "{out}");
    assert!(
        out.contains("outbox table public.outbox does not exist"),
        "the restart names the missing table: {out}"
    );
    let confirmed = db.confirmed_flush_lsn(env).await?.unwrap_or(0);
    assert!(
        confirmed <= lsn_before,
        "a restart passed the unattributed change: {confirmed:X} > {lsn_before:X}"
    );
    drop(c);
    db.drop(env).await?;
    Ok(())
}

/// Issue 10 items 4 and 5: a row above `pipeline.max_row_bytes` stops walcast
/// (exit 3) after the events before it were delivered, without moving the
/// slot past it; transactional logical messages are logged (once per
/// prefix) and do not hold the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_rows_and_logical_messages() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let db = TestDb::create(env, "rowmax").await?;
    let c = db.admin(env).await?;
    let t = topics(&db);
    let refs: Vec<&str> = t.iter().map(String::as_str).collect();
    create_topics(&env.kafka_bootstrap, &refs, 3).await?;
    let mut reader = TopicReader::new(&env.kafka_bootstrap, &refs)?;
    let dir = tempfile::tempdir()?;
    let cfg = WalcastConfig::for_db(env, &db, dir.path()).set("pipeline", "max_row_bytes", "65536");
    let mut w = Walcast::start(&bin(), dir.path(), &cfg)?;
    w.wait_streaming()?;
    let insert = |pad: i32| {
        format!("INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('Order', 'k', 'T', jsonb_build_object('pad', repeat('x', {pad}))) RETURNING id::text")
    };

    // Logical messages inside outbox transactions: logged, counted, never held.
    let mut want = HashSet::new();
    for _ in 0..3 {
        c.batch_execute("BEGIN").await?;
        c.execute(
            "SELECT pg_logical_emit_message(true, 'acme.events', 'hello')",
            &[],
        )
        .await?;
        want.insert(c.query_one(&insert(10), &[]).await?.get::<_, String>(0));
        c.batch_execute("COMMIT").await?;
    }
    assert!(wait_ids(&mut reader, &want, Duration::from_secs(30))?);
    let end = current_wal_lsn(&c).await?;
    assert!(
        wait_confirmed(env, &db, end, Duration::from_secs(20)).await?,
        "the slot did not pass the messages:\n{}",
        w.log_text()
    );
    let text = w.log_text();
    assert_eq!(
        text.matches("pg_logical_emit_message(true, \"acme.events\"")
            .count(),
        1,
        "one warning per prefix: {text}"
    );

    // A row above max_row_bytes, between rows below it.
    let small_before: String = c.query_one(&insert(100), &[]).await?.get(0);
    let lsn_before = current_wal_lsn(&c).await?;
    c.batch_execute("BEGIN").await?;
    c.query_one(&insert(100), &[]).await?;
    c.query_one(&insert(100_000), &[]).await?;
    c.batch_execute("COMMIT").await?;
    c.query_one(&insert(100), &[]).await?;
    let status = w.wait_exit(Duration::from_secs(60))?;
    let text = w.log_text();
    assert_eq!(status.code(), Some(EXIT_PERMANENT), "{text}");
    assert!(text.contains("pipeline.max_row_bytes (65536)"), "{text}");
    let confirmed = db.confirmed_flush_lsn(env).await?.unwrap_or(0);
    assert!(
        confirmed <= lsn_before,
        "the slot moved past the oversize row: {confirmed:X} > {lsn_before:X}"
    );
    let want: HashSet<String> = [small_before].into_iter().collect();
    assert!(wait_ids(&mut reader, &want, Duration::from_secs(30))?);
    // A restart stops at the same row: it is never skipped.
    let (code, out) = run_to_exit(dir.path(), &cfg)?;
    assert_eq!(code, EXIT_PERMANENT, "{out}");
    assert!(db.confirmed_flush_lsn(env).await?.unwrap_or(0) <= lsn_before);
    drop(c);
    db.drop(env).await?;
    Ok(())
}

/// Issue 10 item 1: an outbox swapped for a new table of the same name while
/// walcast runs (the new table is outside the publication, so its rows never
/// reach the stream) stops walcast with the fix, instead of relaying nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_outbox_stops_walcast() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let db = TestDb::create(env, "swap").await?;
    let c = db.admin(env).await?;
    let dir = tempfile::tempdir()?;
    let cfg = WalcastConfig::for_db(env, &db, dir.path()).set(
        "postgres",
        "catalog_check_interval_ms",
        "500",
    );
    let mut w = Walcast::start(&bin(), dir.path(), &cfg)?;
    w.wait_streaming()?;
    c.batch_execute(
        "BEGIN;
         ALTER TABLE outbox RENAME TO outbox_old;
         CREATE TABLE outbox (LIKE outbox_old INCLUDING ALL);
         COMMIT;
         INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('Order', 'k', 'T', '{}');",
    )
    .await?;
    let status = w.wait_exit(Duration::from_secs(30))?;
    let text = w.log_text();
    assert_eq!(status.code(), Some(EXIT_OPERATOR), "{text}");
    assert!(
        text.contains("was replaced by another table of the same name")
            && text.contains(&format!(
                "ALTER PUBLICATION \"{}\" ADD TABLE \"public\".\"outbox\"",
                db.publication
            )),
        "{text}"
    );
    // A restart refuses too: the publication does not hold the new table.
    let (code, out) = run_to_exit(dir.path(), &cfg)?;
    assert_eq!(code, EXIT_OPERATOR, "{out}");
    drop(c);
    db.drop(env).await?;
    Ok(())
}

/// What applications do around their outbox INSERTs, with a publication
/// that publishes every operation: a savepoint rolled back inside the
/// transaction (its event never existed), the insert-then-delete pattern
/// that keeps the table empty (the event is relayed), and a TRUNCATE. Only
/// the committed INSERTs arrive, in commit order, and walcast keeps going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn savepoints_deletes_and_truncate_around_outbox_inserts() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let db = TestDb::create(env, "savepoint").await?;
    let c = db.admin(env).await?;
    c.batch_execute(&format!(
        "ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate')",
        db.publication
    ))
    .await?;
    let t = topics(&db);
    let refs: Vec<&str> = t.iter().map(String::as_str).collect();
    create_topics(&env.kafka_bootstrap, &refs, 3).await?;
    let mut reader = TopicReader::new(&env.kafka_bootstrap, &refs)?;
    let dir = tempfile::tempdir()?;
    let cfg = WalcastConfig::for_db(env, &db, dir.path());
    let mut w = Walcast::start(&bin(), dir.path(), &cfg)?;
    w.wait_streaming()?;
    let insert = |ty: &str| {
        format!("INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('Order', 'k', '{ty}', '{{}}') RETURNING id::text")
    };
    let mut written = Vec::new();
    c.batch_execute("BEGIN").await?;
    written.push(c.query_one(&insert("e1"), &[]).await?.get::<_, String>(0));
    c.batch_execute("SAVEPOINT s1").await?;
    let rolled_back: String = c.query_one(&insert("rolled-back"), &[]).await?.get(0);
    c.batch_execute("ROLLBACK TO SAVEPOINT s1").await?;
    written.push(c.query_one(&insert("e2"), &[]).await?.get::<_, String>(0));
    c.batch_execute("COMMIT").await?;
    c.batch_execute("BEGIN").await?;
    let e3: String = c.query_one(&insert("e3"), &[]).await?.get(0);
    c.execute("DELETE FROM outbox WHERE id = $1::text::uuid", &[&e3])
        .await?;
    c.batch_execute("COMMIT").await?;
    written.push(e3);
    c.batch_execute("TRUNCATE outbox").await?;
    written.push(c.query_one(&insert("e4"), &[]).await?.get::<_, String>(0));
    let end = current_wal_lsn(&c).await?;
    let want: HashSet<String> = written.iter().cloned().collect();
    assert!(
        wait_ids(&mut reader, &want, Duration::from_secs(60))?,
        "not every committed event arrived:\n{}",
        w.log_text()
    );
    assert!(
        wait_confirmed(env, &db, end, Duration::from_secs(30)).await?,
        "the slot did not pass the TRUNCATE:\n{}",
        w.log_text()
    );
    reader.read_to_end(Duration::from_secs(2))?;
    let mut got: Vec<(i32, i64, String)> = reader
        .records
        .iter()
        .map(|r| (r.partition, r.offset, r.header("id").unwrap_or_default()))
        .collect();
    got.sort();
    let ids: Vec<String> = got.into_iter().map(|(_, _, id)| id).collect();
    assert_eq!(
        ids, written,
        "the committed events, once each, in commit order"
    );
    assert!(!ids.contains(&rolled_back));
    assert!(w.is_running(), "walcast stopped:\n{}", w.log_text());
    w.terminate()?;
    w.wait_exit(Duration::from_secs(30))?;
    drop(c);
    db.drop(env).await?;
    Ok(())
}
