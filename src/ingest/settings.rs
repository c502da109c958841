//! The Kafka ingest's configuration, flattened into `config::Settings`.
//!
//! The four names the operators know (`KAFKA_BROKERS`, `KAFKA_TOPIC`,
//! `KAFKA_DLQ_TOPIC`, `KAFKA_GROUP_ID`) are explicit settings. Everything
//! librdkafka understands (TLS, mTLS, SASL, timeouts, fetch sizes) passes
//! through untouched, from `ORDERCAST_KAFKA_<PROPERTY>` environment variables
//! (`ORDERCAST_KAFKA_SECURITY_PROTOCOL=ssl` is `security.protocol=ssl`) and
//! from the `KAFKA_PROPERTIES` list, so no broker setup needs a code change.

use std::fmt;
use std::time::Duration;

use crate::config::{at_least_one, kafka_topic, seconds, YEAR};
use clap::{Args, ValueEnum};

/// Prefix of the environment variables passed to librdkafka as properties.
pub const ENV_PREFIX: &str = "ORDERCAST_KAFKA_";

/// How a message without a `content-type` header is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Json,
    Avro,
}

#[derive(Clone, Args)]
pub struct KafkaSettings {
    /// Kafka bootstrap servers, comma-separated host:port. Unset: the Kafka
    /// ingest is off (one log line says so, and /api/health).
    #[arg(long = "kafka-brokers", env = "KAFKA_BROKERS", global = true)]
    pub brokers: Option<String>,

    /// Topic the order events are read from.
    #[arg(long = "kafka-topic", env = "KAFKA_TOPIC", default_value = "orders", value_parser = kafka_topic, global = true)]
    pub topic: String,

    /// Topic rejected messages are copied to, with headers naming the reason.
    #[arg(long = "kafka-dlq-topic", env = "KAFKA_DLQ_TOPIC", default_value = "orders-dlq", value_parser = kafka_topic, global = true)]
    pub dlq_topic: String,

    /// Consumer group: instances with the same group share the partitions.
    #[arg(long = "kafka-group-id", env = "KAFKA_GROUP_ID", default_value = "ordercast", global = true)]
    pub group_id: String,

    /// More librdkafka properties, `key=value`, separated by newlines or commas
    /// (a comma followed by text without '=' stays in the value, so
    /// `ssl.cipher.suites=A,B` works). Applied after ORDERCAST_KAFKA_*.
    #[arg(long = "kafka-properties", env = "KAFKA_PROPERTIES", hide_env_values = true, global = true)]
    pub properties: Option<String>,

    /// Format of messages that carry no content-type header.
    #[arg(long = "ingest-format", env = "ORDERCAST_INGEST_FORMAT", value_enum, default_value_t = Format::Json, global = true)]
    pub default_format: Format,

    /// At most this many messages per database transaction.
    #[arg(long = "ingest-batch-max", env = "ORDERCAST_INGEST_BATCH_MAX", default_value_t = 5000, value_parser = at_least_one(), global = true)]
    pub batch_max: usize,

    /// At most this many payload bytes per database transaction.
    #[arg(long = "ingest-batch-max-bytes", env = "ORDERCAST_INGEST_BATCH_MAX_BYTES", default_value_t = 8 * 1024 * 1024, value_parser = at_least_one(), global = true)]
    pub batch_max_bytes: usize,

    /// Database connections writing at once; a batch is split among them by
    /// partition (each part is its own exactly-once transaction).
    #[arg(long = "ingest-writers", env = "ORDERCAST_INGEST_WRITERS", default_value_t = 2, value_parser = at_least_one(), global = true)]
    pub writers: usize,

    /// Milliseconds a batch waits for more messages after its first one.
    #[arg(long = "ingest-batch-wait-ms", env = "ORDERCAST_INGEST_BATCH_WAIT_MS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=60_000), global = true)]
    pub batch_wait_ms: u64,

    /// Milliseconds between commits of the consumer position to Kafka (a
    /// courtesy that saves re-reading: the position that counts is stored in
    /// PostgreSQL with the rows).
    #[arg(
        long = "ingest-commit-interval-ms",
        env = "ORDERCAST_INGEST_COMMIT_INTERVAL_MS",
        default_value_t = 1000,
        global = true
    )]
    pub commit_interval_ms: u64,

    /// Seconds an event_id is remembered for deduplication.
    #[arg(long = "ingest-dedupe-retention-secs", env = "ORDERCAST_INGEST_DEDUPE_RETENTION_SECS", default_value_t = 7 * 24 * 3600, value_parser = seconds(0, 100 * YEAR), global = true)]
    pub dedupe_retention_secs: u64,

    /// Seconds dead letters are kept in the dead_letters table once published.
    #[arg(long = "ingest-dlq-retention-secs", env = "ORDERCAST_INGEST_DLQ_RETENTION_SECS", default_value_t = 30 * 24 * 3600, value_parser = seconds(0, 100 * YEAR), global = true)]
    pub dead_letter_retention_secs: u64,

    /// librdkafka properties from `ORDERCAST_KAFKA_*`, read once at start-up.
    #[arg(skip = env_properties(std::env::vars()))]
    pub env_properties: Vec<(String, String)>,
}

