//! The JSON form of `walcast.v1.Envelope` (docs/envelope.md, "JSON form").
//!
//! Field names are the proto field names (`event_id`, ...); a reader also
//! accepts the proto3 JSON lowerCamelCase names (`eventId`, ...). 64-bit
//! integers are written as strings (proto3 JSON mapping) and read from
//! strings or numbers. Unset fields are omitted. Unlike proto3 JSON, a
//! payload that is JSON is carried as a JSON value (`payload`), anything else
//! as base64 (`payload_base64`); header values likewise (`value` for UTF-8
//! text, `value_base64` otherwise). Unknown fields are refused, so a typo
//! never loses a field silently.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{Envelope, Error, Header, SourcePosition};

#[derive(Serialize)]
struct EnvelopeOut<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    event_id: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    aggregate_type: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    aggregate_id: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    event_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    timestamp_unix_micros: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    headers: Vec<HeaderOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_base64: Option<String>,
    #[serde(skip_serializing_if = "str::is_empty")]
    content_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<SourceOut>,
    #[serde(skip_serializing_if = "str::is_empty")]
    correlation_id: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    traceparent: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    tracestate: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    schema_version: &'a str,
}

#[derive(Serialize)]
struct HeaderOut<'a> {
    key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_base64: Option<String>,
}

#[derive(Serialize)]
struct SourceOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    lsn: Option<String>,
    #[serde(skip_serializing_if = "is_zero_u32")]
    xid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    commit_time_unix_micros: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    commit_lsn: Option<String>,
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

fn nonzero<T: PartialEq + Default + ToString>(v: T) -> Option<String> {
    (v != T::default()).then(|| v.to_string())
}

/// Whether a content type says JSON (`application/json`, `…+json`; empty
/// means unknown and counts as JSON when the bytes are JSON).
fn json_content_type(content_type: &str) -> bool {
    let media = content_type.split(';').next().unwrap_or("").trim();
    media.is_empty()
        || media.eq_ignore_ascii_case("application/json")
        || media.to_ascii_lowercase().ends_with("+json")
}

/// The payload as a JSON value when it is one, byte for byte (so reading the
/// JSON form back gives the same bytes).
fn payload_as_json<'a>(payload: &'a [u8], content_type: &str) -> Option<&'a RawValue> {
    if payload.is_empty() || !json_content_type(content_type) {
        return None;
    }
    let raw: &RawValue = serde_json::from_slice(payload).ok()?;
    (raw.get().as_bytes() == payload).then_some(raw)
}

/// Serializes an envelope to its JSON form.
pub fn to_json(envelope: &Envelope) -> Vec<u8> {
    serde_json::to_vec(&out(envelope)).expect("serializing an envelope cannot fail")
}

/// The JSON form as a [`serde_json::Value`].
pub fn to_json_value(envelope: &Envelope) -> serde_json::Value {
    serde_json::to_value(out(envelope)).expect("serializing an envelope cannot fail")
}

fn out(e: &Envelope) -> EnvelopeOut<'_> {
    let payload = payload_as_json(&e.payload, &e.content_type);
    EnvelopeOut {
        event_id: &e.event_id,
        aggregate_type: &e.aggregate_type,
        aggregate_id: &e.aggregate_id,
        event_type: &e.event_type,
        timestamp_unix_micros: nonzero(e.timestamp_unix_micros),
        headers: e
            .headers
            .iter()
            .map(|h| match std::str::from_utf8(&h.value) {
                Ok(text) => HeaderOut {
                    key: &h.key,
                    value: Some(text),
                    value_base64: None,
                },
                Err(_) => HeaderOut {
                    key: &h.key,
                    value: None,
                    value_base64: Some(B64.encode(&h.value)),
                },
            })
            .collect(),
        payload,
        payload_base64: (payload.is_none() && !e.payload.is_empty())
            .then(|| B64.encode(&e.payload)),
        content_type: &e.content_type,
        source: e.source.as_ref().map(|s| SourceOut {
            lsn: nonzero(s.lsn),
            xid: s.xid,
            commit_time_unix_micros: nonzero(s.commit_time_unix_micros),
            commit_lsn: nonzero(s.commit_lsn),
        }),
        correlation_id: &e.correlation_id,
        traceparent: &e.traceparent,
        tracestate: &e.tracestate,
        schema_version: &e.schema_version,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvelopeIn<'a> {
    #[serde(default, alias = "eventId")]
    event_id: Option<String>,
    #[serde(default, alias = "aggregateType")]
    aggregate_type: Option<String>,
    #[serde(default, alias = "aggregateId")]
    aggregate_id: Option<String>,
    #[serde(default, alias = "eventType")]
    event_type: Option<String>,
    #[serde(default, alias = "timestampUnixMicros")]
    timestamp_unix_micros: Option<Int>,
    #[serde(default)]
    headers: Option<Vec<HeaderIn>>,
    #[serde(default, borrow)]
    payload: Option<&'a RawValue>,
    #[serde(default, alias = "payloadBase64")]
    payload_base64: Option<String>,
    #[serde(default, alias = "contentType")]
    content_type: Option<String>,
    #[serde(default)]
    source: Option<SourceIn>,
    #[serde(default, alias = "correlationId")]
    correlation_id: Option<String>,
    #[serde(default)]
    traceparent: Option<String>,
    #[serde(default)]
    tracestate: Option<String>,
    #[serde(default, alias = "schemaVersion")]
    schema_version: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderIn {
    key: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default, alias = "valueBase64")]
    value_base64: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceIn {
    #[serde(default)]
    lsn: Option<Int>,
    #[serde(default)]
    xid: Option<Int>,
    #[serde(default, alias = "commitTimeUnixMicros")]
    commit_time_unix_micros: Option<Int>,
    #[serde(default, alias = "commitLsn")]
    commit_lsn: Option<Int>,
}

