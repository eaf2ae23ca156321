//! What walcast remembers about a slot between runs (delivery rule 5): the
//! record's types and the store trait. No I/O here: the file copy and the
//! startup decisions live in `walcast-postgres`, the Kafka copy in
//! `walcast-kafka`; both implement [`SlotRecordStore`].
//!
//! Postgres keeps no trace of a dropped slot, and a recreated slot looks like
//! any other, so walcast keeps its own record of every slot it confirmed
//! positions on. The record is keyed by database and slot name only (not by
//! the cluster's system identifier), so a cluster that was restored or
//! replaced under a new identifier still finds it; the identifier it was
//! written for is stored in it and compared at startup.

use serde::{Deserialize, Serialize};
use walcast_pgoutput::Lsn;

use crate::error::Result;

/// Which slot a record belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SlotKey {
    /// Database name.
    pub database: String,
    /// Slot name.
    pub slot: String,
}

impl std::fmt::Display for SlotKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "slot {} in database {}", self.slot, self.database)
    }
}

/// One backend session of the server: its pid and start time (a pid alone
/// is reused by later sessions and after a server restart).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BackendId {
    /// `pg_backend_pid()`.
    pub pid: i32,
    /// `pg_stat_activity.backend_start`, as the server printed it.
    pub backend_start: String,
}

impl std::fmt::Display for BackendId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} (started {})", self.pid, self.backend_start)
    }
}

/// The record kept for a slot walcast confirmed positions on.
///
/// Invariant kept by the writer (the write-ahead gate in `walcast-postgres`):
/// walcast never reports a flush LSN above `confirmed_upper` of a record that
/// is durable in every store; and the server had been told at least
/// `confirmed_lower` when the record was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRecord {
    /// Database name.
    pub database: String,
    /// Slot name.
    pub slot: String,
    /// `IDENTIFY_SYSTEM` system identifier of the cluster it was written for.
    pub system_identifier: String,
    /// That cluster's timeline (0: unknown, from an older record format).
    pub timeline: u32,
    /// walcast never reported a flush LSN above this (a write-ahead bound).
    #[serde(with = "lsn_text")]
    pub confirmed_upper: Lsn,
    /// A position the server had been told (the slot's position at start,
    /// or the last reported LSN when the record was written).
    #[serde(with = "lsn_text")]
    pub confirmed_lower: Lsn,
    /// The replication session (walsender) walcast streamed on when it wrote this.
    #[serde(default)]
    pub walsender: Option<BackendId>,
    /// walcast's `application_name` on that session.
    #[serde(default)]
    pub application_name: String,
    /// Seconds since the Unix epoch when this was written.
    pub updated_at_unix: u64,
    /// Where this copy was read from (not stored).
    #[serde(skip)]
    pub origin: String,
}

impl SlotRecord {
    /// The key of this record.
    pub fn key(&self) -> SlotKey {
        SlotKey {
            database: self.database.clone(),
            slot: self.slot.clone(),
        }
    }

    /// Seconds since the Unix epoch, now.
    pub fn now_unix() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

/// A place where slot records are kept. walcast writes every record to all
/// of its stores before it relies on it, and reads all of them at startup: a
/// record in any store means "walcast confirmed positions on this slot".
///
/// The methods block (file system, network round trips); call them off the
/// async threads (`tokio::task::spawn_blocking`).
pub trait SlotRecordStore: Send + Sync + std::fmt::Debug {
    /// A human-readable name for messages ("state file /x/y.json", "Kafka topic walcast.state").
    fn describe(&self, key: &SlotKey) -> String;

    /// The record for `key`, if any; `origin` set to [`SlotRecordStore::describe`].
    ///
    /// # Errors
    /// When the store cannot be read or holds a corrupt record: never treat
    /// that as "no record".
    fn load(&self, key: &SlotKey) -> Result<Option<SlotRecord>>;

    /// Stores `record` durably (replacing the previous one for its key);
    /// returns only once it would survive a crash of walcast and of the store.
    ///
    /// # Errors
    /// When the record may not be durable.
    fn save(&self, record: &SlotRecord) -> Result<()>;

    /// Removes the record for `key` (the operator accepted a gap); true if
    /// there was one.
    ///
    /// # Errors
    /// When it cannot be removed.
    fn forget(&self, key: &SlotKey) -> Result<bool>;
}

/// Serde for an [`Lsn`] as Postgres' `X/Y` text.
pub mod lsn_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use walcast_pgoutput::Lsn;

    /// Writes `X/Y`.
    pub fn serialize<S: Serializer>(lsn: &Lsn, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(lsn)
    }

    /// Reads `X/Y`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Lsn, D::Error> {
        let s = String::deserialize(d)?;
        s.parse::<Lsn>().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_as_json_with_lsn_text() {
        let r = SlotRecord {
            database: "app".into(),
            slot: "walcast".into(),
            system_identifier: "7300000000000000001".into(),
            timeline: 1,
            confirmed_upper: Lsn::new(0x016B_6C50),
            confirmed_lower: Lsn::new(0x016B_0000),
            walsender: Some(BackendId {
                pid: 42,
                backend_start: "2025-01-01 00:00:00+00".into(),
            }),
            application_name: "walcast".into(),
            updated_at_unix: 1,
            origin: String::new(),
        };
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains("\"confirmed_upper\":\"0/16B6C50\""), "{text}");
        let back: SlotRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.key().to_string(), "slot walcast in database app");
    }
}
