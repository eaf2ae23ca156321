//! Decodes the pgoutput messages captured from real PostgreSQL 15 and 17
//! servers (tests/fixtures/pg*/, made by tests/fixtures/capture.sh) and
//! checks what they say.
//!
//! Each fixture file is one scenario captured with one set of pgoutput
//! options (`<scenario>.<profile>.hex`). A small replayer feeds every file
//! through a [`Decoder`] and a [`RelationCache`], checks the protocol's
//! framing (transactions, stream blocks, LSNs) and rebuilds the committed
//! transactions with their changes as plain strings, which the scenario
//! tests compare across protocol versions and servers.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use walcast_pgoutput::*;

const MAJORS: [&str; 2] = ["pg15", "pg17"];

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[derive(Debug)]
struct Fixture {
    name: String,
    headers: BTreeMap<String, String>,
    options: BTreeMap<String, String>,
    rows: Vec<(Lsn, Bytes)>,
}

impl Fixture {
    fn load(path: &Path) -> Fixture {
        let text = std::fs::read_to_string(path).unwrap();
        let mut headers = BTreeMap::new();
        let mut rows = Vec::new();
        for line in text.lines() {
            if let Some(h) = line.strip_prefix("# ") {
                let (k, v) = h.split_once('=').unwrap();
                headers.insert(k.to_string(), v.trim().to_string());
            } else if !line.is_empty() {
                let (lsn, hex) = line.split_once('\t').unwrap();
                rows.push((lsn.parse().unwrap(), Bytes::from(unhex(hex))));
            }
        }
        let options = headers["options"]
            .split_whitespace()
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect();
        let name = path
            .strip_prefix(fixtures_dir())
            .unwrap()
            .display()
            .to_string();
        Fixture {
            name,
            headers,
            options,
            rows,
        }
    }

    fn proto_version(&self) -> u32 {
        self.options["proto_version"].parse().unwrap()
    }

    fn binary(&self) -> bool {
        self.options.get("binary").map(String::as_str) == Some("true")
    }

    fn streaming(&self) -> bool {
        matches!(
            self.options.get("streaming").map(String::as_str),
            Some("on" | "parallel")
        )
    }

    fn decoder(&self) -> Decoder {
        Decoder::new(self.proto_version()).parallel_streaming(
            self.options.get("streaming").map(String::as_str) == Some("parallel"),
        )
    }

    fn server_version_num(&self) -> u32 {
        self.headers["server_version_num"].parse().unwrap()
    }
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn all_fixtures() -> Vec<Fixture> {
    let mut out = Vec::new();
    for major in MAJORS {
        let mut paths: Vec<_> = std::fs::read_dir(fixtures_dir().join(major))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "hex"))
            .collect();
        paths.sort();
        out.extend(paths.iter().map(|p| Fixture::load(p)));
    }
    assert!(out.len() > 40, "fixtures missing: {}", out.len());
    out
}

fn fixtures(scenario: &str) -> Vec<Fixture> {
    let v: Vec<_> = all_fixtures()
        .into_iter()
        .filter(|f| f.headers["scenario"] == scenario)
        .collect();
    assert!(!v.is_empty(), "no fixture for {scenario}");
    v
}

/// A change rendered as plain text, e.g.
/// `INSERT public.acct id=1 owner=ann balance=100`.
type Change = String;

#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Committed,
    CommitPrepared(String),
    RollbackPrepared(String),
    Aborted,
}

#[derive(Debug, Clone)]
struct Txn {
    xid: u32,
    streamed: bool,
    blocks: usize,
    gid: Option<String>,
    origin: Option<(Lsn, String)>,
    commit_lsn: Lsn,
    end_lsn: Lsn,
    commit_time: PgTimestamp,
    outcome: Outcome,
    /// Changes with the stream-block xid prefix they came with (0 outside
    /// streams).
    changes: Vec<(u32, Change)>,
}

impl Txn {
    fn new(xid: u32) -> Txn {
        Txn {
            xid,
            streamed: false,
            blocks: 0,
            gid: None,
            origin: None,
            commit_lsn: Lsn::ZERO,
            end_lsn: Lsn::ZERO,
            commit_time: PgTimestamp::POSTGRES_EPOCH,
            outcome: Outcome::Committed,
            changes: Vec::new(),
        }
    }

    fn change_texts(&self) -> Vec<String> {
        self.changes.iter().map(|(_, c)| c.clone()).collect()
    }
}

#[derive(Debug, Default)]
struct Replay {
    messages: Vec<(Lsn, Message)>,
    /// Transactions in the order they finished (committed, rolled back or
    /// aborted), with their outcome.
    finished: Vec<Txn>,
    /// Non-transactional logical messages, outside any transaction.
    non_transactional: Vec<Change>,
    relations_seen: Vec<Relation>,
    types_seen: Vec<Type>,
    stream_aborts: Vec<StreamAbort>,
    subxact_aborts: usize,
}

impl Replay {
    fn committed(&self) -> Vec<&Txn> {
        self.finished
            .iter()
            .filter(|t| matches!(t.outcome, Outcome::Committed | Outcome::CommitPrepared(_)))
            .collect()
    }

    fn committed_changes(&self) -> Vec<Vec<String>> {
        self.committed().iter().map(|t| t.change_texts()).collect()
    }
}

/// A value as text; long values are shortened to their first 8 characters
/// and length, e.g. `xxxxxxxx…(10000)`.
fn render(v: &Value) -> String {
    let s = render_full(v);
    if s.chars().count() > 64 {
        format!("{}…({})", s.chars().take(8).collect::<String>(), s.len())
    } else {
        s
    }
}

