//! The fuzzer's seed corpus (fuzz/seeds/), made with the encoder.
//!
//! `cargo test -p walcast-pgoutput --features encode --test fuzz_seeds -- --ignored`
//! rewrites the seed files; the other test checks the committed seeds are
//! what the generator makes, so they stay valid as the crate changes.
#![cfg(feature = "encode")]

use std::path::{Path, PathBuf};

use bytes::{BufMut, Bytes, BytesMut};
use walcast_pgoutput::*;

fn seeds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds")
}

/// The decode_stream target's input: a configuration byte, then messages
/// with a u16 length prefix.
fn stream_input(proto: u32, parallel: bool, messages: &[Message]) -> Vec<u8> {
    let mut out = BytesMut::new();
    out.put_u8((proto - 1) as u8 | if parallel { 4 } else { 0 });
    for m in messages {
        let b = m.to_bytes();
        out.put_u16(b.len() as u16);
        out.put_slice(&b);
    }
    out.to_vec()
}

fn s(v: &'static str) -> ByteStr {
    ByteStr::from_static(v)
}

fn t(v: &'static str) -> ColumnValue {
    ColumnValue::Text(Bytes::from_static(v.as_bytes()))
}

fn b(v: &[u8]) -> ColumnValue {
    ColumnValue::Binary(Bytes::copy_from_slice(v))
}

fn ts(micros: i64) -> PgTimestamp {
    PgTimestamp::from_pg_micros(micros)
}

fn column(name: &'static str, type_oid: u32, key: bool) -> RelationColumn {
    RelationColumn {
        flags: u8::from(key),
        name: s(name),
        type_oid,
        type_modifier: -1,
    }
}

fn outbox(xid: Option<u32>) -> Message {
    Message::Relation(Relation {
        xid,
        rel_id: 16_400,
        namespace: s("public"),
        name: s("outbox"),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            column("id", oid::UUID, true),
            column("aggregatetype", oid::TEXT, false),
            column("aggregateid", oid::VARCHAR, false),
            column("type", oid::TEXT, false),
            column("payload", oid::JSONB, false),
            column("created_at", oid::TIMESTAMPTZ, false),
        ],
    })
}

fn outbox_text_row() -> TupleData {
    TupleData::new(vec![
        t("0b6c3f5e-8a4f-4d2e-9a1b-2c3d4e5f6a7b"),
        t("order"),
        t("order-1"),
        t("OrderCreated"),
        t("{\"total\": 42}"),
        t("2024-05-06 12:38:09.123456+05:30"),
    ])
}

fn outbox_binary_row() -> TupleData {
    TupleData::new(vec![
        b(&[0x0b; 16]),
        b(b"order"),
        b(b"order-1"),
        b(b"OrderPaid"),
        b(b"\x01{\"paid\": true}"),
        b(&768_240_489_123_456i64.to_be_bytes()),
    ])
}

fn typed_relation() -> Message {
    Message::Relation(Relation {
        xid: None,
        rel_id: 16_500,
        namespace: s("public"),
        name: s("typed"),
        replica_identity: ReplicaIdentity::Full,
        columns: vec![
            column("id", oid::INT8, true),
            column("i2", oid::INT2, false),
            column("i4", oid::INT4, false),
            column("flag", oid::BOOL, false),
            column("raw", oid::BYTEA, false),
            column("at", oid::TIMESTAMP, false),
            column("doc", oid::JSON, false),
            column("n", oid::NAME, false),
            column("c", oid::BPCHAR, false),
            column("num", oid::NUMERIC, false),
            column("mood", 16_600, false),
        ],
    })
}

