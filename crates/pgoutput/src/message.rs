//! The decoded pgoutput messages.
//!
//! Field names follow PostgreSQL's "Logical Replication Message Formats"
//! documentation. Every message that PostgreSQL sends inside a streamed
//! transaction block (between [`StreamStart`] and [`StreamStop`](Message::StreamStop))
//! carries the transaction id of the streamed transaction in its `xid`
//! field; outside a block that field is `None`.

use std::fmt;

use bytes::Bytes;

use crate::time::PgTimestamp;
use crate::{ByteStr, Lsn};

/// One pgoutput message.
///
/// Decode with [`Decoder::decode`](crate::Decoder::decode) or
/// [`decode`](crate::decode()); with the `encode` feature,
/// `Message::encode` writes the exact bytes PostgreSQL would send.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message {
    /// `B`: a transaction begins.
    Begin(Begin),
    /// `C`: the transaction commits.
    Commit(Commit),
    /// `O`: the transaction came from a replication origin.
    Origin(Origin),
    /// `R`: describes a table, sent before its first row (and again when
    /// its definition changed).
    Relation(Relation),
    /// `Y`: describes a non-built-in data type used by a following Relation.
    Type(Type),
    /// `I`: a row was inserted.
    Insert(Insert),
    /// `U`: a row was updated.
    Update(Update),
    /// `D`: a row was deleted.
    Delete(Delete),
    /// `T`: tables were truncated.
    Truncate(Truncate),
    /// `M`: a logical decoding message (`pg_logical_emit_message`).
    Message(LogicalMessage),
    /// `S`: a block of a streamed in-progress transaction starts (protocol 2+).
    StreamStart(StreamStart),
    /// `E`: the current streamed block ends (protocol 2+).
    StreamStop,
    /// `c`: a streamed transaction commits (protocol 2+).
    StreamCommit(StreamCommit),
    /// `A`: a streamed transaction or subtransaction aborts (protocol 2+).
    StreamAbort(StreamAbort),
    /// `b`: a prepared transaction begins (protocol 3+, two-phase).
    BeginPrepare(BeginPrepare),
    /// `P`: the transaction was prepared (protocol 3+, two-phase).
    Prepare(Prepare),
    /// `K`: a prepared transaction was committed (protocol 3+, two-phase).
    CommitPrepared(CommitPrepared),
    /// `r`: a prepared transaction was rolled back (protocol 3+, two-phase).
    RollbackPrepared(RollbackPrepared),
    /// `p`: a streamed transaction was prepared (protocol 3+, two-phase).
    StreamPrepare(StreamPrepare),
}

impl Message {
    /// Which message this is.
    pub fn kind(&self) -> MessageKind {
        match self {
            Message::Begin(_) => MessageKind::Begin,
            Message::Commit(_) => MessageKind::Commit,
            Message::Origin(_) => MessageKind::Origin,
            Message::Relation(_) => MessageKind::Relation,
            Message::Type(_) => MessageKind::Type,
            Message::Insert(_) => MessageKind::Insert,
            Message::Update(_) => MessageKind::Update,
            Message::Delete(_) => MessageKind::Delete,
            Message::Truncate(_) => MessageKind::Truncate,
            Message::Message(_) => MessageKind::Message,
            Message::StreamStart(_) => MessageKind::StreamStart,
            Message::StreamStop => MessageKind::StreamStop,
            Message::StreamCommit(_) => MessageKind::StreamCommit,
            Message::StreamAbort(_) => MessageKind::StreamAbort,
            Message::BeginPrepare(_) => MessageKind::BeginPrepare,
            Message::Prepare(_) => MessageKind::Prepare,
            Message::CommitPrepared(_) => MessageKind::CommitPrepared,
            Message::RollbackPrepared(_) => MessageKind::RollbackPrepared,
            Message::StreamPrepare(_) => MessageKind::StreamPrepare,
        }
    }

    /// The streamed transaction's id carried by a message sent inside a
    /// stream block (Relation, Type, Insert, Update, Delete, Truncate,
    /// Message); `None` otherwise.
    pub fn stream_xid(&self) -> Option<u32> {
        match self {
            Message::Relation(m) => m.xid,
            Message::Type(m) => m.xid,
            Message::Insert(m) => m.xid,
            Message::Update(m) => m.xid,
            Message::Delete(m) => m.xid,
            Message::Truncate(m) => m.xid,
            Message::Message(m) => m.xid,
            _ => None,
        }
    }
}

