//! walcast's test support: the shared environment (real PostgreSQL and real
//! Apache Kafka, started once by `scripts/dev env up`), per-test isolation
//! (own database, slot, publication and topics), a real rdkafka consumer,
//! a handle on a running `walcast` process, and the loss/order/ack-safety
//! checker.
#![warn(missing_docs)]

pub mod checker;
pub mod env;
pub mod kafka;
pub mod pg;
pub mod process;

pub use env::TestEnv;
