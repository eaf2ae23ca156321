//! The outbox writer library (`walcast-outbox`, issue 13) against the real
//! services: events written with it commit or roll back with the caller's
//! business rows, and every mode reaches Kafka through the real walcast
//! binary with the same records.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::Result;
use serde_json::json;
use walcast_outbox::{migrations, Event, Mode, Outbox};
use walcast_tests::kafka::Record;
use walcast_tests::pg::TestDb;
use walcast_tests::process::{Walcast, WalcastConfig};
use walcast_tests::TestEnv;

use crate::common::*;

/// A database with the library's own migrations (plain or hash-partitioned
/// outbox, processed_events) and the publication walcast would create.
pub async fn library_db(env: &TestEnv, tag: &str, layout: migrations::Layout) -> Result<TestDb> {
    let db = TestDb::create_on(env, env.pg_port, tag, false).await?;
    let c = db.admin(env).await?;
    migrations::apply(&c, layout).await?;
    // Applying twice is harmless.
    migrations::apply(&c, layout).await?;
    c.batch_execute(&format!(
        "CREATE PUBLICATION {} FOR TABLE public.outbox \
         WITH (publish = 'insert', publish_via_partition_root = true);
         CREATE TABLE withdrawal (id text PRIMARY KEY, amount_cents bigint NOT NULL)",
        db.publication
    ))
    .await?;
    Ok(db)
}

/// walcast's configuration for `db` with the writer's own routes
/// (`migrations::WALCAST_CONFIG`, the README's ready-to-paste config) in place
/// of the default `[outbox]` tables, topics under the database's prefix.
pub fn library_config(env: &TestEnv, db: &TestDb, state: &std::path::Path) -> WalcastConfig {
    let mut cfg = WalcastConfig::for_db(env, db, state);
    let tables = "tables = [\"public.outbox\"]\n";
    assert!(cfg.toml.contains(tables));
    cfg.toml = cfg.toml.replace(tables, "");
    cfg.toml.push('\n');
    cfg.toml.push_str(
        &migrations::WALCAST_CONFIG.replace("outbox.event.", &format!("{}.", db.topic_prefix)),
    );
    cfg
}

fn by_id(records: &[Record]) -> HashMap<String, &Record> {
    records
        .iter()
        .filter_map(|r| r.header("id").map(|id| (id, r)))
        .collect()
}

