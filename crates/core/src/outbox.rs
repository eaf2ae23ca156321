//! The outbox filter: decodes pgoutput messages and keeps only INSERTs on the
//! configured outbox tables, resolved by schema-qualified name through the
//! stream's Relation messages (so ALTER TABLE mid-stream is followed).
//!
//! UPDATE, DELETE and TRUNCATE on an outbox table are skipped but still count
//! towards acknowledgement through their transaction. A partition of an
//! outbox table (published under its own name, for example WAL written before
//! `publish_via_partition_root` was set) counts as its outbox table.
//!
//! A row change of any other relation is never skipped (rule 5a of
//! `docs/delivery-rules.md`): walcast's publication should carry only the
//! outbox tables, so such a change means a partition walcast was not told
//! about, a renamed or swapped outbox, or a publication with extra tables. The
//! filter returns an operator error and the slot does not move past it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use walcast_pgoutput::{decode_bytea_text, ColumnValue, Decoder, Message, Relation};

use crate::config::{OutboxColumns, TableName};
use crate::error::{Error, Result};
use crate::route::OutboxRow;

/// `bytea`'s type OID.
const BYTEA_OID: u32 = 17;

/// What one pgoutput message means for the relay.
#[derive(Debug)]
pub enum Row {
    /// An INSERT on an outbox table.
    OutboxInsert {
        /// `schema.table`
        table: Arc<str>,
        /// The outbox columns.
        row: OutboxRow,
    },
    /// A row change on an outbox table that is not an event (UPDATE, DELETE,
    /// TRUNCATE).
    Skipped(SkipReason),
    /// Anything else (Relation, Type, Origin, …).
    Other,
}

/// Why a row change of an outbox table is not an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// An UPDATE.
    Update,
    /// A DELETE.
    Delete,
    /// A TRUNCATE.
    Truncate,
}

/// What a relation of the stream is to walcast.
#[derive(Debug, Clone)]
enum RelationKind {
    /// An outbox table (or one of its partitions).
    Outbox(Mapping),
    /// Any other relation: a row change on it stops walcast.
    Foreign(Arc<str>),
}

#[derive(Debug, Clone)]
struct Mapping {
    table: Arc<str>,
    id: usize,
    aggregatetype: usize,
    aggregateid: usize,
    event_type: Option<usize>,
    payload: usize,
    payload_is_bytea: bool,
    columns: usize,
}

/// Decodes the stream and picks out outbox INSERTs.
#[derive(Debug)]
pub struct OutboxFilter {
    decoder: Decoder,
    tables: HashSet<TableName>,
    /// Partitions (at any depth) of partitioned outbox tables, by name, with
    /// the outbox table they belong to.
    partitions: HashMap<TableName, TableName>,
    columns: OutboxColumns,
    relations: HashMap<u32, RelationKind>,
}

impl OutboxFilter {
    /// A filter for `tables` with the given column names (protocol version 1).
    pub fn new(tables: impl IntoIterator<Item = TableName>, columns: OutboxColumns) -> Self {
        OutboxFilter {
            decoder: Decoder::new(1),
            tables: tables.into_iter().collect(),
            partitions: HashMap::new(),
            columns,
            relations: HashMap::new(),
        }
    }

    /// Tells the filter which relations are partitions of which outbox table
    /// (read from the catalog at start). Their rows are events of that table.
    pub fn with_partitions(
        mut self,
        partitions: impl IntoIterator<Item = (TableName, TableName)>,
    ) -> Self {
        self.partitions = partitions.into_iter().collect();
        self
    }

