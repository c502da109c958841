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
    assert_eq!(
        body,
        json!({"authentication": true, "name": "reader", "scopes": ["read"], "customer": null, "expires_at": null})
    );

    // The cookie is the browser's credential from now on, with its scopes.
    let (status, me) = who(&app, Some(sent_back(&cookie))).await;
    assert_eq!((status, &me["name"], &me["scopes"]), (200, &json!("reader"), &json!(["read"])));
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

    // A JWT's cookie lasts as long as the token.
    let (status, cookie, body) = sign_in(&app, &json!({"token": jwt(120, "read write")}), &[]).await;
    assert_eq!(status, 200);
    let max_age: i64 = cookie.unwrap().split("Max-Age=").nth(1).unwrap().split(';').next().unwrap().parse().unwrap();
    assert!((100..=120).contains(&max_age), "Max-Age={max_age}");
    assert_eq!(body["scopes"], json!(["read", "write"]));
    assert!(body["expires_at"].as_str().unwrap().ends_with('Z'), "{body}");

    // Behind a proxy that terminated HTTPS, the cookie is Secure.
    let (_, cookie, _) = sign_in(&app, &json!({"token": "readersecret"}), &[("X-Forwarded-Proto", "https")]).await;
    assert!(cookie.unwrap().ends_with("; Secure"));

    // Signing out removes the cookie.
    let out = app.http.delete(app.url("/api/session")).send().await.unwrap();
    assert_eq!(out.status(), 204);
    assert_eq!(
        out.headers()["set-cookie"].to_str().unwrap(),
        "ordercast_token=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict"
    );
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

    // A token a cookie cannot carry is told to use the header instead.
    let spaced = with_keys("spaced:has space1:read").await;
    let (got, cookie, problem) = sign_in(&spaced, &json!({"token": "has space1"}), &[]).await;
    assert_eq!((got, problem["code"].as_str().unwrap(), cookie), (422, "token_not_cookie_safe", None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_attempts_count_against_the_write_rate_of_the_address() {
    let app = spawn_app_with(|s| {
        s.api_keys = Some(ordercast::config::Secret("reader:readersecret:read".into()));
        s.write_rate = 0.01;
        s.write_burst = 3.0;
    })
    .await;
    let mut codes = vec![];
    for _ in 0..4 {
        codes.push(sign_in(&app, &json!({"token": "guess-1234"}), &[]).await.0);
    }
    assert_eq!(codes, [401, 401, 401, 429]);
    // The right token is refused too, until the address may try again.
    assert_eq!(sign_in(&app, &json!({"token": "readersecret"}), &[]).await.0, 429);
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
