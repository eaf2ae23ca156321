//! The crate's error type.

use std::fmt;

use crate::MessageKind;

/// Whether a column value came in text (`t`) or binary (`b`) format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// The type's text output.
    Text,
    /// The type's binary send format (pgoutput's `binary` option).
    Binary,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Text => "text",
            Format::Binary => "binary",
        })
    }
}

/// Everything that can go wrong decoding pgoutput data. Malformed input is
/// always reported as one of these, never as a panic.
///
/// Decoding errors name the message ([`MessageKind`], shown as e.g.
/// `Insert ('I')`), the field and the byte offset from the start of the
/// message (the tag byte is offset 0).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The message had no bytes at all.
    #[error("empty pgoutput message: there is no tag byte")]
    Empty,

    /// The first byte is not a pgoutput message tag.
    #[error(
        "unknown pgoutput message tag {tag:#04x} ({}) at byte 0; the stream is not pgoutput or is newer than this decoder",
        char::from(*tag).escape_default()
    )]
    UnknownTag {
        /// The byte found.
        tag: u8,
    },

    /// The message ended inside a field.
    #[error("{message} message truncated: {field} at byte {offset} needs {needed} bytes but only {remaining} remain")]
    Truncated {
        /// The message being decoded.
        message: MessageKind,
        /// The field being read.
        field: &'static str,
        /// Where the field starts.
        offset: usize,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes left in the message.
        remaining: usize,
    },

    /// A NUL-terminated string has no NUL before the end of the message.
    #[error("{message} message truncated: {field} at byte {offset} has no terminating NUL byte")]
    UnterminatedString {
        /// The message being decoded.
        message: MessageKind,
        /// The field being read.
        field: &'static str,
        /// Where the string starts.
        offset: usize,
    },

    /// A name or other string is not UTF-8.
    #[error("{message} message: {field} at byte {offset} is not valid UTF-8 (walcast needs a UTF8 database encoding)")]
    InvalidUtf8 {
        /// The message being decoded.
        message: MessageKind,
        /// The field being read.
        field: &'static str,
        /// Where the string starts.
        offset: usize,
    },

    /// A length or count field asks for more than the message holds (or is
    /// negative). Nothing is allocated from such a field.
    #[error("{message} message: {field} at byte {offset} is {length}, but only {remaining} bytes remain")]
    LengthOutOfBounds {
        /// The message being decoded.
        message: MessageKind,
        /// The length or count field.
        field: &'static str,
        /// Where the field starts.
        offset: usize,
        /// The value read.
        length: i64,
        /// Bytes left in the message after the field.
        remaining: usize,
    },

    /// A tuple column's kind byte is not `n`, `u`, `t` or `b`.
    #[error("{message} message: unknown tuple column kind {kind:#04x} at byte {offset} (expected 'n', 'u', 't' or 'b')")]
    UnknownTupleKind {
        /// The message being decoded.
        message: MessageKind,
        /// Where the kind byte is.
        offset: usize,
        /// The byte found.
        kind: u8,
    },

    /// A marker or enumerated byte has a value the protocol does not allow.
    #[error("{message} message: {field} at byte {offset} is {found:#04x}, expected {expected}")]
    UnexpectedByte {
        /// The message being decoded.
        message: MessageKind,
        /// The field being read.
        field: &'static str,
        /// Where the byte is.
        offset: usize,
        /// The byte found.
        found: u8,
        /// What the protocol allows there.
        expected: &'static str,
    },

    /// Bytes are left over after the last field. Usually a decoder option
    /// does not match the stream (the protocol version, or
    /// `streaming = parallel` for protocol 4 Stream Abort).
    #[error("{message} message: {remaining} unexpected bytes after the last field at byte {offset}; do the decoder's protocol version and streaming options match the ones given to pgoutput?")]
    TrailingBytes {
        /// The message being decoded.
        message: MessageKind,
        /// Where the extra bytes start.
        offset: usize,
        /// How many there are.
        remaining: usize,
    },

    /// A row message refers to a relation no Relation message described.
    #[error("{message} message for relation OID {rel_id}, which no Relation message described; the relation cache must see every message of the replication session from its start")]
    UnknownRelation {
        /// The row message.
        message: MessageKind,
        /// The relation OID it refers to.
        rel_id: u32,
    },

    /// A row has a different number of columns than its Relation message.
    #[error("{message} message for relation {relation} (OID {rel_id}) has {tuple_columns} columns, but its Relation message described {relation_columns}")]
    ColumnCountMismatch {
        /// The row message.
        message: MessageKind,
        /// The relation OID.
        rel_id: u32,
        /// The relation's schema-qualified name.
        relation: String,
        /// Columns in the Relation message.
        relation_columns: usize,
        /// Columns in the row.
        tuple_columns: usize,
    },

    /// A column looked up by name does not exist in the relation.
    #[error("relation {relation} (OID {rel_id}) has no column {column:?}")]
    UnknownColumn {
        /// The relation OID.
        rel_id: u32,
        /// The relation's schema-qualified name.
        relation: String,
        /// The name looked up.
        column: String,
    },

    /// A column value is not valid for its type.
    #[error("invalid {format} value for type OID {type_oid}: {reason}")]
    InvalidValue {
        /// The column's type OID.
        type_oid: u32,
        /// The value's format.
        format: Format,
        /// What is wrong with it.
        reason: &'static str,
    },
}
