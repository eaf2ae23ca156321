//! Remembering Relation messages to interpret row messages.

use std::collections::HashMap;

use crate::message::*;
use crate::{oid, Error, Value};

/// The relations (and custom types) a replication session described, by
/// OID, to interpret later row messages.
///
/// Feed it every decoded message with [`RelationCache::apply`] (it keeps
/// Relation and Type messages and follows stream blocks), then resolve row
/// messages with [`RelationCache::insert_row`], [`RelationCache::update_rows`]
/// or [`RelationCache::delete_row`]. A Relation message for an OID already
/// known replaces the old description (PostgreSQL re-sends it after
/// `ALTER TABLE`).
///
/// Relation messages sent inside a stream block describe the table as that
/// (uncommitted) streamed transaction sees it. They apply to that
/// transaction's rows only (including its subtransactions', whose messages
/// carry the subtransaction's xid: the cache follows Stream Start to know
/// the top-level transaction), until its Stream Commit (or Stream Prepare)
/// makes them the current description; a Stream Abort of the top-level
/// transaction drops them. This mirrors PostgreSQL's own subscriber.
/// Resolve a streamed row before the next Stream Stop is applied.
///
/// # Examples
///
/// ```
/// use bytes::Bytes;
/// use walcast_pgoutput::{decode, DecodeOptions, Message, RelationCache, Value};
///
/// let opts = DecodeOptions::new(1);
/// let mut cache = RelationCache::new();
/// // Relation 0x4047 public.msg_t with one key column "id" of type int4
/// // (captured from PostgreSQL 15).
/// let relation = Bytes::from_static(
///     b"R\x00\x00\x40\x47public\x00msg_t\x00d\x00\x01\x01id\x00\x00\x00\x00\x17\xff\xff\xff\xff",
/// );
/// cache.apply(&decode(&relation, &opts)?);
/// let insert = Bytes::from_static(b"I\x00\x00\x40\x47N\x00\x01t\x00\x00\x00\x011");
/// let Message::Insert(insert) = decode(&insert, &opts)? else { unreachable!() };
/// let row = cache.insert_row(&insert)?;
/// assert_eq!(row.relation().qualified_name(), "public.msg_t");
/// assert_eq!(row.value("id")?, Value::Int4(1));
/// # Ok::<(), walcast_pgoutput::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct RelationCache {
    relations: HashMap<u32, Relation>,
    /// Relations described inside stream blocks, by top-level xid.
    streamed: HashMap<u32, HashMap<u32, Relation>>,
    types: HashMap<u32, Type>,
    /// The top-level xid of the open stream block, if any.
    stream_top: Option<u32>,
}

