//! The ack tracker: which LSN may be confirmed to Postgres.
//!
//! This type implements rules 1–3 of `docs/delivery-rules.md`:
//!
//! - The flush LSN is the `commit_end_lsn` of the longest prefix of received
//!   transactions whose events are all delivered. A transaction with no events
//!   counts as delivered when its Commit arrives. Delivery reports may arrive in
//!   any order (different partitions); the prefix rule makes that safe.
//! - When nothing is in flight and no transaction is open or pending, the flush
//!   LSN follows the server's reported WAL end, so a quiet slot never pins WAL.
//! - The flush LSN never moves backwards.
//!
//! It does no I/O and keeps O(1) work per event: transactions live in a FIFO
//! addressed by a monotonically increasing ticket. A transaction that is fully
//! acknowledged when its Commit arrives (no events, or all delivered already)
//! behind one still waiting is merged into the one before it, so the FIFO
//! holds at most `in_flight_events + 1` transactions however many empty
//! transactions stream past a stuck event (rule 10: the tracker is bounded too).

use std::collections::VecDeque;

use walcast_pgoutput::Lsn;

/// True only in a build with the feature `broken-ack-for-tests`: the tracker
/// then acknowledges a committed transaction as soon as its FIRST event is
/// delivered. That loses data; it exists so the reliability suite can show it
/// catches such a bug (`scripts/dev chaos --broken-build`). Debug builds only.
pub const BROKEN_ACK_FOR_TESTS: bool = cfg!(feature = "broken-ack-for-tests");

#[cfg(all(feature = "broken-ack-for-tests", not(debug_assertions)))]
compile_error!("the feature broken-ack-for-tests deliberately loses data: it is for debug test builds of the reliability suite only");

/// A ticket naming one transaction in the tracker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxnTicket(u64);

/// A misuse of the tracker, which means the replication stream arrived out of
/// protocol order (or a bug). Never silently ignored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AckError {
    /// `begin` while another transaction is still open.
    #[error("replication stream sent Begin while transaction {0:?} was still open")]
    BeginWhileOpen(TxnTicket),
    /// An event or commit for a transaction that is not the open one.
    #[error("event or Commit for transaction {0:?}, which is not the open transaction")]
    NotOpen(TxnTicket),
    /// A delivery report for a transaction with no outstanding events.
    #[error("delivery report for transaction {0:?}, which has no outstanding events")]
    NothingOutstanding(TxnTicket),
}

#[derive(Debug)]
struct Txn {
    /// `None` while the transaction is open (Commit not yet received).
    end_lsn: Option<Lsn>,
    /// Events handed to the sink and not yet delivered.
    outstanding: u64,
    /// At least one event was delivered (only the broken test build looks at it).
    delivered_any: bool,
}

/// Tracks transactions and outstanding deliveries; yields the safe flush LSN.
#[derive(Debug)]
pub struct AckTracker {
    /// Ticket number of `txns.front()`.
    base: u64,
    txns: VecDeque<Txn>,
    flush: Lsn,
    in_flight: u64,
}

impl AckTracker {
    /// A tracker resuming at `start`: the slot's confirmed flush LSN.
    pub fn new(start: Lsn) -> Self {
        AckTracker {
            base: 0,
            txns: VecDeque::new(),
            flush: start,
            in_flight: 0,
        }
    }

    /// The LSN that is safe to report as flushed: never backwards.
    pub fn flush_lsn(&self) -> Lsn {
        self.flush
    }

    /// Events handed to the sink and not yet delivered, across all transactions.
    pub fn in_flight_events(&self) -> u64 {
        self.in_flight
    }

    /// Transactions received and not yet fully acknowledged (including an open one).
    pub fn pending_transactions(&self) -> usize {
        self.txns.len()
    }

    /// True when nothing is open, pending or in flight.
    pub fn is_idle(&self) -> bool {
        self.txns.is_empty()
    }

    fn open_ticket(&self) -> Option<TxnTicket> {
        match self.txns.back() {
            Some(t) if t.end_lsn.is_none() => {
                Some(TxnTicket(self.base + self.txns.len() as u64 - 1))
            }
            _ => None,
        }
    }

    fn slot_mut(&mut self, ticket: TxnTicket) -> Option<&mut Txn> {
        let idx = ticket.0.checked_sub(self.base)?;
        self.txns.get_mut(usize::try_from(idx).ok()?)
    }

