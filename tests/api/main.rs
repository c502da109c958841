//! Integration tests: the real application against a real PostgreSQL.

mod hardening;
mod helpers;
mod orders;
mod realtime;
