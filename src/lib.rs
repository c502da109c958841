//! # ordercast
//!
//! Turns every committed change to orders in PostgreSQL into live pushes to
//! browsers, over WebSocket and SSE, with gapless resume.
//!
//! # Layout: the data flow
//!
//! **Write paths** — REST (`routes::orders`), the Kafka ingest and a DBA's SQL
//! all end in the `orders` table. Input is parsed once into `domain` types
//! (`NewOrder`, `OrderPatch`, `Filter`); the database enforces the rest
//! (constraints, the status state machine in `sql/V1__orders.sql`).
//!
//! **Kafka ingest** (`ingest`) — a consumer group member reads order events
//! (JSON or Avro, `schemas/`) from `KAFKA_TOPIC` into bounded batches; each
//! batch is applied with multi-row statements in ONE transaction together with
//! the partition positions and the event ids, so a crash, a rebalance or a
//! producer's duplicate neither loses nor doubles an order. Transient database
//! failures are retried with backoff; rejected messages go to `dead_letters`
//! and the dead-letter topic. `KAFKA_BROKERS` unset: ingest off.
//!
//! **Change capture** — triggers append every changed row to the change log
//! and, at commit, a serialised sequencer assigns positions in commit order
//! and rings a NOTIFY doorbell (`sql/V2__change_log.sql`). Positions become
//! visible strictly in order, so "everything after P" is always gapless.
//!
//! **Listener** (`changes::listener`) — one dedicated LISTEN connection reads
//! the log after its position in batches and publishes to the hub; it
//! reconnects with backoff and a watchdog replaces a silent connection.
//!
//! **Hub** (`hub`) — fans each change out to subscriptions, serialized once and
//! shared, through bounded queues with indexed filters; never waits on a client.
//!
//! **Sessions** (`changes::feed`, `routes::ws`, `routes::sse`) — each client's
//! feed catches up from the log (`since` / `Last-Event-ID` / snapshot), then
//! follows the hub; a client that falls behind catches up from the log again,
//! and one whose position was pruned is told to resync.
//!
//! **Workflow** (`workflow`) — reads the same change log to drive other
//! services: the outbox relay publishes every committed change to Kafka
//! (`order-changes`) from its own stored position, at least once, in commit
//! order per order; the processor moves `pending` orders through payment and
//! inventory, compensating on failure and recording every step so restarts
//! neither repeat nor lose one; `ordercast produce` simulates traffic and
//! `ordercast demo` runs all of it with an embedded broker.
//!
//! **Start-up** (`startup`, `config`, `db`) — one `Application::build` for
//! production and tests; `db::embedded` runs a private PostgreSQL when no
//! `DATABASE_URL` is given.

pub mod auth;
pub mod backoff;
pub mod changes;
pub mod config;
pub mod db;
pub mod domain;
pub mod error;
pub mod hub;
pub mod ingest;
pub mod limits;
pub mod metrics;
pub mod routes;
pub mod startup;
pub mod workflow;

/// The longest prefix of `s` of at most `max_bytes` bytes that ends at a
/// character boundary: text cut to a limit (a close reason, a log line, a
/// dead letter's detail) stays valid UTF-8.
pub fn prefix_within(s: &str, max_bytes: usize) -> &str {
    let mut end = s.len().min(max_bytes);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
