//! The decoder against live pgoutput bytes from real servers (PostgreSQL 15
//! from Debian and 17 from the npm package), for every protocol version each
//! supports, captured with `pg_logical_slot_peek_binary_changes`.

use anyhow::{Context as _, Result};
use bytes::Bytes;
use walcast_pgoutput::{Decoder, Message, RelationCache, Value};
use walcast_tests::pg::TestDb;
use walcast_tests::TestEnv;

const SCRIPT: &str = "
INSERT INTO t VALUES (1, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{\"a\": 1}', '\\x00ff', '2024-01-02 03:04:05+00', 1.5, repeat('x', 100000));
UPDATE t SET n = 2 WHERE id = 1;
SELECT pg_logical_emit_message(true, 'walcast', 'hello');
ALTER TABLE t ADD COLUMN extra text;
INSERT INTO t (id, extra) VALUES (2, 'e');
DELETE FROM t WHERE id = 2;
TRUNCATE t;
";

async fn capture_and_decode(env: &TestEnv, port: u16, versions: &[u32]) -> Result<()> {
    let db = TestDb::create_on(env, port, "pgoutput", false).await?;
    let c = db.admin(env).await?;
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, u uuid, j jsonb, b bytea, ts timestamptz, n numeric, big text);
         ALTER TABLE t REPLICA IDENTITY FULL;",
    )
    .await?;
    c.batch_execute(&format!(
        "CREATE PUBLICATION {} FOR TABLE t",
        db.publication
    ))
    .await?;
    c.execute(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&db.slot],
    )
    .await?;
    c.batch_execute(SCRIPT).await?;
    for &v in versions {
        let rows = c
            .query(
                "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL, 'proto_version', $2, 'publication_names', $3, 'messages', 'true')",
                &[&db.slot, &v.to_string(), &db.publication],
            )
            .await
            .with_context(|| format!("peek with proto_version {v} on port {port}"))?;
        let mut decoder = Decoder::new(v);
        let mut relations = RelationCache::new();
        let mut kinds = Vec::new();
        let mut relation_widths = Vec::new();
        let mut inserts = 0;
        for row in rows {
            let data: Vec<u8> = row.get(0);
            let msg = decoder
                .decode(&Bytes::from(data))
                .with_context(|| format!("decoding proto {v} on port {port}"))?;
            relations.apply(&msg);
            kinds.push(msg.kind().name());
            match &msg {
                Message::Relation(r) => relation_widths.push(r.columns.len()),
                Message::Insert(ins) => {
                    let row = relations.insert_row(ins)?;
                    inserts += 1;
                    if inserts == 1 {
                        assert_eq!(row.relation().qualified_name(), "public.t");
                        assert!(matches!(row.value("id")?, Value::Int4(1)));
                        let Value::Uuid(u) = row.value("u")? else {
                            panic!("uuid")
                        };
                        assert_eq!(u.to_string(), "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
                        let Value::Json(j) = row.value("j")? else {
                            panic!("json")
                        };
                        assert_eq!(j.as_str(), "{\"a\": 1}");
                        let Value::Bytea(b) = row.value("b")? else {
                            panic!("bytea")
                        };
                        assert_eq!(&b[..], &[0x00, 0xff]);
                        assert!(matches!(row.value("ts")?, Value::TimestampTz(_)));
                        let Value::Text(big) = row.value("big")? else {
                            panic!("text")
                        };
                        assert_eq!(
                            big.as_str().len(),
                            100_000,
                            "TOASTed value arrives whole in an INSERT"
                        );
                    } else {
                        let Value::Text(e) = row.value("extra")? else {
                            panic!("extra")
                        };
                        assert_eq!(e.as_str(), "e");
                    }
                }
                Message::Message(m) => {
                    assert_eq!(m.flags & 1, 1, "transactional");
                    assert_eq!(&m.content[..], b"hello");
                }
                _ => {}
            }
        }
        for k in [
            "Insert", "Update", "Delete", "Truncate", "Message", "Begin", "Commit",
        ] {
            assert!(
                kinds.iter().any(|n| n.eq_ignore_ascii_case(k)),
                "proto {v} on port {port}: no {k} in {kinds:?}"
            );
        }
        assert_eq!(inserts, 2);
        assert!(
            relation_widths.contains(&7) && relation_widths.contains(&8),
            "ALTER TABLE must send a new Relation message: {relation_widths:?}"
        );
        eprintln!(
            "pgoutput live: port {port}, proto {v}: {} messages decoded",
            kinds.len()
        );
    }
    c.execute("SELECT pg_drop_replication_slot($1)", &[&db.slot])
        .await?;
    drop(c);
    db.drop(env).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decodes_live_pgoutput_from_postgres_15() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;
    capture_and_decode(env, env.pg_port, &[1, 2, 3]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decodes_live_pgoutput_from_postgres_17() -> Result<()> {
    let env = TestEnv::get();
    let port = env.pg17_port();
    let _g = env.shared().await;
    capture_and_decode(env, port, &[1, 2, 3, 4]).await
}