/// Business row and event commit together or not at all: a rolled-back
/// transaction and one aborted by a failing business statement leave neither
/// the row nor a record; a committed one leaves both. Insert, insert-delete
/// and table-less (logical decoding message), single and batch enqueue, on
/// the plain and the hash-partitioned layout, reach Kafka through walcast
/// (configured with `migrations::WALCAST_CONFIG`) with identical records:
/// topic, key, value bytes, headers `id`, `type`, `correlation_id` and
/// `traceparent`; insert-delete and table-less leave the table empty; the
/// table modes refuse an event with another header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_events_commit_with_the_business_rows_in_every_mode() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    for layout in [
        migrations::Layout::Plain,
        migrations::Layout::HashPartitioned,
    ] {
        let db = library_db(env, "writer", layout).await?;
        let mut reader = reader(env, &db).await?;
        let state = tempfile::tempdir()?;
        let mut w = Walcast::start(
            &bin(),
            state.path(),
            &library_config(env, &db, state.path()),
        )?;
        w.wait_streaming()?;
        let mut client = db.admin(env).await?;
        let insert = Outbox::default();
        let insert_delete = Outbox::default().mode(Mode::InsertDelete);
        let message = Outbox::default().mode(Mode::Message);
        let modes = [&insert, &insert_delete, &message];

        let event = |n: usize| {
            Event::new(
                "Payment",
                format!("w-{n}"),
                "WithdrawalRequested",
                json!({"withdrawal": format!("w-{n}"), "amountCents": 100 + n}),
            )
            .correlation_id(format!("corr-{n}"))
            .traceparent(format!("00-{:032x}-{:016x}-01", n + 1, n + 7))
        };

        // Another header: the table modes refuse it, the envelope carries it.
        for outbox in [&insert, &insert_delete] {
            let err = outbox
                .enqueue(&client, &event(0).header("tenant", "acme"))
                .await
                .expect_err("a header the table cannot carry must be refused");
            assert!(err.to_string().contains("Mode::Message"), "{err}");
        }

        // 1. Rolled back: neither row nor event.
        let rolled_back = event(1);
        {
            let tx = client.transaction().await?;
            tx.execute("INSERT INTO withdrawal VALUES ('w-1', 101)", &[])
                .await?;
            insert.enqueue(&tx, &rolled_back).await?;
            tx.rollback().await?;
        }
        // 2. Aborted by a failing business statement after the enqueue.
        let aborted = event(2);
        {
            let tx = client.transaction().await?;
            insert.enqueue(&tx, &aborted).await?;
            let dup = tx
                .execute("INSERT INTO withdrawal VALUES ('w-2', 1), ('w-2', 2)", &[])
                .await;
            assert!(dup.is_err(), "the duplicate key must fail");
            // Postgres answers COMMIT of an aborted transaction with ROLLBACK.
            let _ = tx.commit().await;
        }
        // 3. Committed in each mode, with identical content.
        let mut committed = Vec::new();
        for outbox in modes {
            let n = 3;
            let e = event(n);
            let tx = client.transaction().await?;
            tx.execute(
                "INSERT INTO withdrawal VALUES ($1, 103) ON CONFLICT DO NOTHING",
                &[&format!("w-{n}")],
            )
            .await?;
            outbox.enqueue(&tx, &e).await?;
            tx.commit().await?;
            committed.push(e);
        }
        // 4. A batch of 500 in one statement per mode, over 20 aggregates.
        let mut batches: Vec<Vec<Event>> = Vec::new();
        for outbox in modes {
            let batch: Vec<Event> = (0..500).map(|i| event(1000 + i % 20)).collect();
            let tx = client.transaction().await?;
            assert_eq!(outbox.enqueue_batch(&tx, &batch).await?, 500);
            tx.commit().await?;
            committed.extend(batch.iter().cloned());
            batches.push(batch);
        }

        // The business rows: only w-3.
        let rows: Vec<String> = client
            .query("SELECT id FROM withdrawal ORDER BY id", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(rows, vec!["w-3".to_string()]);
        // The table holds only the insert mode's rows.
        let in_table: i64 = client
            .query_one("SELECT count(*) FROM outbox", &[])
            .await?
            .get(0);
        assert_eq!(
            in_table, 501,
            "insert-delete and table-less must leave no row"
        );

        let want: HashSet<String> = committed.iter().map(|e| e.id.to_string()).collect();
        assert!(
            wait_ids(&mut reader, &want, Duration::from_secs(60))?,
            "not every committed event arrived:\n{}",
            w.log_text()
        );
        reader.read_to_end(Duration::from_secs(30))?;
        let got = by_id(&reader.records);
        assert_eq!(
            reader.records.len(),
            committed.len(),
            "exactly the committed events"
        );
        for gone in [&rolled_back, &aborted] {
            assert!(
                !got.contains_key(&gone.id.to_string()),
                "event of an uncommitted transaction reached Kafka"
            );
        }
        let shape = |r: &Record| {
            (
                r.topic.clone(),
                r.key_str(),
                // Text, for a readable failure (the payloads are JSON).
                r.value
                    .as_deref()
                    .map(|v| String::from_utf8_lossy(v).into_owned()),
                r.header("type"),
                r.header("correlation_id"),
                r.header("traceparent"),
            )
        };
        for e in &committed {
            let r = got[&e.id.to_string()];
            assert_eq!(r.topic, format!("{}.Payment", db.topic_prefix));
            assert_eq!(r.key_str(), e.aggregate_id);
            assert_eq!(r.header("type").as_deref(), Some("WithdrawalRequested"));
            assert_eq!(
                r.header("correlation_id"),
                e.headers.get("correlation_id").cloned()
            );
            assert_eq!(
                r.header("traceparent"),
                e.headers.get("traceparent").cloned()
            );
            let walcast_outbox::Payload::Json(v) = &e.payload else {
                unreachable!()
            };
            assert_eq!(&r.json(), v);
        }
        // Every mode: identical records for identical content.
        for other in &committed[1..3] {
            assert_eq!(
                shape(got[&committed[0].id.to_string()]),
                shape(got[&other.id.to_string()])
            );
        }
        for other in &batches[1..] {
            for (a, b) in batches[0].iter().zip(other) {
                assert_eq!(shape(got[&a.id.to_string()]), shape(got[&b.id.to_string()]));
            }
        }
        // Per aggregate, a batch arrives in enqueue order.
        for batch in &batches {
            let mut last: HashMap<&str, (i32, i64)> = HashMap::new();
            for e in batch {
                let r = got[&e.id.to_string()];
                if let Some(prev) = last.insert(&e.aggregate_id, (r.partition, r.offset)) {
                    assert_eq!(prev.0, r.partition);
                    assert!(
                        prev.1 < r.offset,
                        "batch order broken for {}",
                        e.aggregate_id
                    );
                }
            }
        }
        w.kill9()?;
        drop(client);
        db.drop(env).await?;
    }
    Ok(())
}

fn admin_url(env: &TestEnv, db: &TestDb) -> String {
    format!(
        "host={} port={} dbname={} user={} password={}",
        env.pg_host, db.port, db.name, env.admin_user, env.admin_password
    )
}

