//! The REST API for orders. Every write runs as one statement that also sets
//! `ordercast.actor`, so the history and change log say who made it; the
//! database enforces the status rules and reports violations, mapped in
//! `crate::error`.

use actix_web::http::header;
use actix_web::{delete, patch, post, put, route, web, HttpRequest, HttpResponse};
use rust_decimal::Decimal;
use serde_json::Value;

use super::{parse_limit, QueryPairs};
use crate::db::{order_id_taken, ORDER_ID_ATTEMPTS};
use crate::domain::{Filter, NewOrder, OrderPatch, Status, ValidationError};
use crate::error::ApiError;
use crate::startup::AppState;

pub const LIST_DEFAULT_LIMIT: i64 = 50;
pub const LIST_MAX_LIMIT: i64 = 500;

/// Who the history should name for a REST change.
pub fn actor(req: &HttpRequest) -> String {
    format!("api:{}", crate::auth::principal(req).name)
}

/// The customer a restricted token is limited to.
fn restriction(req: &HttpRequest) -> Option<String> {
    crate::auth::principal(req).customer
}

/// Reads a request body up to the configured limit (413 beyond it).
pub async fn read_body(req: &HttpRequest, mut payload: web::Payload, limit: usize) -> Result<web::Bytes, ApiError> {
    use futures_util::StreamExt;
    let declared =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::TooLarge(limit));
    }
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("could not read the body: {e}"), "invalid_body"))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// A request body as JSON (a key twice in one object refused: `domain::json`).
pub(crate) fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    crate::domain::json::parse(body).map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}"), "malformed_json"))
}

pub fn parse_id(raw: &str) -> Result<i64, ApiError> {
    raw.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::BadRequest(format!("{raw:?} is not an order id"), "invalid_id"))
}

/// The versions an `If-Match` header accepts (RFC 9110, 13.1.1): `None`
/// without the header or with `*` (any current version: the order must only
/// exist). A list of entity tags (over one header line or several) matches
/// when any one does. If-Match compares strongly, and an order's ETag is its
/// version in quotes (`"3"`): a weak tag (`W/"3"`), or any other well-formed
/// tag (`"x"`, `"03"`), matches no version, so a list of such tags only is
/// an empty list, which every update refuses with 412. A bare `3` is taken as
/// `"3"`. Malformed syntax is a 400. The second value is the header as sent.
fn if_match(req: &HttpRequest) -> Result<Option<(Vec<i32>, String)>, ApiError> {
    let invalid =
        || ApiError::BadRequest("If-Match must be an order version or a list of them".into(), "invalid_if_match");
    let mut lines = req.headers().get_all(header::IF_MATCH).peekable();
    if lines.peek().is_none() {
        return Ok(None);
    }
    let mut sent = String::new();
    for line in lines {
        if !sent.is_empty() {
            sent.push_str(", ");
        }
        sent.push_str(line.to_str().map_err(|_| invalid())?.trim());
    }
    if sent == "*" {
        return Ok(None);
    }
    let (mut versions, mut tags) = (Vec::new(), 0);
    let mut rest = sent.as_str();
    loop {
        // Empty list elements are ignored (RFC 9110, 5.6.1).
        rest = rest.trim_start_matches([' ', '\t', ',']);
        if rest.is_empty() {
            break;
        }
        tags += 1;
        let (weak, tagged) = match rest.strip_prefix("W/") {
            Some(r) => (true, r),
            None => (false, rest),
        };
        let (tag, quoted, after) = match tagged.strip_prefix('"') {
            Some(r) => {
                let end = r.find('"').ok_or_else(invalid)?;
                (&r[..end], true, &r[end + 1..])
            }
            None if weak => return Err(invalid()),
            None => {
                let end = tagged.find([',', ' ', '\t']).unwrap_or(tagged.len());
                (&tagged[..end], false, &tagged[end..])
            }
        };
        // etagc: visible characters but DQUOTE (found above as the end).
        if tag.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(invalid());
        }
        rest = after.trim_start_matches([' ', '\t']);
        if !(rest.is_empty() || rest.starts_with(',')) {
            return Err(invalid());
        }
        match (canonical_version(tag), quoted) {
            (Some(v), _) if !weak => versions.push(v),
            // A bare number past any version matches nothing, as it does
            // quoted; before, it was 400 and the quoted one 412.
            (None, false) if !tag.starts_with('0') && !tag.is_empty() && tag.bytes().all(|b| b.is_ascii_digit()) => {}
            (None, false) => return Err(invalid()),
            _ => {}
        }
    }
    if tags == 0 {
        return Err(invalid());
    }
    Ok(Some((versions, sent)))
}

