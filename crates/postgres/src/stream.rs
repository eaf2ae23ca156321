//! Streamed in-progress transactions (`postgres.streaming`).
//!
//! With `proto_version 2` and `streaming 'on'`, Postgres sends a transaction
//! whose changes exceed its `logical_decoding_work_mem` while it is being
//! written, in blocks (Stream Start … Stream Stop) that may interleave with
//! other transactions, and ends it with Stream Commit or Stream Abort. Inside
//! a block every Relation, Type, Insert, Update, Delete, Truncate and Logical
//! Message carries the (sub)transaction id right after its tag.
//!
//! [`Streams`] holds each streamed transaction here until its Stream Commit,
//! then hands it to the relay as an ordinary transaction (Begin, its messages
//! in stream order without the transaction id, Commit), at the place of its
//! commit in the stream. So the relay sees what it sees without streaming:
//! whole transactions in commit order, only after they committed; its
//! ordering and acknowledgement rules do not change. The confirmed position
//! never passes a streamed transaction's commit before its events are
//! acknowledged, and a restart simply receives the transaction again (Postgres
//! decodes from the slot's restart point, which an open transaction holds back).
//!
//! Memory is bounded: held messages count against `stream_memory_bytes` (all
//! open transactions together). A transaction whose next message does not fit
//! continues in a spill file of its own, an unnamed temporary file in the
//! spill directory that the system deletes when it is closed (also when
//! walcast is killed), so a crash leaves nothing behind. Writes are buffered
//! and never synced: the file is a scratch copy of what the slot will send
//! again.
//!
//! Stream Abort drops the transaction (`subxid == xid`) or the changes of the
//! aborted subtransaction (each change names its subtransaction). Relation and
//! Type messages are kept on a subtransaction's abort: Postgres sends each
//! relation once per streamed transaction, and later changes of the same
//! transaction rely on it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use walcast_core::source::SourceEvent;
use walcast_core::{Error, Result};
use walcast_pgoutput::{decode, DecodeOptions, Lsn, Message};

/// Bytes counted per held message besides its data (its slot in the queue).
const ENTRY_OVERHEAD: u64 = 32;
/// Buffer of a spill file's writer and reader.
const SPILL_BUFFER: usize = 256 * 1024;

/// One message of a streamed transaction, without its transaction id.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// The (sub)transaction the message belongs to.
    xid: u32,
    wal_start: Lsn,
    /// The message as protocol version 1 has it (tag, then the body).
    data: Bytes,
}

impl Entry {
    fn cost(&self) -> u64 {
        self.data.len() as u64 + ENTRY_OVERHEAD
    }

    /// Relation and Type messages describe; they stay when a
    /// subtransaction aborts.
    fn describes(&self) -> bool {
        matches!(self.data.first(), Some(b'R' | b'Y'))
    }
}

#[derive(Debug)]
struct Spill {
    writer: BufWriter<File>,
    entries: u64,
    bytes: u64,
}

/// A streamed transaction not committed yet.
#[derive(Debug, Default)]
struct Streamed {
    /// Held in memory, in stream order (all before the spilled ones).
    held: Vec<Entry>,
    held_bytes: u64,
    /// Once set, every later message goes to the file.
    spill: Option<Spill>,
    /// Aborted subtransactions whose changes are in the file.
    aborted: HashSet<u32>,
}

/// A committed streamed transaction being handed to the relay.
#[derive(Debug)]
struct Replay {
    /// Begin, then held messages; the spilled ones and Commit follow.
    queue: VecDeque<SourceEvent>,
    file: Option<(BufReader<File>, u64)>,
    aborted: HashSet<u32>,
    commit: Option<SourceEvent>,
    /// Memory released when the replay ends.
    held_bytes: u64,
}

/// The held streamed transactions of one replication stream.
#[derive(Debug)]
pub(crate) struct Streams {
    limit_bytes: u64,
    dir: PathBuf,
    held_bytes: u64,
    open: HashMap<u32, Streamed>,
    /// The transaction of the current Stream Start … Stream Stop block.
    block: Option<u32>,
    replay: Option<Replay>,
}

