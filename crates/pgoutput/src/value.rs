//! Interpreting column values by their type.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;

use crate::error::Format;
use crate::time::PgTimestamp;
use crate::{ByteStr, ColumnValue, Error};

/// OIDs of the built-in types [`Value::decode`] understands (and a few more
/// that are handy to name). From PostgreSQL's `pg_type.dat`; they never
/// change.
pub mod oid {
    /// `bool`
    pub const BOOL: u32 = 16;
    /// `bytea`
    pub const BYTEA: u32 = 17;
    /// `"char"` (the one-byte internal type)
    pub const CHAR: u32 = 18;
    /// `name`
    pub const NAME: u32 = 19;
    /// `int8` / `bigint`
    pub const INT8: u32 = 20;
    /// `int2` / `smallint`
    pub const INT2: u32 = 21;
    /// `int4` / `integer`
    pub const INT4: u32 = 23;
    /// `text`
    pub const TEXT: u32 = 25;
    /// `oid`
    pub const OID: u32 = 26;
    /// `json`
    pub const JSON: u32 = 114;
    /// `float4` / `real`
    pub const FLOAT4: u32 = 700;
    /// `float8` / `double precision`
    pub const FLOAT8: u32 = 701;
    /// `bpchar` / `char(n)`
    pub const BPCHAR: u32 = 1042;
    /// `varchar`
    pub const VARCHAR: u32 = 1043;
    /// `date`
    pub const DATE: u32 = 1082;
    /// `timestamp` (without time zone)
    pub const TIMESTAMP: u32 = 1114;
    /// `timestamptz`
    pub const TIMESTAMPTZ: u32 = 1184;
    /// `numeric`
    pub const NUMERIC: u32 = 1700;
    /// `uuid`
    pub const UUID: u32 = 2950;
    /// `jsonb`
    pub const JSONB: u32 = 3802;
    /// `int4[]`
    pub const INT4_ARRAY: u32 = 1007;
    /// `text[]`
    pub const TEXT_ARRAY: u32 = 1009;

    /// OIDs below this are PostgreSQL's own; user types (enums, domains,
    /// ...) get higher ones (`FirstNormalObjectId`).
    pub const FIRST_NORMAL_OBJECT_ID: u32 = 16384;

    /// The OID of a built-in `pg_catalog` type named in this module, by its
    /// `pg_type.typname` (e.g. `"int4"`, `"jsonb"`).
    ///
    /// pgoutput describes a domain with a Type message carrying its base
    /// type's name; this maps that name back to the OID.
    pub fn by_name(typname: &str) -> Option<u32> {
        Some(match typname {
            "bool" => BOOL,
            "bytea" => BYTEA,
            "char" => CHAR,
            "name" => NAME,
            "int8" => INT8,
            "int2" => INT2,
            "int4" => INT4,
            "text" => TEXT,
            "oid" => OID,
            "json" => JSON,
            "float4" => FLOAT4,
            "float8" => FLOAT8,
            "bpchar" => BPCHAR,
            "varchar" => VARCHAR,
            "date" => DATE,
            "timestamp" => TIMESTAMP,
            "timestamptz" => TIMESTAMPTZ,
            "numeric" => NUMERIC,
            "uuid" => UUID,
            "jsonb" => JSONB,
            "_int4" => INT4_ARRAY,
            "_text" => TEXT_ARRAY,
            _ => return None,
        })
    }
}

/// A UUID's 16 bytes. Displays in the canonical lowercase hyphenated form
/// PostgreSQL uses.
///
/// ```
/// use walcast_pgoutput::Uuid;
///
/// let id: Uuid = "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11".parse().unwrap();
/// assert_eq!(id.to_string(), "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
/// assert_eq!(id.as_bytes()[0], 0xa0);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Uuid([u8; 16]);

impl Uuid {
    /// From its 16 bytes (PostgreSQL's binary form).
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Uuid(bytes)
    }

    /// The 16 bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Parses the hyphenated 36-character form (either case).
    pub fn parse_hyphenated(text: &[u8]) -> Option<Self> {
        if text.len() != 36 {
            return None;
        }
        let mut out = [0u8; 16];
        let mut n = 0;
        let mut i = 0;
        while i < 36 {
            if matches!(i, 8 | 13 | 18 | 23) {
                if text[i] != b'-' {
                    return None;
                }
                i += 1;
                continue;
            }
            out[n] = (hex_digit(text[i])? << 4) | hex_digit(text[i + 1])?;
            n += 1;
            i += 2;
        }
        Some(Uuid(out))
    }
}

