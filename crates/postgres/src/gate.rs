//! The write-ahead gate between the relay's confirmations and the server.
//!
//! walcast never reports a flush LSN above the `confirmed_upper` of a slot
//! record that is durable in every store (see [`crate::state`]). A
//! confirmation above the persisted bound is held while a background task
//! writes a record with a new bound (at most one write in flight; wanted
//! positions that arrive meanwhile coalesce into the next write, at most one
//! per `status_interval`), then released. Status updates keep flowing with the
//! previous position meanwhile (the replication client sends them on its own).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use walcast_core::state::SlotRecord;
use walcast_core::{Error, ErrorKind};
use walcast_pgoutput::Lsn;

use crate::state::SlotState;

/// Shared between the source (which wants positions and applies the
/// allowed ones) and the record writer (which makes them durable).
#[derive(Debug)]
pub(crate) struct Gate {
    /// The highest LSN a durable record allows to report.
    allowed: AtomicU64,
    /// Woken when `allowed` rises or the writer failed.
    raised: Notify,
    /// The highest LSN the relay confirmed.
    wanted: watch::Sender<u64>,
    /// Skip the pacing for the next write (shutdown).
    hurry: Notify,
    /// The writer's error, for the source to return once.
    failure: Mutex<Option<Error>>,
    failed: AtomicBool,
}

impl Gate {
    /// A gate whose bound is `persisted` (the record written at start).
    pub(crate) fn new(persisted: Lsn) -> Arc<Gate> {
        Arc::new(Gate {
            allowed: AtomicU64::new(persisted.as_u64()),
            raised: Notify::new(),
            wanted: watch::Sender::new(persisted.as_u64()),
            hurry: Notify::new(),
            failure: Mutex::new(None),
            failed: AtomicBool::new(false),
        })
    }

    /// The highest LSN that may be reported.
    pub(crate) fn allowed(&self) -> Lsn {
        Lsn::new(self.allowed.load(Ordering::Acquire))
    }

    /// The relay confirmed `lsn` (monotonic).
    pub(crate) fn want(&self, lsn: Lsn) {
        self.wanted.send_if_modified(|w| {
            if lsn.as_u64() > *w {
                *w = lsn.as_u64();
                true
            } else {
                false
            }
        });
    }

    /// Waits until the bound rises or the writer fails (a permit left by an
    /// earlier raise completes it at once).
    pub(crate) async fn raised(&self) {
        self.raised.notified().await;
    }

    /// Writes the next record without waiting for the pacing interval.
    pub(crate) fn hurry(&self) {
        self.hurry.notify_one();
    }

    /// Whether the writer gave up.
    pub(crate) fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// The writer's error, once.
    pub(crate) fn take_failure(&self) -> Option<Error> {
        self.failure.lock().unwrap().take()
    }

    fn allow(&self, lsn: Lsn) {
        self.allowed.fetch_max(lsn.as_u64(), Ordering::AcqRel);
        self.raised.notify_one();
    }

    fn fail(&self, e: Error) {
        *self.failure.lock().unwrap() = Some(e);
        self.failed.store(true, Ordering::Release);
        self.raised.notify_one();
    }
}

/// First wait before a failed (retryable) record write is tried again.
const RETRY_FIRST: Duration = Duration::from_millis(500);
/// Longest wait between retries of a failed record write.
const RETRY_MAX: Duration = Duration::from_secs(10);
/// How often a record write that keeps failing is logged again.
const RETRY_WARN_EVERY: Duration = Duration::from_secs(30);

