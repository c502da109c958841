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
    /// Run only the order processor (payment, inventory, compensation).
    Process,
    /// Send realistic random order events to the Kafka ingest topic.
    Produce(crate::workflow::simulator::ProduceArgs),
    /// Run everything on this machine: embedded PostgreSQL and Kafka broker,
    /// simulator, ingest, processor, outbox relay and dashboard.
    Demo(crate::workflow::demo::DemoArgs),
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
    #[arg(long, env = "ORDERCAST_DB_POOL_SIZE", default_value_t = 16, value_parser = at_least_one(), global = true)]
    pub db_pool_size: usize,

    /// Maximum connections for the streams' reads (catch-up from the log,
    /// snapshots, resume checks), a pool of their own: however many streams
    /// catch up at once, the REST API keeps its connections.
    #[arg(long, env = "ORDERCAST_STREAM_POOL_SIZE", default_value_t = 8, value_parser = at_least_one(), global = true)]
    pub stream_pool_size: usize,

    /// Seconds a REST request waits for a database connection before answering 503.
    #[arg(long, env = "ORDERCAST_DB_TIMEOUT_SECS", default_value_t = 3, value_parser = seconds(1, HOUR), global = true)]
    pub db_timeout_secs: u64,

    /// Changes a client may have queued before it is considered lagging.
    /// A lagging client catches up from the change log; memory stays bounded.
    #[arg(long, env = "ORDERCAST_CLIENT_BUFFER", default_value_t = 4096, value_parser = at_least_one(), global = true)]
    pub client_buffer: usize,

    /// MiB of snapshot rows the streams hold at once, read and not yet sent:
    /// past it, a stream asking for a snapshot is refused for now (WebSocket
    /// 4503, SSE 503 `server_busy`). One larger than all of it goes alone.
    #[arg(long, env = "ORDERCAST_SNAPSHOT_MEMORY_MIB", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=1_048_576), global = true)]
    pub snapshot_memory_mib: u32,

    /// Seconds a write to a client may block before the client is disconnected
    /// as too slow (WebSocket close code 4008).
    #[arg(long, env = "ORDERCAST_SLOW_CLIENT_SECS", default_value_t = 10, value_parser = seconds(1, HOUR), global = true)]
    pub slow_client_secs: u64,

    /// Keep change-log entries for this many seconds (0: no age limit).
    #[arg(long, env = "ORDERCAST_RETENTION_SECS", default_value_t = 7 * 24 * 3600, value_parser = seconds(0, 100 * YEAR), global = true)]
    pub retention_secs: u64,

    /// Keep at most this many change-log positions (0: no count limit).
    #[arg(long, env = "ORDERCAST_RETENTION_ROWS", default_value_t = 10_000_000, value_parser = clap::value_parser!(u64).range(0..=i64::MAX as u64), global = true)]
    pub retention_rows: u64,

    /// Seconds between retention and statistics maintenance runs.
    #[arg(long, env = "ORDERCAST_MAINTENANCE_SECS", default_value_t = 5, value_parser = seconds(1, 24 * HOUR), global = true)]
    pub maintenance_secs: u64,

    /// Largest request body accepted, in bytes (larger: 413).
    #[arg(long, env = "ORDERCAST_MAX_BODY_BYTES", default_value_t = 256 * 1024, value_parser = bytes(1024, 64 * MIB), global = true)]
    pub max_body_bytes: usize,

    /// Largest WebSocket frame accepted from a client, in bytes (larger: close 1009).
    #[arg(long, env = "ORDERCAST_MAX_FRAME_BYTES", default_value_t = 64 * 1024, value_parser = bytes(1024, 64 * MIB), global = true)]
    pub max_frame_bytes: usize,

    /// API keys: comma-separated `name:secret:scope+scope[:customer=Name]`, scopes
    /// read, write, admin (e.g. `dash:s3cr3tkey:read+write`). With no keys and no
    /// JWT secret, authentication is off.
    #[arg(long, env = "ORDERCAST_API_KEYS", hide_env_values = true, global = true)]
    pub api_keys: Option<Secret>,

    /// Secret for HS256 JWTs (claims: sub, exp, scope "read write", optional customer).
    #[arg(long, env = "ORDERCAST_JWT_SECRET", hide_env_values = true, global = true)]
    pub jwt_secret: Option<Secret>,

    /// The audience a JWT's `aud` must hold (not checked when unset).
    #[arg(long, env = "ORDERCAST_JWT_AUDIENCE", global = true)]
    pub jwt_audience: Option<String>,

    /// The issuer a JWT's `iss` must be (not checked when unset).
    #[arg(long, env = "ORDERCAST_JWT_ISSUER", global = true)]
    pub jwt_issuer: Option<String>,

    /// Allow listening on a non-loopback address without any tokens configured.
    #[arg(long, env = "ORDERCAST_INSECURE", value_parser = clap::builder::BoolishValueParser::new(), global = true)]
    pub insecure: bool,

    /// Browser origins allowed to open WebSockets and make CORS requests
    /// (comma-separated, e.g. `https://ops.example.com`). Same-origin is always allowed.
    #[arg(long, env = "ORDERCAST_ALLOWED_ORIGINS", value_delimiter = ',', value_parser = origin, global = true)]
    pub allowed_origins: Vec<String>,

    /// Streaming connections (WebSocket + SSE) the server holds at most (503 beyond).
    #[arg(long, env = "ORDERCAST_MAX_CONNECTIONS", default_value_t = 19_000, value_parser = at_least_one(), global = true)]
    pub max_connections: usize,

    /// Streaming connections one client IP may hold (429 beyond).
    #[arg(long, env = "ORDERCAST_MAX_CONNECTIONS_PER_IP", default_value_t = 1_000, value_parser = at_least_one(), global = true)]
    pub max_connections_per_ip: usize,

    /// REST writes per second per token (per IP without auth); 0: unlimited. 429 beyond.
    #[arg(long, env = "ORDERCAST_WRITE_RATE", default_value_t = 200.0, value_parser = rate, global = true)]
    pub write_rate: f64,

    /// Burst of REST writes allowed above the rate.
    #[arg(long, env = "ORDERCAST_WRITE_BURST", default_value_t = 400.0, value_parser = burst, global = true)]
    pub write_burst: f64,

    /// Invalid tokens one client address may send per second, after a burst (see the
    /// next); beyond, no token from the address is checked (429). 0: unlimited.
    #[arg(long, env = "ORDERCAST_AUTH_FAILURE_RATE", default_value_t = 5.0, value_parser = rate, global = true)]
    pub auth_failure_rate: f64,

    /// Invalid tokens one client address may send at once.
    #[arg(long, env = "ORDERCAST_AUTH_FAILURE_BURST", default_value_t = 50.0, value_parser = burst, global = true)]
    pub auth_failure_burst: f64,

    /// Subscribe messages one WebSocket may send per minute (each replaces its subscription).
    #[arg(long, env = "ORDERCAST_MAX_SUBSCRIBES_PER_MINUTE", default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub max_subscribes_per_minute: u32,

    /// HTTP worker threads (0: one per core).
    #[arg(long, env = "ORDERCAST_WORKERS", default_value_t = 0, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=1024), global = true)]
    pub workers: usize,

    /// The Kafka ingest (off unless KAFKA_BROKERS is set).
    #[command(flatten)]
    pub kafka: crate::ingest::KafkaSettings,

    /// The outbox relay and the order processor.
    #[command(flatten)]
    pub workflow: crate::workflow::WorkflowSettings,
}

