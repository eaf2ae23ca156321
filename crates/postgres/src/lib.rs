//! walcast's PostgreSQL side: the preflight checks, slot and publication
//! management, walcast's durable record of its slots (delivery rule 5: the
//! state directory's copy, the startup decision, the write-ahead gate), the
//! replication source, the periodic catalog check and heartbeats, and SQL
//! quoting ([`sql`]).
//!
//! Everything runs on ONE replication connection (`replication=database`,
//! through `pgwire-replication`, SCRAM and TLS): the preflight queries run on
//! the gated session before `START_REPLICATION`, so what they check describes
//! the very server and session the stream then opens on.
#![warn(missing_docs)]

pub mod admin;
mod catalog;
pub mod check;
mod gate;
mod preflight;
mod source;
pub mod sql;
mod state;
mod stream;

pub use admin::{AdminSession, PublicationPlan, SlotInfo, SlotStatus};
pub use catalog::{
    compare as compare_catalog, watch_catalog, watch_server, CatalogEntry, ServerReport, SlotFacts,
    WatchSettings, HEARTBEAT_PREFIX, HEARTBEAT_SQL,
};
pub use preflight::{
    accept_slot_gap, connect, replication_buffer_messages, ConnectOptions, Connected, ServerInfo,
    REPLICATION_READ_AHEAD_BYTES,
};
pub use source::PgSource;
pub use state::{FileStore, SlotState};

use walcast_core::{Error, ErrorKind};

/// Extracts the SQLSTATE from a `pgwire-replication` server error string
/// (`"message (SQLSTATE 42501)"`).
pub(crate) fn sqlstate(e: &pgwire_replication::PgWireError) -> Option<String> {
    let s = e.to_string();
    let i = s.rfind("(SQLSTATE ")?;
    let code = &s[i + 10..];
    Some(
        code.chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect(),
    )
}

/// Maps a replication-connection error to a classified error.
pub(crate) fn classify(e: pgwire_replication::PgWireError, what: &str, cfg_user: &str) -> Error {
    use pgwire_replication::PgWireError as P;
    let code = sqlstate(&e);
    let msg = e.to_string();
    let (kind, hint): (ErrorKind, String) = match (&e, code.as_deref()) {
        (P::Auth(_), _) | (_, Some("28P01")) => (
            ErrorKind::OperatorAction,
            format!("check postgres.user ({cfg_user}) and the password (postgres.password, postgres.password_file or WALCAST_POSTGRES__PASSWORD)"),
        ),
        (_, Some("28000")) => (
            ErrorKind::OperatorAction,
            "pg_hba.conf has no entry for this host/user with replication=database, or the role cannot log in: add a 'host <db> <user> <addr> scram-sha-256' line and reload".into(),
        ),
        (_, Some("42501")) if msg.contains("replication") || msg.contains("walsender") => (
            ErrorKind::OperatorAction,
            format!("give the role the REPLICATION attribute: ALTER ROLE {cfg_user} REPLICATION"),
        ),
        (_, Some("42501")) => (
            ErrorKind::OperatorAction,
            "grant the missing privilege named in the message to walcast's role".into(),
        ),
        (_, Some("3D000")) => (
            ErrorKind::OperatorAction,
            "the database does not exist: fix postgres.database".into(),
        ),
        (_, Some("55006")) => (
            ErrorKind::Retryable,
            "another connection is using the slot; walcast waits for it to be released".into(),
        ),
        (_, Some("55000")) if msg.contains("invalidated") || msg.contains("wal_status") => (
            ErrorKind::OperatorAction,
            "the slot was invalidated: events may be missing from Kafka; see `walcast slot accept-gap --help`".into(),
        ),
        (_, Some("58P01")) => (
            ErrorKind::OperatorAction,
            "WAL needed by the slot was removed: events may be missing from Kafka; see `walcast slot accept-gap --help`".into(),
        ),
        (_, Some("57P01" | "57P02" | "57P03" | "08006" | "08003" | "08001")) => (
            ErrorKind::Retryable,
            "Postgres is restarting or shutting down; walcast reconnects with backoff and resumes from the slot".into(),
        ),
        (P::Io(_) | P::Task(_), _) => (
            ErrorKind::Retryable,
            "walcast reconnects with backoff and resumes from the slot; check that Postgres is running and reachable at postgres.host:postgres.port".into(),
        ),
        (P::Tls(_), _) => (
            ErrorKind::OperatorAction,
            "check postgres.sslmode and postgres.ssl_root_cert, and that the server has TLS enabled".into(),
        ),
        (P::MessageTooLarge { payload_bytes, limit_bytes }, _) => (
            ErrorKind::Permanent,
            format!(
                "a row change of {payload_bytes} bytes is larger than pipeline.max_row_bytes ({limit_bytes}); walcast stops without moving the slot past it. \
                 Raise pipeline.max_row_bytes (memory: README, Memory) and the Kafka record limits if the row should be relayed, then start walcast again"
            ),
        ),
        _ => (
            ErrorKind::Retryable,
            "walcast reconnects with backoff and resumes from the slot".into(),
        ),
    };
    Error::new(kind, format!("{what}: {msg}")).with_hint(hint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgwire_replication::PgWireError;

    #[test]
    fn sqlstates_map_to_kinds() {
        let e = PgWireError::Server(
            "password authentication failed for user \"x\" (SQLSTATE 28P01)".into(),
        );
        assert_eq!(sqlstate(&e).as_deref(), Some("28P01"));
        assert_eq!(
            classify(e, "connect", "x").kind(),
            ErrorKind::OperatorAction
        );
        let e = PgWireError::Server(
            "replication slot \"s\" is active for PID 42 (SQLSTATE 55006)".into(),
        );
        assert_eq!(classify(e, "start", "x").kind(), ErrorKind::Retryable);
        let e = PgWireError::Server(
            "must be superuser or replication role to start walsender (SQLSTATE 42501)".into(),
        );
        let err = classify(e, "connect", "bob");
        assert_eq!(err.kind(), ErrorKind::OperatorAction);
        assert!(
            err.to_string().contains("ALTER ROLE bob REPLICATION"),
            "{err}"
        );
        let e = PgWireError::Io(std::sync::Arc::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        assert_eq!(classify(e, "connect", "x").kind(), ErrorKind::Retryable);
    }
}