async fn ids_in_table(c: &tokio_postgres::Client) -> Result<HashSet<String>> {
    Ok(c.query("SELECT id::text FROM outbox", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// `walcast outbox prune` never deletes a row whose event the slot has not
/// confirmed: with walcast stopped it deletes nothing (exit 1, the slot is
/// behind); a row of a transaction still open is never deleted, whatever its
/// `created_at`; young rows stay. Then under load (a writer committing
/// while prune runs in a loop), every row a prune deleted was already
/// appended to Kafka when that prune returned (topics stamped with
/// `LogAppendTime`), and in the end every event is in Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_prune_never_deletes_unconfirmed_rows() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let db = library_db(env, "prune", migrations::Layout::Plain).await?;
    let t = topics(&db);
    let refs: Vec<&str> = t.iter().map(String::as_str).collect();
    walcast_tests::kafka::create_topics_with(
        &env.kafka_bootstrap,
        &refs,
        3,
        1,
        &[("message.timestamp.type", "LogAppendTime")],
    )
    .await?;
    let mut reader = walcast_tests::kafka::TopicReader::new(&env.kafka_bootstrap, &refs)?;
    let state = tempfile::tempdir()?;
    let cfg = WalcastConfig::for_db(env, &db, state.path());
    let cfg_file = state.path().join("prune.toml");
    std::fs::write(&cfg_file, &cfg.toml)?;
    let prune_cmd = |older: &str, wait: &str| -> Result<(i32, String)> {
        let (status, out) = Walcast::run_to_exit(
            &bin(),
            &[
                "outbox",
                "prune",
                "--config",
                cfg_file.to_str().unwrap(),
                "--database-url",
                &admin_url(env, &db),
                "--older-than",
                older,
                "--wait-timeout",
                wait,
            ],
            Duration::from_secs(120),
        )?;
        Ok((status.code().unwrap_or(-1), out))
    };
    let mut w = Walcast::start(&bin(), state.path(), &cfg)?;
    w.wait_streaming()?;
    let mut client = db.admin(env).await?;
    let outbox = Outbox::default();
    let mut all: HashSet<String> = HashSet::new();
    let batch: Vec<Event> = (0..50)
        .map(|i| Event::new("Order", format!("o-{i}"), "Placed", json!({"i": i})))
        .collect();
    outbox.enqueue_batch(&client, &batch).await?;
    all.extend(batch.iter().map(|e| e.id.to_string()));
    assert!(wait_ids(&mut reader, &all, Duration::from_secs(60))?);
    w.kill9()?;

    // walcast stopped: 20 more events, then everything made old.
    let batch: Vec<Event> = (0..20)
        .map(|i| Event::new("Order", format!("o-{i}"), "Shipped", json!({"i": i})))
        .collect();
    outbox.enqueue_batch(&client, &batch).await?;
    all.extend(batch.iter().map(|e| e.id.to_string()));
    client
        .batch_execute("UPDATE outbox SET created_at = now() - interval '2 days'")
        .await?;
    let (code, out) = prune_cmd("24h", "2s")?;
    assert_eq!(
        code, 1,
        "prune must refuse while the slot is behind:\n{out}"
    );
    assert!(out.contains("confirmed"), "{out}");
    assert_eq!(
        ids_in_table(&client).await?.len(),
        70,
        "nothing may be deleted"
    );

    // An open transaction with an old row, and a young row.
    let mut other = db.admin(env).await?;
    let open = other.transaction().await?;
    let pending = Event::new("Order", "o-pending", "Placed", json!({}));
    open.execute(
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, created_at) \
         VALUES ($1, 'Order', 'o-pending', 'Placed', '{}', now() - interval '3 days')",
        &[&pending.id],
    )
    .await?;
    let young = Event::new("Order", "o-young", "Placed", json!({}));
    outbox.enqueue(&client, &young).await?;
    all.insert(young.id.to_string());

    let mut w = Walcast::start(&bin(), state.path(), &cfg)?;
    w.wait_streaming()?;
    let (code, out) = prune_cmd("24h", "60s")?;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("deleted 70 rows"), "{out}");
    assert_eq!(
        ids_in_table(&client).await?,
        HashSet::from([young.id.to_string()]),
        "the young row stays; the open transaction's row is not visible yet"
    );
    open.commit().await?;
    all.insert(pending.id.to_string());
    assert!(ids_in_table(&client)
        .await?
        .contains(&pending.id.to_string()));
    let (code, out) = prune_cmd("24h", "60s")?;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("deleted 1 rows"), "{out}");
    drop(other);

    // Under load.
    let writer_db = db.admin(env).await?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let writer = tokio::spawn(async move {
        let mut c = writer_db;
        let outbox = Outbox::default();
        let mut ids = Vec::new();
        let mut n = 0usize;
        while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
            let events: Vec<Event> = (0..1 + n % 20)
                .map(|i| {
                    Event::new(
                        "Payment",
                        format!("p-{}", (n + i) % 50),
                        "Paid",
                        json!({"n": n}),
                    )
                })
                .collect();
            let tx = c.transaction().await?;
            outbox.enqueue_batch(&tx, &events).await?;
            tx.commit().await?;
            ids.extend(events.iter().map(|e| e.id.to_string()));
            n += 1;
        }
        anyhow::Ok(ids)
    });
    let mut checks = Vec::new();
    let mut deleted_total = 0;
    let prune_opts = walcast_outbox::PruneOptions {
        table: "outbox".into(),
        slot: db.slot.clone(),
        older_than: Duration::ZERO,
        wait_timeout: Duration::from_secs(30),
    };
    for _ in 0..15 {
        let before = ids_in_table(&client).await?;
        let report = walcast_outbox::prune(&mut client, &prune_opts).await?;
        let returned_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as i64;
        let after = ids_in_table(&client).await?;
        let deleted: Vec<String> = before.difference(&after).cloned().collect();
        deleted_total += report.deleted;
        checks.push((deleted, returned_ms));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let written = writer.await??;
    all.extend(written.iter().cloned());
    eprintln!(
        "prune under load: {} events written, {deleted_total} rows pruned in 15 runs",
        written.len()
    );
    assert!(deleted_total > 0, "the load test pruned nothing");
    assert!(
        wait_ids(&mut reader, &all, Duration::from_secs(120))?,
        "not every event reached Kafka:\n{}",
        w.log_text()
    );
    reader.read_to_end(Duration::from_secs(30))?;
    let appended: HashMap<String, i64> = reader
        .records
        .iter()
        .map(|r| {
            (
                r.header("id").unwrap(),
                r.appended_ms.expect("LogAppendTime"),
            )
        })
        .collect();
    for (deleted, returned_ms) in &checks {
        for id in deleted {
            let at = appended.get(id).copied();
            assert!(
                at.is_some_and(|at| at <= *returned_ms),
                "row {id} was pruned (prune returned at {returned_ms}) before its event was appended to Kafka ({at:?})"
            );
        }
    }
    w.kill9()?;
    drop(client);
    db.drop(env).await?;
    Ok(())
}