/// The background task that writes records ahead of the reported position.
/// A retryable failure (the Kafka copy's store is unavailable) holds the
/// position and is retried with backoff; any other failure is returned by
/// the source (the run ends).
///
/// `base` is the record written at start (identity, walsender); `reported`
/// reads the LSN last sent to the server (the record's lower bound).
pub(crate) fn spawn_writer(
    gate: Arc<Gate>,
    state: SlotState,
    base: SlotRecord,
    reported: impl Fn() -> Lsn + Send + 'static,
    pacing: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut wanted = gate.wanted.subscribe();
        let mut lower = base.confirmed_lower;
        let mut last_write: Option<tokio::time::Instant> = None;
        let mut retry = RETRY_FIRST;
        let mut failing_since: Option<tokio::time::Instant> = None;
        let mut warned_for = Duration::ZERO;
        loop {
            // Until the relay wants more than the record allows.
            loop {
                let w = Lsn::new(*wanted.borrow_and_update());
                if w > gate.allowed() {
                    break;
                }
                if wanted.changed().await.is_err() {
                    return;
                }
            }
            if let Some(at) = last_write {
                tokio::select! {
                    _ = tokio::time::sleep_until(at + pacing) => {}
                    _ = gate.hurry.notified() => {}
                }
            }
            let target = Lsn::new(*wanted.borrow_and_update());
            lower = lower.max(reported());
            let record = SlotRecord {
                confirmed_upper: target,
                confirmed_lower: lower.min(target),
                updated_at_unix: SlotRecord::now_unix(),
                ..base.clone()
            };
            last_write = Some(tokio::time::Instant::now());
            match state.save(record).await {
                Ok(()) => {
                    if failing_since.take().is_some() {
                        tracing::info!(lsn = %target, "walcast's slot record is written again; the slot advances");
                    }
                    retry = RETRY_FIRST;
                    gate.allow(target);
                }
                // The store is unavailable for now (Kafka down, the record's
                // write timed out): hold the position and retry. The
                // replication connection stays up and keeps sending status
                // updates with the held position (rule 4): a Kafka outage
                // must not end it.
                Err(e) if e.kind() == ErrorKind::Retryable => {
                    let now = tokio::time::Instant::now();
                    let since = *failing_since.get_or_insert(now);
                    if now == since || now.duration_since(since) >= warned_for + RETRY_WARN_EVERY {
                        warned_for = now.duration_since(since);
                        tracing::warn!(
                            "{e}; the slot is not advanced past {} until walcast's record is written (retrying every {}s)",
                            gate.allowed(),
                            retry.as_secs()
                        );
                    }
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(RETRY_MAX);
                }
                Err(e) => {
                    tracing::warn!(
                        "{e}; the slot is not advanced past {} until walcast's record is written",
                        gate.allowed()
                    );
                    gate.fail(e);
                    return;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use walcast_core::state::{SlotKey, SlotRecordStore};
    use walcast_core::Result;

    #[derive(Debug, Default)]
    struct Memory {
        saved: Mutex<Vec<(u64, u64)>>,
        fail: AtomicBool,
    }

    impl SlotRecordStore for Memory {
        fn describe(&self, _: &SlotKey) -> String {
            "memory".into()
        }
        fn load(&self, _: &SlotKey) -> Result<Option<SlotRecord>> {
            Ok(None)
        }
        fn save(&self, r: &SlotRecord) -> Result<()> {
            if self.fail.load(Ordering::Relaxed) {
                return Err(Error::retryable("store down"));
            }
            std::thread::sleep(Duration::from_millis(20));
            self.saved
                .lock()
                .unwrap()
                .push((r.confirmed_lower.as_u64(), r.confirmed_upper.as_u64()));
            Ok(())
        }
        fn forget(&self, _: &SlotKey) -> Result<bool> {
            Ok(false)
        }
    }

    fn base() -> SlotRecord {
        SlotRecord {
            database: "d".into(),
            slot: "s".into(),
            system_identifier: "1".into(),
            timeline: 1,
            confirmed_upper: Lsn::new(100),
            confirmed_lower: Lsn::new(100),
            walsender: None,
            application_name: "walcast".into(),
            updated_at_unix: 0,
            origin: String::new(),
        }
    }

    #[tokio::test]
    async fn positions_are_allowed_only_after_a_record_covers_them() {
        let mem = Arc::new(Memory::default());
        let state = SlotState::new(vec![mem.clone()]);
        let gate = Gate::new(Lsn::new(100));
        let reported = Arc::new(AtomicU64::new(100));
        let r = reported.clone();
        let writer = spawn_writer(
            gate.clone(),
            state,
            base(),
            move || Lsn::new(r.load(Ordering::Relaxed)),
            Duration::from_millis(50),
        );
        gate.want(Lsn::new(150));
        assert_eq!(gate.allowed(), Lsn::new(100), "held until written");
        tokio::time::timeout(Duration::from_secs(5), async {
            while gate.allowed() < Lsn::new(150) {
                gate.raised().await;
            }
        })
        .await
        .unwrap();
        // Confirmations coalesce while a write is in flight or paced.
        reported.store(150, Ordering::Relaxed);
        for l in [160, 170, 180] {
            gate.want(Lsn::new(l));
        }
        tokio::time::timeout(Duration::from_secs(5), async {
            while gate.allowed() < Lsn::new(180) {
                gate.raised().await;
            }
        })
        .await
        .unwrap();
        let saved = mem.saved.lock().unwrap().clone();
        assert!(saved.len() <= 3, "{saved:?}");
        assert_eq!(saved.first(), Some(&(100, 150)));
        assert_eq!(
            saved.last(),
            Some(&(150, 180)),
            "lower = reported, upper = wanted"
        );
        for (lower, upper) in saved {
            assert!(lower <= upper);
        }
        writer.abort();
    }

    #[tokio::test]
    async fn a_store_that_is_down_holds_the_position_until_it_is_back() {
        let mem = Arc::new(Memory::default());
        mem.fail.store(true, Ordering::Relaxed);
        let gate = Gate::new(Lsn::new(100));
        let writer = spawn_writer(
            gate.clone(),
            SlotState::new(vec![mem.clone()]),
            base(),
            || Lsn::new(100),
            Duration::from_millis(10),
        );
        gate.want(Lsn::new(200));
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(
            gate.allowed(),
            Lsn::new(100),
            "held while the store is down"
        );
        assert!(!gate.failed(), "a store that is down does not end the run");
        mem.fail.store(false, Ordering::Relaxed);
        tokio::time::timeout(Duration::from_secs(10), async {
            while gate.allowed() < Lsn::new(200) {
                gate.raised().await;
            }
        })
        .await
        .unwrap();
        writer.abort();
    }

    #[derive(Debug, Default)]
    struct Refusing;

    impl SlotRecordStore for Refusing {
        fn describe(&self, _: &SlotKey) -> String {
            "refusing".into()
        }
        fn load(&self, _: &SlotKey) -> Result<Option<SlotRecord>> {
            Ok(None)
        }
        fn save(&self, _: &SlotRecord) -> Result<()> {
            Err(Error::operator("state directory not writable"))
        }
        fn forget(&self, _: &SlotKey) -> Result<bool> {
            Ok(false)
        }
    }

    #[tokio::test]
    async fn a_refused_write_holds_the_position_and_reports_the_error() {
        let gate = Gate::new(Lsn::new(100));
        let writer = spawn_writer(
            gate.clone(),
            SlotState::new(vec![Arc::new(Refusing)]),
            base(),
            || Lsn::new(100),
            Duration::from_millis(10),
        );
        gate.want(Lsn::new(200));
        tokio::time::timeout(Duration::from_secs(5), async {
            while !gate.failed() {
                gate.raised().await;
            }
        })
        .await
        .unwrap();
        assert_eq!(gate.allowed(), Lsn::new(100));
        assert!(gate
            .take_failure()
            .unwrap()
            .to_string()
            .contains("not writable"));
        assert!(gate.take_failure().is_none(), "returned once");
        writer.await.unwrap();
    }
}
