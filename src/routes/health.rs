use std::sync::atomic::Ordering;
use std::time::Duration;

use actix_web::{get, web, HttpResponse};
use serde_json::json;

use crate::startup::AppState;

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The state of ordercast and its dependencies. 503 when one is down.
#[utoipa::path(
    get,
    path = "/api/health",
    tag = "health",
    responses(
        (status = 200, description = "Everything is up", body = serde_json::Value),
        (status = 503, description = "The database or the change listener is down, or the server is shutting down", body = serde_json::Value)
    )
)]
#[get("/api/health")]
pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    let db = tokio::time::timeout(CHECK_TIMEOUT, async {
        let client = state.pool.get().await.map_err(|e| e.to_string())?;
        client.query_one("SELECT 1", &[]).await.map_err(|e| crate::db::describe(e).to_string())?;
        Ok::<_, String>(())
    })
    .await
    .unwrap_or_else(|_| Err("timed out".to_string()));
    let listener = &state.listener;
    let listener_ok = listener.healthy();
    let ingest = state.ingest_health();
    let ingest_ok = ingest["healthy"].as_bool().unwrap_or(true);
    // A server that has begun to stop takes no new streams: a load balancer
    // should send clients elsewhere, and a dashboard whose WebSocket it
    // refused should not conclude that only WebSocket is broken.
    let stopping = *state.shutdown.borrow();
    let ok = db.is_ok() && listener_ok && ingest_ok && !stopping;
    let body = json!({
        "status": if stopping { "shutting_down" } else if ok { "ok" } else { "degraded" },
        "database": match &db {
            Ok(()) => json!({"ok": true}),
            Err(e) => json!({"ok": false, "error": e}),
        },
        "listener": {
            "ok": listener_ok,
            "connected": listener.connected.load(Ordering::Relaxed),
            "position": listener.position.load(Ordering::Relaxed),
            "reconnects": listener.reconnects.load(Ordering::Relaxed),
            "last_error": *listener.last_error.lock().unwrap(), // unwrap: never poisoned
        },
        "hub": {
            "position": state.hub.position(),
            "subscriptions": state.hub.stats.subscriptions.load(Ordering::Relaxed),
            "deliveries": state.hub.stats.deliveries.load(Ordering::Relaxed),
            "lagged": state.hub.stats.lagged.load(Ordering::Relaxed),
        },
        "kafka": ingest,
        // Reported, not counted against `status`: the relay catches up and
        // the processor resumes by themselves, and neither affects serving.
        "workflow": state.workflow.health(state.hub.position()),
    });
    if ok {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(health);
}