/// The kind of a pgoutput message, with its tag byte. Errors name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MessageKind {
    /// `B`
    Begin,
    /// `C`
    Commit,
    /// `O`
    Origin,
    /// `R`
    Relation,
    /// `Y`
    Type,
    /// `I`
    Insert,
    /// `U`
    Update,
    /// `D`
    Delete,
    /// `T`
    Truncate,
    /// `M`
    Message,
    /// `S`
    StreamStart,
    /// `E`
    StreamStop,
    /// `c`
    StreamCommit,
    /// `A`
    StreamAbort,
    /// `b`
    BeginPrepare,
    /// `P`
    Prepare,
    /// `K`
    CommitPrepared,
    /// `r`
    RollbackPrepared,
    /// `p`
    StreamPrepare,
}

impl MessageKind {
    /// Every kind, in the order of PostgreSQL's documentation.
    pub const ALL: [MessageKind; 19] = [
        MessageKind::Begin,
        MessageKind::Message,
        MessageKind::Commit,
        MessageKind::Origin,
        MessageKind::Relation,
        MessageKind::Type,
        MessageKind::Insert,
        MessageKind::Update,
        MessageKind::Delete,
        MessageKind::Truncate,
        MessageKind::StreamStart,
        MessageKind::StreamStop,
        MessageKind::StreamCommit,
        MessageKind::StreamAbort,
        MessageKind::BeginPrepare,
        MessageKind::Prepare,
        MessageKind::CommitPrepared,
        MessageKind::RollbackPrepared,
        MessageKind::StreamPrepare,
    ];

    /// The tag byte that starts the message.
    pub const fn tag(self) -> u8 {
        match self {
            MessageKind::Begin => b'B',
            MessageKind::Commit => b'C',
            MessageKind::Origin => b'O',
            MessageKind::Relation => b'R',
            MessageKind::Type => b'Y',
            MessageKind::Insert => b'I',
            MessageKind::Update => b'U',
            MessageKind::Delete => b'D',
            MessageKind::Truncate => b'T',
            MessageKind::Message => b'M',
            MessageKind::StreamStart => b'S',
            MessageKind::StreamStop => b'E',
            MessageKind::StreamCommit => b'c',
            MessageKind::StreamAbort => b'A',
            MessageKind::BeginPrepare => b'b',
            MessageKind::Prepare => b'P',
            MessageKind::CommitPrepared => b'K',
            MessageKind::RollbackPrepared => b'r',
            MessageKind::StreamPrepare => b'p',
        }
    }

    /// The kind for a tag byte, if it is one.
    pub const fn from_tag(tag: u8) -> Option<MessageKind> {
        Some(match tag {
            b'B' => MessageKind::Begin,
            b'C' => MessageKind::Commit,
            b'O' => MessageKind::Origin,
            b'R' => MessageKind::Relation,
            b'Y' => MessageKind::Type,
            b'I' => MessageKind::Insert,
            b'U' => MessageKind::Update,
            b'D' => MessageKind::Delete,
            b'T' => MessageKind::Truncate,
            b'M' => MessageKind::Message,
            b'S' => MessageKind::StreamStart,
            b'E' => MessageKind::StreamStop,
            b'c' => MessageKind::StreamCommit,
            b'A' => MessageKind::StreamAbort,
            b'b' => MessageKind::BeginPrepare,
            b'P' => MessageKind::Prepare,
            b'K' => MessageKind::CommitPrepared,
            b'r' => MessageKind::RollbackPrepared,
            b'p' => MessageKind::StreamPrepare,
            _ => return None,
        })
    }