fn render_full(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::UnchangedToast => "<unchanged-toast>".into(),
        Value::Bool(b) => b.to_string(),
        Value::Int2(i) => i.to_string(),
        Value::Int4(i) => i.to_string(),
        Value::Int8(i) => i.to_string(),
        Value::Text(s) => s.to_string(),
        Value::Uuid(u) => u.to_string(),
        Value::Json(s) => s.to_string(),
        Value::Bytea(b) => {
            let mut s = String::from("\\x");
            for byte in b.iter() {
                write!(s, "{byte:02x}").unwrap();
            }
            s
        }
        Value::Timestamp(t) => format!("ts:{t}"),
        Value::TimestampTz(t) => format!("tstz:{t}"),
        Value::Other { text, .. } => text.to_string(),
        Value::OtherBinary { data, .. } => {
            let mut s = String::from("bin:");
            for byte in data.iter() {
                write!(s, "{byte:02x}").unwrap();
            }
            s
        }
        other => format!("{other:?}"),
    }
}

fn render_row(row: &Row<'_>) -> String {
    let mut s = String::new();
    for i in 0..row.len() {
        let (col, _) = row.column(i).unwrap();
        let v = row
            .value_at(i)
            .unwrap_or_else(|e| panic!("column {}: {e}", col.name));
        if !s.is_empty() {
            s.push(' ');
        }
        write!(s, "{}={}", col.name, render(&v)).unwrap();
    }
    s
}

