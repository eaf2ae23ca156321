//! A debugging timeline of the pipeline's counters: every 10 ms a tokio task
//! copies the [`Progress`] atomics (read only, no work in the pipeline) and a
//! std thread appends them as one CSV line to a file (buffered, flushed every
//! second and at the end), so the drain's stop-and-go can be plotted.
//!
//! Switched on by the binary when [`TIMELINE_ENV`] names a file; not a
//! configuration option (a measurement aid for developers, not for users).

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufWriter, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use walcast_core::pipeline::Progress;

/// The environment variable naming the timeline's CSV file (`walcast run`).
pub const TIMELINE_ENV: &str = "WALCAST_DEBUG_TIMELINE";

/// How often the counters are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(10);

/// How often the file is flushed.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// The CSV header: the columns of [`Sample::csv_line`]. Counters are
/// cumulative (acks per interval is the difference of `events_delivered`
/// between rows); LSNs are decimal byte positions.
pub const CSV_HEADER: &str = "t_ms,events_sent,events_delivered,in_flight_events,in_flight_bytes,\
transactions,sink_queue,last_ack_age_ms,received_lsn,published_lsn,confirmed_lsn,server_wal_end";

/// One reading of the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Time since the timeline started, in microseconds.
    pub t_us: u64,
    /// Events handed to the sink.
    pub events_sent: u64,
    /// Events the sink reported durable.
    pub events_delivered: u64,
    /// Events in flight.
    pub in_flight_events: u64,
    /// Bytes in flight.
    pub in_flight_bytes: u64,
    /// Transactions whose Commit was read.
    pub transactions: u64,
    /// The sink's own queue depth (sampled by the pipeline each second).
    pub sink_queue: u64,
    /// Milliseconds since the last delivery report while events are in flight.
    pub last_ack_age_ms: u64,
    /// The highest LSN read from the stream.
    pub received_lsn: u64,
    /// The newest commit end LSN handed to the sink whole.
    pub published_lsn: u64,
    /// The flush LSN reported to the server.
    pub confirmed_lsn: u64,
    /// The server's WAL end as last reported.
    pub server_wal_end: u64,
}

impl Sample {
    /// Reads the counters `t` after the start.
    pub fn read(progress: &Progress, t: Duration) -> Sample {
        let r = Ordering::Relaxed;
        let ladder = progress.ladder();
        Sample {
            t_us: t.as_micros() as u64,
            events_sent: progress.events_sent.load(r),
            events_delivered: progress.events_delivered.load(r),
            in_flight_events: progress.in_flight_events.load(r),
            in_flight_bytes: progress.in_flight_bytes.load(r),
            transactions: progress.transactions.load(r),
            sink_queue: progress.sink_queue.load(r),
            last_ack_age_ms: progress.last_ack_age().as_millis() as u64,
            received_lsn: u64::from(ladder.received),
            published_lsn: u64::from(ladder.published),
            confirmed_lsn: u64::from(ladder.confirmed),
            server_wal_end: u64::from(ladder.server_wal_end),
        }
    }

    /// The CSV line (with its newline) in the order of [`CSV_HEADER`];
    /// `t_ms` with three decimals.
    pub fn csv_line(&self) -> String {
        let mut s = String::with_capacity(128);
        let _ = writeln!(
            s,
            "{}.{:03},{},{},{},{},{},{},{},{},{},{},{}",
            self.t_us / 1000,
            self.t_us % 1000,
            self.events_sent,
            self.events_delivered,
            self.in_flight_events,
            self.in_flight_bytes,
            self.transactions,
            self.sink_queue,
            self.last_ack_age_ms,
            self.received_lsn,
            self.published_lsn,
            self.confirmed_lsn,
            self.server_wal_end,
        );
        s
    }
}

/// A running timeline; [`Timeline::finish`] takes a last sample, flushes
/// and closes the file.
#[derive(Debug)]
pub struct Timeline {
    path: PathBuf,
    stop: oneshot::Sender<()>,
    sampler: JoinHandle<()>,
    writer: thread::JoinHandle<io::Result<u64>>,
}