    /// The name PostgreSQL's documentation uses, e.g. `"Stream Commit"`.
    pub const fn name(self) -> &'static str {
        match self {
            MessageKind::Begin => "Begin",
            MessageKind::Commit => "Commit",
            MessageKind::Origin => "Origin",
            MessageKind::Relation => "Relation",
            MessageKind::Type => "Type",
            MessageKind::Insert => "Insert",
            MessageKind::Update => "Update",
            MessageKind::Delete => "Delete",
            MessageKind::Truncate => "Truncate",
            MessageKind::Message => "Message",
            MessageKind::StreamStart => "Stream Start",
            MessageKind::StreamStop => "Stream Stop",
            MessageKind::StreamCommit => "Stream Commit",
            MessageKind::StreamAbort => "Stream Abort",
            MessageKind::BeginPrepare => "Begin Prepare",
            MessageKind::Prepare => "Prepare",
            MessageKind::CommitPrepared => "Commit Prepared",
            MessageKind::RollbackPrepared => "Rollback Prepared",
            MessageKind::StreamPrepare => "Stream Prepare",
        }
    }

    /// Whether PostgreSQL prefixes this message with the streamed
    /// transaction's id when it is sent inside a stream block.
    pub const fn has_stream_xid(self) -> bool {
        matches!(
            self,
            MessageKind::Relation
                | MessageKind::Type
                | MessageKind::Insert
                | MessageKind::Update
                | MessageKind::Delete
                | MessageKind::Truncate
                | MessageKind::Message
        )
    }
}

/// `Insert ('I')`
impl fmt::Display for MessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ('{}')", self.name(), self.tag() as char)
    }
}

/// `B`: a (non-streamed) transaction begins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// The LSN of the commit record (equals [`Commit::commit_lsn`]).
    pub final_lsn: Lsn,
    /// When the transaction committed.
    pub commit_time: PgTimestamp,
    /// The transaction id.
    pub xid: u32,
}

/// `C`: the transaction commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// Flags; currently always 0.
    pub flags: u8,
    /// The LSN of the commit record.
    pub commit_lsn: Lsn,
    /// The end of the commit record: the position to confirm once the
    /// transaction is fully handled.
    pub end_lsn: Lsn,
    /// When the transaction committed.
    pub commit_time: PgTimestamp,
}

/// `O`: the transaction was replayed from a replication origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The commit LSN on the origin server.
    pub commit_lsn: Lsn,
    /// The origin's name.
    pub name: ByteStr,
}

/// A table's replica identity: which old values Update and Delete carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicaIdentity {
    /// `d`: the primary key (the default).
    Default,
    /// `n`: nothing.
    Nothing,
    /// `f`: all columns (`REPLICA IDENTITY FULL`).
    Full,
    /// `i`: the columns of a chosen unique index.
    Index,
}

impl ReplicaIdentity {
    /// The byte PostgreSQL sends (`relreplident`).
    pub const fn as_byte(self) -> u8 {
        match self {
            ReplicaIdentity::Default => b'd',
            ReplicaIdentity::Nothing => b'n',
            ReplicaIdentity::Full => b'f',
            ReplicaIdentity::Index => b'i',
        }
    }

    /// The identity for a `relreplident` byte, if it is one.
    pub const fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            b'd' => Some(ReplicaIdentity::Default),
            b'n' => Some(ReplicaIdentity::Nothing),
            b'f' => Some(ReplicaIdentity::Full),
            b'i' => Some(ReplicaIdentity::Index),
            _ => None,
        }
    }
}

/// `R`: describes a published table and its columns.
///
/// PostgreSQL sends one before the first row of a table in a session, and
/// again after the table's definition changed; keep them in a
/// [`RelationCache`](crate::RelationCache).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// The streamed transaction's id inside a stream block, else `None`.
    pub xid: Option<u32>,
    /// The table's OID; row messages refer to it.
    pub rel_id: u32,
    /// The schema; empty for `pg_catalog`.
    pub namespace: ByteStr,
    /// The table name.
    pub name: ByteStr,
    /// Which old values Update and Delete carry.
    pub replica_identity: ReplicaIdentity,
    /// The published columns, in the order tuples carry them.
    pub columns: Vec<RelationColumn>,
}

impl Relation {
    /// The schema name, `pg_catalog` when PostgreSQL sent an empty one.
    pub fn schema(&self) -> &str {
        if self.namespace.is_empty() {
            "pg_catalog"
        } else {
            self.namespace.as_str()
        }
    }