/// Feeds a fixture through a Decoder and a RelationCache, checking the
/// protocol's framing as it goes.
fn replay(f: &Fixture) -> Replay {
    let mut decoder = f.decoder();
    let mut cache = RelationCache::new();
    let mut out = Replay::default();
    let mut open: Option<Txn> = None;
    let mut streams: HashMap<u32, Txn> = HashMap::new();
    let mut block: Option<u32> = None;
    let mut prepared: HashMap<String, Txn> = HashMap::new();
    let mut last_end = Lsn::ZERO;
    let ctx = |i: usize| format!("{} message #{i}", f.name);

    for (i, (row_lsn, bytes)) in f.rows.iter().enumerate() {
        let msg = decoder
            .decode(bytes)
            .unwrap_or_else(|e| panic!("{}: {e}", ctx(i)));
        // The decoder's encoding is byte-exact.
        #[cfg(feature = "encode")]
        assert_eq!(&msg.to_bytes(), bytes, "{}: re-encoding differs", ctx(i));

        // Inside a stream block exactly the xid-carrying messages carry one.
        if msg.kind().has_stream_xid() {
            assert_eq!(msg.stream_xid().is_some(), block.is_some(), "{}", ctx(i));
        }
        cache.apply(&msg);

        let change = match &msg {
            Message::Insert(m) => {
                let row = cache
                    .insert_row(m)
                    .unwrap_or_else(|e| panic!("{}: {e}", ctx(i)));
                Some(format!(
                    "INSERT {} {}",
                    row.relation().qualified_name(),
                    render_row(&row)
                ))
            }
            Message::Update(m) => {
                let (old, new) = cache
                    .update_rows(m)
                    .unwrap_or_else(|e| panic!("{}: {e}", ctx(i)));
                let old = match (&m.old, old) {
                    (Some(OldTuple::Key(_)), Some(row)) => format!(" KEY[{}]", render_row(&row)),
                    (Some(OldTuple::Full(_)), Some(row)) => format!(" OLD[{}]", render_row(&row)),
                    _ => String::new(),
                };
                Some(format!(
                    "UPDATE {}{old} {}",
                    new.relation().qualified_name(),
                    render_row(&new)
                ))
            }
            Message::Delete(m) => {
                let row = cache
                    .delete_row(m)
                    .unwrap_or_else(|e| panic!("{}: {e}", ctx(i)));
                let kind = match m.old {
                    OldTuple::Key(_) => "KEY",
                    OldTuple::Full(_) => "OLD",
                };
                Some(format!(
                    "DELETE {} {kind}[{}]",
                    row.relation().qualified_name(),
                    render_row(&row)
                ))
            }
            Message::Truncate(m) => {
                let mut names: Vec<String> = m
                    .rel_ids
                    .iter()
                    .map(|id| cache.get(*id).unwrap().qualified_name())
                    .collect();
                names.sort();
                Some(format!(
                    "TRUNCATE {}{}{}",
                    names.join(","),
                    if m.cascade() { " CASCADE" } else { "" },
                    if m.restart_identity() {
                        " RESTART IDENTITY"
                    } else {
                        ""
                    }
                ))
            }
            Message::Message(m) => {
                let text = format!(
                    "MESSAGE {} {} {:?}",
                    if m.is_transactional() { "tx" } else { "non-tx" },
                    m.prefix,
                    String::from_utf8_lossy(&m.content)
                );
                assert!(
                    m.lsn <= *row_lsn || !m.is_transactional() || block.is_some(),
                    "{}",
                    ctx(i)
                );
                if !m.is_transactional() {
                    assert!(open.is_none() && block.is_none(), "{}", ctx(i));
                    assert_eq!(m.lsn, *row_lsn, "{}", ctx(i));
                    out.non_transactional.push(text);
                    None
                } else {
                    Some(text)
                }
            }
            Message::Relation(r) => {
                out.relations_seen.push(r.clone());
                None
            }
            Message::Type(t) => {
                out.types_seen.push(t.clone());
                None
            }
            Message::Begin(b) => {
                assert!(open.is_none() && block.is_none(), "{}", ctx(i));
                let mut t = Txn::new(b.xid);
                t.commit_lsn = b.final_lsn;
                t.commit_time = b.commit_time;
                open = Some(t);
                None
            }
            Message::BeginPrepare(b) => {
                assert!(open.is_none() && block.is_none(), "{}", ctx(i));
                let mut t = Txn::new(b.xid);
                t.gid = Some(b.gid.to_string());
                t.commit_lsn = b.prepare_lsn;
                t.end_lsn = b.end_lsn;
                open = Some(t);
                None
            }
            Message::Origin(o) => {
                open.as_mut().expect("Origin outside a transaction").origin =
                    Some((o.commit_lsn, o.name.to_string()));
                None
            }
            Message::Commit(c) => {
                let mut t = open
                    .take()
                    .unwrap_or_else(|| panic!("{}: Commit without Begin", ctx(i)));
                assert_eq!(t.commit_lsn, c.commit_lsn, "{}: Begin.final_lsn", ctx(i));
                assert_eq!(t.commit_time, c.commit_time, "{}", ctx(i));
                assert!(c.commit_lsn < c.end_lsn, "{}", ctx(i));
                assert_eq!(
                    c.end_lsn,
                    *row_lsn,
                    "{}: Commit row LSN is its end_lsn",
                    ctx(i)
                );
                assert_eq!(c.flags, 0);
                t.end_lsn = c.end_lsn;
                assert!(t.end_lsn > last_end, "{}: commit order", ctx(i));
                last_end = t.end_lsn;
                out.finished.push(t);
                None
            }
            Message::Prepare(p) => {
                let mut t = open
                    .take()
                    .unwrap_or_else(|| panic!("{}: Prepare without Begin Prepare", ctx(i)));
                assert_eq!(Some(p.gid.to_string()), t.gid, "{}", ctx(i));
                assert_eq!(
                    (p.prepare_lsn, p.end_lsn, p.xid),
                    (t.commit_lsn, t.end_lsn, t.xid)
                );
                assert_eq!(p.end_lsn, *row_lsn, "{}", ctx(i));
                t.commit_time = p.prepare_time;
                prepared.insert(p.gid.to_string(), t);
                None
            }
            Message::StreamPrepare(p) => {
                assert!(block.is_none(), "{}", ctx(i));
                let mut t = streams
                    .remove(&p.xid)
                    .unwrap_or_else(|| panic!("{}: unknown stream", ctx(i)));
                t.gid = Some(p.gid.to_string());
                t.commit_lsn = p.prepare_lsn;
                t.end_lsn = p.end_lsn;
                t.commit_time = p.prepare_time;
                assert!(p.prepare_lsn < p.end_lsn);
                prepared.insert(p.gid.to_string(), t);
                None
            }
            Message::CommitPrepared(c) => {
                let mut t = prepared
                    .remove(c.gid.as_str())
                    .unwrap_or_else(|| panic!("{}: unknown gid", ctx(i)));
                assert_eq!(t.xid, c.xid);
                assert!(
                    c.commit_lsn >= t.end_lsn && c.end_lsn > c.commit_lsn,
                    "{}",
                    ctx(i)
                );
                assert_eq!(c.end_lsn, *row_lsn, "{}", ctx(i));
                t.outcome = Outcome::CommitPrepared(c.gid.to_string());
                t.commit_lsn = c.commit_lsn;
                t.end_lsn = c.end_lsn;
                assert!(t.end_lsn > last_end, "{}: commit order", ctx(i));
                last_end = t.end_lsn;
                out.finished.push(t);
                None
            }
            Message::RollbackPrepared(r) => {
                let mut t = prepared
                    .remove(r.gid.as_str())
                    .unwrap_or_else(|| panic!("{}: unknown gid", ctx(i)));
                assert_eq!(
                    (t.xid, t.end_lsn, t.commit_time),
                    (r.xid, r.prepare_end_lsn, r.prepare_time)
                );
                assert!(r.rollback_end_lsn > r.prepare_end_lsn);
                t.outcome = Outcome::RollbackPrepared(r.gid.to_string());
                out.finished.push(t);
                None
            }
            Message::StreamStart(s) => {
                assert!(f.streaming(), "{}: stream without streaming option", ctx(i));
                assert!(open.is_none() && block.is_none(), "{}", ctx(i));
                let new = !streams.contains_key(&s.xid);
                assert_eq!(s.first_segment, new, "{}: first_segment", ctx(i));
                let t = streams.entry(s.xid).or_insert_with(|| Txn::new(s.xid));
                t.streamed = true;
                t.blocks += 1;
                block = Some(s.xid);
                None
            }
            Message::StreamStop => {
                assert!(
                    block.take().is_some(),
                    "{}: Stream Stop outside a block",
                    ctx(i)
                );
                None
            }
            Message::StreamCommit(c) => {
                assert!(block.is_none(), "{}", ctx(i));
                let mut t = streams
                    .remove(&c.xid)
                    .unwrap_or_else(|| panic!("{}: unknown stream", ctx(i)));
                assert!(c.commit_lsn < c.end_lsn);
                assert_eq!(c.end_lsn, *row_lsn, "{}", ctx(i));
                t.commit_lsn = c.commit_lsn;
                t.end_lsn = c.end_lsn;
                t.commit_time = c.commit_time;
                assert!(t.end_lsn > last_end, "{}: commit order", ctx(i));
                last_end = t.end_lsn;
                out.finished.push(t);
                None
            }
            Message::StreamAbort(a) => {
                assert!(block.is_none(), "{}", ctx(i));
                let parallel = f.options.get("streaming").map(String::as_str) == Some("parallel");
                assert_eq!(
                    a.abort_info.is_some(),
                    parallel && f.proto_version() >= 4,
                    "{}",
                    ctx(i)
                );
                if let Some(info) = &a.abort_info {
                    assert_eq!(info.abort_lsn, *row_lsn, "{}", ctx(i));
                }
                out.stream_aborts.push(a.clone());
                if a.xid == a.subxid {
                    let mut t = streams
                        .remove(&a.xid)
                        .unwrap_or_else(|| panic!("{}: unknown stream", ctx(i)));
                    t.outcome = Outcome::Aborted;
                    out.finished.push(t);
                } else {
                    out.subxact_aborts += 1;
                    let t = streams
                        .get_mut(&a.xid)
                        .unwrap_or_else(|| panic!("{}: unknown stream", ctx(i)));
                    let before = t.changes.len();
                    t.changes.retain(|(xid, _)| *xid != a.subxid);
                    assert!(
                        t.changes.len() < before,
                        "{}: subxact had no changes",
                        ctx(i)
                    );
                }
                None
            }
            other => panic!("{}: unexpected {other:?}", ctx(i)),
        };
        if let Some(change) = change {
            match (block, open.as_mut()) {
                (Some(top), None) => streams
                    .get_mut(&top)
                    .unwrap()
                    .changes
                    .push((msg.stream_xid().unwrap(), change)),
                (None, Some(t)) => t.changes.push((0, change)),
                _ => panic!("{}: change outside a transaction", ctx(i)),
            }
        }
        out.messages.push((*row_lsn, msg));
    }
    assert!(open.is_none(), "{}: transaction left open", f.name);
    assert!(block.is_none(), "{}: stream block left open", f.name);
    assert!(
        streams.is_empty(),
        "{}: streamed transaction never ended",
        f.name
    );
    assert!(
        prepared.is_empty(),
        "{}: prepared transaction never ended",
        f.name
    );
    out
}

