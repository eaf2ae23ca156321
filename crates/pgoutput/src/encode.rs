//! Writing messages in pgoutput's format (the `encode` feature): for round
//! trip tests, fuzzing seeds and other crates' tests that need pgoutput
//! bytes.

use bytes::{BufMut, Bytes, BytesMut};

use crate::message::*;
use crate::time::PgTimestamp;
use crate::{ByteStr, DecodeOptions, Lsn};

impl Message {
    /// Appends the message exactly as PostgreSQL would send it.
    ///
    /// Messages with `xid: Some(..)` get the stream-block transaction id
    /// prefix; a [`StreamAbort`] with `abort_info` gets the protocol 4
    /// fields. Decode with [`Message::decode_options`] to read it back.
    ///
    /// Strings must not contain NUL bytes (PostgreSQL names cannot), and
    /// tuples and relations can have at most 65535 columns; otherwise the
    /// output does not decode back to the same message.
    ///
    /// # Examples
    ///
    /// ```
    /// use bytes::BytesMut;
    /// use walcast_pgoutput::{decode, Message};
    ///
    /// let msg = Message::StreamStop;
    /// let mut buf = BytesMut::new();
    /// msg.encode(&mut buf);
    /// assert_eq!(&buf[..], b"E");
    /// assert_eq!(decode(&buf.freeze(), &msg.decode_options(2)).unwrap(), msg);
    /// ```
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u8(self.kind().tag());
        match self {
            Message::Begin(m) => {
                lsn(out, m.final_lsn);
                ts(out, m.commit_time);
                out.put_u32(m.xid);
            }
            Message::Commit(m) => {
                out.put_u8(m.flags);
                lsn(out, m.commit_lsn);
                lsn(out, m.end_lsn);
                ts(out, m.commit_time);
            }
            Message::Origin(m) => {
                lsn(out, m.commit_lsn);
                cstr(out, &m.name);
            }
            Message::Relation(m) => {
                xid(out, m.xid);
                out.put_u32(m.rel_id);
                cstr(out, &m.namespace);
                cstr(out, &m.name);
                out.put_u8(m.replica_identity.as_byte());
                out.put_u16(m.columns.len() as u16);
                for c in &m.columns {
                    out.put_u8(c.flags);
                    cstr(out, &c.name);
                    out.put_u32(c.type_oid);
                    out.put_i32(c.type_modifier);
                }
            }
            Message::Type(m) => {
                xid(out, m.xid);
                out.put_u32(m.type_oid);
                cstr(out, &m.namespace);
                cstr(out, &m.name);
            }
            Message::Insert(m) => {
                xid(out, m.xid);
                out.put_u32(m.rel_id);
                out.put_u8(b'N');
                tuple(out, &m.new);
            }
            Message::Update(m) => {
                xid(out, m.xid);
                out.put_u32(m.rel_id);
                if let Some(old) = &m.old {
                    out.put_u8(old.marker());
                    tuple(out, old.tuple());
                }
                out.put_u8(b'N');
                tuple(out, &m.new);
            }
            Message::Delete(m) => {
                xid(out, m.xid);
                out.put_u32(m.rel_id);
                out.put_u8(m.old.marker());
                tuple(out, m.old.tuple());
            }
            Message::Truncate(m) => {
                xid(out, m.xid);
                out.put_u32(m.rel_ids.len() as u32);
                out.put_u8(m.options);
                for id in &m.rel_ids {
                    out.put_u32(*id);
                }
            }
            Message::Message(m) => {
                xid(out, m.xid);
                out.put_u8(m.flags);
                lsn(out, m.lsn);
                cstr(out, &m.prefix);
                out.put_u32(m.content.len() as u32);
                out.put_slice(&m.content);
            }
            Message::StreamStart(m) => {
                out.put_u32(m.xid);
                out.put_u8(u8::from(m.first_segment));
            }
            Message::StreamStop => {}
            Message::StreamCommit(m) => {
                out.put_u32(m.xid);
                out.put_u8(m.flags);
                lsn(out, m.commit_lsn);
                lsn(out, m.end_lsn);
                ts(out, m.commit_time);
            }
            Message::StreamAbort(m) => {
                out.put_u32(m.xid);
                out.put_u32(m.subxid);
                if let Some(info) = &m.abort_info {
                    lsn(out, info.abort_lsn);
                    ts(out, info.abort_time);
                }
            }
            Message::BeginPrepare(m) => {
                lsn(out, m.prepare_lsn);
                lsn(out, m.end_lsn);
                ts(out, m.prepare_time);
                out.put_u32(m.xid);
                cstr(out, &m.gid);
            }
            Message::Prepare(m) => {
                out.put_u8(m.flags);
                lsn(out, m.prepare_lsn);
                lsn(out, m.end_lsn);
                ts(out, m.prepare_time);
                out.put_u32(m.xid);
                cstr(out, &m.gid);
            }
            Message::CommitPrepared(m) => {
                out.put_u8(m.flags);
                lsn(out, m.commit_lsn);
                lsn(out, m.end_lsn);
                ts(out, m.commit_time);
                out.put_u32(m.xid);
                cstr(out, &m.gid);
            }
            Message::RollbackPrepared(m) => {
                out.put_u8(m.flags);
                lsn(out, m.prepare_end_lsn);
                lsn(out, m.rollback_end_lsn);
                ts(out, m.prepare_time);
                ts(out, m.rollback_time);
                out.put_u32(m.xid);
                cstr(out, &m.gid);
            }
            Message::StreamPrepare(m) => {
                out.put_u8(m.flags);
                lsn(out, m.prepare_lsn);
                lsn(out, m.end_lsn);
                ts(out, m.prepare_time);
                out.put_u32(m.xid);
                cstr(out, &m.gid);
            }
        }
    }

    /// The message's encoding in a new buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::new();
        self.encode(&mut out);
        out.freeze()
    }

    /// Options that decode this message's encoding back to it, for
    /// `proto_version` (raised to 4 for a Stream Abort with abort info).
    pub fn decode_options(&self, proto_version: u32) -> DecodeOptions {
        match self {
            Message::StreamAbort(StreamAbort {
                abort_info: Some(_),
                ..
            }) => DecodeOptions::new(proto_version.max(4)).with_parallel_streaming(true),
            _ => DecodeOptions::new(proto_version).with_in_stream(self.stream_xid().is_some()),
        }
    }
}

fn xid(out: &mut BytesMut, xid: Option<u32>) {
    if let Some(xid) = xid {
        out.put_u32(xid);
    }
}

fn lsn(out: &mut BytesMut, lsn: Lsn) {
    out.put_u64(lsn.as_u64());
}

fn ts(out: &mut BytesMut, ts: PgTimestamp) {
    out.put_i64(ts.pg_micros());
}

fn cstr(out: &mut BytesMut, s: &ByteStr) {
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

fn tuple(out: &mut BytesMut, t: &TupleData) {
    out.put_u16(t.columns.len() as u16);
    for c in &t.columns {
        out.put_u8(c.kind_byte());
        if let Some(data) = c.data() {
            out.put_u32(data.len() as u32);
            out.put_slice(data);
        }
    }
}
