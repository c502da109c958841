use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{spawn_app, TestApp};

fn order_body() -> Value {
    json!({"customer_name": "Ada Lovelace", "customer_email": "ada@example.com", "product": "Analytical Engine", "quantity": 3, "unit_price": "12.50"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_an_order_returns_201_with_location_and_the_row() {
    let app = spawn_app().await;
    let r = app.post_order(&order_body()).await;
    assert_eq!(r.status(), 201);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let order: Value = r.json().await.unwrap();
    assert_eq!(location, format!("/api/orders/{}", order["id"]));
    assert_eq!(order["status"], "pending");
    assert_eq!(order["version"], 1);
    assert_eq!(order["amount"], 37.5);
    assert_eq!(order["unit_price"], 12.5);
    assert!(order["created_at"].is_string());

    let (status, fetched) = app.get_json(&location).await;
    assert_eq!(status, 200);
    assert_eq!(fetched, order);
}

/// A second order with an `external_id` already taken: 409 with a code of
/// its own and the field, in ordercast's words (the database's name the
/// constraint and repeat the key), and nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_external_id_is_409_naming_the_field() {
    let app = spawn_app().await;
    let mut body = order_body();
    body["external_id"] = json!("EXT-7");
    assert_eq!(app.post_order(&body).await.status(), 201);
    body["customer_name"] = json!("Someone Else");
    let r = app.post_order(&body).await;
    assert_eq!(r.status(), 409);
    let problem: Value = r.json().await.unwrap();
    assert_eq!((&problem["code"], &problem["field"]), (&json!("duplicate_external_id"), &json!("external_id")));
    let message = problem["message"].as_str().unwrap();
    assert!(!message.contains("orders_external_id_key") && !message.contains("EXT-7"), "{message}");
    let (_, list) = app.get_json("/api/orders").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
}

/// A database in an encoding narrower than UTF-8 refuses what it cannot
/// hold: that is the client's input, a 422, not a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_the_databases_encoding_cannot_hold_is_422() {
    let app = crate::helpers::spawn_app_in("ENCODING 'WIN1252' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0").await;
    let mut body = order_body();
    body["customer_name"] = json!("Élan");
    assert_eq!(app.post_order(&body).await.status(), 201, "Windows-1252 holds É");
    body["customer_name"] = json!("日本");
    let r = app.post_order(&body).await;
    assert_eq!(r.status(), 422);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "validation_failed");
    let (_, list) = app.get_json("/api/orders").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_errors_name_the_field() {
    let app = spawn_app().await;
    let cases = [
        (json!({"product": "x", "quantity": 1, "unit_price": 1}), 422, "customer_name", "missing_field"),
        (
            json!({"customer_name": "a", "product": "x", "quantity": 0, "unit_price": 1}),
            422,
            "quantity",
            "validation_failed",
        ),
        (
            json!({"customer_name": "a", "product": "x", "quantity": "two", "unit_price": 1}),
            422,
            "quantity",
            "validation_failed",
        ),
        (
            json!({"customer_name": "a", "product": "x", "quantity": 1, "unit_price": -3}),
            422,
            "unit_price",
            "validation_failed",
        ),
        (
            json!({"customer_name": "a", "product": "x", "quantity": 1, "unit_price": 1, "colour": "red"}),
            422,
            "colour",
            "unknown_field",
        ),
        (
            json!({"customer_name": "a", "product": "x", "quantity": 1, "unit_price": 1, "customer_email": "nope"}),
            422,
            "customer_email",
            "validation_failed",
        ),
        (
            json!({"customer_name": "a", "product": "x", "quantity": 1, "unit_price": 1, "status": "lost"}),
            422,
            "status",
            "validation_failed",
        ),
        (json!(["not", "an", "object"]), 422, "body", "invalid_body"),
    ];
    for (body, status, field, code) in cases {
        let r = app.post_order(&body).await;
        assert_eq!(r.status().as_u16(), status, "{body}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        let problem: Value = r.json().await.unwrap();
        assert_eq!(problem["field"], field, "{body}: {problem}");
        assert_eq!(problem["code"], code, "{body}: {problem}");
    }
}

/// An object that names a key twice is refused, not read as its last value
/// (which a gateway or validator in front of ordercast, reading the first,
/// would disagree with): nothing is created or changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_names_a_key_twice_is_refused() {
    let app = spawn_app().await;
    let id = app.create_order("Twice").await["id"].as_i64().unwrap();
    let refused = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        let problem: Value = r.json().await.unwrap();
        assert_eq!((status, problem["code"].as_str()), (400, Some("malformed_json")), "{problem}");
        assert!(problem["message"].as_str().unwrap().contains(r#"the key "status" appears twice"#), "{problem}");
    };
    let create = r#"{"customer_name":"Twice","product":"P","quantity":1,"unit_price":1,"status":"cancelled","status":"pending"}"#;
    refused(app.http.post(app.url("/api/orders")).body(create).send().await.unwrap()).await;
    let patch = r#"{"status":"cancelled","status":"processing"}"#;
    refused(app.http.patch(app.url(&format!("/api/orders/{id}"))).body(patch).send().await.unwrap()).await;
    let (_, page) = app.get_json("/api/orders").await;
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{page}");
    assert_eq!((items[0]["status"].as_str(), items[0]["version"].as_i64()), (Some("pending"), Some(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_never_yields_a_500() {
    let app = spawn_app().await;
    // Malformed JSON.
    let r = app.http.post(app.url("/api/orders")).body("{\"customer_name\":").send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "malformed_json");
    // A price in a string is read exactly: more digits than fit are
    // refused, not rounded to 20.00 or 1.00. (A JSON number is the double it
    // reads as, as in every JSON parser.)
    for price in ["19.999999999999999999", "0.99999999999999999999999999999e0"] {
        let body = json!({"customer_name": "Exact", "product": "P", "quantity": 1, "unit_price": price});
        let r = app.post_order(&body).await;
        assert_eq!(r.status(), 422, "{price}");
        assert_eq!(r.json::<Value>().await.unwrap()["field"], "unit_price");
    }
    // A huge body.
    let huge = format!("{{\"customer_name\":\"{}\"}}", "x".repeat(2 * 1024 * 1024));
    let r = app.http.post(app.url("/api/orders")).body(huge).send().await.unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "payload_too_large");
    // Bad ids.
    for path in ["/api/orders/abc", "/api/orders/-1", "/api/orders/0", "/api/orders/99999999999999999999"] {
        let (status, body) = app.get_json(path).await;
        assert_eq!(status, 400, "{path}");
        assert_eq!(body["code"], "invalid_id");
    }
    let (status, body) = app.get_json("/api/orders/424242").await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
    // Bad query parameters.
    for q in ["?limit=abc", "?limit=0", "?status=nope", "?cursor=zz", "?bogus=1", "?id=x"] {
        let (status, body) = app.get_json(&format!("/api/orders{q}")).await;
        assert_eq!(status, 422, "{q}: {body}");
    }
    // A cursor is an id this API handed out: never 0 or below (not an
    // empty last page).
    for q in ["/api/orders?cursor=0", "/api/orders?cursor=-1", "/api/dlq?before=-1"] {
        let (status, body) = app.get_json(q).await;
        assert_eq!((status, &body["code"]), (422, &json!("invalid_cursor")), "{q}: {body}");
    }
    // An empty parameter is as good as none, as an HTML form sends it (and
    // as README's template reads): before, `customer=`, `limit=`, `cursor=`
    // and `before=` were 422 while `status=`, `q=` and `id=` were ignored.
    let first_page = app.get_json("/api/orders").await.1;
    let (status, body) = app.get_json("/api/orders?status=&q=&customer=&id=&limit=&cursor=").await;
    assert_eq!((status, &body["items"]), (200, &first_page["items"]), "{body}");
    for q in ["/api/changes?before=&limit=", "/api/dlq?limit=&before=", "/api/orders?customer=%20"] {
        let (status, body) = app.get_json(q).await;
        assert_eq!(status, 200, "{q}: {body}");
    }
    // The field at fault is the one named.
    for (q, field) in [("/api/orders?limit=0", "limit"), ("/api/events?snapshot_limit=0", "snapshot_limit")] {
        let (status, body) = app.get_json(q).await;
        assert_eq!((status, &body["field"]), (422, &json!(field)), "{q}: {body}");
    }
    // An unknown route is a JSON 404 too.
    let (status, body) = app.get_json("/api/nothing-here").await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_metacharacters_are_stored_verbatim() {
    let app = spawn_app().await;
    let name = "Robert'); DROP TABLE orders;-- %_\\";
    let mut body = order_body();
    body["customer_name"] = json!(name);
    let order: Value = app.post_order(&body).await.json().await.unwrap();
    assert_eq!(order["customer_name"], name);
    // Search treats % and _ literally: as patterns, both would match this
    // order too.
    app.create_order("Grace").await;
    for q in ["%25_", "_", "%25"] {
        let (_, page) = app.get_json(&format!("/api/orders?q={q}")).await;
        let ids: Vec<&Value> = page["items"].as_array().unwrap().iter().map(|o| &o["id"]).collect();
        assert_eq!(ids, [&order["id"]], "q={q}");
    }
    let (_, page) = app.get_json("/api/orders?q=DROP%20TABLE").await;
    assert_eq!(page["items"][0]["customer_name"], name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_and_put_update_fields_and_bump_the_version() {
    let app = spawn_app().await;
    let order = app.create_order("Grace").await;
    let id = order["id"].as_i64().unwrap();
    let r = app.patch(id, &json!({"quantity": 5, "customer_email": "g@example.com"})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["etag"], "\"2\"");
    let updated: Value = r.json().await.unwrap();
    assert_eq!((updated["quantity"].as_i64(), updated["version"].as_i64()), (Some(5), Some(2)));
    assert_eq!(updated["amount"], 47.5);

    // The seed designs' clients: PUT with a partial body.
    let r =
        app.http.put(app.url(&format!("/api/orders/{id}"))).json(&json!({"status": "processed"})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r =
        app.http.put(app.url(&format!("/api/orders/{id}"))).json(&json!({"status": "shipped"})).send().await.unwrap();
    let shipped: Value = r.json().await.unwrap();
    assert_eq!(shipped["status"], "shipped");
    assert!(shipped["shipped_at"].is_string());
    assert!(shipped["processed_at"].is_string());
    assert_eq!(shipped["version"], 4);

    // Clearing a nullable field; an empty patch is refused.
    let r = app.patch(id, &json!({"customer_email": null})).await;
    assert_eq!(r.json::<Value>().await.unwrap()["customer_email"], Value::Null);
    let r = app.patch(id, &json!({})).await;
    assert_eq!(r.status(), 422);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "empty_patch");
    let r = app.patch(424242, &json!({"quantity": 1})).await;
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_transitions_are_409_on_the_rest_path() {
    let app = spawn_app().await;
    let id = app.create_order("Alan").await["id"].as_i64().unwrap();
    let r = app.patch(id, &json!({"status": "shipped"})).await;
    assert_eq!(r.status(), 409);
    let p: Value = r.json().await.unwrap();
    assert_eq!(
        (p["code"].as_str(), p["from"].as_str(), p["to"].as_str()),
        (Some("invalid_transition"), Some("pending"), Some("shipped"))
    );
    assert!(p["message"].as_str().unwrap().contains("allowed: cancelled, failed, processed, processing"), "{p}");

    // Final statuses stay final.
    assert_eq!(app.http.post(app.url(&format!("/api/orders/{id}/cancel"))).send().await.unwrap().status(), 200);
    let r = app.patch(id, &json!({"status": "pending"})).await;
    assert_eq!(r.status(), 409);
    let r = app.http.post(app.url(&format!("/api/orders/{id}/cancel"))).send().await.unwrap();
    assert_eq!(r.status(), 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orders_line_item_is_locked_once_it_leaves_pending() {
    let app = spawn_app().await;
    let id = app.create_order("Grace").await["id"].as_i64().unwrap();
    // Pending: the line item may change, also in the patch that moves it on.
    assert_eq!(app.patch(id, &json!({"quantity": 3})).await.status(), 200);
    let r = app.patch(id, &json!({"status": "processing", "unit_price": "7.25"})).await;
    assert_eq!(r.status(), 200);
    let order: Value = r.json().await.unwrap();
    assert_eq!((order["quantity"].as_i64(), order["amount"].as_f64()), (Some(3), Some(21.75)));

    for change in [json!({"quantity": 4}), json!({"unit_price": "7.26"}), json!({"product": "Other"})] {
        let r = app.patch(id, &change).await;
        assert_eq!(r.status(), 409, "{change}");
        let p: Value = r.json().await.unwrap();
        assert_eq!(p["code"], "order_locked", "{p}");
        assert!(p["message"].as_str().unwrap().contains("is processing"), "{p}");
    }
    // Restating the same values, or changing anything else, is no change of the line item.
    let r = app.patch(id, &json!({"quantity": 3, "unit_price": "7.250", "customer_name": "Grace H."})).await;
    assert_eq!(r.status(), 200);
    let (_, order) = app.get_json(&format!("/api/orders/{id}")).await;
    assert_eq!((order["version"].as_i64(), order["amount"].as_f64()), (Some(4), Some(21.75)));

    // The same rule for a DBA, who can unlock it for one transaction on purpose.
    let db = app.sql().await;
    let err = db.execute("UPDATE orders SET quantity = 9 WHERE id = $1", &[&id]).await.unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "OC423", "{err}");
    db.batch_execute(&format!(
        "BEGIN; SET LOCAL ordercast.unlock_line_items = 'on'; UPDATE orders SET quantity = 9 WHERE id = {id}; COMMIT"
    ))
    .await
    .unwrap();
    let err = db.execute("UPDATE orders SET quantity = 10 WHERE id = $1", &[&id]).await.unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "OC423", "the unlock lasts one transaction: {err}");
    let (_, order) = app.get_json(&format!("/api/orders/{id}")).await;
    assert_eq!((order["quantity"].as_i64(), order["version"].as_i64()), (Some(9), Some(5)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_enforces_transitions_and_constraints_for_a_dba_too() {
    let app = spawn_app().await;
    let db = app.sql().await;
    let id: i64 = db
        .query_one("INSERT INTO orders (customer_name, product, quantity, unit_price) VALUES ('DBA', 'Bolt', 1, 2) RETURNING id", &[])
        .await
        .unwrap()
        .get(0);
    let err = db.execute("UPDATE orders SET status = 'delivered' WHERE id = $1", &[&id]).await.unwrap_err();
    let db_err = err.as_db_error().unwrap();
    assert_eq!(db_err.code().code(), "OC409");
    assert!(db_err.message().contains("from pending to delivered"));
    // Allowed path works and is recorded with the database user as actor.
    db.execute("UPDATE orders SET status = 'processing' WHERE id = $1", &[&id]).await.unwrap();
    for bad in [
        "INSERT INTO orders (customer_name, product, quantity, unit_price) VALUES ('x', 'y', 0, 1)",
        "INSERT INTO orders (customer_name, product, quantity, unit_price) VALUES ('x', 'y', 1, -1)",
        "INSERT INTO orders (customer_name, product, quantity, unit_price) VALUES ('  ', 'y', 1, 1)",
        "INSERT INTO orders (customer_name, product, quantity, unit_price, status) VALUES ('x', 'y', 1, 1, 'lost')",
        "INSERT INTO orders (customer_name, product, quantity, unit_price) VALUES (NULL, 'y', 1, 1)",
        "TRUNCATE orders",
    ] {
        assert!(db.execute(bad, &[]).await.is_err(), "{bad} should fail");
    }
    let (_, history) = app.get_json(&format!("/api/orders/{id}/history")).await;
    let history = history.as_array().unwrap().clone();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0]["from"], Value::Null);
    assert_eq!(history[1]["from"], "pending");
    assert_eq!(history[1]["to"], "processing");
    assert_eq!(history[1]["by"], "sql:postgres");
    let (_, order) = app.get_json(&format!("/api/orders/{id}")).await;
    assert_eq!(order["version"], 2);
    assert!(order["processing_at"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_names_the_api_caller() {
    let app = spawn_app().await;
    let id = app.create_order("Hedy").await["id"].as_i64().unwrap();
    app.patch(id, &json!({"status": "processing"})).await;
    let (status, history) = app.get_json(&format!("/api/orders/{id}/history")).await;
    assert_eq!(status, 200);
    assert_eq!(history[1]["by"], "api:127.0.0.1");
    assert_eq!(app.get_json("/api/orders/424242/history").await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_patches_with_the_same_version_one_wins_one_gets_412() {
    let app = spawn_app().await;
    let id = app.create_order("Katherine").await["id"].as_i64().unwrap();
    let send = |q: i64| {
        app.http
            .patch(app.url(&format!("/api/orders/{id}")))
            .header("If-Match", "\"1\"")
            .json(&json!({"quantity": q}))
            .send()
    };
    let (a, b) = tokio::join!(send(7), send(8));
    let mut statuses = vec![a.unwrap().status().as_u16(), b.unwrap().status().as_u16()];
    statuses.sort();
    assert_eq!(statuses, vec![200, 412]);
    // Version in the body works the same way.
    let r = app.patch(id, &json!({"quantity": 9, "version": 1})).await;
    assert_eq!(r.status(), 412);
    let p: Value = r.json().await.unwrap();
    assert_eq!((p["code"].as_str(), p["current_version"].as_i64()), (Some("version_conflict"), Some(2)));
    assert_eq!(app.patch(id, &json!({"quantity": 9, "version": 2})).await.status(), 200);
    let r = app.http.delete(app.url(&format!("/api/orders/{id}"))).header("If-Match", "1").send().await.unwrap();
    assert_eq!(r.status(), 412);
    // `*`: any current version.
    let star =
        |path: String| app.http.patch(app.url(&path)).header("If-Match", "*").json(&json!({"quantity": 4})).send();
    assert_eq!(star(format!("/api/orders/{id}")).await.unwrap().status(), 200);
    assert_eq!(star("/api/orders/424242".into()).await.unwrap().status(), 404);
    let r = app.http.patch(app.url(&format!("/api/orders/{id}"))).header("If-Match", "x").json(&json!({"quantity": 5}));
    assert_eq!(r.send().await.unwrap().status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_match_compares_strongly_and_takes_a_list_of_versions() {
    let app = spawn_app().await;
    let id = app.create_order("Ottoline").await["id"].as_i64().unwrap();
    let path = format!("/api/orders/{id}");
    let patch = |if_match: &'static str, body: Value| {
        let r = app.http.patch(app.url(&path)).header("If-Match", if_match).json(&body).send();
        async move {
            let r = r.await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let code = |v: &Value| v["code"].as_str().map(str::to_owned);
    // A weak tag never matches (RFC 9110: If-Match compares strongly), not
    // even the current version's: nothing is written.
    let (s, b) = patch("W/\"1\"", json!({"quantity": 2})).await;
    assert_eq!((s, code(&b), b["current_version"].as_i64()), (412, Some("version_conflict".into()), Some(1)), "{b}");
    assert!(b["message"].as_str().unwrap().contains("weak"), "{b}");
    let (s, b) = patch("W/\"1\"", json!({"quantity": 2, "version": 1})).await;
    assert_eq!((s, code(&b)), (412, Some("version_conflict".into())), "{b}");
    assert_eq!(app.get_json(&path).await.1["version"], 1);
    // A list matches when one of its tags does; a weak one in it counts for nothing.
    let (s, b) = patch("\"7\", W/\"1\", \"1\"", json!({"quantity": 3})).await;
    assert_eq!((s, b["version"].as_i64(), b["quantity"].as_i64()), (200, Some(2), Some(3)), "{b}");
    let (s, b) = patch("\"1\", W/\"2\", \"3\"", json!({"quantity": 4})).await;
    assert_eq!((s, code(&b), b["current_version"].as_i64()), (412, Some("version_conflict".into()), Some(2)), "{b}");
    assert_eq!(b["message"], "none of the versions 1, 3 is the current version 2");
    // The body's version must be one of the list's.
    let (s, b) = patch("\"1\", \"2\"", json!({"quantity": 4, "version": 2})).await;
    assert_eq!((s, b["version"].as_i64()), (200, Some(3)), "{b}");
    let (s, b) = patch("\"1\", \"2\"", json!({"quantity": 5, "version": 3})).await;
    assert_eq!((s, code(&b)), (400, Some("version_mismatch".into())), "{b}");
    // Other well-formed tags match nothing either: not a version, or not as
    // the ETag writes it. With one that matches beside them, the list does.
    for other in ["\"x\"", "\"03\"", "\"+3\"", "\"\"", "\"99999999999\"", "99999999999"] {
        let (s, b) = patch(other, json!({"quantity": 4})).await;
        assert_eq!(
            (s, code(&b), b["current_version"].as_i64()),
            (412, Some("version_conflict".into()), Some(3)),
            "{other}: {b}"
        );
    }
    let (s, b) = patch("\"x,y\", \"3\", \"abc\"", json!({"quantity": 7})).await;
    assert_eq!((s, b["version"].as_i64()), (200, Some(4)), "{b}");
    // Several header lines are one list.
    let r = app.http.patch(app.url(&path)).header("If-Match", "\"1\"").header("If-Match", "\"4\"");
    let r = r.json(&json!({"quantity": 8})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Malformed: an unquoted weak tag, an unclosed quote, no tag at all, two
    // tags without a comma, a bare word. (Empty list elements are ignored:
    // below.)
    for bad in ["W/3", "\"3", " , ", "\"3\" \"4\"", "x", "\"a b\""] {
        let (s, b) = patch(bad, json!({"quantity": 6})).await;
        assert_eq!((s, code(&b)), (400, Some("invalid_if_match".into())), "{bad}: {b}");
    }
    // Delete and cancel take the same header.
    let delete = |if_match: &'static str| app.http.delete(app.url(&path)).header("If-Match", if_match).send();
    assert_eq!(delete("W/\"5\"").await.unwrap().status(), 412);
    let cancel = app.http.post(app.url(&format!("{path}/cancel"))).header("If-Match", "W/\"5\"").send();
    assert_eq!(cancel.await.unwrap().status(), 412);
    assert_eq!(delete(", \"9\",, \"5\",").await.unwrap().status(), 204);
}

/// Cancel and delete take the expected version in the body too, as PATCH
/// does: a stale one gets 412 and changes nothing, one that disagrees with
/// If-Match 400, and a body that is not `{"version": N}` is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_delete_take_the_expected_version_in_the_body() {
    let app = spawn_app().await;
    let id = app.create_order("Versioned").await["id"].as_i64().unwrap();
    let path = format!("/api/orders/{id}");
    app.patch(id, &json!({"quantity": 5})).await; // version 2
    let send = |method: reqwest::Method, path: String, if_match: Option<&'static str>, body: Option<&'static str>| {
        let mut r = app.http.request(method, app.url(&path));
        if let Some(h) = if_match {
            r = r.header("If-Match", h);
        }
        if let Some(b) = body {
            r = r.header("content-type", "application/json").body(b);
        }
        async move {
            let r = r.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let cancel = |if_match, body| send(reqwest::Method::POST, format!("{path}/cancel"), if_match, body);
    let delete = |if_match, body| send(reqwest::Method::DELETE, path.clone(), if_match, body);
    let code = |v: &Value| v["code"].as_str().map(str::to_owned);
    for (call, body, if_match, status, want) in [
        ("cancel", r#"{"version": 1}"#, None, 412, "version_conflict"),
        ("delete", r#"{"version": 1}"#, None, 412, "version_conflict"),
        ("cancel", r#"{"version": 2}"#, Some("\"1\""), 400, "version_mismatch"),
        ("delete", r#"{"version": 2}"#, Some("\"1\""), 400, "version_mismatch"),
        ("cancel", r#"{"version": 2, "reason": "x"}"#, None, 422, "unknown_field"),
        ("delete", r#"{"version": 0}"#, None, 422, "validation_failed"),
        ("cancel", r#"{"version": null}"#, None, 422, "validation_failed"),
        ("delete", r#"[2]"#, None, 422, "invalid_body"),
        ("cancel", r#"{"version": "#, None, 400, "malformed_json"),
    ] {
        let (s, b) =
            if call == "cancel" { cancel(if_match, Some(body)).await } else { delete(if_match, Some(body)).await };
        assert_eq!((s, code(&b)), (status, Some(want.to_string())), "{call} {body}: {b}");
    }
    let (_, order) = app.get_json(&path).await;
    assert_eq!((order["status"].as_str(), order["version"].as_i64()), (Some("pending"), Some(2)), "{order}");
    // The current version, in the body alone or agreeing with If-Match; an
    // empty body is no version at all.
    let (s, b) = cancel(None, Some(r#"{"version": 2}"#)).await;
    assert_eq!((s, b["status"].as_str(), b["version"].as_i64()), (200, Some("cancelled"), Some(3)), "{b}");
    let (s, b) = delete(Some("\"3\""), Some(r#"{"version": 2}"#)).await;
    assert_eq!((s, code(&b)), (400, Some("version_mismatch".into())), "{b}");
    let (s, _) = delete(Some("\"3\""), Some(" \n")).await;
    assert_eq!(s, 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cancels_of_one_order_let_exactly_one_through() {
    const CANCELS: usize = 12;
    let app = spawn_app().await;
    for round in 0..5 {
        let order = app.create_order(&format!("Racer {round}")).await;
        let (id, version) = (order["id"].as_i64().unwrap(), order["version"].as_i64().unwrap());
        let url = app.url(&format!("/api/orders/{id}/cancel"));
        // Every request waits for all the others, then they go out at once.
        let start = std::sync::Arc::new(tokio::sync::Barrier::new(CANCELS));
        let tasks: Vec<_> = (0..CANCELS)
            .map(|_| {
                let (http, url, start) = (app.http.clone(), url.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    let r = http.post(url).send().await.unwrap();
                    (r.status().as_u16(), r.json::<Value>().await.unwrap())
                })
            })
            .collect();
        let mut answers = Vec::new();
        for t in tasks {
            answers.push(t.await.unwrap());
        }
        let won: Vec<&Value> = answers.iter().filter(|(s, _)| *s == 200).map(|(_, b)| b).collect();
        assert_eq!(won.len(), 1, "round {round}: exactly one cancel succeeds: {answers:?}");
        assert_eq!(won[0]["version"].as_i64(), Some(version + 1), "round {round}");
        for (status, body) in answers.iter().filter(|(s, _)| *s != 200) {
            assert_eq!(*status, 409, "round {round}: {body}");
            assert_eq!(
                (body["code"].as_str(), body["from"].as_str(), body["to"].as_str()),
                (Some("invalid_transition"), Some("cancelled"), Some("cancelled")),
                "round {round}: {body}"
            );
            assert_eq!(body["message"], format!("order {id} is already cancelled"));
        }
        // One change: the version was bumped once, the history has one cancel.
        let (_, now) = app.get_json(&format!("/api/orders/{id}")).await;
        assert_eq!((now["status"].as_str(), now["version"].as_i64()), (Some("cancelled"), Some(version + 1)));
        let (_, history) = app.get_json(&format!("/api/orders/{id}/history")).await;
        let cancels = history.as_array().unwrap().iter().filter(|h| h["to"] == "cancelled").count();
        assert_eq!(cancels, 1, "round {round}: {history}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_answers_one_at_a_time_are_unchanged() {
    let app = spawn_app().await;
    let cancel = |id: i64, if_match: Option<&str>| {
        let mut r = app.http.post(app.url(&format!("/api/orders/{id}/cancel")));
        if let Some(v) = if_match {
            r = r.header("If-Match", v);
        }
        async move {
            let r = r.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let code = |v: &Value| v["code"].as_str().map(str::to_owned);
    let id = app.create_order("Once").await["id"].as_i64().unwrap();
    // A pending order: a malformed or stale If-Match is refused first.
    let (s, b) = cancel(id, Some("x")).await;
    assert_eq!((s, code(&b)), (400, Some("invalid_if_match".into())));
    let (s, b) = cancel(id, Some("7")).await;
    assert_eq!((s, code(&b), b["current_version"].as_i64()), (412, Some("version_conflict".into()), Some(1)));
    let (s, b) = cancel(id, Some("1")).await;
    assert_eq!((s, b["status"].as_str(), b["version"].as_i64()), (200, Some("cancelled"), Some(2)));
    // Already cancelled: 409 whatever the If-Match says.
    for if_match in [None, Some("2"), Some("1"), Some("x"), Some("\"x\"")] {
        let (s, b) = cancel(id, if_match).await;
        assert_eq!((s, code(&b)), (409, Some("invalid_transition".into())), "{if_match:?}: {b}");
        assert_eq!(b["message"], format!("order {id} is already cancelled"));
        assert_eq!((b["from"].as_str(), b["to"].as_str()), (Some("cancelled"), Some("cancelled")));
    }
    // A final status other than cancelled: the database's 409.
    let other = app.create_order("Delivered").await["id"].as_i64().unwrap();
    for status in ["processed", "shipped", "delivered"] {
        assert_eq!(app.patch(other, &json!({"status": status})).await.status(), 200);
    }
    let (s, b) = cancel(other, None).await;
    assert_eq!((s, code(&b), b["from"].as_str()), (409, Some("invalid_transition".into()), Some("delivered")));
    // No such order.
    assert_eq!(cancel(424242, None).await.0, 404);
    assert_eq!(cancel(424242, Some("x")).await.0, 400);
    assert_eq!(cancel(424242, Some("3")).await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_returns_204_then_404() {
    let app = spawn_app().await;
    let id = app.create_order("Barbara").await["id"].as_i64().unwrap();
    let r = app.http.delete(app.url(&format!("/api/orders/{id}"))).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(app.get_json(&format!("/api/orders/{id}")).await.0, 404);
    let r = app.http.delete(app.url(&format!("/api/orders/{id}"))).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

async fn insert_many(app: &TestApp, n: i64) {
    let db = app.sql().await;
    db.execute(
        "INSERT INTO orders (customer_name, product, quantity, unit_price, status) \
         SELECT 'customer ' || g, CASE WHEN g % 2 = 0 THEN 'Gear' ELSE 'Spring' END, 1 + g % 5, 10, \
                CASE WHEN g % 3 = 0 THEN 'processing' ELSE 'pending' END \
         FROM generate_series(1, $1::bigint) g",
        &[&n],
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyset_pagination_walks_thousands_of_rows_once_each() {
    let app = spawn_app().await;
    insert_many(&app, 3000).await;
    let mut seen = HashSet::new();
    let mut cursor: Option<String> = None;
    let mut last_id = i64::MAX;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/orders?limit=500&cursor={c}"),
            None => "/api/orders?limit=500".to_string(),
        };
        let (status, page) = app.get_json(&path).await;
        assert_eq!(status, 200);
        pages += 1;
        for item in page["items"].as_array().unwrap() {
            let id = item["id"].as_i64().unwrap();
            assert!(id < last_id, "newest first");
            last_id = id;
            assert!(seen.insert(id));
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 3000);
    assert_eq!(pages, 6);
    // limit is capped.
    let (_, page) = app.get_json("/api/orders?limit=100000").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 500);
    // Status filter (several) and search.
    let (_, page) = app.get_json("/api/orders?status=processing&limit=500").await;
    assert!(page["items"].as_array().unwrap().iter().all(|o| o["status"] == "processing"));
    assert_eq!(page["items"].as_array().unwrap().len(), 500);
    let (_, page) = app.get_json("/api/orders?status=processing,pending&limit=5").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 5);
    let (_, page) = app.get_json("/api/orders?q=customer%202999").await;
    assert_eq!(page["items"][0]["customer_name"], "customer 2999");
    let (_, page) = app.get_json("/api/orders?q=Spring&limit=1").await;
    assert_eq!(page["items"][0]["product"], "Spring");
    let id = page["items"][0]["id"].as_i64().unwrap();
    let (_, page) = app.get_json(&format!("/api/orders?q={id}")).await;
    assert!(page["items"].as_array().unwrap().iter().any(|o| o["id"] == id));
    assert!(page["position"].as_i64().unwrap() >= 3000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_statuses_and_average_prices_from_running_totals() {
    let app = spawn_app().await;
    insert_many(&app, 30).await;
    let id = app.create_order("Stat").await["id"].as_i64().unwrap();
    app.patch(id, &json!({"status": "cancelled"})).await;
    let db = app.sql().await;
    db.execute("DELETE FROM orders WHERE customer_name = 'customer 1'", &[]).await.unwrap();
    let (status, stats) = app.get_json("/api/stats").await;
    assert_eq!(status, 200);
    assert_eq!(stats["total_orders"], 30);
    assert_eq!(stats["by_status"]["processing"]["count"], 10);
    assert_eq!(stats["by_status"]["pending"]["count"], 19);
    assert_eq!(stats["by_status"]["cancelled"]["count"], 1);
    let widget = stats["products"].as_array().unwrap().iter().find(|p| p["product"] == "Widget").unwrap().clone();
    assert_eq!((widget["count"].as_i64(), widget["avg_price"].as_f64()), (Some(1), Some(9.5)));
    // Folding the deltas changes nothing in the answer.
    ordercast::changes::maintenance::run_once(&app.state.pool, &app.state.settings).await.unwrap();
    let (_, after) = app.get_json("/api/stats").await;
    assert_eq!(after["by_status"], stats["by_status"]);
    assert_eq!(after["total_amount"], stats["total_amount"]);
    let pending: i64 = db.query_one("SELECT count(*) FROM order_stats_delta", &[]).await.unwrap().get(0);
    assert_eq!(pending, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_list_the_most_ordered_products_and_count_them_all() {
    let app = spawn_app().await;
    let db = app.sql().await;
    db.batch_execute(
        "INSERT INTO orders (customer_name, product, quantity, unit_price) \
         SELECT 'Stat', 'p' || g, 1, 2 FROM generate_series(1, 150) g;
         INSERT INTO orders (customer_name, product, quantity, unit_price) \
         SELECT 'Stat', 'top', 1, g FROM generate_series(1, 5) g;
         INSERT INTO orders (customer_name, product, quantity, unit_price) \
         SELECT 'Stat', 'second', 1, 3 FROM generate_series(1, 3) g;
         DELETE FROM orders WHERE product = 'p7'",
    )
    .await
    .unwrap();
    let (status, stats) = app.get_json("/api/stats").await;
    assert_eq!(status, 200, "{stats}");
    assert_eq!((stats["total_orders"].as_i64(), stats["product_count"].as_i64()), (Some(157), Some(151)));
    let products = stats["products"].as_array().unwrap();
    assert_eq!(products.len(), 100);
    assert_eq!(products[0], json!({"product": "top", "count": 5, "avg_price": 3.0}));
    assert_eq!(products[1], json!({"product": "second", "count": 3, "avg_price": 3.0}));
    assert!(products[2..].iter().all(|p| p["count"] == 1 && p["product"] != "p7"), "{stats}");
}

/// The totals and their `position` are read in one snapshot: with a writer
/// committing single-row inserts meanwhile (one position each), every
/// answer's count of orders moves exactly with its position. Read apart, a
/// commit between the two reads was in the position but not in the totals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_totals_and_their_position_are_of_one_moment() {
    let app = spawn_app().await;
    let (_, first) = app.get_json("/api/stats").await;
    let (orders0, head0) = (first["total_orders"].as_i64().unwrap(), first["position"].as_i64().unwrap());
    let db = app.sql().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writing = stop.clone();
    let writer = tokio::spawn(async move {
        let mut n = 0;
        while !writing.load(std::sync::atomic::Ordering::Relaxed) {
            db.execute(
                "INSERT INTO orders (customer_name, product, quantity, unit_price) VALUES ('Moment', 'Bolt', 1, 2)",
                &[],
            )
            .await
            .unwrap();
            n += 1;
        }
        n
    });
    for _ in 0..300 {
        let (status, stats) = app.get_json("/api/stats").await;
        assert_eq!(status, 200);
        let (orders, position) = (stats["total_orders"].as_i64().unwrap(), stats["position"].as_i64().unwrap());
        assert_eq!(orders - orders0, position - head0, "totals of {orders} orders at position {position}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(writer.await.unwrap() > 0, "the writer committed meanwhile");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_amounts_are_exact_decimals_beyond_what_a_double_holds() {
    let app = spawn_app().await;
    let db = app.sql().await;
    // Three orders of 9,999,999,999.99 x 1,000,000 and one of 0.01: the sum
    // needs 19 significant digits, more than an f64's 15-17.
    db.batch_execute(
        "INSERT INTO orders (customer_name, product, quantity, unit_price) VALUES \
         ('Big', 'Ingot', 1000000, 9999999999.99), ('Big', 'Ingot', 1000000, 9999999999.99), \
         ('Big', 'Ingot', 1000000, 9999999999.99), ('Small', 'Pin', 1, 0.01), ('Small', 'Pin', 1, 0.02)",
    )
    .await
    .unwrap();
    let r = app.http.get(app.url("/api/stats")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    for exact in [
        r#""total_amount":29999999999970000.03"#,
        r#""pending":{"count":5,"amount":29999999999970000.03}"#,
        r#""cancelled":{"count":0,"amount":0.00}"#,
        r#"{"product":"Ingot","count":3,"avg_price":9999999999.99}"#,
        // 0.015 rounds away from zero, as PostgreSQL's round() does.
        r#"{"product":"Pin","count":2,"avg_price":0.02}"#,
    ] {
        assert!(text.contains(exact), "{exact} not in {text}");
    }
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["total_orders"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_database_and_listener() {
    let app = spawn_app().await;
    let (status, health) = crate::helpers::eventually(Duration::from_secs(5), || async {
        let (s, h) = app.get_json("/api/health").await;
        (s == 200).then_some((s, h))
    })
    .await;
    assert_eq!(status, 200);
    assert_eq!(health["database"]["ok"], true);
    assert_eq!(health["listener"]["connected"], true);
    assert_eq!(health["kafka"]["enabled"], false);
}

/// `/api/health` is public: a flood of requests takes one database
/// connection for its check, not one each (a check answers for a second).
/// Before, 100 requests at once opened as many of the REST pool's 16
/// connections as they could, which REST requests then waited for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_health_requests_takes_one_database_connection() {
    let app = spawn_app().await;
    crate::helpers::eventually(Duration::from_secs(10), || async {
        (app.get_json("/api/health").await.0 == 200).then_some(())
    })
    .await;
    let before = app.state.pool.status().size;
    let asks = (0..100).map(|_| app.http.get(app.url("/api/health")).send());
    for r in futures_util::future::join_all(asks).await {
        assert_eq!(r.unwrap().status(), 200);
    }
    let after = app.state.pool.status().size;
    assert!(after <= before + 1, "the pool grew from {before} to {after} connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_when_the_database_is_gone() {
    let app = spawn_app().await;
    let admin = ordercast::db::connect(&crate::helpers::admin_url()).await.unwrap();
    // Rename the database under the app: new connections fail, existing ones are cut.
    // The app reconnects (its listener, its pool) between the cut and the
    // rename at times, which PostgreSQL refuses (55006): cut and try again.
    let away = format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{0}';
         ALTER DATABASE {0} RENAME TO {0}_away",
        app.db_name
    );
    crate::helpers::eventually(Duration::from_secs(10), || async {
        match admin.batch_execute(&away).await {
            Ok(()) => Some(()),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) => None,
            Err(e) => panic!("renaming the database failed: {e}"),
        }
    })
    .await;
    let (status, health) = crate::helpers::eventually(Duration::from_secs(15), || async {
        let (s, h) = app.get_json("/api/health").await;
        (s == 503).then_some((s, h))
    })
    .await;
    assert_eq!(status, 503);
    assert_eq!(health["database"]["ok"], false);
    // REST answers 503 promptly rather than hanging: within the pool's wait
    // (3 s) and a margin for a loaded machine, where a hung request would
    // wait for the client's timeout.
    let started = std::time::Instant::now();
    let r = app.post_order(&order_body()).await;
    assert_eq!(r.status(), 503);
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    let problem: Value = r.json().await.unwrap();
    assert_eq!(problem["code"], "database_unavailable");
    // The database's own words (here the database's name) are not the
    // client's to hear.
    assert!(!problem["message"].as_str().unwrap().contains(&app.db_name), "{problem}");
    // A resume needs the log: a stream client gets 503, EventSource (which
    // would give up for good on it) a stream saying to try again.
    let events = format!("{}/api/events?since=0", app.address);
    let r = app.http.get(&events).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "database_unavailable");
    let r = app.http.get(&events).header("Accept", "text/event-stream").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let body = r.text().await.unwrap();
    let (retry, rest) = body.strip_prefix("retry: ").and_then(|b| b.split_once("\n\n")).expect("a retry first");
    assert!((2000..5000).contains(&retry.parse::<u32>().unwrap()), "{body}");
    assert!(rest.starts_with("event: error\n") && rest.contains(r#""code":"database_unavailable""#), "{body}");
    admin.batch_execute(&format!("ALTER DATABASE {0}_away RENAME TO {0}", app.db_name)).await.unwrap();
}

/// Every error response is documented as the server sends it,
/// `application/problem+json`; before, all 53 were `application/json`, and
/// a client choosing a decoder by media type found no schema for an error.
/// And request fields are documented as the server reads them: before,
/// every optional one was nullable, and a price only a number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_gives_errors_and_request_fields_as_the_server_has_them() {
    let app = spawn_app().await;
    let id = app.create_order("Doc").await["id"].as_i64().unwrap();
    let (_, doc) = app.get_json("/api/openapi.json").await;
    let mut problems = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            for (status, response) in op["responses"].as_object().unwrap() {
                for (media, content) in response["content"].as_object().into_iter().flatten() {
                    let problem = content["schema"]["$ref"] == "#/components/schemas/Problem";
                    assert_eq!(problem, media == "application/problem+json", "{method} {path} {status}: {media}");
                    problems += problem as usize;
                }
            }
        }
    }
    assert!(problems > 40, "{problems} error responses documented");
    // Request fields the server refuses as null are not documented as
    // nullable (utoipa makes every Option nullable); a price may be a string.
    let schemas = &doc["components"]["schemas"];
    let patch = &schemas["OrderPatch"]["properties"];
    for field in ["customer_name", "product", "quantity", "status", "version", "unit_price"] {
        assert!(!patch[field].to_string().contains("null"), "OrderPatch.{field}: {}", patch[field]);
    }
    assert!(patch["customer_email"].to_string().contains("null"), "{}", patch["customer_email"]);
    assert!(!schemas["ExpectedVersion"]["properties"]["version"].to_string().contains("null"));
    let price = schemas["Price"].to_string();
    assert!(price.contains("\"number\"") && price.contains("\"string\""), "{price}");
    for (body, status) in [(json!({"product": null}), 422), (json!({"unit_price": "3.50"}), 200)] {
        let r = app.http.patch(app.url(&format!("/api/orders/{id}"))).json(&body).send().await.unwrap();
        assert_eq!(r.status(), status, "{body}");
    }
    let r = app.http.get(app.url("/api/orders/424242")).send().await.unwrap();
    assert_eq!(r.headers()["content-type"], "application/problem+json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_matches_the_real_routes() {
    let app = spawn_app().await;
    let id = app.create_order("Doc").await["id"].as_i64().unwrap();
    let (status, doc) = app.get_json("/api/openapi.json").await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    let expected = [
        ("/api/health", "get"),
        ("/api/health/live", "get"),
        ("/api/orders", "get"),
        ("/api/orders", "post"),
        ("/api/orders/{id}", "get"),
        ("/api/orders/{id}", "patch"),
        ("/api/orders/{id}", "put"),
        ("/api/orders/{id}", "delete"),
        ("/api/orders/{id}/cancel", "post"),
        ("/api/orders/{id}/history", "get"),
        ("/api/orders/{id}/events", "get"),
        ("/api/changes", "get"),
        ("/api/transitions", "get"),
        ("/api/stats", "get"),
        ("/api/dlq", "get"),
        ("/api/events", "get"),
        ("/ws", "get"),
        ("/api/openapi.json", "get"),
        ("/metrics", "get"),
        ("/api/session", "get"),
        ("/api/session", "post"),
        ("/api/session", "delete"),
    ];
    let documented: HashSet<(String, String)> = paths
        .iter()
        .flat_map(|(p, ops)| ops.as_object().unwrap().keys().map(move |m| (p.clone(), m.clone())))
        .collect();
    let expected_set: HashSet<(String, String)> =
        expected.iter().map(|(p, m)| (p.to_string(), m.to_string())).collect();
    assert_eq!(documented, expected_set, "documented operations differ from the routes");
    // Every documented operation is routed: none answers with the router's 404.
    for (path, method) in expected {
        if path == "/ws" || path.ends_with("/events") || method == "delete" {
            continue;
        }
        let url = app.url(&path.replace("{id}", &id.to_string()));
        let req = match method {
            "get" => app.http.get(&url),
            "post" => app.http.post(&url).json(&json!({})),
            "patch" => app.http.patch(&url).json(&json!({"quantity": 1})),
            "put" => app.http.put(&url).json(&json!({"quantity": 1})),
            _ => unreachable!(),
        };
        let r = req.send().await.unwrap();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert!(
            !(body["code"] == "not_found" && body["message"].as_str().unwrap_or("").starts_with("no route")),
            "{method} {path} is documented but not routed"
        );
    }
    // What a body can get (a bad one, a too large one) is documented where
    // it happens.
    let large = format!("{{\"version\": 1, \"pad\": \"{}\"}}", "x".repeat(app.state.settings.max_body_bytes));
    for (path, method) in expected.iter().filter(|(p, m)| p.starts_with("/api/orders") && *m != "get") {
        let url = app.url(&path.replace("{id}", &id.to_string()));
        for body in [r#"{"version": 0}"#.to_string(), large.clone()] {
            let req = app.http.request(method.to_uppercase().parse().unwrap(), &url);
            let r = req.header("content-type", "application/json").body(body).send().await.unwrap();
            let status = r.status().as_u16().to_string();
            let responses = &paths[*path][*method]["responses"];
            assert!(responses.get(&status).is_some(), "{method} {path} answers {status}, not documented: {responses}");
        }
    }
    let r = app.http.delete(app.url(&format!("/api/orders/{id}"))).send().await.unwrap();
    assert_eq!(r.status(), 204);
}

/// Status, `Allow`, content type and JSON body of a request.
async fn answer(app: &TestApp, method: &str, path: &str) -> (u16, Option<String>, Option<String>, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let r = app.http.request(method, app.url(path)).send().await.unwrap();
    let header = |name: &str| r.headers().get(name).map(|v| v.to_str().unwrap().to_string());
    let (status, allow, content_type) = (r.status().as_u16(), header("allow"), header("content-type"));
    (status, allow, content_type, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_method_is_405_with_allow_from_the_routes_and_an_unknown_path_404() {
    let app = spawn_app().await;
    let id = app.create_order("Methodical").await["id"].as_i64().unwrap();
    let order = format!("/api/orders/{id}");
    for (method, path, allow) in [
        ("DELETE", "/api/stats", "GET, HEAD, OPTIONS"),
        ("PUT", "/api/orders", "GET, HEAD, POST, OPTIONS"),
        ("GET", "/api/orders/1/cancel", "POST, OPTIONS"),
        ("POST", &order, "GET, HEAD, PUT, PATCH, DELETE, OPTIONS"),
        // The pattern decides, as for routing: `GET /api/orders/abc` is a 400.
        ("POST", "/api/orders/abc", "GET, HEAD, PUT, PATCH, DELETE, OPTIONS"),
        // Two GET routes have this path (the document and the dashboard's files).
        ("POST", "/api/openapi.json", "GET, HEAD, OPTIONS"),
        ("DELETE", "/js/app.js", "GET, HEAD, OPTIONS"),
        ("DELETE", "/js/%61pp.js", "GET, HEAD, OPTIONS"),
        ("POST", "/", "GET, HEAD, OPTIONS"),
        ("PATCH", "/metrics", "GET, HEAD, OPTIONS"),
        ("POST", "/ws", "GET, OPTIONS"),
        ("BREW", "/api/dlq", "GET, HEAD, OPTIONS"),
        // Percent-decoded like the router does.
        ("DELETE", "/%61pi/stats", "GET, HEAD, OPTIONS"),
    ] {
        let (status, allowed, content_type, body) = answer(&app, method, path).await;
        assert_eq!(
            (status, body["code"].as_str(), allowed.as_deref()),
            (405, Some("method_not_allowed"), Some(allow)),
            "{method} {path}: {body}"
        );
        assert_eq!(content_type.as_deref(), Some("application/problem+json"), "{method} {path}");
        assert_eq!(body["status"], 405);
        let message = body["message"].as_str().unwrap();
        assert!(message.starts_with(&format!("{method} is not allowed")) && message.ends_with(allow), "{message}");
    }
    // HEAD is answered as GET is, without the body (before: 405).
    for path in ["/api/openapi.json", "/js/app.js", "/api/orders", &order] {
        let get = app.http.get(app.url(path)).send().await.unwrap();
        let head = app.http.head(app.url(path)).send().await.unwrap();
        let length = |r: &reqwest::Response| r.headers().get("content-length").map(|v| v.to_str().unwrap().to_owned());
        let (get_length, got) = (length(&get), get.bytes().await.unwrap().len().to_string());
        assert_eq!(get_length.as_ref(), Some(&got), "GET {path}");
        assert_eq!((head.status().as_u16(), length(&head)), (200, Some(got)), "HEAD {path}");
        assert!(head.bytes().await.unwrap().is_empty(), "HEAD {path} has no body");
    }
    // The streams answer GET alone: HEAD is a 405 there (without a body).
    for path in ["/ws", "/api/events", &format!("{order}/events")] {
        let (status, allowed, _, body) = answer(&app, "HEAD", path).await;
        assert_eq!((status, allowed.as_deref(), body), (405, Some("GET, OPTIONS"), Value::Null), "HEAD {path}");
    }
    // OPTIONS on a path that exists: 204 and what it allows.
    let (status, allowed, _, _) = answer(&app, "OPTIONS", "/api/orders").await;
    assert_eq!((status, allowed.as_deref()), (204, Some("GET, HEAD, POST, OPTIONS")));
    // Paths no route has stay 404, whatever the method.
    for (method, path) in [
        ("GET", "/api/nope"),
        ("DELETE", "/api/nope"),
        ("OPTIONS", "/api/nope"),
        ("POST", "/api/stats/"),
        ("PUT", "/api/orders/1/cancel/now"),
        // Named like a dashboard file, but there is no such file.
        ("DELETE", "/api/x.json"),
        ("GET", "/api/x.json"),
        ("DELETE", "/js/nope.js"),
        ("POST", "/nope.html"),
    ] {
        let (status, allowed, content_type, body) = answer(&app, method, path).await;
        assert_eq!((status, body["code"].as_str(), allowed), (404, Some("not_found"), None), "{method} {path}");
        assert_eq!(content_type.as_deref(), Some("application/problem+json"));
        assert_eq!(body["message"], format!("no route for {method} {path}"));
    }
    // The routes themselves still answer.
    assert_eq!(app.get_json("/api/stats").await.0, 200);
    assert_eq!(app.get_json(&order).await.0, 200);
    let app_js = app.http.get(app.url("/js/%61pp.js")).send().await.unwrap();
    assert_eq!(app_js.status(), 200);
    // Every documented path's Allow is exactly its documented methods.
    let (_, doc) = app.get_json("/api/openapi.json").await;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        let mut documented: Vec<String> = ops.as_object().unwrap().keys().map(|m| m.to_uppercase()).collect();
        documented.push("OPTIONS".into());
        // HEAD wherever GET is, but on the streams.
        if documented.iter().any(|m| m == "GET") && !path.ends_with("/events") && path != "/ws" {
            documented.push("HEAD".into());
        }
        documented.sort();
        let (status, allowed, _, _) = answer(&app, "OPTIONS", &path.replace("{id}", &id.to_string())).await;
        let mut allowed: Vec<String> = allowed.unwrap_or_default().split(", ").map(str::to_owned).collect();
        allowed.sort();
        assert_eq!((status, allowed), (204, documented), "{path}");
    }
    // Counted without a route, like a 404.
    let metrics = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains(r#"ordercast_http_requests_total{method="DELETE",route="unmatched",status="405"} 4"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dbas_raw_rows_are_normalised_by_the_guard_and_a_deleted_orders_history_goes_with_it() {
    let app = spawn_app().await;
    let db = app.sql().await;
    let insert = "INSERT INTO orders (customer_name, product, quantity, unit_price, status, version, created_at) \
                  VALUES ('dba', 'X', 1, 1, $1, $2, $3) \
                  RETURNING id, status, version, created_at = $3, updated_at = created_at, processed_at IS NOT NULL";
    type Ts = Option<chrono::DateTime<chrono::Utc>>;
    let then: Ts = Some("2020-01-01T00:00:00Z".parse().unwrap());
    // A plain new order: nothing for the guard to change.
    let plain = db
        .query_one(
            "INSERT INTO orders (customer_name, product, quantity, unit_price) VALUES ('dba', 'X', 1, 1) \
             RETURNING id, status, version, true, updated_at = created_at, processed_at IS NOT NULL",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((plain.get::<_, i32>(2), plain.get::<_, bool>(4), plain.get::<_, bool>(5)), (1, true, false));
    // A status past pending is stamped, a forged version reset, and
    // updated_at follows an explicit created_at.
    let odd = db.query_one(insert, &[&"processed", &7i32, &then]).await.unwrap();
    assert_eq!(
        (
            odd.get::<_, &str>(1),
            odd.get::<_, i32>(2),
            odd.get::<_, Option<bool>>(3),
            odd.get::<_, bool>(4),
            odd.get::<_, bool>(5)
        ),
        ("processed", 1, Some(true), true, true)
    );
    // A forged version on an otherwise plain order is reset too.
    let forged = db
        .query_one("INSERT INTO orders (customer_name, product, quantity, unit_price, version) VALUES ('dba', 'X', 1, 1, 7) RETURNING version", &[])
        .await
        .unwrap();
    assert_eq!(forged.get::<_, i32>(0), 1);
    // An explicit NULL created_at becomes now().
    let null_ts: Ts = None;
    let null_created = db.query_one(insert, &[&"pending", &1i32, &null_ts]).await.unwrap();
    assert_eq!((null_created.get::<_, Option<bool>>(3), null_created.get::<_, bool>(4)), (None, true));

    let history = |id: i64| {
        let db = &db;
        async move {
            db.query_one("SELECT count(*) FROM order_status_history WHERE order_id = $1", &[&id])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    let (a, b): (i64, i64) = (plain.get(0), odd.get(0));
    assert_eq!((history(a).await, history(b).await), (1, 1));
    db.execute("DELETE FROM orders WHERE id = $1", &[&b]).await.unwrap();
    assert_eq!((history(a).await, history(b).await), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_in_a_query_filter_is_422_naming_the_parameter() {
    let app = spawn_app().await;
    app.create_order("Nul").await;
    for (target, field) in [
        ("/api/orders?q=%00", "q"),
        ("/api/orders?q=a%00b", "q"),
        ("/api/orders?customer=a%00b", "customer"),
        ("/api/orders?customer=%00", "customer"),
        ("/api/events?customer=%00&snapshot=true", "customer"),
        ("/api/dlq?reason=%00", "reason"),
    ] {
        let (status, body) = app.get_json(target).await;
        assert_eq!(
            (status, &body["code"], &body["field"]),
            (422, &json!("validation_failed"), &json!(field)),
            "{target}"
        );
    }
    // A WebSocket handshake is upgraded and closed, so that a browser can
    // read why: 4422, the problem's code and message.
    for (target, reason) in [
        ("/ws?customer=%00&snapshot=true", "validation_failed: customer: must not contain NUL characters"),
        ("/ws?since=yesterday", "invalid_position: "),
        ("/ws?colour=red", "unknown_parameter: "),
    ] {
        let (close, messages) = crate::hardening::ws_at(&app, target, &[]).await;
        let (code, why) = close.expect("a close frame");
        assert!(code == 4422 && why.starts_with(reason) && messages.is_empty(), "{target}: {code} {why} {messages:?}");
    }
    // The same filters without the NUL still work.
    let (status, page) = app.get_json("/api/orders?q=Nu&customer=nul").await;
    assert_eq!((status, page["items"].as_array().unwrap().len()), (200, 1));
}

/// A PATCH or PUT that changes nothing (a retried request, a client that
/// sends what it has) writes nothing: 200 with the order as it is, no new
/// version, no history entry and no change pushed to the streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patch_that_changes_nothing_writes_nothing() {
    let app = spawn_app().await;
    let order = app.create_order("Idle").await;
    let id = order["id"].as_i64().unwrap();
    // Live from after the insert: the stream carries only what follows.
    app.settled().await;
    let mut ws = app.ws(&format!("?id={id}")).await;
    ws.ready().await;
    let r = app.patch(id, &json!({"status": "cancelled"})).await;
    assert_eq!(r.status(), 200);
    let cancelled: Value = r.json().await.unwrap();
    assert_eq!(cancelled["version"], 2);
    assert_eq!(ws.changes(1, Duration::from_secs(10)).await[0]["order"]["status"], "cancelled");
    for body in [json!({"status": "cancelled"}), json!({"status": "cancelled", "quantity": order["quantity"]})] {
        for method in [reqwest::Method::PATCH, reqwest::Method::PUT] {
            let r = app
                .http
                .request(method.clone(), app.url(&format!("/api/orders/{id}")))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{method} {body}");
            assert_eq!(r.headers()["etag"], "\"2\"", "{method} {body}");
            let now: Value = r.json().await.unwrap();
            assert_eq!(now, cancelled, "{method} {body}: answered as it is");
        }
    }
    // With a stale If-Match it is still a 412, even though nothing would change.
    let r = app
        .http
        .patch(app.url(&format!("/api/orders/{id}")))
        .header("If-Match", "\"1\"")
        .json(&json!({"status": "cancelled"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 412);
    ws.expect_silence(Duration::from_millis(500)).await;
    let (_, history) = app.get_json(&format!("/api/orders/{id}/history")).await;
    assert_eq!(history.as_array().unwrap().iter().filter(|h| h["to"] == "cancelled").count(), 1, "{history}");
    let db = app.sql().await;
    let changes: i64 =
        db.query_one("SELECT count(*) FROM change_log WHERE order_id = $1", &[&id]).await.unwrap().get(0);
    assert_eq!(changes, 2, "the insert and the one cancel");
}

/// A DBA's open transaction that replaces order `id` (deletes it and
/// inserts it again under its id, product `New`).
async fn replacing(app: &TestApp, id: i64) -> tokio_postgres::Client {
    let dba = app.sql().await;
    dba.batch_execute(&format!(
        "BEGIN; DELETE FROM orders WHERE id = {id}; \
         INSERT INTO orders (id, customer_name, product, quantity, unit_price) VALUES ({id}, 'Replaced', 'New', 1, 2.00)"
    ))
    .await
    .unwrap();
    dba
}

/// A PATCH of order `id` sent in the background: its status and body.
fn patch_in_background(app: &TestApp, id: i64, body: Value) -> tokio::task::JoinHandle<(u16, Value)> {
    let (http, url) = (app.http.clone(), app.url(&format!("/api/orders/{id}")));
    tokio::spawn(async move {
        let r = http.patch(url).json(&body).send().await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    })
}

/// Commits `dba`'s transaction once a statement like `like` waits for its
/// locks, so that the statement finds the rows as the commit left them.
async fn commit_when_waiting(app: &TestApp, dba: &tokio_postgres::Client, like: &str) {
    let watcher = app.sql().await;
    let waiting =
        format!("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%{like}%' AND datname = current_database()");
    crate::helpers::until_count(&watcher, &waiting, Duration::from_secs(10), |n| n > 0).await;
    dba.batch_execute("COMMIT").await.unwrap();
}

/// An update whose order a DBA replaces under it (deleted and inserted again
/// under its id, in one transaction) is applied to the new row: before, the
/// UPDATE skipped the row it saw deleted and the client got a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_racing_a_replacement_of_its_order_is_applied_to_the_new_row() {
    let app = spawn_app().await;
    let id = app.create_order("Replaced").await["id"].as_i64().unwrap();
    let dba = replacing(&app, id).await;
    let patch = patch_in_background(&app, id, json!({"quantity": 7}));
    // Committed only once the PATCH waits for the DBA's row lock, so that its
    // UPDATE finds the row it saw deleted.
    commit_when_waiting(&app, &dba, "UPDATE orders SET").await;
    let (status, body) = patch.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!((body["product"].as_str(), body["quantity"].as_i64()), (Some("New"), Some(7)), "{body}");
}

/// Ids a DBA inserted by hand, ahead of the orders' id sequence: a create
/// skips the ones taken and answers 201. Before, each such create was 409
/// `conflict` with PostgreSQL's words (`duplicate key value violates unique
/// constraint "orders_pkey"`), a client blamed for the server's state. Over
/// a hundred in a row: 500 with nothing of PostgreSQL's, and the log says
/// how to move the sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_skips_ids_a_dba_took_ahead_of_the_sequence() {
    let app = spawn_app().await;
    let first = app.create_order("Ahead").await["id"].as_i64().unwrap();
    let dba = app.sql().await;
    let take = |from: i64, to: i64| {
        format!(
            "INSERT INTO orders (id, customer_name, product, quantity, unit_price) \
             SELECT g, 'By hand', 'P', 1, 1 FROM generate_series({from}, {to}) g"
        )
    };
    dba.batch_execute(&take(first + 1, first + 5)).await.unwrap();
    let r = app.post_order(&json!({"customer_name": "Ahead", "product": "P", "quantity": 1, "unit_price": 1})).await;
    let (status, body) = (r.status().as_u16(), r.text().await.unwrap());
    assert_eq!(status, 201, "{body}");
    let created: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(created["id"].as_i64(), Some(first + 6), "{body}");
    dba.batch_execute(&take(first + 7, first + 300)).await.unwrap();
    let r = app.post_order(&json!({"customer_name": "Ahead", "product": "P", "quantity": 1, "unit_price": 1})).await;
    let (status, body) = (r.status().as_u16(), r.text().await.unwrap());
    assert_eq!(status, 500, "{body}");
    assert!(!body.contains("orders_pkey") && !body.contains("duplicate key"), "{body}");
}

/// A write the database gives up for a concurrent transaction (here a
/// serialization failure, with repeatable read set on the database) is run
/// again by the server, with a new snapshot, and applied (after four such
/// tries it would be 409 `conflict`; before this, it was 409 at once, and
/// earlier still 500); a read-only database (a standby, a failover) and a
/// lock held past the database's `lock_timeout` are 503
/// `database_unavailable`, not 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_given_up_or_a_read_only_database_is_no_internal_error() {
    let app = spawn_app().await;
    let name = app.db_name.clone();
    let admin = ordercast::db::connect(&crate::helpers::admin_url()).await.unwrap();
    // The REST pool's connections are opened again with the database's new
    // setting.
    let reopen = |setting: &'static str| {
        let (admin, name, app) = (&admin, &name, &app);
        async move {
            admin.batch_execute(&format!("ALTER DATABASE {name} SET {setting}")).await.unwrap();
            admin
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = $1 AND pid <> pg_backend_pid()",
                    &[name],
                )
                .await
                .unwrap();
            crate::helpers::eventually(Duration::from_secs(10), || async {
                (app.get_json("/api/orders").await.0 == 200).then_some(())
            })
            .await;
        }
    };
    reopen("default_transaction_isolation = 'repeatable read'").await;
    let id = app.create_order("Serial").await["id"].as_i64().unwrap();
    let dba = app.sql().await;
    dba.batch_execute(&format!("BEGIN; UPDATE orders SET quantity = 2 WHERE id = {id}")).await.unwrap();
    let patch = patch_in_background(&app, id, json!({"quantity": 7}));
    commit_when_waiting(&app, &dba, "UPDATE orders SET").await;
    let (status, body) = patch.await.unwrap();
    assert_eq!((status, body["quantity"].as_i64(), body["version"].as_i64()), (200, Some(7), Some(3)), "{body}");

    reopen("default_transaction_read_only = on").await;
    let mut read_only = 0;
    for _ in 0..5 {
        let r = app.post_order(&json!({"customer_name": "R", "product": "P", "quantity": 1, "unit_price": 1})).await;
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        assert_eq!((status, body["code"].as_str()), (503, Some("database_unavailable")), "{body}");
        read_only += body["message"].as_str().unwrap().contains("read-only") as usize;
    }
    assert!(read_only > 0, "no answer said the database is read-only");

    // A lock held past the database's lock_timeout: nothing was written.
    admin.batch_execute(&format!("ALTER DATABASE {name} SET default_transaction_read_only = off")).await.unwrap();
    reopen("lock_timeout = '200ms'").await;
    let dba = app.sql().await;
    dba.batch_execute(&format!("BEGIN; SELECT 1 FROM orders WHERE id = {id} FOR UPDATE")).await.unwrap();
    let r = app.http.patch(app.url(&format!("/api/orders/{id}"))).json(&json!({"quantity": 8})).send().await.unwrap();
    let (status, retry_after) = (r.status().as_u16(), r.headers().contains_key("retry-after"));
    let body: Value = r.json().await.unwrap();
    assert_eq!((status, body["code"].as_str(), retry_after), (503, Some("database_unavailable"), true), "{body}");
    assert!(body["message"].as_str().unwrap().contains("lock"), "{body}");
    dba.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(app.get_json(&format!("/api/orders/{id}")).await.1["quantity"], 7, "nothing was written");
}

/// A DELETE racing a replacement of its order (deleted and inserted again
/// under its id in one transaction) deletes the new row, as a PATCH updates
/// it. Before, it answered 404 for an order that existed, or with If-Match
/// 412 "version 1 does not match the current version 1".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_racing_a_replacement_of_its_order_deletes_the_new_row() {
    let app = spawn_app().await;
    for if_match in [None, Some("\"1\"")] {
        let id = app.create_order("Replaced").await["id"].as_i64().unwrap();
        let dba = replacing(&app, id).await;
        let delete = {
            let mut req = app.http.delete(app.url(&format!("/api/orders/{id}")));
            if let Some(tag) = if_match {
                req = req.header("If-Match", tag);
            }
            tokio::spawn(async move {
                let r = req.send().await.unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            })
        };
        commit_when_waiting(&app, &dba, "DELETE FROM orders USING a").await;
        let (status, body) = delete.await.unwrap();
        assert_eq!(status, 204, "If-Match {if_match:?}: {body}");
        let left: i64 = dba.query_one("SELECT count(*) FROM orders WHERE id = $1", &[&id]).await.unwrap().get(0);
        assert_eq!(left, 0, "If-Match {if_match:?}: the new row is gone");
    }
}

/// An order whose steps still hold effects (a charged payment, held stock)
/// cannot be deleted, by REST or by a DBA: its steps went with it, so nothing
/// refunded it. Once they are undone (or shipped: final), it can go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_whose_steps_are_not_undone_cannot_be_deleted() {
    let app = spawn_app().await;
    let db = app.sql().await;
    let delete = |id: i64| {
        let r = app.http.delete(app.url(&format!("/api/orders/{id}")));
        async move {
            let r = r.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let step = |id: i64, step: &'static str, action: &'static str, outcome: &'static str| {
        let db = &db;
        async move {
            db.execute(
                "INSERT INTO order_steps (order_id, step, action, outcome) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (order_id, step, action) DO UPDATE SET outcome = EXCLUDED.outcome",
                &[&id, &step, &action, &outcome],
            )
            .await
            .unwrap();
        }
    };
    let order = |statuses: &'static [&'static str]| {
        let (app, db) = (&app, &db);
        async move {
            let id = app.create_order("Settle").await["id"].as_i64().unwrap();
            for s in statuses {
                db.execute("UPDATE orders SET status = $2 WHERE id = $1", &[&id, s]).await.unwrap();
            }
            id
        }
    };

    // Processed: charged and reserved.
    let processed = order(&["processing", "processed"]).await;
    step(processed, "payment", "execute", "done").await;
    step(processed, "inventory", "execute", "done").await;
    let (status, body) = delete(processed).await;
    assert_eq!((status, body["code"].as_str()), (409, Some("order_not_settled")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("cancel it first"), "{body}");
    let e = db.execute("DELETE FROM orders WHERE id = $1", &[&processed]).await.unwrap_err();
    assert_eq!(e.as_db_error().unwrap().code().code(), "OC424", "a DBA's DELETE is refused too");
    // Undone: it can go.
    step(processed, "inventory", "compensate", "done").await;
    assert_eq!(delete(processed).await.0, 409, "the payment is still charged");
    step(processed, "payment", "compensate", "done").await;
    assert_eq!(delete(processed).await.0, 204);

    // Processing, a call not answered: it may have taken effect.
    let processing = order(&["processing"]).await;
    step(processing, "payment", "execute", "started").await;
    assert_eq!(delete(processing).await.0, 409);

    // Cancelled, its undoing begun; then failed and left to an operator.
    let cancelled = order(&["processing", "cancelled"]).await;
    step(cancelled, "payment", "execute", "done").await;
    step(cancelled, "payment", "compensate", "started").await;
    let (status, body) = delete(cancelled).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["message"].as_str().unwrap().contains("processor undoes its steps"), "{body}");
    step(cancelled, "payment", "compensate", "failed").await;
    assert_eq!(delete(cancelled).await.0, 204);

    // Failed by another writer with its payment taken: undone by a processor (it
    // cannot be cancelled); once the refund is done it can go.
    let failed = order(&["processing", "failed"]).await;
    step(failed, "payment", "execute", "done").await;
    let (status, body) = delete(failed).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["message"].as_str().unwrap().contains("processor undoes its steps"), "{body}");
    step(failed, "payment", "compensate", "done").await;
    assert_eq!(delete(failed).await.0, 204);

    // Shipped: its steps are final.
    let shipped = order(&["processing", "processed", "shipped"]).await;
    step(shipped, "payment", "execute", "done").await;
    assert_eq!(delete(shipped).await.0, 204);
    // And an order no processor touched, as before.
    let plain = order(&[]).await;
    assert_eq!(delete(plain).await.0, 204);
    let left: i64 = db
        .query_one(
            "SELECT count(*) FROM orders WHERE id = ANY($1)",
            &[&vec![processed, processing, cancelled, failed, shipped, plain]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 1, "only the processing order is left");
}
