//! Interprets arbitrary bytes as a column value of each type the crate
//! understands (and some it does not), in text and binary format, plus the
//! text parsers (LSN, timestamps, UUID, bytea).
//!
//! Input: one selector byte (bits 0-4: type, bit 7: binary format), then the
//! value's bytes.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use walcast_pgoutput::{decode_bytea_text, oid, ColumnValue, Lsn, PgTimestamp, Uuid, Value};

const TYPES: [u32; 20] = [
    oid::TEXT,
    oid::VARCHAR,
    oid::BPCHAR,
    oid::NAME,
    oid::UUID,
    oid::JSON,
    oid::JSONB,
    oid::BYTEA,
    oid::INT2,
    oid::INT4,
    oid::INT8,
    oid::BOOL,
    oid::TIMESTAMPTZ,
    oid::TIMESTAMP,
    oid::NUMERIC,
    oid::INT4_ARRAY,
    oid::FLOAT8,
    oid::DATE,
    16_385,
    0,
];

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let type_oid = TYPES[usize::from(sel & 0x1f) % TYPES.len()];
    let bytes = Bytes::copy_from_slice(rest);
    let binary = sel & 0x80 != 0;
    let col = if binary {
        ColumnValue::Binary(bytes.clone())
    } else {
        ColumnValue::Text(bytes.clone())
    };
    match Value::decode(type_oid, &col) {
        Ok(Value::Uuid(u)) => assert_eq!(u.to_string().parse::<Uuid>(), Ok(u)),
        Ok(Value::TimestampTz(t) | Value::Timestamp(t)) => {
            // Display and the ISO parser agree on every value.
            assert_eq!(PgTimestamp::parse_iso(&t.to_string(), true), Some(t), "{t}");
            let _ = (t.to_unix_micros(), t.to_system_time());
        }
        Ok(Value::Int8(i)) if !binary => assert_eq!(i.to_string().parse::<i64>(), Ok(i)),
        Ok(Value::Bytea(b)) => {
            let hex: String = std::iter::once("\\x".to_string())
                .chain(b.iter().map(|x| format!("{x:02x}")))
                .collect();
            assert_eq!(decode_bytea_text(hex.as_bytes()), Some(b));
        }
        Ok(Value::Text(s) | Value::Json(s)) => assert!(s.len() <= rest.len()),
        Ok(_) => {}
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    if let Ok(s) = std::str::from_utf8(rest) {
        if let Ok(lsn) = s.parse::<Lsn>() {
            assert_eq!(lsn.to_string().parse::<Lsn>(), Ok(lsn));
        }
        if let Some(t) = PgTimestamp::parse_iso(s, sel & 1 == 0) {
            assert_eq!(
                PgTimestamp::parse_iso(&t.to_string(), true),
                Some(t),
                "{s:?}"
            );
        }
        let _ = s.parse::<Uuid>();
    }
});
