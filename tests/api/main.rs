//! Integration tests: the real application against a real PostgreSQL.

mod helpers;
mod orders;
mod realtime;
