//! Decoding outbox Insert messages as the relay does: decode the message,
//! find its relation, and extract the five outbox columns (uuid id,
//! aggregatetype, aggregateid, type, jsonb payload).
//!
//! `cargo bench -p walcast-pgoutput --features encode`

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use walcast_pgoutput::{
    oid, ByteStr, ColumnValue, Decoder, Insert, Message, Relation, RelationCache, RelationColumn,
    ReplicaIdentity, TupleData, Uuid, Value,
};

const REL_ID: u32 = 16_400;
/// Messages per iteration (distinct ids and payloads).
const BATCH: usize = 64;

fn relation() -> Relation {
    let col = |name: &'static str, type_oid, key| RelationColumn {
        flags: u8::from(key),
        name: ByteStr::from_static(name),
        type_oid,
        type_modifier: -1,
    };
    Relation {
        xid: None,
        rel_id: REL_ID,
        namespace: ByteStr::from_static("public"),
        name: ByteStr::from_static("outbox"),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            col("id", oid::UUID, true),
            col("aggregatetype", oid::TEXT, false),
            col("aggregateid", oid::TEXT, false),
            col("type", oid::TEXT, false),
            col("payload", oid::JSONB, false),
        ],
    }
}

/// A JSON object of exactly `size` bytes.
fn payload(size: usize, seq: usize) -> String {
    let head = format!("{{\"seq\": {seq}, \"data\": \"");
    let tail = "\"}";
    let fill = size.saturating_sub(head.len() + tail.len());
    let body: String = (0..fill).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    format!("{head}{body}{tail}")
}

/// Encoded Insert messages, as they arrive from the network (each in its
/// own reference-counted buffer).
fn inserts(payload_size: usize, binary: bool) -> Vec<Bytes> {
    (0..BATCH)
        .map(|seq| {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(
                &(seq as u64)
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    .to_be_bytes(),
            );
            id[6] = 0x40 | (id[6] & 0x0f);
            let id = Uuid::from_bytes(id);
            let json = payload(payload_size, seq);
            let columns = if binary {
                vec![
                    ColumnValue::Binary(Bytes::copy_from_slice(id.as_bytes())),
                    ColumnValue::Binary(Bytes::from_static(b"order")),
                    ColumnValue::Binary(Bytes::from(format!("order-{seq}"))),
                    ColumnValue::Binary(Bytes::from_static(b"OrderCreated")),
                    ColumnValue::Binary(Bytes::from([&[1u8][..], json.as_bytes()].concat())),
                ]
            } else {
                vec![
                    ColumnValue::Text(Bytes::from(id.to_string())),
                    ColumnValue::Text(Bytes::from_static(b"order")),
                    ColumnValue::Text(Bytes::from(format!("order-{seq}"))),
                    ColumnValue::Text(Bytes::from_static(b"OrderCreated")),
                    ColumnValue::Text(Bytes::from(json)),
                ]
            };
            let msg = Message::Insert(Insert {
                xid: None,
                rel_id: REL_ID,
                new: TupleData::new(columns),
            });
            let mut buf = BytesMut::with_capacity(payload_size + 128);
            msg.encode(&mut buf);
            buf.freeze()
        })
        .collect()
}

/// What the relay keeps of one outbox row.
struct Event {
    id: Uuid,
    aggregatetype: ByteStr,
    aggregateid: ByteStr,
    event_type: ByteStr,
    payload: Bytes,
}

fn text(v: Value) -> ByteStr {
    match v {
        Value::Text(s) => s,
        other => panic!("not text: {other:?}"),
    }
}

fn relay(decoder: &mut Decoder, cache: &RelationCache, bytes: &Bytes) -> Event {
    let Message::Insert(insert) = decoder.decode(bytes).unwrap() else {
        panic!("not an insert")
    };
    let row = cache.insert_row(&insert).unwrap();
    let Value::Uuid(id) = row.value("id").unwrap() else {
        panic!("id is not a uuid")
    };
    let Value::Json(payload) = row.value("payload").unwrap() else {
        panic!("payload is not json")
    };
    Event {
        id,
        aggregatetype: text(row.value("aggregatetype").unwrap()),
        aggregateid: text(row.value("aggregateid").unwrap()),
        event_type: text(row.value("type").unwrap()),
        payload: payload.into_bytes(),
    }
}

fn bench_outbox_inserts(c: &mut Criterion) {
    let mut cache = RelationCache::new();
    cache.insert(relation());
    let mut group = c.benchmark_group("outbox_insert");
    for binary in [false, true] {
        for (label, size) in [("200B", 200), ("2KB", 2048)] {
            let messages = inserts(size, binary);
            let bytes: usize = messages.iter().map(Bytes::len).sum();
            group.throughput(Throughput::ElementsAndBytes {
                elements: BATCH as u64,
                bytes: bytes as u64,
            });
            let format = if binary { "binary" } else { "text" };
            group.bench_function(format!("{format}/{label}"), |b| {
                let mut decoder = Decoder::new(1);
                b.iter(|| {
                    for m in &messages {
                        let event = relay(&mut decoder, &cache, black_box(m));
                        black_box((
                            event.id,
                            event.aggregatetype,
                            event.aggregateid,
                            event.event_type,
                            event.payload,
                        ));
                    }
                })
            });
        }
    }
    // Decoding alone, without relation lookup or value conversion.
    let messages = inserts(200, false);
    let bytes: usize = messages.iter().map(Bytes::len).sum();
    group.throughput(Throughput::ElementsAndBytes {
        elements: BATCH as u64,
        bytes: bytes as u64,
    });
    group.bench_function("decode_only/text/200B", |b| {
        let mut decoder = Decoder::new(1);
        b.iter(|| {
            for m in &messages {
                black_box(decoder.decode(black_box(m)).unwrap());
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench_outbox_inserts);
criterion_main!(benches);