// ---------------------------------------------------------------- general

#[test]
fn every_fixture_decodes_and_replays() {
    let all = all_fixtures();
    let mut by_version: BTreeMap<(String, u32), usize> = BTreeMap::new();
    let mut messages = 0;
    let mut kinds = std::collections::HashSet::new();
    for f in &all {
        assert!(!f.rows.is_empty(), "{} is empty", f.name);
        let r = replay(f);
        messages += r.messages.len();
        kinds.extend(r.messages.iter().map(|(_, m)| m.kind()));
        let major = f.name.split('/').next().unwrap().to_string();
        *by_version.entry((major, f.proto_version())).or_default() += 1;
    }
    eprintln!(
        "{} fixture files, {messages} messages: {by_version:?}",
        all.len()
    );
    // Every message kind PostgreSQL can send appears in some fixture.
    for kind in MessageKind::ALL {
        assert!(kinds.contains(&kind), "no fixture has a {kind} message");
    }
    for major in MAJORS {
        for v in 1..=3 {
            assert!(
                by_version.contains_key(&(major.to_string(), v)),
                "{major} v{v}"
            );
        }
    }
    assert!(by_version.contains_key(&("pg17".to_string(), 4)));
}

#[test]
fn headers_match_the_directory() {
    for f in all_fixtures() {
        let major = f.server_version_num() / 10000;
        assert!(f.name.starts_with(&format!("pg{major}/")), "{}", f.name);
        assert!(
            f.name.contains(&format!(".v{}", f.proto_version())),
            "{}",
            f.name
        );
    }
}

/// The same scenario gives the same committed changes whatever the
/// protocol version and streaming mode, on both servers (text format).
#[test]
fn text_profiles_agree_across_versions_and_servers() {
    type Runs = Vec<(String, Vec<Vec<String>>)>;
    let mut by_scenario: BTreeMap<String, Runs> = BTreeMap::new();
    for f in all_fixtures().iter().filter(|f| !f.binary()) {
        let r = replay(f);
        by_scenario
            .entry(f.headers["scenario"].clone())
            .or_default()
            .push((f.name.clone(), r.committed_changes()));
    }
    for (scenario, runs) in by_scenario {
        let (first_name, first) = &runs[0];
        for (name, changes) in &runs[1..] {
            assert_eq!(
                changes, first,
                "{scenario}: {name} differs from {first_name}"
            );
        }
    }
}

/// Binary mode gives the same values as text mode for the types the crate
/// understands.
#[test]
fn binary_profiles_agree_with_text_for_known_types() {
    for major in MAJORS {
        for scenario in [
            "inserts", "updates", "truncate", "messages", "toast", "alter", "origin",
        ] {
            let text = replay(&Fixture::load(
                &fixtures_dir().join(format!("{major}/{scenario}.v1.hex")),
            ));
            let bin = replay(&Fixture::load(
                &fixtures_dir().join(format!("{major}/{scenario}.v1-binary.hex")),
            ));
            assert_eq!(
                bin.committed_changes(),
                text.committed_changes(),
                "{major} {scenario}"
            );
        }
    }
}

// ---------------------------------------------------------------- scenarios

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn relation<'a>(r: &'a Replay, name: &str) -> Vec<&'a Relation> {
    r.relations_seen
        .iter()
        .filter(|rel| rel.name == name)
        .collect()
}

fn col_summary(rel: &Relation) -> Vec<(String, u32, i32, bool)> {
    rel.columns
        .iter()
        .map(|c| (c.name.to_string(), c.type_oid, c.type_modifier, c.is_key()))
        .collect()
}

