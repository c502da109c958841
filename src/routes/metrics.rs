//! `GET /metrics`: Prometheus text format.

use std::sync::atomic::Ordering::Relaxed;

use actix_web::{route, web, HttpResponse};

use crate::metrics::sample;
use crate::startup::AppState;

#[utoipa::path(get, path = "/metrics", tag = "meta",
    responses(
        (status = 200, description = "Prometheus metrics", content_type = "text/plain", body = String),
        (status = 403, description = "A token confined to one customer (forbidden): the metrics cover every customer", body = crate::routes::openapi::ProblemDoc),
    ))]
#[route("/metrics", method = "GET", method = "HEAD")]
pub async fn metrics(
    req: actix_web::HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, crate::error::ApiError> {
    crate::auth::unconfined(&req, "the metrics cover every customer")?;
    let mut out = String::with_capacity(8192);
    let hub = &state.hub.stats;
    out.push_str(&format!(
        "# HELP ordercast_connections Open streaming connections by transport.\n# TYPE ordercast_connections gauge\nordercast_connections{{transport=\"websocket\"}} {}\nordercast_connections{{transport=\"sse\"}} {}\n",
        state.sessions.ws.load(Relaxed),
        state.sessions.sse.load(Relaxed)
    ));
    sample(&mut out, "ordercast_subscriptions", "gauge", "Live hub subscriptions.", hub.subscriptions.load(Relaxed));
    sample(
        &mut out,
        "ordercast_changes_published_total",
        "counter",
        "Changes read from the log and fanned out.",
        hub.published.load(Relaxed),
    );
    sample(
        &mut out,
        "ordercast_deliveries_total",
        "counter",
        "Changes handed to client queues.",
        hub.deliveries.load(Relaxed),
    );
    sample(
        &mut out,
        "ordercast_lagged_total",
        "counter",
        "Clients that fell behind and caught up from the log.",
        hub.lagged.load(Relaxed),
    );
    sample(&mut out, "ordercast_resyncs_total", "counter", "Clients told to resync.", hub.resyncs.load(Relaxed));
    sample(
        &mut out,
        "ordercast_slow_client_disconnects_total",
        "counter",
        "Clients closed with 4008 for not reading.",
        hub.slow_disconnects.load(Relaxed),
    );
    sample(
        &mut out,
        "ordercast_hub_restarts_total",
        "counter",
        "Times the hub's task failed and went on, every client catching up from the log.",
        hub.restarts.load(Relaxed),
    );
    hub.commit_to_push.render(
        &mut out,
        "ordercast_commit_to_push_seconds",
        "From commit to fan-out into client queues.",
    );
    let listener = &state.listener;
    sample(
        &mut out,
        "ordercast_listener_connected",
        "gauge",
        "1 when the LISTEN connection is up.",
        listener.connected.load(Relaxed) as u8,
    );
    sample(
        &mut out,
        "ordercast_listener_reconnects_total",
        "counter",
        "LISTEN connection re-establishments.",
        listener.reconnects.load(Relaxed),
    );
    sample(
        &mut out,
        "ordercast_listener_position",
        "gauge",
        "Last change-log position read by the listener.",
        listener.position.load(Relaxed),
    );
    let maintenance = &state.maintenance;
    sample(
        &mut out,
        "ordercast_maintenance_passes_total",
        "counter",
        "Maintenance passes (statistics folding and retention), failed ones included.",
        maintenance.passes.load(Relaxed),
    );
    sample(
        &mut out,
        "ordercast_maintenance_failures_total",
        "counter",
        "Maintenance passes that failed.",
        maintenance.failures.load(Relaxed),
    );
    sample(
        &mut out,
        "ordercast_change_log_pruned_rows_total",
        "counter",
        "Change-log rows pruned by retention.",
        maintenance.pruned.load(Relaxed),
    );
    if let Some(secs) = maintenance.last_success_secs() {
        sample(
            &mut out,
            "ordercast_maintenance_last_success_timestamp_seconds",
            "gauge",
            "When a maintenance pass last succeeded (Unix time).",
            secs,
        );
    }
    // Database-side gauges; absent when the database cannot be asked.
    let mut log_head = None;
    if let Ok(client) = state.pool.get().await {
        if let Ok(row) = client.query_one("SELECT change_head(), pg_notification_queue_usage()", &[]).await {
            let head: i64 = row.get(0);
            log_head = Some(head);
            let usage: f64 = row.get(1);
            sample(&mut out, "ordercast_change_log_head", "gauge", "Newest committed change-log position.", head);
            sample(
                &mut out,
                "ordercast_change_log_lag",
                "gauge",
                "Positions committed but not yet fanned out.",
                (head - state.hub.position()).max(0),
            );
            sample(
                &mut out,
                "ordercast_pg_notification_queue_usage",
                "gauge",
                "pg_notification_queue_usage(): fraction of the NOTIFY queue in use.",
                usage,
            );
        }
    }
    // The relay's lag from the log's head itself: from the hub's position
    // it would read 0 while the listener stalls.
    state.workflow.metrics(&mut out, log_head.unwrap_or_else(|| state.hub.position()));
    state.ingest_metrics(&mut out);
    state.http_metrics.render(&mut out);
    Ok(HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(out))
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(metrics);
}
