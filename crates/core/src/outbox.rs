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

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use walcast_pgoutput::{decode_bytea_text, ColumnValue, Decoder, Message, Relation};

use crate::config::{OutboxColumns, TableName};
use crate::error::{Error, Result};
use crate::route::{
    oid, Cell, ColumnKind, OpBehavior, OutboxRow, RouteSpec, Routes, TopicRule, TopicTemplate,
};

/// What one pgoutput message means for the relay.
#[derive(Debug)]
pub enum Row {
    /// An INSERT on an outbox table.
    OutboxInsert {
        /// `schema.table`
        table: Arc<str>,
        /// The columns its route reads.
        row: OutboxRow,
    },
    /// A row change on an outbox table that is not an event (UPDATE, DELETE,
    /// TRUNCATE).
    Skipped {
        /// Which change.
        reason: SkipReason,
        /// The outbox table (`schema.table`; empty when the relation is unknown).
        table: Arc<str>,
        /// What its route says to do with it.
        behavior: OpBehavior,
    },
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

impl SkipReason {
    /// `UPDATE`, `DELETE`, `TRUNCATE`.
    pub fn as_sql(self) -> &'static str {
        match self {
            SkipReason::Update => "UPDATE",
            SkipReason::Delete => "DELETE",
            SkipReason::Truncate => "TRUNCATE",
        }
    }
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
    route: usize,
    /// Per slot: the column's index in the relation and its type OID.
    slots: Vec<Option<(usize, u32)>>,
    columns: usize,
}

/// Decodes the stream and picks out outbox INSERTs.
#[derive(Debug)]
pub struct OutboxFilter {
    decoder: Decoder,
    /// Each outbox table with its route.
    tables: HashMap<TableName, usize>,
    /// Partitions (at any depth) of partitioned outbox tables, by name, with
    /// the outbox table they belong to.
    partitions: HashMap<TableName, TableName>,
    specs: Arc<[RouteSpec]>,
    relations: HashMap<u32, RelationKind>,
}

impl OutboxFilter {
    /// A filter for `tables` with the given column names and the default
    /// topic rule (protocol version 1): the `[outbox]` route alone.
    pub fn new(tables: impl IntoIterator<Item = TableName>, columns: OutboxColumns) -> Self {
        let topic = TopicRule::Template(
            TopicTemplate::parse(crate::route::ROUTED_BY_VALUE)
                .expect("the bare placeholder is a valid template"),
        );
        Self::with_routes(&Routes::single(RouteSpec::legacy(&columns, topic), tables))
    }