    /// A Begin arrived: opens a transaction.
    ///
    /// # Errors
    /// [`AckError::BeginWhileOpen`] if a transaction is already open.
    pub fn begin(&mut self) -> Result<TxnTicket, AckError> {
        if let Some(open) = self.open_ticket() {
            return Err(AckError::BeginWhileOpen(open));
        }
        self.txns.push_back(Txn {
            end_lsn: None,
            outstanding: 0,
            delivered_any: false,
        });
        Ok(TxnTicket(self.base + self.txns.len() as u64 - 1))
    }

    /// One event of the open transaction `ticket` was handed to the sink.
    ///
    /// # Errors
    /// [`AckError::NotOpen`] if `ticket` is not the open transaction.
    pub fn event_sent(&mut self, ticket: TxnTicket) -> Result<(), AckError> {
        if self.open_ticket() != Some(ticket) {
            return Err(AckError::NotOpen(ticket));
        }
        let txn = self.txns.back_mut().ok_or(AckError::NotOpen(ticket))?;
        txn.outstanding += 1;
        self.in_flight += 1;
        Ok(())
    }

    /// The Commit of the open transaction `ticket` arrived with its end LSN.
    ///
    /// # Errors
    /// [`AckError::NotOpen`] if `ticket` is not the open transaction.
    pub fn commit(&mut self, ticket: TxnTicket, end_lsn: Lsn) -> Result<(), AckError> {
        if self.open_ticket() != Some(ticket) {
            return Err(AckError::NotOpen(ticket));
        }
        let len = self.txns.len();
        if len >= 2 && self.txns[len - 1].outstanding == 0 && !BROKEN_ACK_FOR_TESTS {
            // Acknowledged already: the transaction before it (committed,
            // waiting) now carries its end LSN. No delivery can name the
            // dropped ticket (it has nothing outstanding), and the next begin()
            // reuses the number.
            self.txns.pop_back();
            if let Some(prev) = self.txns.back_mut() {
                prev.end_lsn = Some(end_lsn);
            }
        } else if let Some(txn) = self.txns.back_mut() {
            txn.end_lsn = Some(end_lsn);
        }
        self.advance();
        Ok(())
    }

    /// Kafka acknowledged one event of transaction `ticket`.
    ///
    /// # Errors
    /// [`AckError::NothingOutstanding`] if that transaction has no event in flight.
    pub fn delivered(&mut self, ticket: TxnTicket) -> Result<(), AckError> {
        if BROKEN_ACK_FOR_TESTS && ticket.0 < self.base && self.in_flight > 0 {
            // The broken build already acknowledged and dropped this transaction.
            self.in_flight -= 1;
            return Ok(());
        }
        let txn = self
            .slot_mut(ticket)
            .filter(|t| t.outstanding > 0)
            .ok_or(AckError::NothingOutstanding(ticket))?;
        txn.outstanding -= 1;
        txn.delivered_any = true;
        self.in_flight -= 1;
        self.advance();
        Ok(())
    }

    /// The server reported its WAL end (keepalive). When nothing is open,
    /// pending or in flight, everything up to it has been processed and the
    /// flush LSN follows it (rule 2). Otherwise it is ignored (rule 3).
    pub fn server_position(&mut self, wal_end: Lsn) {
        if self.txns.is_empty() && wal_end > self.flush {
            self.flush = wal_end;
        }
    }

