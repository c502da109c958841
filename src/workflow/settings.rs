//! The workflow's configuration, flattened into `config::Settings`.

use std::time::Duration;

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct WorkflowSettings {
    /// Topic every committed change to an order is published to (the outbox
    /// relay runs whenever KAFKA_BROKERS is set). Empty: the relay is off.
    #[arg(
        long = "outbox-topic",
        env = "ORDERCAST_OUTBOX_TOPIC",
        default_value = "order-changes",
        value_parser = crate::config::kafka_topic_or_off,
        global = true
    )]
    pub outbox_topic: String,

    /// Changes published per batch; the stored position moves once per
    /// acknowledged batch, so this is also how much a crash may publish twice.
    #[arg(
        long = "outbox-batch",
        env = "ORDERCAST_OUTBOX_BATCH",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u32).range(1..),
        global = true
    )]
    pub outbox_batch: u32,

    /// Run the order processor in this server (`ordercast process` runs it alone).
    #[arg(long = "process", env = "ORDERCAST_PROCESS", value_parser = clap::builder::BoolishValueParser::new(), global = true)]
    pub process: bool,

    /// Orders the processor works on at the same time.
    #[arg(
        long = "process-concurrency",
        env = "ORDERCAST_PROCESS_CONCURRENCY",
        default_value_t = 32,
        value_parser = crate::config::at_least_one(),
        global = true
    )]
    pub concurrency: usize,

    /// Share of payments the simulated payment service declines (0 to 1).
    #[arg(
        long = "payment-failure-rate",
        env = "ORDERCAST_PAYMENT_FAILURE_RATE",
        default_value_t = 0.05,
        value_parser = crate::config::share,
        global = true
    )]
    pub payment_failure_rate: f64,

    /// Share of reservations the simulated inventory service refuses (0 to 1);
    /// the payment is then refunded.
    #[arg(
        long = "inventory-failure-rate",
        env = "ORDERCAST_INVENTORY_FAILURE_RATE",
        default_value_t = 0.05,
        value_parser = crate::config::share,
        global = true
    )]
    pub inventory_failure_rate: f64,

    /// Milliseconds each simulated step takes on average (uniformly 50% to 150%).
    #[arg(long = "step-latency-ms", env = "ORDERCAST_STEP_LATENCY_MS", default_value_t = 150, value_parser = clap::value_parser!(u64).range(0..=60_000), global = true)]
    pub step_latency_ms: u64,
}

impl WorkflowSettings {
    pub fn outbox_enabled(&self) -> bool {
        !self.outbox_topic.is_empty()
    }

    pub fn step_latency(&self) -> Duration {
        Duration::from_millis(self.step_latency_ms)
    }

    /// Rejects rates outside 0..=1 at start-up rather than misbehaving later.
    pub fn validate(&self) -> anyhow::Result<()> {
        for (name, rate) in [
            ("ORDERCAST_PAYMENT_FAILURE_RATE", self.payment_failure_rate),
            ("ORDERCAST_INVENTORY_FAILURE_RATE", self.inventory_failure_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                anyhow::bail!("{name} must be between 0 and 1, got {rate}");
            }
        }
        if self.concurrency == 0 {
            anyhow::bail!("ORDERCAST_PROCESS_CONCURRENCY must be at least 1");
        }
        Ok(())
    }
}