/// An order version as its ETag writes it: decimal, no sign, no leading zero.
fn canonical_version(tag: &str) -> Option<i32> {
    if tag.starts_with('0') || tag.is_empty() || !tag.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    tag.parse().ok()
}

fn json_response(mut builder: actix_web::HttpResponseBuilder, body: String, version: Option<i32>) -> HttpResponse {
    if let Some(v) = version {
        builder.insert_header((header::ETAG, format!("\"{v}\"")));
    }
    builder.content_type("application/json").body(body)
}

/// The answer to a write: the order as it now stands, or, to a token
/// without the `read` scope, only what names it and its state (`id`,
/// `version`, `status`). Before, a write-only token (an ingest's, say)
/// could read any order in its reach with a write that changes nothing
/// (`PATCH` with `{"error_message": null}`), which leaves no trace.
fn written(
    req: &HttpRequest,
    builder: actix_web::HttpResponseBuilder,
    json: String,
    version: Option<i32>,
) -> HttpResponse {
    if crate::auth::principal(req).has(crate::auth::Scope::Read) {
        return json_response(builder, json, version);
    }
    let order: Value = serde_json::from_str(&json).unwrap_or_default();
    let named = serde_json::json!({"id": order["id"], "version": order["version"], "status": order["status"]});
    json_response(builder, named.to_string(), version)
}

fn order_version(json: &str) -> Option<i32> {
    serde_json::from_str::<Value>(json).ok()?.get("version")?.as_i64().map(|v| v as i32)
}

/// Create an order.
#[utoipa::path(post, path = "/api/orders", tag = "orders",
    request_body(content = crate::routes::openapi::NewOrderDoc, content_type = "application/json"),
    responses(
        (status = 201, description = "Created", body = crate::routes::openapi::OrderDoc, headers(("Location" = String, description = "URL of the new order"))),
        (status = 400, description = "Malformed JSON", body = crate::routes::openapi::ProblemDoc),
        (status = 403, description = "An order for another customer, by a token confined to one customer (forbidden)", body = crate::routes::openapi::ProblemDoc),
        (status = 409, description = "external_id already exists (duplicate_external_id), or the database gave the transaction up for a concurrent one: nothing was written, try again (conflict)", body = crate::routes::openapi::ProblemDoc),
        (status = 413, description = "Body too large", body = crate::routes::openapi::ProblemDoc),
        (status = 422, description = "Invalid field", body = crate::routes::openapi::ProblemDoc),
    ))]
#[post("/api/orders")]
pub async fn create(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(&req, body, state.settings.max_body_bytes).await?;
    let order = NewOrder::parse(&parse_body(&body)?)?;
    if let Some(c) = restriction(&req) {
        if crate::domain::fold_case(&order.customer_name) != c {
            return Err(ApiError::Forbidden("this token may only create orders for its own customer".into()));
        }
    }
    let client = state.pool.get().await?;
    let insert = client
        .prepare_cached(
            "WITH a AS (SELECT set_config('ordercast.actor', $1, true)) \
             INSERT INTO orders (external_id, customer_name, customer_email, product, quantity, unit_price, status) \
             SELECT $2, $3, $4, $5, $6, $7, COALESCE($8, 'pending') FROM a \
             RETURNING id, to_jsonb(orders)::text",
        )
        .await?;
    let (actor, status) = (actor(&req), order.status.map(Status::as_str));
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 8] = [
        &actor,
        &order.external_id,
        &order.customer_name,
        &order.customer_email,
        &order.product,
        &order.quantity,
        &order.unit_price,
        &status,
    ];
    let mut taken = 0;
    let row = loop {
        match given_up_again(|| client.query_one(&insert, &params)).await {
            Ok(row) => break row,
            // The id the sequence gave is already taken: a DBA inserted
            // rows with ids of their own, ahead of the sequence. Each try
            // draws the next id.
            Err(e) if taken < ORDER_ID_ATTEMPTS && order_id_taken(&e) => taken += 1,
            Err(e) if order_id_taken(&e) => return Err(ApiError::Unexpected(crate::db::order_id_sequence_behind())),
            Err(e) => return Err(e.into()),
        }
    };
    crate::db::warn_order_ids_taken("POST /api/orders", taken);
    let id: i64 = row.get(0);
    let mut builder = HttpResponse::Created();
    builder.insert_header((header::LOCATION, format!("/api/orders/{id}")));
    Ok(written(&req, builder, row.get(1), Some(1)))
}