/// What [`Streams::accept`] did with a message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Accepted {
    /// Not a streaming message: the caller handles it as usual.
    No,
    /// Held or acted upon; a committed transaction may now be ready
    /// ([`Streams::next`]).
    Yes,
}

impl Streams {
    /// Holds up to `limit_bytes` of messages in memory, then spills into
    /// unnamed files in `dir`.
    pub(crate) fn new(limit_bytes: u64, dir: PathBuf) -> Self {
        Streams {
            limit_bytes,
            dir,
            held_bytes: 0,
            open: HashMap::new(),
            block: None,
            replay: None,
        }
    }

    /// Bytes of messages held in memory.
    #[cfg(test)]
    pub(crate) fn held_bytes(&self) -> u64 {
        self.held_bytes
    }

    /// Takes a message of the replication stream if it belongs to streaming.
    pub(crate) fn accept(&mut self, wal_start: Lsn, data: &Bytes) -> Result<Accepted> {
        let Some(&tag) = data.first() else {
            return Ok(Accepted::No);
        };
        if let Some(xid) = self.block {
            match tag {
                b'E' => {
                    self.block = None;
                }
                b'R' | b'Y' | b'I' | b'U' | b'D' | b'T' | b'M' => {
                    let entry = strip_xid(wal_start, data)?;
                    self.hold(xid, entry)?;
                }
                // Origin: the relay does not use it.
                b'O' => {}
                other => {
                    return Err(protocol(format!(
                        "message {:?} inside the stream block of transaction {xid}",
                        char::from(other)
                    )))
                }
            }
            return Ok(Accepted::Yes);
        }
        match tag {
            b'S' => {
                let Message::StreamStart(start) = decode_v2(data, false)? else {
                    unreachable!("tag S decodes to StreamStart")
                };
                if start.first_segment {
                    if let Some(old) = self.open.remove(&start.xid) {
                        self.release(&old);
                    }
                    self.open.insert(start.xid, Streamed::default());
                } else if !self.open.contains_key(&start.xid) {
                    return Err(Error::retryable(format!(
                        "Postgres continued streamed transaction {} whose start this connection did not receive",
                        start.xid
                    ))
                    .with_hint("walcast reconnects and reads the transaction again from the slot; nothing was published from it"));
                }
                self.block = Some(start.xid);
            }
            b'E' => return Err(protocol("Stream Stop outside a stream block")),
            b'c' => {
                let Message::StreamCommit(commit) = decode_v2(data, false)? else {
                    unreachable!("tag c decodes to StreamCommit")
                };
                let streamed = self.open.remove(&commit.xid).ok_or_else(|| {
                    Error::retryable(format!(
                        "Stream Commit of transaction {} whose changes this connection did not receive",
                        commit.xid
                    ))
                    .with_hint("walcast reconnects and reads the transaction again from the slot; nothing was published from it")
                })?;
                self.replay = Some(self.replay_of(streamed, &commit)?);
            }
            b'A' => {
                let Message::StreamAbort(abort) = decode_v2(data, false)? else {
                    unreachable!("tag A decodes to StreamAbort")
                };
                if abort.subxid == abort.xid {
                    if let Some(old) = self.open.remove(&abort.xid) {
                        tracing::debug!(
                            xid = abort.xid,
                            "streamed transaction aborted; its changes are dropped"
                        );
                        self.release(&old);
                    }
                } else if let Some(t) = self.open.get_mut(&abort.xid) {
                    let before = t.held_bytes;
                    t.held.retain(|e| e.xid != abort.subxid || e.describes());
                    t.held_bytes = t.held.iter().map(Entry::cost).sum();
                    self.held_bytes -= before - t.held_bytes;
                    if t.spill.is_some() {
                        t.aborted.insert(abort.subxid);
                    }
                }
            }
            _ => return Ok(Accepted::No),
        }
        Ok(Accepted::Yes)
    }