#[test]
fn inserts_outbox_rows() {
    for f in fixtures("inserts") {
        let r = replay(&f);
        let txns = r.committed_changes();
        assert_eq!(
            txns,
            vec![
                strings(&[
                    "INSERT public.outbox id=0b6c3f5e-8a4f-4d2e-9a1b-2c3d4e5f6a7b aggregatetype=order aggregateid=order-1 type=OrderCreated payload={\"items\": [\"a\", \"b\"], \"total\": 42} created_at=tstz:2024-05-06 07:08:09.123456+00",
                    "INSERT public.outbox id=1c7d4a6f-9b5a-4e3f-8b2c-3d4e5f6a7b8c aggregatetype=order aggregateid=order-1 type=OrderPaid payload={\"paid\": true} created_at=tstz:2024-05-06 07:08:10+00",
                ]),
                strings(&["INSERT public.outbox id=2d8e5b7a-ac6b-4f4a-9c3d-4e5f6a7b8c9d aggregatetype=customer aggregateid=cust-ü-7 type=Renamed payload={\"name\": \"Zoë \\\"Z\\\" 😀\"} created_at=tstz:2024-05-06 07:08:11+00"]),
                strings(&["INSERT Shop.Order Items Id=1 Näme=Tisch"]),
            ],
            "{}",
            f.name
        );

        let outbox = relation(&r, "outbox");
        assert_eq!(outbox.len(), 1, "{}", f.name);
        let outbox = outbox[0];
        assert_eq!(
            (outbox.namespace.as_str(), outbox.replica_identity),
            ("public", ReplicaIdentity::Default)
        );
        assert_eq!(
            col_summary(outbox),
            vec![
                ("id".into(), oid::UUID, -1, true),
                ("aggregatetype".into(), oid::TEXT, -1, false),
                ("aggregateid".into(), oid::TEXT, -1, false),
                ("type".into(), oid::TEXT, -1, false),
                ("payload".into(), oid::JSONB, -1, false),
                ("created_at".into(), oid::TIMESTAMPTZ, -1, false),
            ]
        );
        let shop = relation(&r, "Order Items")[0];
        assert_eq!(shop.namespace, "Shop");
        assert_eq!(shop.qualified_name(), "Shop.Order Items");
        assert_eq!(shop.column_index("Näme"), Some(1));

        // The relay's view of the first row: typed values, slices of the
        // message, the instant in Unix microseconds.
        let mut cache = RelationCache::new();
        let mut decoder = f.decoder();
        let mut seen = 0;
        for (_, bytes) in &f.rows {
            let msg = decoder.decode(bytes).unwrap();
            cache.apply(&msg);
            let Message::Insert(ins) = &msg else { continue };
            if cache.get(ins.rel_id).unwrap().name != "outbox" || seen > 0 {
                continue;
            }
            seen += 1;
            let row = cache.insert_row(ins).unwrap();
            assert_eq!(
                row.value("id").unwrap(),
                Value::Uuid("0b6c3f5e-8a4f-4d2e-9a1b-2c3d4e5f6a7b".parse().unwrap())
            );
            let Value::TimestampTz(at) = row.value("created_at").unwrap() else {
                panic!()
            };
            assert_eq!(at.to_unix_micros(), Some(1_714_979_289_123_456));
            let raw = row.get("created_at").unwrap();
            if f.binary() {
                assert!(matches!(raw, ColumnValue::Binary(b) if b.len() == 8));
                assert!(matches!(row.get("payload"), Some(ColumnValue::Binary(b)) if b[0] == 1));
            } else {
                // Rendered in the decoding session's zone (Asia/Kolkata).
                assert_eq!(
                    raw,
                    &ColumnValue::Text(Bytes::from_static(b"2024-05-06 12:38:09.123456+05:30"))
                );
            }
            let Value::Json(payload) = row.value("payload").unwrap() else {
                panic!()
            };
            let payload = payload.into_bytes();
            // Zero copy: the payload points into the message buffer.
            let range = bytes.as_ptr_range();
            assert!(range.contains(&payload.as_ptr()));
        }
        assert_eq!(seen, 1);
    }
}

#[test]
fn updates_and_deletes_under_each_replica_identity() {
    for f in fixtures("updates") {
        let r = replay(&f);
        let all: Vec<String> = r.committed_changes().concat();
        assert_eq!(
            all,
            strings(&[
                "UPDATE public.acct id=1 owner=ann balance=150",
                "UPDATE public.acct KEY[id=2 owner=NULL balance=NULL] id=20 owner=bob balance=200",
                "DELETE public.acct KEY[id=3 owner=NULL balance=NULL]",
                "UPDATE public.acct_full OLD[id=1 note=one] id=1 note=uno",
                "DELETE public.acct_full OLD[id=2 note=two]",
                "UPDATE public.acct_idx KEY[id=NULL code=A v=NULL] id=1 code=AA v=x",
                "UPDATE public.acct_idx id=2 code=B v=yy",
                "DELETE public.acct_idx KEY[id=NULL code=B v=NULL]",
            ]),
            "{}",
            f.name
        );
        let ident = |name| relation(&r, name)[0].replica_identity;
        assert_eq!(ident("acct"), ReplicaIdentity::Default);
        assert_eq!(ident("acct_full"), ReplicaIdentity::Full);
        assert_eq!(ident("acct_idx"), ReplicaIdentity::Index);
        let keys = |name| -> Vec<String> {
            relation(&r, name)[0]
                .key_columns()
                .map(|(_, c)| c.name.to_string())
                .collect()
        };
        assert_eq!(keys("acct"), ["id"]);
        assert_eq!(keys("acct_idx"), ["code"]);
        // FULL identity marks every column as key.
        assert_eq!(keys("acct_full"), ["id", "note"]);
    }
}

