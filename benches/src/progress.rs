//! Progress output: one line per phase and a status line every few seconds,
//! with rates and an estimate of what is left (of the phase and of the run).

use std::time::{Duration, Instant};

/// Tracks the phases of a run and prints where it is.
#[derive(Debug)]
pub struct Progress {
    started: Instant,
    /// Estimated seconds of each planned phase.
    estimates: Vec<f64>,
    current: usize,
    phase_started: Instant,
    /// Actual / estimated time of finished phases, to correct the remaining estimate.
    actual_s: f64,
    estimated_done_s: f64,
}

/// `mm:ss`.
pub fn mmss(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    format!("{:02}:{:02}", s / 60, s % 60)
}

impl Progress {
    /// A run of phases with these estimated durations (seconds).
    pub fn new(estimates: Vec<f64>) -> Progress {
        Progress {
            started: Instant::now(),
            estimates,
            current: 0,
            phase_started: Instant::now(),
            actual_s: 0.0,
            estimated_done_s: 0.0,
        }
    }

    /// Seconds since the run started.
    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Estimated seconds left for the whole run (phases not started yet are
    /// scaled by how far off the finished ones were).
    pub fn remaining(&self) -> f64 {
        let scale = if self.estimated_done_s > 0.0 {
            (self.actual_s / self.estimated_done_s).clamp(0.3, 3.0)
        } else {
            1.0
        };
        let current = match self.current {
            0 => 0.0,
            n => {
                self.estimates.get(n - 1).copied().unwrap_or(0.0) * scale
                    - self.phase_started.elapsed().as_secs_f64()
            }
        };
        let later: f64 = self.estimates.iter().skip(self.current).sum::<f64>() * scale;
        current.max(0.0) + later
    }

    /// Starts the next phase and prints its header line.
    pub fn phase(&mut self, what: &str) {
        if self.current > 0 {
            self.actual_s += self.phase_started.elapsed().as_secs_f64();
            self.estimated_done_s += self.estimates.get(self.current - 1).copied().unwrap_or(0.0);
        }
        self.current += 1;
        self.phase_started = Instant::now();
        println!(
            "[{}/{} {} elapsed, ~{} left] {what}",
            self.current,
            self.estimates.len(),
            mmss(self.elapsed()),
            mmss(self.remaining()),
        );
    }

    /// Prints a status line inside the current phase.
    pub fn status(&self, line: &str) {
        println!("    {} {line}", mmss(self.elapsed()));
    }
}

/// Prints a status line at most every `every`.
#[derive(Debug)]
pub struct Ticker {
    last: Instant,
    every: Duration,
}

impl Ticker {
    /// A ticker that first fires after `every`.
    pub fn new(every: Duration) -> Ticker {
        Ticker {
            last: Instant::now(),
            every,
        }
    }

    /// True once per period.
    pub fn due(&mut self) -> bool {
        if self.last.elapsed() >= self.every {
            self.last = Instant::now();
            true
        } else {
            false
        }
    }
}

/// "events/s" with thousands separators.
pub fn rate(v: f64) -> String {
    group(v.round() as u64)
}

/// An integer with thin thousands separators (`1,234,567`).
pub fn group(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(mmss(125.4), "02:05");
        assert_eq!(group(1_234_567), "1,234,567");
        assert_eq!(group(12), "12");
        assert_eq!(rate(999.6), "1,000");
    }

    #[test]
    fn remaining_counts_later_phases() {
        let mut p = Progress::new(vec![10.0, 20.0, 30.0]);
        assert!((p.remaining() - 60.0).abs() < 1.0);
        p.phase("one");
        assert!(p.remaining() <= 60.0 && p.remaining() > 50.0);
    }
}
