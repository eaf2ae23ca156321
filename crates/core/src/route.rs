//! Routing an outbox row to a Kafka record, with Debezium Outbox EventRouter
//! defaults so users recognise them: topic `outbox.event.${routedByValue}`
//! (the `aggregatetype` column), key = `aggregateid`, value = `payload`,
//! headers `id` and `type`.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use walcast_pgoutput::Lsn;

use crate::error::{Error, Result};

/// The placeholder replaced by the routing column's value.
pub const ROUTED_BY_VALUE: &str = "${routedByValue}";

/// The header that carries the event id (consumers deduplicate on it).
pub const HEADER_ID: &str = "id";
/// The header that carries the event type.
pub const HEADER_TYPE: &str = "type";

/// A parsed topic template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    prefix: String,
    suffix: Option<String>,
}

fn valid_topic_chars(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

impl TopicTemplate {
    /// Parses a template: literal topic characters (`[a-zA-Z0-9._-]`) with at
    /// most one `${routedByValue}`.
    ///
    /// # Errors
    /// An operator error naming `outbox.topic`.
    pub fn parse(template: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::operator(format!("outbox.topic = {template:?} is not a valid topic template: {why}"))
                .with_hint("use letters, digits, '.', '_', '-' and at most one ${routedByValue}, e.g. outbox.event.${routedByValue}")
        };
        let (prefix, suffix) = match template.split_once(ROUTED_BY_VALUE) {
            Some((p, s)) => (p, Some(s)),
            None => (template, None),
        };
        for part in [Some(prefix), suffix].into_iter().flatten() {
            if !valid_topic_chars(part) {
                return Err(bad("it has characters Kafka does not allow in topic names"));
            }
        }
        if suffix.is_none() && prefix.is_empty() {
            return Err(bad("it is empty"));
        }
        if template.len() > 249 {
            return Err(bad("it is longer than 249 characters"));
        }
        Ok(TopicTemplate {
            prefix: prefix.to_string(),
            suffix: suffix.map(str::to_string),
        })
    }

    /// The topic for a routing value.
    ///
    /// # Errors
    /// A permanent error when the result is not a valid topic name.
    pub fn render(&self, routed_by: &str) -> Result<String> {
        let topic = match &self.suffix {
            None => self.prefix.clone(),
            Some(s) => format!("{}{routed_by}{s}", self.prefix),
        };
        if topic.is_empty()
            || topic.len() > 249
            || !valid_topic_chars(&topic)
            || topic == "."
            || topic == ".."
        {
            return Err(Error::permanent(format!(
                "routing value {routed_by:?} gives the topic name {topic:?}, which Kafka does not allow"
            ))
            .with_hint("fix the row's aggregatetype (letters, digits, '.', '_', '-') or change outbox.topic"));
        }
        Ok(topic)
    }

    /// Whether `topic` is one this template can render (for finding the
    /// outbox topics that already exist in a cluster).
    pub fn matches(&self, topic: &str) -> bool {
        match &self.suffix {
            None => topic == self.prefix,
            Some(s) => {
                topic.len() >= self.prefix.len() + s.len()
                    && topic.starts_with(&self.prefix)
                    && topic.ends_with(s.as_str())
            }
        }
    }
}

/// The outbox columns of one row, already converted to bytes (text form, or
/// the raw bytes of a `bytea` payload). `None` is SQL NULL.
#[derive(Debug, Clone, Default)]
pub struct OutboxRow {
    /// Event id.
    pub id: Option<Bytes>,
    /// Routing value.
    pub aggregatetype: Option<Bytes>,
    /// Record key.
    pub aggregateid: Option<Bytes>,
    /// Event type (`None` also when the table has no such column).
    pub event_type: Option<Bytes>,
    /// Record value.
    pub payload: Option<Bytes>,
}

/// One record header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Name.
    pub name: Arc<str>,
    /// Value.
    pub value: Bytes,
}

/// An event ready for Kafka.
#[derive(Debug, Clone)]
pub struct OutboxEvent {
    /// Destination topic.
    pub topic: Arc<str>,
    /// Record key (the aggregate id).
    pub key: Bytes,
    /// Record value.
    pub payload: Bytes,
    /// Record headers, the event id first.
    pub headers: Vec<Header>,
    /// Commit LSN of the source transaction (for diagnostics and dead letters).
    pub source_lsn: Lsn,
    /// The outbox table, `schema.table`.
    pub table: Arc<str>,
    /// The W3C `traceparent` of the request that wrote the row, when the
    /// outbox has such a column: the transaction's span links to it.
    pub traceparent: Option<Bytes>,
    /// The W3C `tracestate` that goes with `traceparent`, when present.
    pub tracestate: Option<Bytes>,
    /// The correlation id, when the outbox has such a column: a field of the
    /// event's log lines.
    pub correlation_id: Option<Bytes>,
}

impl OutboxEvent {
    /// Bytes this event occupies in flight (key + value + headers), for flow control.
    pub fn size_bytes(&self) -> u64 {
        let headers: usize = self
            .headers
            .iter()
            .map(|h| h.name.len() + h.value.len())
            .sum();
        (self.key.len() + self.payload.len() + headers + self.topic.len()) as u64
    }

    /// The event id header's value.
    pub fn event_id(&self) -> &[u8] {
        self.headers
            .iter()
            .find(|h| &*h.name == HEADER_ID)
            .map(|h| &h.value[..])
            .unwrap_or_default()
    }
}

/// Turns outbox rows into events.
#[derive(Debug)]
pub struct Router {
    template: TopicTemplate,
    topics: HashMap<Bytes, Arc<str>>,
    header_id: Arc<str>,
    header_type: Arc<str>,
}