impl From<[u8; 16]> for Uuid {
    fn from(bytes: [u8; 16]) -> Self {
        Uuid(bytes)
    }
}

impl From<Uuid> for [u8; 16] {
    fn from(u: Uuid) -> Self {
        u.0
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Uuid({self})")
    }
}

/// The text is not a hyphenated UUID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid UUID: expected 32 hexadecimal digits in the 8-4-4-4-12 hyphenated form")]
pub struct ParseUuidError;

impl FromStr for Uuid {
    type Err = ParseUuidError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_hyphenated(s.as_bytes()).ok_or(ParseUuidError)
    }
}

/// A column value interpreted by its type.
///
/// Text-like values and JSON stay slices of the message buffer; only text
/// format `bytea` is decoded into a new buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Value {
    /// SQL NULL.
    Null,
    /// An unchanged TOASTed value PostgreSQL did not send (in Update).
    UnchangedToast,
    /// `bool`
    Bool(bool),
    /// `int2`
    Int2(i16),
    /// `int4`
    Int4(i32),
    /// `int8`
    Int8(i64),
    /// `text`, `varchar`, `bpchar` (with its padding) or `name`.
    Text(ByteStr),
    /// `uuid`
    Uuid(Uuid),
    /// `json` or `jsonb`, as JSON text (PostgreSQL's normalised form for
    /// `jsonb`; the binary format's version byte is removed).
    Json(ByteStr),
    /// `bytea`, decoded.
    Bytea(Bytes),
    /// `timestamp` (without time zone): the wall-clock reading, counted as
    /// if it were UTC.
    Timestamp(PgTimestamp),
    /// `timestamptz`: an instant.
    TimestampTz(PgTimestamp),
    /// Any other type, in text format: PostgreSQL's text output as is.
    Other {
        /// The column's type OID.
        type_oid: u32,
        /// The text output.
        text: ByteStr,
    },
    /// Any other type, in binary format: the type's send format as is.
    OtherBinary {
        /// The column's type OID.
        type_oid: u32,
        /// The send format bytes.
        data: Bytes,
    },
}

impl Value {
    /// Interprets a column value of type `type_oid` (from the relation's
    /// [`RelationColumn::type_oid`](crate::RelationColumn::type_oid)).
    ///
    /// Understands `text`, `varchar`, `bpchar`, `name`, `uuid`, `json`,
    /// `jsonb`, `bytea`, `int2`, `int4`, `int8`, `bool`, `timestamp` and
    /// `timestamptz` in text and binary format; anything else becomes
    /// [`Value::Other`] (text) or [`Value::OtherBinary`].
    ///
    /// Text-format timestamps must be in the `ISO` DateStyle (PostgreSQL's
    /// default); set `DateStyle=ISO` on the replication connection if the
    /// server default differs.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidValue`] when the data is not a valid value of that
    /// type (including text that is not UTF-8).
    ///
    /// # Examples
    ///
    /// ```
    /// use bytes::Bytes;
    /// use walcast_pgoutput::{oid, ColumnValue, Value};
    ///
    /// let col = ColumnValue::Text(Bytes::from_static(b"42"));
    /// assert_eq!(Value::decode(oid::INT8, &col)?, Value::Int8(42));
    /// // jsonb in binary format has a version byte first.
    /// let col = ColumnValue::Binary(Bytes::from_static(b"\x01{\"a\": 1}"));
    /// let Value::Json(json) = Value::decode(oid::JSONB, &col)? else { unreachable!() };
    /// assert_eq!(json, "{\"a\": 1}");
    /// # Ok::<(), walcast_pgoutput::Error>(())
    /// ```
    pub fn decode(type_oid: u32, column: &ColumnValue) -> Result<Value, Error> {
        match column {
            ColumnValue::Null => Ok(Value::Null),
            ColumnValue::UnchangedToast => Ok(Value::UnchangedToast),
            ColumnValue::Text(data) => decode_text(type_oid, data),
            ColumnValue::Binary(data) => decode_binary(type_oid, data),
        }
    }

    /// Whether this is SQL NULL.
    pub const fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// The text of a [`Value::Text`], [`Value::Json`] or [`Value::Other`].
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Text(s) | Value::Json(s) | Value::Other { text: s, .. } => Some(s.as_str()),
            _ => None,
        }
    }
}

fn invalid(type_oid: u32, format: Format, reason: &'static str) -> Error {
    Error::InvalidValue {
        type_oid,
        format,
        reason,
    }
}