    /// A filter for `routes` (the router must be built from the same routes).
    pub fn with_routes(routes: &Routes) -> Self {
        OutboxFilter {
            decoder: Decoder::new(1),
            tables: routes.tables.iter().cloned().collect(),
            partitions: HashMap::new(),
            specs: routes.specs.clone(),
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
        let name = if self.tables.contains_key(&relation) {
            relation
        } else if let Some(root) = self.partitions.get(&relation) {
            root.clone()
        } else {
            return Ok(RelationKind::Foreign(Arc::from(relation.to_string())));
        };
        let route = self.tables.get(&name).copied().unwrap_or(0);
        let spec = &self.specs[route];
        let mut slots = Vec::new();
        for need in spec.columns() {
            let Some(need) = need else {
                slots.push(None);
                continue;
            };
            let Some(index) = rel.column_index(&need.column) else {
                if !need.required {
                    slots.push(None);
                    continue;
                }
                return Err(Error::operator(format!(
                    "outbox table {name} has no column {:?} (named by {}) in the replication stream; it was dropped or renamed",
                    need.column, need.option
                ))
                .with_hint(format!(
                    "restore the column or change {}; walcast stops here without moving the slot, and resumes from this row once fixed",
                    need.option
                )));
            };
            let type_oid = rel.columns[index].type_oid;
            let ok = match need.kind {
                ColumnKind::Any => true,
                ColumnKind::Integer => matches!(type_oid, oid::INT2 | oid::INT4 | oid::INT8),
                ColumnKind::Timestamp => matches!(
                    type_oid,
                    oid::INT2 | oid::INT4 | oid::INT8 | oid::TIMESTAMP | oid::TIMESTAMPTZ
                ),
            };
            if !ok {
                let wanted = match need.kind {
                    ColumnKind::Integer => "an integer type (smallint, integer, bigint)",
                    _ => "timestamp, timestamptz or bigint (milliseconds since the Unix epoch)",
                };
                return Err(Error::operator(format!(
                    "outbox table {name}: column {:?} (named by {}) has type OID {type_oid}, but it must be {wanted}",
                    need.column, need.option
                ))
                .with_hint(format!("change the column's type or {}", need.option)));
            }
            slots.push(Some((index, type_oid)));
        }
        Ok(RelationKind::Outbox(Mapping {
            table: Arc::from(name.to_string()),
            route,
            slots,
            columns: rel.columns.len(),
        }))
    }

    /// Decodes one pgoutput message (not Begin/Commit, which the source
    /// decodes) and classifies it.
    ///
    /// # Errors
    /// A permanent error for bytes that are not valid pgoutput or a row of a
    /// relation never described; an operator error when an outbox table lost
    /// a column its route needs (or its type no longer fits), and for a row
    /// change of a relation that is not an outbox table (see the module
    /// documentation).
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
                let mut values = Vec::with_capacity(mapping.slots.len());
                for s in &mapping.slots {
                    let Some((i, type_oid)) = *s else {
                        values.push(None);
                        continue;
                    };
                    let bytes = match ins.new.get(i) {
                        Some(ColumnValue::Text(b)) | Some(ColumnValue::Binary(b)) => b.clone(),
                        Some(ColumnValue::Null) | None => {
                            values.push(None);
                            continue;
                        }
                        Some(ColumnValue::UnchangedToast) => {
                            return Err(Error::permanent(format!(
                                "an INSERT on {} has no value for its column number {} (unchanged TOAST)",
                                mapping.table,
                                i + 1
                            )))
                        }
                    };
                    let bytes = if type_oid == oid::BYTEA {
                        decode_bytea_text(&bytes).ok_or_else(|| {
                            Error::permanent(format!(
                                "a bytea column of an INSERT on {} is not valid bytea text",
                                mapping.table
                            ))
                        })?
                    } else {
                        bytes
                    };
                    values.push(Some(Cell { bytes, type_oid }));
                }
                Ok(Row::OutboxInsert {
                    table: mapping.table.clone(),
                    row: OutboxRow {
                        route: mapping.route,
                        values,
                    },
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
                Ok(Row::Skipped {
                    reason: SkipReason::Truncate,
                    table: Arc::from(""),
                    behavior: OpBehavior::Ignore,
                })
            }
            _ => Ok(Row::Other),
        }
    }

    /// An UPDATE or DELETE: skipped (or stopped at, per its route) on an
    /// outbox table, an error elsewhere.
    fn other_change(&self, rel_id: u32, reason: SkipReason) -> Result<Row> {
        match self.relations.get(&rel_id) {
            Some(RelationKind::Foreign(name)) => Err(self.foreign_change(name, reason.as_sql())),
            Some(RelationKind::Outbox(m)) => {
                let spec = &self.specs[m.route];
                Ok(Row::Skipped {
                    reason,
                    table: m.table.clone(),
                    behavior: if reason == SkipReason::Update {
                        spec.on_update
                    } else {
                        spec.on_delete
                    },
                })
            }
            None => Ok(Row::Skipped {
                reason,
                table: Arc::from(""),
                behavior: OpBehavior::Ignore,
            }),
        }
    }

    fn foreign_change(&self, relation: &str, what: &str) -> Error {
        let mut configured: Vec<String> = self.tables.keys().map(ToString::to_string).collect();
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
