//! The replication source: what the relay reads from Postgres.

use std::future::Future;

use bytes::Bytes;
use walcast_pgoutput::Lsn;

use crate::error::Result;

/// One item of the replication stream, in stream order.
#[derive(Debug, Clone)]
pub enum SourceEvent {
    /// A transaction starts. With `proto_version 1` and no streaming, it has
    /// already committed.
    Begin {
        /// LSN of the transaction's commit record.
        final_lsn: Lsn,
        /// Transaction id.
        xid: u32,
        /// Commit time, microseconds since 2000-01-01.
        commit_time_micros: i64,
    },
    /// Any other pgoutput message (Relation, Insert, Update, …): raw bytes for
    /// the decoder.
    Data {
        /// WAL position of the message.
        wal_start: Lsn,
        /// The pgoutput message.
        data: Bytes,
    },
    /// The transaction ends.
    Commit {
        /// LSN of the commit record.
        commit_lsn: Lsn,
        /// End of the commit record: the position to confirm once all of the
        /// transaction's events are delivered.
        end_lsn: Lsn,
        /// Commit time, microseconds since 2000-01-01.
        commit_time_micros: i64,
    },
    /// A logical decoding message (`pg_logical_emit_message`).
    Message {
        /// Emitted inside a transaction (delivered between Begin and Commit).
        transactional: bool,
        /// Its LSN.
        lsn: Lsn,
        /// Application-defined prefix.
        prefix: String,
        /// Content.
        content: Bytes,
    },
    /// The server's keepalive with its WAL end position.
    KeepAlive {
        /// Everything before this position has been sent.
        wal_end: Lsn,
    },
}

/// A replication connection positioned on a slot.
///
/// # Ordering and durability contract
/// - `recv` yields the stream in server order; transactions arrive whole, in
///   commit order, and only after they committed.
/// - `confirm(lsn)` tells the server that everything up to `lsn` is durable in
///   the sink. Implementations report it as written/flushed/applied in standby
///   status updates within their status interval, keep answering keepalives
///   while the caller is not reading (so `wal_sender_timeout` never kills a
///   blocked but healthy connection), and never report an LSN the caller did
///   not confirm. Confirming an older LSN is a no-op.
/// - Dropping the source without `shutdown` may lose a confirmation that was
///   not sent yet; it never confirms more.
pub trait ReplicationSource: Send {
    /// The next stream item; `Ok(None)` when the server ended the stream.
    ///
    /// # Cancel safety
    /// Cancel safe: a cancelled call loses no item.
    fn recv(&mut self) -> impl Future<Output = Result<Option<SourceEvent>>> + Send;

    /// Reports `lsn` as durable (see the trait's contract).
    fn confirm(&mut self, lsn: Lsn);

    /// The last LSN actually sent to the server in a status update, when the
    /// implementation can tell (`None` otherwise). Diagnostics and failpoints only.
    fn reported_lsn(&self) -> Option<Lsn> {
        None
    }

    /// Sends the last confirmed position and closes the connection.
    fn shutdown(self) -> impl Future<Output = Result<()>> + Send;
}
