use std::time::Duration;

use crate::helpers::{create_database, free_port, spawn_app, Server, WsClient};

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
    assert!(
        text.contains("ordercast_http_requests_total{method=\"POST\",route=\"/api/orders\",status=\"201\"} 1"),
        "{text}"
    );
}

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{eventually, spawn_app_with, TestApp};

const KEYS: &str = "reader:readersecret:read,writer:writersecret:read+write,ops:opssecret1:read+write+admin,\
                    ada:adasecret1:read+write:customer=Ada";
const JWT_SECRET: &str = "0123456789abcdef0123456789abcdef";

pub(crate) async fn secured() -> TestApp {
    spawn_app_with(|s| {
        s.api_keys = Some(ordercast::config::Secret(KEYS.into()));
        s.jwt_secret = Some(ordercast::config::Secret(JWT_SECRET.into()));
        s.allowed_origins = vec!["https://ops.example.com".into()];
    })
    .await
}

pub(crate) fn jwt(exp_offset: i64, scope: &str) -> String {
    jwt_expiring_at(chrono::Utc::now().timestamp() + exp_offset, scope)
}

fn jwt_expiring_at(exp: i64, scope: &str) -> String {
    signed_jwt(&json!({"sub": "svc-jwt", "exp": exp, "scope": scope}))
}

