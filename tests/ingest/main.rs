//! Kafka ingest tests: real librdkafka against real Kafka-protocol brokers
//! started by the tests themselves — rdkafka's built-in mock cluster for the
//! fast suite (`mock`), and the tansu broker as a separate process for the
//! end-to-end suite (`tansu`). Both run the same scenarios (`scenarios`).
//! Every test gets a fresh database, fresh topics and a fresh group.

#[allow(dead_code)]
#[path = "../api/helpers.rs"]
mod helpers;

/// One test per scenario, each with a fresh broker from `$start` (an
/// `Option`: `None` skips the test).
macro_rules! scenario_tests {
    ($start:expr; $($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let Some(broker) = $start else { return };
            crate::scenarios::$name(&broker).await;
        }
    )*};
}

mod kafka;
mod mock;
mod scenarios;
mod tansu;
mod throughput;