/// An integer as a JSON number or a decimal string (proto3 JSON mapping).
#[derive(Deserialize)]
#[serde(untagged)]
enum Int {
    Signed(i64),
    Unsigned(u64),
    Text(String),
}

impl Int {
    fn get<T: TryFrom<i64> + TryFrom<u64> + std::str::FromStr>(
        self,
        field: &'static str,
    ) -> Result<T, Error> {
        let bad = |v: &dyn std::fmt::Display| Error::Field {
            field,
            reason: format!("{v} is not a valid integer for this field"),
        };
        match self {
            Int::Signed(v) => T::try_from(v).map_err(|_| bad(&v)),
            Int::Unsigned(v) => T::try_from(v).map_err(|_| bad(&v)),
            Int::Text(s) => s.trim().parse::<T>().map_err(|_| bad(&format!("{s:?}"))),
        }
    }
}

fn base64(field: &'static str, text: &str) -> Result<Vec<u8>, Error> {
    B64.decode(text.trim()).map_err(|e| Error::Field {
        field,
        reason: format!("invalid base64: {e}"),
    })
}

/// Parses the JSON form. Accepts the proto field names and their proto3
/// lowerCamelCase names; refuses unknown fields; `payload` (a JSON value,
/// kept byte for byte; `null` means empty) and `payload_base64` exclude each
/// other, as do a header's `value` and `value_base64`.
pub fn from_json(bytes: &[u8]) -> Result<Envelope, Error> {
    let i: EnvelopeIn<'_> = serde_json::from_slice(bytes)?;
    let payload = match (i.payload, i.payload_base64) {
        (Some(_), Some(_)) => {
            return Err(Error::Field {
                field: "payload",
                reason: "give either `payload` (a JSON value) or `payload_base64`, not both".into(),
            })
        }
        (Some(raw), None) if raw.get() == "null" => Vec::new(),
        (Some(raw), None) => raw.get().as_bytes().to_vec(),
        (None, Some(b)) => base64("payload_base64", &b)?,
        (None, None) => Vec::new(),
    };
    let headers = i
        .headers
        .unwrap_or_default()
        .into_iter()
        .map(|h| {
            let value = match (h.value, h.value_base64) {
                (Some(_), Some(_)) => {
                    return Err(Error::Field {
                        field: "headers",
                        reason: format!(
                            "header {:?}: give either `value` (text) or `value_base64`, not both",
                            h.key
                        ),
                    })
                }
                (Some(text), None) => text.into_bytes(),
                (None, Some(b)) => base64("headers", &b)?,
                (None, None) => Vec::new(),
            };
            Ok(Header { key: h.key, value })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let source = i
        .source
        .map(|s| -> Result<SourcePosition, Error> {
            Ok(SourcePosition {
                lsn: s.lsn.map(|v| v.get("source.lsn")).transpose()?.unwrap_or(0),
                xid: s.xid.map(|v| v.get("source.xid")).transpose()?.unwrap_or(0),
                commit_time_unix_micros: s
                    .commit_time_unix_micros
                    .map(|v| v.get("source.commit_time_unix_micros"))
                    .transpose()?
                    .unwrap_or(0),
                commit_lsn: s
                    .commit_lsn
                    .map(|v| v.get("source.commit_lsn"))
                    .transpose()?
                    .unwrap_or(0),
            })
        })
        .transpose()?;
    Ok(Envelope {
        event_id: i.event_id.unwrap_or_default(),
        aggregate_type: i.aggregate_type.unwrap_or_default(),
        aggregate_id: i.aggregate_id.unwrap_or_default(),
        event_type: i.event_type.unwrap_or_default(),
        timestamp_unix_micros: i
            .timestamp_unix_micros
            .map(|v| v.get("timestamp_unix_micros"))
            .transpose()?
            .unwrap_or(0),
        headers,
        payload,
        content_type: i.content_type.unwrap_or_default(),
        source,
        correlation_id: i.correlation_id.unwrap_or_default(),
        traceparent: i.traceparent.unwrap_or_default(),
        tracestate: i.tracestate.unwrap_or_default(),
        schema_version: i.schema_version.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_payload_is_a_json_value_and_round_trips_byte_for_byte() {
        let e = Envelope {
            event_id: "e1".into(),
            payload: br#"{"b": 1,  "a": [true]}"#.to_vec(),
            content_type: "application/json".into(),
            timestamp_unix_micros: 17,
            ..Default::default()
        };
        let v = to_json_value(&e);
        assert_eq!(v["payload"], serde_json::json!({"a": [true], "b": 1}));
        assert_eq!(v["timestamp_unix_micros"], "17");
        assert!(v.get("payload_base64").is_none());
        assert_eq!(from_json(&to_json(&e)).unwrap(), e);
    }

    #[test]
    fn other_payloads_are_base64() {
        for (payload, ct) in [
            (b"\xff\x00binary".to_vec(), ""),
            (b"{\"a\":1}".to_vec(), "text/plain"),
            (b"{\"a\":1}\n".to_vec(), "application/json"), // trailing newline kept
            (b"not json".to_vec(), "application/json"),
        ] {
            let e = Envelope {
                event_id: "e".into(),
                payload,
                content_type: ct.into(),
                ..Default::default()
            };
            let v = to_json_value(&e);
            assert!(v.get("payload").is_none(), "{v}");
            assert!(v.get("payload_base64").is_some(), "{v}");
            assert_eq!(from_json(&to_json(&e)).unwrap(), e);
        }
    }

    #[test]
    fn reads_what_an_application_writes() {
        let e = from_json(
            br#"{"eventId": "e9", "aggregate_type": "order", "aggregate_id": "o-1",
                 "event_type": "OrderPaid", "timestamp_unix_micros": 1700000000000000,
                 "headers": [{"key": "k", "value": "v"}, {"key": "k", "value_base64": "AP8="}],
                 "payload": {"amount": "10.00"}, "payload_base64": null,
                 "source": {"lsn": "23", "xid": 5}}"#,
        );
        let e = e.unwrap();
        assert_eq!(e.event_id, "e9");
        assert_eq!(e.timestamp_unix_micros, 1_700_000_000_000_000);
        assert_eq!(e.headers[1].value, vec![0x00, 0xff]);
        assert_eq!(e.payload, br#"{"amount": "10.00"}"#);
        assert_eq!(e.source.unwrap().lsn, 23);
    }

    #[test]
    fn refuses_unknown_fields_and_ambiguity() {
        let err = from_json(br#"{"event_id": "e", "evnt_type": "x"}"#).unwrap_err();
        assert!(
            err.to_string().contains("unknown field `evnt_type`"),
            "{err}"
        );
        let err = from_json(br#"{"event_id": "e", "payload": {}, "payload_base64": "AA=="}"#)
            .unwrap_err();
        assert!(err.to_string().contains("not both"), "{err}");
        let err = from_json(br#"{"event_id": "e", "source": {"xid": -1}}"#).unwrap_err();
        assert!(err.to_string().contains("source.xid"), "{err}");
        let err = from_json(br#"{"event_id": "e", "payload_base64": "!!"}"#).unwrap_err();
        assert!(err.to_string().contains("payload_base64"), "{err}");
    }

    #[test]
    fn null_payload_is_empty() {
        let e = from_json(br#"{"event_id": "e", "payload": null}"#).unwrap();
        assert!(e.payload.is_empty());
    }
}