/// The table-less mode: each event of a committed transaction is a
/// transactional logical decoding message (prefix `walcast`) whose content
/// decodes as the `walcast.v1.Envelope` of the event, in enqueue order; a
/// rolled-back transaction's messages never reach the WAL stream. Read from
/// the WAL with a pgoutput slot (`messages = true`), below walcast; that
/// walcast relays them like the table modes is
/// `writer_events_commit_with_the_business_rows_in_every_mode`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_table_less_mode_writes_envelopes_into_the_wal() -> Result<()> {
    use bytes::Bytes;
    use walcast_pgoutput::{Decoder, Message};
    let env = TestEnv::get();
    let _g = env.shared().await;
    let db = library_db(env, "tableless", migrations::Layout::Plain).await?;
    let mut client = db.admin(env).await?;
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&db.slot],
        )
        .await?;
    let outbox = Outbox::default().mode(Mode::Message);
    let mk = |i: usize| {
        Event::new(
            "Payment",
            format!("w-{}", i % 3),
            "WithdrawalRequested",
            json!({"n": i}),
        )
        .correlation_id(format!("corr-{i}"))
        .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .header("tenant", "acme")
    };
    let committed: Vec<Event> = (0..10).map(mk).collect();
    let rolled_back: Vec<Event> = (10..13).map(mk).collect();
    let tx = client.transaction().await?;
    tx.execute("INSERT INTO withdrawal VALUES ('w-0', 5)", &[])
        .await?;
    outbox.enqueue(&tx, &committed[0]).await?;
    assert_eq!(outbox.enqueue_batch(&tx, &committed[1..]).await?, 9);
    tx.commit().await?;
    let tx = client.transaction().await?;
    outbox.enqueue_batch(&tx, &rolled_back).await?;
    tx.rollback().await?;
    let in_table: i64 = client
        .query_one("SELECT count(*) FROM outbox", &[])
        .await?
        .get(0);
    assert_eq!(in_table, 0, "the table-less mode writes no row");

    let rows = client
        .query(
            "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL, \
             'proto_version', '1', 'publication_names', $2, 'messages', 'true')",
            &[&db.slot, &db.publication],
        )
        .await?;
    let mut decoder = Decoder::new(1);
    let mut got = Vec::new();
    for row in rows {
        let data: Vec<u8> = row.get(0);
        if let Message::Message(m) = decoder.decode(&Bytes::from(data))? {
            assert_eq!(m.prefix, "walcast");
            assert!(m.is_transactional());
            got.push(walcast_envelope::decode_message_content(&m.content)?);
        }
    }
    assert_eq!(got.len(), committed.len(), "exactly the committed events");
    for (e, env) in committed.iter().zip(&got) {
        assert_eq!(env.event_id, e.id.to_string());
        assert_eq!(env.aggregate_type, "Payment");
        assert_eq!(env.aggregate_id, e.aggregate_id);
        assert_eq!(env.event_type, "WithdrawalRequested");
        assert_eq!(env.content_type, "application/json");
        let walcast_outbox::Payload::Json(v) = &e.payload else {
            unreachable!()
        };
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&env.payload)?,
            *v
        );
        assert_eq!(env.correlation_id, e.headers["correlation_id"]);
        assert_eq!(env.traceparent, e.headers["traceparent"]);
        assert_eq!(env.headers.len(), 1);
        assert_eq!(env.headers[0].key, "tenant");
        assert_eq!(env.headers[0].value, b"acme");
        assert_eq!(
            env.timestamp_unix_micros, 0,
            "0: walcast uses the commit time"
        );
    }
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&db.slot])
        .await?;
    drop(client);
    db.drop(env).await?;
    Ok(())
}

/// An outbox table made by the earlier `0001_outbox.sql` (with `headers
/// jsonb`, without the trace columns) is upgraded by `migrations::apply`
/// (`0003_outbox_trace_columns.sql`): the writer then stores the correlation
/// id and traceparent in the columns walcast's route reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_migrations_upgrade_an_earlier_outbox_table() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let db = TestDb::create_on(env, env.pg_port, "upgrade", false).await?;
    let c = db.admin(env).await?;
    c.batch_execute(
        "CREATE TABLE outbox (id uuid PRIMARY KEY, aggregatetype text NOT NULL, \
         aggregateid text NOT NULL, type text NOT NULL, payload jsonb NOT NULL, \
         headers jsonb NOT NULL DEFAULT '{}'::jsonb, created_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    migrations::apply(&c, migrations::Layout::Plain).await?;
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let e = Event::new("Payment", "w-1", "WithdrawalRequested", json!({}))
        .correlation_id("corr-1")
        .traceparent(tp);
    Outbox::default().enqueue(&c, &e).await?;
    let row = c
        .query_one(
            "SELECT correlation_id, tracingspancontext FROM outbox WHERE id = $1",
            &[&e.id],
        )
        .await?;
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("corr-1"));
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some(tp));
    drop(c);
    db.drop(env).await?;
    Ok(())
}

/// Partition names `outbox_pYYYYMMDD` of the days `offsets` from today (UTC).
async fn day_partitions(c: &tokio_postgres::Client, offsets: &[i32]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for d in offsets {
        out.push(
            c.query_one(
                "SELECT 'outbox_p' || to_char((now() AT TIME ZONE 'UTC')::date + $1::int, 'YYYYMMDD')",
                &[d],
            )
            .await?
            .get(0),
        );
    }
    Ok(out)
}

/// The partitions attached to `outbox`, by name.
async fn attached(c: &tokio_postgres::Client) -> Result<Vec<String>> {
    Ok(c.query(
        "SELECT c.relname::text FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid \
         WHERE h.inhparent = 'outbox'::regclass ORDER BY 1",
        &[],
    )
    .await?
    .iter()
    .map(|r| r.get(0))
    .collect())
}