    /// The next event of a committed streamed transaction, if one is being
    /// handed over. Synchronous, so a cancelled caller loses nothing.
    pub(crate) fn next(&mut self) -> Result<Option<SourceEvent>> {
        let Some(r) = self.replay.as_mut() else {
            return Ok(None);
        };
        if let Some(ev) = r.queue.pop_front() {
            return Ok(Some(ev));
        }
        if let Some((reader, left)) = r.file.as_mut() {
            while *left > 0 {
                *left -= 1;
                let entry = read_entry(reader).map_err(|e| spill_error(&self.dir, e))?;
                if r.aborted.contains(&entry.xid) && !entry.describes() {
                    continue;
                }
                return to_event(entry).map(Some);
            }
            r.file = None;
        }
        let commit = r.commit.take();
        if commit.is_none() {
            let done = self.replay.take().expect("a replay is in progress");
            self.held_bytes -= done.held_bytes;
        }
        Ok(commit)
    }

    fn hold(&mut self, top: u32, entry: Entry) -> Result<()> {
        let t = self
            .open
            .get_mut(&top)
            .ok_or_else(|| protocol(format!("a change of transaction {top} outside its stream")))?;
        let cost = entry.cost();
        if t.spill.is_none() && self.held_bytes + cost <= self.limit_bytes {
            self.held_bytes += cost;
            t.held_bytes += cost;
            t.held.push(entry);
            return Ok(());
        }
        let dir = &self.dir;
        if t.spill.is_none() {
            let file = tempfile::tempfile_in(dir).map_err(|e| spill_error(dir, e))?;
            tracing::info!(
                xid = top,
                held_bytes = self.held_bytes,
                dir = %dir.display(),
                "a streamed transaction exceeds postgres.stream_memory_bytes: its further changes go to a spill file until it commits or aborts"
            );
            t.spill = Some(Spill {
                writer: BufWriter::with_capacity(SPILL_BUFFER, file),
                entries: 0,
                bytes: 0,
            });
        }
        let spill = t.spill.as_mut().expect("set above");
        write_entry(&mut spill.writer, &entry).map_err(|e| spill_error(dir, e))?;
        spill.entries += 1;
        spill.bytes += cost;
        Ok(())
    }

    fn release(&mut self, t: &Streamed) {
        self.held_bytes -= t.held_bytes;
    }

    fn replay_of(
        &mut self,
        t: Streamed,
        commit: &walcast_pgoutput::StreamCommit,
    ) -> Result<Replay> {
        let commit_time_micros = commit.commit_time.pg_micros();
        let mut queue = VecDeque::with_capacity(t.held.len() + 1);
        queue.push_back(SourceEvent::Begin {
            final_lsn: commit.commit_lsn,
            xid: commit.xid,
            commit_time_micros,
        });
        for e in t.held {
            queue.push_back(to_event(e)?);
        }
        let file = match t.spill {
            None => None,
            Some(spill) => {
                let dir = &self.dir;
                let mut file = spill
                    .writer
                    .into_inner()
                    .map_err(|e| spill_error(dir, e.into_error()))?;
                file.seek(SeekFrom::Start(0))
                    .map_err(|e| spill_error(dir, e))?;
                tracing::info!(
                    xid = commit.xid,
                    spilled_changes = spill.entries,
                    spilled_bytes = spill.bytes,
                    "streamed transaction committed; handing over its spilled changes"
                );
                Some((BufReader::with_capacity(SPILL_BUFFER, file), spill.entries))
            }
        };
        Ok(Replay {
            queue,
            file,
            aborted: t.aborted,
            commit: Some(SourceEvent::Commit {
                commit_lsn: commit.commit_lsn,
                end_lsn: commit.end_lsn,
                commit_time_micros,
            }),
            held_bytes: t.held_bytes,
        })
    }
}

fn decode_v2(data: &Bytes, in_stream: bool) -> Result<Message> {
    decode(data, &DecodeOptions::new(2).with_in_stream(in_stream))
        .map_err(|e| protocol(format!("cannot decode a streaming message: {e}")))
}