/// List orders, newest first, with keyset pagination.
#[utoipa::path(get, path = "/api/orders", tag = "orders",
    params(
        ("status" = Option<String>, Query, description = "One or several statuses, comma-separated or repeated"),
        ("q" = Option<String>, Query, description = "Search in customer, email, product, external id and id"),
        ("customer" = Option<String>, Query, description = "Exact customer name (case-insensitive)"),
        ("id" = Option<String>, Query, description = "Order ids, comma-separated"),
        ("limit" = Option<i64>, Query, description = "Page size (default 50, at most 500); a page also ends once its orders reach 4 MiB of JSON (next_cursor goes on)"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of orders and the change-log position it reflects", body = crate::routes::openapi::OrderPageDoc),
        (status = 422, description = "Invalid parameter", body = crate::routes::openapi::ProblemDoc),
    ))]
#[route("/api/orders", method = "GET", method = "HEAD")]
pub async fn list(req: HttpRequest, query: QueryPairs, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let mut filter = Filter::default();
    let mut q: Option<String> = None;
    let mut limit = LIST_DEFAULT_LIMIT;
    let mut cursor: Option<i64> = None;
    for (k, v) in query.iter() {
        if filter.apply_param(k, v)? {
            continue;
        }
        match k.as_str() {
            "q" if v.contains('\0') => return Err(ValidationError::new("q", "must not contain NUL characters").into()),
            "q" => q = Some(v.trim().to_string()).filter(|s| !s.is_empty()),
            "limit" => limit = parse_limit("limit", v, LIST_MAX_LIMIT)?.unwrap_or(LIST_DEFAULT_LIMIT),
            "access_token" => {}
            "cursor" => cursor = super::parse_cursor("cursor", v)?,
            other => return Err(super::unknown_parameter(other).into()),
        }
    }
    if let Some(c) = restriction(&req) {
        filter.customer = Some(c);
    }
    let page = list_page(&state.pool, &filter, q.as_deref(), limit, cursor).await?;
    state.hub.note_handed_out(page.position, page.committed_micros);
    Ok(HttpResponse::Ok().content_type("application/json").body(page.to_json()))
}

/// Escapes LIKE metacharacters so a search for `50%` means the text.
fn like_pattern(q: &str) -> String {
    let mut s = String::with_capacity(q.len() + 2);
    s.push('%');
    for ch in q.chars() {
        if matches!(ch, '%' | '_' | '\\') {
            s.push('\\');
        }
        s.push(ch);
    }
    s.push('%');
    s
}

/// A page of orders (each as JSON text) and the change-log position it
/// reflects.
pub struct Page {
    pub items: Vec<String>,
    pub next_cursor: Option<i64>,
    pub position: i64,
    /// The commit time of the transaction at `position`, when one ends
    /// there (`changes::HandedHead`).
    pub committed_micros: Option<i64>,
}

impl Page {
    /// `{"items":[...],"next_cursor":"..."|null,"position":N}`
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(64 + self.items.iter().map(String::len).sum::<usize>());
        out.push_str(r#"{"items":["#);
        for (i, item) in self.items.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(item);
        }
        match self.next_cursor {
            Some(c) => out.push_str(&format!(r#"],"next_cursor":"{c}","position":{}}}"#, self.position)),
            None => out.push_str(&format!(r#"],"next_cursor":null,"position":{}}}"#, self.position)),
        }
        out
    }
}

/// A page (and a stream's snapshot) also ends once its orders' JSON reaches
/// this many bytes, `next_cursor` going on after its last order: 500 orders
/// of a megabyte each (a DBA's long text), or 10,000 in a snapshot, would
/// otherwise be read into memory at once, per request.
pub const PAGE_BYTES: usize = 4 << 20;

/// Reads one page in a single REPEATABLE READ snapshot together with the
/// change-log head: changes up to `position` are reflected in the rows and
/// none after it, so a client can load the page and then stream
/// `since=position` with no gap and no double.
pub async fn list_page(
    pool: &deadpool_postgres::Pool,
    filter: &Filter,
    q: Option<&str>,
    limit: i64,
    cursor: Option<i64>,
) -> Result<Page, ApiError> {
    let mut client = pool.get().await?;
    let tx = crate::db::snapshot(&mut client).await?;
    let head = crate::changes::handed_head(&*tx).await?;
    let ids: Option<Vec<i64>> = (!filter.ids.is_empty()).then(|| filter.ids.iter().collect());
    let q_id: Option<i64> = q.and_then(|q| q.trim_start_matches('#').parse().ok());
    let (statuses, pattern, after) = (filter.status_strings(), q.map(like_pattern), limit + 1);
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] =
        [&statuses, &ids, &filter.customer, &pattern, &q_id, &cursor, &after];
    let statement = tx
        .prepare_cached(
            "SELECT id, to_jsonb(o)::text FROM orders o \
             WHERE ($1::text[] IS NULL OR status = ANY($1)) \
               AND ($2::bigint[] IS NULL OR id = ANY($2)) \
               AND ($3::text IS NULL OR lower(customer_name) = $3) \
               AND ($4::text IS NULL OR customer_name ILIKE $4 OR product ILIKE $4 OR external_id ILIKE $4 \
                    OR customer_email ILIKE $4 OR id = $5) \
               AND ($6::bigint IS NULL OR id < $6) \
             ORDER BY id DESC LIMIT $7",
        )
        .await?;
    let (mut items, mut next_cursor, mut bytes, mut last) = (Vec::new(), None, 0, None);
    crate::db::portal_rows(&tx, &statement, &params, |row| {
        if items.len() as i64 == limit || bytes >= PAGE_BYTES {
            // One more matched: the page goes on after its last order.
            next_cursor = last;
            return Ok(false);
        }
        let item: String = row.try_get(1)?;
        bytes += item.len();
        last = Some(row.try_get(0)?);
        items.push(item);
        Ok(true)
    })
    .await?;
    tx.commit().await?;
    Ok(Page { next_cursor, items, position: head.pos, committed_micros: head.committed_micros })
}

/// One order.
#[utoipa::path(get, path = "/api/orders/{id}", tag = "orders",
    params(("id" = i64, Path, description = "Order id")),
    responses(
        (status = 200, description = "The order", body = crate::routes::openapi::OrderDoc),
        (status = 400, description = "Not an order id", body = crate::routes::openapi::ProblemDoc),
        (status = 404, description = "No such order", body = crate::routes::openapi::ProblemDoc),
    ))]
