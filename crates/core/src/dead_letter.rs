//! The dead-letter policy (`pipeline.on_permanent_error = "dead-letter"`):
//! what an event that can never be published carries, and the dead-letter
//! record walcast delivers in its place.
//!
//! Rule 8 of `docs/delivery-rules.md`: the dead-letter record keeps the
//! event's key, value and headers and adds the `walcast.*` headers below; it
//! takes the event's place in its transaction, so the slot passes the row
//! only once the dead-letter record is acknowledged. A dead-letter record
//! that cannot be delivered stops walcast: nothing is ever dropped.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use walcast_pgoutput::Lsn;

use crate::error::Error;
use crate::route::{Header, OutboxEvent};

/// Header: why the event could not be published ([`Reason::as_str`]).
pub const HEADER_REASON: &str = "walcast.error.reason";
/// Header: the error's kind (`permanent`, `operator_action`).
pub const HEADER_KIND: &str = "walcast.error.kind";
/// Header: the full error message (what happened and the fix).
pub const HEADER_MESSAGE: &str = "walcast.error.message";
/// Header: the topic the event was routed to (absent when it has none).
pub const HEADER_ORIGINAL_TOPIC: &str = "walcast.original.topic";
/// Header: the outbox table, `schema.table`.
pub const HEADER_TABLE: &str = "walcast.source.table";
/// Header: the commit LSN of the event's transaction (`X/Y`).
pub const HEADER_LSN: &str = "walcast.source.lsn";
/// Header: when walcast dead-lettered it (RFC 3339, UTC, milliseconds).
pub const HEADER_FAILED_AT: &str = "walcast.failed.at";
/// Header: set instead of the value when the value did not fit the
/// dead-letter topic: the value's size in bytes (the value is left empty).
pub const HEADER_VALUE_OMITTED: &str = "walcast.value.omitted.bytes";

/// Why an event can never be published (the metric's `reason` label and the
/// `walcast.error.reason` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// The record is larger than its topic or the producer accepts.
    TooLarge,
    /// The routing value gives a topic name Kafka does not allow.
    InvalidTopic,
    /// Kafka refused the topic: unknown, or walcast may not write to it.
    TopicRejected,
    /// The key column is NULL.
    NullKey,
    /// The payload column is NULL.
    NullPayload,
    /// The event id column is NULL.
    NullId,
    /// The routing column is NULL or not text.
    Unroutable,
    /// The payload could not be expanded as JSON.
    PayloadExpansion,
    /// Kafka rejected the record itself (invalid record).
    InvalidRecord,
}

impl Reason {
    /// Every reason (the metric's series are registered for each).
    pub const ALL: [Reason; 9] = [
        Reason::TooLarge,
        Reason::InvalidTopic,
        Reason::TopicRejected,
        Reason::NullKey,
        Reason::NullPayload,
        Reason::NullId,
        Reason::Unroutable,
        Reason::PayloadExpansion,
        Reason::InvalidRecord,
    ];

    /// A short stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::TooLarge => "too_large",
            Reason::InvalidTopic => "invalid_topic",
            Reason::TopicRejected => "topic_rejected",
            Reason::NullKey => "null_key",
            Reason::NullPayload => "null_payload",
            Reason::NullId => "null_id",
            Reason::Unroutable => "unroutable",
            Reason::PayloadExpansion => "payload_expansion",
            Reason::InvalidRecord => "invalid_record",
        }
    }
}

/// What is known of an event that can never be published: carried by the
/// permanent error that refused it, so a dead-letter record can be built.
#[derive(Debug, Clone)]
pub struct Rejected {
    /// Why.
    pub reason: Reason,
    /// The topic it was routed to, when it has one.
    pub topic: Option<Arc<str>>,
    /// Its key (`None`: NULL).
    pub key: Option<Bytes>,
    /// Its value (`None`: NULL).
    pub value: Option<Bytes>,
    /// Its headers (the event id first, when it has one).
    pub headers: Vec<Header>,
    /// The outbox table.
    pub table: Arc<str>,
    /// The commit LSN of its transaction.
    pub source_lsn: Lsn,
}

impl Rejected {
    /// A routed event refused by the sink.
    pub fn event(reason: Reason, event: &OutboxEvent) -> Self {
        Rejected {
            reason,
            topic: Some(event.topic.clone()),
            key: Some(event.key.clone()),
            value: Some(event.payload.clone()),
            headers: event.headers.clone(),
            table: event.table.clone(),
            source_lsn: event.source_lsn,
        }
    }

    /// The event id, when the row has one (the router puts the id header
    /// first, whatever its configured name, and adds no header before it
    /// when the id is NULL).
    pub fn event_id(&self) -> Option<&[u8]> {
        self.headers.first().map(|h| &h.value[..])
    }
}

/// An event Kafka refused for good after it was produced (the broker's
/// verdict). With `enable.gapless.guarantee` such a refusal stops the
/// producer, so the run ends; the next run (a new producer, from the slot)
/// dead-letters the event when it meets it again instead of producing it
/// ([`crate::pipeline::Pipeline::with_known_rejections`]).
#[derive(Debug, Clone)]
pub struct KnownRejection {
    /// The refused event.
    pub rejected: Rejected,
    /// The error's kind.
    pub kind: crate::ErrorKind,
    /// The error, as text (the dead-letter record's message header).
    pub message: String,
}

impl KnownRejection {
    /// The rejection `error` carries, if any.
    pub fn of(error: &Error) -> Option<Self> {
        error.rejected().map(|r| KnownRejection {
            rejected: r.clone(),
            kind: error.kind(),
            message: error.to_string(),
        })
    }