/// The message without the transaction id that follows its tag.
fn strip_xid(wal_start: Lsn, data: &Bytes) -> Result<Entry> {
    if data.len() < 5 {
        return Err(protocol(format!(
            "a {:?} message inside a stream block is {} bytes, too short for its transaction id",
            char::from(data[0]),
            data.len()
        )));
    }
    let xid = u32::from_be_bytes([data[1], data[2], data[3], data[4]]);
    let mut v1 = BytesMut::with_capacity(data.len() - 4);
    v1.extend_from_slice(&data[..1]);
    v1.extend_from_slice(&data[5..]);
    Ok(Entry {
        xid,
        wal_start,
        data: v1.freeze(),
    })
}

/// A held message as the relay receives it.
fn to_event(e: Entry) -> Result<SourceEvent> {
    if e.data.first() != Some(&b'M') {
        return Ok(SourceEvent::Data {
            wal_start: e.wal_start,
            data: e.data,
        });
    }
    message_event(&e.data)
}

/// A Logical Message (protocol 1 layout) as the relay receives it.
pub(crate) fn message_event(data: &Bytes) -> Result<SourceEvent> {
    match decode(data, &DecodeOptions::new(1)) {
        Ok(Message::Message(m)) => Ok(SourceEvent::Message {
            transactional: m.flags & walcast_pgoutput::LogicalMessage::FLAG_TRANSACTIONAL != 0,
            lsn: m.lsn,
            prefix: m.prefix.to_string(),
            content: m.content,
        }),
        Ok(other) => Err(protocol(format!(
            "expected a Logical Message, decoded {other:?}"
        ))),
        Err(e) => Err(protocol(format!("cannot decode a Logical Message: {e}"))),
    }
}

fn write_entry(w: &mut impl Write, e: &Entry) -> std::io::Result<()> {
    w.write_all(&e.xid.to_be_bytes())?;
    w.write_all(&e.wal_start.as_u64().to_be_bytes())?;
    w.write_all(&(e.data.len() as u64).to_be_bytes())?;
    w.write_all(&e.data)
}

fn read_entry(r: &mut impl Read) -> std::io::Result<Entry> {
    let mut head = [0u8; 20];
    r.read_exact(&mut head)?;
    let xid = u32::from_be_bytes(head[0..4].try_into().expect("4 bytes"));
    let wal_start = Lsn::new(u64::from_be_bytes(head[4..12].try_into().expect("8 bytes")));
    let len = u64::from_be_bytes(head[12..20].try_into().expect("8 bytes"));
    let mut data = vec![0u8; usize::try_from(len).map_err(std::io::Error::other)?];
    r.read_exact(&mut data)?;
    Ok(Entry {
        xid,
        wal_start,
        data: Bytes::from(data),
    })
}

fn spill_error(dir: &Path, e: std::io::Error) -> Error {
    Error::operator(format!(
        "the spill file of a streamed transaction in {} failed: {e}",
        dir.display()
    ))
    .with_hint("free space in that directory (or point pipeline.state_dir elsewhere), or raise postgres.stream_memory_bytes, then start walcast again: nothing of the transaction was published, and it resumes from the slot")
}

fn protocol(msg: impl std::fmt::Display) -> Error {
    Error::permanent(format!("replication stream out of protocol order: {msg}"))
        .with_hint("this is a bug or a server/protocol mismatch; report it with the log. Nothing was skipped: the slot was not advanced past the problem")
}

#[cfg(test)]
mod tests {
    use super::*;
    use walcast_pgoutput::{
        ColumnValue, Insert, LogicalMessage, PgTimestamp, Relation, ReplicaIdentity, StreamAbort,
        StreamCommit, StreamStart, TupleData,
    };

    const TOP: u32 = 700;

    fn start(xid: u32, first: bool) -> Bytes {
        Message::StreamStart(StreamStart {
            xid,
            first_segment: first,
        })
        .to_bytes()
    }

    fn stop() -> Bytes {
        Message::StreamStop.to_bytes()
    }

    fn relation(xid: u32) -> Bytes {
        Message::Relation(Relation {
            xid: Some(xid),
            rel_id: 42,
            namespace: "public".into(),
            name: "outbox".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![],
        })
        .to_bytes()
    }