/// A configuration value that must never be printed (tokens, secrets).
#[derive(Clone)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

/// One allowed origin as a browser sends it, `scheme://host[:port]`: spaces
/// around it (after a comma) and a trailing `/` go, the scheme and host are
/// lowercased and a default port (`:443` for https, `:80` for http) dropped,
/// as a browser writes them in `Origin`. Anything that would match nothing
/// is refused: an empty one (a stray comma), a path, a query, user
/// information, a scheme other than http or https, and `*` (every origin is
/// not an option: list them).
fn origin(s: &str) -> Result<String, String> {
    let o = s.trim().trim_end_matches('/');
    if o.is_empty() {
        return Err("an empty origin (a stray comma?)".into());
    }
    let shape = || format!("{o:?} is not an origin: scheme://host[:port], with no path (https://ops.example.com)");
    if o.contains('*') {
        return Err(format!("{o:?}: wildcards are not supported; list each origin"));
    }
    let (scheme, host) = o.split_once("://").ok_or_else(shape)?;
    let scheme = scheme.to_ascii_lowercase();
    if !matches!(scheme.as_str(), "http" | "https") || host.is_empty() || host.contains(['/', '?', '#', '@', ' ']) {
        return Err(shape());
    }
    let host = host.to_ascii_lowercase();
    let default_port = if scheme == "https" { ":443" } else { ":80" };
    let host = host.strip_suffix(default_port).unwrap_or(&host);
    Ok(format!("{scheme}://{host}"))
}