    /// `schema.table`, unquoted (e.g. `public.outbox`).
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.schema(), self.name)
    }

    /// The position of the column called `name`, if there is one.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns
            .iter()
            .position(|c| c.name.as_bytes().as_ref() == name.as_bytes())
    }

    /// The column called `name`, if there is one.
    pub fn column(&self, name: &str) -> Option<&RelationColumn> {
        self.column_index(name).map(|i| &self.columns[i])
    }

    /// The columns that are part of the replica identity key.
    pub fn key_columns(&self) -> impl Iterator<Item = (usize, &RelationColumn)> + '_ {
        self.columns.iter().enumerate().filter(|(_, c)| c.is_key())
    }
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Flags: bit 1 ([`RelationColumn::FLAG_KEY`]) marks a key column.
    pub flags: u8,
    /// The column name.
    pub name: ByteStr,
    /// The data type's OID (see [`oid`](crate::oid)).
    pub type_oid: u32,
    /// The type modifier (`atttypmod`), -1 when none (e.g. `varchar(20)` is 24).
    pub type_modifier: i32,
}

impl RelationColumn {
    /// The flag bit marking a column of the replica identity key.
    pub const FLAG_KEY: u8 = 1;

    /// Whether the column is part of the replica identity key.
    pub const fn is_key(&self) -> bool {
        self.flags & Self::FLAG_KEY != 0
    }
}

/// `Y`: describes a data type that is not built in (enums, domains, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Type {
    /// The streamed transaction's id inside a stream block, else `None`.
    pub xid: Option<u32>,
    /// The type's OID.
    pub type_oid: u32,
    /// The schema; empty for `pg_catalog`.
    pub namespace: ByteStr,
    /// The type name.
    pub name: ByteStr,
}

/// One column's value in a row message.
///
/// The data is a slice of the message buffer: no copy, no allocation.
/// Interpret it with [`Value::decode`](crate::Value::decode).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ColumnValue {
    /// `n`: SQL NULL.
    Null,
    /// `u`: an unchanged TOASTed value whose data PostgreSQL did not send.
    UnchangedToast,
    /// `t`: the value in text format (the type's output function).
    Text(Bytes),
    /// `b`: the value in binary format (the type's send function; only with
    /// the `binary` option).
    Binary(Bytes),
}

impl ColumnValue {
    /// The kind byte PostgreSQL sends (`n`, `u`, `t` or `b`).
    pub const fn kind_byte(&self) -> u8 {
        match self {
            ColumnValue::Null => b'n',
            ColumnValue::UnchangedToast => b'u',
            ColumnValue::Text(_) => b't',
            ColumnValue::Binary(_) => b'b',
        }
    }

    /// Whether this is SQL NULL.
    pub const fn is_null(&self) -> bool {
        matches!(self, ColumnValue::Null)
    }

    /// The text or binary data, `None` for NULL and unchanged TOAST.
    pub const fn data(&self) -> Option<&Bytes> {
        match self {
            ColumnValue::Text(b) | ColumnValue::Binary(b) => Some(b),
            _ => None,
        }
    }
}

/// The column values of one row, in the order of the relation's columns.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TupleData {
    /// The values.
    pub columns: Vec<ColumnValue>,
}

impl TupleData {
    /// A tuple of these values.
    pub fn new(columns: Vec<ColumnValue>) -> Self {
        TupleData { columns }
    }

    /// How many columns the tuple carries.
    pub fn len(&self) -> usize {
        self.columns.len()
    }

    /// Whether the tuple carries no column.
    pub fn is_empty(&self) -> bool {
        self.columns.is_empty()
    }

    /// The value at `index`.
    pub fn get(&self, index: usize) -> Option<&ColumnValue> {
        self.columns.get(index)
    }

    /// The values in order.
    pub fn iter(&self) -> std::slice::Iter<'_, ColumnValue> {
        self.columns.iter()
    }
}

impl From<Vec<ColumnValue>> for TupleData {
    fn from(columns: Vec<ColumnValue>) -> Self {
        TupleData { columns }
    }
}

impl<'a> IntoIterator for &'a TupleData {
    type Item = &'a ColumnValue;
    type IntoIter = std::slice::Iter<'a, ColumnValue>;

