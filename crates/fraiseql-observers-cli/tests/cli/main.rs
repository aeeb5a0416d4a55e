//! The binary end to end: each test spawns `fraiseql-observers` against a fresh database and a
//! local webhook receiver, and asserts what arrives at the receiver and what is in the database.

mod harness;

mod backfill;
mod blackhole;
mod control;
mod crash;
mod distributed;
mod dlq;
mod docs;
mod endpoints;
mod operator;
mod restart;
mod shutdown;
mod standby;
mod validate;
