//! walcast's record of the slots it confirmed positions on (delivery rule 5):
//! the local copy in the state directory, the set of stores a record is
//! written to, and the startup decision that compares the record with the
//! slot.
//!
//! Postgres keeps no trace of a dropped slot, so walcast keeps one, in every
//! store it is given (the state directory and a compacted Kafka topic): a
//! record in any of them means "walcast confirmed positions on this slot
//! before", and the stricter reading wins.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use walcast_core::state::{BackendId, SlotKey, SlotRecord, SlotRecordStore};
use walcast_core::{Error, Result};
use walcast_pgoutput::Lsn;

/// The local copy: one JSON file per (database, slot) in the state
/// directory, replaced atomically (write, fsync, rename, fsync the directory).
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

/// Escapes a name for a file name: `[A-Za-z0-9_]` as is, every other byte as `%XX`.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The record format of walcast before the record held bounds (one file per
/// system identifier, database and slot, with the last confirmed LSN).
#[derive(Debug, Deserialize)]
struct LegacyRecord {
    system_identifier: String,
    database: String,
    slot: String,
    confirmed_lsn: String,
    updated_at_unix: u64,
}

impl FileStore {
    /// A store in `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileStore { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file for a slot.
    pub fn path(&self, key: &SlotKey) -> PathBuf {
        self.dir.join(format!(
            "{}.{}.json",
            escape(&key.database),
            escape(&key.slot)
        ))
    }

