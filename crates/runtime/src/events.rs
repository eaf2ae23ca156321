//! Operator-visible happenings, each emitted in one function as a log line
//! and a metric together (like Vector's internal events), once per
//! transition. Log lines never carry payloads or secrets.

use std::time::Duration;

use walcast_core::{Error, Lsn};
use walcast_postgres::SlotFacts;

use crate::telemetry::{RelayMetrics, Warning};

/// Events have been in flight with no delivery report for `blocked_for`.
pub(crate) fn kafka_blocked(
    m: &RelayMetrics,
    blocked_for: Duration,
    in_flight_events: u64,
    confirmed: Lsn,
) {
    m.warning(Warning::KafkaBlocked);
    tracing::warn!(
        event = "kafka_blocked",
        in_flight_events,
        confirmed_lsn = %confirmed,
        stalled_secs = blocked_for.as_secs(),
        "Kafka has acknowledged nothing for {}s; the slot is held at {confirmed} and nothing is skipped. Check the brokers and kafka.bootstrap_servers",
        blocked_for.as_secs()
    );
}

/// Deliveries resumed after [`kafka_blocked`].
pub(crate) fn kafka_flowing(blocked_for: Duration) {
    tracing::info!(
        event = "kafka_flowing",
        stalled_secs = blocked_for.as_secs(),
        "Kafka acknowledges events again after {}s",
        blocked_for.as_secs()
    );
}

/// The pipeline restarts from the slot after `error`.
pub(crate) fn pipeline_restart(m: &RelayMetrics, error: &Error, backoff: Duration) {
    m.restart(error.origin());
    tracing::warn!(
        event = "pipeline_restart",
        kind = %error.kind(),
        cause = error.origin().map_or("other", |o| o.as_str()),
        backoff_ms = backoff.as_millis() as u64,
        event_id = error.event_id(),
        correlation_id = error.correlation_id(),
        "{error}; restarting from the slot's confirmed position"
    );
}

/// The server ended the replication stream; walcast reconnects.
pub(crate) fn source_ended(m: &RelayMetrics, confirmed: Lsn) {
    m.restart(Some(walcast_core::Origin::Postgres));
    tracing::warn!(
        event = "pipeline_restart",
        cause = "postgres",
        %confirmed,
        "the server ended the replication stream; reconnecting"
    );
}

/// A heartbeat was written.
pub(crate) fn heartbeat(m: &RelayMetrics) {
    m.heartbeats.increment(1);
    tracing::trace!(event = "heartbeat", "heartbeat written");
}

/// Whether the Kafka cluster answers changed.
pub(crate) fn kafka_reachable(reachable: bool, error: Option<&str>) {
    if reachable {
        tracing::info!(event = "kafka_reachable", "the Kafka cluster answers again");
    } else {
        tracing::warn!(
            event = "kafka_unreachable",
            error = error.unwrap_or(""),
            "the Kafka cluster does not answer a metadata request; /readyz reports not ready. Check the brokers and kafka.bootstrap_servers"
        );
    }
}

/// What the slot's facts showed last, to emit each warning once per transition.
#[derive(Debug, Default)]
pub(crate) struct SlotWatch {
    wal_status: Option<String>,
    near_limit: bool,
}

/// How close to `max_slot_wal_keep_size` the slot's retained WAL may come
/// before walcast warns: `safe_wal_size` below this share of the limit.
pub(crate) const SAFE_WAL_SIZE_WARNING_SHARE: f64 = 0.2;

/// New facts about the slot: sets the gauges and emits the transitions.
pub(crate) fn slot_facts(m: &RelayMetrics, watch: &mut SlotWatch, slot: &str, facts: &SlotFacts) {
    m.set_wal_status(facts.wal_status.as_deref());
    if let Some(safe) = facts.safe_wal_size {
        m.set_safe_wal_size(safe);
    }
    if facts.wal_status != watch.wal_status {
        let from = watch.wal_status.take();
        watch.wal_status = facts.wal_status.clone();
        let to = facts.wal_status.as_deref();
        match to {
            Some("unreserved") => {
                m.warning(Warning::SlotWalUnreserved);
                tracing::warn!(
                    event = "slot_wal_unreserved",
                    slot,
                    safe_wal_size = facts.safe_wal_size,
                    "replication slot {slot} has wal_status = unreserved: it holds more WAL than max_slot_wal_keep_size and Postgres will invalidate it at the next checkpoint unless walcast catches up. Then events not yet in Kafka are lost to walcast (it refuses to start; see `walcast slot accept-gap --help`). Fix what holds walcast back (Kafka, walcast itself) now, or raise max_slot_wal_keep_size"
                );
            }
            Some("lost") => {
                m.warning(Warning::SlotWalLost);
                tracing::error!(
                    event = "slot_wal_lost",
                    slot,
                    "replication slot {slot} has wal_status = lost: Postgres removed WAL it needed. Events committed after the last confirmed position may never reach Kafka; walcast will refuse to start on this slot (see `walcast slot accept-gap --help`)"
                );
            }
            Some(status) if from.is_some() => {
                tracing::info!(
                    event = "slot_wal_status",
                    slot,
                    status,
                    from = from.as_deref().unwrap_or(""),
                    "replication slot {slot} has wal_status = {status}"
                );
            }
            _ => {}
        }
    }
    let near = match (facts.safe_wal_size, facts.max_slot_wal_keep_size) {
        (Some(safe), Some(max)) if max > 0 => {
            (safe as f64) < max as f64 * SAFE_WAL_SIZE_WARNING_SHARE
        }
        _ => false,
    };
    if near != watch.near_limit {
        watch.near_limit = near;
        if near {
            m.warning(Warning::SlotLagNearLimit);
            tracing::warn!(
                event = "slot_lag_near_limit",
                slot,
                safe_wal_size = facts.safe_wal_size,
                max_slot_wal_keep_size = facts.max_slot_wal_keep_size,
                "replication slot {slot} is close to max_slot_wal_keep_size: only {} bytes of WAL may still be written before Postgres invalidates it. Fix what holds walcast back (Kafka, walcast itself), or raise max_slot_wal_keep_size",
                facts.safe_wal_size.unwrap_or(0)
            );
        } else {
            tracing::info!(
                event = "slot_lag_ok",
                slot,
                "replication slot {slot} is no longer close to max_slot_wal_keep_size"
            );
        }
    }
}