#[route("/api/orders/{id}", method = "GET", method = "HEAD")]
pub async fn get_one(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_id(&path)?;
    let json = fetch(&state.pool, id, restriction(&req).as_deref()).await?.ok_or_else(|| not_found(id))?;
    let version = order_version(&json);
    Ok(json_response(HttpResponse::Ok(), json, version))
}

/// One order as JSON; a restricted caller sees only its customer's orders.
pub async fn fetch(
    pool: &deadpool_postgres::Pool,
    id: i64,
    customer: Option<&str>,
) -> Result<Option<String>, ApiError> {
    let client = pool.get().await?;
    Ok(client
        .query_opt(
            "SELECT to_jsonb(o)::text FROM orders o WHERE id = $1 AND ($2::text IS NULL OR lower(customer_name) = $2)",
            &[&id, &customer],
        )
        .await?
        .map(|r| r.get(0)))
}

fn not_found(id: i64) -> ApiError {
    ApiError::NotFound(format!("order {id} does not exist"))
}

/// The error for an order that is already in the status a request moves it to.
fn already(id: i64, status: &str) -> ApiError {
    ApiError::InvalidTransition {
        message: format!("order {id} is already {status}"),
        from: Some(status.into()),
        to: Some(status.into()),
    }
}

/// The columns a patch may set and their new values, from the patch's nine
/// values as parameters `$n ..= $n+8`: customer name, whether the email is
/// set and to what, product, quantity, unit price, status, whether the error
/// message is set and to what.
fn patched(n: usize) -> [(&'static str, String); 7] {
    let p = |i: usize| format!("${}", n + i);
    [
        ("customer_name", format!("COALESCE({}, customer_name)", p(0))),
        ("customer_email", format!("CASE WHEN {} THEN {} ELSE customer_email END", p(1), p(2))),
        ("product", format!("COALESCE({}, product)", p(3))),
        ("quantity", format!("COALESCE({}, quantity)", p(4))),
        ("unit_price", format!("COALESCE({}, unit_price)", p(5))),
        ("status", format!("COALESCE({}, status)", p(6))),
        ("error_message", format!("CASE WHEN {} THEN {} ELSE error_message END", p(7), p(8))),
    ]
}

/// The UPDATE's SET list for a patch (see `patched`).
fn set_sql(n: usize) -> String {
    patched(n).iter().map(|(column, value)| format!("{column} = {value}")).collect::<Vec<_>>().join(", ")
}

/// Whether a patch changes the row it is compared with (see `patched`).
fn changes_sql(n: usize) -> String {
    let (columns, values): (Vec<_>, Vec<_>) = patched(n).into_iter().unzip();
    format!("({}) IS DISTINCT FROM ({})", columns.join(", "), values.join(", "))
}

/// A patch, as one UPDATE: `$1` the actor, `$2 ..= $10` the patch's values
/// (see `patched`), `$11` the id, `$12` the versions it may have, `$13` the
/// customer a token is confined to, `$14` a status it must not have. It
/// matches nothing when the patch would change nothing.
static PATCH_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH a AS (SELECT set_config('ordercast.actor', $1, true)) \
         UPDATE orders SET {} \
         FROM a WHERE id = $11 AND ($12::int[] IS NULL OR version = ANY($12)) \
           AND ($13::text IS NULL OR lower(customer_name) = $13) \
           AND ($14::text IS NULL OR status <> $14) AND {} \
         RETURNING to_jsonb(orders)::text",
        set_sql(2),
        changes_sql(2)
    )
});

