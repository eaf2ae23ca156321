//! The replication source over `pgwire-replication`.

use std::time::Duration;

use pgwire_replication::{ReplicationClient, ReplicationEvent};
use walcast_core::source::{ReplicationSource, SourceEvent};
use walcast_core::{Error, Result};
use walcast_pgoutput::Lsn;

use crate::classify;

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
    confirmed: Lsn,
    silence_timeout: Option<Duration>,
    /// Time spent waiting in `recv` since the last message.
    silent_for: Duration,
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
            .finish_non_exhaustive()
    }
}

impl PgSource {
    pub(crate) fn new(
        client: ReplicationClient,
        user: String,
        status_interval: Duration,
        start: Lsn,
        silence_timeout: Option<Duration>,
    ) -> Self {
        PgSource {
            client,
            user,
            status_interval,
            confirmed: start,
            silence_timeout,
            silent_for: Duration::ZERO,
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
            let Some(ev) = self.next_event().await? else {
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
                } => SourceEvent::Data {
                    wal_start: from_pgwire(wal_start),
                    data,
                },
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
            self.client.update_applied_lsn(to_pgwire(lsn));
        }
    }

    fn reported_lsn(&self) -> Option<Lsn> {
        Some(PgSource::reported_lsn(self))
    }

    async fn shutdown(mut self) -> Result<()> {
        // pgwire-replication sends CopyDone without a last status update, so
        // wait until the final confirmed LSN was reported before stopping.
        let deadline =
            tokio::time::Instant::now() + self.status_interval * 2 + Duration::from_secs(1);
        while self.reported_lsn() < self.confirmed && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.reported_lsn() < self.confirmed {
            tracing::warn!(
                confirmed = %self.confirmed,
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
