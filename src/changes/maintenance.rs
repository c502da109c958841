//! Periodic upkeep: folds statistics deltas and prunes the change log to the
//! retention window (by age and by number of positions). Clients resuming
//! from a pruned position are told to resync by their feed.

use std::time::Duration;

use deadpool_postgres::Pool;

use crate::config::Settings;

/// Runs forever; errors are logged and retried on the next tick.
pub async fn run(pool: Pool, settings: Settings) {
    let mut tick = tokio::time::interval(Duration::from_secs(settings.maintenance_secs.max(1)));
    loop {
        tick.tick().await;
        if let Err(e) = run_once(&pool, &settings).await {
            log::warn!("maintenance failed (will retry): {e:#}");
        }
    }
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
            cutoff = cutoff.max(r.get::<_, i64>(0));
        }
    }
    if cutoff <= pruned {
        return Ok(0);
    }
    let rows: i64 = client.query_one("SELECT change_prune($1)", &[&cutoff]).await.map_err(crate::db::describe)?.get(0);
    // The horizon now: below `cutoff` when a transaction holds it and goes
    // on past it (a transaction is pruned whole or not at all).
    let horizon = crate::changes::log_bounds(&client).await.map_err(crate::db::describe)?.1;
    // Lost positions now below the horizon: resuming there is expired anyway.
    client
        .execute("DELETE FROM change_rewinds WHERE through_pos < $1", &[&horizon])
        .await
        .map_err(crate::db::describe)?;
    log::info!("pruned {rows} change-log rows through position {horizon}");
    Ok(rows)
}
