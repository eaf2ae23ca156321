//! The replication source over `pgwire-replication`.

use std::sync::Arc;
use std::time::Duration;

use pgwire_replication::{ReplicationClient, ReplicationEvent};
use walcast_core::source::{ReplicationSource, SourceEvent};
use walcast_core::{Error, Result};
use walcast_pgoutput::Lsn;

use crate::classify;
use crate::gate::Gate;
use crate::stream::{message_event, Accepted, Streams};

/// How long shutdown waits for walcast's record of the final position.
const SHUTDOWN_PERSIST_WAIT: Duration = Duration::from_secs(10);

pub(crate) fn to_pgwire(lsn: Lsn) -> pgwire_replication::Lsn {
    pgwire_replication::Lsn::from_u64(lsn.as_u64())
}

pub(crate) fn from_pgwire(lsn: pgwire_replication::Lsn) -> Lsn {
    Lsn::new(lsn.as_u64())
}

/// A started replication stream on walcast's slot.
///
/// Keeps the [`ReplicationSource`] contract: `pgwire-replication` reports the
/// confirmed LSN as written/flushed/applied within `status_interval`, answers
/// keepalives that request a reply, and keeps sending status updates while
/// the relay is not reading (when its bounded channel is full).
///
/// Confirmations pass the write-ahead gate ([`crate::gate`]): a position
/// is reported only once walcast's slot record allows it (the record is
/// written ahead by a background task); until then status updates carry the
/// previous position.
///
/// With `postgres.streaming`, transactions Postgres streams before they
/// commit are held ([`crate::stream`]) and handed over whole at their
/// commit, so the contract's "whole, in commit order, only after they
/// committed" holds with streaming too.
///
/// A connection that stays silent while the relay waits for it for longer
/// than its silence timeout is dead (a half-open TCP connection: the server
/// or a middlebox dropped it without a FIN or RST reaching walcast), and
/// `recv` fails with a retryable error so walcast reconnects. The server pings
/// an idle client every `wal_sender_timeout / 2`, so a live connection is
/// never silent that long; time the relay spends not reading does not count.
pub struct PgSource {
    client: ReplicationClient,
    user: String,
    status_interval: Duration,
    /// The highest LSN the relay confirmed.
    confirmed: Lsn,
    /// The highest LSN handed to the client (`min(confirmed, allowed)`).
    applied: Lsn,
    gate: Arc<Gate>,
    writer: Option<tokio::task::JoinHandle<()>>,
    silence_timeout: Option<Duration>,
    /// Time spent waiting in `recv` since the last message.
    silent_for: Duration,
    /// With `postgres.streaming`: the streamed transactions not committed yet.
    streams: Option<Streams>,
}

/// Adds the time spent waiting to `silent_for` when the wait ends, also when
/// the `recv` future is dropped because the relay chose another branch.
struct Waiting<'a> {
    silent_for: &'a mut Duration,
    since: tokio::time::Instant,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        *self.silent_for += self.since.elapsed();
    }
}

impl std::fmt::Debug for PgSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSource")
            .field("confirmed", &self.confirmed)
            .field("applied", &self.applied)
            .finish_non_exhaustive()
    }
}

impl PgSource {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        client: ReplicationClient,
        user: String,
        status_interval: Duration,
        start: Lsn,
        silence_timeout: Option<Duration>,
        gate: Arc<Gate>,
        writer: tokio::task::JoinHandle<()>,
        streams: Option<Streams>,
    ) -> Self {
        PgSource {
            client,
            user,
            status_interval,
            confirmed: start,
            applied: start,
            gate,
            writer: Some(writer),
            silence_timeout,
            silent_for: Duration::ZERO,
            streams,
        }
    }

    /// Hands `min(confirmed, allowed)` to the client when it rose.
    fn apply(&mut self) {
        let lsn = self.confirmed.min(self.gate.allowed());
        if lsn > self.applied {
            self.applied = lsn;
            self.client.update_applied_lsn(to_pgwire(lsn));
        }
    }

    fn stop_writer(&mut self) {
        if let Some(w) = self.writer.take() {
            w.abort();
        }
    }

    async fn next_event(&mut self) -> Result<Option<ReplicationEvent>> {
        let received = match self.silence_timeout {
            None => self.client.recv().await,
            Some(limit) => {
                let budget = limit.saturating_sub(self.silent_for);
                let waited = {
                    let _waiting = Waiting {
                        silent_for: &mut self.silent_for,
                        since: tokio::time::Instant::now(),
                    };
                    tokio::time::timeout(budget, self.client.recv()).await
                };
                self.silent_for = Duration::ZERO;
                waited.map_err(|_| {
                    Error::retryable(format!(
                        "Postgres sent nothing on the replication connection for {}s (it pings an idle client every wal_sender_timeout / 2): the connection is dead",
                        limit.as_secs()
                    ))
                    .with_hint("walcast reconnects with backoff and resumes from the slot; if this repeats, check the network path to Postgres (firewalls or NAT dropping idle connections)")
                })?
            }
        };
        received.map_err(|e| classify(e, "the replication stream failed", &self.user))
    }

    /// The LSN last reported to the server in a status update.
    pub fn reported_lsn(&self) -> Lsn {
        from_pgwire(self.client.metrics().last_applied_lsn())
    }
}

