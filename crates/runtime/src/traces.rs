//! OpenTelemetry traces: one span per relayed transaction, exported over
//! OTLP/HTTP (protobuf) when `[tracing] otlp_endpoint` is set.
//!
//! The span (`walcast.transaction`, kind `PRODUCER`) starts when walcast read
//! the transaction's Begin and ends when Kafka acknowledged its last event
//! (status `OK`), or when the run ended without that: a failed delivery or a
//! restart (status `ERROR` with the reason; the transaction is read again
//! from the slot and gets a span of its own then). Transactions without
//! events get no span. Attributes: `walcast.pipeline`, `walcast.xid`,
//! `walcast.commit_lsn`, `walcast.commit_end_lsn`, `walcast.commit_time`,
//! `walcast.event_count`, `walcast.topics`. Each distinct W3C `traceparent`
//! of the transaction's events becomes a span link (attribute
//! `walcast.event_id`), at most [`MAX_LINKS`].
//!
//! Traces are best effort and never slow the pipeline down: the spans are
//! built on the pipeline's task only from what it already holds (cheap), and
//! the SDK's batch processor queues them (bounded by
//! `tracing.max_queued_spans`; a full queue drops new spans) and exports them
//! from its own thread. An export that fails (collector down, slow, refusing)
//! drops its batch and logs one warning until an export succeeds again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    Link, Span as _, SpanBuilder, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Array, Context, KeyValue, StringValue, Value};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider, SpanData, SpanExporter,
};
use opentelemetry_sdk::Resource;
use walcast_core::ack::TxnTicket;
use walcast_core::config::TracingConfig;
use walcast_core::route::OutboxEvent;
use walcast_core::{Error, Lsn, Result};
use walcast_pgoutput::PgTimestamp;

/// At most this many links per transaction span (the SDK's default limit).
pub const MAX_LINKS: usize = 128;

/// The span's name.
pub const SPAN_NAME: &str = "walcast.transaction";

/// The trace pipeline of one relay: a tracer whose spans go to the batch
/// processor and the OTLP exporter.
#[derive(Debug)]
pub struct Traces {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    pipeline: Arc<str>,
    shutdown_timeout: Duration,
}

impl Traces {
    /// The exporter for `cfg`, `None` when traces are off. No network I/O:
    /// the first export happens later, from the batch processor's thread.
    ///
    /// # Errors
    /// An operator error when the exporter cannot be built from the
    /// (validated) endpoint.
    pub fn start(cfg: &TracingConfig, pipeline: &str) -> Result<Option<Arc<Traces>>> {
        let Some(url) = cfg.traces_url() else {
            return Ok(None);
        };
        let timeout = Duration::from_millis(cfg.export_timeout_ms);
        use opentelemetry_otlp::WithExportConfig as _;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(url.clone())
            .with_timeout(timeout)
            .build()
            .map_err(|e| {
                Error::operator(format!(
                    "cannot set up the OTLP trace exporter for {url}: {e}"
                ))
                .with_hint("check tracing.otlp_endpoint")
            })?;
        let processor = BatchSpanProcessor::builder(WarnOnFailure::new(exporter, url))
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_max_queue_size(cfg.max_queued_spans as usize)
                    .with_max_export_batch_size((cfg.max_queued_spans as usize).min(512))
                    .with_scheduled_delay(Duration::from_millis(cfg.export_interval_ms))
                    .build(),
            )
            .build();
        Ok(Some(Arc::new(Traces::with_processor(
            processor,
            &cfg.service_name,
            pipeline,
            timeout,
        ))))
    }

    fn with_processor(
        processor: impl opentelemetry_sdk::trace::SpanProcessor + 'static,
        service_name: &str,
        pipeline: &str,
        shutdown_timeout: Duration,
    ) -> Traces {
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(
                Resource::builder_empty()
                    .with_attributes([
                        KeyValue::new("service.name", service_name.to_string()),
                        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
                    ])
                    .build(),
            )
            .build();
        let tracer = provider.tracer("walcast");
        Traces {
            provider,
            tracer,
            pipeline: Arc::from(pipeline),
            shutdown_timeout,
        }
    }

    /// Exports what is queued (waiting at most the export timeout) and
    /// stops the exporter's thread. Blocks: call it off the async threads.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown_with_timeout(self.shutdown_timeout) {
            tracing::debug!("trace exporter shutdown: {e}");
        }
    }

    /// Per-run state for the pipeline's observer.
    pub(crate) fn transactions(self: &Arc<Self>) -> TxnSpans {
        TxnSpans {
            traces: self.clone(),
            open: HashMap::new(),
        }
    }
}

