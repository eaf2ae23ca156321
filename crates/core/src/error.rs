//! One classified error for the relay, and the one place that maps a kind to a decision.
//!
//! Every error walcast reports says what happened and what to do about it. The
//! [`ErrorKind`] decides what the supervisor does next (see [`ErrorKind::decision`]).

use std::fmt;

/// How an error must be handled. One place ([`ErrorKind::decision`]) maps it to an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A transient condition (network, broker or database restart, delivery
    /// failure): drop in-flight work, back off, and resume from the slot's
    /// confirmed position. Nothing is skipped.
    Retryable,
    /// The input itself cannot be published (oversize record, unroutable row,
    /// malformed protocol data). Retrying would fail the same way; walcast
    /// stops without moving the slot past it (or dead-letters it, when configured).
    Permanent,
    /// The setup is wrong (configuration, privileges, slot state). An operator
    /// must act; walcast exits non-zero with the fix in the message.
    OperatorAction,
}

/// Which side of the relay an error came from (for the restart metric and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Origin {
    /// Kafka: the producer, a delivery, the admin client.
    Kafka,
    /// Postgres: the replication connection, preflight, the catalog check.
    Postgres,
    /// Kafka acknowledged nothing for `kafka.delivery_timeout_ms`.
    DeliveryTimeout,
}

impl Origin {
    /// A short stable name, used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Kafka => "kafka",
            Origin::Postgres => "postgres",
            Origin::DeliveryTimeout => "delivery_timeout",
        }
    }
}

/// What the supervisor does with an error of a given kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Restart the pipeline from the slot after a backoff.
    RestartFromSlot,
    /// Stop and exit with a non-zero status.
    Exit,
}

impl ErrorKind {
    /// The action for this kind. This is the only mapping from kinds to actions.
    pub fn decision(self) -> Decision {
        match self {
            ErrorKind::Retryable => Decision::RestartFromSlot,
            ErrorKind::Permanent | ErrorKind::OperatorAction => Decision::Exit,
        }
    }

    /// A short stable name, used in logs and headers.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Retryable => "retryable",
            ErrorKind::Permanent => "permanent",
            ErrorKind::OperatorAction => "operator_action",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The relay's error: a kind, what happened, and (usually) what to do.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    hint: Option<String>,
    origin: Option<Origin>,
    /// The event the error is about, for log fields (never its payload).
    event: Option<Box<EventRef>>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    /// The event this error refused, when it can never be published (for
    /// the dead-letter policy).
    rejected: Option<Box<crate::dead_letter::Rejected>>,
}

/// The identity of one event, carried by an error about it so log lines can
/// show it as fields (`event_id`, `correlation_id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRef {
    /// The event id (the outbox row's id column, as text).
    pub id: String,
    /// The correlation id, when the outbox row has one.
    pub correlation_id: Option<String>,
}

/// Result alias for the relay.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` saying `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            hint: None,
            origin: None,
            event: None,
            source: None,
            rejected: None,
        }
    }

    /// A transient error: the pipeline restarts from the slot.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Retryable, message)
    }

    /// An error caused by the data itself.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Permanent, message)
    }

    /// An error an operator must fix.
    pub fn operator(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::OperatorAction, message)
    }

    /// Adds what to do about it.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Names the event the error is about (its id and correlation id, as
    /// text; never its payload), for the log line's fields.
    pub fn with_event(mut self, id: &[u8], correlation_id: Option<&[u8]>) -> Self {
        self.event = Some(Box::new(EventRef {
            id: String::from_utf8_lossy(id).into_owned(),
            correlation_id: correlation_id.map(|c| String::from_utf8_lossy(c).into_owned()),
        }));
        self
    }

    /// The id of the event the error is about, when it is about one.
    pub fn event_id(&self) -> Option<&str> {
        self.event.as_ref().map(|e| e.id.as_str())
    }

    /// The correlation id of the event the error is about, when it has one.
    pub fn correlation_id(&self) -> Option<&str> {
        self.event.as_ref()?.correlation_id.as_deref()
    }

    /// Marks where the error came from, unless that is already known.
    pub fn or_origin(mut self, origin: Origin) -> Self {
        self.origin.get_or_insert(origin);
        self
    }

    /// Attaches the event this error refused: it can never be published as
    /// it is, and the dead-letter policy may deliver it to the dead-letter
    /// topic instead.
    pub fn with_rejected(mut self, rejected: crate::dead_letter::Rejected) -> Self {
        self.rejected = Some(Box::new(rejected));
        self
    }

    /// The event this error refused, when attached.
    pub fn rejected(&self) -> Option<&crate::dead_letter::Rejected> {
        self.rejected.as_deref()
    }

    /// Detaches the refused event (an error that must stop walcast whatever
    /// the policy, for example a failed dead-letter record).
    pub fn without_rejected(mut self) -> Self {
        self.rejected = None;
        self
    }

    /// Where the error came from, when known.
    pub fn origin(&self) -> Option<Origin> {
        self.origin
    }

    /// The classification.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// What happened.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// What to do, when known.
    pub fn hint(&self) -> Option<&str> {
        self.hint.as_deref()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(source) = &self.source {
            let s = source.to_string();
            if !s.is_empty() && !self.message.contains(&s) {
                write!(f, ": {s}")?;
            }
        }
        if let Some(hint) = &self.hint {
            // One full stop between what happened and the fix.
            let mut shown = self.message.clone();
            if let Some(source) = &self.source {
                shown.push_str(&source.to_string());
            }
            let sep = if shown.trim_end().ends_with('.') {
                " "
            } else {
                ". "
            };
            write!(f, "{sep}Fix: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_carries_message_source_and_hint() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = Error::retryable("cannot reach Kafka at 127.0.0.1:1")
            .with_source(io)
            .with_hint("check kafka.bootstrap_servers");
        assert_eq!(
            e.to_string(),
            "cannot reach Kafka at 127.0.0.1:1: refused. Fix: check kafka.bootstrap_servers"
        );
        assert_eq!(e.kind().decision(), Decision::RestartFromSlot);
        assert_eq!(Error::operator("x").kind().decision(), Decision::Exit);
        assert_eq!(Error::permanent("x").kind().decision(), Decision::Exit);
    }
}
