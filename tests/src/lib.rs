//! walcast's test support: the shared environment (real PostgreSQL and real
//! Apache Kafka, started once by `scripts/dev env up`), per-test isolation
//! (own database, slot, publication and topics), a real rdkafka consumer,
//! a handle on a running `walcast` process, the loss/order/ack-safety
//! checker, and the reliability suite's tools: a TCP fault proxy, a writer
//! with an auditor slot, a three-node Kafka cluster, and the report.
#![warn(missing_docs)]

pub mod chaos;
pub mod checker;
pub mod cluster;
pub mod env;
pub mod jaeger;
pub mod kafka;
pub mod net;
pub mod pg;
pub mod process;
pub mod proxy;
pub mod workload;

pub use env::TestEnv;
