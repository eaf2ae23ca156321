//! The result of one setup check (`walcast check`): what was looked at, how
//! it stands, and the one-line fix. The Postgres and Kafka crates produce
//! them; the binary prints them.

use std::fmt;

use crate::error::Error;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CheckStatus {
    /// Fine.
    Ok,
    /// walcast runs, but an operator should look (a risk, not an error).
    Warn,
    /// walcast would refuse to start, stall, or stop at an event.
    Fail,
}

impl CheckStatus {
    /// `ok`, `warn` or `fail`.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckStatus::Ok => "ok",
            CheckStatus::Warn => "warn",
            CheckStatus::Fail => "fail",
        }
    }
}

impl fmt::Display for CheckStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    /// A stable name, e.g. `postgres.publication` or `kafka.topic.orders.durability`.
    pub name: String,
    /// How it came out.
    pub status: CheckStatus,
    /// What was found.
    pub detail: String,
    /// What to do (none for `Ok`).
    pub fix: Option<String>,
}

impl CheckResult {
    /// A passed check.
    pub fn ok(name: impl Into<String>, detail: impl Into<String>) -> Self {
        CheckResult {
            name: name.into(),
            status: CheckStatus::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    /// A warning with its fix.
    pub fn warn(
        name: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        CheckResult {
            name: name.into(),
            status: CheckStatus::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    /// A failure with its fix.
    pub fn fail(
        name: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        CheckResult {
            name: name.into(),
            status: CheckStatus::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    /// A failure from the error walcast itself would report: its message
    /// (with the cause) as the detail and its hint as the fix, so `check`
    /// and `run` say the same thing.
    pub fn from_error(name: impl Into<String>, e: &Error) -> Self {
        let mut detail = e.message().to_string();
        if let Some(source) = std::error::Error::source(e) {
            let s = source.to_string();
            if !s.is_empty() && !detail.contains(&s) {
                detail.push_str(": ");
                detail.push_str(&s);
            }
        }
        CheckResult {
            name: name.into(),
            status: CheckStatus::Fail,
            detail,
            fix: e.hint().map(str::to_string),
        }
    }

    /// The same, as a warning.
    pub fn warn_from_error(name: impl Into<String>, e: &Error) -> Self {
        CheckResult {
            status: CheckStatus::Warn,
            ..Self::from_error(name, e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_becomes_a_failure_with_its_hint_as_the_fix() {
        let io = std::io::Error::other("refused");
        let e = Error::operator("cannot reach it")
            .with_source(io)
            .with_hint("start it");
        let c = CheckResult::from_error("x.y", &e);
        assert_eq!(c.status, CheckStatus::Fail);
        assert_eq!(c.detail, "cannot reach it: refused");
        assert_eq!(c.fix.as_deref(), Some("start it"));
        assert_eq!(
            CheckResult::warn_from_error("x", &e).status,
            CheckStatus::Warn
        );
        assert!(CheckStatus::Fail > CheckStatus::Warn && CheckStatus::Warn > CheckStatus::Ok);
    }
}
