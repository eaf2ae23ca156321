//! The relay's per-event hot path without I/O: the outbox filter (decode an
//! Insert and pick the outbox columns), the router (row to Kafka record) and
//! the ack tracker (begin, sent, commit, delivered), alone and together.
//! Raw pgoutput decoding is measured by `crates/pgoutput/benches/decode.rs`.
//!
//! `cargo bench -p walcast-core --bench hot_path`

use std::hint::black_box;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use walcast_core::ack::AckTracker;
use walcast_core::config::{OutboxColumns, TableName};
use walcast_core::outbox::{OutboxFilter, Row};
use walcast_core::route::{OutboxRow, Router, TopicTemplate};
use walcast_core::Lsn;
use walcast_pgoutput::{
    oid, ByteStr, ColumnValue, Insert, Message, Relation, RelationColumn, ReplicaIdentity,
    TupleData,
};

const REL_ID: u32 = 16_400;
/// Events per iteration.
const BATCH: usize = 256;

fn encode(msg: &Message) -> Bytes {
    let mut buf = BytesMut::with_capacity(256);
    msg.encode(&mut buf);
    buf.freeze()
}

/// The Relation message of the README's outbox table.
fn relation() -> Bytes {
    let col = |name: &'static str, type_oid, key| RelationColumn {
        flags: u8::from(key),
        name: ByteStr::from_static(name),
        type_oid,
        type_modifier: -1,
    };
    encode(&Message::Relation(Relation {
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
            col("created_at", oid::TIMESTAMPTZ, false),
        ],
    }))
}

/// The jsonb text of a payload of about `size` bytes (the harness's shape).
fn payload(seq: usize, size: usize) -> String {
    let head = format!("{{\"seq\": {seq}, \"data\": \"");
    let fill = size.saturating_sub(head.len() + 2);
    let body: String = (0..fill)
        .map(|i| char::from(b"0123456789abcdef"[(i * 7 + seq) % 16]))
        .collect();
    format!("{head}{body}\"}}")
}

/// Insert messages of the outbox table, as they arrive from the network.
fn inserts(size: usize) -> Vec<Bytes> {
    (0..BATCH)
        .map(|seq| {
            let text = |s: String| ColumnValue::Text(Bytes::from(s));
            encode(&Message::Insert(Insert {
                xid: None,
                rel_id: REL_ID,
                new: TupleData::new(vec![
                    text(format!("5f0c6a9e-3b1d-4c2a-9e7f-{seq:012x}")),
                    text("Order".into()),
                    text(format!("{seq}")),
                    text("OrderCreated".into()),
                    text(payload(seq, size)),
                    text("2026-01-01 00:00:00.000000+00".into()),
                ]),
            }))
        })
        .collect()
}

fn filter() -> OutboxFilter {
    let mut f = OutboxFilter::new(
        [TableName {
            schema: "public".into(),
            name: "outbox".into(),
        }],
        OutboxColumns::default(),
    );
    f.decode(&relation()).expect("the relation decodes");
    f
}

fn rows(f: &mut OutboxFilter, messages: &[Bytes]) -> Vec<(Arc<str>, OutboxRow)> {
    messages
        .iter()
        .map(|m| match f.decode(m).expect("decodes") {
            Row::OutboxInsert { table, row } => (table, row),
            other => panic!("not an outbox insert: {other:?}"),
        })
        .collect()
}

fn router() -> Router {
    Router::new(TopicTemplate::parse("outbox.event.${routedByValue}").expect("template"))
}

fn bench_filter_and_route(c: &mut Criterion) {
    let mut group = c.benchmark_group("hot_path");
    group.throughput(Throughput::Elements(BATCH as u64));
    for (label, size) in [("200B", 200), ("2KB", 2048)] {
        let messages = inserts(size);
        group.bench_function(format!("filter/{label}"), |b| {
            let mut f = filter();
            b.iter(|| {
                for m in &messages {
                    black_box(f.decode(black_box(m)).expect("decodes"));
                }
            })
        });
        let prepared = rows(&mut filter(), &messages);
        group.bench_function(format!("route/{label}"), |b| {
            let mut r = router();
            b.iter_batched(
                || prepared.clone(),
                |rows| {
                    for (table, row) in rows {
                        black_box(r.route(&table, Lsn::from(42u64), 0, row).expect("routes"));
                    }
                },
                BatchSize::SmallInput,
            )
        });
        group.bench_function(format!("filter+route+ack/{label}/txn10"), |b| {
            let mut f = filter();
            let mut r = router();
            let mut t = AckTracker::new(Lsn::from(0u64));
            let mut end = 0u64;
            b.iter(|| {
                let mut tickets = Vec::with_capacity(BATCH);
                for chunk in messages.chunks(10) {
                    let ticket = t.begin().expect("begin");
                    for m in chunk {
                        if let Row::OutboxInsert { table, row } = f.decode(m).expect("decodes") {
                            let event = r.route(&table, Lsn::from(end), 0, row).expect("routes");
                            black_box(event.size_bytes());
                            t.event_sent(ticket).expect("sent");
                            tickets.push(ticket);
                        }
                    }
                    end += 100;
                    t.commit(ticket, Lsn::from(end)).expect("commit");
                }
                for ticket in tickets {
                    t.delivered(ticket).expect("delivered");
                }
                black_box(t.flush_lsn())
            })
        });
    }
    group.finish();
}

fn bench_ack_tracker(c: &mut Criterion) {
    let mut group = c.benchmark_group("ack_tracker");
    group.throughput(Throughput::Elements(BATCH as u64));
    for txn in [1usize, 10, 100] {
        // Deliveries in send order (one partition) and reversed (the worst
        // case for the prefix rule: nothing confirms until the first arrives).
        for reversed in [false, true] {
            let name = format!(
                "txn{txn}/{}",
                if reversed {
                    "reverse_acks"
                } else {
                    "in_order_acks"
                }
            );
            group.bench_function(name, |b| {
                let mut t = AckTracker::new(Lsn::from(0u64));
                let mut end = 0u64;
                let mut tickets = Vec::with_capacity(BATCH);
                b.iter(|| {
                    tickets.clear();
                    for _ in 0..BATCH / txn {
                        let ticket = t.begin().expect("begin");
                        for _ in 0..txn {
                            t.event_sent(ticket).expect("sent");
                            tickets.push(ticket);
                        }
                        end += 100;
                        t.commit(ticket, Lsn::from(end)).expect("commit");
                    }
                    if reversed {
                        tickets.reverse();
                    }
                    for ticket in &tickets {
                        t.delivered(*ticket).expect("delivered");
                    }
                    black_box(t.flush_lsn())
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_filter_and_route, bench_ack_tracker);
criterion_main!(benches);