/// A share, 0 to 1 (a simulated service's failure rate).
pub(crate) fn share(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?}: a share is a number from 0 to 1")),
    }
}

/// A rate limiter's rate per second: 0 (no limit) or more. A negative rate
/// or NaN would also switch the limit off, silently.
fn rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 0.0 => Ok(r),
        _ => Err(format!("{s:?}: a rate is a number per second, 0 (no limit) or more")),
    }
}

pub(crate) const HOUR: u64 = 3600;
const MIB: u64 = 1024 * 1024;

/// A size in bytes from `min` to `max`: below, no request (or subscribe)
/// could pass, and every one would be refused only when it came; far above,
/// the sums with it could overflow.
fn bytes(min: u64, max: u64) -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(min..=max)
}
pub(crate) const YEAR: u64 = 365 * 24 * HOUR;

/// A number of seconds from `min` to `max`: past a bound, a timer or a
/// date computed from it would overflow (a panic, or an error at every
/// maintenance run), and 0 where it means nothing would be taken as 1.
pub(crate) fn seconds(min: u64, max: u64) -> clap::builder::RangedU64ValueParser<u64> {
    clap::value_parser!(u64).range(min..=max)
}

/// A count of at least one (a pool, a connection limit): 0 would be taken as
/// 1, or turn every client away.
pub(crate) fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
}

/// A Kafka topic's name as the broker takes it: 1 to 249 of `a-z A-Z 0-9 .
/// _ -`, not `.` or `..`. Checked at start: a name the broker refuses (a
/// stray space from a .env file, say) was retried for ever, and went into
/// the stored positions' keys.
pub(crate) fn kafka_topic(s: &str) -> Result<String, String> {
    let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if s.is_empty() || s.len() > 249 || s == "." || s == ".." || !s.chars().all(legal) {
        return Err(format!(
            "{s:?} is not a Kafka topic name: 1 to 249 letters, digits, '.', '_' or '-' (not '.' or '..')"
        ));
    }
    Ok(s.to_string())
}

/// A topic's name as `kafka_topic` takes it, or empty to turn its use off.
pub(crate) fn kafka_topic_or_off(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Ok(String::new());
    }
    kafka_topic(s)
}

/// A rate limiter's burst: at least one (a rate of 0 turns the limit off).
fn burst(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(b) if b.is_finite() && b >= 1.0 => Ok(b),
        _ => Err(format!("{s:?}: a burst is a number of at least 1 (a rate of 0 turns the limit off)")),
    }
}

impl Settings {
    pub fn db_timeout(&self) -> Duration {
        Duration::from_secs(self.db_timeout_secs.max(1))
    }