/// The exporter, logging one warning when exports start failing and one
/// line when they work again.
#[derive(Debug)]
struct WarnOnFailure<E> {
    inner: E,
    url: String,
    failing: AtomicBool,
}

impl<E> WarnOnFailure<E> {
    fn new(inner: E, url: String) -> Self {
        WarnOnFailure {
            inner,
            url,
            failing: AtomicBool::new(false),
        }
    }
}

impl<E: SpanExporter> SpanExporter for WarnOnFailure<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        match &result {
            Err(e) if !self.failing.swap(true, Ordering::Relaxed) => tracing::warn!(
                event = "trace_export_failing",
                otlp_url = %self.url,
                dropped_spans = spans,
                "cannot export transaction spans to {}: {e}. Spans are dropped until the collector answers; events are not affected. Check tracing.otlp_endpoint and the collector",
                self.url
            ),
            Ok(()) if self.failing.swap(false, Ordering::Relaxed) => tracing::info!(
                event = "trace_export_flowing",
                otlp_url = %self.url,
                "exporting transaction spans to {} again",
                self.url
            ),
            _ => {}
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// A transaction whose span is not finished yet.
#[derive(Debug)]
struct OpenTxn {
    start: SystemTime,
    xid: u32,
    commit_lsn: Lsn,
    commit_time_micros: i64,
    end_lsn: Option<Lsn>,
    sent: u64,
    delivered: u64,
    topics: Vec<Arc<str>>,
    links: Vec<Link>,
}

/// The transactions of one pipeline run whose spans are open, fed by the
/// pipeline's observer.
#[derive(Debug)]
pub(crate) struct TxnSpans {
    traces: Arc<Traces>,
    open: HashMap<TxnTicket, OpenTxn>,
}

impl TxnSpans {
    pub(crate) fn begin(&mut self, txn: TxnTicket, xid: u32, commit_lsn: Lsn, commit_time: i64) {
        self.open.insert(
            txn,
            OpenTxn {
                start: SystemTime::now(),
                xid,
                commit_lsn,
                commit_time_micros: commit_time,
                end_lsn: None,
                sent: 0,
                delivered: 0,
                topics: Vec::new(),
                links: Vec::new(),
            },
        );
    }

    pub(crate) fn event_sent(&mut self, txn: TxnTicket, event: &OutboxEvent) {
        let Some(t) = self.open.get_mut(&txn) else {
            return;
        };
        t.sent += 1;
        if !t.topics.contains(&event.topic) {
            t.topics.push(event.topic.clone());
        }
        if t.links.len() < MAX_LINKS {
            if let Some(cx) = event
                .traceparent
                .as_deref()
                .and_then(|tp| parse_traceparent(tp, event.tracestate.as_deref()))
            {
                let known = t.links.iter().any(|l| {
                    l.span_context.trace_id() == cx.trace_id()
                        && l.span_context.span_id() == cx.span_id()
                });
                if !known {
                    let id = String::from_utf8_lossy(event.event_id()).into_owned();
                    t.links.push(Link::new(
                        cx,
                        vec![KeyValue::new("walcast.event_id", id)],
                        0,
                    ));
                }
            }
        }
    }

    pub(crate) fn commit(&mut self, txn: TxnTicket, end_lsn: Lsn) {
        let Some(t) = self.open.get_mut(&txn) else {
            return;
        };
        t.end_lsn = Some(end_lsn);
        if t.sent == 0 {
            self.open.remove(&txn);
        } else if t.delivered == t.sent {
            self.finish(txn, Status::Ok);
        }
    }

    pub(crate) fn delivered(&mut self, txn: TxnTicket) {
        let Some(t) = self.open.get_mut(&txn) else {
            return;
        };
        t.delivered += 1;
        if t.end_lsn.is_some() && t.delivered >= t.sent {
            self.finish(txn, Status::Ok);
        }
    }

    /// Ends every open span with an error status (`why`): the run ends
    /// without their acknowledgement.
    pub(crate) fn fail_all(&mut self, why: &str) {
        let open: Vec<TxnTicket> = self.open.keys().copied().collect();
        for txn in open {
            if self.open.get(&txn).is_some_and(|t| t.sent > 0) {
                self.finish(txn, Status::error(why.to_string()));
            }
        }
        self.open.clear();
    }

