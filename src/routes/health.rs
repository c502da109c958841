use std::sync::atomic::Ordering;
use std::time::Duration;

use actix_web::{route, web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use crate::startup::AppState;

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// A database check answers every request for this long: `/api/health` is
/// public, and each check takes a connection of the REST pool, so a flood
/// of requests takes one connection a second, not one each.
const CHECK_FRESH: Duration = Duration::from_secs(1);

/// A database check: when it was made, and its answer.
pub type Check = (std::time::Instant, Result<(), String>);

/// What `/api/health` shows a caller who may not see its details: the
/// status and whether each part is up, none of the positions, counters,
/// names or error texts (which can name hosts, users and topics).
const SUMMARY_KEYS: &[&str] = &["status", "ok", "connected", "enabled", "healthy", "state"];

/// The state of ordercast and its dependencies. 503 when one is down.
/// Public; the details (positions, counters, errors) only with the admin
/// scope, or with authentication off.
#[utoipa::path(
    get,
    path = "/api/health",
    tag = "health",
    responses(
        (status = 200, description = "Everything is up (positions, counters and errors only with the admin scope)", body = serde_json::Value),
        (status = 503, description = "The database, the change listener or the Kafka ingest is down, or the server is shutting down", body = serde_json::Value)
    )
)]
#[route("/api/health", method = "GET", method = "HEAD")]
pub async fn health(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let db = {
        // Held while a check runs: callers meanwhile take its answer.
        let mut last = state.health_check.lock().await;
        match &*last {
            Some((at, answer)) if at.elapsed() < CHECK_FRESH => answer.clone(),
            _ => {
                let answer = tokio::time::timeout(CHECK_TIMEOUT, async {
                    let client = state.pool.get().await.map_err(|e| e.to_string())?;
                    client.query_one("SELECT 1", &[]).await.map_err(|e| crate::db::describe(e).to_string())?;
                    Ok::<_, String>(())
                })
                .await
                .unwrap_or_else(|_| Err("timed out".to_string()));
                *last = Some((std::time::Instant::now(), answer.clone()));
                answer
            }
        }
    };
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
            "restarts": state.hub.stats.restarts.load(Ordering::Relaxed),
        },
        // Reported, not counted against `status`: streams are served while
        // retention fails, and taking the server out of a load balancer
        // would not make it pass.
        "maintenance": state.maintenance.health(),
        "kafka": ingest,
        // Reported, not counted against `status`: the relay catches up and
        // the processor resumes by themselves, and neither affects serving.
        "workflow": state.workflow.health(state.hub.position()),
    });
    let admin = match &state.auth {
        None => true,
        Some(auth) => crate::auth::token(&req)
            .and_then(|t| auth.check(req.peer_addr().map(|a| a.ip()), &t).ok())
            // A token confined to one customer sees no details: error
            // texts can quote a row (PostgreSQL's "Failing row contains").
            .is_some_and(|p| p.has(crate::auth::Scope::Admin) && p.customer.is_none()),
    };
    let body = if admin {
        body
    } else {
        let mut summary = summary(body);
        summary["details"] = "shown with the admin scope".into();
        summary
    };
    if ok {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// `health` without anything but [`SUMMARY_KEYS`] and the objects that hold them.
fn summary(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter_map(|(k, v)| match v {
                    Value::Object(_) => {
                        let inner = summary(v);
                        (!inner.as_object().is_some_and(|o| o.is_empty())).then_some((k, inner))
                    }
                    v if SUMMARY_KEYS.contains(&k.as_str()) => Some((k, v)),
                    _ => None,
                })
                .collect(),
        ),
        v => v,
    }
}

/// Whether the server answers at all: 200 while it serves HTTP, whatever
/// its database, listener or Kafka broker. A liveness check (a container's
/// health check) asks this: restarting ordercast brings none of those back,
/// and `/api/health`'s 503 during a broker outage would restart servers that
/// still serve every stream. Public.
#[utoipa::path(
    get,
    path = "/api/health/live",
    tag = "health",
    responses((status = 200, description = "The server answers", body = serde_json::Value))
)]
#[route("/api/health/live", method = "GET", method = "HEAD")]
pub async fn live() -> HttpResponse {
    HttpResponse::Ok().insert_header(("Cache-Control", "no-store")).json(json!({"status": "ok"}))
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(live).service(health);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_keeps_states_and_drops_details() {
        let full = json!({
            "status": "degraded",
            "database": {"ok": false, "error": "password authentication failed for user \"ops\""},
            "listener": {"ok": true, "connected": true, "position": 12, "last_error": "db.internal:5432 refused"},
            "hub": {"position": 12, "subscriptions": 3},
            "kafka": {"enabled": true, "healthy": false, "state": "degraded", "topic": "orders",
                      "partitions": [{"partition": 0}], "lag": {"0": 5}, "last_error": "broker b1:9092 down"},
            "workflow": {"outbox": {"enabled": true, "state": "running", "last_error": null},
                         "processor": {"enabled": false}},
        });
        assert_eq!(
            summary(full),
            json!({
                "status": "degraded",
                "database": {"ok": false},
                "listener": {"ok": true, "connected": true},
                "kafka": {"enabled": true, "healthy": false, "state": "degraded"},
                "workflow": {"outbox": {"enabled": true, "state": "running"}, "processor": {"enabled": false}},
            })
        );
    }
}
