//! Configuration: one typed struct, read from flags and environment variables
//! (12-factor). Every field has a documented default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// ordercast: pushes every committed change to PostgreSQL orders to browsers,
/// over WebSocket and SSE, with gapless resume.
#[derive(Debug, Parser)]
#[command(name = "ordercast", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub settings: Settings,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (the default when no subcommand is given).
    Serve,
    /// Apply the database migrations and exit.
    Migrate,
}

/// Everything the server needs to run.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Address to listen on for HTTP, WebSocket and SSE.
    #[arg(long, env = "ORDERCAST_BIND", default_value = "127.0.0.1:8080", global = true)]
    pub bind: SocketAddr,

    /// PostgreSQL URL. Unset: ordercast runs a private PostgreSQL instance from
    /// the installed binaries, with its data in --data-dir.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<String>,

    /// Where the embedded PostgreSQL keeps its data (only without DATABASE_URL).
    #[arg(long, env = "ORDERCAST_DATA_DIR", default_value = ".ordercast", global = true)]
    pub data_dir: PathBuf,

    /// Maximum connections in the REST pool.
    #[arg(long, env = "ORDERCAST_DB_POOL_SIZE", default_value_t = 16, global = true)]
    pub db_pool_size: usize,

    /// Seconds a REST request waits for a database connection before answering 503.
    #[arg(long, env = "ORDERCAST_DB_TIMEOUT_SECS", default_value_t = 3, global = true)]
    pub db_timeout_secs: u64,

    /// Changes a client may have queued before it is considered lagging.
    /// A lagging client catches up from the change log; memory stays bounded.
    #[arg(long, env = "ORDERCAST_CLIENT_BUFFER", default_value_t = 4096, global = true)]
    pub client_buffer: usize,

    /// Seconds a write to a client may block before the client is disconnected
    /// as too slow (WebSocket close code 4008).
    #[arg(long, env = "ORDERCAST_SLOW_CLIENT_SECS", default_value_t = 10, global = true)]
    pub slow_client_secs: u64,

    /// Keep change-log entries for this many seconds (0: no age limit).
    #[arg(long, env = "ORDERCAST_RETENTION_SECS", default_value_t = 7 * 24 * 3600, global = true)]
    pub retention_secs: u64,

    /// Keep at most this many change-log positions (0: no count limit).
    #[arg(long, env = "ORDERCAST_RETENTION_ROWS", default_value_t = 10_000_000, global = true)]
    pub retention_rows: u64,

    /// Seconds between retention and statistics maintenance runs.
    #[arg(long, env = "ORDERCAST_MAINTENANCE_SECS", default_value_t = 5, global = true)]
    pub maintenance_secs: u64,

    /// Largest request body accepted, in bytes (larger: 413).
    #[arg(long, env = "ORDERCAST_MAX_BODY_BYTES", default_value_t = 256 * 1024, global = true)]
    pub max_body_bytes: usize,

    /// Largest WebSocket frame accepted from a client, in bytes (larger: close 1009).
    #[arg(long, env = "ORDERCAST_MAX_FRAME_BYTES", default_value_t = 64 * 1024, global = true)]
    pub max_frame_bytes: usize,

    /// HTTP worker threads (0: one per core).
    #[arg(long, env = "ORDERCAST_WORKERS", default_value_t = 0, global = true)]
    pub workers: usize,
}

impl Settings {
    pub fn db_timeout(&self) -> Duration {
        Duration::from_secs(self.db_timeout_secs.max(1))
    }

    pub fn slow_client_timeout(&self) -> Duration {
        Duration::from_secs(self.slow_client_secs.max(1))
    }

    /// Settings for tests and embedding: defaults with the given database.
    pub fn for_database(database_url: &str) -> Self {
        let cli = Cli::parse_from(["ordercast", "--bind", "127.0.0.1:0", "--database-url", database_url]);
        cli.settings
    }
}