impl Timeline {
    /// Creates (truncates) `path`, writes the header and starts sampling
    /// `progress` every [`SAMPLE_EVERY`]. Must be called inside a tokio
    /// runtime.
    ///
    /// # Errors
    /// The file cannot be created or the writer thread cannot start.
    pub fn start(path: &Path, progress: Arc<Progress>) -> io::Result<Timeline> {
        let mut out = BufWriter::with_capacity(1 << 16, File::create(path)?);
        writeln!(out, "{CSV_HEADER}")?;
        out.flush()?;
        let (tx, rx) = mpsc::channel::<Sample>();
        let writer = thread::Builder::new()
            .name("walcast-timeline".into())
            .spawn(move || write_samples(out, rx))?;
        let (stop, mut stopped) = oneshot::channel();
        let sampler = tokio::spawn(async move {
            let start = Instant::now();
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if tx.send(Sample::read(&progress, start.elapsed())).is_err() {
                            return; // the writer gave up (write error)
                        }
                    }
                    _ = &mut stopped => {
                        let _ = tx.send(Sample::read(&progress, start.elapsed()));
                        return;
                    }
                }
            }
        });
        Ok(Timeline {
            path: path.to_path_buf(),
            stop,
            sampler,
            writer,
        })
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes a last sample, flushes and closes the file; the number of rows
    /// written.
    ///
    /// # Errors
    /// A write to the file failed (the rows written before it are kept).
    pub async fn finish(self) -> io::Result<u64> {
        let _ = self.stop.send(());
        let _ = self.sampler.await;
        let writer = self.writer;
        match tokio::task::spawn_blocking(move || writer.join()).await {
            Ok(Ok(result)) => result,
            _ => Err(io::Error::other("the timeline writer thread panicked")),
        }
    }
}

/// The writer thread: one line per sample, flushed every [`FLUSH_EVERY`] and
/// when the sampler is gone.
fn write_samples(mut out: BufWriter<File>, rx: mpsc::Receiver<Sample>) -> io::Result<u64> {
    let mut rows = 0u64;
    let mut flushed = Instant::now();
    loop {
        match rx.recv_timeout(FLUSH_EVERY) {
            Ok(sample) => {
                out.write_all(sample.csv_line().as_bytes())?;
                rows += 1;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if flushed.elapsed() >= FLUSH_EVERY {
            out.flush()?;
            flushed = Instant::now();
        }
    }
    out.flush()?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Sample {
        Sample {
            t_us: 12_345_067,
            events_sent: 10,
            events_delivered: 7,
            in_flight_events: 3,
            in_flight_bytes: 600,
            transactions: 2,
            sink_queue: 1,
            last_ack_age_ms: 4,
            received_lsn: 0x1_0000_0100,
            published_lsn: 0x1_0000_0080,
            confirmed_lsn: 0x1_0000_0040,
            server_wal_end: 0x1_0000_0200,
        }
    }

    #[test]
    fn csv_line_follows_the_header() {
        let line = sample().csv_line();
        assert_eq!(
            line,
            "12345.067,10,7,3,600,2,1,4,4294967552,4294967424,4294967360,4294967808\n"
        );
        assert_eq!(
            line.trim_end().split(',').count(),
            CSV_HEADER.split(',').count()
        );
        assert!(CSV_HEADER
            .starts_with("t_ms,events_sent,events_delivered,in_flight_events,in_flight_bytes,"));
    }

    #[test]
    fn t_ms_keeps_leading_zeros_of_the_fraction() {
        let s = Sample {
            t_us: 10_005,
            ..sample()
        };
        assert!(s.csv_line().starts_with("10.005,"), "{}", s.csv_line());
        let s = Sample {
            t_us: 7,
            ..sample()
        };
        assert!(s.csv_line().starts_with("0.007,"), "{}", s.csv_line());
    }

    #[test]
    fn read_copies_the_counters() {
        let p = Progress::default();
        p.events_sent.store(5, Ordering::Relaxed);
        p.events_delivered.store(2, Ordering::Relaxed);
        p.in_flight_events.store(3, Ordering::Relaxed);
        p.in_flight_bytes.store(300, Ordering::Relaxed);
        p.transactions.store(1, Ordering::Relaxed);
        let s = Sample::read(&p, Duration::from_millis(20));
        assert_eq!(
            (
                s.t_us,
                s.events_sent,
                s.events_delivered,
                s.in_flight_events
            ),
            (20_000, 5, 2, 3)
        );
        assert_eq!((s.in_flight_bytes, s.transactions), (300, 1));
    }

    #[tokio::test]
    async fn writes_increasing_rows_and_flushes_at_the_end() {
        let dir = std::env::temp_dir().join(format!("walcast-timeline-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.csv");
        let p = Arc::new(Progress::default());
        let t = Timeline::start(&path, p.clone()).unwrap();
        for i in 1..=5u64 {
            p.events_sent.store(i * 10, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        p.events_sent.store(99, Ordering::Relaxed);
        let rows = t.finish().await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], CSV_HEADER);
        assert_eq!(lines.len() as u64, rows + 1);
        assert!(rows >= 5, "{rows} rows:\n{text}");
        let col = |l: &str, i: usize| l.split(',').nth(i).unwrap().parse::<f64>().unwrap();
        for w in lines[1..].windows(2) {
            assert!(col(w[0], 0) < col(w[1], 0), "t_ms not increasing:\n{text}");
            assert!(col(w[0], 1) <= col(w[1], 1));
        }
        assert_eq!(
            col(lines[lines.len() - 1], 1),
            99.0,
            "the last sample is taken at the end:\n{text}"
        );
    }
}