fn utf8(type_oid: u32, format: Format, data: &Bytes) -> Result<ByteStr, Error> {
    ByteStr::from_utf8(data.clone()).map_err(|_| invalid(type_oid, format, "not valid UTF-8"))
}

fn parse_int<T: FromStr>(type_oid: u32, data: &Bytes) -> Result<T, Error> {
    std::str::from_utf8(data)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid(type_oid, Format::Text, "not an integer in range"))
}

fn decode_text(type_oid: u32, data: &Bytes) -> Result<Value, Error> {
    const T: Format = Format::Text;
    Ok(match type_oid {
        oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME => Value::Text(utf8(type_oid, T, data)?),
        oid::JSON | oid::JSONB => Value::Json(utf8(type_oid, T, data)?),
        oid::INT2 => Value::Int2(parse_int(type_oid, data)?),
        oid::INT4 => Value::Int4(parse_int(type_oid, data)?),
        oid::INT8 => Value::Int8(parse_int(type_oid, data)?),
        oid::BOOL => match data.as_ref() {
            b"t" => Value::Bool(true),
            b"f" => Value::Bool(false),
            _ => return Err(invalid(type_oid, T, "expected 't' or 'f'")),
        },
        oid::UUID => Value::Uuid(
            Uuid::parse_hyphenated(data)
                .ok_or_else(|| invalid(type_oid, T, "not a hyphenated UUID"))?,
        ),
        oid::BYTEA => Value::Bytea(decode_bytea_text(data).ok_or_else(|| {
            invalid(
                type_oid,
                T,
                "not bytea output (\\x hex format or escape format)",
            )
        })?),
        oid::TIMESTAMPTZ | oid::TIMESTAMP => {
            let with_zone = type_oid == oid::TIMESTAMPTZ;
            let ts = std::str::from_utf8(data)
                .ok()
                .and_then(|s| PgTimestamp::parse_iso(s, with_zone))
                .ok_or_else(|| {
                    invalid(
                        type_oid,
                        T,
                        "not an ISO DateStyle timestamp; set DateStyle=ISO on the replication connection",
                    )
                })?;
            if with_zone {
                Value::TimestampTz(ts)
            } else {
                Value::Timestamp(ts)
            }
        }
        _ => Value::Other {
            type_oid,
            text: utf8(type_oid, T, data)?,
        },
    })
}

fn fixed<const N: usize>(type_oid: u32, data: &Bytes) -> Result<[u8; N], Error> {
    <[u8; N]>::try_from(data.as_ref()).map_err(|_| {
        invalid(
            type_oid,
            Format::Binary,
            "wrong length for the type's binary format",
        )
    })
}