    fn finish(&mut self, txn: TxnTicket, status: Status) {
        let Some(t) = self.open.remove(&txn) else {
            return;
        };
        let topics: Vec<StringValue> = t
            .topics
            .iter()
            .map(|s| StringValue::from(s.to_string()))
            .collect();
        let mut attributes = vec![
            KeyValue::new("walcast.pipeline", self.traces.pipeline.to_string()),
            KeyValue::new("walcast.xid", i64::from(t.xid)),
            KeyValue::new("walcast.commit_lsn", t.commit_lsn.to_string()),
            KeyValue::new(
                "walcast.commit_time",
                PgTimestamp::from_pg_micros(t.commit_time_micros).to_string(),
            ),
            KeyValue::new("walcast.event_count", t.sent as i64),
            KeyValue::new("walcast.topics", Value::Array(Array::String(topics))),
        ];
        if let Some(end) = t.end_lsn {
            attributes.push(KeyValue::new("walcast.commit_end_lsn", end.to_string()));
        }
        if t.delivered < t.sent {
            attributes.push(KeyValue::new(
                "walcast.events_unacknowledged",
                (t.sent - t.delivered) as i64,
            ));
        }
        let builder = SpanBuilder::from_name(SPAN_NAME)
            .with_kind(SpanKind::Producer)
            .with_start_time(t.start)
            .with_attributes(attributes)
            .with_links(t.links);
        let mut span = self
            .traces
            .tracer
            .build_with_context(builder, &Context::new());
        span.set_status(status);
        span.end();
    }
}

impl Drop for TxnSpans {
    fn drop(&mut self) {
        self.fail_all(
            "the pipeline run ended before Kafka acknowledged every event of this transaction; walcast reads it again from the slot",
        );
    }
}

/// Parses a W3C `traceparent` (`00-<trace id>-<parent id>-<flags>`, with
/// an optional `tracestate`) into the remote span context a link points
/// to. `None` for anything the W3C Trace Context spec says to ignore:
/// wrong lengths, upper-case or non-hex digits, all-zero ids, version
/// `ff`, or extra fields after version `00`.
pub fn parse_traceparent(traceparent: &[u8], tracestate: Option<&[u8]>) -> Option<SpanContext> {
    let text = std::str::from_utf8(traceparent).ok()?.trim();
    let mut parts = text.split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let span_id = parts.next()?;
    let flags = parts.next()?;
    let lower_hex = |s: &str, len: usize| {
        s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    if !lower_hex(version, 2) || version == "ff" || !lower_hex(flags, 2) {
        return None;
    }
    // Version 00 has exactly four fields; later versions may add some.
    if version == "00" && parts.next().is_some() {
        return None;
    }
    if !lower_hex(trace_id, 32) || !lower_hex(span_id, 16) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace_id).ok()?;
    let span_id = SpanId::from_hex(span_id).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()? & TraceFlags::SAMPLED.to_u8();
    let state = tracestate
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    Some(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags),
        true,
        state,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SimpleSpanProcessor};
    use walcast_core::ack::AckTracker;
    use walcast_core::route::Header;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_parses_per_w3c() {
        let cx = parse_traceparent(TP.as_bytes(), Some(b"congo=t61rcWkgMzE")).unwrap();
        assert_eq!(
            cx.trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        assert_eq!(cx.span_id(), SpanId::from_hex("00f067aa0ba902b7").unwrap());
        assert!(cx.is_sampled() && cx.is_remote());
        assert_eq!(cx.trace_state().get("congo"), Some("t61rcWkgMzE"));
        // A later version may carry more fields.
        assert!(parse_traceparent(format!("cc{}-what-ever", &TP[2..]).as_bytes(), None).is_some());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
        ] {
            assert!(parse_traceparent(bad.as_bytes(), None).is_none(), "{bad:?}");
        }
    }

    fn event(id: &str, topic: &str, traceparent: Option<&str>) -> OutboxEvent {
        OutboxEvent {
            topic: Arc::from(topic),
            key: Bytes::from_static(b"k"),
            payload: Bytes::from_static(b"secret payload"),
            headers: vec![Header {
                name: Arc::from(walcast_core::route::HEADER_ID),
                value: Bytes::copy_from_slice(id.as_bytes()),
            }],
            tombstone: false,
            timestamp_ms: None,
            partition: None,
            source_lsn: Lsn::from(0x100),
            table: Arc::from("public.outbox"),
            traceparent: traceparent.map(|t| Bytes::copy_from_slice(t.as_bytes())),
            tracestate: None,
            correlation_id: None,
        }
    }