impl RelationCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes note of a decoded message: keeps Relation and Type messages,
    /// follows stream blocks, promotes a streamed transaction's relations on
    /// Stream Commit and Stream Prepare, and drops them on its Stream Abort.
    /// Other messages are ignored. Returns whether the relations changed.
    pub fn apply(&mut self, message: &Message) -> bool {
        match message {
            Message::StreamStart(s) => {
                self.stream_top = Some(s.xid);
                false
            }
            Message::StreamStop => {
                self.stream_top = None;
                false
            }
            Message::Relation(r) => {
                self.insert(r.clone());
                true
            }
            Message::Type(t) => {
                self.types.insert(t.type_oid, t.clone());
                true
            }
            Message::StreamCommit(c) => self.promote(c.xid),
            Message::StreamPrepare(p) => self.promote(p.xid),
            Message::StreamAbort(a) if a.xid == a.subxid => self.streamed.remove(&a.xid).is_some(),
            _ => false,
        }
    }

    /// Adds or replaces a relation. One with `xid: Some(..)` (sent inside a
    /// stream block) is kept for the open stream block's transaction only
    /// (see the type's documentation). Returns the description it replaced.
    pub fn insert(&mut self, relation: Relation) -> Option<Relation> {
        match relation.xid {
            Some(xid) => self
                .streamed
                .entry(self.stream_top.unwrap_or(xid))
                .or_default()
                .insert(relation.rel_id, relation),
            None => self.relations.insert(relation.rel_id, relation),
        }
    }

    fn promote(&mut self, xid: u32) -> bool {
        match self.streamed.remove(&xid) {
            Some(rels) => {
                for (id, mut rel) in rels {
                    rel.xid = None;
                    self.relations.insert(id, rel);
                }
                true
            }
            None => false,
        }
    }

    /// The current description of a relation (outside any streamed
    /// transaction).
    pub fn get(&self, rel_id: u32) -> Option<&Relation> {
        self.relations.get(&rel_id)
    }

    /// The description a row message with this stream-block xid prefix
    /// sees: for `Some(..)`, the open stream block's transaction's own if
    /// it sent one; else the current one.
    pub fn get_for(&self, stream_xid: Option<u32>, rel_id: u32) -> Option<&Relation> {
        stream_xid
            .and_then(|xid| self.streamed.get(&self.stream_top.unwrap_or(xid)))
            .and_then(|rels| rels.get(&rel_id))
            .or_else(|| self.relations.get(&rel_id))
    }

    /// Like [`RelationCache::get_for`], with an error naming `message` if
    /// the relation was never described.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownRelation`].
    pub fn relation(
        &self,
        message: MessageKind,
        stream_xid: Option<u32>,
        rel_id: u32,
    ) -> Result<&Relation, Error> {
        self.get_for(stream_xid, rel_id)
            .ok_or(Error::UnknownRelation { message, rel_id })
    }

    /// The position of column `name` in relation `rel_id`'s rows; `None` if
    /// the relation or the column is unknown.
    pub fn column_index(&self, rel_id: u32, name: &str) -> Option<usize> {
        self.get(rel_id)?.column_index(name)
    }

    /// A custom type described by a Type message.
    pub fn type_info(&self, type_oid: u32) -> Option<&Type> {
        self.types.get(&type_oid)
    }

    /// The type OID to interpret a column of type `type_oid` with: for a
    /// domain over a built-in type (which pgoutput describes with a Type
    /// message naming the base type in `pg_catalog`), the base type's OID;
    /// otherwise `type_oid` itself.
    pub fn value_type_oid(&self, type_oid: u32) -> u32 {
        if type_oid < oid::FIRST_NORMAL_OBJECT_ID {
            return type_oid;
        }
        match self.types.get(&type_oid) {
            Some(t) if t.namespace.is_empty() || t.namespace == "pg_catalog" => {
                oid::by_name(&t.name).unwrap_or(type_oid)
            }
            _ => type_oid,
        }
    }

    /// Pairs a tuple of a row message with its relation.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownRelation`] if no Relation message described
    /// `rel_id`; [`Error::ColumnCountMismatch`] if the tuple does not have
    /// the relation's number of columns.
    pub fn row<'a>(
        &'a self,
        message: MessageKind,
        stream_xid: Option<u32>,
        rel_id: u32,
        tuple: &'a TupleData,
    ) -> Result<Row<'a>, Error> {
        let relation = self.relation(message, stream_xid, rel_id)?;
        if relation.columns.len() != tuple.len() {
            return Err(Error::ColumnCountMismatch {
                message,
                rel_id,
                relation: relation.qualified_name(),
                relation_columns: relation.columns.len(),
                tuple_columns: tuple.len(),
            });
        }
        Ok(Row {
            relation,
            tuple,
            cache: self,
        })
    }

    /// The inserted row.
    ///
    /// # Errors
    ///
    /// As [`RelationCache::row`].
    pub fn insert_row<'a>(&'a self, insert: &'a Insert) -> Result<Row<'a>, Error> {
        self.row(MessageKind::Insert, insert.xid, insert.rel_id, &insert.new)
    }

    /// The old row or key (if sent) and the new row of an update.
    ///
    /// # Errors
    ///
    /// As [`RelationCache::row`].
    pub fn update_rows<'a>(
        &'a self,
        update: &'a Update,
    ) -> Result<(Option<Row<'a>>, Row<'a>), Error> {
        let old = match &update.old {
            Some(old) => {
                Some(self.row(MessageKind::Update, update.xid, update.rel_id, old.tuple())?)
            }
            None => None,
        };
        let new = self.row(MessageKind::Update, update.xid, update.rel_id, &update.new)?;
        Ok((old, new))
    }

    /// The deleted row's key or whole old row.
    ///
    /// # Errors
    ///
    /// As [`RelationCache::row`].
    pub fn delete_row<'a>(&'a self, delete: &'a Delete) -> Result<Row<'a>, Error> {
        self.row(
            MessageKind::Delete,
            delete.xid,
            delete.rel_id,
            delete.old.tuple(),
        )
    }

    /// Forgets a relation's current description.
    pub fn remove(&mut self, rel_id: u32) -> Option<Relation> {
        self.relations.remove(&rel_id)
    }

    /// Forgets everything (for a new replication session).
    pub fn clear(&mut self) {
        self.relations.clear();
        self.streamed.clear();
        self.types.clear();
        self.stream_top = None;
    }

    /// How many relations have a current description.
    pub fn len(&self) -> usize {
        self.relations.len()
    }

    /// Whether no relation has a current description.
    pub fn is_empty(&self) -> bool {
        self.relations.is_empty()
    }

    /// The current descriptions, in no particular order.
    pub fn relations(&self) -> impl Iterator<Item = &Relation> + '_ {
        self.relations.values()
    }
}

