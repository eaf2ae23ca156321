//! The envelope (docs/envelope.md) read by a consumer in another language:
//! Python's `protobuf` package decodes `walcast.v1.Envelope` records from
//! real Kafka with the committed descriptor set, no protoc and no generated
//! code (tests/python/decode_envelopes.py, run through `scripts/dev python`).
//!
//! walcast has no envelope output yet, so the records are produced here with
//! `walcast-envelope` and rdkafka; one of them is the JSON form built by
//! PostgreSQL itself with the SQL of docs/envelope.md, read with
//! `decode_message_content` (the table-less outbox content format).

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use rdkafka::message::{Header as KHeader, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::{json, Value};
use walcast_envelope::{Envelope, Header, SourcePosition};
use walcast_tests::kafka::create_topics;
use walcast_tests::pg::TestDb;
use walcast_tests::TestEnv;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What decode_envelopes.py prints for an envelope.
fn plain(e: &Envelope) -> Value {
    let s = e.source.unwrap_or_default();
    json!({
        "event_id": e.event_id,
        "aggregate_type": e.aggregate_type,
        "aggregate_id": e.aggregate_id,
        "event_type": e.event_type,
        "timestamp_unix_micros": e.timestamp_unix_micros,
        "headers": e.headers.iter().map(|h| json!([h.key, hex(&h.value)])).collect::<Vec<_>>(),
        "payload": hex(&e.payload),
        "content_type": e.content_type,
        "has_source": e.source.is_some(),
        "source": {
            "lsn": s.lsn,
            "xid": s.xid,
            "commit_time_unix_micros": s.commit_time_unix_micros,
            "commit_lsn": s.commit_lsn,
        },
        "correlation_id": e.correlation_id,
        "traceparent": e.traceparent,
        "tracestate": e.tracestate,
        "schema_version": e.schema_version,
        "unknown_fields": 0,
    })
}

/// Envelopes that use every field, the extremes of every integer, non-UTF-8
/// header values and payloads, repeated header keys, and an empty envelope
/// apart from its id.
fn samples() -> Vec<Envelope> {
    vec![
        Envelope {
            event_id: "e-1".into(),
            aggregate_type: "order".into(),
            aggregate_id: "order-42".into(),
            event_type: "OrderCreated".into(),
            timestamp_unix_micros: 1_764_547_200_123_456,
            headers: vec![
                Header {
                    key: "tenant".into(),
                    value: b"acme".to_vec(),
                },
                Header {
                    key: "tenant".into(),
                    value: vec![0xff, 0x00, 0x7b],
                },
            ],
            payload: r#"{"total":"12.50","note":"grüße"}"#.as_bytes().to_vec(),
            content_type: "application/json".into(),
            source: Some(SourcePosition {
                lsn: u64::MAX,
                xid: u32::MAX,
                commit_time_unix_micros: i64::MIN,
                commit_lsn: 0x16B_3800,
            }),
            correlation_id: "req-7".into(),
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            tracestate: "vendor=1".into(),
            schema_version: "3".into(),
        },
        Envelope {
            event_id: "e-2".into(),
            aggregate_id: "order-42".into(),
            timestamp_unix_micros: -1,
            payload: vec![0, 1, 2, 0xfe, 0xff],
            content_type: "application/octet-stream".into(),
            ..Default::default()
        },
        Envelope {
            event_id: "e-3".into(),
            ..Default::default()
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_consumer_decodes_envelopes_from_kafka() -> Result<()> {
    let env = TestEnv::get();
    let _g = env.shared().await;

    let mut envelopes = samples();
    // The table-less outbox's JSON form, as docs/envelope.md's SQL writes it.
    let db = TestDb::create(env, "envelope").await?;
    let client = db.admin(env).await?;
    let row = client
        .query_one(
            "SELECT json_build_object(
                'event_id', 'e-sql',
                'aggregate_type', 'account',
                'aggregate_id', '7',
                'event_type', 'AccountDebited',
                'timestamp_unix_micros', (extract(epoch FROM clock_timestamp()) * 1000000)::bigint,
                'content_type', 'application/json',
                'payload', json_build_object('amount', '10.00', 'currency', 'EUR'),
                'headers', json_build_array(json_build_object('key', 'k', 'value', 'v'))
             )::text",
            &[],
        )
        .await?;
    let content: String = row.get(0);
    let from_sql = walcast_envelope::decode_message_content(content.as_bytes())
        .with_context(|| format!("decoding {content}"))?;
    ensure!(
        from_sql.timestamp_unix_micros > 1_700_000_000_000_000,
        "{from_sql:?}"
    );
    ensure!(
        from_sql.payload == br#"{"amount" : "10.00", "currency" : "EUR"}"#,
        "{from_sql:?}"
    );
    envelopes.push(from_sql);

    let topic = format!("envelope-py-{}", uuid::Uuid::new_v4().simple());
    create_topics(&env.kafka_bootstrap, &[&topic], 3).await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &env.kafka_bootstrap)
        .set("enable.idempotence", "true")
        .create()?;
    for e in &envelopes {
        let bytes = walcast_envelope::encode(e);
        let headers = OwnedHeaders::new().insert(KHeader {
            key: "id",
            value: Some(&e.event_id),
        });
        producer
            .send(
                FutureRecord::to(&topic)
                    .key(&e.aggregate_id)
                    .payload(&bytes)
                    .headers(headers),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)?;
    }

    let repo = walcast_tests::env::repo_dir();
    let out = Command::new(repo.join("scripts/dev"))
        .arg("python")
        .arg(repo.join("tests/python/decode_envelopes.py"))
        .arg("--descriptor-set")
        .arg(repo.join("proto/walcast/v1/envelope.binpb"))
        .args(["--bootstrap", &env.kafka_bootstrap, "--topic", &topic])
        .args(["--count", &envelopes.len().to_string()])
        .output()
        .context("running scripts/dev python")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "decode_envelopes.py failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let decoded: HashMap<String, Value> = stdout
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).with_context(|| format!("line {l}"))?;
            Ok((
                v["envelope"]["event_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                v,
            ))
        })
        .collect::<Result<_>>()?;
    ensure!(
        decoded.len() == envelopes.len(),
        "decoded {} of {}: {stdout}",
        decoded.len(),
        envelopes.len()
    );
    for e in &envelopes {
        let got = decoded
            .get(&e.event_id)
            .with_context(|| format!("{} not decoded", e.event_id))?;
        assert_eq!(got["envelope"], plain(e), "event {}", e.event_id);
        assert_eq!(got["key"], json!(e.aggregate_id));
        assert_eq!(got["headers"], json!([["id", hex(e.event_id.as_bytes())]]));
    }
    Ok(())
}