/// Why a patch matched nothing: the order as it is (`$1` the id, `$2` the
/// confining customer) and whether the patch (`$3 ..= $11`) would change it.
static PATCH_CHECK_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT version, status, to_jsonb(orders)::text, {} FROM orders \
         WHERE id = $1 AND ($2::text IS NULL OR lower(customer_name) = $2)",
        changes_sql(3)
    )
});

/// Tries of a write the database gives up for a concurrent transaction.
const GIVEN_UP_ATTEMPTS: u32 = 4;

/// Runs a write's statement (its own transaction) again when the database
/// gives it up for a concurrent one: a serialization failure (40001, under
/// REPEATABLE READ or SERIALIZABLE set on the database or role; the change
/// log's bookkeeping makes concurrent writes meet) or a deadlock (40P01,
/// with a DBA's statement). It wrote nothing, and the next try takes a new
/// snapshot. After `GIVEN_UP_ATTEMPTS`, the client gets 409 `conflict`.
async fn given_up_again<T, F, Fut>(mut statement: F) -> Result<T, tokio_postgres::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
{
    use tokio_postgres::error::SqlState;
    // A few milliseconds, more each time and at random, so that the writers
    // that met do not meet again.
    let mut backoff = std::time::Duration::from_millis(2);
    let mut tries = 1;
    loop {
        match statement().await {
            Err(e)
                if tries < GIVEN_UP_ATTEMPTS
                    && e.code().is_some_and(|c| {
                        *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
                    }) =>
            {
                tokio::time::sleep(crate::backoff::next(&mut backoff, std::time::Duration::from_millis(20))).await;
                tries += 1;
            }
            r => return r,
        }
    }
}

/// How often an update or a delete is tried again when its order was
/// replaced under it (deleted and inserted again with its id in one
/// transaction).
const REPLACED_ATTEMPTS: usize = 3;

/// Applies a patch; the database checks the transition and bumps the version.
/// A patch that changes nothing writes nothing: the order is answered as it
/// is, with no new version and no change pushed, so a retried PUT is
/// harmless. With `unless`, refused (409) when the order is already in that
/// status. The refusal is part of the UPDATE's condition, so it holds against
/// concurrent writers: of two requests racing to set that status, the second
/// finds the row changed and matches nothing.
async fn apply_patch(
    pool: &deadpool_postgres::Pool,
    id: i64,
    patch: &OrderPatch,
    expected_version: Option<Vec<i32>>,
    actor: &str,
    customer: Option<&str>,
    unless: Option<Status>,
) -> Result<String, ApiError> {
    if let (Some(c), Some(name)) = (customer, &patch.customer_name) {
        if crate::domain::fold_case(name) != c {
            return Err(ApiError::Forbidden("this token may not move an order to another customer".into()));
        }
    }
    let client = pool.get().await?;
    let (email_set, email) = match &patch.customer_email {
        Some(v) => (true, v.clone()),
        None => (false, None),
    };
    let (err_set, err) = match &patch.error_message {
        Some(v) => (true, v.clone()),
        None => (false, None),
    };
    let unit_price: Option<Decimal> = patch.unit_price;
    let status = patch.status.map(Status::as_str);
    let values: [&(dyn tokio_postgres::types::ToSql + Sync); 9] = [
        &patch.customer_name,
        &email_set,
        &email,
        &patch.product,
        &patch.quantity,
        &unit_price,
        &status,
        &err_set,
        &err,
    ];
    let update = client.prepare_cached(&PATCH_SQL).await?;
    let current = client.prepare_cached(&PATCH_CHECK_SQL).await?;
    let unless = unless.map(Status::as_str);
    for _ in 0..REPLACED_ATTEMPTS {
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&actor];
        params.extend(values);
        params.extend::<[&(dyn tokio_postgres::types::ToSql + Sync); 4]>([&id, &expected_version, &customer, &unless]);
        if let Some(r) = given_up_again(|| client.query_opt(&update, &params)).await? {
            return Ok(r.get(0));
        }
        // Why nothing matched, read afresh. Already in `unless` comes first,
        // before a stale version, as the status is what the caller asked to
        // change.
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&id, &customer];
        params.extend(values);
        let Some(row) = client.query_opt(&current, &params).await? else { return Err(not_found(id)) };
        let (version, now, json, changes): (i32, &str, String, bool) = (row.get(0), row.get(1), row.get(2), row.get(3));
        match &expected_version {
            _ if unless == Some(now) => return Err(already(id, now)),
            Some(expected) if !expected.contains(&version) => {
                return Err(ApiError::VersionConflict { expected: expected.clone(), current: version })
            }
            _ if !changes => return Ok(json),
            // The order was replaced after the UPDATE's snapshot was taken
            // (deleted and inserted again under its id): it skipped the row
            // it saw gone. The next try sees the new one.
            _ => {}
        }
    }
    Err(ApiError::Conflict(format!("order {id} kept being replaced while it was updated; try again")))
}