    fn into_iter(self) -> Self::IntoIter {
        self.columns.iter()
    }
}

/// `I`: a row was inserted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    /// The streamed transaction's id inside a stream block, else `None`.
    pub xid: Option<u32>,
    /// The table's OID (see [`Relation::rel_id`]).
    pub rel_id: u32,
    /// The new row.
    pub new: TupleData,
}

/// The old row an Update or Delete carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// `K`: only the replica identity key columns are set; the others are
    /// NULL.
    Key(TupleData),
    /// `O`: the whole old row (`REPLICA IDENTITY FULL`).
    Full(TupleData),
}

impl OldTuple {
    /// The old values, whichever form they came in.
    pub fn tuple(&self) -> &TupleData {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }

    /// The marker byte PostgreSQL sends (`K` or `O`).
    pub const fn marker(&self) -> u8 {
        match self {
            OldTuple::Key(_) => b'K',
            OldTuple::Full(_) => b'O',
        }
    }
}

/// `U`: a row was updated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// The streamed transaction's id inside a stream block, else `None`.
    pub xid: Option<u32>,
    /// The table's OID.
    pub rel_id: u32,
    /// The old key (when the key changed) or the whole old row (replica
    /// identity full); `None` otherwise.
    pub old: Option<OldTuple>,
    /// The new row. Unchanged TOASTed values are
    /// [`ColumnValue::UnchangedToast`].
    pub new: TupleData,
}

/// `D`: a row was deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    /// The streamed transaction's id inside a stream block, else `None`.
    pub xid: Option<u32>,
    /// The table's OID.
    pub rel_id: u32,
    /// The deleted row's key or whole old row.
    pub old: OldTuple,
}

/// `T`: tables were truncated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// The streamed transaction's id inside a stream block, else `None`.
    pub xid: Option<u32>,
    /// Option bits: [`Truncate::CASCADE`], [`Truncate::RESTART_IDENTITY`].
    pub options: u8,
    /// The truncated tables' OIDs.
    pub rel_ids: Vec<u32>,
}

impl Truncate {
    /// Option bit: `TRUNCATE ... CASCADE`.
    pub const CASCADE: u8 = 1;
    /// Option bit: `TRUNCATE ... RESTART IDENTITY`.
    pub const RESTART_IDENTITY: u8 = 2;

    /// Whether `CASCADE` was given.
    pub const fn cascade(&self) -> bool {
        self.options & Self::CASCADE != 0
    }

    /// Whether `RESTART IDENTITY` was given.
    pub const fn restart_identity(&self) -> bool {
        self.options & Self::RESTART_IDENTITY != 0
    }
}

/// `M`: a logical decoding message (`pg_logical_emit_message`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    /// The streamed transaction's id inside a stream block, else `None`.
    pub xid: Option<u32>,
    /// Flags: bit 1 ([`LogicalMessage::FLAG_TRANSACTIONAL`]) marks a
    /// transactional message.
    pub flags: u8,
    /// The LSN of the message record.
    pub lsn: Lsn,
    /// The prefix given to `pg_logical_emit_message`.
    pub prefix: ByteStr,
    /// The content, as given (arbitrary bytes).
    pub content: Bytes,
}

impl LogicalMessage {
    /// The flag bit of a transactional message.
    pub const FLAG_TRANSACTIONAL: u8 = 1;

    /// Whether the message is part of its transaction (sent between Begin
    /// and Commit, only if the transaction commits) rather than sent at once.
    pub const fn is_transactional(&self) -> bool {
        self.flags & Self::FLAG_TRANSACTIONAL != 0
    }
}

/// `S`: a block of a streamed in-progress transaction starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStart {
    /// The streamed (top-level) transaction's id.
    pub xid: u32,
    /// Whether this is the transaction's first block.
    pub first_segment: bool,
}

/// `c`: a streamed transaction commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCommit {
    /// The transaction id.
    pub xid: u32,
    /// Flags; currently always 0.
    pub flags: u8,
    /// The LSN of the commit record.
    pub commit_lsn: Lsn,
    /// The end of the commit record.
    pub end_lsn: Lsn,
    /// When the transaction committed.
    pub commit_time: PgTimestamp,
}