/// Whether a table of that name exists (attached or not).
async fn table_exists(c: &tokio_postgres::Client, name: &str) -> Result<bool> {
    Ok(
        c.query_one("SELECT to_regclass($1::text) IS NOT NULL", &[&name])
            .await?
            .get(0),
    )
}

/// `n` events written straight into the partition of day `day` (from today,
/// UTC; `created_at` at noon), as an application whose clock said so would.
async fn old_events(
    c: &impl tokio_postgres::GenericClient,
    day: i32,
    n: usize,
) -> Result<Vec<String>> {
    let ids: Vec<uuid::Uuid> = (0..n).map(|_| uuid::Uuid::new_v4()).collect();
    let keys: Vec<String> = (0..n).map(|i| format!("w-{}", i % 7)).collect();
    c.execute(
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, created_at) \
         SELECT i, 'Payment', k, 'Old', jsonb_build_object('day', $3::int), \
                ((now() AT TIME ZONE 'UTC')::date + $3::int)::timestamp AT TIME ZONE 'UTC' + interval '12 hours' \
         FROM unnest($1::uuid[], $2::text[]) AS u(i, k)",
        &[&ids, &keys, &day],
    )
    .await?;
    Ok(ids.iter().map(|i| i.to_string()).collect())
}

/// `walcast outbox rotate` on the range-partitioned outbox
/// (`migrations::Layout::RangePartitioned`), with the publication walcast
/// creates itself (via the root): the migration makes today and 3 days
/// ahead, rotate creates up to --ahead; walcast relays inserts into every
/// partition through the root's route (`writer.enqueue` into today's, rows
/// of old days). With walcast running, the old partitions are dropped and
/// their events are in Kafka. With walcast stopped, rotate detaches the old
/// partition but drops nothing (exit 1) and its rows stay readable; a dry
/// run lists the pending drop and changes nothing. While a transaction
/// writing into the old partition is open, DETACH gives up after
/// --lock-timeout (exit 1, still attached). Started right after
/// walcast, rotate drops that partition only once its events were appended
/// to Kafka (topics stamped with `LogAppendTime`, compared with when rotate
/// returned), although walcast decoded them after the detach. In the end
/// every event is in Kafka, and no other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_rotate_drops_partitions_only_after_their_events_are_in_kafka() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    let db = TestDb::create_on(env, env.pg_port, "rotate", false).await?;
    let client = db.admin(env).await?;
    migrations::apply(&client, migrations::Layout::RangePartitioned).await?;
    migrations::apply(&client, migrations::Layout::RangePartitioned).await?;
    // walcast creates the publication: it must own the table and may create
    // in the database.
    client
        .batch_execute(&format!(
            "ALTER TABLE outbox OWNER TO {u}; GRANT CREATE ON DATABASE {d} TO {u}",
            u = env.repl_user,
            d = db.name
        ))
        .await?;
    assert_eq!(
        attached(&client).await?,
        day_partitions(&client, &[0, 1, 2, 3]).await?,
        "the migration makes today and 3 days ahead"
    );
    // Three old days (10, 9 and 8 days ago).
    client
        .batch_execute(
            "DO $$ DECLARE d date; BEGIN FOR i IN -10..-8 LOOP \
               d := (now() AT TIME ZONE 'UTC')::date + i; \
               EXECUTE format('CREATE TABLE %I PARTITION OF outbox FOR VALUES FROM (%L) TO (%L)', \
                 'outbox_p' || to_char(d, 'YYYYMMDD'), d::text || ' 00:00:00+00', (d + 1)::text || ' 00:00:00+00'); \
             END LOOP; END $$",
        )
        .await?;
    let old = day_partitions(&client, &[-10, -9, -8]).await?;

    let topic = format!("{}.Payment", db.topic_prefix);
    walcast_tests::kafka::create_topics_with(
        &env.kafka_bootstrap,
        &[topic.as_str()],
        3,
        1,
        &[("message.timestamp.type", "LogAppendTime")],
    )
    .await?;
    let mut reader =
        walcast_tests::kafka::TopicReader::new(&env.kafka_bootstrap, &[topic.as_str()])?;
    let state = tempfile::tempdir()?;
    let cfg = library_config(env, &db, state.path()).set("postgres", "create_publication", "true");
    let cfg_file = state.path().join("rotate.toml");
    std::fs::write(&cfg_file, &cfg.toml)?;
    let url = admin_url(env, &db);
    let rotate = |extra: &[&str]| -> Result<(i32, String)> {
        let mut args = vec![
            "outbox",
            "rotate",
            "--config",
            cfg_file.to_str().unwrap(),
            "--database-url",
            &url,
            "--older-than",
            "7d",
            "--ahead",
            "5",
        ];
        args.extend_from_slice(extra);
        let (status, out) = Walcast::run_to_exit(&bin(), &args, Duration::from_secs(120))?;
        Ok((status.code().unwrap_or(-1), out))
    };

    // 1. walcast running: events in old partitions and today's.
    let mut w = Walcast::start(&bin(), state.path(), &cfg)?;
    w.wait_streaming()?;
    let mut all: HashSet<String> = HashSet::new();
    all.extend(old_events(&client, -10, 15).await?);
    all.extend(old_events(&client, -9, 15).await?);
    let today: Vec<Event> = (0..10)
        .map(|i| Event::new("Payment", format!("w-{i}"), "Today", json!({"i": i})))
        .collect();
    Outbox::default().enqueue_batch(&client, &today).await?;
    all.extend(today.iter().map(|e| e.id.to_string()));
    // 8 days ago is old too: it is dropped with the others.
    let (code, out) = rotate(&["--wait-timeout", "60s"])?;
    assert_eq!(code, 0, "{out}\n{}", w.log_text());
    for p in &old {
        assert!(out.contains(&format!("\"{p}\"")), "{p} not dropped:\n{out}");
        assert!(!table_exists(&client, p).await?, "{p} still exists");
    }
    assert_eq!(
        attached(&client).await?,
        day_partitions(&client, &[0, 1, 2, 3, 4, 5]).await?,
        "today and --ahead 5 days, nothing old"
    );
    assert!(
        wait_ids(&mut reader, &all, Duration::from_secs(60))?,
        "not every event arrived:\n{}",
        w.log_text()
    );

    // 2. walcast stopped: events of an old day are not in Kafka yet.
    w.kill9()?;
    client
        .batch_execute(
            "DO $$ DECLARE d date := (now() AT TIME ZONE 'UTC')::date - 8; BEGIN \
               EXECUTE format('CREATE TABLE %I PARTITION OF outbox FOR VALUES FROM (%L) TO (%L)', \
                 'outbox_p' || to_char(d, 'YYYYMMDD'), d::text || ' 00:00:00+00', (d + 1)::text || ' 00:00:00+00'); \
             END $$",
        )
        .await?;
    let late_partition = old[2].clone();
    let mut late = old_events(&client, -8, 20).await?;
    // A transaction still writing into it: DETACH waits for its lock at most
    // --lock-timeout (writers would queue behind it), then rotate exits 1 and
    // the partition stays attached.
    let mut other = db.admin(env).await?;
    let open = other.transaction().await?;
    late.extend(old_events(&open, -8, 1).await?);
    let (code, out) = rotate(&["--wait-timeout", "2s", "--lock-timeout", "1s"])?;
    assert_eq!(
        code, 1,
        "a DETACH that cannot get its lock gives up:\n{out}"
    );
    assert!(out.contains("--lock-timeout"), "{out}");
    assert!(
        attached(&client).await?.contains(&late_partition),
        "still attached"
    );
    open.commit().await?;
    drop(other);
    all.extend(late.iter().cloned());
    let (code, out) = rotate(&["--wait-timeout", "2s"])?;
    assert_eq!(
        code, 1,
        "rotate must not drop while the slot is behind:\n{out}"
    );
    assert!(out.contains("Nothing was dropped"), "{out}");
    assert!(
        table_exists(&client, &late_partition).await?,
        "dropped although walcast was stopped"
    );
    assert!(
        !attached(&client).await?.contains(&late_partition),
        "left detached"
    );
    let kept: i64 = client
        .query_one(&format!("SELECT count(*) FROM {late_partition}"), &[])
        .await?
        .get(0);
    assert_eq!(kept, 21, "the detached partition keeps its rows");
    let (code, out) = rotate(&["--dry-run"])?;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("was detached earlier")
            && out.contains(&format!("DROP TABLE \"public\".\"{late_partition}\"")),
        "{out}"
    );
    assert!(
        table_exists(&client, &late_partition).await?,
        "a dry run changes nothing"
    );

    // 3. walcast started, rotate at once: it drops only after the slot passed
    // the detach position, so after the events were appended to Kafka.
    let mut w = Walcast::start(&bin(), state.path(), &cfg)?;
    let (code, out) = rotate(&["--wait-timeout", "60s"])?;
    let returned_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    assert_eq!(code, 0, "{out}\n{}", w.log_text());
    assert!(
        out.contains(&format!("dropped \"public\".\"{late_partition}\"")),
        "{out}"
    );
    assert!(!table_exists(&client, &late_partition).await?);
    assert!(
        wait_ids(&mut reader, &all, Duration::from_secs(60))?,
        "events were lost:\n{}",
        w.log_text()
    );
    reader.read_to_end(Duration::from_secs(10))?;
    // The first append of each event (a restart may append it again).
    let mut appended: HashMap<String, i64> = HashMap::new();
    for r in &reader.records {
        let at = r.appended_ms.expect("LogAppendTime");
        let e = appended.entry(r.header("id").unwrap()).or_insert(at);
        *e = (*e).min(at);
    }
    for id in &late {
        let at = appended[id];
        assert!(
            at <= returned_ms,
            "partition {late_partition} was dropped (rotate returned at {returned_ms}) before event {id} was appended to Kafka ({at})"
        );
    }
    assert_eq!(appended.len(), all.len(), "every event, none other");
    assert!(
        reader
            .records
            .iter()
            .all(|r| r.topic == topic && r.key_str().starts_with("w-")),
        "every partition's rows follow the root's route"
    );
    w.kill9()?;
    drop(client);
    db.drop(env).await?;
    Ok(())
}