async fn update(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_id(&path)?;
    let body = read_body(&req, body, state.settings.max_body_bytes).await?;
    let patch = OrderPatch::parse(&parse_body(&body)?)?;
    let expected = expected_versions(if_match(&req)?, patch.version)?;
    let json = apply_patch(&state.pool, id, &patch, expected, &actor(&req), restriction(&req).as_deref(), None).await?;
    let version = order_version(&json);
    Ok(written(&req, HttpResponse::Ok(), json, version))
}

/// The versions a write may apply to, from If-Match (`header`, see
/// `if_match`) and the body's `"version"`: both, when given, must agree.
fn expected_versions(header: Option<(Vec<i32>, String)>, body: Option<i32>) -> Result<Option<Vec<i32>>, ApiError> {
    Ok(match (header, body) {
        // No tag that can match: nothing matches, whatever the body says (412).
        (Some((h, _)), Some(_)) if h.is_empty() => Some(h),
        (Some((h, sent)), Some(b)) if !h.contains(&b) => {
            return Err(ApiError::BadRequest(
                format!("If-Match ({sent}) and body version ({b}) disagree"),
                "version_mismatch",
            ))
        }
        (_, Some(b)) => Some(vec![b]),
        (h, None) => h.map(|(h, _)| h),
    })
}

/// The `"version"` of a cancel's or a delete's body, which may be empty.
async fn body_version(req: &HttpRequest, body: web::Payload, limit: usize) -> Result<Option<i32>, ApiError> {
    let body = read_body(req, body, limit).await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    Ok(crate::domain::parse_version_body(&parse_body(&body)?)?)
}

/// Change some fields of an order (partial update).
#[utoipa::path(patch, path = "/api/orders/{id}", tag = "orders",
    params(("id" = i64, Path, description = "Order id"), ("If-Match" = Option<String>, Header, description = "Expected version: \"3\" (the ETag), or a list such as \"2\", \"3\"; a weak tag (W/\"3\") never matches")),
    request_body(content = crate::routes::openapi::OrderPatchDoc, content_type = "application/json"),
    responses(
        (status = 200, description = "The updated order", body = crate::routes::openapi::OrderDoc),
        (status = 400, description = "Not an order id (invalid_id), malformed JSON (malformed_json), an If-Match that is not a version (invalid_if_match), or If-Match and the body's version disagree (version_mismatch)", body = crate::routes::openapi::ProblemDoc),
        (status = 403, description = "A move of the order to another customer, by a token confined to one customer (forbidden)", body = crate::routes::openapi::ProblemDoc),
        (status = 404, description = "No such order", body = crate::routes::openapi::ProblemDoc),
        (status = 409, description = "Status transition not allowed (invalid_transition), a line-item change of an order that has left pending (order_locked), or the order replaced under the update again and again (conflict)", body = crate::routes::openapi::ProblemDoc),
        (status = 412, description = "Version is stale, or If-Match names no version that can match (weak or other tags)", body = crate::routes::openapi::ProblemDoc),
        (status = 413, description = "Body too large", body = crate::routes::openapi::ProblemDoc),
        (status = 422, description = "Invalid field", body = crate::routes::openapi::ProblemDoc),
    ))]
#[patch("/api/orders/{id}")]
pub async fn patch_order(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    update(req, path, body, state).await
}

/// Same as PATCH: existing clients send `PUT /api/orders/1 {"status":"shipped"}`.
#[utoipa::path(put, path = "/api/orders/{id}", tag = "orders",
    params(("id" = i64, Path, description = "Order id"), ("If-Match" = Option<String>, Header, description = "Expected version: \"3\" (the ETag), or a list such as \"2\", \"3\"; a weak tag (W/\"3\") never matches")),
    request_body(content = crate::routes::openapi::OrderPatchDoc, content_type = "application/json"),
    responses(
        (status = 200, description = "The updated order", body = crate::routes::openapi::OrderDoc),
        (status = 400, description = "Not an order id (invalid_id), malformed JSON (malformed_json), an If-Match that is not a version (invalid_if_match), or If-Match and the body's version disagree (version_mismatch)", body = crate::routes::openapi::ProblemDoc),
        (status = 403, description = "A move of the order to another customer, by a token confined to one customer (forbidden)", body = crate::routes::openapi::ProblemDoc),
        (status = 404, description = "No such order", body = crate::routes::openapi::ProblemDoc),
        (status = 409, description = "Status transition not allowed (invalid_transition), a line-item change of an order that has left pending (order_locked), or the order replaced under the update again and again (conflict)", body = crate::routes::openapi::ProblemDoc),
        (status = 412, description = "Version is stale, or If-Match names no version that can match (weak or other tags)", body = crate::routes::openapi::ProblemDoc),
        (status = 413, description = "Body too large", body = crate::routes::openapi::ProblemDoc),
        (status = 422, description = "Invalid field", body = crate::routes::openapi::ProblemDoc),
    ))]
