//! Zero-copy decoder for PostgreSQL's `pgoutput` logical replication
//! protocol, versions 1 to 4.
//!
//! No I/O: give it the bytes of one pgoutput message (the payload of a
//! replication `XLogData` message, or a `data` row of
//! `pg_logical_slot_peek_binary_changes`) and get a [`Message`] back.
//! Column values, names and logical message contents stay slices of the
//! input [`Bytes`](bytes::Bytes); decoding a row allocates one `Vec` for its columns and
//! nothing per column. Malformed input is an [`Error`] naming the message,
//! the field and the byte offset, never a panic.
//!
//! - [`Decoder`] follows one replication session (it knows the protocol
//!   options and whether a stream block is open); [`decode()`] is the
//!   stateless form taking [`DecodeOptions`].
//! - [`RelationCache`] keeps Relation messages to interpret row messages:
//!   column names, types, keys, replica identity.
//! - [`Value::decode`] interprets a column by its type OID ([`oid`]):
//!   text, uuid, json/jsonb, bytea, integers, bool, timestamps, in text and
//!   binary format, falling back to the text form for other types.
//! - [`Lsn`] is a WAL position; [`PgTimestamp`] a PostgreSQL timestamp.
//! - With the `encode` feature, `Message::encode` writes messages back
//!   (for tests and fuzzing).
//!
//! # Examples
//!
//! Decoding a Relation and an Insert of an outbox table, as a relay would:
//!
//! ```
//! use bytes::Bytes;
//! use walcast_pgoutput::{oid, Decoder, Message, RelationCache, Value};
//!
//! // public.outbox (id uuid key, payload jsonb), then one inserted row.
//! let relation = Bytes::from_static(
//!     b"R\x00\x00\x40\x00public\x00outbox\x00d\x00\x02\
//!       \x01id\x00\x00\x00\x0b\x86\xff\xff\xff\xff\
//!       \x00payload\x00\x00\x00\x0e\xda\xff\xff\xff\xff",
//! );
//! let insert = Bytes::from_static(
//!     b"I\x00\x00\x40\x00N\x00\x02\
//!       t\x00\x00\x00\x24a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11\
//!       t\x00\x00\x00\x0c{\"total\": 1}",
//! );
//!
//! let mut decoder = Decoder::new(1);
//! let mut relations = RelationCache::new();
//! for bytes in [relation, insert] {
//!     let message = decoder.decode(&bytes)?;
//!     relations.apply(&message);
//!     if let Message::Insert(insert) = &message {
//!         let row = relations.insert_row(insert)?;
//!         assert_eq!(row.relation().qualified_name(), "public.outbox");
//!         let Value::Uuid(id) = row.value("id")? else { panic!("not a uuid") };
//!         assert_eq!(id.to_string(), "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
//!         let Value::Json(payload) = row.value("payload")? else { panic!("not json") };
//!         assert_eq!(payload, "{\"total\": 1}");
//!         assert_eq!(row.relation().columns[1].type_oid, oid::JSONB);
//!     }
//! }
//! # Ok::<(), walcast_pgoutput::Error>(())
//! ```
#![warn(missing_docs)]

mod bytestr;
mod decode;
#[cfg(feature = "encode")]
mod encode;
mod error;
mod lsn;
mod message;
mod relation;
mod time;
mod value;

pub use crate::bytestr::ByteStr;
pub use crate::decode::{decode, DecodeOptions, Decoder};
pub use crate::error::{Error, Format};
pub use crate::lsn::{Lsn, ParseLsnError};
pub use crate::message::{
    Begin, BeginPrepare, ColumnValue, Commit, CommitPrepared, Delete, Insert, LogicalMessage,
    Message, MessageKind, OldTuple, Origin, Prepare, Relation, RelationColumn, ReplicaIdentity,
    RollbackPrepared, StreamAbort, StreamAbortInfo, StreamCommit, StreamPrepare, StreamStart,
    Truncate, TupleData, Type, Update,
};
pub use crate::relation::{RelationCache, Row};
pub use crate::time::{PgTimestamp, POSTGRES_EPOCH_UNIX_MICROS};
pub use crate::value::{decode_bytea_text, oid, ParseUuidError, Uuid, Value};
