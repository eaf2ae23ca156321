//! Feeds a sequence of arbitrary messages through the stateful decoder and
//! the relation cache, interpreting every column of every row it can.
//!
//! Input: one configuration byte (bits 0-1: protocol version - 1, bit 2:
//! parallel streaming), then messages, each as a big-endian u16 length and
//! that many bytes (the last one may be shorter).
//!
//! Checked: no panic; a failed decode leaves the decoder's state alone; a
//! decoded message re-encodes to exactly the input bytes and the stateless
//! decoder agrees with the stateful one.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use walcast_pgoutput::{decode, Decoder, Message, RelationCache, Row, Uuid, Value};

fuzz_target!(|data: &[u8]| {
    let Some((&config, mut rest)) = data.split_first() else {
        return;
    };
    let proto = u32::from(config & 3) + 1;
    let mut decoder = Decoder::new(proto).parallel_streaming(config & 4 != 0);
    let mut cache = RelationCache::new();
    while rest.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let chunk = Bytes::copy_from_slice(&rest[2..2 + len]);
        rest = &rest[2 + len..];
        let before = decoder.options();
        match decoder.decode(&chunk) {
            Err(e) => {
                assert_eq!(decoder.options(), before);
                assert!(!e.to_string().is_empty());
            }
            Ok(msg) => {
                assert_eq!(msg.to_bytes(), chunk, "re-encoding differs for {msg:?}");
                assert_eq!(decode(&chunk, &before).as_ref(), Ok(&msg));
                cache.apply(&msg);
                exercise(&cache, &msg);
            }
        }
    }
});

fn exercise(cache: &RelationCache, msg: &Message) {
    match msg {
        Message::Insert(m) => match cache.insert_row(m) {
            Ok(row) => values(&row),
            Err(e) => drop(e.to_string()),
        },
        Message::Update(m) => match cache.update_rows(m) {
            Ok((old, new)) => {
                if let Some(old) = old {
                    values(&old);
                }
                values(&new);
            }
            Err(e) => drop(e.to_string()),
        },
        Message::Delete(m) => match cache.delete_row(m) {
            Ok(row) => values(&row),
            Err(e) => drop(e.to_string()),
        },
        Message::Truncate(m) => {
            for id in &m.rel_ids {
                let _ = cache.get(*id).map(|r| r.qualified_name());
            }
        }
        Message::Relation(r) => {
            let _ = r.qualified_name();
            for (i, c) in r.columns.iter().enumerate() {
                let first = r.column_index(&c.name).unwrap();
                assert!(first <= i);
            }
        }
        _ => {}
    }
}

fn values(row: &Row<'_>) {
    for i in 0..row.len() {
        match row.value_at(i) {
            Ok(Value::Uuid(u)) => assert_eq!(u.to_string().parse::<Uuid>(), Ok(u)),
            Ok(Value::TimestampTz(t) | Value::Timestamp(t)) => {
                let _ = (t.to_string(), t.to_unix_micros(), t.to_system_time());
            }
            Ok(v) => drop(v.as_str()),
            Err(e) => drop(e.to_string()),
        }
        let (col, _) = row.column(i).unwrap();
        assert!(row.get(&col.name).is_some());
    }
}
