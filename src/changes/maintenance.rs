//! Periodic upkeep: folds statistics deltas and prunes the change log to the
//! retention window (by age and by number of positions). Clients resuming
//! from a pruned position are told to resync by their feed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use deadpool_postgres::Pool;
use serde_json::json;

use crate::config::Settings;

/// What `/api/health` and `/metrics` report about the passes: a retention
/// that stopped working shows there, not only in the log, before the change
/// log has grown for days.
#[derive(Debug, Default)]
pub struct MaintenanceState {
    pub passes: AtomicU64,
    pub failures: AtomicU64,
    /// Change-log rows pruned since the start.
    pub pruned: AtomicU64,
    /// The last pass failed.
    pub failing: AtomicBool,
    // unwrap on lock: never held across a panic (assignments only)
    pub last_success: Mutex<Option<SystemTime>>,
    pub last_error: Mutex<Option<String>>,
}

impl MaintenanceState {
    fn passed(&self, pruned: i64) {
        self.passes.fetch_add(1, Ordering::Relaxed);
        self.pruned.fetch_add(pruned.max(0) as u64, Ordering::Relaxed);
        *self.last_success.lock().unwrap() = Some(SystemTime::now());
        if self.failing.swap(false, Ordering::Relaxed) {
            log::info!("maintenance passes again");
        }
    }

    fn failed(&self, error: String) {
        self.passes.fetch_add(1, Ordering::Relaxed);
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.failing.store(true, Ordering::Relaxed);
        *self.last_error.lock().unwrap() = Some(error);
    }

    /// The last success, in seconds since the Unix epoch.
    pub fn last_success_secs(&self) -> Option<f64> {
        let at = *self.last_success.lock().unwrap();
        at.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()).map(|d| d.as_secs_f64())
    }

    pub fn health(&self) -> serde_json::Value {
        let last_success = self.last_success.lock().unwrap().map(chrono::DateTime::<chrono::Utc>::from);
        json!({
            "ok": !self.failing.load(Ordering::Relaxed),
            "passes": self.passes.load(Ordering::Relaxed),
            "failures": self.failures.load(Ordering::Relaxed),
            "pruned_rows": self.pruned.load(Ordering::Relaxed),
            "last_success": last_success.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
            "last_error": *self.last_error.lock().unwrap(),
        })
    }
}

/// Runs forever; errors are logged and retried on the next tick. A pass
/// that panics (a bug) is a failed pass: the next tick runs again.
pub async fn run(pool: Pool, settings: Settings, state: std::sync::Arc<MaintenanceState>) {
    let mut tick = tokio::time::interval(Duration::from_secs(settings.maintenance_secs.max(1)));
    loop {
        tick.tick().await;
        match crate::error::caught(run_once(&pool, &settings)).await {
            Ok(Ok(pruned)) => state.passed(pruned),
            Ok(Err(e)) => {
                log::warn!("maintenance failed (will retry): {e:#}");
                state.failed(format!("{e:#}"));
            }
            Err(panic) => {
                let e = format!("maintenance panicked: {panic}");
                log::error!("{e} (will retry)");
                state.failed(e);
            }
        }
    }
}

/// Positions pruned per statement. A large backlog (retention lowered or
/// turned on, maintenance stopped a while) goes in rounds, each its own
/// transaction (36-59 ms a round: see the README's "Retention"): in one
/// statement it could outlast a `statement_timeout` and fail at every pass,
/// never making progress, and held back vacuum for as long as it ran.
pub const PRUNE_ROUND: i64 = 10_000;

/// Prunes through `through` (its transaction whole or not at all); returns
/// the rows pruned and the horizon now: below `through` when a transaction
/// holds it and goes on past it.
async fn prune(client: &tokio_postgres::Client, through: i64) -> anyhow::Result<(i64, i64)> {
    let rows: i64 =
        client.query_one("SELECT change_prune($1)", &[&through]).await.map_err(crate::db::describe)?.try_get(0)?;
    let horizon = crate::changes::log_bounds(client).await.map_err(crate::db::describe)?.1;
    Ok((rows, horizon))
}

/// One pass. Returns how many change-log rows were pruned.
pub async fn run_once(pool: &Pool, settings: &Settings) -> anyhow::Result<i64> {
    let client = pool.get().await?;
    client.batch_execute("SELECT order_stats_rollup()").await.map_err(crate::db::describe)?;
    let (head, pruned) = crate::changes::log_bounds(&client).await.map_err(crate::db::describe)?;
    let mut cutoff = pruned;
    if settings.retention_rows > 0 {
        cutoff = cutoff.max(head - settings.retention_rows as i64);
    }
    if settings.retention_secs > 0 {
        let secs = settings.retention_secs as f64;
        let row = client
            .query_opt(
                "SELECT end_pos FROM change_tx WHERE committed_at < now() - make_interval(secs => $1) \
                 ORDER BY committed_at DESC LIMIT 1",
                &[&secs],
            )
            .await
            .map_err(crate::db::describe)?;
        if let Some(r) = row {
            cutoff = cutoff.max(r.try_get::<_, i64>(0)?);
        }
    }
    if cutoff <= pruned {
        return Ok(0);
    }
    let (mut rows, mut horizon) = (0, pruned);
    while horizon < cutoff {
        let through = cutoff.min(horizon.saturating_add(PRUNE_ROUND));
        let (n, now) = prune(&client, through).await?;
        let (n, now) = if now > horizon {
            (n, now)
        } else {
            // A transaction larger than a round holds `through`, and is
            // pruned whole or not at all: through its end, if the cutoff is.
            let next = client
                .query_opt(
                    "SELECT end_pos FROM change_tx WHERE end_pos IS NOT NULL AND end_pos > $1 ORDER BY end_pos LIMIT 1",
                    &[&horizon],
                )
                .await
                .map_err(crate::db::describe)?;
            match next.map(|r| r.try_get::<_, i64>(0)).transpose()? {
                Some(end) if end <= cutoff => prune(&client, end).await?,
                _ => break,
            }
        };
        rows += n;
        if now <= horizon {
            break;
        }
        horizon = now;
    }
    // Lost positions now below the horizon: resuming there is expired anyway.
    client
        .execute("DELETE FROM change_rewinds WHERE through_pos < $1", &[&horizon])
        .await
        .map_err(crate::db::describe)?;
    log::info!("pruned {rows} change-log rows through position {horizon}");
    Ok(rows)
}