impl ReplicationSource for PgSource {
    async fn recv(&mut self) -> Result<Option<SourceEvent>> {
        loop {
            // A committed streamed transaction is handed over whole first.
            if let Some(streams) = self.streams.as_mut() {
                if let Some(ev) = streams.next()? {
                    return Ok(Some(ev));
                }
            }
            self.apply();
            if let Some(e) = self.gate.take_failure() {
                return Err(e);
            }
            let gate = self.gate.clone();
            let ev = tokio::select! {
                biased;
                // The record's bound rose while we wait: report the held position now.
                _ = gate.raised() => continue,
                ev = self.next_event() => ev?,
            };
            let Some(ev) = ev else {
                return Ok(None);
            };
            return Ok(Some(match ev {
                ReplicationEvent::Begin {
                    final_lsn,
                    xid,
                    commit_time_micros,
                } => SourceEvent::Begin {
                    final_lsn: from_pgwire(final_lsn),
                    xid,
                    commit_time_micros,
                },
                ReplicationEvent::XLogData {
                    wal_start, data, ..
                } => {
                    let wal_start = from_pgwire(wal_start);
                    if let Some(streams) = self.streams.as_mut() {
                        if streams.accept(wal_start, &data)? == Accepted::Yes {
                            continue;
                        }
                        // With streaming, Logical Messages come raw.
                        if data.first() == Some(&b'M') {
                            return Ok(Some(message_event(&data)?));
                        }
                    }
                    SourceEvent::Data { wal_start, data }
                }
                ReplicationEvent::Commit {
                    lsn,
                    end_lsn,
                    commit_time_micros,
                } => SourceEvent::Commit {
                    commit_lsn: from_pgwire(lsn),
                    end_lsn: from_pgwire(end_lsn),
                    commit_time_micros,
                },
                ReplicationEvent::Message {
                    transactional,
                    lsn,
                    prefix,
                    content,
                } => SourceEvent::Message {
                    transactional,
                    lsn: from_pgwire(lsn),
                    prefix,
                    content,
                },
                ReplicationEvent::KeepAlive { wal_end, .. } => SourceEvent::KeepAlive {
                    wal_end: from_pgwire(wal_end),
                },
                // We never set a stop LSN; treat it as the end of the stream.
                ReplicationEvent::StoppedAt { .. } => return Ok(None),
                #[allow(unreachable_patterns)]
                _ => continue,
            }));
        }
    }

    fn confirm(&mut self, lsn: Lsn) {
        if lsn > self.confirmed {
            self.confirmed = lsn;
            self.gate.want(lsn);
        }
        self.apply();
    }

    fn reported_lsn(&self) -> Option<Lsn> {
        Some(PgSource::reported_lsn(self))
    }

    async fn shutdown(mut self) -> Result<()> {
        // The final position passes the gate too: it is reported only once
        // walcast's record allows it.
        self.gate.hurry();
        let persist_deadline = tokio::time::Instant::now() + SHUTDOWN_PERSIST_WAIT;
        while self.gate.allowed() < self.confirmed
            && !self.gate.failed()
            && tokio::time::Instant::now() < persist_deadline
        {
            let _ = tokio::time::timeout(Duration::from_millis(100), self.gate.raised()).await;
        }
        self.apply();
        self.stop_writer();
        if self.applied < self.confirmed {
            tracing::warn!(
                confirmed = %self.confirmed,
                persisted = %self.gate.allowed(),
                "walcast's slot record could not be written for the final position; it is not reported, and the next run replays from the slot (duplicates, no loss)"
            );
        }
        // pgwire-replication sends CopyDone without a last status update, so
        // wait until the final allowed LSN was reported before stopping.
        let deadline =
            tokio::time::Instant::now() + self.status_interval * 2 + Duration::from_secs(1);
        while self.reported_lsn() < self.applied && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.reported_lsn() < self.applied {
            tracing::warn!(
                confirmed = %self.applied,
                reported = %self.reported_lsn(),
                "the final position was not reported before shutdown; the next run replays from the slot (duplicates, no loss)"
            );
        }
        let user = self.user.clone();
        self.client
            .shutdown()
            .await
            .map_err(|e| classify(e, "closing the replication connection failed", &user))
    }
}

impl Drop for PgSource {
    fn drop(&mut self) {
        self.stop_writer();
    }
}