#[put("/api/orders/{id}")]
pub async fn put_order(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    update(req, path, body, state).await
}

/// Cancel an order (allowed from pending, processing and processed).
#[utoipa::path(post, path = "/api/orders/{id}/cancel", tag = "orders",
    params(("id" = i64, Path, description = "Order id"), ("If-Match" = Option<String>, Header, description = "Expected version: \"3\" (the ETag), or a list such as \"2\", \"3\"; a weak tag (W/\"3\") never matches")),
    request_body(content = Option<crate::routes::openapi::VersionDoc>, content_type = "application/json", description = "Optional: the expected version, like If-Match"),
    responses(
        (status = 200, description = "The cancelled order", body = crate::routes::openapi::OrderDoc),
        (status = 400, description = "Not an order id (invalid_id), malformed JSON (malformed_json), an If-Match that is not a version (invalid_if_match), or If-Match and the body's version disagree (version_mismatch)", body = crate::routes::openapi::ProblemDoc),
        (status = 404, description = "No such order", body = crate::routes::openapi::ProblemDoc),
        (status = 409, description = "Cannot be cancelled in its status", body = crate::routes::openapi::ProblemDoc),
        (status = 412, description = "Version is stale, or If-Match names no version that can match (weak or other tags)", body = crate::routes::openapi::ProblemDoc),
        (status = 413, description = "Body too large", body = crate::routes::openapi::ProblemDoc),
        (status = 422, description = "The body is not {\"version\": N} with a version of at least 1 (invalid_body, unknown_field, validation_failed)", body = crate::routes::openapi::ProblemDoc),
    ))]
#[post("/api/orders/{id}/cancel")]
pub async fn cancel(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_id(&path)?;
    let customer = restriction(&req);
    let version = body_version(&req, body, state.settings.max_body_bytes).await?;
    let expected = match if_match(&req) {
        Ok(header) => expected_versions(header, version)?,
        // An order that is already cancelled says so even when If-Match is
        // malformed (the status has always been checked first).
        Err(e) => {
            let status = fetch(&state.pool, id, customer.as_deref())
                .await?
                .and_then(|json| serde_json::from_str::<Value>(&json).ok()?["status"].as_str().map(str::to_owned));
            return Err(match status.as_deref() {
                Some(s @ "cancelled") => already(id, s),
                _ => e,
            });
        }
    };
    // Cancelling twice is a mistake worth reporting, not a silent no-op. The
    // UPDATE itself skips an order that is already cancelled, so of
    // concurrent cancels exactly one succeeds and bumps the version.
    let patch = OrderPatch { status: Some(Status::Cancelled), ..Default::default() };
    let json =
        apply_patch(&state.pool, id, &patch, expected, &actor(&req), customer.as_deref(), Some(Status::Cancelled))
            .await?;
    let version = order_version(&json);
    Ok(written(&req, HttpResponse::Ok(), json, version))
}

/// Delete an order.
#[utoipa::path(delete, path = "/api/orders/{id}", tag = "orders",
    params(("id" = i64, Path, description = "Order id"), ("If-Match" = Option<String>, Header, description = "Expected version: \"3\" (the ETag), or a list such as \"2\", \"3\"; a weak tag (W/\"3\") never matches")),
    request_body(content = Option<crate::routes::openapi::VersionDoc>, content_type = "application/json", description = "Optional: the expected version, like If-Match"),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Not an order id (invalid_id), malformed JSON (malformed_json), an If-Match that is not a version (invalid_if_match), or If-Match and the body's version disagree (version_mismatch)", body = crate::routes::openapi::ProblemDoc),
        (status = 404, description = "No such order", body = crate::routes::openapi::ProblemDoc),
        (status = 409, description = "Its processor steps (payment, stock) are not undone (order_not_settled): cancel it first; a running order processor undoes a failed or cancelled one; or the order kept being replaced (deleted and inserted again under its id) while it was deleted (conflict)", body = crate::routes::openapi::ProblemDoc),
        (status = 412, description = "Version is stale, or If-Match names no version that can match (weak or other tags)", body = crate::routes::openapi::ProblemDoc),
        (status = 413, description = "Body too large", body = crate::routes::openapi::ProblemDoc),
        (status = 422, description = "The body is not {\"version\": N} with a version of at least 1 (invalid_body, unknown_field, validation_failed)", body = crate::routes::openapi::ProblemDoc),
    ))]