#[test]
fn truncate_options_and_relations() {
    for f in fixtures("truncate") {
        let r = replay(&f);
        assert_eq!(
            r.committed_changes().concat(),
            strings(&[
                "TRUNCATE public.t_other",
                "TRUNCATE public.t_other RESTART IDENTITY",
                "TRUNCATE public.t_child,public.t_parent CASCADE",
            ]),
            "{}",
            f.name
        );
        let truncates: Vec<&Truncate> = r
            .messages
            .iter()
            .filter_map(|(_, m)| match m {
                Message::Truncate(t) => Some(t),
                _ => None,
            })
            .collect();
        let shape: Vec<(u8, usize)> = truncates
            .iter()
            .map(|t| (t.options, t.rel_ids.len()))
            .collect();
        assert_eq!(
            shape,
            [
                (0, 1),
                (Truncate::RESTART_IDENTITY, 1),
                (Truncate::CASCADE, 2)
            ]
        );
    }
}

#[test]
fn logical_messages_transactional_and_not() {
    for f in fixtures("messages") {
        let r = replay(&f);
        assert_eq!(
            r.non_transactional,
            strings(&[
                "MESSAGE non-tx walcast.nontx \"hello\"",
                // Sent at once, even though its transaction rolled back.
                "MESSAGE non-tx walcast.nontx-in-aborted \"kept\"",
            ]),
            "{}",
            f.name
        );
        assert_eq!(
            r.committed_changes(),
            vec![strings(&[
                "INSERT public.msg_t id=1",
                "MESSAGE tx walcast.tx \"{\\\"k\\\": 1}\"",
                "MESSAGE tx walcast.bin \"\\0\u{fffd}\\u{10}\"",
            ])],
            "{}",
            f.name
        );
        let bin = r
            .messages
            .iter()
            .find_map(|(_, m)| match m {
                Message::Message(m) if m.prefix == "walcast.bin" => Some(m.clone()),
                _ => None,
            })
            .unwrap();
        assert!(bin.is_transactional());
        assert_eq!(bin.content.as_ref(), b"\x00\xff\x10");
        // The rolled-back transactional message never appears.
        assert!(!r
            .messages
            .iter()
            .any(|(_, m)| matches!(m, Message::Message(m) if m.prefix == "walcast.rolledback")));
    }
}

#[test]
fn toasted_values_unchanged_on_update() {
    for f in fixtures("toast") {
        let r = replay(&f);
        assert_eq!(
            r.committed_changes().concat(),
            strings(&[
                "INSERT public.docs id=1 title=first body=xxxxxxxx…(10000)",
                "UPDATE public.docs id=1 title=second body=<unchanged-toast>",
                "UPDATE public.docs id=1 title=second body=yyyyyyyy…(5000)",
                "INSERT public.docs_full id=1 title=full body=zzzzzzzz…(8000)",
                "UPDATE public.docs_full OLD[id=1 title=full body=zzzzzzzz…(8000)] id=1 title=full2 body=<unchanged-toast>",
                "DELETE public.docs_full OLD[id=2 title=full2 body=zzzzzzzz…(8000)]".replace("id=2", "id=1").as_str(),
            ]),
            "{}",
            f.name
        );
        let unchanged = r
            .messages
            .iter()
            .filter(|(_, m)| matches!(m, Message::Update(u) if u.new.columns.contains(&ColumnValue::UnchangedToast)))
            .count();
        assert_eq!(unchanged, 2, "{}", f.name);
    }
}

