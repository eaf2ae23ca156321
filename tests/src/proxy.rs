//! A TCP fault proxy on 127.0.0.1 for the reliability suite, in the spirit of
//! Toxiproxy: it sits between walcast and Postgres (walcast's `postgres.port`
//! points at it) or between walcast and Kafka (the brokers' `PROXIED`
//! listener advertises the proxy's port, see `scripts/env/lib/kafka.sh`) and
//! injects network faults while it forwards.
//!
//! Faults:
//! - a persistent [`Fault`] applied to every connection, old and new:
//!   blackhole (hold all bytes both ways: a partition that heals), drop one
//!   direction (its packets are lost: that direction stalls while TCP would
//!   retransmit; no byte is ever discarded or corrupted), delay (latency per
//!   chunk, pipelined),
//!   throttle (bandwidth), refuse (reset new connections), cut after N bytes
//!   (each connection is reset after N bytes);
//! - one-shot operations on the connections open now: [`FaultProxy::reset_all`]
//!   (RST), [`FaultProxy::half_open`] (they go silent forever in both
//!   directions and are never closed, while new connections work: what a client
//!   sees after the peer vanished without a FIN, or a NAT forgot the flow),
//!   [`FaultProxy::reset_client_side`] (the client gets an RST while the
//!   server's side stays open and silent: a middlebox that dropped the flow
//!   and answered only the client).
//!
//! The proxy runs on its own tokio runtime (two worker threads), so a test
//! that blocks its own threads never stalls the network it simulates.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

/// A direction of traffic through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to server (walcast to Postgres / Kafka).
    Upstream,
    /// Server to client.
    Downstream,
}

/// A fault applied to every connection (open and new) until replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// Forward everything.
    #[default]
    None,
    /// Hold every byte in both directions (nothing is lost: TCP would
    /// retransmit); new connections are accepted but not connected upstream.
    /// Clearing the fault heals the partition.
    Blackhole,
    /// Packets in one direction are dropped: that direction stalls (bytes
    /// are held, as TCP would keep retransmitting them) until cleared; the
    /// other direction flows.
    Drop(Direction),
    /// Deliver every chunk this much later (latency, not bandwidth).
    Delay(Duration),
    /// At most this many bytes per second in each direction of each connection.
    Throttle(u64),
    /// Reset new connections at once (a closed port).
    Refuse,
    /// Reset each connection once it has forwarded this many bytes (both
    /// directions together), counted from when the fault was set or the
    /// connection opened.
    CutAfter(u64),
}

/// Counters for assertions and reports.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections reset by the proxy.
    pub resets: AtomicU64,
    /// Bytes forwarded client to server.
    pub bytes_up: AtomicU64,
    /// Bytes forwarded server to client.
    pub bytes_down: AtomicU64,
    /// Bytes read and discarded (on half-open connections).
    pub bytes_dropped: AtomicU64,
}

#[derive(Debug)]
struct Conn {
    /// Set to end the connection with a reset.
    kill: watch::Sender<bool>,
    /// Half-open: silent both ways, never closed (until killed).
    zombie: AtomicBool,
    /// The client's side was reset; the server's side stays open and silent.
    orphan: AtomicBool,
    /// Bytes left before a `CutAfter` reset (u64::MAX: no limit).
    budget: AtomicU64,
}

impl Conn {
    fn reset(&self) {
        self.kill.send_replace(true);
    }