    /// Every slot record in the directory (current format; files that do
    /// not parse are left out). For warnings, not for positioning.
    pub fn records(&self) -> Vec<SlotRecord> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".json") || name.starts_with("slot-") {
                continue;
            }
            let Ok(Some(bytes)) = Self::read(&path) else {
                continue;
            };
            if let Ok(rec) = serde_json::from_slice::<SlotRecord>(&bytes) {
                out.push(rec);
            }
        }
        out.sort_by(|a, b| a.slot.cmp(&b.slot));
        out
    }

    /// Files of the older format for this slot (`slot-<sysid>-<db>-<slot>.json`).
    fn legacy_files(&self, key: &SlotKey) -> Result<Vec<PathBuf>> {
        let sanitize = |s: &str| -> String {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        };
        let suffix = format!("-{}-{}.json", sanitize(&key.database), sanitize(&key.slot));
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io_error("read the state directory", &self.dir, e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry =
                entry.map_err(|e| self.io_error("read the state directory", &self.dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(mid) = name
                .strip_prefix("slot-")
                .and_then(|r| r.strip_suffix(&suffix))
            {
                if !mid.is_empty() && mid.bytes().all(|b| b.is_ascii_digit()) {
                    out.push(entry.path());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn io_error(&self, what: &str, path: &Path, e: std::io::Error) -> Error {
        Error::operator(format!("cannot {what} {}", path.display()))
            .with_source(e)
            .with_hint("make pipeline.state_dir a persistent directory walcast can write")
    }

    fn corrupt(path: &Path, e: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error::operator(format!("state file {} is corrupt", path.display()))
            .with_source(e)
            .with_hint("restore it from a backup; remove it only if the copy in Kafka (pipeline.state_topic) is intact or walcast never used this slot")
    }

    fn read(path: &Path) -> Result<Option<Vec<u8>>> {
        match std::fs::read(path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(
                Error::operator(format!("cannot read state file {}", path.display()))
                    .with_source(e)
                    .with_hint("check pipeline.state_dir and its permissions"),
            ),
        }
    }

    /// Older records: the slot existed with walcast confirming `confirmed_lsn`
    /// (saved some seconds after it was reported, so it bounds nothing from above).
    fn load_legacy(&self, key: &SlotKey) -> Result<Option<SlotRecord>> {
        let mut best: Option<SlotRecord> = None;
        for path in self.legacy_files(key)? {
            let Some(bytes) = Self::read(&path)? else {
                continue;
            };
            let old: LegacyRecord =
                serde_json::from_slice(&bytes).map_err(|e| Self::corrupt(&path, e))?;
            if old.database != key.database || old.slot != key.slot {
                continue;
            }
            let lsn: Lsn = old
                .confirmed_lsn
                .parse()
                .map_err(|e| Self::corrupt(&path, e))?;
            let rec = SlotRecord {
                database: old.database,
                slot: old.slot,
                system_identifier: old.system_identifier,
                timeline: 0,
                confirmed_upper: Lsn::MAX,
                confirmed_lower: lsn,
                walsender: None,
                application_name: String::new(),
                updated_at_unix: old.updated_at_unix,
                origin: format!("state file {} (older format)", path.display()),
            };
            if best
                .as_ref()
                .is_none_or(|b| b.updated_at_unix < rec.updated_at_unix)
            {
                best = Some(rec);
            }
        }
        Ok(best)
    }

    fn sync_dir(&self) {
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
    }
}

impl SlotRecordStore for FileStore {
    fn describe(&self, key: &SlotKey) -> String {
        format!("state file {}", self.path(key).display())
    }

    fn load(&self, key: &SlotKey) -> Result<Option<SlotRecord>> {
        let path = self.path(key);
        let Some(bytes) = Self::read(&path)? else {
            return self.load_legacy(key);
        };
        let mut rec: SlotRecord =
            serde_json::from_slice(&bytes).map_err(|e| Self::corrupt(&path, e))?;
        if rec.database != key.database || rec.slot != key.slot {
            return Err(Error::operator(format!(
                "state file {} holds the record of {}, not of {key}",
                path.display(),
                rec.key()
            ))
            .with_hint("restore the right file from a backup, or remove this one"));
        }
        rec.origin = self.describe(key);
        Ok(Some(rec))
    }

    fn save(&self, record: &SlotRecord) -> Result<()> {
        let key = record.key();
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| self.io_error("create the state directory", &self.dir, e))?;
        let path = self.path(&key);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(record)
            .map_err(|e| Error::operator("cannot encode the slot record").with_source(e))?;
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(|e| self.io_error("write", &tmp, e))?;
            f.write_all(&bytes)
                .map_err(|e| self.io_error("write", &tmp, e))?;
            f.sync_all().map_err(|e| self.io_error("sync", &tmp, e))?;
        }
        std::fs::rename(&tmp, &path).map_err(|e| self.io_error("replace", &path, e))?;
        self.sync_dir();
        // The new record supersedes files of the older format.
        for old in self.legacy_files(&key).unwrap_or_default() {
            let _ = std::fs::remove_file(old);
        }
        Ok(())
    }

    fn forget(&self, key: &SlotKey) -> Result<bool> {
        let mut removed = false;
        let mut paths = vec![self.path(key)];
        paths.extend(self.legacy_files(key)?);
        for path in paths {
            match std::fs::remove_file(&path) {
                Ok(()) => removed = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(self.io_error("remove", &path, e)),
            }
        }
        if removed {
            self.sync_dir();
        }
        Ok(removed)
    }
}

/// Every store a slot record is written to, and the replication sessions
/// this process streamed on (so a reconnect can end its own stale walsender).
#[derive(Debug, Clone)]
pub struct SlotState {
    stores: Vec<Arc<dyn SlotRecordStore>>,
    own_sessions: Arc<Mutex<Vec<BackendId>>>,
}

impl SlotState {
    /// A state over `stores` (walcast: the state directory and the Kafka topic).
    pub fn new(stores: Vec<Arc<dyn SlotRecordStore>>) -> Self {
        SlotState {
            stores,
            own_sessions: Arc::default(),
        }
    }

    /// Where records of `key` live, for messages.
    pub fn describe(&self, key: &SlotKey) -> String {
        self.stores
            .iter()
            .map(|s| s.describe(key))
            .collect::<Vec<_>>()
            .join(" and ")
    }

    /// Every store's record of `key` (none, one or one per store).
    ///
    /// # Errors
    /// When any store cannot be read: an unreadable store never counts as
    /// "no record".
    pub async fn load(&self, key: &SlotKey) -> Result<Vec<SlotRecord>> {
        let stores = self.stores.clone();
        let key = key.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for s in &stores {
                out.extend(s.load(&key)?);
            }
            Ok(out)
        })
        .await
        .map_err(|e| Error::retryable("reading the slot record failed").with_source(e))?
    }

    /// Writes `record` to every store; returns once it is durable in all.
    ///
    /// # Errors
    /// The first store's failure.
    pub async fn save(&self, record: SlotRecord) -> Result<()> {
        let stores = self.stores.clone();
        tokio::task::spawn_blocking(move || {
            for s in &stores {
                s.save(&record)?;
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::retryable("writing the slot record failed").with_source(e))?
    }

    /// Removes the record of `key` from every store; returns the stores
    /// that had one.
    ///
    /// # Errors
    /// The first store's failure.
    pub async fn forget(&self, key: &SlotKey) -> Result<Vec<String>> {
        let stores = self.stores.clone();
        let key = key.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for s in &stores {
                if s.forget(&key)? {
                    out.push(s.describe(&key));
                }
            }
            Ok(out)
        })
        .await
        .map_err(|e| Error::retryable("removing the slot record failed").with_source(e))?
    }

    /// Remembers a replication session of this process.
    pub(crate) fn remember_session(&self, id: BackendId) {
        let mut own = self.own_sessions.lock().unwrap();
        if !own.contains(&id) {
            own.push(id);
            // A long-running process reconnects many times; the last few suffice.
            let excess = own.len().saturating_sub(16);
            own.drain(..excess);
        }
    }

    /// Whether this process streamed on `id` before.
    pub(crate) fn is_own_session(&self, id: &BackendId) -> bool {
        self.own_sessions.lock().unwrap().contains(id)
    }
}

/// The server walcast is connected to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServerIdentity {
    pub system_identifier: String,
    pub timeline: u32,
}

