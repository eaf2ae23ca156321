//! The event sink: where events go (Kafka in production).

use std::future::Future;

use crate::error::Result;
use crate::route::OutboxEvent;

/// A destination for events.
///
/// # Ordering and durability contract
/// - `send` hands one event over and returns a future that resolves to `Ok`
///   only once the event is durable in the destination (for Kafka: a
///   successful delivery report with `acks=all` from an idempotent producer).
///   Nothing else may advance the confirmed LSN.
/// - Events with the same key that are sent in order are made durable in that
///   order; a failed event is never followed by a successful later event of
///   the same key within one sink instance (Kafka: the idempotent producer
///   with the gapless guarantee stops instead of skipping the failed record).
/// - An `Err` from the future is final for that event in this sink instance:
///   the caller stops at once (without waiting for later events), calls
///   [`EventSink::abort`], and restarts from the slot. Implementations never
///   retry one event on their own after reporting it failed. When one failure
///   takes other events down with it, the error of the event that caused it is
///   the one reported.
/// - `send` may return `Err` at once for an event that can never be accepted
///   (for example larger than the maximum record size): a permanent error
///   naming that event. Nothing is handed over then, so the events sent
///   before it may still be delivered and confirmed.
pub trait EventSink: Send {
    /// Resolves when the event is durable, or failed.
    type Delivery: Future<Output = Result<()>> + Send + 'static;

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

    /// Hands one event to the destination.
    ///
    /// # Errors
    /// A permanent error when the event can never be accepted; a retryable one
    /// when the sink cannot take it now.
    fn send(&mut self, event: OutboxEvent) -> Result<Self::Delivery>;

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