    fn insert(xid: Option<u32>, n: u32) -> Bytes {
        Message::Insert(Insert {
            xid,
            rel_id: 42,
            new: TupleData::new(vec![ColumnValue::Text(Bytes::from(n.to_string()))]),
        })
        .to_bytes()
    }

    fn commit(xid: u32, commit_lsn: u64) -> Bytes {
        Message::StreamCommit(StreamCommit {
            xid,
            flags: 0,
            commit_lsn: Lsn::new(commit_lsn),
            end_lsn: Lsn::new(commit_lsn + 8),
            commit_time: PgTimestamp::from_pg_micros(5),
        })
        .to_bytes()
    }

    fn abort(xid: u32, subxid: u32) -> Bytes {
        Message::StreamAbort(StreamAbort {
            xid,
            subxid,
            abort_info: None,
        })
        .to_bytes()
    }

    fn feed(s: &mut Streams, msgs: &[Bytes]) {
        for (i, m) in msgs.iter().enumerate() {
            assert_eq!(
                s.accept(Lsn::new(100 + i as u64), m).unwrap(),
                Accepted::Yes,
                "message {i}"
            );
        }
    }

    /// What the relay receives: B(xid), R, I(n)…, M(prefix), C(end).
    fn drain(s: &mut Streams) -> Vec<String> {
        let mut out = vec![];
        while let Some(ev) = s.next().unwrap() {
            out.push(match ev {
                SourceEvent::Begin { xid, final_lsn, .. } => format!("B{xid}@{final_lsn}"),
                SourceEvent::Commit { end_lsn, .. } => format!("C@{end_lsn}"),
                SourceEvent::Message { prefix, .. } => format!("M{prefix}"),
                SourceEvent::Data { data, .. } => {
                    match decode(&data, &DecodeOptions::new(1)).unwrap() {
                        Message::Relation(r) => format!("R{}", r.rel_id),
                        Message::Insert(i) => match &i.new.columns[0] {
                            ColumnValue::Text(t) => format!("I{}", String::from_utf8_lossy(t)),
                            other => panic!("{other:?}"),
                        },
                        other => panic!("{other:?}"),
                    }
                }
                other => panic!("{other:?}"),
            });
        }
        out
    }

    fn streams(limit: u64) -> (Streams, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        (Streams::new(limit, dir.path().to_path_buf()), dir)
    }

    #[test]
    fn a_committed_stream_is_handed_over_as_one_transaction_without_xids() {
        let (mut s, _dir) = streams(1 << 20);
        feed(
            &mut s,
            &[
                start(TOP, true),
                relation(TOP),
                insert(Some(TOP), 1),
                stop(),
            ],
        );
        // Another block of the same transaction later on.
        feed(&mut s, &[start(TOP, false), insert(Some(TOP), 2), stop()]);
        assert_eq!(
            s.next().unwrap().map(|_| ()),
            None,
            "nothing before the commit"
        );
        feed(&mut s, &[commit(TOP, 0x1000)]);
        assert_eq!(
            drain(&mut s),
            ["B700@0/1000", "R42", "I1", "I2", "C@0/1008"]
        );
        assert_eq!(s.held_bytes(), 0);
    }

    #[test]
    fn messages_outside_streams_are_left_to_the_caller() {
        let (mut s, _dir) = streams(1 << 20);
        assert_eq!(
            s.accept(Lsn::new(1), &insert(None, 1)).unwrap(),
            Accepted::No
        );
        let begin = Message::Begin(walcast_pgoutput::Begin {
            final_lsn: Lsn::new(9),
            commit_time: PgTimestamp::from_pg_micros(1),
            xid: 3,
        })
        .to_bytes();
        assert_eq!(s.accept(Lsn::new(1), &begin).unwrap(), Accepted::No);
    }