fn seeds() -> Vec<(String, Vec<u8>)> {
    let begin = |xid| {
        Message::Begin(Begin {
            final_lsn: Lsn::new(0x1_0000_0100),
            commit_time: ts(768_240_489_123_456),
            xid,
        })
    };
    let commit = Message::Commit(Commit {
        flags: 0,
        commit_lsn: Lsn::new(0x1_0000_0100),
        end_lsn: Lsn::new(0x1_0000_0130),
        commit_time: ts(768_240_489_123_456),
    });
    let typed_text = TupleData::new(vec![
        t("-9223372036854775808"),
        t("32767"),
        t("-1"),
        t("t"),
        t("\\x00ff10"),
        t("0044-03-15 12:00:00 BC"),
        t("{\"a\":  [1, 2]}"),
        t("a_name"),
        t("ab   "),
        t("12345.678"),
        t("happy"),
    ]);
    let typed_binary = TupleData::new(vec![
        b(&i64::MAX.to_be_bytes()),
        b(&(-2i16).to_be_bytes()),
        b(&7i32.to_be_bytes()),
        b(&[0]),
        b(b"\x00\\\xff"),
        b(&i64::MIN.to_be_bytes()),
        b(b"[]"),
        b(b"n"),
        b(b"c"),
        b(&[0, 1, 0, 0, 0, 0, 0, 0]),
        b(b"sad"),
    ]);
    let mood = Message::Type(Type {
        xid: None,
        type_oid: 16_600,
        namespace: s("public"),
        name: s("mood"),
    });

    let mut out = vec![
        (
            "tx_outbox_v1".to_string(),
            stream_input(
                1,
                false,
                &[
                    begin(700),
                    outbox(None),
                    Message::Insert(Insert {
                        xid: None,
                        rel_id: 16_400,
                        new: outbox_text_row(),
                    }),
                    Message::Insert(Insert {
                        xid: None,
                        rel_id: 16_400,
                        new: outbox_binary_row(),
                    }),
                    commit.clone(),
                ],
            ),
        ),
        (
            "typed_rows_v1".to_string(),
            stream_input(
                1,
                false,
                &[
                    begin(701),
                    mood.clone(),
                    typed_relation(),
                    Message::Insert(Insert {
                        xid: None,
                        rel_id: 16_500,
                        new: typed_text.clone(),
                    }),
                    Message::Update(Update {
                        xid: None,
                        rel_id: 16_500,
                        old: Some(OldTuple::Full(typed_text.clone())),
                        new: typed_binary.clone(),
                    }),
                    Message::Update(Update {
                        xid: None,
                        rel_id: 16_500,
                        old: None,
                        new: TupleData::new(
                            std::iter::once(t("1"))
                                .chain(std::iter::repeat_n(ColumnValue::UnchangedToast, 10))
                                .collect(),
                        ),
                    }),
                    Message::Delete(Delete {
                        xid: None,
                        rel_id: 16_500,
                        old: OldTuple::Key(TupleData::new(
                            std::iter::once(t("1"))
                                .chain(std::iter::repeat_n(ColumnValue::Null, 10))
                                .collect(),
                        )),
                    }),
                    Message::Truncate(Truncate {
                        xid: None,
                        options: Truncate::CASCADE | Truncate::RESTART_IDENTITY,
                        rel_ids: vec![16_400, 16_500],
                    }),
                    commit.clone(),
                ],
            ),
        ),
        (
            "messages_origin_v1".to_string(),
            stream_input(
                1,
                false,
                &[
                    Message::Message(LogicalMessage {
                        xid: None,
                        flags: 0,
                        lsn: Lsn::new(0x1_0000_0010),
                        prefix: s("walcast.nontx"),
                        content: Bytes::from_static(b"hello"),
                    }),
                    begin(702),
                    Message::Origin(Origin {
                        commit_lsn: Lsn::new(0xABC_DEF0),
                        name: s("walcast_origin"),
                    }),
                    Message::Message(LogicalMessage {
                        xid: None,
                        flags: LogicalMessage::FLAG_TRANSACTIONAL,
                        lsn: Lsn::new(0x1_0000_0020),
                        prefix: s("walcast.tx"),
                        content: Bytes::from_static(b"\x00\xff\x10"),
                    }),
                    commit.clone(),
                ],
            ),
        ),
    ];

    // Streamed transaction blocks, with the xid prefix, for 2, 3 and 4.
    for (proto, parallel) in [(2, false), (3, false), (4, false), (4, true)] {
        let abort_info = (proto >= 4 && parallel).then(|| StreamAbortInfo {
            abort_lsn: Lsn::new(0x1_0000_0200),
            abort_time: ts(768_240_489_000_000),
        });
        let msgs = vec![
            Message::StreamStart(StreamStart {
                xid: 800,
                first_segment: true,
            }),
            outbox(Some(800)),
            Message::Type(Type {
                xid: Some(800),
                type_oid: 16_600,
                namespace: s("public"),
                name: s("mood"),
            }),
            Message::Insert(Insert {
                xid: Some(800),
                rel_id: 16_400,
                new: outbox_text_row(),
            }),
            Message::Insert(Insert {
                xid: Some(801),
                rel_id: 16_400,
                new: outbox_binary_row(),
            }),
            Message::Message(LogicalMessage {
                xid: Some(800),
                flags: 1,
                lsn: Lsn::new(0x1_0000_0040),
                prefix: s("walcast.big"),
                content: Bytes::from_static(b"inside"),
            }),
            Message::StreamStop,
            Message::StreamStart(StreamStart {
                xid: 800,
                first_segment: false,
            }),
            Message::Delete(Delete {
                xid: Some(801),
                rel_id: 16_400,
                old: OldTuple::Key(outbox_text_row()),
            }),
            Message::Truncate(Truncate {
                xid: Some(800),
                options: 0,
                rel_ids: vec![16_400],
            }),
            Message::StreamStop,
            Message::StreamAbort(StreamAbort {
                xid: 800,
                subxid: 801,
                abort_info: abort_info.clone(),
            }),
            Message::StreamCommit(StreamCommit {
                xid: 800,
                flags: 0,
                commit_lsn: Lsn::new(0x1_0000_0300),
                end_lsn: Lsn::new(0x1_0000_0330),
                commit_time: ts(768_240_489_000_001),
            }),
            Message::StreamAbort(StreamAbort {
                xid: 802,
                subxid: 802,
                abort_info,
            }),
        ];
        let name = format!("stream_v{proto}{}", if parallel { "_parallel" } else { "" });
        out.push((name, stream_input(proto, parallel, &msgs)));
    }

    // Two-phase commit, plain and streamed.
    let gid = |g| s(g);
    out.push((
        "twophase_v3".to_string(),
        stream_input(
            3,
            false,
            &[
                Message::BeginPrepare(BeginPrepare {
                    prepare_lsn: Lsn::new(0x200),
                    end_lsn: Lsn::new(0x240),
                    prepare_time: ts(1),
                    xid: 900,
                    gid: gid("walcast-gid-1"),
                }),
                outbox(None),
                Message::Insert(Insert {
                    xid: None,
                    rel_id: 16_400,
                    new: outbox_text_row(),
                }),
                Message::Prepare(Prepare {
                    flags: 0,
                    prepare_lsn: Lsn::new(0x200),
                    end_lsn: Lsn::new(0x240),
                    prepare_time: ts(1),
                    xid: 900,
                    gid: gid("walcast-gid-1"),
                }),
                Message::CommitPrepared(CommitPrepared {
                    flags: 0,
                    commit_lsn: Lsn::new(0x240),
                    end_lsn: Lsn::new(0x280),
                    commit_time: ts(2),
                    xid: 900,
                    gid: gid("walcast-gid-1"),
                }),
                Message::RollbackPrepared(RollbackPrepared {
                    flags: 0,
                    prepare_end_lsn: Lsn::new(0x240),
                    rollback_end_lsn: Lsn::new(0x2c0),
                    prepare_time: ts(1),
                    rollback_time: ts(3),
                    xid: 901,
                    gid: gid("walcast-gid-2"),
                }),
                Message::StreamStart(StreamStart {
                    xid: 902,
                    first_segment: true,
                }),
                Message::Insert(Insert {
                    xid: Some(902),
                    rel_id: 16_400,
                    new: outbox_text_row(),
                }),
                Message::StreamStop,
                Message::StreamPrepare(StreamPrepare {
                    flags: 0,
                    prepare_lsn: Lsn::new(0x300),
                    end_lsn: Lsn::new(0x340),
                    prepare_time: ts(4),
                    xid: 902,
                    gid: gid("walcast-gid-3"),
                }),
            ],
        ),
    ));
    for (name, _) in &mut out {
        *name = format!("decode_stream/{name}");
    }

    // The values target: selector byte (type index, bit 7 binary) + value.
    let value_seeds: &[(&str, u8, &[u8])] = &[
        ("text", 0, "héllo wörld".as_bytes()),
        ("uuid_text", 4, b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        ("uuid_binary", 4 | 0x80, &[0xa0; 16]),
        ("json_text", 5, b"{\"keep\":  \"spacing\"}"),
        ("jsonb_binary", 6 | 0x80, b"\x01{\"a\": 1}"),
        ("bytea_hex", 7, b"\\x00015c78ff"),
        ("bytea_escape", 7, b"a\\\\b\\001\\377"),
        ("int2_text", 8, b"-32768"),
        ("int4_binary", 9 | 0x80, &[0x80, 0, 0, 0]),
        ("int8_text", 10, b"9223372036854775807"),
        ("bool_text", 11, b"t"),
        ("timestamptz_text", 12, b"2024-05-06 12:38:09.123456+05:30"),
        ("timestamptz_lmt", 12, b"1850-06-01 17:53:28+05:53:28"),
        (
            "timestamptz_binary",
            12 | 0x80,
            &768_240_489_123_456i64.to_be_bytes(),
        ),
        ("timestamp_bc", 13, b"0044-03-15 12:00:00 BC"),
        ("timestamp_infinity", 13, b"-infinity"),
        ("numeric_text", 14, b"12345.678"),
        ("lsn", 0, b"16/B374D848"),
    ];
    for (name, sel, value) in value_seeds {
        let mut v = vec![*sel];
        v.extend_from_slice(value);
        out.push((format!("values/{name}"), v));
    }
    out
}

#[test]
#[ignore = "rewrites fuzz/seeds; run with --ignored after changing the generator"]
fn write_fuzz_seeds() {
    for (name, data) in seeds() {
        let path = seeds_dir().join(&name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, data).unwrap();
    }
}

#[test]
fn committed_seeds_are_current_and_decode() {
    for (name, data) in seeds() {
        let path = seeds_dir().join(&name);
        let committed = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; regenerate with --ignored", path.display()));
        assert_eq!(
            committed, data,
            "{name} is stale; regenerate with --ignored"
        );
        let Some(stream) = name.strip_prefix("decode_stream/") else {
            continue;
        };
        // Every message of a stream seed decodes.
        let proto = u32::from(data[0] & 3) + 1;
        let mut decoder = Decoder::new(proto).parallel_streaming(data[0] & 4 != 0);
        let mut cache = RelationCache::new();
        let mut rest = &data[1..];
        while !rest.is_empty() {
            let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
            let msg = decoder
                .decode(&Bytes::copy_from_slice(&rest[2..2 + len]))
                .unwrap_or_else(|e| panic!("{stream}: {e}"));
            cache.apply(&msg);
            if let Message::Insert(i) = &msg {
                let row = cache.insert_row(i).unwrap();
                for c in 0..row.len() {
                    row.value_at(c).unwrap_or_else(|e| panic!("{stream}: {e}"));
                }
            }
            rest = &rest[2 + len..];
        }
    }
}