    fn advance(&mut self) {
        while let Some(front) = self.txns.front() {
            let acked = front.outstanding == 0 || (BROKEN_ACK_FOR_TESTS && front.delivered_any);
            match front.end_lsn {
                Some(end) if acked => {
                    if end > self.flush {
                        self.flush = end;
                    }
                    self.txns.pop_front();
                    self.base += 1;
                }
                _ => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lsn(v: u64) -> Lsn {
        Lsn::from(v)
    }

    #[test]
    fn empty_transaction_acks_on_commit() {
        let mut t = AckTracker::new(lsn(100));
        let a = t.begin().unwrap();
        assert_eq!(t.flush_lsn(), lsn(100));
        t.commit(a, lsn(200)).unwrap();
        assert_eq!(t.flush_lsn(), lsn(200));
        assert!(t.is_idle());
    }

    #[test]
    fn waits_for_every_event_of_a_transaction() {
        let mut t = AckTracker::new(lsn(0));
        let a = t.begin().unwrap();
        t.event_sent(a).unwrap();
        t.event_sent(a).unwrap();
        t.commit(a, lsn(10)).unwrap();
        t.delivered(a).unwrap();
        assert_eq!(t.flush_lsn(), lsn(0), "one event still in flight");
        t.delivered(a).unwrap();
        assert_eq!(t.flush_lsn(), lsn(10));
    }

    #[test]
    fn empty_transactions_behind_a_stuck_event_do_not_grow_the_queue() {
        let mut t = AckTracker::new(lsn(0));
        let a = t.begin().unwrap();
        t.event_sent(a).unwrap();
        t.commit(a, lsn(10)).unwrap();
        for i in 0..100_000u64 {
            let e = t.begin().unwrap();
            t.commit(e, lsn(20 + i)).unwrap();
            assert!(
                t.pending_transactions() <= 2,
                "queue grew to {}",
                t.pending_transactions()
            );
        }
        assert_eq!(t.flush_lsn(), lsn(0), "the stuck event holds the LSN");
        // A transaction with an event behind them still waits for its own event.
        let b = t.begin().unwrap();
        t.event_sent(b).unwrap();
        t.commit(b, lsn(200_000)).unwrap();
        t.delivered(a).unwrap();
        assert_eq!(
            t.flush_lsn(),
            lsn(20 + 99_999),
            "the empty ones acked with a"
        );
        t.delivered(b).unwrap();
        assert_eq!(t.flush_lsn(), lsn(200_000));
        assert!(t.is_idle());
    }

    #[test]
    fn a_later_transaction_delivered_first_does_not_move_the_lsn() {
        let mut t = AckTracker::new(lsn(0));
        let a = t.begin().unwrap();
        t.event_sent(a).unwrap();
        t.commit(a, lsn(10)).unwrap();
        let b = t.begin().unwrap();
        t.event_sent(b).unwrap();
        t.commit(b, lsn(20)).unwrap();
        t.delivered(b).unwrap();
        assert_eq!(t.flush_lsn(), lsn(0));
        t.delivered(a).unwrap();
        assert_eq!(t.flush_lsn(), lsn(20));
    }

    #[test]
    fn delivered_events_of_an_open_transaction_do_not_ack_it() {
        let mut t = AckTracker::new(lsn(0));
        let a = t.begin().unwrap();
        t.event_sent(a).unwrap();
        t.delivered(a).unwrap();
        assert_eq!(t.flush_lsn(), lsn(0));
        t.server_position(lsn(50));
        assert_eq!(t.flush_lsn(), lsn(0), "keepalive must not ack an open txn");
        t.commit(a, lsn(30)).unwrap();
        assert_eq!(t.flush_lsn(), lsn(30));
    }

    #[test]
    fn keepalive_moves_an_idle_tracker_but_never_backwards() {
        let mut t = AckTracker::new(lsn(100));
        t.server_position(lsn(50));
        assert_eq!(t.flush_lsn(), lsn(100));
        t.server_position(lsn(500));
        assert_eq!(t.flush_lsn(), lsn(500));
        let a = t.begin().unwrap();
        t.event_sent(a).unwrap();
        t.commit(a, lsn(600)).unwrap();
        t.server_position(lsn(700));
        assert_eq!(t.flush_lsn(), lsn(500), "undelivered event pins the lsn");
        t.delivered(a).unwrap();
        t.server_position(lsn(700));
        assert_eq!(t.flush_lsn(), lsn(700));
    }

    /// What the deliberately broken test build does (and the real one does not).
    #[test]
    fn first_delivery_acks_only_in_the_broken_build() {
        let mut t = AckTracker::new(lsn(0));
        let a = t.begin().unwrap();
        t.event_sent(a).unwrap();
        t.event_sent(a).unwrap();
        t.commit(a, lsn(10)).unwrap();
        t.delivered(a).unwrap();
        if BROKEN_ACK_FOR_TESTS {
            assert_eq!(
                t.flush_lsn(),
                lsn(10),
                "broken: acked on the first delivery"
            );
        } else {
            assert_eq!(t.flush_lsn(), lsn(0));
        }
        t.delivered(a).unwrap();
        assert_eq!(t.flush_lsn(), lsn(10));
        assert_eq!(t.in_flight_events(), 0);
    }

    #[test]
    fn protocol_misuse_is_an_error() {
        let mut t = AckTracker::new(lsn(0));
        let a = t.begin().unwrap();
        assert_eq!(t.begin(), Err(AckError::BeginWhileOpen(a)));
        t.commit(a, lsn(1)).unwrap();
        assert_eq!(t.event_sent(a), Err(AckError::NotOpen(a)));
        assert_eq!(t.delivered(a), Err(AckError::NothingOutstanding(a)));
        assert_eq!(t.commit(a, lsn(2)), Err(AckError::NotOpen(a)));
    }

    /// A random stream of transactions with random event counts; deliveries in
    /// a random order interleaved with reading. After every step: every
    /// transaction whose end LSN is at or below the flush LSN has all of its
    /// events delivered, and the flush LSN never decreases. At the end,
    /// everything delivered means the flush LSN is the last end LSN.
    #[derive(Debug, Clone)]
    enum Step {
        Read,
        Deliver(usize),
        Keepalive,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn flush_lsn_only_covers_fully_delivered_prefix(
            sizes in prop::collection::vec(0usize..5, 1..40),
            steps in prop::collection::vec(prop_oneof![
                3 => Just(Step::Read),
                3 => (0usize..1000).prop_map(Step::Deliver),
                1 => Just(Step::Keepalive),
            ], 0..400),
        ) {
            // Each txn i: `sizes[i]` events, end lsn = (i+1)*100.
            let mut t = AckTracker::new(lsn(0));
            let mut next_txn = 0usize;
            let mut next_event = 0usize;
            let mut open: Option<TxnTicket> = None;
            // (txn index, ticket) of events in flight
            let mut in_flight: Vec<(usize, TxnTicket)> = Vec::new();
            let mut undelivered = vec![0usize; sizes.len()];
            let mut last_flush = lsn(0);
            let mut server_end = 0u64;

            let check = |t: &AckTracker, undelivered: &[usize], last: Lsn, committed: usize| {
                let f = t.flush_lsn();
                assert!(f >= last, "flush moved backwards");
                for (i, u) in undelivered.iter().enumerate() {
                    let end = lsn((i as u64 + 1) * 100);
                    if end <= f {
                        assert!(i < committed, "acked a txn whose Commit was not read");
                        assert_eq!(*u, 0, "acked txn {i} with undelivered events");
                    }
                }
            };

            let do_read = |t: &mut AckTracker, next_txn: &mut usize, next_event: &mut usize,
                               open: &mut Option<TxnTicket>, in_flight: &mut Vec<(usize, TxnTicket)>,
                               undelivered: &mut Vec<usize>, server_end: &mut u64| {
                if *next_txn >= sizes.len() { return; }
                match *open {
                    None => { *open = Some(t.begin().unwrap()); *next_event = 0; }
                    Some(tk) => {
                        if *next_event < sizes[*next_txn] {
                            t.event_sent(tk).unwrap();
                            in_flight.push((*next_txn, tk));
                            undelivered[*next_txn] += 1;
                            *next_event += 1;
                        } else {
                            let end = (*next_txn as u64 + 1) * 100;
                            t.commit(tk, lsn(end)).unwrap();
                            *server_end = end + 50;
                            *open = None;
                            *next_txn += 1;
                        }
                    }
                }
            };

            for step in steps {
                match step {
                    Step::Read => do_read(&mut t, &mut next_txn, &mut next_event, &mut open,
                                          &mut in_flight, &mut undelivered, &mut server_end),
                    Step::Deliver(k) => {
                        if !in_flight.is_empty() {
                            let (i, tk) = in_flight.swap_remove(k % in_flight.len());
                            undelivered[i] -= 1;
                            t.delivered(tk).unwrap();
                        }
                    }
                    Step::Keepalive => {
                        // The server's position is past the last commit read. While
                        // a transaction is open or an event in flight it must not move
                        // the flush LSN.
                        let before = t.flush_lsn();
                        t.server_position(lsn(server_end));
                        if open.is_some() || !in_flight.is_empty() {
                            assert_eq!(t.flush_lsn(), before, "keepalive moved the lsn while busy");
                        }
                    }
                }
                check(&t, &undelivered, last_flush, next_txn);
                last_flush = t.flush_lsn();
            }
            // Drain: read everything, deliver everything.
            while next_txn < sizes.len() {
                do_read(&mut t, &mut next_txn, &mut next_event, &mut open,
                        &mut in_flight, &mut undelivered, &mut server_end);
                check(&t, &undelivered, last_flush, next_txn);
                last_flush = t.flush_lsn();
            }
            while let Some((i, tk)) = in_flight.pop() {
                undelivered[i] -= 1;
                t.delivered(tk).unwrap();
                check(&t, &undelivered, last_flush, next_txn);
                last_flush = t.flush_lsn();
            }
            // Everything delivered: at least the last commit is confirmed (more
            // if an idle keepalive moved it), and an idle keepalive now moves it.
            prop_assert!(t.flush_lsn() >= lsn(sizes.len() as u64 * 100));
            t.server_position(lsn(sizes.len() as u64 * 100 + 99));
            prop_assert_eq!(t.flush_lsn(), lsn(sizes.len() as u64 * 100 + 99));
            prop_assert_eq!(t.in_flight_events(), 0);
            prop_assert!(t.is_idle());
        }
    }
}