/// A JWT with these claims, signed with the servers' `JWT_SECRET`.
pub(crate) fn signed_jwt(claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

/// A server with these API keys, and JWTs signed with `JWT_SECRET`.
pub(crate) async fn with_keys(keys: &str) -> TestApp {
    let keys = keys.to_string();
    spawn_app_with(move |s| {
        s.api_keys = Some(ordercast::config::Secret(keys));
        s.jwt_secret = Some(ordercast::config::Secret(JWT_SECRET.into()));
    })
    .await
}

/// A writer for every customer, and read tokens confined to Ada and to Bob.
const ADA_AND_BOB: &str =
    "writer:writersecret:read+write,ada:adasecret1:read:customer=Ada,bob:bobsecret1:read:customer=Bob";

/// A token confined to one customer lists that customer's recent changes
/// only, and a move between customers as its own side, as its streams get
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recent_changes_for_a_confined_token_are_its_customers() {
    let app = with_keys(ADA_AND_BOB).await;
    let ada = create_as(&app, "Ada", "writersecret").await.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
    let bob = create_as(&app, "Bob", "writersecret").await.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
    let db = app.sql().await;
    db.execute("UPDATE orders SET customer_name = 'Ada' WHERE id = $1", &[&bob]).await.unwrap();
    app.settled().await;
    let list = |token: &'static str| {
        let r = app.http.get(app.url("/api/changes")).bearer_auth(token).send();
        async move { r.await.unwrap().json::<Value>().await.unwrap() }
    };
    let seen = |page: &Value| -> Vec<(String, i64)> {
        page["changes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["op"].as_str().unwrap().to_string(), c["order"]["id"].as_i64().unwrap()))
            .collect()
    };
    let for_ada = list("adasecret1").await;
    assert_eq!(seen(&for_ada), vec![("enter".to_string(), bob), ("insert".to_string(), ada)]);
    assert_eq!(for_ada["changes"][0]["old"], Value::Null);
    let for_bob = list("bobsecret1").await;
    assert_eq!(seen(&for_bob), vec![("leave".to_string(), bob), ("insert".to_string(), bob)]);
    assert_eq!(for_bob["changes"][0]["order"]["customer_name"], "Bob", "the row as Bob last saw it");
    assert_eq!(seen(&list("writersecret").await).len(), 3);
}

/// Creates an order through the API with a token.
async fn create_as(app: &TestApp, customer: &str, token: &str) -> reqwest::Response {
    app.http
        .post(app.url("/api/orders"))
        .bearer_auth(token)
        .json(&json!({"customer_name": customer, "product": "Cog", "quantity": 1, "unit_price": 1}))
        .send()
        .await
        .unwrap()
}

async fn ws_with(app: &TestApp, query: &str, headers: &[(&'static str, &str)]) -> (Option<(u16, String)>, Vec<Value>) {
    ws_at(app, &format!("/ws{query}"), headers).await
}

pub(crate) async fn ws_at(
    app: &TestApp,
    target: &str,
    headers: &[(&'static str, &str)],
) -> (Option<(u16, String)>, Vec<Value>) {
    let mut req = format!("ws://127.0.0.1:{}{target}", app.port).into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(*k, v.parse().unwrap());
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let mut msgs = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(2), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                let ready = v["type"] == "ready";
                msgs.push(v);
                if ready {
                    return (None, msgs);
                }
            }
            Ok(Some(Ok(Message::Close(f)))) => return (f.map(|f| (u16::from(f.code), f.reason.to_string())), msgs),
            Ok(Some(Ok(_))) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_address_without_tokens_is_refused_unless_insecure() {
    let (db_url, _name) = crate::helpers::create_database().await;
    let mut settings = ordercast::config::Settings::for_database(&db_url);
    settings.bind = "0.0.0.0:0".parse().unwrap();
    let err = ordercast::startup::Application::build(settings.clone(), &db_url).await.err().expect("must refuse");
    assert!(format!("{err:#}").contains("refusing to listen on 0.0.0.0:0 without authentication"), "{err:#}");
    settings.insecure = true;
    assert!(ordercast::startup::Application::build(settings.clone(), &db_url).await.is_ok());
    settings.insecure = false;
    settings.api_keys = Some(ordercast::config::Secret("a:abcdefgh:read".into()));
    assert!(ordercast::startup::Application::build(settings, &db_url).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_scopes_guard_every_route() {
    let app = secured().await;
    let order = json!({"customer_name": "Zed", "product": "Cog", "quantity": 1, "unit_price": 1});
    let post = |token: Option<String>| {
        let mut r = app.http.post(app.url("/api/orders")).json(&order);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    let r = post(None).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "missing_token");
    let r = post(Some("not-a-real-token".into())).await.unwrap();
    assert_eq!((r.status().as_u16(), r.json::<Value>().await.unwrap()["code"].clone()), (401, json!("invalid_token")));
    let r = post(Some("readersecret".into())).await.unwrap();
    assert_eq!(
        (r.status().as_u16(), r.json::<Value>().await.unwrap()["code"].clone()),
        (403, json!("insufficient_scope"))
    );
    let created: Value = post(Some("writersecret".into())).await.unwrap().json().await.unwrap();
    let id = created["id"].as_i64().unwrap();
    let first_by = |id: Value| {
        let url = app.url(&format!("/api/orders/{id}/history"));
        let request = app.http.get(url).bearer_auth("readersecret");
        async move { request.send().await.unwrap().json::<Value>().await.unwrap()[0]["by"].clone() }
    };
    assert_eq!(first_by(json!(id)).await, "api:writer");
    // JWTs: valid, expired, scope.
    let by_jwt: Value = post(Some(jwt(60, "read write"))).await.unwrap().json().await.unwrap();
    assert_eq!(first_by(by_jwt["id"].clone()).await, "api:jwt:svc-jwt", "a subject apart from any key's name");
    let r = post(Some(jwt(-10, "read write"))).await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "token_expired");
    assert_eq!(post(Some(jwt(60, "read"))).await.unwrap().status(), 403);
    // Not yet valid (`nbf` an hour ahead).
    let early = signed_jwt(&json!({"sub": "svc-jwt", "exp": chrono::Utc::now().timestamp() + 7200,
                                   "nbf": chrono::Utc::now().timestamp() + 3600, "scope": "read write"}));
    let r = post(Some(early)).await.unwrap();
    assert_eq!((r.status().as_u16(), r.json::<Value>().await.unwrap()["code"].clone()), (401, json!("invalid_token")));
    // Admin routes.
    let metrics = |t: &'static str| app.http.get(app.url("/metrics")).bearer_auth(t).send();
    assert_eq!(metrics("writersecret").await.unwrap().status(), 403);
    assert_eq!(metrics("opssecret1").await.unwrap().status(), 200);
    // Public routes stay public.
    assert_eq!(app.http.get(app.url("/api/health/live")).send().await.unwrap().status(), 200);
    // (Health is 503 until the listener's first read, which a loaded
    // machine can delay past this point; without a token either way.)
    crate::helpers::eventually(Duration::from_secs(10), || async {
        (app.http.get(app.url("/api/health")).send().await.unwrap().status() == 200).then_some(())
    })
    .await;
    // Health's details (positions, counters, error texts naming hosts and
    // users) only with the admin scope; the states to everyone.
    let health = |t: Option<&'static str>| {
        let r = app.http.get(app.url("/api/health"));
        let r = match t {
            Some(t) => r.bearer_auth(t),
            None => r,
        };
        async move { r.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    for token in [None, Some("readersecret"), Some("nonsense")] {
        let h = health(token).await;
        assert_eq!(
            (&h["status"], &h["database"], &h["listener"]["ok"]),
            (&json!("ok"), &json!({"ok": true}), &json!(true))
        );
        assert!(h.get("hub").is_none() && h["listener"].get("position").is_none(), "{token:?}: {h}");
        assert_eq!(h["details"], "shown with the admin scope");
    }
    let h = health(Some("opssecret1")).await;
    assert!(
        h["hub"]["position"].is_i64() && h["listener"]["last_error"].is_null() && h.get("details").is_none(),
        "{h}"
    );
    assert_eq!(app.http.get(app.url("/")).send().await.unwrap().status(), 200);
    // Cookie and access_token (for EventSource).
    let r = app
        .http
        .get(app.url("/api/orders"))
        .header("cookie", "theme=dark; ordercast_token=readersecret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The scheme in any case; another scheme (a proxy's) leaves the cookie to speak.
    let r = app.http.get(app.url("/api/orders")).header("authorization", "BEARER readersecret").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .http
        .get(app.url("/api/orders"))
        .header("authorization", "Basic cHJveHk6c2VjcmV0")
        .header("cookie", "ordercast_token=readersecret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r =
        app.http.get(app.url("/api/orders")).header("authorization", "Basic cHJveHk6c2VjcmV0").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let mut sse = app.sse("/api/events?access_token=readersecret", None).await;
    assert_eq!(sse.next_event(Duration::from_secs(5)).await.event, "ready");
    // WebSocket: refused with a close code a browser can read.
    let (close, _) = ws_with(&app, "", &[]).await;
    assert_eq!(close.unwrap().0, 4001);
    let (close, _) = ws_with(&app, "?access_token=bogus", &[]).await;
    assert_eq!(close.unwrap().0, 4001);
    let (close, msgs) = ws_with(&app, "", &[("authorization", "Bearer readersecret")]).await;
    assert!(close.is_none() && msgs.last().unwrap()["type"] == "ready");
}

/// A token without the `read` scope gets back, for a write, what names the
/// order and its state (`id`, `version`, `status`), not the order: before,
/// a write that changes nothing (`{"error_message": null}`) read any order
/// in its reach, with no trace. A token in the URL counts for GETs alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_without_read_gets_back_only_what_names_the_order_it_wrote() {
    let app = with_keys("scribe:scribesecret:write,reader:readersecret:read").await;
    let named = |body: &Value| {
        let mut keys: Vec<&str> = body.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        keys == ["id", "status", "version"]
    };
    let r = create_as(&app, "Ada", "scribesecret").await;
    assert_eq!(r.status(), 201);
    let created: Value = r.json().await.unwrap();
    assert!(named(&created), "{created}");
    let id = created["id"].as_i64().unwrap();
    let patch = |body: Value| {
        app.http.patch(app.url(&format!("/api/orders/{id}"))).bearer_auth("scribesecret").json(&body).send()
    };
    let r = patch(json!({"error_message": null})).await.unwrap();
    assert_eq!((r.status().as_u16(), r.headers()["etag"].to_str().unwrap()), (200, "\"1\""));
    let body: Value = r.json().await.unwrap();
    assert!(named(&body), "{body}");
    assert_eq!(
        (body["id"].as_i64(), body["status"].as_str(), body["version"].as_i64()),
        (Some(id), Some("pending"), Some(1))
    );
    let r = patch(json!({"status": "processing"})).await.unwrap();
    let body: Value = r.json().await.unwrap();
    assert!(named(&body) && body["status"] == "processing" && body["version"] == 2, "{body}");
    let r =
        app.http.post(app.url(&format!("/api/orders/{id}/cancel"))).bearer_auth("scribesecret").send().await.unwrap();
    let body: Value = r.json().await.unwrap();
    assert!(named(&body) && body["status"] == "cancelled", "{body}");
    // A reader gets the order itself.
    let r = app.http.get(app.url(&format!("/api/orders/{id}"))).bearer_auth("readersecret").send().await.unwrap();
    let order: Value = r.json().await.unwrap();
    assert_eq!(order["customer_name"], "Ada");
    // In the URL, a token counts for reads only.
    let r = app
        .http
        .post(app.url("/api/orders?access_token=scribesecret"))
        .json(&json!({"customer_name": "Ada", "product": "Cog", "quantity": 1, "unit_price": 1}))
        .send()
        .await
        .unwrap();
    let problem: Value = r.json().await.unwrap();
    assert_eq!(problem["code"], "missing_token", "{problem}");
    let r = app.http.get(app.url(&format!("/api/orders/{id}?access_token=readersecret"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// The metrics and health's details cover every customer: a token confined
/// to one is refused the metrics (403 `forbidden`, as for `/api/stats`) and
/// gets health's states alone, whatever its scopes. Before, with `admin`, it
/// got both, and health's error texts can quote a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confined_token_sees_neither_metrics_nor_healths_details() {
    let app = with_keys("adaops:adaopssecret:read+admin:customer=Ada,ops:opssecret1:read+admin").await;
    let get = |path: &'static str, token: &'static str| app.http.get(app.url(path)).bearer_auth(token).send();
    let r = get("/metrics", "adaopssecret").await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "forbidden");
    assert_eq!(get("/metrics", "opssecret1").await.unwrap().status(), 200);
    let confined: Value = get("/api/health", "adaopssecret").await.unwrap().json().await.unwrap();
    assert!(confined.get("hub").is_none() && confined["listener"].get("position").is_none(), "{confined}");
    let full: Value = get("/api/health", "opssecret1").await.unwrap().json().await.unwrap();
    assert!(full["hub"]["position"].is_i64(), "{full}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_encoded_paths_are_guarded_like_the_routes_they_reach() {
    let app = secured().await;
    let created: Value = create_as(&app, "Bob", "writersecret").await.json().await.unwrap();
    let id = created["id"].as_i64().unwrap();
    let status = |method: reqwest::Method, target: String, token: Option<&'static str>| {
        let mut r = app.http.request(method, app.url(&target));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        async move { r.send().await.unwrap().status().as_u16() }
    };
    // The router decodes `%61` to `a`: these reach the real handlers.
    assert_eq!(status(reqwest::Method::GET, "/%61pi/orders".into(), Some("readersecret")).await, 200);
    assert_eq!(status(reqwest::Method::GET, "/%61pi/orders".into(), None).await, 401);
    assert_eq!(status(reqwest::Method::GET, format!("/api/orders/{id}/%68istory"), None).await, 401);
    assert_eq!(status(reqwest::Method::DELETE, format!("/%61pi/orders/{id}"), None).await, 401);
    assert_eq!(status(reqwest::Method::DELETE, format!("/%61pi/orders/{id}"), Some("readersecret")).await, 403);
    assert_eq!(status(reqwest::Method::GET, "/%6Detrics".into(), Some("writersecret")).await, 403);
    assert_eq!(status(reqwest::Method::GET, "/api/%64lq".into(), Some("readersecret")).await, 403);
    assert_eq!(status(reqwest::Method::GET, "/%6Detrics".into(), Some("opssecret1")).await, 200);
    // Nothing was deleted.
    assert_eq!(status(reqwest::Method::GET, format!("/api/orders/{id}"), Some("readersecret")).await, 200);
    // The WebSocket route too: refused with the close code, not streamed.
    let (close, _) = ws_at(&app, "/w%73", &[]).await;
    assert_eq!(close.unwrap().0, 4001);
    let (close, msgs) = ws_at(&app, "/w%73", &[("authorization", "Bearer readersecret")]).await;
    assert!(close.is_none() && msgs.last().unwrap()["type"] == "ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_restricted_token_never_sees_another_customers_orders() {
    let app = secured().await;
    let create = |name: &'static str, token: &'static str| create_as(&app, name, token);
    let bob: Value = create("Bob", "writersecret").await.json().await.unwrap();
    let ada: Value = create("Ada", "adasecret1").await.json().await.unwrap();
    assert_eq!(create("Bob", "adasecret1").await.status(), 403);
    let get = |path: String| app.http.get(app.url(&path)).bearer_auth("adasecret1").send();
    let page: Value = get("/api/orders?customer=Bob".into()).await.unwrap().json().await.unwrap();
    let names: Vec<&str> =
        page["items"].as_array().unwrap().iter().map(|o| o["customer_name"].as_str().unwrap()).collect();
    assert_eq!(names, ["Ada"]);
    assert_eq!(get(format!("/api/orders/{}", bob["id"])).await.unwrap().status(), 404);
    assert_eq!(get(format!("/api/orders/{}/history", bob["id"])).await.unwrap().status(), 404);
    assert_eq!(get(format!("/api/orders/{}", ada["id"])).await.unwrap().status(), 200);
    assert_eq!(get("/api/stats".into()).await.unwrap().status(), 403);
    let r = app
        .http
        .patch(app.url(&format!("/api/orders/{}", bob["id"])))
        .bearer_auth("adasecret1")
        .json(&json!({"quantity": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r =
        app.http.delete(app.url(&format!("/api/orders/{}", bob["id"]))).bearer_auth("adasecret1").send().await.unwrap();
    assert_eq!(r.status(), 404);

    // Streams: even asking for Bob, Ada's token receives only Ada's changes
    // (opened once the creations above have been fanned out).
    app.settled().await;
    let mut ws = crate::helpers::WsClient::connect(&format!(
        "ws://127.0.0.1:{}/ws?access_token=adasecret1&customer=Bob",
        app.port
    ))
    .await;
    ws.ready().await;
    ws.send_json(json!({"type": "subscribe", "filter": {"customer": "Bob"}})).await;
    ws.ready().await;
    let mut sse = app.sse("/api/events?access_token=adasecret1", None).await;
    sse.next_event(WAIT).await;
    let db = app.sql().await;
    db.execute("UPDATE orders SET quantity = quantity + 1", &[]).await.unwrap();
    let c = ws.changes(1, WAIT).await;
    assert_eq!(c[0]["order"]["customer_name"], "Ada");
    ws.expect_silence(Duration::from_millis(500)).await;
    let e = sse.changes(1, WAIT).await;
    assert_eq!(e[0].data["order"]["customer_name"], "Ada");
    let mut per_order = app
        .http
        .get(app.url(&format!("/api/orders/{}/events?access_token=adasecret1", bob["id"])))
        .send()
        .await
        .unwrap();
    assert_eq!(per_order.status(), 404);
    let _ = per_order.chunk().await;
}

/// A change as a restricted viewer received it must show only its own
/// customer: `side` is the customer it may see, `other` the one it may not
/// (a name and an email, anywhere in the message).
fn assert_only(change: &Value, op: &str, side: &str, other: &[&str]) {
    assert_eq!(change["type"], "change", "{change}");
    assert_eq!(change["op"], op, "{change}");
    assert_eq!(change["order"]["customer_name"], side, "{change}");
    assert_eq!(change["old"], Value::Null, "{change}");
    let text = change.to_string();
    for hidden in other {
        assert!(!text.contains(hidden), "{hidden:?} leaked to a viewer confined to {side}: {text}");
    }
}

/// An unrestricted writer (REST, or a DBA's SQL) moves an order from Ada to
/// Bob and back: streams confined to Ada or Bob see it leave or enter their
/// view, never the other customer's row, live and when catching up from the
/// log (WebSocket, SSE, the per-order stream); unrestricted streams, even
/// filtered to one customer, still get the full change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_moving_between_customers_leaves_and_enters_confined_streams_without_the_other_side() {
    let app = with_keys(ADA_AND_BOB).await;
    // Bob's token as a JWT `customer` claim instead of an API key option.
    let bob_jwt = signed_jwt(
        &json!({"sub": "bob-app", "exp": chrono::Utc::now().timestamp() + 600, "scope": "read", "customer": "bob"}),
    );
    let ada_private = "ada-private@a.example";
    let bob_private = "bob-private@b.example";
    let r = app
        .http
        .post(app.url("/api/orders"))
        .bearer_auth("writersecret")
        .json(&json!({"customer_name": "Ada", "customer_email": ada_private, "product": "Cog", "quantity": 1, "unit_price": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
    app.settled().await;

    let port = app.port;
    let ws = |query: String| async move {
        crate::helpers::WsClient::connect(&format!("ws://127.0.0.1:{port}/ws{query}")).await
    };
    let mut ada = ws("?access_token=adasecret1".into()).await;
    let before = ada.ready().await["seq"].as_i64().unwrap();
    let mut bob = ws("?access_token=bobsecret1&customer=Ada".into()).await;
    bob.ready().await;
    let mut bob_by_jwt = ws(format!("?access_token={bob_jwt}")).await;
    bob_by_jwt.ready().await;
    let mut filtered = ws("?access_token=writersecret&customer=Ada".into()).await;
    filtered.ready().await;
    let mut everything = ws("?access_token=writersecret".into()).await;
    everything.ready().await;
    let mut ada_sse = app.sse("/api/events?access_token=adasecret1", None).await;
    assert_eq!(ada_sse.next_event(WAIT).await.event, "ready");
    let mut bob_sse = app.sse("/api/events?access_token=bobsecret1", None).await;
    assert_eq!(bob_sse.next_event(WAIT).await.event, "ready");
    let mut ada_order = app.sse(&format!("/api/orders/{id}/events?access_token=adasecret1"), None).await;
    assert_eq!(ada_order.next_event(WAIT).await.event, "snapshot");
    assert_eq!(ada_order.next_event(WAIT).await.event, "ready");

    // Through the REST API: Ada's order becomes Bob's.
    let r = app
        .http
        .patch(app.url(&format!("/api/orders/{id}")))
        .bearer_auth("writersecret")
        .json(&json!({"customer_name": "Bob", "customer_email": bob_private}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let c = ada.changes(1, WAIT).await.remove(0);
    assert_only(&c, "leave", "Ada", &["Bob", bob_private]);
    assert_eq!(c["order"]["customer_email"], ada_private, "the last state Ada's token could see");
    let moved_at = c["seq"].as_i64().unwrap();
    assert!(moved_at > before);
    assert_eq!((&c["actor"], c["at"].is_string()), (&json!("api:writer"), true));
    let c = bob.changes(1, WAIT).await.remove(0);
    assert_only(&c, "enter", "Bob", &["Ada", ada_private]);
    assert_eq!((c["seq"].as_i64(), &c["order"]["customer_email"]), (Some(moved_at), &json!(bob_private)));
    assert_eq!(bob_by_jwt.changes(1, WAIT).await[0], c);
    for client in [&mut filtered, &mut everything] {
        let c = client.changes(1, WAIT).await.remove(0);
        assert_eq!(
            (&c["op"], &c["order"]["customer_name"], &c["old"]["customer_name"]),
            (&json!("update"), &json!("Bob"), &json!("Ada"))
        );
    }
    let e = ada_sse.changes(1, WAIT).await.remove(0);
    assert_eq!(e.id, Some(moved_at.to_string()));
    assert_only(&e.data, "leave", "Ada", &["Bob", bob_private]);
    let e = bob_sse.changes(1, WAIT).await.remove(0);
    assert_eq!(e.id, Some(moved_at.to_string()));
    assert_only(&e.data, "enter", "Bob", &["Ada", ada_private]);
    let e = ada_order.changes(1, WAIT).await.remove(0);
    assert_only(&e.data, "leave", "Ada", &["Bob", bob_private]);
    // The REST reads agree: the order is Bob's now.
    let get = |token: &'static str| app.http.get(app.url(&format!("/api/orders/{id}"))).bearer_auth(token).send();
    assert_eq!(get("adasecret1").await.unwrap().status(), 404);
    assert_eq!(get("bobsecret1").await.unwrap().status(), 200);

    // Through SQL, as a DBA would: back to Ada, case aside.
    let db = app.sql().await;
    db.execute("UPDATE orders SET customer_name = 'ADA', customer_email = $2 WHERE id = $1", &[&id, &ada_private])
        .await
        .unwrap();
    let c = bob.changes(1, WAIT).await.remove(0);
    assert_only(&c, "leave", "Bob", &["ADA", "Ada", ada_private]);
    assert_eq!(c["order"]["customer_email"], bob_private);
    assert!(c["actor"].as_str().unwrap().starts_with("sql:"), "{c}");
    let moved_back = c["seq"].as_i64().unwrap();
    let c = ada.changes(1, WAIT).await.remove(0);
    assert_only(&c, "enter", "ADA", &["Bob", bob_private]);
    let c = filtered.changes(1, WAIT).await.remove(0);
    assert_eq!((&c["op"], &c["old"]["customer_name"]), (&json!("update"), &json!("Bob")));
    assert_only(&bob_sse.changes(1, WAIT).await[0].data, "leave", "Bob", &["ADA", ada_private]);
    assert_only(&ada_sse.changes(1, WAIT).await[0].data, "enter", "ADA", &["Bob", bob_private]);
    for client in [&mut ada, &mut bob] {
        client.expect_silence(Duration::from_millis(300)).await;
    }

    // Resuming from before the move reads the changes from the log: the
    // same redacted variants.
    let mut ada_again = ws(format!("?access_token=adasecret1&since={before}")).await;
    ada_again.ready().await;
    let cs = ada_again.changes(2, WAIT).await;
    assert_only(&cs[0], "leave", "Ada", &["Bob", bob_private]);
    assert_only(&cs[1], "enter", "ADA", &["Bob", bob_private]);
    assert_eq!((seq_of(&cs[0]), seq_of(&cs[1])), (moved_at, moved_back));
    // So does a subscribe message, whatever customer it asks for.
    ada_again.send_json(json!({"type": "subscribe", "filter": {"customer": "Bob"}, "since": before})).await;
    ada_again.ready().await;
    let cs = ada_again.changes(2, WAIT).await;
    assert_only(&cs[0], "leave", "Ada", &["Bob", bob_private]);
    assert_only(&cs[1], "enter", "ADA", &["Bob", bob_private]);
    let mut bob_again = ws(format!("?access_token=bobsecret1&since={before}")).await;
    bob_again.ready().await;
    let cs = bob_again.changes(2, WAIT).await;
    assert_only(&cs[0], "enter", "Bob", &["Ada", ada_private]);
    assert_only(&cs[1], "leave", "Bob", &["ADA", "Ada", ada_private]);
    let mut bob_sse_again = app.sse("/api/events?access_token=bobsecret1", Some(&before.to_string())).await;
    let es = bob_sse_again.changes(2, WAIT).await;
    assert_only(&es[0].data, "enter", "Bob", &["Ada", ada_private]);
    assert_only(&es[1].data, "leave", "Bob", &["ADA", "Ada", ada_private]);
    let mut ada_order_again =
        app.sse(&format!("/api/orders/{id}/events?access_token=adasecret1"), Some(&before.to_string())).await;
    let es = ada_order_again.changes(2, WAIT).await;
    assert_eq!((&es[0].data["op"], &es[1].data["op"]), (&json!("leave"), &json!("enter")));
    assert_only(&es[0].data, "leave", "Ada", &["Bob", bob_private]);
    // An unrestricted client resuming the same way gets the full changes.
    let mut full_again = ws(format!("?access_token=writersecret&customer=Ada&since={before}")).await;
    full_again.ready().await;
    let cs = full_again.changes(2, WAIT).await;
    assert_eq!((&cs[0]["op"], &cs[0]["old"]["customer_name"]), (&json!("update"), &json!("Ada")));
    assert_eq!((&cs[1]["op"], &cs[1]["old"]["customer_name"]), (&json!("update"), &json!("Bob")));
}

fn seq_of(v: &Value) -> i64 {
    v["seq"].as_i64().unwrap()
}

/// An order's status history, read by a token confined to one customer,
/// holds only the entries made while the order was that customer's: after a
/// move from Ada to Bob, Bob's token never sees Ada's statuses or her token's
/// name, and an entry made by the statement that moved the order belongs to
/// neither. Unconfined tokens see every entry; entries whose customer is not
/// recorded (written before it was) only they see.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confined_token_reads_only_its_customers_part_of_an_orders_history() {
    let app = with_keys(
        "writer:writersecret:read+write,ada:adasecret1:read+write:customer=Ada,\
         bob:bobsecret1:read+write:customer=Bob",
    )
    .await;
    let bob_jwt = signed_jwt(
        &json!({"sub": "bob-app", "exp": chrono::Utc::now().timestamp() + 600, "scope": "read", "customer": "BOB"}),
    );
    let patch = |id: i64, token: &'static str, body: Value| {
        app.http.patch(app.url(&format!("/api/orders/{id}"))).bearer_auth(token).json(&body).send()
    };
    let history = |id: i64, token: String| {
        let app = &app;
        async move {
            let r = app.http.get(app.url(&format!("/api/orders/{id}/history"))).bearer_auth(token).send().await;
            let r = r.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let steps = |h: &Value| -> Vec<(Value, Value, Value)> {
        h.as_array().unwrap().iter().map(|e| (e["from"].clone(), e["to"].clone(), e["by"].clone())).collect()
    };
    let step = |from: Value, to: &str, by: &str| (from, json!(to), json!(by));

    // Ada's order, taken into processing by Ada's own token.
    let r = create_as(&app, "Ada", "adasecret1").await;
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
    assert_eq!(patch(id, "adasecret1", json!({"status": "processing"})).await.unwrap().status(), 200);
    let (status, h) = history(id, "adasecret1".into()).await;
    assert_eq!(status, 200);
    let adas = vec![step(json!(null), "pending", "api:ada"), step(json!("pending"), "processing", "api:ada")];
    assert_eq!(steps(&h), adas);

    // A DBA moves it to Bob (no status change: no entry); Bob's token and
    // the writer take it further, the writer changing only the name's case.
    let db = app.sql().await;
    db.execute("UPDATE orders SET customer_name = 'bob' WHERE id = $1", &[&id]).await.unwrap();
    assert_eq!(patch(id, "bobsecret1", json!({"status": "processed"})).await.unwrap().status(), 200);
    assert_eq!(
        patch(id, "writersecret", json!({"status": "shipped", "customer_name": "BOB"})).await.unwrap().status(),
        200
    );
    let bobs =
        vec![step(json!("processing"), "processed", "api:bob"), step(json!("processed"), "shipped", "api:writer")];
    for token in ["bobsecret1".to_string(), bob_jwt.clone()] {
        let (status, h) = history(id, token).await;
        assert_eq!(status, 200);
        assert_eq!(steps(&h), bobs);
        assert!(!h.to_string().contains("api:ada") && !h.to_string().contains("pending"), "{h}");
    }
    // Ada no longer sees the order at all.
    assert_eq!(history(id, "adasecret1".into()).await.0, 404);
    let r = app.http.get(app.url(&format!("/api/orders/{id}"))).bearer_auth("adasecret1").send().await.unwrap();
    assert_eq!(r.status(), 404);

    // The writer moves it back to Ada and delivers it in the same statement:
    // that entry is neither customer's. Ada sees her own entries again.
    assert_eq!(
        patch(id, "writersecret", json!({"status": "delivered", "customer_name": "Ada"})).await.unwrap().status(),
        200
    );
    let (status, h) = history(id, "adasecret1".into()).await;
    assert_eq!(status, 200);
    assert_eq!(steps(&h), adas);
    assert_eq!(history(id, "bobsecret1".into()).await.0, 404);
    // The unconfined writer sees all of it.
    let (status, h) = history(id, "writersecret".into()).await;
    assert_eq!(status, 200);
    let mut all = adas.clone();
    all.extend(bobs.clone());
    all.push(step(json!("shipped"), "delivered", "api:writer"));
    assert_eq!(steps(&h), all);

    // Entries with no recorded customer (as written before it was recorded)
    // are shown to unconfined tokens only.
    let r = create_as(&app, "Bob", "bobsecret1").await;
    let other = r.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
    db.execute("UPDATE order_status_history SET customer = NULL WHERE order_id = $1", &[&other]).await.unwrap();
    assert_eq!(history(other, "bobsecret1".into()).await, (200, json!([])));
    assert_eq!(steps(&history(other, "writersecret".into()).await.1), [step(json!(null), "pending", "api:bob")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_origins_and_cors_follow_the_allow_list() {
    let app = secured().await;
    let auth = ("authorization", "Bearer readersecret");
    let (close, _) = ws_with(&app, "", &[auth, ("origin", "https://evil.example")]).await;
    assert_eq!(close.unwrap(), (4003, "origin not allowed".to_string()));
    let (close, _) = ws_with(&app, "", &[auth, ("origin", "https://ops.example.com")]).await;
    assert!(close.is_none());
    let host = format!("http://127.0.0.1:{}", app.port);
    let (close, _) = ws_with(&app, "", &[auth, ("origin", host.as_str())]).await;
    assert!(close.is_none(), "same origin is allowed");
    let preflight_with = |origin: &'static str, method: &'static str, headers: &'static str| {
        let r = app
            .http
            .request(reqwest::Method::OPTIONS, app.url("/api/orders"))
            .header("origin", origin)
            .header("access-control-request-method", method);
        if headers.is_empty() { r } else { r.header("access-control-request-headers", headers) }.send()
    };
    let preflight = |origin: &'static str, method: &'static str| preflight_with(origin, method, "");
    let ok = preflight("https://ops.example.com", "POST").await.unwrap();
    assert_eq!(ok.headers()["access-control-allow-origin"], "https://ops.example.com");
    let denied = preflight("https://evil.example", "POST").await.unwrap();
    assert!(denied.headers().get("access-control-allow-origin").is_none());
    // Refusals are problems with a stable code, like every other error.
    assert_eq!(denied.status(), 403);
    let body: Value = denied.json().await.unwrap();
    assert_eq!(body["code"], "origin_not_allowed", "{body}");
    let r = preflight("https://ops.example.com", "TRACE").await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "cors_refused", "{body}");
    assert!(body["message"].as_str().unwrap().contains("method"), "{body}");
    let r = preflight_with("https://ops.example.com", "POST", "x-evil").await.unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "cors_refused", "{body}");
    assert!(body["message"].as_str().unwrap().contains("header"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_write_and_subscribe_limits_are_enforced() {
    let app = spawn_app_with(|s| {
        s.max_connections_per_ip = 2;
        s.write_rate = 1.0;
        s.write_burst = 2.0;
        s.max_subscribes_per_minute = 2;
    })
    .await;
    let mut a = app.ws("").await;
    a.ready().await;
    let _b = app.sse("/api/events", None).await;
    let r = app.http.get(app.url("/api/events")).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "too_many_connections");
    // Writes: a burst of 2, then 429 with Retry-After.
    let order = json!({"customer_name": "Rate", "product": "Cog", "quantity": 1, "unit_price": 1});
    for _ in 0..2 {
        assert_eq!(app.post_order(&order).await.status(), 201);
    }
    let r = app.post_order(&order).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    // Subscribes per minute on one connection.
    for _ in 0..2 {
        a.send_json(json!({"type": "subscribe"})).await;
        a.ready().await;
    }
    a.send_json(json!({"type": "subscribe"})).await;
    // The two orders written above reach this client whenever the listener
    // publishes them, possibly after its last `ready`.
    let answer = loop {
        let v = a.next_json(WAIT).await;
        if v["type"] != "change" {
            break v;
        }
    };
    assert_eq!(answer["code"], "too_many_subscribes", "{answer}");
    // Total connections.
    let app = spawn_app_with(|s| s.max_connections = 1).await;
    let mut one = app.ws("").await;
    one.ready().await;
    let full = |status: u16, body: Value| {
        assert_eq!((status, &body["code"]), (503, &json!("too_many_connections")), "{body}");
        assert_eq!(body["message"], "the server holds its maximum of streaming connections; retry later");
    };
    let r = app.http.get(app.url("/api/events")).send().await.unwrap();
    assert_eq!(r.headers()["retry-after"], "1");
    full(r.status().as_u16(), r.json().await.unwrap());
    let (status, body) = app.ws_refused("/ws").await;
    full(status, body);
}

/// A refused WebSocket handshake (a bad token, a bad query) holds a place
/// under the connection limits while it closes (up to a second when the
/// client does not answer the close): refusals cannot pile up beyond what an
/// address may hold. Before, they were not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_handshakes_count_against_the_connection_limits_while_they_close() {
    let app = spawn_app_with(|s| {
        s.api_keys = Some(ordercast::config::Secret("reader:readersecret:read".into()));
        s.max_connections_per_ip = 2;
    })
    .await;
    let url = |query: &str| format!("ws://127.0.0.1:{}/ws?{query}", app.port);
    // Neither client reads, so neither answers its close.
    let (_bad_token, _) = tokio_tungstenite::connect_async(url("access_token=nope")).await.unwrap();
    let (_bad_query, _) = tokio_tungstenite::connect_async(url("access_token=readersecret&status=nope")).await.unwrap();
    let (status, body) = app.ws_refused("/ws?access_token=nope").await;
    assert_eq!((status, body["code"].as_str()), (429, Some("too_many_connections")), "{body}");
    // Once they have closed (a second's linger), their places are free
    // again: tried until then, on a loaded machine a while longer.
    let started = std::time::Instant::now();
    let mut ws = loop {
        match tokio_tungstenite::connect_async(url("access_token=readersecret")).await {
            Ok((ws, _)) => break ws,
            Err(e) => assert!(started.elapsed() < Duration::from_secs(15), "still refused: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) if serde_json::from_str::<Value>(&t).unwrap()["type"] == "ready" => break,
            Ok(Some(Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_)))) => {}
            other => panic!("no ready: {other:?}"),
        }
    }
}

/// Streams read the log through connections of their own: however many of
/// them catch up at once (here they wait behind a DBA's lock on the log),
/// the REST API keeps its connections. Before, they shared one pool and the
/// REST answer was 503 database_unavailable after the pool's wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_catching_up_do_not_take_the_rest_apis_connections() {
    let app = spawn_app_with(|s| {
        s.db_pool_size = 2;
        s.stream_pool_size = 2;
    })
    .await;
    let id = app.create_order("Pool").await["id"].as_i64().unwrap();
    let dba = app.sql().await;
    dba.batch_execute("BEGIN; LOCK TABLE change_log IN ACCESS EXCLUSIVE MODE").await.unwrap();
    // As many as the streams' pool holds: each waits in its catch-up read.
    let mut streams = Vec::new();
    for _ in 0..2 {
        streams.push(app.sse("/api/events?since=0", None).await);
    }
    let watcher = app.sql().await;
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                   AND wait_event_type = 'Lock' AND query LIKE '%change_read%'";
    crate::helpers::until_count(&watcher, waiting, Duration::from_secs(10), |n| n >= 2).await;
    let started = std::time::Instant::now();
    let (status, page) = app.get_json("/api/orders?limit=1").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["items"][0]["id"], id);
    assert!(started.elapsed() < Duration::from_secs(2), "answered in {:?}", started.elapsed());
    dba.batch_execute("COMMIT").await.unwrap();
    for stream in &mut streams {
        assert_eq!(stream.changes(1, Duration::from_secs(15)).await.len(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_from_another_sites_pages_are_refused() {
    let app = crate::helpers::spawn_app_with(|s| s.allowed_origins = vec!["https://ops.example.com".into()]).await;
    let order = app.create_order("Csrf").await;
    let id = order["id"].as_i64().unwrap();
    let refused = |r: reqwest::Response| async move {
        assert_eq!(r.status(), 403);
        assert_eq!(r.json::<Value>().await.unwrap()["code"], "origin_not_allowed");
    };
    // A plain HTML form on another site: cancel, and a text/plain body that is valid JSON.
    let form = |path: String, origin: &str, body: &str, kind: &str| {
        app.http
            .post(app.url(&path))
            .header("origin", origin)
            .header("content-type", kind)
            .body(body.to_string())
            .send()
    };
    let cancel = format!("/api/orders/{id}/cancel");
    refused(form(cancel.clone(), "https://evil.example", "", "application/x-www-form-urlencoded").await.unwrap()).await;
    let json_text = r#"{"customer_name":"Mallory","product":"Cog=","quantity":1,"unit_price":1}"#;
    refused(form("/api/orders".into(), "https://evil.example", json_text, "text/plain").await.unwrap()).await;
    refused(form("/api/orders".into(), "null", json_text, "text/plain").await.unwrap()).await;
    // Another port of the same host is another origin.
    let other_port = format!("http://127.0.0.1:{}", app.port.wrapping_add(1));
    refused(form(cancel, &other_port, "", "text/plain").await.unwrap()).await;
    let r = app
        .http
        .delete(app.url(&format!("/api/orders/{id}")))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    refused(r).await;
    let r = app.http.patch(app.url(&format!("/api/orders/{id}"))).header("sec-fetch-site", "cross-site");
    refused(r.body(r#"{"quantity":3}"#).send().await.unwrap()).await;
    // Nothing changed.
    let (status, now) = app.get_json(&format!("/api/orders/{id}")).await;
    assert_eq!((status, &now["status"], &now["quantity"]), (200, &json!("pending"), &json!(2)));
    let (_, page) = app.get_json("/api/orders?customer=Mallory").await;
    assert_eq!(page["items"], json!([]));
    // Reads from anywhere are still answered (CORS decides what a page may see).
    let r = app.http.get(app.url("/api/orders")).header("origin", "https://evil.example").send().await.unwrap();
    assert_eq!(r.status(), 200);
    // The server's own pages, the allow-list, same-site fetches and clients without Origin may write.
    let own = format!("http://127.0.0.1:{}", app.port);
    let r = form("/api/orders".into(), &own, json_text, "text/plain").await.unwrap();
    assert_eq!(r.status(), 201);
    let r = app
        .http
        .patch(app.url(&format!("/api/orders/{id}")))
        .header("origin", "https://ops.example.com")
        .header("sec-fetch-site", "cross-site")
        .body(r#"{"quantity":3}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app.http.patch(app.url(&format!("/api/orders/{id}"))).header("sec-fetch-site", "same-origin");
    assert_eq!(r.body(r#"{"quantity":4}"#).send().await.unwrap().status(), 200);
    let r = app.http.post(app.url(&format!("/api/orders/{id}/cancel"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_site_page_cannot_write_with_the_token_cookie() {
    let app = secured().await;
    let created: Value = create_as(&app, "Cookie", "writersecret").await.json().await.unwrap();
    let id = created["id"].as_i64().unwrap();
    let cancel = |origin: &'static str| {
        app.http
            .post(app.url(&format!("/api/orders/{id}/cancel")))
            // Pages on https: the cookie the server sets there.
            .header("cookie", "__Host-ordercast_token=writersecret")
            .header("origin", origin)
            .send()
    };
    let r = cancel("https://sibling.example.com").await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "origin_not_allowed");
    let r = cancel("https://ops.example.com").await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_http_methods_do_not_add_metric_series() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app().await;
    for token in ["FOOBAR", "XYZZY", "get"] {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
        let req = format!("{token} /api/orders HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tcp.read_to_end(&mut answer).await.unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 4"), "{}", String::from_utf8_lossy(&answer));
    }
    let text = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(!text.contains("FOOBAR") && !text.contains("XYZZY") && !text.contains("method=\"get\""), "{text}");
    let other: f64 = text
        .lines()
        .filter(|l| l.starts_with("ordercast_http_requests_total{method=\"other\","))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(other, 3.0, "{text}");
}

/// The start-up check of how the database folds customer names tells a
/// database that folds as ordercast does (a glibc UTF-8 locale) from one
/// that folds only ASCII and from an ICU one, which folds a word-final Σ to
/// ς and İ to two characters (where ordercast's folding, as glibc's, gives σ
/// and i). Before, the check knew only the ASCII case and passed an ICU
/// database, whose confined tokens then missed such customers' orders
/// through REST without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_up_check_names_customer_names_the_database_folds_otherwise() {
    use ordercast::startup::{case_folding_differences, Folding};
    let admin = ordercast::db::connect(&crate::helpers::admin_url()).await.unwrap();
    let ask = |options: &'static str| async move {
        let (url, name) = crate::helpers::create_database_with(options).await;
        let db = ordercast::db::connect(&url).await.unwrap();
        let folding = case_folding_differences(&db).await.unwrap();
        drop(db);
        (folding, name)
    };
    let (same, a) = ask("TEMPLATE template0 ENCODING 'UTF8' LOCALE 'C.UTF-8'").await;
    let (ascii, b) = ask("TEMPLATE template0 ENCODING 'UTF8' LOCALE 'C'").await;
    let (icu, c) =
        ask("TEMPLATE template0 ENCODING 'UTF8' LOCALE_PROVIDER icu ICU_LOCALE 'und' LOCALE 'C.UTF-8'").await;
    // Dropped before anything is asserted: none is left behind.
    for name in [a, b, c] {
        admin.batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)")).await.unwrap();
    }
    assert_eq!(same, None);
    assert_eq!(ascii, Some(Folding::AsciiOnly));
    let Some(Folding::Differs(names)) = icu else { panic!("an ICU database folds otherwise: {icu:?}") };
    let names: Vec<(&str, &str)> = names.iter().map(|(n, sql, _)| (n.as_str(), sql.as_str())).collect();
    assert_eq!(names, [("ΟΔΥΣΣΕΥΣ", "οδυσσευς"), ("İSTANBUL", "i\u{307}stanbul")]);
}

/// A SQL_ASCII database keeps text as the bytes a client sent: a DBA's
/// Latin-1 `Zoë` is not UTF-8, and reading it panicked the change listener
/// (every client stopped getting changes). Refused at start instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sql_ascii_database_is_refused_at_start() {
    let (url, name) = crate::helpers::create_database_with("TEMPLATE template0 ENCODING 'SQL_ASCII' LOCALE 'C'").await;
    let refused = ordercast::db::migrate(&url).await;
    let admin = ordercast::db::connect(&crate::helpers::admin_url()).await.unwrap();
    admin.batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)")).await.unwrap();
    let e = format!("{:#}", refused.expect_err("refused"));
    assert!(e.contains("encoding is SQL_ASCII") && e.contains("ENCODING 'UTF8'"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customer_restrictions_fold_names_like_postgresql_in_rest_and_streams() {
    let app = spawn_app_with(|s| {
        s.api_keys = Some(ordercast::config::Secret(
            "writer:writersecret:read+write,plain:plainsecret:read+write:customer=Ismail,\
             dotted:dottedsecret:read+write:customer=İsmail"
                .into(),
        ));
    })
    .await;
    // The same folding as PostgreSQL's lower(), character by character.
    let db = app.sql().await;
    for name in ["İsmail", "İSMAİL", "ΟΔΥΣΣΕΥΣ", "Σ", "\u{212A}elvin", "\u{2126}hm", "Ǆemal"] {
        let lower: String = db.query_one("SELECT lower($1::text)", &[&name]).await.unwrap().get(0);
        assert_eq!(ordercast::domain::fold_case(name), lower, "{name}");
    }
    // A token for "İsmail" sees the orders it creates.
    let r = create_as(&app, "İsmail", "dottedsecret").await;
    assert_eq!(r.status(), 201);
    let mine: Value = r.json().await.unwrap();
    let get = |path: String, token: &'static str| app.http.get(app.url(&path)).bearer_auth(token).send();
    assert_eq!(get(format!("/api/orders/{}", mine["id"]), "dottedsecret").await.unwrap().status(), 200);
    let page: Value = get("/api/orders".into(), "dottedsecret").await.unwrap().json().await.unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 1, "{page}");
    // A token for "Ismail" gets the same answer from REST and from the stream.
    assert_eq!(get(format!("/api/orders/{}", mine["id"]), "plainsecret").await.unwrap().status(), 200);
    // (Streams opened now start after the creation above.)
    app.settled().await;
    let mut ws =
        crate::helpers::WsClient::connect(&format!("ws://127.0.0.1:{}/ws?access_token=plainsecret", app.port)).await;
    ws.ready().await;
    let mut dotted =
        crate::helpers::WsClient::connect(&format!("ws://127.0.0.1:{}/ws?access_token=dottedsecret", app.port)).await;
    dotted.ready().await;
    create_as(&app, "Zed", "writersecret").await;
    let r = app
        .http
        .patch(app.url(&format!("/api/orders/{}", mine["id"])))
        .bearer_auth("plainsecret")
        .json(&json!({"quantity": 7}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for client in [&mut ws, &mut dotted] {
        let c = client.changes(1, WAIT).await;
        assert_eq!((&c[0]["order"]["customer_name"], &c[0]["order"]["quantity"]), (&json!("İsmail"), &json!(7)));
        client.expect_silence(Duration::from_millis(300)).await;
    }
}

/// Records a dead letter as the Kafka ingest would.
async fn dead_letter(app: &TestApp, offset: i64, payload: &[u8]) {
    app.sql()
        .await
        .execute(
            "INSERT INTO dead_letters (group_id, kafka_topic, kafka_partition, kafka_offset, payload, reason, detail) \
             VALUES ('ordercast', 'orders', 0, $1, $2, 'invalid_event', 'test')",
            &[&offset, &payload],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_restricted_admin_token_cannot_read_dead_letters() {
    let app = spawn_app_with(|s| {
        s.api_keys =
            Some(ordercast::config::Secret("ops:opssecret1:read+admin,ada:adasecret1:read+admin:customer=Ada".into()));
    })
    .await;
    dead_letter(&app, 1, br#"{"order":{"customer_name":"Bob","customer_email":"bob@example.com"}}"#).await;
    let dlq = |token: &'static str| app.http.get(app.url("/api/dlq")).bearer_auth(token).send();
    let r = dlq("adasecret1").await.unwrap();
    assert_eq!(r.status(), 403);
    let body = r.text().await.unwrap();
    assert!(body.contains("\"code\":\"forbidden\"") && !body.contains("Bob"), "{body}");
    let page: Value = dlq("opssecret1").await.unwrap().json().await.unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 1, "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_ending_in_an_incomplete_character_is_shown_as_base64() {
    use base64::Engine;
    let app = spawn_app().await;
    let broken = b"{\"product\":\"caf\xc3".to_vec();
    dead_letter(&app, 1, &broken).await;
    // A long text payload cut by the preview inside a character stays text.
    let mut long = vec![b'a'; ordercast::routes::dlq::PAYLOAD_PREVIEW as usize - 1];
    long.extend_from_slice("é and more".as_bytes());
    dead_letter(&app, 2, &long).await;
    let (status, page) = app.get_json("/api/dlq").await;
    assert_eq!(status, 200, "{page}");
    let cut = &page["items"][0];
    assert_eq!((&cut["payload_encoding"], &cut["payload_truncated"]), (&json!("utf8"), &json!(true)), "{cut}");
    assert_eq!(cut["payload"].as_str().unwrap().len(), long.len() - "é and more".len());
    let whole = &page["items"][1];
    assert_eq!((&whole["payload_encoding"], &whole["payload_truncated"]), (&json!("base64"), &json!(false)));
    let shown = base64::engine::general_purpose::STANDARD.decode(whole["payload"].as_str().unwrap()).unwrap();
    assert_eq!(shown, broken);
}

/// A dead letter's key is shown as its payload is: text when it is UTF-8,
/// else base64, and cut at 4096 bytes; headers past 16 KiB by their keys.
/// Before, a binary key came back with U+FFFD for its bytes (lost, and
/// nothing said so) and a key or headers of any size whole, for each of up
/// to 500 rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letters_key_and_headers_are_shown_byte_for_byte_and_bounded() {
    use base64::Engine;
    let app = spawn_app().await;
    let binary_key = vec![0u8, 0, 0, 1, 0xff, 0x80];
    let long_key = vec![b'k'; 300_000];
    let big_headers = json!([{"key": "trace", "value": "t".repeat(100_000)}, {"key": "bin", "value_base64": "AAE="}]);
    // A thousand headers of long keys, and a detail recorded before details
    // were capped.
    let many_headers: Vec<Value> = (0..1000).map(|i| json!({"key": format!("h{i}{}", "k".repeat(1000))})).collect();
    let db = app.sql().await;
    for (offset, key, headers, detail) in [
        (1i64, &binary_key, json!([]), "test".to_string()),
        (2, &long_key, big_headers, "test".to_string()),
        (3, &binary_key, json!(many_headers), "é".repeat(50_000)),
    ] {
        db.execute(
            "INSERT INTO dead_letters (group_id, kafka_topic, kafka_partition, kafka_offset, message_key, payload, \
                                       headers, reason, detail) \
             VALUES ('ordercast', 'orders', 0, $1, $2, 'x', $3, 'invalid_event', $4)",
            &[&offset, key, &headers, &detail],
        )
        .await
        .unwrap();
    }
    let (status, page) = app.get_json("/api/dlq").await;
    assert_eq!(status, 200, "{page}");
    let many = &page["items"][0];
    let shown: Vec<String> = (0..100).map(|i| format!("h{i}{}", "k".repeat(1000))[..256].to_string()).collect();
    let shown: Vec<Value> = shown.into_iter().map(|k| json!({"key": k})).collect();
    assert_eq!((&many["headers"], &many["headers_truncated"]), (&json!(shown), &json!(true)));
    let detail = many["detail"].as_str().unwrap();
    assert!(detail.starts_with("éé") && detail.ends_with("… (cut, 100000 bytes in all)"), "{detail}");
    assert!(detail.len() <= ordercast::ingest::event::MAX_DETAIL + 40, "{}", detail.len());
    let (long, binary) = (&page["items"][1], &page["items"][2]);
    assert_eq!(
        (&binary["key_encoding"], &binary["key_size"], &binary["key_truncated"]),
        (&json!("base64"), &json!(6), &json!(false))
    );
    let shown = base64::engine::general_purpose::STANDARD.decode(binary["key"].as_str().unwrap()).unwrap();
    assert_eq!(shown, binary_key);
    assert_eq!(
        (&long["key_encoding"], &long["key_size"], &long["key_truncated"]),
        (&json!("utf8"), &json!(300_000), &json!(true))
    );
    assert_eq!(long["key"].as_str().unwrap().len(), ordercast::routes::dlq::KEY_PREVIEW as usize);
    assert_eq!(
        (&long["headers"], &long["headers_truncated"]),
        (&json!([{"key": "trace"}, {"key": "bin"}]), &json!(true))
    );
    assert_eq!((&binary["headers"], &binary["headers_truncated"]), (&json!([]), &json!(false)));
}

/// With authentication off, a request addressed to a name other than a
/// loopback one (a DNS-rebinding page: its domain resolves to 127.0.0.1, so
/// its Origin and Host agree) is refused, reads included; with tokens, or for
/// a host the operator listed, the Host is not checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_authentication_off_only_loopback_host_names_are_answered() {
    let app = spawn_app().await;
    let port = app.address.rsplit(':').next().unwrap().to_string();
    let get = |host: String| {
        let app = &app;
        async move {
            let r = app.http.get(app.url("/api/orders")).header("host", host).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap_or_default())
        }
    };
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("app.localhost:{port}"),
        format!("[::1]:{port}"),
    ] {
        assert_eq!(get(host.clone()).await.0, 200, "{host}");
    }
    for host in [format!("rebind.example:{port}"), format!("10.0.0.1:{port}"), "rebind.example".to_string()] {
        let (status, body) = get(host.clone()).await;
        assert_eq!((status, body["code"].as_str()), (403, Some("host_not_allowed")), "{host}");
    }
    // The page's script may add forwarding headers to a same-origin request:
    // they do not stand in for the Host it was sent to.
    for (name, value) in [("x-forwarded-host", "localhost"), ("forwarded", "host=localhost")] {
        let r = app
            .http
            .post(app.url("/api/orders"))
            .header("host", format!("rebind.example:{port}"))
            .header("origin", format!("http://rebind.example:{port}"))
            .header(name, value)
            .json(&serde_json::json!({"customer_name": "Eve", "product": "X", "quantity": 1, "unit_price": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{name}: {value}");
    }
    let listed = spawn_app_with(|s| s.allowed_origins = vec!["http://orders.example:8080".into()]).await;
    let r = listed.http.get(listed.url("/api/orders")).header("host", "orders.example:8080").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let keyed = spawn_app_with(|s| s.api_keys = Some(ordercast::config::Secret("k:abcdefgh:read".into()))).await;
    let r = keyed
        .http
        .get(keyed.url("/api/orders"))
        .header("host", "rebind.example")
        .bearer_auth("abcdefgh")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// A raw WebSocket connection: the handshake written and its answer read.
async fn raw_ws(app: &TestApp) -> tokio::net::TcpStream {
    handshake(tokio::net::TcpStream::connect(("127.0.0.1", app.port)).await.unwrap()).await
}

async fn handshake(tcp: tokio::net::TcpStream) -> tokio::net::TcpStream {
    handshake_with(tcp, "").await
}

/// `headers`: more header lines, each ending in CRLF.
async fn handshake_with(mut tcp: tokio::net::TcpStream, headers: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{headers}\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(tcp.read(&mut b).await.unwrap(), 1, "the handshake is answered");
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    tcp
}

/// A masked client frame: `first` is FIN, RSV and opcode.
fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() <= 125);
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = vec![first, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_empty_continuation_frames_does_not_stall_other_clients_on_its_worker() {
    use tokio::io::AsyncWriteExt;
    // One HTTP worker: every connection shares its thread.
    let app = spawn_app_with(|s| s.workers = 1).await;
    let mut healthy = app.ws("").await;
    healthy.ready().await;
    let mut flooder = raw_ws(&app).await;
    // A text message that never ends: empty continuations, as fast as the
    // socket takes them.
    flooder.write_all(&client_frame(0x01, b"{")).await.unwrap();
    let flood: Vec<u8> = (0..10_000).flat_map(|_| client_frame(0x00, b"")).collect();
    let flooding = tokio::spawn(async move { while flooder.write_all(&flood).await.is_ok() {} });
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.sql()
        .await
        .execute("INSERT INTO orders (customer_name, product, quantity, unit_price) VALUES ('Calm', 'Cog', 1, 1)", &[])
        .await
        .unwrap();
    let got = healthy.changes(1, WAIT).await;
    assert!(!flooding.is_finished(), "the flood went on all along");
    flooding.abort();
    assert_eq!(got[0]["order"]["customer_name"], "Calm");
}

/// The server frames in `bytes`: (opcode, payload), and whether the last
/// one is cut short.
fn server_frames(mut bytes: &[u8]) -> (Vec<(u8, Vec<u8>)>, bool) {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < 2 {
            return (frames, true);
        }
        let (header, len) = match bytes[1] & 0x7f {
            126 if bytes.len() >= 4 => (4, u16::from_be_bytes([bytes[2], bytes[3]]) as usize),
            127 if bytes.len() >= 10 => (10, u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize),
            126 | 127 => return (frames, true),
            n => (2, n as usize),
        };
        if bytes.len() < header + len {
            return (frames, true);
        }
        frames.push((bytes[0] & 0x0f, bytes[header..header + len].to_vec()));
        bytes = &bytes[header + len..];
    }
    (frames, false)
}

/// Inserts `n` orders in one statement, each with an 8 kB customer name:
/// about 9 kB of change per order for every stream.
async fn insert_wide_orders(app: &TestApp, n: i32) {
    app.sql()
        .await
        .execute(
            "INSERT INTO orders (customer_name, product, quantity, unit_price) \
             SELECT repeat('w', 8000) || g, 'Cog', 1, 1 FROM generate_series(1, $1) g",
            &[&n],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_that_reads_again_receives_its_4008_close() {
    use tokio::io::AsyncReadExt;
    let app = spawn_app_with(|s| s.slow_client_secs = 2).await;
    // A client that reads nothing...
    let mut slow = raw_ws(&app).await;
    insert_wide_orders(&app, 3000).await;
    // ...until the server gives up on it...
    let stats = app.state.hub.stats.clone();
    eventually(Duration::from_secs(30), || {
        let stats = stats.clone();
        async move { (stats.slow_disconnects.load(std::sync::atomic::Ordering::Relaxed) >= 1).then_some(()) }
    })
    .await;
    // ...then reads again until the server closes (it lingers 1 s for that).
    // What the kernel holds (a few MB) comes first; then the close, not the
    // many MB of changes queued behind it.
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let _ = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match slow.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let (frames, cut) = server_frames(&got);
    assert!(!cut, "the stream ends mid-frame ({} bytes, {} frames, {:?})", got.len(), frames.len(), started.elapsed());
    let (op, payload) = frames.last().expect("frames");
    assert_eq!(*op, 0x8, "the last frame is a close");
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 4008);
}

/// A client far behind that keeps reading, slowly (a large batch on a slow
/// link), is waited for: 4008 is for one that reads none of what waits for
/// it for the slow-client time, as the README says. Before, the time ran
/// from the start of the wait however much the client read: at 1 MB/s, a
/// 9 MB statement closed it after the limit, again at each bulk write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_far_behind_that_keeps_reading_is_not_closed_as_slow() {
    use tokio::io::AsyncReadExt;
    let app = spawn_app_with(|s| s.slow_client_secs = 3).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    let mut slow = handshake(socket.connect(([127, 0, 0, 1], app.port).into()).await.unwrap()).await;
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    // The ready message first: the session is live.
    while !String::from_utf8_lossy(&got).contains("\"ready\"") {
        let n = slow.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed before ready");
        got.extend_from_slice(&chunk[..n]);
    }
    insert_wide_orders(&app, 1000).await;
    // About 1 MB/s: 9 MB take several times the slow-client time.
    let started = std::time::Instant::now();
    let changes = |got: &[u8]| {
        let (frames, _) = server_frames(got);
        let n = frames.iter().filter(|(op, p)| *op == 0x1 && p.starts_with(b"{\"type\":\"change\"")).count();
        (n, frames.iter().any(|(op, _)| *op == 0x8))
    };
    loop {
        let (n, closed) = changes(&got);
        if n == 1000 || closed {
            assert_eq!((n, closed), (1000, false), "after {:?}", started.elapsed());
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{n} changes in 60 s");
        match tokio::time::timeout(Duration::from_secs(10), slow.read(&mut chunk[..32 * 1024])).await {
            Ok(Ok(0)) => panic!("the connection ended after {n} changes, {:?}", started.elapsed()),
            Ok(Err(e)) => panic!("the connection failed after {n} changes, {:?}: {e}", started.elapsed()),
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("nothing to read for 10 s after {n} changes"),
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(started.elapsed() > Duration::from_secs(6), "read too fast to test anything: {:?}", started.elapsed());
    assert_eq!(app.state.hub.stats.slow_disconnects.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_frames_and_close_codes_follow_rfc_6455() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app_with(|_| {}).await;
    for (frame, expected) in [
        (client_frame(0x88, &4000u16.to_be_bytes()), 1000), // a valid close is answered in kind
        (client_frame(0x88, b""), 1000),
        (client_frame(0x09, b"p"), 1002),                   // fragmented ping
        (client_frame(0x0a, b""), 1002),                    // fragmented pong
        (client_frame(0x08, &1000u16.to_be_bytes()), 1002), // fragmented close
        (client_frame(0x88, &999u16.to_be_bytes()), 1002),
        (client_frame(0x88, &1005u16.to_be_bytes()), 1002),
        (client_frame(0x88, &1006u16.to_be_bytes()), 1002),
        (client_frame(0x88, &1015u16.to_be_bytes()), 1002),
        (client_frame(0x88, &2999u16.to_be_bytes()), 1002),
        (client_frame(0x88, &5000u16.to_be_bytes()), 1002),
        (client_frame(0x88, &[0x03, 0xe8, b'o', 0xff]), 1007), // reason not UTF-8
    ] {
        let mut ws = raw_ws(&app).await;
        ws.write_all(&frame).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(WAIT, ws.read_to_end(&mut got)).await.expect("the server closes").unwrap();
        let (frames, _) = server_frames(&got);
        let (op, payload) = frames.last().expect("frames");
        assert_eq!(*op, 0x8, "{frame:?}: the last frame is a close");
        assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), expected, "{frame:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_whose_token_expires_gets_4001_at_once_and_no_change_committed_after() {
    use tokio::io::AsyncReadExt;
    let app = spawn_app_with(|s| {
        s.jwt_secret = Some(ordercast::config::Secret(JWT_SECRET.into()));
        // Not a slow consumer within this test.
        s.slow_client_secs = 60;
    })
    .await;
    let exp = chrono::Utc::now().timestamp() + 4;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    let auth = format!("Authorization: Bearer {}\r\n", jwt_expiring_at(exp, "read"));
    let mut ws = handshake_with(tcp, &auth).await;
    // The client reads nothing while 2 MB of changes commit (more than the
    // kernel's buffers hold, unless they have grown large)...
    let db = app.sql().await;
    db.execute(
        "INSERT INTO orders (customer_name, product, quantity, unit_price) \
         SELECT repeat('e', 50000) || g, 'Cog', 1, 1 FROM generate_series(1, 40) g",
        &[],
    )
    .await
    .unwrap();
    // ...and its token expires. The client reads again. It gets what the
    // server wrote before the expiry, then the 4001 close at once (well
    // before the next heartbeat, at most 10 s away; the server lingers 1 s
    // for the client to take it), and none of the changes committed after.
    while chrono::Utc::now().timestamp() < exp {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resumed = std::time::Instant::now();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), ws.read_to_end(&mut got))
            .await
            .expect("the server closes")
            .unwrap();
        (got, resumed.elapsed())
    });
    let head_at_expiry: i64 = db.query_one("SELECT change_head()", &[]).await.unwrap().get(0);
    for i in 0..5 {
        db.execute(
            "INSERT INTO orders (customer_name, product, quantity, unit_price) VALUES ('Late ' || $1::text, 'Cog', 1, 1)",
            &[&i.to_string()],
        )
        .await
        .unwrap();
    }
    let (got, waited) = reader.await.unwrap();
    let (frames, cut) = server_frames(&got);
    assert!(!cut, "the stream ends mid-frame");
    let late: Vec<i64> = frames
        .iter()
        .filter(|(op, _)| *op == 0x1)
        .map(|(_, text)| serde_json::from_slice::<Value>(text).unwrap())
        .filter(|v| v["type"] == "change" && v["seq"].as_i64().unwrap() > head_at_expiry)
        .map(|v| v["seq"].as_i64().unwrap())
        .collect();
    let (op, payload) = frames.last().expect("frames");
    assert_eq!(*op, 0x8, "the last frame is a close");
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 4001);
    assert!(late.is_empty(), "changes committed after the token expired were sent: {late:?}");
    // At once, not at the next heartbeat (up to 10 s away); the close's
    // linger (1 s) and a loaded machine included.
    assert!(waited < Duration::from_secs(6), "the close came {waited:?} after the client read again");
}

/// Bytes the kernel holds on a loopback connection from the server's
/// `server_port` to the client's `client_port`: what the server's socket has
/// not had acknowledged (its `tx_queue`) plus what the client's has received
/// and not read (its `rx_queue`), from `/proc/net/tcp`.
fn kernel_held(server_port: u16, client_port: u16) -> usize {
    crate::helpers::tcp_sockets()
        .iter()
        .map(|s| match (s.local_port, s.remote_port) {
            ends if ends == (server_port, client_port) => s.tx_queue,
            ends if ends == (client_port, server_port) => s.rx_queue,
            _ => 0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_websockets_token_expires_any_close_drops_the_changes_queued_before() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for ending in ["client close", "shutdown"] {
        let app = spawn_app_with(|s| {
            s.jwt_secret = Some(ordercast::config::Secret(JWT_SECRET.into()));
            s.slow_client_secs = 60;
        })
        .await;
        // Filling the kernel's buffers takes 2-7 s (they grow as they fill,
        // and reading /proc/net/tcp is slower with many sockets about), and
        // more on a loaded machine.
        let begun = std::time::Instant::now();
        let exp = chrono::Utc::now().timestamp() + 30;
        let tcp = tokio::net::TcpSocket::new_v4().unwrap();
        tcp.set_recv_buffer_size(4096).unwrap();
        let tcp = tcp.connect(([127, 0, 0, 1], app.port).into()).await.unwrap();
        let client_port = tcp.local_addr().unwrap().port();
        let auth = format!("Authorization: Bearer {}\r\n", jwt_expiring_at(exp, "read"));
        let mut ws = handshake_with(tcp, &auth).await;
        let held = || kernel_held(app.port, client_port);
        // The client reads nothing while 1 MB of changes commit (the kernel
        // takes them: its buffers for a loopback connection hold a few MB),
        // then changes of 32 KB, one at a time, until the kernel no longer
        // takes all of one...
        let db = app.sql().await;
        let insert = |rows: i32, size: i32| {
            let db = &db;
            async move {
                db.execute(
                    "INSERT INTO orders (customer_name, product, quantity, unit_price) \
                     SELECT repeat('q', $2) || g, 'Cog', 1, 1 FROM generate_series(1, $1) g",
                    &[&rows, &size],
                )
                .await
                .unwrap();
            }
        };
        insert(32, 32_000).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut before = held();
        for _ in 0..1000 {
            insert(1, 32_000).await;
            tokio::time::sleep(Duration::from_millis(30)).await;
            let mut now = held();
            if now < before + 32_000 {
                // Full once nothing moves for two looks in a row (a slow
                // fan-out on a loaded machine looks full for one).
                tokio::time::sleep(Duration::from_millis(300)).await;
                let later = held();
                if later == now {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let again = held();
                    if again == later {
                        break;
                    }
                    now = again;
                } else {
                    now = later;
                }
            }
            before = now;
        }
        assert!(
            chrono::Utc::now().timestamp() < exp - 2,
            "{ending}: the kernel's buffers filled too late ({:?})",
            begun.elapsed()
        );
        // ...then, until the token expires, changes of 2 KB whenever the
        // kernel took more (its buffers grow now and then): they wait in the
        // session's queue (with the rest of the last 32 KB, less than the
        // 64 KiB at which the session would wait for the client, so it goes
        // on as if all were well).
        insert(4, 2_000).await;
        let mut before = held();
        while chrono::Utc::now().timestamp() < exp {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if held() >= before + 9_000 && chrono::Utc::now().timestamp() < exp {
                insert(4, 2_000).await;
                before = held();
            }
        }
        // The token has expired; the session ends for another reason.
        let full = held();
        match ending {
            "client close" => ws.write_all(&client_frame(0x88, &1000u16.to_be_bytes())).await.unwrap(),
            _ => {
                let _ = app.state.shutdown.send(true);
            }
        }
        // The client reads again: what the kernel held, the rest of the frame
        // it held part of, then the 4001 close; not one frame that began in
        // the session's queue.
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), ws.read_to_end(&mut got))
            .await
            .expect("the server closes")
            .unwrap();
        let (frames, cut) = server_frames(&got);
        assert!(!cut, "{ending}: the stream ends mid-frame");
        let (op, payload) = frames.last().expect("frames");
        assert_eq!(*op, 0x8, "{ending}: the last frame is a close");
        let code = u16::from_be_bytes([payload[0], payload[1]]);
        let mut start = 0;
        let mut queued = 0;
        for (_, payload) in &frames[..frames.len() - 1] {
            queued += usize::from(start >= full);
            start += payload.len()
                + match payload.len() {
                    0..=125 => 2,
                    126..=65535 => 4,
                    _ => 10,
                };
        }
        assert_eq!(queued, 0, "{ending}: the kernel held {full} bytes; {queued} frames queued after them were sent");
        assert_eq!(code, 4001, "{ending}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_message_after_the_token_expired_is_not_answered_but_closed_with_4001() {
    use futures_util::SinkExt;
    let app = spawn_app_with(|s| s.jwt_secret = Some(ordercast::config::Secret(JWT_SECRET.into()))).await;
    // (Whole seconds: valid for 3 to 4 s, time enough to connect on a loaded
    // machine.)
    let exp = chrono::Utc::now().timestamp() + 4;
    let mut req = format!("ws://127.0.0.1:{}/ws", app.port).into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {}", jwt_expiring_at(exp, "read")).parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap() {
            Message::Text(t) if serde_json::from_str::<Value>(&t).unwrap()["type"] == "ready" => break,
            _ => {}
        }
    }
    // A snapshot would wait for this lock: the subscribe must not get as far
    // as its query.
    let mut locker = app.sql().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE").await.unwrap();
    while chrono::Utc::now().timestamp() < exp {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ws.send(Message::Text(json!({"type": "subscribe", "snapshot": true}).to_string())).await.unwrap();
    let mut got = Vec::new();
    let close = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
                Some(Ok(m)) => got.push(m),
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await;
    drop(lock);
    assert_eq!(close, Ok(Some(4001)), "after {got:?}");
    assert!(
        !got.iter().any(|m| matches!(m, Message::Text(t) if t.contains("\"snapshot\""))),
        "a snapshot was sent: {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_whose_token_expires_ends_before_any_later_change() {
    let app = spawn_app_with(|s| s.jwt_secret = Some(ordercast::config::Secret(JWT_SECRET.into()))).await;
    // (Whole seconds: valid for 3 to 4 s, time enough to connect on a loaded
    // machine.)
    let exp = chrono::Utc::now().timestamp() + 4;
    let mut sse = app.sse(&format!("/api/events?access_token={}", jwt_expiring_at(exp, "read")), None).await;
    assert_eq!(sse.next_event(WAIT).await.event, "ready");
    while chrono::Utc::now().timestamp() < exp {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.sql()
        .await
        .execute("INSERT INTO orders (customer_name, product, quantity, unit_price) VALUES ('Late', 'Cog', 1, 1)", &[])
        .await
        .unwrap();
    // The change committed after the expiry is not sent: the stream's next
    // (and last) event says why (it used to come with the keep-alive, up to
    // 15 s later, after the change).
    let next = sse.next_event(WAIT).await;
    assert_eq!((next.event.as_str(), &next.data["code"]), ("error", &json!("token_expired")), "{next:?}");
}

/// Access-log lines for paths starting with `/access-log-probe`, captured
/// from every test in this process (the first call installs the logger).
fn access_log_probe_lines() -> &'static std::sync::Mutex<Vec<String>> {
    struct Capture(std::sync::Mutex<Vec<String>>);
    impl log::Log for Capture {
        fn enabled(&self, m: &log::Metadata<'_>) -> bool {
            m.target().starts_with("actix_web::middleware::logger")
        }
        fn log(&self, r: &log::Record<'_>) {
            let line = r.args().to_string();
            if self.enabled(r.metadata()) && line.contains(" /access-log-probe") {
                self.0.lock().unwrap().push(line);
            }
        }
        fn flush(&self) {}
    }
    static CAPTURE: std::sync::OnceLock<&'static Capture> = std::sync::OnceLock::new();
    &CAPTURE
        .get_or_init(|| {
            let capture: &'static Capture = Box::leak(Box::new(Capture(Default::default())));
            log::set_logger(capture).expect("no other logger in the API tests");
            log::set_max_level(log::LevelFilter::Info);
            capture
        })
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_prints_a_made_up_method_token_cut_short() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let lines = access_log_probe_lines();
    let app = spawn_app().await;
    let long = "X".repeat(6000);
    for token in ["GET", long.as_str()] {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
        let req = format!("{token} /access-log-probe HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tcp.read_to_end(&mut answer).await.unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 4"), "{}", String::from_utf8_lossy(&answer));
    }
    let lines = eventually(Duration::from_secs(5), || async {
        // Only this test's lines (the path's test logs another).
        let lines: Vec<String> =
            lines.lock().unwrap().iter().filter(|l| l.contains(" /access-log-probe\" ")).cloned().collect();
        (lines.len() >= 2).then_some(lines)
    })
    .await;
    assert!(lines.iter().any(|l| l.contains("\"GET /access-log-probe\" 404")), "{lines:?}");
    let made_up = format!("\"other:{}... /access-log-probe\" 404", "X".repeat(16));
    assert!(lines.iter().any(|l| l.contains(&made_up)), "{lines:?}");
    assert!(lines.iter().all(|l| l.len() < 200), "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_prints_a_long_path_cut_short() {
    let lines = access_log_probe_lines();
    let app = spawn_app().await;
    // Well under the request head's size limit, so the request is answered.
    let path = format!("/access-log-probe-path/{}", "p".repeat(6000));
    let r = app.http.get(app.url(&format!("{path}?q=1"))).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let line = eventually(Duration::from_secs(5), || async {
        lines.lock().unwrap().iter().find(|l| l.contains(" /access-log-probe-path/")).cloned()
    })
    .await;
    let logged = format!("\"GET {}...\" 404", &path[..256]);
    assert!(line.contains(&logged), "{line}");
    assert!(line.len() < 400, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_protected_paths_authentication_and_scope_come_before_404_and_405() {
    let app = secured().await;
    let answer = |method: &str, path: &str, token: Option<&'static str>| {
        let mut r = app.http.request(reqwest::Method::from_bytes(method.as_bytes()).unwrap(), app.url(path));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        async move {
            let r = r.send().await.unwrap();
            let status = r.status().as_u16();
            let www = r.headers().contains_key("www-authenticate");
            (status, www, r.json::<Value>().await.unwrap_or(Value::Null)["code"].as_str().map(str::to_owned))
        }
    };
    let no = |code: &str| Some(code.to_string());
    for (method, path, token, expected) in [
        // No (valid) token: 401 whatever the method and path under /api/ and /ws.
        ("PUT", "/api/orders", None, (401, true, no("missing_token"))),
        ("GET", "/api/nope", None, (401, true, no("missing_token"))),
        ("DELETE", "/api/x.json", None, (401, true, no("missing_token"))),
        ("POST", "/ws", None, (401, true, no("missing_token"))),
        ("PATCH", "/ws", Some("bogus"), (401, true, no("invalid_token"))),
        // A GET that is not a WebSocket handshake (no upgrade headers) is not
        // let through to be refused with a close code.
        ("GET", "/ws", None, (401, true, no("missing_token"))),
        ("GET", "/ws", Some("bogus"), (401, true, no("invalid_token"))),
        // A token without the scope the method needs (read for GET, HEAD and
        // OPTIONS, write for the others): 403.
        ("PUT", "/api/orders", Some("readersecret"), (403, false, no("insufficient_scope"))),
        ("DELETE", "/api/nope", Some("readersecret"), (403, false, no("insufficient_scope"))),
        // Authorized: what the routes say.
        ("GET", "/api/nope", Some("readersecret"), (404, false, no("not_found"))),
        ("PUT", "/api/orders", Some("writersecret"), (405, false, no("method_not_allowed"))),
        ("POST", "/ws", Some("writersecret"), (405, false, no("method_not_allowed"))),
        ("GET", "/ws", Some("readersecret"), (400, false, no("websocket_handshake_failed"))),
        ("DELETE", "/api/nope", Some("writersecret"), (404, false, no("not_found"))),
        // Public paths need no token.
        ("POST", "/api/health", None, (405, false, no("method_not_allowed"))),
        ("DELETE", "/js/app.js", None, (405, false, no("method_not_allowed"))),
        ("DELETE", "/js/nope.js", None, (404, false, no("not_found"))),
    ] {
        assert_eq!(answer(method, path, token).await, expected, "{method} {path} with {token:?}");
    }
}

/// A confined viewer's filter is applied to its own side of a move only: a
/// token confined to Ada that follows `processing` orders does not learn
/// that her order became Bob's and `processing` in one statement (its
/// `leave` would say so), nor does Bob following `pending` learn the status
/// it had under Ada.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confined_filter_sees_a_move_only_through_its_own_side() {
    let app = with_keys(ADA_AND_BOB).await;
    let db = app.sql().await;
    let id: i64 = db
        .query_one(
            "INSERT INTO orders (customer_name, product, quantity, unit_price) VALUES ('Ada', 'Cog', 1, 1) RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    app.settled().await;
    let port = app.port;
    let ws = |query: &str| {
        let url = format!("ws://127.0.0.1:{port}/ws?{query}");
        async move {
            let mut c = crate::helpers::WsClient::connect(&url).await;
            c.ready().await;
            c
        }
    };
    let mut ada_processing = ws("access_token=adasecret1&status=processing").await;
    let mut ada_pending = ws("access_token=adasecret1&status=pending").await;
    let mut bob_pending = ws("access_token=bobsecret1&status=pending").await;
    let mut bob_processing = ws("access_token=bobsecret1&status=processing").await;
    db.execute("UPDATE orders SET customer_name = 'Bob', status = 'processing' WHERE id = $1", &[&id]).await.unwrap();
    // A change after the move that every one of them receives, so that the
    // first message each gets tells whether the move reached it.
    db.execute(
        "INSERT INTO orders (customer_name, product, quantity, unit_price) VALUES ('Ada', 'Cog', 1, 1), ('Bob', 'Cog', 1, 1)",
        &[],
    )
    .await
    .unwrap();
    db.execute("UPDATE orders SET status = 'processing' WHERE id > $1", &[&id]).await.unwrap();
    let first = |v: Value| (v["op"].as_str().unwrap_or_default().to_string(), v["order"]["id"].as_i64());
    let leave = ada_pending.changes(1, WAIT).await.remove(0);
    assert_eq!(first(leave.clone()), ("leave".into(), Some(id)));
    assert_eq!(leave["order"]["status"], "pending");
    let enter = bob_processing.changes(1, WAIT).await.remove(0);
    assert_eq!(first(enter.clone()), ("enter".into(), Some(id)));
    for (name, client) in
        [("ada following processing", &mut ada_processing), ("bob following pending", &mut bob_pending)]
    {
        let got = first(client.changes(1, WAIT).await.remove(0));
        assert_ne!(got.1, Some(id), "{name} got the move: {got:?}");
    }
}

/// SSE streams that stopped reading hold a few kilobytes each of a large
/// batch, not a copy of it: the HTTP layer copies what it is handed into
/// the connection's buffer, and the batch (one bulk update of 2,000 orders,
/// about 3 MB of events) is handed in pieces. Before, 150 stalled streams
/// held a copy each, some 450 MB of a real server's memory, for as long as
/// the kernel kept their connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_sse_streams_do_not_each_copy_a_large_batch() {
    use tokio::io::AsyncWriteExt;
    let (db_url, _) = create_database().await;
    let port = free_port();
    let server = Server::start(&db_url, port).await;
    let db = ordercast::db::connect(&db_url).await.unwrap();
    db.execute(
        "INSERT INTO orders (customer_name, product, quantity, unit_price) \
         SELECT 'Customer ' || g, repeat('p', 600), 1, 1 FROM generate_series(1, 2000) g",
        &[],
    )
    .await
    .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let mut healthy = crate::helpers::SseClient::connect(&http, &format!("{url}/api/events"), None).await;
    healthy.next_event(WAIT).await;
    let mut stalled = Vec::new();
    for _ in 0..150 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut s = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
        s.write_all(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.unwrap();
        stalled.push(s);
    }
    // Every stream is open (and past its ready event).
    crate::helpers::eventually(WAIT, || async {
        let metrics = http.get(format!("{url}/metrics")).send().await.ok()?.text().await.ok()?;
        metrics.contains("ordercast_connections{transport=\"sse\"} 151\n").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.rss();
    db.execute("UPDATE orders SET quantity = 2", &[]).await.unwrap();
    assert_eq!(healthy.changes(2000, Duration::from_secs(60)).await.len(), 2000);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown = server.rss().saturating_sub(before);
    assert!(grown < 60 << 20, "150 stalled SSE streams grew the server by {} KiB", grown >> 10);
    drop(stalled);
}

/// A stream opened with a snapshot lets the rows go once they are sent: 60
/// WebSockets that each took a snapshot of 2,000 orders (about 0.8 MB of
/// JSON apiece) and then sit idle hold a few megabytes of a real server's
/// memory, not the 50 MB their pages would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_streams_opened_with_a_snapshot_do_not_hold_its_rows() {
    let (db_url, _) = create_database().await;
    let port = free_port();
    // Applies the migrations.
    let server = Server::start(&db_url, port).await;
    let db = ordercast::db::connect(&db_url).await.unwrap();
    db.execute(
        "INSERT INTO orders (customer_name, customer_email, product, quantity, unit_price) \
         SELECT 'Customer number ' || g, 'customer' || g || '@mail.example', 'A product with a long name', 1, 9.5 \
         FROM generate_series(1, 2000) g",
        &[],
    )
    .await
    .unwrap();
    let url = format!("ws://127.0.0.1:{port}/ws?snapshot=true&snapshot_limit=2000");
    let open = || async {
        let mut ws = WsClient::connect(&url).await;
        let mut rows = 0;
        loop {
            let v = ws.next_json(WAIT).await;
            match v["type"].as_str() {
                Some("snapshot") => rows += v["orders"].as_array().unwrap().len(),
                Some("ready") => break,
                _ => panic!("unexpected before ready: {v}"),
            }
        }
        assert_eq!(rows, 2000);
        ws
    };
    // The first ones warm the server up (its allocator, the streams' pool).
    let mut clients = vec![open().await, open().await];
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = server.rss();
    for _ in 0..60 {
        clients.push(open().await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let grown = server.rss().saturating_sub(before);
    assert!(grown < 15 << 20, "60 idle snapshot streams grew the server by {} KiB", grown >> 10);
}