#[delete("/api/orders/{id}")]
pub async fn delete_order(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_id(&path)?;
    let version = body_version(&req, body, state.settings.max_body_bytes).await?;
    let expected = expected_versions(if_match(&req)?, version)?;
    let client = state.pool.get().await?;
    let delete = client
        .prepare_cached(
            "WITH a AS (SELECT set_config('ordercast.actor', $1, true)) \
             DELETE FROM orders USING a WHERE id = $2 AND ($3::int[] IS NULL OR version = ANY($3)) \
               AND ($4::text IS NULL OR lower(customer_name) = $4) RETURNING id",
        )
        .await?;
    let current = client
        .prepare_cached("SELECT version FROM orders WHERE id = $1 AND ($2::text IS NULL OR lower(customer_name) = $2)")
        .await?;
    let (actor, customer) = (actor(&req), restriction(&req));
    for _ in 0..REPLACED_ATTEMPTS {
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] = [&actor, &id, &expected, &customer];
        if given_up_again(|| client.query_opt(&delete, &params)).await?.is_some() {
            return Ok(HttpResponse::NoContent().finish());
        }
        // Why nothing matched, read afresh.
        let Some(version) = client.query_opt(&current, &[&id, &customer]).await?.map(|r| r.get::<_, i32>(0)) else {
            return Err(not_found(id));
        };
        match &expected {
            Some(expected) if !expected.contains(&version) => {
                return Err(ApiError::VersionConflict { expected: expected.clone(), current: version })
            }
            // The order was replaced after the DELETE's snapshot was taken
            // (deleted and inserted again under its id): it skipped the row
            // it saw gone. The next try sees the new one, as a PATCH's does.
            _ => {}
        }
    }
    Err(ApiError::Conflict(format!("order {id} kept being replaced while it was deleted; try again")))
}

/// The status history of an order, oldest first. A token confined to one
/// customer gets only the entries made while the order was that customer's
/// (`order_status_history.customer`, compared with `lower()` like every
/// REST read; see `sql/V12__history_customer.sql`): not those from before it
/// was moved to the customer, nor one made by the statement that moved it,
/// nor any written before V12, whose customer is unknown.
#[utoipa::path(get, path = "/api/orders/{id}/history", tag = "orders",
    params(("id" = i64, Path, description = "Order id")),
    responses(
        (status = 200, description = "Status changes: from, to, at, by. A token confined to one customer gets only \
            the entries made while the order belonged to that customer.", body = [crate::routes::openapi::HistoryDoc]),
        (status = 400, description = "Not an order id (invalid_id)", body = crate::routes::openapi::ProblemDoc),
        (status = 404, description = "No such order", body = crate::routes::openapi::ProblemDoc),
    ))]
#[route("/api/orders/{id}/history", method = "GET", method = "HEAD")]
pub async fn history(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_id(&path)?;
    let client = state.pool.get().await?;
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM orders WHERE id = $1 AND ($2::text IS NULL OR lower(customer_name) = $2)), \
                    COALESCE((SELECT json_agg(json_build_object('from', from_status, 'to', to_status, \
                              'at', changed_at, 'by', changed_by) ORDER BY id) \
                              FROM order_status_history WHERE order_id = $1 \
                                AND ($2::text IS NULL OR lower(customer) = $2)), '[]')::text",
            &[&id, &restriction(&req)],
        )
        .await?;
    if !row.get::<_, bool>(0) {
        return Err(not_found(id));
    }
    Ok(HttpResponse::Ok().content_type("application/json").body(row.get::<_, String>(1)))
}

/// The allowed status transitions, as the database enforces them.
#[utoipa::path(get, path = "/api/transitions", tag = "orders",
    responses((status = 200, description = "Map from status to the statuses it may move to", body = serde_json::Value)))]
#[route("/api/transitions", method = "GET", method = "HEAD")]
pub async fn transitions(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let client = state.pool.get().await?;
    let row = client
        .query_one(
            "SELECT json_object_agg(s, COALESCE(t, '[]'::json))::text FROM \
             unnest(ARRAY['pending','processing','processed','shipped','delivered','cancelled','failed']) s \
             LEFT JOIN (SELECT from_status, json_agg(to_status ORDER BY to_status) t FROM order_transitions GROUP BY 1) x \
             ON x.from_status = s",
            &[],
        )
        .await?;
    Ok(HttpResponse::Ok().content_type("application/json").body(row.get::<_, String>(0)))
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(create)
        .service(list)
        .service(transitions)
        .service(get_one)
        .service(patch_order)
        .service(put_order)
        .service(cancel)
        .service(delete_order)
        .service(history);
}