impl Router {
    /// A router with the given topic template.
    pub fn new(template: TopicTemplate) -> Self {
        Router {
            template,
            topics: HashMap::new(),
            header_id: Arc::from(HEADER_ID),
            header_type: Arc::from(HEADER_TYPE),
        }
    }

    /// Routes one row from `table`, committed at `source_lsn`.
    ///
    /// # Errors
    /// A permanent error (the row can never be published as it is) when a
    /// required column is NULL or the topic would be invalid. The message names
    /// the table, the event id and the LSN so the row can be found.
    pub fn route(
        &mut self,
        table: &Arc<str>,
        source_lsn: Lsn,
        row: OutboxRow,
    ) -> Result<OutboxEvent> {
        let id_text = row
            .id
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_else(|| "NULL".into());
        let unroutable = |what: &str| {
            Error::permanent(format!(
                "outbox row in {table} (id {id_text}, commit LSN {source_lsn}) cannot be published: {what}"
            ))
            .with_hint("walcast stops here without moving the slot past this row: fix the writer, then remove or repair the row's effects (for example by accepting the gap with a new slot) and restart")
            .with_event(id_text.as_bytes(), None)
        };
        let id = row.id.ok_or_else(|| unroutable("its id column is NULL"))?;
        let key = row
            .aggregateid
            .ok_or_else(|| unroutable("its aggregateid column is NULL (the record key keeps one aggregate's events in order)"))?;
        let payload = row
            .payload
            .ok_or_else(|| unroutable("its payload column is NULL"))?;
        let routed_by = row
            .aggregatetype
            .ok_or_else(|| unroutable("its aggregatetype column is NULL (it selects the topic)"))?;
        let topic = match self.topics.get(&routed_by) {
            Some(t) => t.clone(),
            None => {
                let value = std::str::from_utf8(&routed_by)
                    .map_err(|_| unroutable("its aggregatetype is not valid UTF-8"))?;
                let topic: Arc<str> = Arc::from(
                    self.template
                        .render(value)
                        .map_err(|e| unroutable(e.message()))?,
                );
                if self.topics.len() > 10_000 {
                    self.topics.clear();
                }
                self.topics.insert(routed_by, topic.clone());
                topic
            }
        };
        let mut headers = Vec::with_capacity(2);
        headers.push(Header {
            name: self.header_id.clone(),
            value: id,
        });
        if let Some(t) = row.event_type {
            headers.push(Header {
                name: self.header_type.clone(),
                value: t,
            });
        }
        Ok(OutboxEvent {
            topic,
            key,
            payload,
            headers,
            source_lsn,
            table: table.clone(),
            traceparent: None,
            tracestate: None,
            correlation_id: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(agg: &str) -> OutboxRow {
        OutboxRow {
            id: Some(Bytes::from_static(b"0b0e5b3e-1")),
            aggregatetype: Some(Bytes::copy_from_slice(agg.as_bytes())),
            aggregateid: Some(Bytes::from_static(b"order-1")),
            event_type: Some(Bytes::from_static(b"OrderCreated")),
            payload: Some(Bytes::from_static(b"{\"a\":1}")),
        }
    }

    #[test]
    fn debezium_defaults() {
        let mut r = Router::new(TopicTemplate::parse("outbox.event.${routedByValue}").unwrap());
        let t: Arc<str> = Arc::from("public.outbox");
        let e = r.route(&t, Lsn::from(7), row("Order")).unwrap();
        assert_eq!(&*e.topic, "outbox.event.Order");
        assert_eq!(&e.key[..], b"order-1");
        assert_eq!(&e.payload[..], b"{\"a\":1}");
        assert_eq!(e.event_id(), b"0b0e5b3e-1");
        assert_eq!(&*e.headers[1].name, "type");
        assert_eq!(&e.headers[1].value[..], b"OrderCreated");
    }

    #[test]
    fn unroutable_rows_are_permanent_errors_naming_the_row() {
        let mut r = Router::new(TopicTemplate::parse("outbox.event.${routedByValue}").unwrap());
        let t: Arc<str> = Arc::from("public.outbox");
        let err = r.route(&t, Lsn::from(7), row("bad topic!")).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Permanent);
        assert!(err.to_string().contains("0b0e5b3e-1"), "{err}");
        let mut nul = row("x");
        nul.aggregateid = None;
        let err = r.route(&t, Lsn::from(7), nul).unwrap_err();
        assert!(err.to_string().contains("aggregateid"), "{err}");
        let mut nul = row("x");
        nul.payload = None;
        assert!(r.route(&t, Lsn::from(7), nul).is_err());
    }

    #[test]
    fn templates_are_validated() {
        assert!(TopicTemplate::parse("fixed-topic").is_ok());
        assert!(TopicTemplate::parse("a ${routedByValue}").is_err());
        assert!(TopicTemplate::parse("${other}").is_err());
        assert!(TopicTemplate::parse("").is_err());
        let t = TopicTemplate::parse("${routedByValue}.events").unwrap();
        assert_eq!(t.render("Order").unwrap(), "Order.events");
        assert!(t.matches("Order.events"));
        assert!(!t.matches("Order.events2"));
        let t = TopicTemplate::parse("outbox.event.${routedByValue}").unwrap();
        assert!(t.matches("outbox.event.Payment"));
        assert!(!t.matches("outbox.other"));
        let t = TopicTemplate::parse("fixed-topic").unwrap();
        assert!(t.matches("fixed-topic"));
        assert!(!t.matches("fixed-topic-2"));
    }
}
