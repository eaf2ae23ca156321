//! Property tests: every message of every type encodes and decodes back to
//! itself under every protocol version, the encoding is exact, and damaged
//! input is an error rather than a panic.
#![cfg(feature = "encode")]

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use walcast_pgoutput::*;

fn text() -> impl Strategy<Value = ByteStr> {
    // Any UTF-8 without NUL (PostgreSQL names and gids cannot hold NUL).
    "[^\u{0}]{0,24}".prop_map(ByteStr::from)
}

fn data() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..48).prop_map(Bytes::from)
}

fn lsn() -> impl Strategy<Value = Lsn> {
    any::<u64>().prop_map(Lsn::new)
}

fn ts() -> impl Strategy<Value = PgTimestamp> {
    any::<i64>().prop_map(PgTimestamp::from_pg_micros)
}

fn xid() -> impl Strategy<Value = Option<u32>> {
    prop::option::of(any::<u32>())
}

fn column_value() -> impl Strategy<Value = ColumnValue> {
    prop_oneof![
        Just(ColumnValue::Null),
        Just(ColumnValue::UnchangedToast),
        data().prop_map(ColumnValue::Text),
        data().prop_map(ColumnValue::Binary),
    ]
}

fn tuple() -> impl Strategy<Value = TupleData> {
    prop::collection::vec(column_value(), 0..12).prop_map(TupleData::new)
}

fn old_tuple() -> impl Strategy<Value = OldTuple> {
    prop_oneof![
        tuple().prop_map(OldTuple::Key),
        tuple().prop_map(OldTuple::Full)
    ]
}

fn replica_identity() -> impl Strategy<Value = ReplicaIdentity> {
    prop_oneof![
        Just(ReplicaIdentity::Default),
        Just(ReplicaIdentity::Nothing),
        Just(ReplicaIdentity::Full),
        Just(ReplicaIdentity::Index),
    ]
}