fn decode_binary(type_oid: u32, data: &Bytes) -> Result<Value, Error> {
    const B: Format = Format::Binary;
    Ok(match type_oid {
        oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME => Value::Text(utf8(type_oid, B, data)?),
        oid::JSON => Value::Json(utf8(type_oid, B, data)?),
        oid::JSONB => match data.first() {
            Some(1) => Value::Json(utf8(type_oid, B, &data.slice(1..))?),
            _ => return Err(invalid(type_oid, B, "jsonb binary format version is not 1")),
        },
        oid::INT2 => Value::Int2(i16::from_be_bytes(fixed(type_oid, data)?)),
        oid::INT4 => Value::Int4(i32::from_be_bytes(fixed(type_oid, data)?)),
        oid::INT8 => Value::Int8(i64::from_be_bytes(fixed(type_oid, data)?)),
        oid::BOOL => Value::Bool(fixed::<1>(type_oid, data)?[0] != 0),
        oid::UUID => Value::Uuid(Uuid(fixed(type_oid, data)?)),
        oid::BYTEA => Value::Bytea(data.clone()),
        oid::TIMESTAMPTZ => Value::TimestampTz(PgTimestamp::from_pg_micros(i64::from_be_bytes(
            fixed(type_oid, data)?,
        ))),
        oid::TIMESTAMP => Value::Timestamp(PgTimestamp::from_pg_micros(i64::from_be_bytes(fixed(
            type_oid, data,
        )?))),
        _ => Value::OtherBinary {
            type_oid,
            data: data.clone(),
        },
    })
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes `bytea` text output: the hex format (`\x0102ff`) or the older
/// escape format (`a\\b\001`, `bytea_output = escape`).
///
/// Returns `None` if the text is in neither format.
///
/// ```
/// use walcast_pgoutput::decode_bytea_text;
///
/// assert_eq!(decode_bytea_text(b"\\x00ff").unwrap().as_ref(), b"\x00\xff");
/// assert_eq!(decode_bytea_text(b"a\\\\b\\001").unwrap().as_ref(), b"a\\b\x01");
/// ```
pub fn decode_bytea_text(text: &[u8]) -> Option<Bytes> {
    if let Some(hex) = text.strip_prefix(b"\\x") {
        // PostgreSQL's hex input also skips whitespace between digit pairs.
        let mut out = Vec::with_capacity(hex.len() / 2);
        let mut iter = hex.iter().copied().filter(|b| !b.is_ascii_whitespace());
        while let Some(hi) = iter.next() {
            let lo = iter.next()?;
            out.push((hex_digit(hi)? << 4) | hex_digit(lo)?);
        }
        return Some(Bytes::from(out));
    }
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i] != b'\\' {
            out.push(text[i]);
            i += 1;
        } else if text.get(i + 1) == Some(&b'\\') {
            out.push(b'\\');
            i += 2;
        } else {
            let oct = text.get(i + 1..i + 4)?;
            if !(b'0'..=b'3').contains(&oct[0])
                || !oct[1..].iter().all(|b| (b'0'..=b'7').contains(b))
            {
                return None;
            }
            out.push(((oct[0] - b'0') << 6) | ((oct[1] - b'0') << 3) | (oct[2] - b'0'));
            i += 4;
        }
    }
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(type_oid: u32, s: &[u8]) -> Result<Value, Error> {
        Value::decode(type_oid, &ColumnValue::Text(Bytes::copy_from_slice(s)))
    }

    fn b(type_oid: u32, s: &[u8]) -> Result<Value, Error> {
        Value::decode(type_oid, &ColumnValue::Binary(Bytes::copy_from_slice(s)))
    }

    #[test]
    fn integers_and_bools() {
        assert_eq!(t(oid::INT2, b"-32768").unwrap(), Value::Int2(i16::MIN));
        assert_eq!(t(oid::INT4, b"2147483647").unwrap(), Value::Int4(i32::MAX));
        assert_eq!(
            t(oid::INT8, b"-9223372036854775808").unwrap(),
            Value::Int8(i64::MIN)
        );
        assert!(t(oid::INT2, b"32768").is_err());
        assert!(t(oid::INT4, b"").is_err());
        assert!(t(oid::INT4, b"1.5").is_err());
        assert_eq!(b(oid::INT2, b"\xff\xfe").unwrap(), Value::Int2(-2));
        assert_eq!(b(oid::INT4, b"\x00\x00\x01\x00").unwrap(), Value::Int4(256));
        assert_eq!(
            b(oid::INT8, b"\x80\0\0\0\0\0\0\0").unwrap(),
            Value::Int8(i64::MIN)
        );
        assert!(b(oid::INT8, b"\x00").is_err());
        assert_eq!(t(oid::BOOL, b"t").unwrap(), Value::Bool(true));
        assert_eq!(t(oid::BOOL, b"f").unwrap(), Value::Bool(false));
        assert!(t(oid::BOOL, b"true").is_err());
        assert_eq!(b(oid::BOOL, b"\x01").unwrap(), Value::Bool(true));
        assert_eq!(b(oid::BOOL, b"\x00").unwrap(), Value::Bool(false));
        assert!(b(oid::BOOL, b"").is_err());
    }

    #[test]
    fn text_like() {
        for o in [oid::TEXT, oid::VARCHAR, oid::BPCHAR, oid::NAME] {
            assert_eq!(t(o, "héllo".as_bytes()).unwrap().as_str(), Some("héllo"));
            assert_eq!(b(o, b"ab   ").unwrap().as_str(), Some("ab   "));
            assert_eq!(
                t(o, b"\xff").unwrap_err(),
                Error::InvalidValue {
                    type_oid: o,
                    format: Format::Text,
                    reason: "not valid UTF-8"
                }
            );
        }
    }

    #[test]
    fn uuid_forms() {
        let want = Uuid::from_bytes([
            0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38,
            0x0a, 0x11,
        ]);
        assert_eq!(
            t(oid::UUID, b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").unwrap(),
            Value::Uuid(want)
        );
        assert_eq!(
            b(
                oid::UUID,
                b"\xa0\xee\xbc\x99\x9c\x0b\x4e\xf8\xbb\x6d\x6b\xb9\xbd\x38\x0a\x11"
            )
            .unwrap(),
            Value::Uuid(want)
        );
        assert_eq!(want.to_string(), "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
        assert!(t(oid::UUID, b"a0eebc999c0b4ef8bb6d6bb9bd380a11").is_err());
        assert!(t(oid::UUID, b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1g").is_err());
        assert!(t(oid::UUID, b"a0eebc99+9c0b-4ef8-bb6d-6bb9bd380a11").is_err());
        assert!(b(oid::UUID, b"\x00").is_err());
        assert!("".parse::<Uuid>().is_err());
    }

    #[test]
    fn json_forms() {
        assert_eq!(
            t(oid::JSONB, b"{\"a\": 1}").unwrap().as_str(),
            Some("{\"a\": 1}")
        );
        assert_eq!(t(oid::JSON, b"[1,  2]").unwrap().as_str(), Some("[1,  2]"));
        assert_eq!(b(oid::JSON, b"[1,  2]").unwrap().as_str(), Some("[1,  2]"));
        assert_eq!(
            b(oid::JSONB, b"\x01{}").unwrap(),
            Value::Json(ByteStr::from_static("{}"))
        );
        assert!(b(oid::JSONB, b"\x02{}").is_err());
        assert!(b(oid::JSONB, b"").is_err());
    }

    #[test]
    fn bytea_forms() {
        assert_eq!(t(oid::BYTEA, b"\\x").unwrap(), Value::Bytea(Bytes::new()));
        assert_eq!(
            t(oid::BYTEA, b"\\x00015C78fF").unwrap(),
            Value::Bytea(Bytes::from_static(b"\x00\x01\\x\xff"))
        );
        assert_eq!(
            t(oid::BYTEA, b"\\000\\001\\\\x\\377").unwrap(),
            Value::Bytea(Bytes::from_static(b"\x00\x01\\x\xff"))
        );
        assert_eq!(t(oid::BYTEA, b"").unwrap(), Value::Bytea(Bytes::new()));
        assert!(t(oid::BYTEA, b"\\x0").is_err());
        assert!(t(oid::BYTEA, b"\\xzz").is_err());
        assert!(t(oid::BYTEA, b"\\4").is_err());
        assert!(t(oid::BYTEA, b"\\400").is_err());
        assert!(t(oid::BYTEA, b"\\").is_err());
        assert_eq!(
            b(oid::BYTEA, b"\x00\xff").unwrap(),
            Value::Bytea(Bytes::from_static(b"\x00\xff"))
        );
    }

    #[test]
    fn timestamps() {
        let v = t(oid::TIMESTAMPTZ, b"2024-05-06 12:38:09.123456+05:30").unwrap();
        let Value::TimestampTz(ts) = v else { panic!() };
        assert_eq!(ts.to_unix_micros(), Some(1_714_979_289_123_456));
        assert_eq!(
            b(oid::TIMESTAMPTZ, &0x0002_AF3F_26B6_7940u64.to_be_bytes()).unwrap(),
            Value::TimestampTz(PgTimestamp::from_pg_micros(0x0002_AF3F_26B6_7940))
        );
        assert_eq!(
            t(oid::TIMESTAMP, b"2000-01-01 00:00:01").unwrap(),
            Value::Timestamp(PgTimestamp::from_pg_micros(1_000_000))
        );
        assert_eq!(
            t(oid::TIMESTAMPTZ, b"infinity").unwrap(),
            Value::TimestampTz(PgTimestamp::INFINITY)
        );
        assert!(t(oid::TIMESTAMPTZ, b"Mon May 06 07:08:09 2024 UTC").is_err());
        assert!(t(oid::TIMESTAMP, b"2000-01-01 00:00:01+00").is_err());
        assert!(b(oid::TIMESTAMP, b"\x00").is_err());
    }

    #[test]
    fn fallback_and_special_kinds() {
        assert_eq!(
            t(oid::NUMERIC, b"12345.678").unwrap(),
            Value::Other {
                type_oid: oid::NUMERIC,
                text: ByteStr::from_static("12345.678")
            }
        );
        assert_eq!(
            b(99999, b"\x01\x02").unwrap(),
            Value::OtherBinary {
                type_oid: 99999,
                data: Bytes::from_static(b"\x01\x02")
            }
        );
        assert!(t(99999, b"\xff").is_err());
        assert_eq!(
            Value::decode(oid::INT4, &ColumnValue::Null).unwrap(),
            Value::Null
        );
        assert!(Value::Null.is_null());
        assert_eq!(
            Value::decode(oid::TEXT, &ColumnValue::UnchangedToast).unwrap(),
            Value::UnchangedToast
        );
    }
}
