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

fn by_id(records: &[Record]) -> HashMap<String, &Record> {
    records
        .iter()
        .filter_map(|r| r.header("id").map(|id| (id, r)))
        .collect()
}

/// Business row and event commit together or not at all: a rolled-back
/// transaction and one aborted by a failing business statement leave neither
/// the row nor a record; a committed one leaves both. Insert, insert-delete
/// and batch enqueue on the plain and the hash-partitioned layout reach Kafka
/// through walcast with identical records (topic, key, value, `type`
/// header); insert-delete leaves the table empty.
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
            &WalcastConfig::for_db(env, &db, state.path()),
        )?;
        w.wait_streaming()?;
        let mut client = db.admin(env).await?;
        let insert = Outbox::default();
        let insert_delete = Outbox::default().mode(Mode::InsertDelete);

        let event = |n: usize| {
            Event::new(
                "Payment",
                format!("w-{n}"),
                "WithdrawalRequested",
                json!({"withdrawal": format!("w-{n}"), "amountCents": 100 + n}),
            )
            .correlation_id(format!("corr-{n}"))
        };

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
        // 3. Committed in each mode, with identical content pairs.
        let mut committed = Vec::new();
        for (n, outbox) in [(3, &insert), (3, &insert_delete)] {
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
        for outbox in [&insert, &insert_delete] {
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
        assert_eq!(in_table, 501, "insert-delete must leave no row");

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
        let shape = |r: &Record| (r.topic.clone(), r.key_str(), r.json(), r.header("type"));
        for e in &committed {
            let r = got[&e.id.to_string()];
            assert_eq!(r.topic, format!("{}.Payment", db.topic_prefix));
            assert_eq!(r.key_str(), e.aggregate_id);
            assert_eq!(r.header("type").as_deref(), Some("WithdrawalRequested"));
            let walcast_outbox::Payload::Json(v) = &e.payload else {
                unreachable!()
            };
            assert_eq!(&r.json(), v);
        }
        // Insert and insert-delete: identical records for identical content.
        assert_eq!(
            shape(got[&committed[0].id.to_string()]),
            shape(got[&committed[1].id.to_string()])
        );
        for (a, b) in batches[0].iter().zip(&batches[1]) {
            assert_eq!(shape(got[&a.id.to_string()]), shape(got[&b.id.to_string()]));
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