    pub fn slow_client_timeout(&self) -> Duration {
        Duration::from_secs(self.slow_client_secs.max(1))
    }

    /// The HTTP worker threads to start: `workers`, or with 0, one per core.
    /// On a 2-core machine two workers gave the lower latency at 100 and
    /// 1,000 clients, one the higher throughput at 10,000 clients
    /// (docs/performance.md, "Thirteenth session").
    pub fn http_workers(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    /// Settings for tests and embedding: defaults with the given database.
    pub fn for_database(database_url: &str) -> Self {
        let cli = Cli::parse_from(["ordercast", "--bind", "127.0.0.1:0", "--database-url", database_url]);
        cli.settings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_origins_are_taken_as_browsers_send_them() {
        let parse = |list: &str| {
            Cli::try_parse_from(["ordercast", "--database-url", "postgres://127.0.0.1/x", "--allowed-origins", list])
                .map(|cli| cli.settings.allowed_origins)
        };
        assert_eq!(
            parse("https://a.example, https://b.example/ ,http://127.0.0.1:8080").unwrap(),
            ["https://a.example", "https://b.example", "http://127.0.0.1:8080"]
        );
        let e = parse("https://a.example,,https://b.example").unwrap_err().to_string();
        assert!(e.contains("an empty origin"), "{e}");
        // As a browser writes them in Origin: lowercase, no default port.
        assert_eq!(
            parse("HTTPS://Ops.Example.com:443,http://[::1]:80,http://host:8443,https://x.example:80").unwrap(),
            ["https://ops.example.com", "http://[::1]", "http://host:8443", "https://x.example:80"]
        );
        // What would match nothing, or everything, is refused at start.
        for bad in [
            "*",
            "https://*.example.com",
            "ops.example.com",
            "https://a.example/app",
            "ftp://a.example",
            "https://user@a.example",
            "https://",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn kafka_topic_names_the_broker_would_refuse_are_refused_at_start() {
        let parse = |flag: &str, v: &str| {
            Cli::try_parse_from(["ordercast", "--database-url", "postgres://127.0.0.1/x", flag, v]).map(|cli| {
                let s = cli.settings;
                (s.kafka.topic, s.kafka.dlq_topic, s.workflow.outbox_topic)
            })
        };
        assert_eq!(parse("--kafka-topic", "orders.v2_eu-1").unwrap().0, "orders.v2_eu-1");
        assert_eq!(parse("--kafka-dlq-topic", "dead").unwrap().1, "dead");
        assert_eq!(parse("--outbox-topic", "").unwrap().2, "", "empty turns the relay off");
        let long = "t".repeat(250);
        for bad in [" order-changes", "orders ", "a/b", ".", "..", "ünïcode", long.as_str()] {
            for flag in ["--kafka-topic", "--kafka-dlq-topic", "--outbox-topic"] {
                let e = parse(flag, bad).expect_err(bad).to_string();
                assert!(e.contains("is not a Kafka topic name"), "{flag} {bad}: {e}");
            }
        }
        assert!(parse("--kafka-topic", "").is_err());
    }

    #[test]
    fn a_burst_is_at_least_one() {
        let parse = |flag: &str, v: &str| {
            Cli::try_parse_from(["ordercast", "--database-url", "postgres://127.0.0.1/x", flag, v])
                .map(|cli| (cli.settings.auth_failure_burst, cli.settings.write_burst))
        };
        assert_eq!(parse("--auth-failure-burst", "1").unwrap().0, 1.0);
        assert_eq!(parse("--write-burst", "2.5").unwrap().1, 2.5);
        for bad in ["0", "0.5", "-1", "NaN", "inf", "many"] {
            assert!(parse("--auth-failure-burst", bad).is_err(), "{bad}");
            assert!(parse("--write-burst", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rates_counts_and_times_out_of_their_range_are_refused() {
        let parse = |flag: &str, v: &str| {
            Cli::try_parse_from(["ordercast", "--database-url", "postgres://127.0.0.1/x", flag, v])
                .map(|cli| cli.settings)
        };
        assert_eq!(parse("--write-rate", "0").unwrap().write_rate, 0.0);
        assert_eq!(parse("--auth-failure-rate", "0.5").unwrap().auth_failure_rate, 0.5);
        for bad in ["-1", "NaN", "inf", "fast"] {
            assert!(parse("--write-rate", bad).is_err(), "{bad}");
            assert!(parse("--auth-failure-rate", bad).is_err(), "{bad}");
        }
        // Past i64: the cutoff `head - rows` wrapped and pruned the whole log.
        assert_eq!(parse("--retention-rows", "0").unwrap().retention_rows, 0);
        assert_eq!(parse("--retention-rows", &i64::MAX.to_string()).unwrap().retention_rows, i64::MAX as u64);
        assert!(parse("--retention-rows", "9223372036854775808").is_err());
        assert!(parse("--retention-rows", "18446744073709551615").is_err());
        assert_eq!(parse("--retention-secs", "0").unwrap().retention_secs, 0);
        assert!(parse("--retention-secs", "99999999999").is_err());
        for flag in ["--slow-client-secs", "--db-timeout-secs", "--maintenance-secs"] {
            assert!(parse(flag, "0").is_err(), "{flag} 0");
            assert!(parse(flag, "18446744073709551615").is_err(), "{flag} huge");
            assert!(parse(flag, "2").is_ok(), "{flag} 2");
        }
        // Before, these took any value: a body or frame limit of 0 refused
        // every request or message only when it came, and 100,000 workers
        // ran out of memory.
        for (flag, refused) in [
            ("--max-body-bytes", ["0", "1023", "67108865"].as_slice()),
            ("--max-frame-bytes", &["0", "1023", "67108865"]),
            ("--max-subscribes-per-minute", &["0"]),
            ("--workers", &["1025", "100000"]),
            ("--ingest-batch-wait-ms", &["60001"]),
            ("--step-latency-ms", &["60001"]),
        ] {
            for v in refused {
                assert!(parse(flag, v).is_err(), "{flag} {v}");
            }
        }
        assert_eq!(parse("--max-body-bytes", "1024").unwrap().max_body_bytes, 1024);
        assert_eq!(parse("--max-frame-bytes", "67108864").unwrap().max_frame_bytes, 64 << 20);
        assert_eq!(parse("--workers", "0").unwrap().workers, 0);
        assert_eq!(parse("--ingest-batch-wait-ms", "60000").unwrap().kafka.batch_wait_ms, 60_000);
        for flag in ["--db-pool-size", "--stream-pool-size", "--max-connections", "--max-connections-per-ip"] {
            assert!(parse(flag, "0").is_err(), "{flag} 0");
            assert!(parse(flag, "1").is_ok(), "{flag} 1");
        }
        // Before, a 0 here ran as 1; the README says a batch of 0 is refused.
        for flag in ["--client-buffer", "--outbox-batch", "--process-concurrency", "--snapshot-memory-mib"] {
            assert!(parse(flag, "0").is_err(), "{flag} 0");
            assert!(parse(flag, "1").is_ok(), "{flag} 1");
        }
        for flag in ["--payment-failure-rate", "--inventory-failure-rate"] {
            assert!(parse(flag, "2").is_err(), "{flag} 2");
            assert!(parse(flag, "0.5").is_ok(), "{flag} 0.5");
        }
    }

    #[test]
    fn http_workers_are_one_per_core_unless_set() {
        let mut settings = Settings::for_database("postgres://127.0.0.1/x");
        settings.workers = 3;
        assert_eq!(settings.http_workers(), 3);
        settings.workers = 0;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(settings.http_workers(), cores);
    }
}
