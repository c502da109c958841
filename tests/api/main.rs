//! Integration tests: the real application against a real PostgreSQL.

mod faults;
mod hardening;
mod helpers;
mod orders;
mod realtime;
mod session;
mod tls;