    fn resolve(&self, rel: &Relation) -> Result<RelationKind> {
        let relation = TableName {
            schema: rel.schema().to_string(),
            name: rel.name.as_str().to_string(),
        };
        let name = if self.tables.contains(&relation) {
            relation
        } else if let Some(root) = self.partitions.get(&relation) {
            root.clone()
        } else {
            return Ok(RelationKind::Foreign(Arc::from(relation.to_string())));
        };
        let c = &self.columns;
        let find = |opt: &str, col: &str| -> Result<usize> {
            rel.column_index(col).ok_or_else(|| {
                Error::operator(format!(
                    "outbox table {name} has no column {col:?} (the {opt} column) in the replication stream; it was dropped or renamed"
                ))
                .with_hint(format!(
                    "restore the column or set outbox.columns.{opt}; walcast stops here without moving the slot, and resumes from this row once fixed"
                ))
            })
        };
        let payload = find("payload", &c.payload)?;
        Ok(RelationKind::Outbox(Mapping {
            table: Arc::from(name.to_string()),
            id: find("id", &c.id)?,
            aggregatetype: find("aggregatetype", &c.aggregatetype)?,
            aggregateid: find("aggregateid", &c.aggregateid)?,
            event_type: rel.column_index(&c.r#type),
            payload,
            payload_is_bytea: rel.columns[payload].type_oid == BYTEA_OID,
            columns: rel.columns.len(),
        }))
    }

    /// Decodes one pgoutput message (not Begin/Commit, which the source
    /// decodes) and classifies it.
    ///
    /// # Errors
    /// A permanent error for bytes that are not valid pgoutput or a row of a
    /// relation never described; an operator error when an outbox table lost
    /// a required column, and for a row change of a relation that is not an
    /// outbox table (see the module documentation).
    pub fn decode(&mut self, data: &Bytes) -> Result<Row> {
        let msg = self.decoder.decode(data).map_err(|e| {
            Error::permanent(format!("cannot decode a pgoutput message: {e}"))
                .with_hint("this is a bug or an unsupported server version; report it with the log. The slot was not advanced past it")
        })?;
        match msg {
            Message::Relation(rel) => {
                let mapping = self.resolve(&rel)?;
                self.relations.insert(rel.rel_id, mapping);
                Ok(Row::Other)
            }
            Message::Insert(ins) => {
                let mapping = match self.relations.get(&ins.rel_id) {
                    Some(RelationKind::Outbox(m)) => m,
                    Some(RelationKind::Foreign(name)) => {
                        return Err(self.foreign_change(name, "INSERT"))
                    }
                    None => {
                        return Err(Error::permanent(format!(
                            "an INSERT arrived for relation {} before its Relation message",
                            ins.rel_id
                        ))
                        .with_hint("this is a protocol violation; report it with the log"))
                    }
                };
                if ins.new.len() != mapping.columns {
                    return Err(Error::permanent(format!(
                        "an INSERT on {} has {} columns but its Relation message described {}",
                        mapping.table,
                        ins.new.len(),
                        mapping.columns
                    )));
                }
                let text = |i: usize, what: &str| -> Result<Option<Bytes>> {
                    match ins.new.get(i) {
                        Some(ColumnValue::Text(b)) => Ok(Some(b.clone())),
                        Some(ColumnValue::Null) | None => Ok(None),
                        Some(ColumnValue::Binary(b)) => Ok(Some(b.clone())),
                        Some(ColumnValue::UnchangedToast) => Err(Error::permanent(format!(
                            "an INSERT on {} has no value for its {what} column (unchanged TOAST)",
                            mapping.table
                        ))),
                    }
                };
                let mut payload = text(mapping.payload, "payload")?;
                if mapping.payload_is_bytea {
                    if let Some(p) = payload.take() {
                        payload = Some(decode_bytea_text(&p).ok_or_else(|| {
                            Error::permanent(format!(
                                "the bytea payload of an INSERT on {} is not valid bytea text",
                                mapping.table
                            ))
                        })?);
                    }
                }
                let row = OutboxRow {
                    id: text(mapping.id, "id")?,
                    aggregatetype: text(mapping.aggregatetype, "aggregatetype")?,
                    aggregateid: text(mapping.aggregateid, "aggregateid")?,
                    event_type: match mapping.event_type {
                        Some(i) => text(i, "type")?,
                        None => None,
                    },
                    payload,
                };
                Ok(Row::OutboxInsert {
                    table: mapping.table.clone(),
                    row,
                })
            }
            Message::Update(u) => self.other_change(u.rel_id, SkipReason::Update),
            Message::Delete(d) => self.other_change(d.rel_id, SkipReason::Delete),
            Message::Truncate(t) => {
                for rel_id in &t.rel_ids {
                    if let Some(RelationKind::Foreign(name)) = self.relations.get(rel_id) {
                        return Err(self.foreign_change(name, "TRUNCATE"));
                    }
                }
                Ok(Row::Skipped(SkipReason::Truncate))
            }
            _ => Ok(Row::Other),
        }
    }

    /// An UPDATE or DELETE: skipped on an outbox table, an error elsewhere.
    fn other_change(&self, rel_id: u32, reason: SkipReason) -> Result<Row> {
        let what = match reason {
            SkipReason::Update => "UPDATE",
            SkipReason::Delete => "DELETE",
            SkipReason::Truncate => "TRUNCATE",
        };
        match self.relations.get(&rel_id) {
            Some(RelationKind::Foreign(name)) => Err(self.foreign_change(name, what)),
            _ => Ok(Row::Skipped(reason)),
        }
    }

    fn foreign_change(&self, relation: &str, what: &str) -> Error {
        let mut configured: Vec<String> = self.tables.iter().map(ToString::to_string).collect();
        configured.sort();
        Error::operator(format!(
            "the replication stream carries an {what} on {relation}, which is not a configured outbox table ({}) nor a partition of one known at start; walcast stops before the slot passes it",
            configured.join(", ")
        ))
        .with_hint(format!(
            "if {relation} is a partition of an outbox table, make the publication publish via the root (ALTER PUBLICATION <publication> SET (publish_via_partition_root = true)) and restart walcast; \
             if an outbox table was renamed or swapped, fix outbox.tables or the publication; \
             if the publication carries other tables, drop them from it (ALTER PUBLICATION <publication> DROP TABLE {relation}). \
             Nothing was skipped: walcast resumes at this change once fixed"
        ))
    }
}
