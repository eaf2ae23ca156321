//! Crash points ("failpoints") in the relay loop, for the reliability suite.
//!
//! The binary reads `WALCAST_FAILPOINTS` once at startup, for example
//! `WALCAST_FAILPOINTS=after_delivery:abort@3,after_ack:abort@5`, and passes
//! the parsed [`Failpoints`] to the pipeline through
//! [`Pipeline::with_failpoints`](crate::pipeline::Pipeline::with_failpoints).
//! When the variable is unset the pipeline holds `None` and pays one branch
//! per delivery and per confirmation. Nothing else reads it: a failpoint is a
//! test tool, never a production setting.
//!
//! Points:
//! - `after_delivery`: the ack tracker has just taken the Nth delivery report
//!   (counted over the whole process), and whatever LSN it now allows has not
//!   been confirmed to Postgres yet: "delivered but not yet acknowledged".
//! - `after_ack`: the Nth newly confirmed LSN was handed to the replication
//!   source, and the source reported it to the server (waited for up to
//!   [`ACK_REPORT_WAIT`] when the source can tell, see
//!   [`ReplicationSource::reported_lsn`](crate::source::ReplicationSource::reported_lsn)):
//!   "acknowledged".
//!
//! Action: `abort` — log one line to stderr and abort the process (SIGABRT:
//! no destructors, no flush, nothing more sent; a crash like `kill -9`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::{Error, Result};

/// The environment variable the binary reads.
pub const ENV_VAR: &str = "WALCAST_FAILPOINTS";

/// How long `after_ack` waits for the source to report the LSN before aborting anyway.
pub const ACK_REPORT_WAIT: Duration = Duration::from_secs(5);

/// A place in the relay loop where a failpoint can fire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// A delivery report was taken; its LSN is not confirmed yet.
    AfterDelivery,
    /// A newly confirmed LSN was reported to the server.
    AfterAck,
}

impl Point {
    /// The name used in `WALCAST_FAILPOINTS`.
    pub fn name(self) -> &'static str {
        match self {
            Point::AfterDelivery => "after_delivery",
            Point::AfterAck => "after_ack",
        }
    }

    fn index(self) -> usize {
        match self {
            Point::AfterDelivery => 0,
            Point::AfterAck => 1,
        }
    }
}

/// Armed failpoints with their hit counters (shared across pipeline restarts).
#[derive(Debug, Default)]
pub struct Failpoints {
    /// Per point: fire on this hit (1-based); 0 = disarmed.
    fire_at: [u64; 2],
    hits: [AtomicU64; 2],
}

impl Failpoints {
    /// Parses `point:abort@N[,point:abort@N]`. An empty string arms nothing.
    ///
    /// # Errors
    /// An operator error naming the bad entry.
    pub fn parse(spec: &str) -> Result<Failpoints> {
        let mut fp = Failpoints::default();
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let bad = |why: &str| {
                Error::operator(format!("{ENV_VAR}: {entry:?} is not a failpoint: {why}")).with_hint(
                    "use point:abort@N with point after_delivery or after_ack and N >= 1, comma-separated; unset the variable outside tests",
                )
            };
            let (point, rest) = entry.split_once(':').ok_or_else(|| bad("missing ':'"))?;
            let point = match point {
                "after_delivery" => Point::AfterDelivery,
                "after_ack" => Point::AfterAck,
                _ => return Err(bad("unknown point")),
            };
            let (action, n) = rest.split_once('@').ok_or_else(|| bad("missing '@N'"))?;
            if action != "abort" {
                return Err(bad("the only action is abort"));
            }
            let n: u64 = n.parse().map_err(|_| bad("N is not a number"))?;
            if n == 0 {
                return Err(bad("N must be at least 1"));
            }
            fp.fire_at[point.index()] = n;
        }
        Ok(fp)
    }

    /// Reads [`ENV_VAR`]: `None` when it is unset or arms nothing.
    ///
    /// # Errors
    /// When it is set but malformed.
    pub fn from_env() -> Result<Option<Failpoints>> {
        match std::env::var(ENV_VAR) {
            Ok(spec) => {
                let fp = Failpoints::parse(&spec)?;
                Ok(fp.is_armed().then_some(fp))
            }
            Err(_) => Ok(None),
        }
    }

    /// Whether any point is armed.
    pub fn is_armed(&self) -> bool {
        self.fire_at.iter().any(|&n| n > 0)
    }

    /// Counts one hit of `point`; true when this is the hit it fires on.
    pub fn hit(&self, point: Point) -> bool {
        let at = self.fire_at[point.index()];
        at > 0 && self.hits[point.index()].fetch_add(1, Ordering::Relaxed) + 1 == at
    }

    /// Fires `point`: logs and aborts the process.
    pub fn fire(point: Point) -> ! {
        eprintln!(
            "walcast: failpoint {} fired: aborting the process",
            point.name()
        );
        std::process::abort()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_counts() {
        let fp = Failpoints::parse("after_delivery:abort@3, after_ack:abort@1").unwrap();
        assert!(fp.is_armed());
        assert!(!fp.hit(Point::AfterDelivery));
        assert!(!fp.hit(Point::AfterDelivery));
        assert!(fp.hit(Point::AfterDelivery), "fires on the third hit");
        assert!(!fp.hit(Point::AfterDelivery), "and only once");
        assert!(fp.hit(Point::AfterAck));
        let none = Failpoints::parse("").unwrap();
        assert!(!none.is_armed());
        assert!(!none.hit(Point::AfterAck));
    }

    #[test]
    fn rejects_malformed_specs() {
        for bad in [
            "after_delivery",
            "nowhere:abort@1",
            "after_ack:panic@1",
            "after_ack:abort@0",
            "after_ack:abort@x",
            "after_ack:abort",
        ] {
            let err = Failpoints::parse(bad).unwrap_err();
            assert!(err.to_string().contains(ENV_VAR), "{bad}: {err}");
        }
    }
}