    fn in_memory() -> (Arc<Traces>, InMemorySpanExporter) {
        let exporter = InMemorySpanExporter::default();
        let traces = Traces::with_processor(
            SimpleSpanProcessor::new(exporter.clone()),
            "walcast",
            "slot_a",
            Duration::from_secs(1),
        );
        (Arc::new(traces), exporter)
    }

    fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| &kv.value)
    }

    #[test]
    fn one_span_per_acknowledged_transaction_linked_to_the_events_traceparents() {
        let (traces, exporter) = in_memory();
        let mut tracker = AckTracker::new(Lsn::from(0));
        let mut spans = traces.transactions();
        // Transaction 1: three events, two with the same traceparent, one without.
        let t1 = tracker.begin().unwrap();
        spans.begin(t1, 731, Lsn::from(0x1000), 0);
        let other = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
        spans.event_sent(t1, &event("e1", "t.A", Some(TP)));
        spans.event_sent(t1, &event("e2", "t.B", Some(TP)));
        spans.event_sent(t1, &event("e3", "t.A", Some(other)));
        spans.event_sent(t1, &event("e4", "t.A", None));
        spans.commit(t1, Lsn::from(0x1010));
        tracker.commit(t1, Lsn::from(0x1010)).unwrap();
        // Transaction 2 has no events: no span.
        let t2 = tracker.begin().unwrap();
        spans.begin(t2, 732, Lsn::from(0x2000), 0);
        spans.commit(t2, Lsn::from(0x2010));
        for _ in 0..3 {
            spans.delivered(t1);
        }
        assert!(
            exporter.get_finished_spans().unwrap().is_empty(),
            "the span ends with the last acknowledgement, not before"
        );
        spans.delivered(t1);
        let finished = exporter.get_finished_spans().unwrap();
        assert_eq!(finished.len(), 1, "{finished:?}");
        let s = &finished[0];
        assert_eq!(s.name, SPAN_NAME);
        assert_eq!(s.span_kind, SpanKind::Producer);
        assert_eq!(s.status, Status::Ok);
        assert_eq!(attr(s, "walcast.xid"), Some(&Value::I64(731)));
        assert_eq!(attr(s, "walcast.event_count"), Some(&Value::I64(4)));
        assert_eq!(attr(s, "walcast.commit_lsn"), Some(&Value::from("0/1000")));
        assert_eq!(
            attr(s, "walcast.commit_end_lsn"),
            Some(&Value::from("0/1010"))
        );
        assert_eq!(
            attr(s, "walcast.commit_time"),
            Some(&Value::from("2000-01-01 00:00:00+00"))
        );
        assert_eq!(
            attr(s, "walcast.topics"),
            Some(&Value::Array(Array::String(vec![
                "t.A".into(),
                "t.B".into()
            ])))
        );
        let links: Vec<_> = s.links.iter().collect();
        assert_eq!(
            links.len(),
            2,
            "one link per distinct traceparent: {links:?}"
        );
        assert_eq!(
            links[0].span_context,
            parse_traceparent(TP.as_bytes(), None).unwrap()
        );
        assert_eq!(
            links[0].attributes,
            vec![KeyValue::new("walcast.event_id", "e1")]
        );
        assert_eq!(
            links[1].span_context.trace_id(),
            TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap()
        );
        assert!(!links[1].span_context.is_sampled());
        let text = format!("{s:?}");
        assert!(
            !text.contains("secret payload"),
            "payloads never reach spans"
        );
    }

    #[test]
    fn a_run_that_ends_before_the_acknowledgement_ends_the_span_with_an_error() {
        let (traces, exporter) = in_memory();
        let mut tracker = AckTracker::new(Lsn::from(0));
        let mut spans = traces.transactions();
        let t1 = tracker.begin().unwrap();
        spans.begin(t1, 9, Lsn::from(0x1000), 0);
        spans.event_sent(t1, &event("e1", "t.A", None));
        spans.event_sent(t1, &event("e2", "t.A", None));
        spans.commit(t1, Lsn::from(0x1010));
        spans.delivered(t1);
        drop(spans);
        let finished = exporter.get_finished_spans().unwrap();
        assert_eq!(finished.len(), 1);
        assert!(matches!(finished[0].status, Status::Error { .. }));
        assert_eq!(
            attr(&finished[0], "walcast.events_unacknowledged"),
            Some(&Value::I64(1))
        );
    }
}