fn relation_column() -> impl Strategy<Value = RelationColumn> {
    (any::<u8>(), text(), any::<u32>(), any::<i32>()).prop_map(
        |(flags, name, type_oid, type_modifier)| RelationColumn {
            flags,
            name,
            type_oid,
            type_modifier,
        },
    )
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (lsn(), ts(), any::<u32>()).prop_map(|(final_lsn, commit_time, xid)| {
            Message::Begin(Begin {
                final_lsn,
                commit_time,
                xid,
            })
        }),
        (any::<u8>(), lsn(), lsn(), ts()).prop_map(|(flags, commit_lsn, end_lsn, commit_time)| {
            Message::Commit(Commit {
                flags,
                commit_lsn,
                end_lsn,
                commit_time,
            })
        }),
        (lsn(), text()).prop_map(|(commit_lsn, name)| Message::Origin(Origin { commit_lsn, name })),
        (
            xid(),
            any::<u32>(),
            text(),
            text(),
            replica_identity(),
            prop::collection::vec(relation_column(), 0..8)
        )
            .prop_map(
                |(xid, rel_id, namespace, name, replica_identity, columns)| {
                    Message::Relation(Relation {
                        xid,
                        rel_id,
                        namespace,
                        name,
                        replica_identity,
                        columns,
                    })
                }
            ),
        (xid(), any::<u32>(), text(), text()).prop_map(|(xid, type_oid, namespace, name)| {
            Message::Type(Type {
                xid,
                type_oid,
                namespace,
                name,
            })
        }),
        (xid(), any::<u32>(), tuple()).prop_map(|(xid, rel_id, new)| Message::Insert(Insert {
            xid,
            rel_id,
            new
        })),
        (xid(), any::<u32>(), prop::option::of(old_tuple()), tuple()).prop_map(
            |(xid, rel_id, old, new)| Message::Update(Update {
                xid,
                rel_id,
                old,
                new
            })
        ),
        (xid(), any::<u32>(), old_tuple()).prop_map(|(xid, rel_id, old)| Message::Delete(Delete {
            xid,
            rel_id,
            old
        })),
        (
            xid(),
            any::<u8>(),
            prop::collection::vec(any::<u32>(), 0..8)
        )
            .prop_map(|(xid, options, rel_ids)| Message::Truncate(Truncate {
                xid,
                options,
                rel_ids
            })),
        (xid(), any::<u8>(), lsn(), text(), data()).prop_map(
            |(xid, flags, lsn, prefix, content)| Message::Message(LogicalMessage {
                xid,
                flags,
                lsn,
                prefix,
                content,
            })
        ),
        (any::<u32>(), any::<bool>()).prop_map(|(xid, first_segment)| {
            Message::StreamStart(StreamStart { xid, first_segment })
        }),
        Just(Message::StreamStop),
        (any::<u32>(), any::<u8>(), lsn(), lsn(), ts()).prop_map(
            |(xid, flags, commit_lsn, end_lsn, commit_time)| Message::StreamCommit(StreamCommit {
                xid,
                flags,
                commit_lsn,
                end_lsn,
                commit_time,
            })
        ),
        (
            any::<u32>(),
            any::<u32>(),
            prop::option::of(
                (lsn(), ts()).prop_map(|(abort_lsn, abort_time)| StreamAbortInfo {
                    abort_lsn,
                    abort_time
                })
            )
        )
            .prop_map(
                |(xid, subxid, abort_info)| Message::StreamAbort(StreamAbort {
                    xid,
                    subxid,
                    abort_info
                })
            ),
        (lsn(), lsn(), ts(), any::<u32>(), text()).prop_map(
            |(prepare_lsn, end_lsn, prepare_time, xid, gid)| Message::BeginPrepare(BeginPrepare {
                prepare_lsn,
                end_lsn,
                prepare_time,
                xid,
                gid,
            })
        ),
        (any::<u8>(), lsn(), lsn(), ts(), any::<u32>(), text()).prop_map(
            |(flags, prepare_lsn, end_lsn, prepare_time, xid, gid)| Message::Prepare(Prepare {
                flags,
                prepare_lsn,
                end_lsn,
                prepare_time,
                xid,
                gid,
            })
        ),
        (any::<u8>(), lsn(), lsn(), ts(), any::<u32>(), text()).prop_map(
            |(flags, commit_lsn, end_lsn, commit_time, xid, gid)| {
                Message::CommitPrepared(CommitPrepared {
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_time,
                    xid,
                    gid,
                })
            }
        ),
        (any::<u8>(), lsn(), lsn(), ts(), ts(), any::<u32>(), text()).prop_map(
            |(flags, prepare_end_lsn, rollback_end_lsn, prepare_time, rollback_time, xid, gid)| {
                Message::RollbackPrepared(RollbackPrepared {
                    flags,
                    prepare_end_lsn,
                    rollback_end_lsn,
                    prepare_time,
                    rollback_time,
                    xid,
                    gid,
                })
            }
        ),
        (any::<u8>(), lsn(), lsn(), ts(), any::<u32>(), text()).prop_map(
            |(flags, prepare_lsn, end_lsn, prepare_time, xid, gid)| {
                Message::StreamPrepare(StreamPrepare {
                    flags,
                    prepare_lsn,
                    end_lsn,
                    prepare_time,
                    xid,
                    gid,
                })
            }
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn encode_then_decode_is_identity(msg in message(), proto in 1u32..=4) {
        let bytes = msg.to_bytes();
        let opts = msg.decode_options(proto);
        let decoded = decode(&bytes, &opts).unwrap();
        prop_assert_eq!(&decoded, &msg);
        // The encoding is exact: re-encoding gives the same bytes.
        prop_assert_eq!(decoded.to_bytes(), bytes.clone());
        // A stateful decoder in the same state agrees.
        let mut decoder = Decoder::with_options(opts);
        prop_assert_eq!(decoder.decode(&bytes).unwrap(), msg.clone());
        // Value conversion of every column never panics, whatever the type.
        if let Message::Insert(insert) = &msg {
            for (i, col) in insert.new.iter().enumerate() {
                let type_oid = [oid::TEXT, oid::UUID, oid::JSONB, oid::INT8, oid::TIMESTAMPTZ,
                    oid::BYTEA, oid::BOOL, oid::NUMERIC][i % 8];
                let _ = Value::decode(type_oid, col);
            }
        }
    }

    #[test]
    fn every_strict_prefix_is_an_error(msg in message(), proto in 1u32..=4) {
        let bytes = msg.to_bytes();
        let opts = msg.decode_options(proto);
        for len in 0..bytes.len() {
            prop_assert!(decode(&bytes.slice(..len), &opts).is_err(), "prefix {} of {:?}", len, msg);
        }
    }

    #[test]
    fn wrong_options_or_garbage_never_panic(
        msg in message(),
        in_stream in any::<bool>(),
        parallel in any::<bool>(),
        proto in 1u32..=4,
        flip in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut bytes = BytesMut::new();
        msg.encode(&mut bytes);
        let opts = DecodeOptions::new(proto)
            .with_in_stream(in_stream)
            .with_parallel_streaming(parallel);
        let _ = decode(&bytes.clone().freeze(), &opts);
        let i = flip.index(bytes.len());
        bytes[i] = byte;
        let _ = decode(&bytes.freeze(), &opts);
    }

    #[test]
    fn lsn_text_round_trip(v in any::<u64>()) {
        let lsn = Lsn::new(v);
        prop_assert_eq!(lsn.to_string().parse::<Lsn>().unwrap(), lsn);
        let padded = format!("{:08x}/{:08x}", v >> 32, v & 0xffff_ffff);
        prop_assert_eq!(padded.parse::<Lsn>().unwrap(), lsn);
    }

    #[test]
    fn timestamp_text_round_trip(micros in -210_000_000_000_000_000i64..200_000_000_000_000_000) {
        let ts = PgTimestamp::from_pg_micros(micros);
        prop_assert_eq!(PgTimestamp::parse_iso(&ts.to_string(), true), Some(ts));
        let text = ColumnValue::Text(Bytes::from(ts.to_string()));
        prop_assert_eq!(Value::decode(oid::TIMESTAMPTZ, &text).unwrap(), Value::TimestampTz(ts));
        let binary = ColumnValue::Binary(Bytes::copy_from_slice(&micros.to_be_bytes()));
        prop_assert_eq!(Value::decode(oid::TIMESTAMPTZ, &binary).unwrap(), Value::TimestampTz(ts));
    }

    #[test]
    fn uuid_text_round_trip(bytes in any::<[u8; 16]>()) {
        let id = Uuid::from_bytes(bytes);
        let text = id.to_string();
        prop_assert_eq!(text.parse::<Uuid>().unwrap(), id);
        prop_assert_eq!(text.to_uppercase().parse::<Uuid>().unwrap(), id);
    }

    #[test]
    fn bytea_hex_and_escape_round_trip(raw in prop::collection::vec(any::<u8>(), 0..64)) {
        let hex: String = std::iter::once("\\x".to_string())
            .chain(raw.iter().map(|b| format!("{b:02x}")))
            .collect();
        prop_assert_eq!(decode_bytea_text(hex.as_bytes()).unwrap(), Bytes::from(raw.clone()));
        // PostgreSQL's escape output: printable ASCII as is, `\` doubled,
        // everything else as \ooo.
        let mut esc = Vec::new();
        for &b in &raw {
            match b {
                b'\\' => esc.extend_from_slice(b"\\\\"),
                0x20..=0x7e => esc.push(b),
                _ => esc.extend_from_slice(format!("\\{b:03o}").as_bytes()),
            }
        }
        prop_assert_eq!(decode_bytea_text(&esc).unwrap(), Bytes::from(raw));
    }
}

#[test]
fn one_of_every_kind_is_generated() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..2000 {
        let msg = message().new_tree(&mut runner).unwrap().current();
        seen.insert(msg.kind());
    }
    assert_eq!(seen.len(), MessageKind::ALL.len());
}
