//! The event sink: where events go (Kafka in production).

use std::future::Future;

use crate::error::Result;
use crate::route::OutboxEvent;

/// Names one event handed to a sink; its outcome comes back under it from
/// [`EventSink::delivered`]. Chosen by the caller.
pub type DeliveryToken = u64;

/// A destination for events.
///
/// # Ordering and durability contract
/// - `send` hands one event over under a token; [`EventSink::delivered`]
///   reports its outcome exactly once: `Ok` only once the event is durable in
///   the destination (for Kafka: a successful delivery report with `acks=all`
///   from an idempotent producer). Nothing else may advance the confirmed LSN.
///   Outcomes come in the order the destination reports them, not the order
///   the events were sent.
/// - Events with the same key that are sent in order are made durable in that
///   order; a failed event is never followed by a successful later event of
///   the same key within one sink instance (Kafka: the idempotent producer
///   with the gapless guarantee stops instead of skipping the failed record).
/// - An `Err` outcome is final for that event in this sink instance: the
///   caller stops at once (without waiting for later events), calls
///   [`EventSink::abort`], and restarts from the slot. Implementations never
///   retry one event on their own after reporting it failed. When one failure
///   takes other events down with it, the error of the event that caused it is
///   the one reported.
/// - `send` may return `Err` at once for an event that can never be accepted
///   (for example larger than the maximum record size): a permanent error
///   naming that event. Nothing is handed over then (no outcome follows), so
///   the events sent before it may still be delivered and confirmed.
pub trait EventSink: Send {
    /// Called before [`EventSink::send`] for every event: a sink that must
    /// learn something about the destination first (Kafka: a topic's record
    /// size limit, once per topic) does it here, so `send` stays synchronous.
    /// The default does nothing.
    ///
    /// # Errors
    /// A retryable error when the lookup failed or the sink must be rebuilt
    /// before it can take this event (the caller restarts from the slot).
    fn prepare(&mut self, event: &OutboxEvent) -> impl Future<Output = Result<()>> + Send {
        let _ = event;
        std::future::ready(Ok(()))
    }

    /// Hands one event to the destination, under `token` (see
    /// [`EventSink::delivered`]).
    ///
    /// # Errors
    /// A permanent error when the event can never be accepted; a retryable one
    /// when the sink cannot take it now. No outcome follows an `Err`.
    fn send(&mut self, event: OutboxEvent, token: DeliveryToken) -> Result<()>;

    /// Waits until the outcome of at least one event sent is in, then appends
    /// the outcomes in (at least one) to `out`. Called only while events are
    /// outstanding. Cancel safe: a future dropped before it completes has
    /// appended nothing, and no outcome is lost (it comes with a later call).
    fn delivered<'a>(
        &'a mut self,
        out: &'a mut Vec<(DeliveryToken, Result<()>)>,
    ) -> impl Future<Output = ()> + Send + 'a;

    /// Records queued in the destination's client and not yet acknowledged
    /// (Kafka: librdkafka's queue), when the sink can tell. Sampled about
    /// once a second; must not block.
    fn queue_depth(&self) -> Option<u64> {
        None
    }

    /// Discards everything queued and not yet delivered (before a restart), so
    /// nothing from this instance can be delivered after a later instance starts.
    fn abort(self);
}

/// Values by sequential token: a ring from the oldest token not yet taken
/// to the newest pushed, with no allocation per value once it has grown. For
/// sinks and callers that hand out tokens in sequence and get them back in
/// any order.
#[derive(Debug)]
pub struct TokenRing<T> {
    /// The token of `slots[0]`.
    base: DeliveryToken,
    slots: std::collections::VecDeque<Option<T>>,
    count: usize,
}

impl<T> Default for TokenRing<T> {
    fn default() -> Self {
        TokenRing {
            base: 0,
            slots: std::collections::VecDeque::new(),
            count: 0,
        }
    }
}

impl<T> TokenRing<T> {
    /// The token the next [`TokenRing::push`] stores under.
    pub fn next_token(&self) -> DeliveryToken {
        self.base + self.slots.len() as u64
    }

    /// Stores `value` under [`TokenRing::next_token`], and returns that token.
    pub fn push(&mut self, value: T) -> DeliveryToken {
        let token = self.next_token();
        self.slots.push_back(Some(value));
        self.count += 1;
        token
    }

    /// The value stored under `token`, once (`None` when there is none).
    pub fn take(&mut self, token: DeliveryToken) -> Option<T> {
        let i = usize::try_from(token.checked_sub(self.base)?).ok()?;
        let value = self.slots.get_mut(i)?.take()?;
        self.count -= 1;
        while matches!(self.slots.front(), Some(None)) {
            self.slots.pop_front();
            self.base += 1;
        }
        Some(value)
    }

    /// Values stored and not taken.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when every value stored was taken.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Tokens from the oldest value not taken to the newest pushed (taken
    /// ones behind an older one included): what the ring holds in memory.
    pub fn span(&self) -> u64 {
        self.slots.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::TokenRing;

    #[test]
    fn a_ring_hands_values_back_in_any_order_once() {
        let mut r = TokenRing::default();
        let a = r.push("a");
        let b = r.push("b");
        let c = r.push("c");
        assert_eq!((a, b, c), (0, 1, 2));
        assert_eq!(r.take(b), Some("b"));
        assert_eq!(r.take(b), None, "taken once");
        assert_eq!((r.len(), r.span()), (2, 3), "b's slot is held behind a");
        assert_eq!(r.take(a), Some("a"));
        assert_eq!(r.span(), 1, "a and b's slots are freed");
        assert_eq!(r.take(7), None);
        assert_eq!(r.push("d"), 3);
        assert_eq!(r.take(c), Some("c"));
        assert_eq!(r.take(3), Some("d"));
        assert!(r.is_empty());
        assert_eq!((r.span(), r.next_token()), (0, 4));
    }
}