/// A row's values together with its relation's description.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    relation: &'a Relation,
    tuple: &'a TupleData,
    cache: &'a RelationCache,
}

impl<'a> Row<'a> {
    /// The relation the row belongs to.
    pub fn relation(&self) -> &'a Relation {
        self.relation
    }

    /// The raw values.
    pub fn tuple(&self) -> &'a TupleData {
        self.tuple
    }

    /// How many columns the row has.
    pub fn len(&self) -> usize {
        self.tuple.len()
    }

    /// Whether the row has no columns.
    pub fn is_empty(&self) -> bool {
        self.tuple.is_empty()
    }

    /// Column `index`'s description and raw value.
    pub fn column(&self, index: usize) -> Option<(&'a RelationColumn, &'a ColumnValue)> {
        Some((self.relation.columns.get(index)?, self.tuple.get(index)?))
    }

    /// Column `name`'s raw value.
    pub fn get(&self, name: &str) -> Option<&'a ColumnValue> {
        self.tuple.get(self.relation.column_index(name)?)
    }

    /// Column `index`'s value, interpreted by its type ([`Value::decode`];
    /// a domain over a built-in type is read as its base type, see
    /// [`RelationCache::value_type_oid`]).
    ///
    /// # Errors
    ///
    /// [`Error::UnknownColumn`] if there is no such column,
    /// [`Error::InvalidValue`] if the value is not valid for its type.
    pub fn value_at(&self, index: usize) -> Result<Value, Error> {
        match self.column(index) {
            Some((col, value)) => Value::decode(self.cache.value_type_oid(col.type_oid), value),
            None => Err(self.unknown_column(format!("#{index}"))),
        }
    }

    /// Column `name`'s value, interpreted by its type ([`Value::decode`]).
    ///
    /// # Errors
    ///
    /// [`Error::UnknownColumn`] if there is no such column,
    /// [`Error::InvalidValue`] if the value is not valid for its type.
    pub fn value(&self, name: &str) -> Result<Value, Error> {
        match self.relation.column_index(name) {
            Some(index) => self.value_at(index),
            None => Err(self.unknown_column(name.to_owned())),
        }
    }

    fn unknown_column(&self, column: String) -> Error {
        Error::UnknownColumn {
            rel_id: self.relation.rel_id,
            relation: self.relation.qualified_name(),
            column,
        }
    }

    /// The columns' descriptions and raw values, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&'a RelationColumn, &'a ColumnValue)> + 'a {
        self.relation.columns.iter().zip(self.tuple.iter())
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::ByteStr;

    fn relation(xid: Option<u32>, rel_id: u32, cols: &[(&'static str, u32)]) -> Relation {
        Relation {
            xid,
            rel_id,
            namespace: ByteStr::from_static("public"),
            name: ByteStr::from_static("t"),
            replica_identity: ReplicaIdentity::Default,
            columns: cols
                .iter()
                .map(|&(name, type_oid)| RelationColumn {
                    flags: u8::from(name == "id"),
                    name: ByteStr::from_static(name),
                    type_oid,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    fn text(s: &'static str) -> ColumnValue {
        ColumnValue::Text(Bytes::from_static(s.as_bytes()))
    }

    fn insert(xid: Option<u32>, rel_id: u32, cols: Vec<ColumnValue>) -> Insert {
        Insert {
            xid,
            rel_id,
            new: TupleData::new(cols),
        }
    }

    #[test]
    fn unknown_relation_is_an_error() {
        let cache = RelationCache::new();
        let ins = insert(None, 5, vec![]);
        let err = cache.insert_row(&ins).unwrap_err();
        assert_eq!(
            err,
            Error::UnknownRelation {
                message: MessageKind::Insert,
                rel_id: 5
            }
        );
        assert!(err.to_string().contains("relation OID 5"));
    }

    #[test]
    fn resolves_and_replaces() {
        let mut cache = RelationCache::new();
        assert!(cache.apply(&Message::Relation(relation(None, 5, &[("id", oid::INT4)]))));
        let ins = insert(None, 5, vec![text("7")]);
        let row = cache.insert_row(&ins).unwrap();
        assert_eq!(row.value("id").unwrap(), Value::Int4(7));
        assert_eq!(cache.column_index(5, "id"), Some(0));
        assert_eq!(cache.column_index(5, "nope"), None);
        assert_eq!(cache.column_index(6, "id"), None);
        assert!(matches!(
            row.value("nope"),
            Err(Error::UnknownColumn { .. })
        ));
        assert!(matches!(row.value_at(3), Err(Error::UnknownColumn { .. })));

        // ALTER TABLE: a new description replaces the old one.
        cache.apply(&Message::Relation(relation(
            None,
            5,
            &[("id", oid::INT4), ("name", oid::TEXT)],
        )));
        assert_eq!(cache.len(), 1);
        let err = cache.insert_row(&ins).unwrap_err();
        assert!(matches!(
            err,
            Error::ColumnCountMismatch {
                relation_columns: 2,
                tuple_columns: 1,
                ..
            }
        ));
        let ins = insert(None, 5, vec![text("7"), text("x")]);
        let row = cache.insert_row(&ins).unwrap();
        assert_eq!(row.value("name").unwrap().as_str(), Some("x"));
        assert_eq!(row.iter().count(), 2);
        assert_eq!(row.get("name"), Some(&text("x")));
    }

    #[test]
    fn streamed_relations_are_scoped_to_their_transaction() {
        let mut cache = RelationCache::new();
        cache.apply(&Message::Relation(relation(None, 5, &[("id", oid::INT4)])));
        // Streamed txn 900 altered the table.
        cache.apply(&Message::Relation(relation(
            Some(900),
            5,
            &[("id", oid::INT4), ("b", oid::INT8)],
        )));
        let streamed = insert(Some(900), 5, vec![text("1"), text("2")]);
        assert!(cache.insert_row(&streamed).is_ok());
        // Other transactions still see the committed description.
        let plain = insert(None, 5, vec![text("1")]);
        assert!(cache.insert_row(&plain).is_ok());
        let other_stream = insert(Some(901), 5, vec![text("1")]);
        assert!(cache.insert_row(&other_stream).is_ok());

        // Inside a block of txn 900, a subtransaction (xid 950) row sees
        // the relation the block sent, whatever xid it carried.
        cache.apply(&Message::StreamStart(StreamStart {
            xid: 900,
            first_segment: false,
        }));
        let sub = insert(Some(950), 5, vec![text("1"), text("2")]);
        assert!(cache.insert_row(&sub).is_ok());
        cache.apply(&Message::Relation(relation(
            Some(951),
            5,
            &[("id", oid::INT4), ("b", oid::INT8), ("c", oid::TEXT)],
        )));
        let sub = insert(Some(900), 5, vec![text("1"), text("2"), text("3")]);
        assert!(cache.insert_row(&sub).is_ok());
        cache.apply(&Message::StreamStop);
        assert!(cache.insert_row(&sub).is_ok());
        cache.apply(&Message::Relation(relation(
            Some(900),
            5,
            &[("id", oid::INT4), ("b", oid::INT8)],
        )));

        // Subtransaction abort keeps them, top-level abort drops them.
        let abort = |subxid| {
            Message::StreamAbort(StreamAbort {
                xid: 900,
                subxid,
                abort_info: None,
            })
        };
        assert!(!cache.apply(&abort(901)));
        assert!(cache.insert_row(&streamed).is_ok());
        assert!(cache.apply(&abort(900)));
        assert!(cache.insert_row(&streamed).is_err());

        // Commit promotes them.
        cache.apply(&Message::Relation(relation(
            Some(902),
            5,
            &[("id", oid::INT4), ("b", oid::INT8)],
        )));
        assert!(cache.apply(&Message::StreamCommit(StreamCommit {
            xid: 902,
            flags: 0,
            commit_lsn: crate::Lsn::ZERO,
            end_lsn: crate::Lsn::ZERO,
            commit_time: crate::PgTimestamp::POSTGRES_EPOCH,
        })));
        assert_eq!(cache.get(5).unwrap().columns.len(), 2);
        assert_eq!(cache.get(5).unwrap().xid, None);
    }

    #[test]
    fn types_are_kept() {
        let mut cache = RelationCache::new();
        cache.apply(&Message::Type(Type {
            xid: None,
            type_oid: 16400,
            namespace: ByteStr::from_static("public"),
            name: ByteStr::from_static("mood"),
        }));
        assert_eq!(cache.type_info(16400).unwrap().name, "mood");
        assert_eq!(cache.value_type_oid(16400), 16400);
        // A domain over int4 is described by its base type's name.
        cache.apply(&Message::Type(Type {
            xid: None,
            type_oid: 16401,
            namespace: ByteStr::from_static(""),
            name: ByteStr::from_static("int4"),
        }));
        assert_eq!(cache.value_type_oid(16401), oid::INT4);
        assert_eq!(cache.value_type_oid(oid::TEXT), oid::TEXT);
        assert_eq!(cache.value_type_oid(99999), 99999);
        cache.apply(&Message::Relation(relation(None, 5, &[("id", 16401)])));
        let ins = insert(
            None,
            5,
            vec![ColumnValue::Binary(Bytes::from_static(b"\0\0\0\x07"))],
        );
        assert_eq!(
            cache.insert_row(&ins).unwrap().value("id").unwrap(),
            Value::Int4(7)
        );
        cache.clear();
        assert!(cache.type_info(16400).is_none() && cache.is_empty());
    }
}
