//! What walcast remembers between runs: that it confirmed positions on a slot.
//!
//! Rule 5 of the delivery rules: if the slot is missing or invalidated after
//! walcast confirmed positions on it, walcast refuses to start (and never
//! silently creates a new slot), because events between the last confirmed
//! position and now may never have reached Kafka. Postgres keeps no trace of a
//! dropped slot, so walcast keeps one: a small JSON file per
//! (system identifier, database, slot) in `pipeline.state_dir`, written
//! atomically and rarely (not on the hot path).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The identity of a slot across runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotIdentity {
    /// `IDENTIFY_SYSTEM`'s system identifier of the cluster.
    pub system_identifier: String,
    /// Database name.
    pub database: String,
    /// Slot name.
    pub slot: String,
}

/// The record kept for a slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRecord {
    /// Which slot.
    #[serde(flatten)]
    pub identity: SlotIdentity,
    /// The last LSN walcast confirmed on it (Postgres `X/Y` form).
    pub confirmed_lsn: String,
    /// Seconds since the Unix epoch when this was written.
    pub updated_at_unix: u64,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    /// A store in `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StateStore { dir: dir.into() }
    }

    /// The file for a slot.
    pub fn path(&self, id: &SlotIdentity) -> PathBuf {
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
        self.dir.join(format!(
            "slot-{}-{}-{}.json",
            sanitize(&id.system_identifier),
            sanitize(&id.database),
            sanitize(&id.slot)
        ))
    }

    /// The record for a slot, if walcast confirmed positions on it before.
    ///
    /// # Errors
    /// An operator error when the file exists but cannot be read or parsed.
    pub fn load(&self, id: &SlotIdentity) -> Result<Option<SlotRecord>> {
        let path = self.path(id);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                Error::operator(format!("state file {} is corrupt", path.display()))
                    .with_source(e)
                    .with_hint("restore it from backup, or remove it only if you are sure this slot was never used by walcast")
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::operator(format!("cannot read state file {}", path.display()))
                .with_source(e)
                .with_hint("check pipeline.state_dir and its permissions")),
        }
    }

    /// Records that walcast confirmed `lsn` on the slot (atomic replace, fsync).
    ///
    /// # Errors
    /// An operator error when the directory is not writable.
    pub fn save(&self, id: &SlotIdentity, lsn: impl std::fmt::Display) -> Result<()> {
        let record = SlotRecord {
            identity: id.clone(),
            confirmed_lsn: lsn.to_string(),
            updated_at_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let fail = |what: &str, p: &Path, e: std::io::Error| {
            Error::operator(format!("cannot {what} state file {}", p.display()))
                .with_source(e)
                .with_hint("make pipeline.state_dir a writable, persistent directory")
        };
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| fail("create the directory of", &self.dir, e))?;
        let path = self.path(id);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(&record)
            .map_err(|e| Error::operator("cannot encode the state record").with_source(e))?;
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(|e| fail("write", &tmp, e))?;
            f.write_all(&bytes).map_err(|e| fail("write", &tmp, e))?;
            f.sync_all().map_err(|e| fail("sync", &tmp, e))?;
        }
        std::fs::rename(&tmp, &path).map_err(|e| fail("replace", &path, e))?;
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Forgets a slot (the operator accepted the gap).
    ///
    /// # Errors
    /// An operator error when the file exists and cannot be removed.
    pub fn forget(&self, id: &SlotIdentity) -> Result<bool> {
        let path = self.path(id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(
                Error::operator(format!("cannot remove state file {}", path.display()))
                    .with_source(e),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_forget() {
        let dir = std::env::temp_dir().join(format!("walcast-state-{}", std::process::id()));
        let store = StateStore::new(&dir);
        let id = SlotIdentity {
            system_identifier: "7300000000000000001".into(),
            database: "app".into(),
            slot: "walcast".into(),
        };
        assert_eq!(store.load(&id).unwrap(), None);
        store.save(&id, "0/16B6C50").unwrap();
        let r = store.load(&id).unwrap().unwrap();
        assert_eq!(r.confirmed_lsn, "0/16B6C50");
        assert_eq!(r.identity, id);
        assert!(store.forget(&id).unwrap());
        assert!(!store.forget(&id).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
