//! `/api/session`: a browser signs in with a token kept in an `HttpOnly`
//! cookie, asks who it is, and signs out.

use serde_json::{json, Value};

use crate::hardening::{jwt, secured, with_keys};
use crate::helpers::{spawn_app, spawn_app_with, TestApp};

async fn sign_in(app: &TestApp, body: &Value, headers: &[(&str, &str)]) -> (u16, Option<String>, Value) {
    let mut req = app.http.post(app.url("/api/session")).json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let cookie = res.headers().get("set-cookie").map(|c| c.to_str().unwrap().to_string());
    (status, cookie, res.json().await.unwrap_or(Value::Null))
}

async fn who(app: &TestApp, cookie: Option<&str>) -> (u16, Value) {
    let mut req = app.http.get(app.url("/api/session"));
    if let Some(c) = cookie {
        req = req.header("Cookie", c);
    }
    let res = req.send().await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap())
}

/// The `name=value` part of a `Set-Cookie`, as a browser sends it back.
fn sent_back(set_cookie: &str) -> &str {
    set_cookie.split(';').next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_in_keeps_the_token_in_an_http_only_cookie_that_authenticates_the_browser() {
    let app = secured().await;
    let (status, cookie, body) = sign_in(&app, &json!({"token": "readersecret"}), &[]).await;
    assert_eq!(status, 200, "{body}");
    let cookie = cookie.expect("a cookie is set");
    assert_eq!(cookie, "ordercast_token=readersecret; Path=/; Max-Age=2592000; HttpOnly; SameSite=Strict");
    // Answers that carry a token's details are not kept by caches.
    let res = app.http.post(app.url("/api/session")).json(&json!({"token": "readersecret"})).send().await.unwrap();
    assert_eq!(res.headers()["cache-control"], "no-store");
    assert_eq!(
        body,
        json!({"authentication": true, "name": "reader", "scopes": ["read"], "customer": null, "customer_name": null, "expires_at": null})
    );

    // The cookie is the browser's credential from now on, with its scopes.
    let (status, me) = who(&app, Some(sent_back(&cookie))).await;
    assert_eq!((status, &me["name"], &me["scopes"]), (200, &json!("reader"), &json!(["read"])));
    // As is the header.
    let me: Value =
        app.http.get(app.url("/api/session")).bearer_auth("opssecret1").send().await.unwrap().json().await.unwrap();
    assert_eq!(me["scopes"], json!(["read", "write", "admin"]));
    let list = app.http.get(app.url("/api/orders")).header("Cookie", sent_back(&cookie)).send().await.unwrap();
    assert_eq!(list.status(), 200);
    let create = app
        .http
        .post(app.url("/api/orders"))
        .header("Cookie", sent_back(&cookie))
        .json(&json!({"customer_name": "C", "product": "P", "quantity": 1, "unit_price": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(create.status(), 403);

    // A confined writer's session says so.
    let (_, _, ada) = sign_in(&app, &json!({"token": "adasecret1"}), &[]).await;
    assert_eq!((&ada["scopes"], &ada["customer"]), (&json!(["read", "write"]), &json!("ada")));
    assert_eq!(ada["customer_name"], "Ada", "as the key names it");

    // A JWT's cookie lasts as long as the token.
    let (status, cookie, body) = sign_in(&app, &json!({"token": jwt(120, "read write")}), &[]).await;
    assert_eq!(status, 200);
    let max_age: i64 = cookie.unwrap().split("Max-Age=").nth(1).unwrap().split(';').next().unwrap().parse().unwrap();
    assert!((100..=120).contains(&max_age), "Max-Age={max_age}");
    assert_eq!(body["scopes"], json!(["read", "write"]));
    assert!(body["expires_at"].as_str().unwrap().ends_with('Z'), "{body}");

    // Over HTTPS, as a proxy that ended TLS says it, or as the page's
    // origin does, the cookie is Secure and has a name only this host can
    // set; it authenticates before any plain one.
    let secure = "__Host-ordercast_token=readersecret; Path=/; Max-Age=2592000; HttpOnly; SameSite=Strict; Secure";
    for headers in [[("X-Forwarded-Proto", "HTTPS")], [("Origin", "https://ops.example.com")]] {
        let (_, cookie, _) = sign_in(&app, &json!({"token": "readersecret"}), &headers).await;
        assert_eq!(cookie.as_deref(), Some(secure), "{headers:?}");
    }
    let both = format!("ordercast_token=opssecret1; {}", sent_back(secure));
    assert_eq!(who(&app, Some(&both)).await.1["name"], "reader");

    // Over HTTPS a plain cookie is not taken (a sibling domain could have
    // set it); over HTTP it is, as it is, and nothing is set again.
    let plain = |https: bool| {
        let mut req = app.http.get(app.url("/api/session")).header("Cookie", "ordercast_token=readersecret");
        if https {
            req = req.header("X-Forwarded-Proto", "https");
        }
        async move {
            let res = req.send().await.unwrap();
            (res.status().as_u16(), res.headers().get_all("set-cookie").iter().count())
        }
    };
    assert_eq!(plain(true).await, (401, 0));
    assert_eq!(plain(false).await, (200, 0));

    // Signing out removes the cookie, over HTTPS both.
    let out = app.http.delete(app.url("/api/session")).send().await.unwrap();
    assert_eq!(out.status(), 204);
    let removed = |res: &reqwest::Response| -> Vec<String> {
        res.headers().get_all("set-cookie").iter().map(|c| c.to_str().unwrap().to_string()).collect()
    };
    assert_eq!(removed(&out), ["ordercast_token=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict"]);
    let out =
        app.http.delete(app.url("/api/session")).header("Origin", "https://ops.example.com").send().await.unwrap();
    assert_eq!(
        removed(&out),
        [
            "__Host-ordercast_token=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict; Secure",
            "ordercast_token=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict; Secure"
        ]
    );
    // Not from another site.
    let out = app.http.delete(app.url("/api/session")).header("Origin", "https://evil.example").send().await.unwrap();
    assert_eq!((out.status().as_u16(), removed(&out).len()), (403, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_sign_in_says_why_and_sets_no_cookie() {
    let app = secured().await;
    for (body, headers, status, code) in [
        (json!({"token": "not-a-token"}), &[][..], 401, "invalid_token"),
        (json!({"token": jwt(-10, "read")}), &[][..], 401, "token_expired"),
        (json!({"token": ""}), &[][..], 422, "validation_failed"),
        (json!({"token": "readersecret", "remember": true}), &[][..], 422, "unknown_field"),
        (json!(["readersecret"]), &[][..], 422, "invalid_body"),
        // A token without the scope the page needs is not kept.
        (json!({"token": "readersecret", "scope": "write"}), &[][..], 403, "insufficient_scope"),
        // Another site cannot sign the browser in with a token of its own.
        (json!({"token": "readersecret"}), &[("Origin", "https://evil.example")][..], 403, "origin_not_allowed"),
    ] {
        let (got, cookie, problem) = sign_in(&app, &body, headers).await;
        assert_eq!((got, problem["code"].as_str().unwrap()), (status, code), "{body} {headers:?}: {problem}");
        assert_eq!(cookie, None, "{body}");
    }
    // From an allowed origin it works.
    let (got, cookie, _) =
        sign_in(&app, &json!({"token": "readersecret"}), &[("Origin", "https://ops.example.com")]).await;
    assert_eq!((got, cookie.is_some()), (200, true));
    let bad = app.http.post(app.url("/api/session")).body("{\"token\":").send().await.unwrap();
    assert_eq!(bad.status(), 400);

    // Who: nothing, or a bad cookie, is 401 with the reason.
    assert_eq!(who(&app, None).await.1["code"], "missing_token");
    assert_eq!(who(&app, Some("ordercast_token=nope")).await.1["code"], "invalid_token");

    // A token a cookie cannot carry is told to use the header instead: its
    // characters, or its length (browsers drop a longer cookie).
    let spaced = with_keys("spaced:has space1:read").await;
    let (got, cookie, problem) = sign_in(&spaced, &json!({"token": "has space1"}), &[]).await;
    assert_eq!((got, problem["code"].as_str().unwrap(), cookie), (422, "token_not_cookie_safe", None));
    let long =
        crate::hardening::signed_jwt(&json!({"sub": "x".repeat(4000), "exp": chrono::Utc::now().timestamp() + 60}));
    assert_eq!(app.http.get(app.url("/api/session")).bearer_auth(&long).send().await.unwrap().status(), 200);
    let (got, cookie, problem) = sign_in(&app, &json!({"token": long}), &[]).await;
    assert_eq!((got, problem["code"].as_str().unwrap(), cookie), (422, "token_not_cookie_safe", None), "{problem}");
}

/// Guessing a key: after a burst of invalid tokens from one address (10
/// here), on any route, that address has no token checked (429, a right one
/// neither) until it is back under the rate (0.1 per second here: slow
/// enough that the bucket stays empty through the checks below, however
/// slowly a loaded machine runs them; at 0.5 it could fill again within a
/// second of the first 429).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_tokens_from_one_address_are_throttled_on_every_route() {
    let app = spawn_app_with(|s| {
        s.api_keys = Some(ordercast::config::Secret("reader:readersecret:read".into()));
        s.auth_failure_rate = 0.1;
        s.auth_failure_burst = 10.0;
    })
    .await;
    let get = |path: &'static str, token: &'static str| {
        let r = app.http.get(app.url(path)).bearer_auth(token).send();
        async move { r.await.unwrap().status().as_u16() }
    };
    let started = std::time::Instant::now();
    let mut refused = 0;
    let throttled = loop {
        // Valid tokens never count.
        if refused == 5 {
            assert_eq!(get("/api/orders", "readersecret").await, 200);
        }
        let status = match refused % 3 {
            0 => sign_in(&app, &json!({"token": "guess-1234"}), &[]).await.0,
            1 => get("/api/orders", "guess-1234").await,
            _ => get("/api/session", "guess-1234").await,
        };
        if status != 401 {
            break status;
        }
        refused += 1;
        assert!(refused <= 10 + (started.elapsed().as_secs_f64() * 0.1).ceil() as usize, "{refused} refused");
    };
    assert_eq!(throttled, 429);
    assert!(refused >= 10, "only {refused} refused before the throttle");
    let res = app.http.get(app.url("/api/events")).bearer_auth("guess-1234").send().await.unwrap();
    assert_eq!(res.status(), 429);
    assert!(res.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(res.json::<Value>().await.unwrap()["code"], "rate_limited");
    assert_eq!(get("/api/orders", "readersecret").await, 429, "no answer tells a right guess apart");
    assert_eq!(sign_in(&app, &json!({"token": "readersecret"}), &[]).await.0, 429);
    // A WebSocket handshake is closed with 1013 (try again later).
    let (closed, _) = crate::hardening::ws_at(&app, "/ws?access_token=readersecret", &[]).await;
    assert_eq!(closed.map(|c| c.0), Some(1013));
    // Back under the rate within 10 s (a right token is not counted).
    crate::helpers::eventually(std::time::Duration::from_secs(20), || async {
        (get("/api/orders", "readersecret").await == 200).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_authentication_off_everyone_may_do_everything_and_takes_no_token() {
    let app = spawn_app().await;
    let (status, me) = who(&app, None).await;
    assert_eq!(status, 200);
    assert_eq!((&me["authentication"], &me["scopes"]), (&json!(false), &json!(["read", "write", "admin"])));
    let (status, cookie, problem) = sign_in(&app, &json!({"token": "anything-1"}), &[]).await;
    assert_eq!((status, problem["code"].as_str().unwrap(), cookie), (409, "authentication_off", None));
}
