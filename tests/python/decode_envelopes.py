"""Reads walcast.v1.Envelope records from Kafka and decodes them with the
committed descriptor set (proto/walcast/v1/envelope.binpb) at run time: no
protoc, no generated code. Driven by tests/it/envelope.rs.

Prints one JSON object per record on stdout:
  {"topic", "partition", "offset", "key", "headers": [[k, hex]],
   "envelope": {field: value, ...}}  (bytes as hex, 64-bit ints as numbers)
"""

import argparse
import json
import sys
import time

from confluent_kafka import Consumer, KafkaException
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, unknown_fields


def envelope_class(descriptor_set_path):
    fds = descriptor_pb2.FileDescriptorSet()
    with open(descriptor_set_path, "rb") as f:
        fds.ParseFromString(f.read())
    pool = descriptor_pool.DescriptorPool()
    for file in fds.file:
        pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("walcast.v1.Envelope"))


def plain(msg):
    """The envelope as plain JSON values (bytes as hex), every field present."""
    src = msg.source
    return {
        "event_id": msg.event_id,
        "aggregate_type": msg.aggregate_type,
        "aggregate_id": msg.aggregate_id,
        "event_type": msg.event_type,
        "timestamp_unix_micros": msg.timestamp_unix_micros,
        "headers": [[h.key, h.value.hex()] for h in msg.headers],
        "payload": msg.payload.hex(),
        "content_type": msg.content_type,
        "has_source": msg.HasField("source"),
        "source": {
            "lsn": src.lsn,
            "xid": src.xid,
            "commit_time_unix_micros": src.commit_time_unix_micros,
            "commit_lsn": src.commit_lsn,
        },
        "correlation_id": msg.correlation_id,
        "traceparent": msg.traceparent,
        "tracestate": msg.tracestate,
        "schema_version": msg.schema_version,
        "unknown_fields": len(unknown_fields.UnknownFieldSet(msg)),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--descriptor-set", required=True)
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--timeout-s", type=float, default=60)
    a = ap.parse_args()

    Envelope = envelope_class(a.descriptor_set)
    consumer = Consumer({
        "bootstrap.servers": a.bootstrap,
        "group.id": f"decode-envelopes-{a.topic}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
    })
    consumer.subscribe([a.topic])
    seen = 0
    deadline = time.monotonic() + a.timeout_s
    try:
        while seen < a.count and time.monotonic() < deadline:
            m = consumer.poll(1.0)
            if m is None:
                continue
            if m.error():
                raise KafkaException(m.error())
            env = Envelope()
            env.ParseFromString(m.value())
            print(json.dumps({
                "topic": m.topic(),
                "partition": m.partition(),
                "offset": m.offset(),
                "key": m.key().decode() if m.key() is not None else None,
                "headers": [[k, v.hex()] for k, v in (m.headers() or [])],
                "envelope": plain(env),
            }), flush=True)
            seen += 1
    finally:
        consumer.close()
    if seen < a.count:
        print(f"decode_envelopes: read {seen} of {a.count} records from {a.topic} "
              f"in {a.timeout_s} s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