/// A protobuf message as an application would define it with prost.
#[derive(Clone, PartialEq, prost::Message)]
struct WithdrawalRequested {
    #[prost(string, tag = "1")]
    withdrawal_id: String,
    #[prost(int64, tag = "2")]
    amount_cents: i64,
    /// Not UTF-8: the bytes must arrive as they are.
    #[prost(bytes = "vec", tag = "3")]
    signature: Vec<u8>,
    #[prost(string, repeated, tag = "4")]
    tags: Vec<String>,
}

/// A prost message as the payload (`Event::prost`): written with `enqueue`
/// into a `bytea` payload column (insert and insert-delete) and into the
/// envelope's payload (table-less), it reaches Kafka through walcast as the
/// message's encoding, and the record's value decodes back to an equal
/// message, with the same bytes in every mode; a `jsonb` payload column
/// refuses it with a message that names the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_prost_payload_arrives_and_decodes_in_every_mode() -> Result<()> {
    use prost::Message as _;
    let env = TestEnv::get();
    let _g = env.shared().await;
    let db = TestDb::create_on(env, env.pg_port, "prost", false).await?;
    let client = db.admin(env).await?;
    migrations::apply(&client, migrations::Layout::Plain).await?;
    client
        .batch_execute(&format!(
            "CREATE TABLE outbox_bin (id uuid PRIMARY KEY, aggregatetype text NOT NULL, \
             aggregateid text NOT NULL, type text NOT NULL, payload bytea NOT NULL, \
             correlation_id text, tracingspancontext text, \
             created_at timestamptz NOT NULL DEFAULT now());
             CREATE PUBLICATION {} FOR TABLE public.outbox, public.outbox_bin \
             WITH (publish = 'insert', publish_via_partition_root = true)",
            db.publication
        ))
        .await?;
    let mut reader = reader(env, &db).await?;
    let state = tempfile::tempdir()?;
    let mut cfg = library_config(env, &db, state.path());
    cfg.toml.push_str(&format!(
        "\n[[outbox.route]]\ntable = \"public.outbox_bin\"\n\
         route_topic_replacement = \"{}.${{routedByValue}}\"\n\
         correlation_id_field = \"correlation_id\"\n\
         tracing_span_context_field = \"tracingspancontext\"\n",
        db.topic_prefix
    ));
    let mut w = Walcast::start(&bin(), state.path(), &cfg)?;
    w.wait_streaming()?;

    let message = |n: i64| WithdrawalRequested {
        withdrawal_id: format!("w-{n}"),
        amount_cents: 10_000 + n,
        signature: vec![0xff, 0x00, 0xfe, n as u8],
        tags: vec!["payout".into(), format!("n{n}")],
    };
    let event = |n: i64| {
        Event::prost(
            "Payment",
            format!("w-{n}"),
            "WithdrawalRequested",
            &message(n),
        )
        .correlation_id(format!("corr-{n}"))
    };
    let jsonb = Outbox::default();
    let err = jsonb
        .enqueue(&client, &event(0))
        .await
        .expect_err("a jsonb payload column cannot hold a protobuf payload");
    assert!(err.to_string().contains("PayloadColumn::Bytea"), "{err}");

    let bin_table = Outbox::new("outbox_bin")?.payload_column(walcast_outbox::PayloadColumn::Bytea);
    let modes = [
        bin_table.clone(),
        bin_table.mode(Mode::InsertDelete),
        Outbox::default().mode(Mode::Message),
    ];
    let mut client = client;
    let mut written: Vec<(Event, WithdrawalRequested)> = Vec::new();
    for outbox in &modes {
        // The same message in each mode, and a batch.
        let tx = client.transaction().await?;
        let e = event(1);
        outbox.enqueue(&tx, &e).await?;
        let batch: Vec<Event> = (2..7).map(event).collect();
        assert_eq!(outbox.enqueue_batch(&tx, &batch).await?, 5);
        tx.commit().await?;
        written.push((e, message(1)));
        written.extend(batch.into_iter().zip((2..7).map(message)));
    }
    let want: HashSet<String> = written.iter().map(|(e, _)| e.id.to_string()).collect();
    assert!(
        wait_ids(&mut reader, &want, Duration::from_secs(60))?,
        "not every prost event arrived:\n{}",
        w.log_text()
    );
    let got = by_id(&reader.records);
    let mut values_of_1 = Vec::new();
    for (e, m) in &written {
        let r = got[&e.id.to_string()];
        assert_eq!(r.topic, format!("{}.Payment", db.topic_prefix));
        assert_eq!(r.key_str(), e.aggregate_id);
        assert_eq!(
            r.header("correlation_id"),
            e.headers.get("correlation_id").cloned()
        );
        let value = r.value.as_deref().unwrap_or_default();
        let decoded = WithdrawalRequested::decode(value)?;
        assert_eq!(
            &decoded, m,
            "the record's value decodes back to the message"
        );
        if m == &message(1) {
            values_of_1.push(value.to_vec());
        }
    }
    assert_eq!(values_of_1.len(), 3);
    assert!(
        values_of_1.iter().all(|v| *v == message(1).encode_to_vec()),
        "every mode sends the message's encoding"
    );
    let left: i64 = client
        .query_one("SELECT count(*) FROM outbox_bin", &[])
        .await?
        .get(0);
    assert_eq!(left, 6, "only the insert mode leaves rows");
    w.kill9()?;
    drop(client);
    db.drop(env).await?;
    Ok(())
}

