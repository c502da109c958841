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

/// Positions pruned per statement. A large backlog (retention lowered or
/// turned on, maintenance stopped a while) goes in rounds, each its own
/// transaction (40-110 ms a round, measured with psql's `\timing` on a
/// private PostgreSQL): in one statement it could outlast a
/// `statement_timeout` and fail at every pass, never making progress, and
/// held back vacuum for as long as it ran.
pub const PRUNE_ROUND: i64 = 10_000;

/// Prunes through `through` (its transaction whole or not at all); returns
/// the rows pruned and the horizon now: below `through` when a transaction
/// holds it and goes on past it.
async fn prune(client: &tokio_postgres::Client, through: i64) -> anyhow::Result<(i64, i64)> {
    let rows: i64 = client.query_one("SELECT change_prune($1)", &[&through]).await.map_err(crate::db::describe)?.get(0);
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
            cutoff = cutoff.max(r.get::<_, i64>(0));
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
            match next.map(|r| r.get::<_, i64>(0)) {
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
