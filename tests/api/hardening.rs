use std::time::Duration;

use crate::helpers::spawn_app;

const WAIT: Duration = Duration::from_secs(15);

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_connections_deliveries_latency_and_http_requests() {
    let app = spawn_app().await;
    let mut ws = app.ws("").await;
    ws.ready().await;
    app.create_order("Metered").await;
    ws.changes(1, WAIT).await;
    let text = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert_eq!(metric(&text, "ordercast_connections{transport=\"websocket\"}"), 1.0);
    assert!(metric(&text, "ordercast_deliveries_total") >= 1.0);
    assert!(metric(&text, "ordercast_commit_to_push_seconds_count") >= 1.0);
    assert_eq!(metric(&text, "ordercast_listener_connected"), 1.0);
    assert!(metric(&text, "ordercast_pg_notification_queue_usage") >= 0.0);
    assert!(text.contains("ordercast_http_requests_total{method=\"POST\",route=\"/api/orders\",status=\"201\"} 1"), "{text}");
}