    /// Takes `n` bytes from the budget; false when it runs out.
    fn spend(&self, n: u64) -> bool {
        let mut cur = self.budget.load(Ordering::Relaxed);
        loop {
            if cur == u64::MAX {
                return true;
            }
            if cur < n {
                self.budget.store(0, Ordering::Relaxed);
                return false;
            }
            match self
                .budget
                .compare_exchange(cur, cur - n, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }
}

#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    fault: watch::Sender<Fault>,
    conns: Mutex<Vec<Arc<Conn>>>,
    live: AtomicUsize,
    stats: Stats,
}

/// A running proxy. Dropping it stops it and closes every connection.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

const CHUNK: usize = 16 * 1024;
/// Bytes a direction may hold in its delay queue before it stops reading.
const MAX_QUEUED: usize = 4 * 1024 * 1024;

impl FaultProxy {
    /// A proxy on an ephemeral 127.0.0.1 port forwarding to `upstream`.
    pub fn start(upstream: SocketAddr) -> Result<FaultProxy> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), upstream)
    }

    /// A proxy listening on `listen` (e.g. a broker's advertised proxy port).
    pub fn start_on(listen: SocketAddr, upstream: SocketAddr) -> Result<FaultProxy> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fault-proxy")
            .enable_all()
            .build()
            .context("starting the proxy's runtime")?;
        // Bound with std (no block_on: callers may be inside a runtime).
        let std_listener = std::net::TcpListener::bind(listen)
            .with_context(|| format!("binding the fault proxy to {listen}"))?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let listener = {
            let _rt = runtime.enter();
            TcpListener::from_std(std_listener)?
        };
        let shared = Arc::new(Shared {
            upstream,
            fault: watch::Sender::new(Fault::None),
            conns: Mutex::new(Vec::new()),
            live: AtomicUsize::new(0),
            stats: Stats::default(),
        });
        runtime.spawn(accept_loop(listener, shared.clone()));
        Ok(FaultProxy {
            addr,
            shared,
            runtime: Some(runtime),
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Sets the persistent fault (replacing the previous one). Setting
    /// [`Fault::CutAfter`] also arms the budget of every open connection.
    pub fn set(&self, fault: Fault) {
        if let Fault::CutAfter(n) = fault {
            for c in self.shared.conns.lock().unwrap().iter() {
                c.budget.store(n, Ordering::Relaxed);
            }
        } else {
            for c in self.shared.conns.lock().unwrap().iter() {
                c.budget.store(u64::MAX, Ordering::Relaxed);
            }
        }
        self.shared.fault.send_replace(fault);
    }

    /// Back to forwarding everything (open half-open connections stay dead).
    pub fn clear(&self) {
        self.set(Fault::None);
    }

    /// The current fault.
    pub fn fault(&self) -> Fault {
        *self.shared.fault.borrow()
    }

    /// Resets (RST) every open connection now.
    pub fn reset_all(&self) {
        for c in self.shared.conns.lock().unwrap().drain(..) {
            c.reset();
        }
    }

    /// Every open connection goes silent in both directions and is never
    /// closed by the proxy (a peer that vanished); new connections work.
    pub fn half_open(&self) {
        for c in self.shared.conns.lock().unwrap().iter() {
            c.zombie.store(true, Ordering::Relaxed);
        }
    }

    /// Every open connection is reset (RST) on the client's side only; the
    /// server's side stays open and silent, so the server does not notice
    /// (until its own timeouts); new connections work.
    pub fn reset_client_side(&self) {
        for c in self.shared.conns.lock().unwrap().iter() {
            c.orphan.store(true, Ordering::Relaxed);
        }
    }

    /// Connections currently open through the proxy.
    pub fn live_connections(&self) -> usize {
        self.shared.live.load(Ordering::Relaxed)
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.reset_all();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(serve(client, shared.clone()));
    }
}

async fn serve(client: TcpStream, shared: Arc<Shared>) {
    let mut fault_rx = shared.fault.subscribe();
    if *fault_rx.borrow() == Fault::Refuse {
        let _ = client.set_zero_linger();
        shared.stats.resets.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let budget = match *fault_rx.borrow() {
        Fault::CutAfter(n) => n,
        _ => u64::MAX,
    };
    let conn = Arc::new(Conn {
        kill: watch::Sender::new(false),
        zombie: AtomicBool::new(false),
        orphan: AtomicBool::new(false),
        budget: AtomicU64::new(budget),
    });
    shared.conns.lock().unwrap().push(conn.clone());
    shared.live.fetch_add(1, Ordering::Relaxed);
    let mut kill_rx = conn.kill.subscribe();
    // A blackhole also holds new connections before they reach the server.
    let upstream = loop {
        if *fault_rx.borrow_and_update() == Fault::Blackhole {
            tokio::select! {
                _ = fault_rx.changed() => continue,
                _ = kill_rx.changed() => break None,
            }
        }
        break tokio::select! {
            r = TcpStream::connect(shared.upstream) => r.ok(),
            _ = kill_rx.changed() => None,
        };
    };
    let Some(upstream) = upstream else {
        let _ = client.set_zero_linger();
        finish(&shared, &conn);
        return;
    };
    let _ = upstream.set_nodelay(true);
    let _ = client.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let up = tokio::spawn(pump(
        Direction::Upstream,
        cr,
        uw,
        shared.clone(),
        conn.clone(),
    ));
    let down = tokio::spawn(pump(
        Direction::Downstream,
        ur,
        cw,
        shared.clone(),
        conn.clone(),
    ));
    let _ = up.await;
    let _ = down.await;
    finish(&shared, &conn);
}

fn finish(shared: &Shared, conn: &Arc<Conn>) {
    shared.live.fetch_sub(1, Ordering::Relaxed);
    shared
        .conns
        .lock()
        .unwrap()
        .retain(|c| !Arc::ptr_eq(c, conn));
}

/// Ends both sockets of a connection with a reset: zero linger, and the write
/// half is dropped without a FIN.
fn abort(src: OwnedReadHalf, dst: OwnedWriteHalf, shared: &Shared, conn: &Conn) {
    let _ = src.as_ref().set_zero_linger();
    let _ = dst.as_ref().set_zero_linger();
    conn.reset();
    shared.stats.resets.fetch_add(1, Ordering::Relaxed);
    dst.forget();
    drop(src);
}

async fn pump(
    dir: Direction,
    mut src: OwnedReadHalf,
    mut dst: OwnedWriteHalf,
    shared: Arc<Shared>,
    conn: Arc<Conn>,
) {
    let mut fault_rx = shared.fault.subscribe();
    let mut kill_rx = conn.kill.subscribe();
    let counter = match dir {
        Direction::Upstream => &shared.stats.bytes_up,
        Direction::Downstream => &shared.stats.bytes_down,
    };
    let mut queue: VecDeque<(Instant, Bytes)> = VecDeque::new();
    let mut queued = 0usize;
    let mut buf = vec![0u8; CHUNK];
    let mut eof = false;
    // Throttle: the earliest time the next chunk may be written.
    let mut next_free = Instant::now();
    loop {
        if *kill_rx.borrow() {
            abort(src, dst, &shared, &conn);
            return;
        }
        if conn.orphan.load(Ordering::Relaxed) {
            orphan(dir, src, dst, &shared, &mut kill_rx, &mut buf).await;
            return;
        }
        let fault = *fault_rx.borrow_and_update();
        let zombie = conn.zombie.load(Ordering::Relaxed);
        let held = fault == Fault::Blackhole || fault == Fault::Drop(dir);
        if eof && queue.is_empty() && !zombie {
            let _ = dst.shutdown().await;
            return;
        }
        let can_read = !eof && !held && queued < MAX_QUEUED;
        let write_at = match (queue.front(), held || zombie) {
            (Some((due, _)), false) => Some((*due).max(next_free)),
            _ => None,
        };
        tokio::select! {
            _ = kill_rx.changed() => continue,
            _ = fault_rx.changed() => continue,
            // Half-open connections are re-checked now and then.
            _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
            r = src.read(&mut buf), if can_read => {
                let n = match r {
                    Ok(0) | Err(_) => {
                        eof = true;
                        continue;
                    }
                    Ok(n) => n,
                };
                if conn.zombie.load(Ordering::Relaxed) {
                    shared.stats.bytes_dropped.fetch_add(n as u64, Ordering::Relaxed);
                    continue;
                }
                // The fault as it is now (it may have changed while we waited).
                let delay = match *fault_rx.borrow() {
                    Fault::Delay(d) => d,
                    _ => Duration::ZERO,
                };
                queue.push_back((Instant::now() + delay, Bytes::copy_from_slice(&buf[..n])));
                queued += n;
            }
            _ = sleep_until_opt(write_at), if write_at.is_some() => {
                let Some((_, chunk)) = queue.pop_front() else { continue };
                queued -= chunk.len();
                if !conn.spend(chunk.len() as u64) {
                    abort(src, dst, &shared, &conn);
                    return;
                }
                let written = tokio::select! {
                    r = dst.write_all(&chunk) => r.is_ok(),
                    _ = kill_rx.changed() => false,
                };
                if !written {
                    abort(src, dst, &shared, &conn);
                    return;
                }
                counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                if let Fault::Throttle(rate) = *fault_rx.borrow() {
                    let cost = Duration::from_secs_f64(chunk.len() as f64 / rate.max(1) as f64);
                    next_free = next_free.max(Instant::now()) + cost;
                } else {
                    next_free = Instant::now();
                }
            }
        }
    }
}

/// The client's socket is reset (zero linger, no FIN); the server's socket
/// stays open: its bytes are read and discarded until it closes or the
/// connection is killed, and nothing is ever written to it again.
async fn orphan(
    dir: Direction,
    src: OwnedReadHalf,
    dst: OwnedWriteHalf,
    shared: &Shared,
    kill_rx: &mut watch::Receiver<bool>,
    buf: &mut [u8],
) {
    match dir {
        Direction::Upstream => {
            // src is the client's read half, dst the server's write half.
            let _ = src.as_ref().set_zero_linger();
            drop(src);
            let _ = kill_rx.wait_for(|k| *k).await;
            let _ = dst.as_ref().set_zero_linger();
            dst.forget();
        }
        Direction::Downstream => {
            // src is the server's read half, dst the client's write half.
            let _ = dst.as_ref().set_zero_linger();
            dst.forget();
            let mut src = src;
            loop {
                tokio::select! {
                    _ = kill_rx.wait_for(|k| *k) => break,
                    r = src.read(buf) => match r {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            shared.stats.bytes_dropped.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    },
                }
            }
            let _ = src.as_ref().set_zero_linger();
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener as StdListener, TcpStream as StdStream};
    use std::time::Instant as StdInstant;

    /// An echo server on an ephemeral port (std threads).
    fn echo() -> SocketAddr {
        let l = StdListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 8192];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    fn roundtrip(s: &mut StdStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        s.write_all(msg)?;
        let mut out = vec![0u8; msg.len()];
        s.read_exact(&mut out)?;
        Ok(out)
    }

    fn connect(p: &FaultProxy) -> StdStream {
        let s = StdStream::connect(p.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    #[test]
    fn forwards_and_delays() {
        let p = FaultProxy::start(echo()).unwrap();
        let mut s = connect(&p);
        assert_eq!(roundtrip(&mut s, b"hello").unwrap(), b"hello");
        p.set(Fault::Delay(Duration::from_millis(150)));
        let t = StdInstant::now();
        assert_eq!(roundtrip(&mut s, b"slow").unwrap(), b"slow");
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
        p.clear();
        assert_eq!(roundtrip(&mut s, b"fast").unwrap(), b"fast");
    }

    #[test]
    fn blackhole_holds_and_heals() {
        let p = FaultProxy::start(echo()).unwrap();
        let mut s = connect(&p);
        assert_eq!(roundtrip(&mut s, b"a").unwrap(), b"a");
        p.set(Fault::Blackhole);
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        s.write_all(b"held").unwrap();
        let mut out = [0u8; 4];
        assert!(
            s.read_exact(&mut out).is_err(),
            "nothing passes a blackhole"
        );
        p.clear();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.read_exact(&mut out).unwrap();
        assert_eq!(&out, b"held", "held bytes arrive after healing");
    }

    #[test]
    fn reset_refuse_and_cut() {
        let p = FaultProxy::start(echo()).unwrap();
        let mut s = connect(&p);
        assert_eq!(roundtrip(&mut s, b"x").unwrap(), b"x");
        p.reset_all();
        std::thread::sleep(Duration::from_millis(100));
        assert!(roundtrip(&mut s, b"y").is_err(), "reset connection");
        p.set(Fault::Refuse);
        let mut s = connect(&p);
        assert!(roundtrip(&mut s, b"z").is_err(), "refused connection");
        p.set(Fault::CutAfter(10));
        let mut s = connect(&p);
        assert_eq!(roundtrip(&mut s, b"12345").unwrap(), b"12345");
        assert!(
            roundtrip(&mut s, b"67890").is_err(),
            "cut after 10 bytes both ways"
        );
        assert!(p.stats().resets.load(Ordering::Relaxed) >= 3);
    }

    #[test]
    fn half_open_and_one_way_drop() {
        let p = FaultProxy::start(echo()).unwrap();
        let mut old = connect(&p);
        assert_eq!(roundtrip(&mut old, b"a").unwrap(), b"a");
        p.half_open();
        old.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        old.write_all(b"lost").unwrap();
        let mut out = [0u8; 4];
        assert!(
            old.read_exact(&mut out).is_err(),
            "a half-open connection is silent"
        );
        let mut new = connect(&p);
        assert_eq!(
            roundtrip(&mut new, b"new").unwrap(),
            b"new",
            "new connections work"
        );
        p.set(Fault::Drop(Direction::Downstream));
        new.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        new.write_all(b"late").unwrap();
        assert!(
            new.read_exact(&mut out).is_err(),
            "replies do not come through"
        );
        assert_eq!(p.live_connections(), 2);
        p.clear();
        new.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        new.read_exact(&mut out).unwrap();
        assert_eq!(&out, b"late", "nothing was lost, only stalled");
    }

    #[test]
    fn client_side_reset_keeps_the_server_side_open() {
        // A server that reports when its connection ends.
        let l = StdListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 64];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(());
                        return;
                    }
                    Ok(n) => {
                        let _ = s.write_all(&buf[..n]);
                    }
                }
            }
        });
        let p = FaultProxy::start(addr).unwrap();
        let mut s = connect(&p);
        assert_eq!(roundtrip(&mut s, b"a").unwrap(), b"a");
        p.reset_client_side();
        std::thread::sleep(Duration::from_millis(600));
        assert!(roundtrip(&mut s, b"b").is_err(), "the client was reset");
        assert!(
            rx.recv_timeout(Duration::from_millis(500)).is_err(),
            "the server's side stays open"
        );
        drop(p);
        assert!(
            rx.recv_timeout(Duration::from_secs(5)).is_ok(),
            "closed with the proxy"
        );
    }

    #[test]
    fn throttles() {
        let p = FaultProxy::start(echo()).unwrap();
        let mut s = connect(&p);
        p.set(Fault::Throttle(100_000));
        let t = StdInstant::now();
        let msg = vec![7u8; 50_000];
        assert_eq!(roundtrip(&mut s, &msg).unwrap(), msg);
        // 50 kB each way at 100 kB/s per direction: about 0.5 s or more.
        assert!(
            t.elapsed() >= Duration::from_millis(400),
            "{:?}",
            t.elapsed()
        );
    }
}
