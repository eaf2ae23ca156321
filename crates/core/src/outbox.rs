//! The outbox filter: decodes pgoutput messages and keeps only INSERTs on the
//! configured outbox tables, resolved by schema-qualified name through the
//! stream's Relation messages (so ALTER TABLE mid-stream is followed).
//!
//! Everything else (UPDATE, DELETE, TRUNCATE, other tables) is skipped but
//! still counts towards acknowledgement through its transaction.

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
    /// A row change that is not an event (other table, or not an INSERT).
    Skipped,
    /// Anything else (Relation, Type, Origin, …).
    Other,
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
    columns: OutboxColumns,
    /// `None`: a relation that is not an outbox.
    relations: HashMap<u32, Option<Mapping>>,
}

impl OutboxFilter {
    /// A filter for `tables` with the given column names (protocol version 1).
    pub fn new(tables: impl IntoIterator<Item = TableName>, columns: OutboxColumns) -> Self {
        OutboxFilter {
            decoder: Decoder::new(1),
            tables: tables.into_iter().collect(),
            columns,
            relations: HashMap::new(),
        }
    }

    fn resolve(&self, rel: &Relation) -> Result<Option<Mapping>> {
        let name = TableName {
            schema: rel.schema().to_string(),
            name: rel.name.as_str().to_string(),
        };
        if !self.tables.contains(&name) {
            return Ok(None);
        }
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
        Ok(Some(Mapping {
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
    /// a required column.
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
                    Some(Some(m)) => m,
                    Some(None) => return Ok(Row::Skipped),
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
            Message::Update(_) | Message::Delete(_) | Message::Truncate(_) => Ok(Row::Skipped),
            _ => Ok(Row::Other),
        }
    }
}