/// The `sqlx` entry point (`walcast-outbox` feature `sqlx`): through a
/// `sqlx::Transaction<'_, Postgres>`, an event and its business row roll
/// back together (explicit rollback, a transaction aborted by a failing
/// business statement after the enqueue, and one dropped without commit) or
/// commit together, in every mode, single and batch; `&mut PgConnection` and
/// `&PgPool` write in autocommit. Through the real walcast, exactly the
/// committed events reach Kafka with the same records as the tokio-postgres
/// entry point gives (topic, key, value, headers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_sqlx_events_commit_or_roll_back_with_the_business_rows() -> Result<()> {
    use sqlx::Connection as _;
    let env = TestEnv::get();
    let _g = env.shared().await;
    let db = library_db(env, "sqlx", migrations::Layout::Plain).await?;
    let mut reader = reader(env, &db).await?;
    let state = tempfile::tempdir()?;
    let mut w = Walcast::start(
        &bin(),
        state.path(),
        &library_config(env, &db, state.path()),
    )?;
    w.wait_streaming()?;
    let url = format!(
        "postgres://{}:{}@{}:{}/{}",
        env.admin_user, env.admin_password, env.pg_host, db.port, db.name
    );
    let mut conn = sqlx::PgConnection::connect(&url).await?;
    let event = |n: usize| {
        Event::new(
            "Payment",
            format!("w-{n}"),
            "WithdrawalRequested",
            json!({"withdrawal": format!("w-{n}"), "amountCents": n}),
        )
        .correlation_id(format!("corr-{n}"))
        .traceparent(format!("00-{:032x}-{:016x}-01", n + 1, n + 7))
    };
    let insert = Outbox::default();
    let modes = [
        insert.clone(),
        Outbox::default().mode(Mode::InsertDelete),
        Outbox::default().mode(Mode::Message),
    ];
    let business = |id: String| {
        sqlx::query("INSERT INTO withdrawal (id, amount_cents) VALUES ($1, 1)").bind(id)
    };

    // Rolled back: explicitly, by a failing business statement, by a drop.
    let mut gone = Vec::new();
    for (i, outbox) in modes.iter().enumerate() {
        let e = event(10 + i);
        let mut tx = conn.begin().await?;
        business(e.aggregate_id.clone()).execute(&mut *tx).await?;
        outbox.enqueue_sqlx(&mut tx, &e).await?;
        tx.rollback().await?;
        gone.push(e);

        let e = event(20 + i);
        let mut tx = conn.begin().await?;
        outbox.enqueue_sqlx(&mut tx, &e).await?;
        assert!(
            sqlx::query("INSERT INTO withdrawal VALUES ('dup', 1), ('dup', 2)")
                .execute(&mut *tx)
                .await
                .is_err(),
            "the duplicate key must fail"
        );
        // Postgres answers COMMIT of an aborted transaction with ROLLBACK.
        let _ = tx.commit().await;
        gone.push(e);

        let e = event(30 + i);
        {
            let mut tx = conn.begin().await?;
            business(e.aggregate_id.clone()).execute(&mut *tx).await?;
            outbox
                .enqueue_batch_sqlx(&mut tx, std::slice::from_ref(&e))
                .await?;
        }
        gone.push(e);
    }
    // Committed: a single event with its row, and a batch, in each mode.
    let mut committed = Vec::new();
    for (i, outbox) in modes.iter().enumerate() {
        let e = event(40 + i);
        let mut tx = conn.begin().await?;
        business(e.aggregate_id.clone()).execute(&mut *tx).await?;
        outbox.enqueue_sqlx(&mut tx, &e).await?;
        let batch: Vec<Event> = (0..50).map(|j| event(100 + j % 5)).collect();
        assert_eq!(outbox.enqueue_batch_sqlx(&mut tx, &batch).await?, 50);
        tx.commit().await?;
        committed.push(e);
        committed.extend(batch);
    }
    // Autocommit on a connection and on a pool.
    let e = event(50);
    insert.enqueue_sqlx(&mut conn, &e).await?;
    committed.push(e);
    let pool = sqlx::PgPool::connect(&url).await?;
    let e = event(51);
    modes[2].enqueue_sqlx(&pool, &e).await?;
    committed.push(e);
    // The tokio-postgres entry point, for the same record.
    let client = db.admin(env).await?;
    let reference = event(40);
    insert.enqueue(&client, &reference).await?;

    let rows: Vec<String> = sqlx::query_scalar("SELECT id FROM withdrawal ORDER BY id")
        .fetch_all(&mut conn)
        .await?;
    assert_eq!(
        rows,
        vec!["w-40", "w-41", "w-42"],
        "only the committed business rows"
    );
    let in_table: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&mut conn)
        .await?;
    assert_eq!(
        in_table,
        1 + 50 + 1 + 1,
        "insert mode rows only (and the reference)"
    );

    let mut want: HashSet<String> = committed.iter().map(|e| e.id.to_string()).collect();
    want.insert(reference.id.to_string());
    assert!(
        wait_ids(&mut reader, &want, Duration::from_secs(60))?,
        "not every committed event arrived:\n{}",
        w.log_text()
    );
    reader.read_to_end(Duration::from_secs(10))?;
    let got = by_id(&reader.records);
    for e in &gone {
        assert!(
            !got.contains_key(&e.id.to_string()),
            "event {} of an uncommitted transaction reached Kafka",
            e.aggregate_id
        );
    }
    assert_eq!(got.len(), want.len(), "exactly the committed events");
    let shape = |r: &Record| {
        (
            r.topic.clone(),
            r.key_str(),
            r.value.clone(),
            r.header("type"),
            r.header("correlation_id"),
            r.header("traceparent"),
        )
    };
    let want_shape = shape(got[&reference.id.to_string()]);
    for e in &committed[..1] {
        assert_eq!(
            shape(got[&e.id.to_string()]),
            want_shape,
            "sqlx gives the same record"
        );
    }
    for e in &committed {
        let r = got[&e.id.to_string()];
        assert_eq!(r.key_str(), e.aggregate_id);
        let walcast_outbox::Payload::Json(v) = &e.payload else {
            unreachable!()
        };
        assert_eq!(&r.json(), v);
        assert_eq!(
            r.header("correlation_id"),
            e.headers.get("correlation_id").cloned()
        );
    }
    pool.close().await;
    conn.close().await?;
    w.kill9()?;
    drop(client);
    db.drop(env).await?;
    Ok(())
}