#[test]
fn many_types_in_text_and_binary_format() {
    for f in fixtures("types") {
        let r = replay(&f);
        let txns = r.committed_changes();
        assert_eq!(txns.len(), 5, "{}", f.name);
        let known = "INSERT public.typed id=1 c_text=héllo wörld c_varchar=var c_bpchar=ab    c_name=a_name c_uuid=a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11 c_jsonb={\"a\": \"ü\", \"b\": [1, 2.5, null]} c_json={\"keep\":  \"spacing\"} c_bytea=\\x00015c78ff c_int2=32767 c_int4=-2147483648 c_int8=9223372036854775807 c_bool=true c_tstz=tstz:2024-02-29 23:59:59.999999+00 c_ts=ts:2024-02-29 23:59:59.5+00";
        let rest = if f.binary() {
            " c_numeric=bin:0003000100000003000109291a7c c_int4arr=bin:0000…(100) c_textarr=bin:0000…(80) c_float8=bin:3ff8000000000000 c_date=bin:0000225c c_mood=bin:6861707079 c_posint=7"
        } else {
            " c_numeric=12345.678 c_int4arr={1,2,NULL,4} c_textarr={\"a b\",\"c\\\"d\",NULL} c_float8=1.5 c_date=2024-01-31 c_mood=happy c_posint=7"
        };
        assert_eq!(txns[0], vec![format!("{known}{rest}")], "{}", f.name);
        assert!(txns[1][0].starts_with("INSERT public.typed id=2 c_text=NULL c_varchar=NULL"));
        assert!(txns[1][0].ends_with("c_mood=NULL c_posint=NULL"));
        assert!(txns[2][0].contains(" c_text= c_varchar=NULL"));
        assert!(txns[2][0].contains(" c_jsonb={} "));
        assert!(txns[2][0].contains(" c_bytea=\\x c_int2=-32768 c_int4=0 c_int8=-9223372036854775808 c_bool=false c_tstz=tstz:infinity c_ts=ts:-infinity "));
        // LMT offset (+05:53:28 in Asia/Kolkata in 1850) and BC dates.
        assert!(
            txns[3][0]
                .contains(" c_tstz=tstz:1850-06-01 12:00:00+00 c_ts=ts:0044-03-15 12:00:00+00 BC "),
            "{}",
            txns[3][0]
        );
        assert!(txns[4][0].contains(
            " c_tstz=tstz:1999-12-31 23:59:59.000001+00 c_ts=ts:12345-06-07 08:09:10+00 "
        ));

        let typed = relation(&r, "typed")[0];
        let cols = col_summary(typed);
        let col = |n: &str| cols.iter().find(|c| c.0 == n).unwrap().clone();
        assert_eq!(
            col("c_varchar"),
            ("c_varchar".into(), oid::VARCHAR, 24, false)
        );
        assert_eq!(col("c_bpchar"), ("c_bpchar".into(), oid::BPCHAR, 9, false));
        assert_eq!(
            col("c_numeric"),
            ("c_numeric".into(), oid::NUMERIC, (12 << 16 | 3) + 4, false)
        );
        assert_eq!(col("c_int4arr").1, oid::INT4_ARRAY);
        assert_eq!(col("c_textarr").1, oid::TEXT_ARRAY);
        assert_eq!(col("id"), ("id".into(), oid::INT8, -1, true));
        // Custom types are described by Type messages before their relation;
        // a domain by its base type (so the value is read as an int4).
        let mood_oid = col("c_mood").1;
        let posint_oid = col("c_posint").1;
        let types: Vec<(u32, String, String)> = r
            .types_seen
            .iter()
            .map(|t| (t.type_oid, t.namespace.to_string(), t.name.to_string()))
            .collect();
        assert!(
            types.contains(&(mood_oid, "public".into(), "mood".into())),
            "{types:?}"
        );
        assert!(
            types.contains(&(posint_oid, "".into(), "int4".into())),
            "{types:?}"
        );
    }
}

#[test]
fn alter_table_sends_a_new_relation_message() {
    for f in fixtures("alter") {
        let r = replay(&f);
        assert_eq!(
            r.committed_changes().concat(),
            strings(&[
                "INSERT public.evolving id=1 a=one",
                "INSERT public.evolving id=2 a=two b=7",
                "INSERT public.evolving id=3 b=8",
                "INSERT public.evolving id=4 b=9",
                "INSERT public.evolved id=5 b=10",
                "INSERT public.evolved id=6 b=11",
            ]),
            "{}",
            f.name
        );
        let rels: Vec<&Relation> = r
            .relations_seen
            .iter()
            .filter(|rel| rel.name.starts_with("evolv"))
            .collect();
        assert_eq!(rels.len(), 6, "{}", f.name);
        assert!(
            rels.iter().all(|rel| rel.rel_id == rels[0].rel_id),
            "same OID throughout"
        );
        type Shape = (String, Vec<(String, u32)>, ReplicaIdentity);
        let shapes: Vec<Shape> = rels
            .iter()
            .map(|rel| {
                (
                    rel.name.to_string(),
                    rel.columns
                        .iter()
                        .map(|c| (c.name.to_string(), c.type_oid))
                        .collect(),
                    rel.replica_identity,
                )
            })
            .collect();
        let c = |n: &str, o| (n.to_string(), o);
        assert_eq!(
            shapes,
            vec![
                (
                    "evolving".into(),
                    vec![c("id", oid::INT4), c("a", oid::TEXT)],
                    ReplicaIdentity::Default
                ),
                (
                    "evolving".into(),
                    vec![c("id", oid::INT4), c("a", oid::TEXT), c("b", oid::INT4)],
                    ReplicaIdentity::Default
                ),
                (
                    "evolving".into(),
                    vec![c("id", oid::INT4), c("b", oid::INT4)],
                    ReplicaIdentity::Default
                ),
                (
                    "evolving".into(),
                    vec![c("id", oid::INT4), c("b", oid::INT8)],
                    ReplicaIdentity::Default
                ),
                (
                    "evolved".into(),
                    vec![c("id", oid::INT4), c("b", oid::INT8)],
                    ReplicaIdentity::Default
                ),
                (
                    "evolved".into(),
                    vec![c("id", oid::INT4), c("b", oid::INT8)],
                    ReplicaIdentity::Full
                ),
            ]
        );
    }
}

