//! The binary end to end: each test spawns `fraiseql-observers` against a fresh database and a
//! local webhook receiver, and asserts what arrives at the receiver and what is in the database.

#[path = "../../../fraiseql-observers/tests/e2e_integration/receiver.rs"]
mod receiver;

mod harness;

mod crash;
mod dlq;
mod endpoints;
mod operator;
mod shutdown;
mod standby;
mod validate;