/// The slot as the server shows it (not held by anyone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlotFacts {
    pub confirmed_flush: Option<Lsn>,
    /// `wal_status = lost`: invalidated.
    pub lost: bool,
}

/// What to do with the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Create it (no record anywhere, `create_slot = true`).
    Create,
    /// Stream from it at `start`; log the warnings.
    Resume { start: Lsn, warnings: Vec<String> },
}

const ACCEPT: &str = "`walcast slot accept-gap --config <file>`";

fn accept_hint(what_next: &str) -> String {
    format!(
        "walcast will not silently start over. Reconcile the outbox rows committed in the gap with Kafka, then run {ACCEPT} to accept it; {what_next}"
    )
}

/// The gap error: the slot is gone or unusable after walcast confirmed positions on it.
pub(crate) fn gap_error(slot: &str, what: &str, last: Lsn, origin: &str) -> Error {
    Error::operator(format!(
        "replication slot {slot} {what} after walcast confirmed positions on it (last confirmed {last}, recorded in {origin}). \
         Changes committed after that position may never have reached Kafka, and Postgres no longer has them"
    ))
    .with_hint(accept_hint(
        "the next `walcast run` creates a new slot at the current position",
    ))
}

/// The startup decision for `slot` from walcast's records (one per store),
/// the slot row (`None`: missing) and the server. Pure; every branch has a
/// unit test.
pub(crate) fn decide(
    slot_name: &str,
    records: &[SlotRecord],
    slot: Option<&SlotFacts>,
    server: &ServerIdentity,
    create_slot: bool,
) -> Result<Plan> {
    let Some(slot) = slot else {
        // Any record: walcast confirmed positions on a slot that is gone.
        if let Some(r) = records.first() {
            if let Some(r) = records
                .iter()
                .find(|r| r.system_identifier != server.system_identifier)
            {
                return Err(Error::operator(format!(
                    "replication slot {slot_name} does not exist on this server (system identifier {}), and walcast's record of it \
                     was written for system identifier {} (last confirmed {}, recorded in {}): the cluster was restored or replaced \
                     under a new identity, or another cluster shares this record (same database and slot name, same pipeline.state_topic). \
                     Changes committed on the old cluster after that position may never have reached Kafka",
                    server.system_identifier, r.system_identifier, r.confirmed_lower, r.origin
                ))
                .with_hint(format!(
                    "if this is another cluster, give it its own postgres.slot name. Otherwise: {}",
                    accept_hint("the next `walcast run` creates a new slot at the current position")
                )));
            }
            return Err(gap_error(
                slot_name,
                "no longer exists",
                r.confirmed_lower,
                &r.origin,
            ));
        }
        if create_slot {
            return Ok(Plan::Create);
        }
        return Err(
            Error::operator(format!("replication slot {slot_name} does not exist")).with_hint(
                format!(
                    "create it: SELECT pg_create_logical_replication_slot({}, 'pgoutput'); or set postgres.create_slot = true",
                    crate::sql::quote_literal(slot_name)
                ),
            ),
        );
    };
    if slot.lost {
        let (last, origin) = match (slot.confirmed_flush, records.first()) {
            (Some(s), _) => (s, "the slot".to_string()),
            (None, Some(r)) => (r.confirmed_lower, r.origin.clone()),
            (None, None) => (Lsn::ZERO, "nowhere".to_string()),
        };
        return Err(gap_error(
            slot_name,
            "was invalidated (wal_status = lost: the WAL it needed was removed, see max_slot_wal_keep_size)",
            last,
            &origin,
        ));
    }
    let start = slot
        .confirmed_flush
        .ok_or_else(|| Error::permanent(format!("slot {slot_name} has no confirmed_flush_lsn")))?;
    let mut warnings = Vec::new();
    for r in records {
        let same_system = r.system_identifier == server.system_identifier;
        // 0: an older record without a timeline.
        let same_timeline = r.timeline == 0 || r.timeline == server.timeline;
        let identity_change = || {
            let mut parts = Vec::new();
            if !same_system {
                parts.push(format!(
                    "system identifier {} -> {}",
                    r.system_identifier, server.system_identifier
                ));
            }
            if !same_timeline {
                parts.push(format!("timeline {} -> {}", r.timeline, server.timeline));
            }
            parts.join(", ")
        };
        if start > r.confirmed_upper {
            return Err(Error::operator(format!(
                "replication slot {slot_name} is at {start}, ahead of walcast's record: walcast never confirmed beyond {} on it \
                 (recorded in {}). Something else advanced the slot, or it was dropped and recreated; changes committed between \
                 {} and {start} were never relayed to Kafka{}",
                r.confirmed_upper,
                r.origin,
                r.confirmed_upper,
                if same_system && same_timeline {
                    String::new()
                } else {
                    format!(" (the record was written before a change of {})", identity_change())
                }
            ))
            .with_hint(format!(
                "only walcast may consume its slot. {}",
                accept_hint("the next `walcast run` streams from the slot's current position")
            )));
        }
        if start < r.confirmed_lower {
            if same_system && same_timeline {
                warnings.push(format!(
                    "replication slot {slot_name} is at {start}, behind the position {} walcast had confirmed (recorded in {}): \
                     Postgres restarted after a crash and restored the slot's last checkpointed position. The events in between \
                     are relayed again (duplicates, no loss)",
                    r.confirmed_lower, r.origin
                ));
                continue;
            }
            return Err(Error::operator(format!(
                "replication slot {slot_name} is at {start}, behind the position {} walcast had confirmed on it (recorded in {}), \
                 and the server changed ({}): the cluster was restored from a backup or failed over to a copy that is behind. \
                 Kafka may hold events of transactions this server no longer has, and the events from {start} on would be relayed again",
                r.confirmed_lower,
                r.origin,
                identity_change()
            ))
            .with_hint(accept_hint(
                "the next `walcast run` streams from the slot's current position",
            )));
        }
        if !same_system || !same_timeline {
            warnings.push(format!(
                "walcast's record of slot {slot_name} (recorded in {}) was written before a change of {}; the slot's position {start} \
                 is within what walcast had confirmed ({} .. {}), so it is the same slot carried over (pg_upgrade, failover): resuming",
                r.origin,
                identity_change(),
                r.confirmed_lower,
                r.confirmed_upper
            ));
        }
    }
    Ok(Plan::Resume { start, warnings })
}