    /// Whether `event` is the refused one: same commit LSN, topic and event id.
    pub fn matches(&self, event: &OutboxEvent) -> bool {
        self.rejected.source_lsn == event.source_lsn
            && self.rejected.topic.as_deref() == Some(&*event.topic)
            && self.rejected.event_id() == Some(event.event_id())
    }

    /// Whether `other` is about the same event (it was refused again: the
    /// restart did not help, walcast must stop instead of looping).
    pub fn same_event(&self, other: &KnownRejection) -> bool {
        self.rejected.source_lsn == other.rejected.source_lsn
            && self.rejected.topic == other.rejected.topic
            && self.rejected.event_id() == other.rejected.event_id()
    }

    /// The error again, carrying `event` (as read this time).
    pub fn error_for(&self, event: &OutboxEvent) -> Error {
        Error::new(self.kind, self.message.clone())
            .with_rejected(Rejected::event(self.rejected.reason, event))
    }
}

/// The dead-letter record for `rejected`, refused with `error`, for `topic`.
/// A NULL key or value becomes empty.
pub fn record(topic: &Arc<str>, rejected: &Rejected, error: &Error, at: SystemTime) -> OutboxEvent {
    let mut headers = rejected.headers.clone();
    let mut add = |name: &str, value: String| {
        headers.push(Header {
            name: Arc::from(name),
            value: Bytes::from(value),
        })
    };
    add(HEADER_REASON, rejected.reason.as_str().to_string());
    add(HEADER_KIND, error.kind().as_str().to_string());
    add(HEADER_MESSAGE, error.to_string());
    if let Some(t) = &rejected.topic {
        add(HEADER_ORIGINAL_TOPIC, t.to_string());
    }
    add(HEADER_TABLE, rejected.table.to_string());
    add(HEADER_LSN, rejected.source_lsn.to_string());
    add(HEADER_FAILED_AT, rfc3339_millis(at));
    OutboxEvent::new(
        topic.clone(),
        rejected.key.clone().unwrap_or_default(),
        rejected.value.clone().unwrap_or_default(),
        headers,
        rejected.source_lsn,
        rejected.table.clone(),
    )
}

/// An empty event for `topic`, to have a sink look the topic up
/// ([`crate::sink::EventSink::prepare`]) before the first dead letter.
pub fn probe(topic: &Arc<str>) -> OutboxEvent {
    OutboxEvent::new(
        topic.clone(),
        Bytes::new(),
        Bytes::new(),
        Vec::new(),
        Lsn::from(0),
        Arc::from(""),
    )
}

/// `record` without its value, for a value the dead-letter topic cannot
/// take: the value's size goes into `walcast.value.omitted.bytes`.
pub fn without_value(mut record: OutboxEvent) -> OutboxEvent {
    let omitted = record.payload.len();
    record.payload = Bytes::new();
    record.headers.push(Header {
        name: Arc::from(HEADER_VALUE_OMITTED),
        value: Bytes::from(omitted.to_string()),
    });
    record
}

/// `at` as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn rfc3339_millis(at: SystemTime) -> String {
    let ms = at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let (y, m, d) = crate::route::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{HEADER_ID, HEADER_TYPE};
    use std::time::Duration;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339_millis(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_709_251_199_123);
        assert_eq!(rfc3339_millis(t), "2024-02-29T23:59:59.123Z");
        let t = UNIX_EPOCH + Duration::from_millis(4_102_444_800_000);
        assert_eq!(rfc3339_millis(t), "2100-01-01T00:00:00.000Z");
    }

    #[test]
    fn the_record_keeps_the_event_and_adds_the_error() {
        let table: Arc<str> = Arc::from("public.outbox");
        let r = Rejected {
            reason: Reason::NullKey,
            topic: None,
            key: None,
            value: Some(Bytes::from_static(b"{}")),
            headers: vec![
                Header {
                    name: Arc::from(HEADER_ID),
                    value: Bytes::from_static(b"id-1"),
                },
                Header {
                    name: Arc::from(HEADER_TYPE),
                    value: Bytes::from_static(b"T"),
                },
            ],
            table: table.clone(),
            source_lsn: Lsn::from(0x10),
        };
        let e = Error::permanent("its aggregateid column is NULL");
        let dlq: Arc<str> = Arc::from("dlq");
        let rec = record(&dlq, &r, &e, UNIX_EPOCH);
        assert_eq!(&*rec.topic, "dlq");
        assert!(rec.key.is_empty());
        assert_eq!(&rec.payload[..], b"{}");
        assert_eq!(rec.event_id(), b"id-1");
        let h = |n: &str| {
            rec.headers
                .iter()
                .find(|h| &*h.name == n)
                .map(|h| String::from_utf8_lossy(&h.value).into_owned())
        };
        assert_eq!(h(HEADER_REASON).as_deref(), Some("null_key"));
        assert_eq!(h(HEADER_KIND).as_deref(), Some("permanent"));
        assert_eq!(h(HEADER_LSN).as_deref(), Some("0/10"));
        assert_eq!(h(HEADER_TABLE).as_deref(), Some("public.outbox"));
        assert_eq!(h("type").as_deref(), Some("T"));
        assert_eq!(h(HEADER_ORIGINAL_TOPIC), None);
        let small = without_value(rec);
        assert!(small.payload.is_empty());
        assert!(small
            .headers
            .iter()
            .any(|h| &*h.name == HEADER_VALUE_OMITTED && &h.value[..] == b"2"));
    }
}