/// Property values may be secrets (sasl.password, ssl.key.password): only
/// their names are ever printed.
impl fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> =
            self.librdkafka_properties().map(|p| p.into_iter().map(|(k, _)| k).collect()).unwrap_or_default();
        f.debug_struct("KafkaSettings")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("dlq_topic", &self.dlq_topic)
            .field("group_id", &self.group_id)
            .field("properties", &names)
            .field("default_format", &self.default_format)
            .field("batch_max", &self.batch_max)
            .field("batch_max_bytes", &self.batch_max_bytes)
            .field("batch_wait_ms", &self.batch_wait_ms)
            .field("writers", &self.writers)
            .field("commit_interval_ms", &self.commit_interval_ms)
            .finish_non_exhaustive()
    }
}

/// `ORDERCAST_KAFKA_SSL_CA_LOCATION=/ca.pem` -> `("ssl.ca.location", "/ca.pem")`.
pub fn env_properties(vars: impl IntoIterator<Item = (String, String)>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = vars
        .into_iter()
        .filter_map(|(k, v)| {
            let name = k.strip_prefix(ENV_PREFIX)?;
            (!name.is_empty()).then(|| (name.to_ascii_lowercase().replace('_', "."), v))
        })
        .collect();
    out.sort();
    out
}

/// Splits `a=1,b=2,c` / newline-separated lists into pairs; a piece without
/// '=' belongs to the previous value (cipher lists, broker lists).
pub fn parse_property_list(list: &str) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in list.lines() {
        for piece in line.split(',') {
            match piece.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => out.push((k.trim().to_string(), v.trim().to_string())),
                Some(_) => return Err(format!("KAFKA_PROPERTIES: {piece:?} has no property name")),
                None if piece.trim().is_empty() => {}
                None => match out.last_mut() {
                    Some((_, v)) => {
                        v.push(',');
                        v.push_str(piece.trim());
                    }
                    None => return Err(format!("KAFKA_PROPERTIES: expected key=value, got {piece:?}")),
                },
            }
        }
    }
    Ok(out)
}

impl KafkaSettings {
    pub fn enabled(&self) -> bool {
        self.brokers.as_deref().is_some_and(|b| !b.trim().is_empty())
    }

    /// The pass-through properties, environment first, then KAFKA_PROPERTIES
    /// (later entries win when librdkafka applies them in order).
    pub fn librdkafka_properties(&self) -> Result<Vec<(String, String)>, String> {
        let mut out = self.env_properties.clone();
        if let Some(list) = &self.properties {
            out.extend(parse_property_list(list)?);
        }
        Ok(out)
    }

    pub fn batch_wait(&self) -> Duration {
        Duration::from_millis(self.batch_wait_ms)
    }

    pub fn commit_interval(&self) -> Duration {
        Duration::from_millis(self.commit_interval_ms.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_variables_map_to_dotted_property_names() {
        let vars = [
            ("ORDERCAST_KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
            ("ORDERCAST_KAFKA_SSL_CA_LOCATION", "/etc/ca.pem"),
            ("ORDERCAST_BIND", "0.0.0.0:1"),
            ("ORDERCAST_KAFKA_", "ignored"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        assert_eq!(
            env_properties(vars),
            [("security.protocol".into(), "sasl_ssl".into()), ("ssl.ca.location".into(), "/etc/ca.pem".into())]
        );
    }

    #[test]
    fn property_lists_split_on_commas_and_newlines_but_keep_commas_inside_values() {
        let parsed =
            parse_property_list("sasl.mechanism=SCRAM-SHA-512, sasl.username=u\nssl.cipher.suites=A,B,C").unwrap();
        assert_eq!(
            parsed,
            [
                ("sasl.mechanism".to_string(), "SCRAM-SHA-512".to_string()),
                ("sasl.username".to_string(), "u".to_string()),
                ("ssl.cipher.suites".to_string(), "A,B,C".to_string()),
            ]
        );
        assert!(parse_property_list("nonsense").is_err());
        assert!(parse_property_list("=x").is_err());
        assert_eq!(parse_property_list("").unwrap(), []);
    }

    #[test]
    fn debug_output_names_properties_but_never_prints_their_values() {
        let mut s = crate::config::Settings::for_database("postgres://localhost/x").kafka;
        s.properties = Some("sasl.password=hunter2".into());
        let shown = format!("{s:?}");
        assert!(shown.contains("sasl.password"));
        assert!(!shown.contains("hunter2"));
    }
}