#[cfg(test)]
mod tests {
    use super::*;
    use walcast_core::ErrorKind;

    const SYS: &str = "7300000000000000001";

    fn server() -> ServerIdentity {
        ServerIdentity {
            system_identifier: SYS.into(),
            timeline: 1,
        }
    }

    fn record(lower: u64, upper: u64) -> SlotRecord {
        SlotRecord {
            database: "app".into(),
            slot: "s".into(),
            system_identifier: SYS.into(),
            timeline: 1,
            confirmed_upper: Lsn::new(upper),
            confirmed_lower: Lsn::new(lower),
            walsender: None,
            application_name: "walcast".into(),
            updated_at_unix: 1,
            origin: "Kafka topic walcast.state".into(),
        }
    }

    fn slot(at: u64) -> SlotFacts {
        SlotFacts {
            confirmed_flush: Some(Lsn::new(at)),
            lost: false,
        }
    }

    fn refused(r: Result<Plan>) -> String {
        let e = r.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OperatorAction, "{e}");
        let text = e.to_string();
        assert!(text.contains("walcast slot accept-gap"), "{text}");
        text
    }

    #[test]
    fn first_start_creates_or_asks_for_the_slot() {
        assert_eq!(
            decide("s", &[], None, &server(), true).unwrap(),
            Plan::Create
        );
        let e = decide("s", &[], None, &server(), false).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OperatorAction);
        assert!(
            e.to_string()
                .contains("pg_create_logical_replication_slot('s'"),
            "{e}"
        );
    }

    #[test]
    fn an_existing_slot_without_a_record_is_resumed() {
        assert_eq!(
            decide("s", &[], Some(&slot(100)), &server(), true).unwrap(),
            Plan::Resume {
                start: Lsn::new(100),
                warnings: vec![]
            }
        );
    }

    #[test]
    fn a_missing_slot_with_a_record_is_refused_also_without_create() {
        for create in [true, false] {
            let text = refused(decide("s", &[record(100, 200)], None, &server(), create));
            assert!(text.contains("no longer exists"), "{text}");
            assert!(text.contains("last confirmed 0/64"), "{text}");
            assert!(text.contains("Kafka topic walcast.state"), "{text}");
        }
    }

    #[test]
    fn a_missing_slot_with_a_record_of_another_system_names_both_identifiers() {
        let mut r = record(100, 200);
        r.system_identifier = "7100000000000000009".into();
        let text = refused(decide("s", &[record(100, 200), r], None, &server(), true));
        assert!(
            text.contains(SYS) && text.contains("7100000000000000009"),
            "{text}"
        );
        assert!(text.contains("own postgres.slot name"), "{text}");
    }

    #[test]
    fn an_invalidated_slot_is_refused() {
        let lost = SlotFacts {
            confirmed_flush: Some(Lsn::new(150)),
            lost: true,
        };
        let text = refused(decide(
            "s",
            &[record(100, 200)],
            Some(&lost),
            &server(),
            true,
        ));
        assert!(text.contains("invalidated"), "{text}");
        let text = refused(decide("s", &[], Some(&lost), &server(), true));
        assert!(text.contains("0/96"), "{text}");
        let unknown = SlotFacts {
            confirmed_flush: None,
            lost: true,
        };
        let text = refused(decide(
            "s",
            &[record(100, 200)],
            Some(&unknown),
            &server(),
            true,
        ));
        assert!(text.contains("0/64"), "{text}");
    }

    #[test]
    fn a_slot_within_the_record_is_resumed() {
        for at in [100, 150, 200] {
            assert_eq!(
                decide("s", &[record(100, 200)], Some(&slot(at)), &server(), true).unwrap(),
                Plan::Resume {
                    start: Lsn::new(at),
                    warnings: vec![]
                }
            );
        }
    }

    #[test]
    fn a_slot_ahead_of_the_record_is_refused() {
        let text = refused(decide(
            "s",
            &[record(100, 200)],
            Some(&slot(201)),
            &server(),
            true,
        ));
        assert!(text.contains("ahead of walcast's record"), "{text}");
        assert!(text.contains("0/C8") && text.contains("0/C9"), "{text}");
        // The stricter of two stores wins: a stale copy with a lower bound refuses.
        let text = refused(decide(
            "s",
            &[record(100, 300), record(100, 200)],
            Some(&slot(250)),
            &server(),
            true,
        ));
        assert!(text.contains("never confirmed beyond 0/C8"), "{text}");
        // Also across a change of system identifier.
        let mut other = record(100, 200);
        other.system_identifier = "1".into();
        let text = refused(decide("s", &[other], Some(&slot(201)), &server(), true));
        assert!(text.contains("system identifier 1 -> "), "{text}");
    }

    #[test]
    fn a_slot_behind_the_record_after_a_crash_is_resumed_with_a_warning() {
        let Plan::Resume { start, warnings } =
            decide("s", &[record(100, 200)], Some(&slot(90)), &server(), true).unwrap()
        else {
            panic!("not resumed")
        };
        assert_eq!(start, Lsn::new(90));
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("crash"), "{}", warnings[0]);
    }

    #[test]
    fn a_slot_behind_the_record_on_another_system_or_timeline_is_refused() {
        let mut other_tl = record(100, 200);
        other_tl.timeline = 2;
        let text = refused(decide("s", &[other_tl], Some(&slot(90)), &server(), true));
        assert!(text.contains("timeline 2 -> 1"), "{text}");
        let mut other_sys = record(100, 200);
        other_sys.system_identifier = "1".into();
        let text = refused(decide("s", &[other_sys], Some(&slot(90)), &server(), true));
        assert!(text.contains("restored from a backup"), "{text}");
    }

    #[test]
    fn a_slot_carried_over_to_a_new_system_or_timeline_is_resumed_with_a_warning() {
        let mut r = record(100, 200);
        r.system_identifier = "1".into();
        r.timeline = 3;
        let Plan::Resume { start, warnings } =
            decide("s", &[r], Some(&slot(150)), &server(), true).unwrap()
        else {
            panic!("not resumed")
        };
        assert_eq!(start, Lsn::new(150));
        assert!(warnings[0].contains("carried over"), "{warnings:?}");
    }

    #[test]
    fn an_older_record_bounds_only_from_below() {
        let mut r = record(100, 0);
        r.confirmed_upper = Lsn::MAX;
        r.timeline = 0;
        assert!(matches!(
            decide(
                "s",
                std::slice::from_ref(&r),
                Some(&slot(10_000)),
                &server(),
                true
            ),
            Ok(Plan::Resume { .. })
        ));
        let Ok(Plan::Resume { warnings, .. }) = decide(
            "s",
            std::slice::from_ref(&r),
            Some(&slot(90)),
            &server(),
            true,
        ) else {
            panic!("an older record on the same system is a crash replay")
        };
        assert!(warnings[0].contains("crash"));
        assert!(decide("s", &[r], None, &server(), true).is_err());
    }

    #[test]
    fn a_slot_without_a_position_is_an_error() {
        let none = SlotFacts {
            confirmed_flush: None,
            lost: false,
        };
        assert_eq!(
            decide("s", &[], Some(&none), &server(), true)
                .unwrap_err()
                .kind(),
            ErrorKind::Permanent
        );
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "walcast-state-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn file_store_saves_loads_and_forgets() {
        let dir = temp_dir("file");
        let store = FileStore::new(&dir);
        let mut r = record(100, 200);
        r.database = "my db/x".into();
        let key = r.key();
        assert_eq!(store.load(&key).unwrap(), None);
        assert!(!store.forget(&key).unwrap());
        store.save(&r).unwrap();
        assert!(store.path(&key).ends_with("my%20db%2Fx.s.json"));
        let back = store.load(&key).unwrap().unwrap();
        assert_eq!(back.confirmed_upper, r.confirmed_upper);
        assert!(back.origin.starts_with("state file "), "{}", back.origin);
        assert!(store.forget(&key).unwrap());
        assert_eq!(store.load(&key).unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn file_store_refuses_corrupt_files() {
        let dir = temp_dir("corrupt");
        let store = FileStore::new(&dir);
        let key = record(1, 2).key();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(store.path(&key), b"{not json").unwrap();
        let e = store.load(&key).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OperatorAction);
        assert!(e.to_string().contains("corrupt"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn file_store_reads_and_replaces_the_older_format() {
        let dir = temp_dir("legacy");
        std::fs::create_dir_all(&dir).unwrap();
        let old = dir.join(format!("slot-{SYS}-app-s.json"));
        std::fs::write(
            &old,
            format!(r#"{{"system_identifier":"{SYS}","database":"app","slot":"s","confirmed_lsn":"0/64","updated_at_unix":5}}"#),
        )
        .unwrap();
        // Another slot whose name ends the same way is not ours.
        std::fs::write(dir.join(format!("slot-{SYS}-xapp-s.json")), b"{}").unwrap();
        let store = FileStore::new(&dir);
        let key = record(1, 2).key();
        let r = store.load(&key).unwrap().unwrap();
        assert_eq!(r.confirmed_lower, Lsn::new(100));
        assert_eq!(r.confirmed_upper, Lsn::MAX);
        assert_eq!(r.timeline, 0);
        store.save(&record(100, 200)).unwrap();
        assert!(!old.exists(), "the new record replaces the older file");
        assert_eq!(
            store.load(&key).unwrap().unwrap().confirmed_upper,
            Lsn::new(200)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn own_sessions_are_remembered() {
        let state = SlotState::new(vec![]);
        let id = BackendId {
            pid: 7,
            backend_start: "t".into(),
        };
        assert!(!state.is_own_session(&id));
        state.remember_session(id.clone());
        assert!(state.clone().is_own_session(&id));
        let reused = BackendId {
            pid: 7,
            backend_start: "later".into(),
        };
        assert!(!state.is_own_session(&reused), "a reused pid is not ours");
    }
}