    #[test]
    fn an_aborted_stream_is_dropped_and_a_subtransaction_abort_drops_only_its_changes() {
        let (mut s, _dir) = streams(1 << 20);
        feed(
            &mut s,
            &[start(TOP, true), relation(TOP), insert(Some(TOP), 1)],
        );
        // Subtransaction 701 sent the relation: it stays when 701 aborts.
        feed(
            &mut s,
            &[
                insert(Some(701), 2),
                relation(701),
                insert(Some(702), 3),
                stop(),
            ],
        );
        feed(&mut s, &[start(800, true), insert(Some(800), 9), stop()]);
        feed(
            &mut s,
            &[abort(TOP, 701), abort(800, 800), commit(TOP, 0x2000)],
        );
        assert_eq!(
            drain(&mut s),
            ["B700@0/2000", "R42", "I1", "R42", "I3", "C@0/2008"]
        );
        assert_eq!(s.held_bytes(), 0, "the aborted stream's memory is released");
        assert!(
            s.accept(Lsn::new(1), &commit(800, 1)).is_err(),
            "800 is gone"
        );
    }

    #[test]
    fn past_the_memory_bound_changes_spill_and_come_back_in_order() {
        // Room for about two held messages.
        let (mut s, dir) = streams(2 * (ENTRY_OVERHEAD + 40));
        let mut msgs = vec![start(TOP, true), relation(TOP)];
        for n in 0..50u32 {
            // Subtransaction 701 holds every third change; it aborts.
            let xid = if n % 3 == 0 { 701 } else { TOP };
            msgs.push(insert(Some(xid), n));
        }
        msgs.push(stop());
        feed(&mut s, &msgs);
        assert!(s.held_bytes() <= 2 * (ENTRY_OVERHEAD + 40));
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "spill files have no name"
        );
        feed(&mut s, &[abort(TOP, 701), commit(TOP, 0x3000)]);
        let mut want = vec!["B700@0/3000".to_string(), "R42".into()];
        want.extend((0..50).filter(|n| n % 3 != 0).map(|n| format!("I{n}")));
        want.push("C@0/3008".into());
        assert_eq!(drain(&mut s), want);
        assert_eq!(s.held_bytes(), 0);
    }

    #[test]
    fn interleaved_streams_commit_in_their_own_order_with_their_messages() {
        let (mut s, _dir) = streams(1 << 20);
        let msg = Message::Message(LogicalMessage {
            xid: Some(TOP),
            flags: LogicalMessage::FLAG_TRANSACTIONAL,
            lsn: Lsn::new(7),
            prefix: "orders".into(),
            content: Bytes::from_static(b"{}"),
        })
        .to_bytes();
        feed(&mut s, &[start(TOP, true), relation(TOP), msg, stop()]);
        feed(
            &mut s,
            &[
                start(900, true),
                relation(900),
                insert(Some(900), 5),
                stop(),
            ],
        );
        feed(&mut s, &[commit(900, 0x4000)]);
        assert_eq!(drain(&mut s), ["B900@0/4000", "R42", "I5", "C@0/4008"]);
        feed(&mut s, &[commit(TOP, 0x5000)]);
        assert_eq!(drain(&mut s), ["B700@0/5000", "R42", "Morders", "C@0/5008"]);
    }

    #[test]
    fn a_spill_file_that_cannot_be_created_stops_with_an_operator_error() {
        let mut s = Streams::new(1, PathBuf::from("/nonexistent/walcast-spill"));
        feed(&mut s, &[start(TOP, true)]);
        let e = s
            .accept(Lsn::new(1), &insert(Some(TOP), 1))
            .expect_err("no room in memory, no spill file");
        assert_eq!(e.kind(), walcast_core::ErrorKind::OperatorAction, "{e}");
        assert!(e.to_string().contains("/nonexistent/walcast-spill"), "{e}");
    }

    #[test]
    fn a_continued_stream_this_connection_did_not_start_is_refused() {
        let (mut s, _dir) = streams(1 << 20);
        let e = s.accept(Lsn::new(1), &start(TOP, false)).unwrap_err();
        assert!(e.to_string().contains("did not receive"), "{e}");
        let e = s.accept(Lsn::new(1), &commit(TOP, 1)).unwrap_err();
        assert!(e.to_string().contains("did not receive"), "{e}");
    }
}
