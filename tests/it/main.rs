//! walcast's integration tests: one binary against the real PostgreSQL and the
//! real Apache Kafka started by `scripts/dev env up` (once per run). Every test
//! has its own database, slot, publication and topics. Tests that stop or
//! restart a service take the environment's exclusive lock.

mod common;
mod consumer;

mod bad_setup;
mod broker_rejection;
mod dead_letter;
mod deploy;
mod edges;
mod envelope;
mod example;
mod faults;
mod operations;
mod ops;
mod parity;
mod pgoutput_live;
mod pipelines;
mod relay;
mod reliability;
mod routing;
mod slot_record;
mod streaming;
mod tls;
mod traces;
mod writer;