#[test]
fn big_transactions_stream_in_blocks() {
    for f in fixtures("big_txn") {
        let r = replay(&f);
        let committed = r.committed();
        assert_eq!(committed.len(), 3, "{}", f.name);
        let (side, big, sub) = (committed[0], committed[1], committed[2]);
        assert_eq!(side.change_texts(), ["INSERT public.side id=1"]);
        // 800 rows and a transactional message; the side transaction
        // committed while the big one was open, so it comes first.
        assert_eq!(big.changes.len(), 801);
        assert!(big.xid < side.xid);
        assert_eq!(
            big.change_texts()
                .iter()
                .filter(|c| c.starts_with("MESSAGE tx walcast.big"))
                .count(),
            1
        );
        // Only the rows outside the rolled-back savepoint.
        let ids: Vec<String> = sub
            .change_texts()
            .iter()
            .map(|c| c.split_whitespace().nth(2).unwrap().to_string())
            .collect();
        let want: Vec<String> = (2001..=2010)
            .chain(2411..=2415)
            .map(|i| format!("id={i}"))
            .collect();
        assert_eq!(ids, want, "{}", f.name);

        let streams = r
            .messages
            .iter()
            .filter(|(_, m)| matches!(m, Message::StreamStart(_)))
            .count();
        if f.streaming() {
            assert!(
                big.streamed && big.blocks >= 2,
                "{}: {} blocks",
                f.name,
                big.blocks
            );
            assert!(sub.streamed);
            assert!(!side.streamed);
            // The rolled-back big transaction was streamed, then aborted.
            let aborted: Vec<&Txn> = r
                .finished
                .iter()
                .filter(|t| t.outcome == Outcome::Aborted)
                .collect();
            assert_eq!(aborted.len(), 1);
            assert!(aborted[0].changes.len() > 100);
            assert_eq!(r.subxact_aborts, 1, "{}", f.name);
            // The side transaction is decoded between blocks of the big one.
            let pos = |pred: &dyn Fn(&Message) -> bool| {
                r.messages.iter().position(|(_, m)| pred(m)).unwrap()
            };
            let first_block = pos(&|m| matches!(m, Message::StreamStart(s) if s.xid == big.xid));
            let side_commit = pos(&|m| matches!(m, Message::Commit(_)));
            let big_commit = pos(&|m| matches!(m, Message::StreamCommit(c) if c.xid == big.xid));
            assert!(
                first_block < side_commit && side_commit < big_commit,
                "{}",
                f.name
            );
            // Inside blocks, changes carry the (sub)transaction's xid.
            assert!(big.changes.iter().all(|(xid, _)| *xid == big.xid));
            assert!(r.stream_aborts.iter().any(|a| a.subxid != a.xid));
        } else {
            assert_eq!(streams, 0);
            assert!(r.finished.iter().all(|t| t.outcome == Outcome::Committed));
        }
    }
}

#[test]
fn stream_abort_carries_abort_info_only_with_parallel_v4() {
    let mut checked = 0;
    for f in fixtures("big_txn") {
        let r = replay(&f);
        for a in &r.stream_aborts {
            let expect = f.options["streaming"] == "parallel" && f.proto_version() == 4;
            assert_eq!(a.abort_info.is_some(), expect, "{}", f.name);
            if let Some(info) = &a.abort_info {
                assert!(info.abort_time.to_unix_micros().unwrap() > 1_700_000_000_000_000);
            }
            checked += 1;
        }
        // A parallel-streaming capture decoded without the option fails on
        // the extra fields, with an error that points at the option.
        if f.options.get("streaming").map(String::as_str) == Some("parallel") {
            let mut wrong = Decoder::new(4);
            let err = f
                .rows
                .iter()
                .find_map(|(_, b)| wrong.decode(b).err())
                .expect("decoding without parallel_streaming must fail");
            assert!(
                matches!(
                    err,
                    Error::TrailingBytes {
                        message: MessageKind::StreamAbort,
                        offset: 9,
                        remaining: 16
                    }
                ),
                "{err}"
            );
            assert!(err.to_string().contains("streaming options"));
        }
    }
    assert!(checked >= 8);
}

#[test]
fn two_phase_commit_messages() {
    for f in fixtures("twophase") {
        let r = replay(&f);
        let outcomes: Vec<(Outcome, usize, bool)> = r
            .finished
            .iter()
            .map(|t| (t.outcome.clone(), t.changes.len(), t.streamed))
            .collect();
        let streamed = f.streaming();
        assert_eq!(
            outcomes,
            vec![
                (Outcome::CommitPrepared("walcast-gid-1".into()), 1, false),
                (Outcome::RollbackPrepared("walcast-gid-2".into()), 1, false),
                (
                    Outcome::CommitPrepared("walcast-gid-3".into()),
                    401,
                    streamed
                ),
            ],
            "{}",
            f.name
        );
        let kinds = |k: MessageKind| r.messages.iter().filter(|(_, m)| m.kind() == k).count();
        assert_eq!(
            kinds(MessageKind::BeginPrepare),
            if streamed { 2 } else { 3 }
        );
        assert_eq!(kinds(MessageKind::Prepare), if streamed { 2 } else { 3 });
        assert_eq!(kinds(MessageKind::StreamPrepare), usize::from(streamed));
        assert_eq!(kinds(MessageKind::CommitPrepared), 2);
        assert_eq!(kinds(MessageKind::RollbackPrepared), 1);
        assert_eq!(kinds(MessageKind::Begin), 0);
    }
}

#[test]
fn origin_follows_begin() {
    for f in fixtures("origin") {
        let r = replay(&f);
        let t = &r.committed()[0];
        assert_eq!(
            t.origin,
            Some(("0/ABCDEF0".parse().unwrap(), "walcast_origin".to_string()))
        );
        assert!(matches!(r.messages[0].1, Message::Begin(_)));
        assert!(matches!(r.messages[1].1, Message::Origin(_)));
    }
}

#[test]
#[ignore = "prints every fixture's replay; run with --ignored --nocapture"]
fn dump() {
    for f in all_fixtures() {
        let r = replay(&f);
        println!("== {} ({} messages)", f.name, r.messages.len());
        for m in &r.non_transactional {
            println!("   {m}");
        }
        for t in &r.finished {
            println!(
                "  txn xid={} {:?} streamed={} blocks={} gid={:?} origin={:?} commit={} end={} changes={}",
                t.xid,
                t.outcome,
                t.streamed,
                t.blocks,
                t.gid,
                t.origin,
                t.commit_lsn,
                t.end_lsn,
                t.changes.len()
            );
            for (xid, c) in t.changes.iter().take(6) {
                println!("    [{xid}] {c}");
            }
        }
    }
}