/// `A`: a streamed transaction (`subxid == xid`) or one of its
/// subtransactions aborts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAbort {
    /// The top-level transaction id.
    pub xid: u32,
    /// The aborted (sub)transaction's id.
    pub subxid: u32,
    /// Present with protocol 4 and `streaming = parallel`.
    pub abort_info: Option<StreamAbortInfo>,
}

/// The extra fields of a protocol-4 Stream Abort under parallel streaming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAbortInfo {
    /// The LSN of the abort record.
    pub abort_lsn: Lsn,
    /// When the transaction aborted.
    pub abort_time: PgTimestamp,
}

/// `b`: a transaction prepared for two-phase commit begins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeginPrepare {
    /// The LSN of the prepare record.
    pub prepare_lsn: Lsn,
    /// The end of the prepare record.
    pub end_lsn: Lsn,
    /// When the transaction was prepared.
    pub prepare_time: PgTimestamp,
    /// The transaction id.
    pub xid: u32,
    /// The global transaction identifier given to `PREPARE TRANSACTION`.
    pub gid: ByteStr,
}

/// `P`: the transaction was prepared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepare {
    /// Flags; currently always 0.
    pub flags: u8,
    /// The LSN of the prepare record.
    pub prepare_lsn: Lsn,
    /// The end of the prepare record.
    pub end_lsn: Lsn,
    /// When the transaction was prepared.
    pub prepare_time: PgTimestamp,
    /// The transaction id.
    pub xid: u32,
    /// The global transaction identifier.
    pub gid: ByteStr,
}

/// `K`: a prepared transaction was committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitPrepared {
    /// Flags; currently always 0.
    pub flags: u8,
    /// The LSN of the commit-prepared record.
    pub commit_lsn: Lsn,
    /// The end of the commit-prepared record.
    pub end_lsn: Lsn,
    /// When it was committed.
    pub commit_time: PgTimestamp,
    /// The transaction id.
    pub xid: u32,
    /// The global transaction identifier.
    pub gid: ByteStr,
}

/// `r`: a prepared transaction was rolled back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackPrepared {
    /// Flags; currently always 0.
    pub flags: u8,
    /// The end of the prepare record.
    pub prepare_end_lsn: Lsn,
    /// The end of the rollback-prepared record.
    pub rollback_end_lsn: Lsn,
    /// When the transaction was prepared.
    pub prepare_time: PgTimestamp,
    /// When it was rolled back.
    pub rollback_time: PgTimestamp,
    /// The transaction id.
    pub xid: u32,
    /// The global transaction identifier.
    pub gid: ByteStr,
}

/// `p`: a streamed transaction was prepared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPrepare {
    /// Flags; currently always 0.
    pub flags: u8,
    /// The LSN of the prepare record.
    pub prepare_lsn: Lsn,
    /// The end of the prepare record.
    pub end_lsn: Lsn,
    /// When the transaction was prepared.
    pub prepare_time: PgTimestamp,
    /// The transaction id.
    pub xid: u32,
    /// The global transaction identifier.
    pub gid: ByteStr,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip() {
        for kind in MessageKind::ALL {
            assert_eq!(MessageKind::from_tag(kind.tag()), Some(kind));
        }
        let mut tags: Vec<u8> = MessageKind::ALL.iter().map(|k| k.tag()).collect();
        tags.sort_unstable();
        tags.dedup();
        assert_eq!(tags.len(), MessageKind::ALL.len());
        assert_eq!(MessageKind::from_tag(b'x'), None);
        assert_eq!(MessageKind::StreamCommit.to_string(), "Stream Commit ('c')");
    }

    #[test]
    fn flags() {
        let t = Truncate {
            xid: None,
            options: 3,
            rel_ids: vec![],
        };
        assert!(t.cascade() && t.restart_identity());
        let col = RelationColumn {
            flags: 1,
            name: "id".into(),
            type_oid: 23,
            type_modifier: -1,
        };
        assert!(col.is_key());
        for b in [b'd', b'n', b'f', b'i'] {
            assert_eq!(ReplicaIdentity::from_byte(b).unwrap().as_byte(), b);
        }
        assert_eq!(ReplicaIdentity::from_byte(b'x'), None);
    }
}
