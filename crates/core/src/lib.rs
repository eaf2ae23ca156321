//! walcast's relay core: the outbox filter, routing, the ack tracker, the
//! pipeline loop, configuration and the error policy. No network code: the
//! replication source and the Kafka sink plug in through [`source`] and
//! [`sink`].
#![warn(missing_docs)]

pub mod ack;
pub mod check;
pub mod config;
pub mod dead_letter;
pub mod error;
pub mod failpoint;
pub mod outbox;
pub mod pipeline;
pub mod route;
pub mod sink;
pub mod source;
pub mod state;

pub use error::{Decision, Error, ErrorKind, Origin, Result};
pub use walcast_pgoutput::Lsn;
