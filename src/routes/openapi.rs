//! `GET /api/openapi.json`: the OpenAPI 3 document, generated from the route
//! annotations and the schema types below (which describe the JSON the
//! database renders for an order).

use actix_web::{route, HttpResponse};
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

use crate::domain::Status;

/// An order, as returned by the API and carried in `change` messages.
#[derive(Serialize, ToSchema)]
#[schema(as = Order)]
pub struct OrderDoc {
    pub id: i64,
    pub external_id: Option<String>,
    pub customer_name: String,
    pub customer_email: Option<String>,
    pub product: String,
    pub quantity: i32,
    /// Decimal with 2 places.
    pub unit_price: f64,
    /// quantity * unit_price, kept by the database.
    pub amount: f64,
    pub status: Status,
    pub error_message: Option<String>,
    /// Bumped on every change; send it back in `If-Match` for optimistic concurrency.
    pub version: i32,
    pub created_at: String,
    pub updated_at: String,
    pub processing_at: Option<String>,
    pub processed_at: Option<String>,
    pub shipped_at: Option<String>,
    pub delivered_at: Option<String>,
    pub cancelled_at: Option<String>,
    pub failed_at: Option<String>,
}

/// A new order. Unknown fields are rejected.
#[derive(Serialize, ToSchema)]
#[schema(as = NewOrder)]
pub struct NewOrderDoc {
    /// The producer's id (unique).
    pub external_id: Option<String>,
    /// 1 to 200 characters.
    pub customer_name: String,
    pub customer_email: Option<String>,
    /// 1 to 200 characters.
    pub product: String,
    /// 1 to 1,000,000.
    pub quantity: i32,
    /// At least 0, at most 2 decimal places (a number or a string).
    pub unit_price: PriceDoc,
    /// Initial status (default pending).
    pub status: Option<Status>,
}

/// A price as a request may give it: a JSON number (the double it reads
/// as), or a string read exactly (`"19.99"`, `"1.5e1"`).
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
#[schema(as = Price)]
pub enum PriceDoc {
    Number(f64),
    Text(String),
}

/// A partial update: send only the fields to change. Only `customer_email`
/// and `error_message` may be null (it clears them).
#[derive(Serialize, ToSchema)]
#[schema(as = OrderPatch)]
pub struct OrderPatchDoc {
    #[schema(nullable = false)]
    pub customer_name: Option<String>,
    pub customer_email: Option<String>,
    #[schema(nullable = false)]
    pub product: Option<String>,
    #[schema(nullable = false)]
    pub quantity: Option<i32>,
    #[schema(nullable = false)]
    pub unit_price: Option<PriceDoc>,
    /// Must be an allowed transition from the current status.
    #[schema(nullable = false)]
    pub status: Option<Status>,
    pub error_message: Option<String>,
    /// Expected current version (like If-Match).
    #[schema(nullable = false)]
    pub version: Option<i32>,
}

/// The optional body of a cancel or a delete.
#[derive(Serialize, ToSchema)]
#[schema(as = ExpectedVersion)]
pub struct VersionDoc {
    /// Expected current version (like If-Match).
    #[schema(nullable = false)]
    pub version: Option<i32>,
}

/// A page of orders.
#[derive(Serialize, ToSchema)]
#[schema(as = OrderPage)]
pub struct OrderPageDoc {
    pub items: Vec<OrderDoc>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
    /// The change-log position the page reflects: stream with `since` = this.
    pub position: i64,
}

/// One status change.
#[derive(Serialize, ToSchema)]
#[schema(as = HistoryEntry)]
pub struct HistoryDoc {
    /// Null when the order was created.
    pub from: Option<Status>,
    pub to: Status,
    pub at: String,
    /// `api:<caller>`, `kafka:<topic>`, `sql:<database user>` or `processor`.
    pub by: String,
}

/// Statistics.
#[derive(Serialize, ToSchema)]
#[schema(as = Stats)]
pub struct StatsDoc {
    pub total_orders: i64,
    /// Exact, with two decimals (`1234.50`), like an order's `unit_price`.
    pub total_amount: f64,
    /// status -> {count, amount}; amounts exact, with two decimals.
    pub by_status: serde_json::Value,
    /// [{product, count, avg_price}], the 100 products with the most orders, most ordered
    /// first (ties by name); `avg_price` exact, rounded half away from zero to two decimals.
    pub products: serde_json::Value,
    /// How many products have orders (`products` lists at most 100 of them).
    pub product_count: i64,
    pub position: i64,
    /// Kafka ingest counters of this instance: {enabled, consumed, written, duplicates,
    /// redelivered, log_resets, dead_lettered, dlq_published, dlq_pending, batches, retries,
    /// lag: {partition: n}, lag_total, partitions: [...]}.
    pub ingest: serde_json::Value,
}

/// An error. `code` is stable; `message` is for people.
#[derive(Serialize, ToSchema)]
#[schema(as = Problem)]
pub struct ProblemDoc {
    pub status: u16,
    pub code: String,
    pub message: String,
    /// The field at fault, for validation errors (and `duplicate_external_id`).
    pub field: Option<String>,
    /// `invalid_transition`: the status the order is in.
    pub from: Option<String>,
    /// `invalid_transition`: the status asked for.
    pub to: Option<String>,
    /// `version_conflict`: the order's version now.
    pub current_version: Option<i32>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ordercast",
        description = "Live order changes from PostgreSQL to browsers. Realtime protocol (WebSocket /ws and SSE /api/events): see the README. \
                       With authentication on, every route but /api/health, /api/health/live, /api/session, this document and the dashboard's files answers \
                       401 (missing_token, invalid_token, token_expired) without a valid token and 403 (insufficient_scope) without its scope; \
                       writes over the rate limit answer 429 (rate_limited), and any route 503 (database_unavailable, \
                       shutting_down) with Retry-After. Errors are application/problem+json with a stable code."
    ),
    paths(
        crate::routes::health::health,
        crate::routes::health::live,
        crate::routes::orders::create,
        crate::routes::orders::list,
        crate::routes::orders::get_one,
        crate::routes::orders::patch_order,
        crate::routes::orders::put_order,
        crate::routes::orders::delete_order,
        crate::routes::orders::cancel,
        crate::routes::orders::history,
        crate::routes::orders::transitions,
        crate::routes::stats::stats,
        crate::routes::dlq::list,
        crate::routes::ws::ws,
        crate::routes::sse::events,
        crate::routes::sse::order_events,
        crate::routes::changes::recent,
        crate::routes::metrics::metrics,
        crate::routes::session::sign_in,
        crate::routes::session::who,
        crate::routes::session::sign_out,
        openapi_json,
    ),
    components(schemas(
        OrderDoc,
        NewOrderDoc,
        OrderPatchDoc,
        PriceDoc,
        VersionDoc,
        OrderPageDoc,
        HistoryDoc,
        StatsDoc,
        ProblemDoc,
        Status,
        crate::routes::dlq::DeadLetterDoc,
        crate::routes::dlq::DeadLetterPageDoc
    )),
    modifiers(&ProblemMediaType)
)]
pub struct ApiDoc;

/// Every error response documented as the server sends it,
/// `application/problem+json` (`error::problem_response`): utoipa writes a
/// body's media type as `application/json`, and a client generated from
/// the document found no schema for any error.
struct ProblemMediaType;

impl utoipa::Modify for ProblemMediaType {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::RefOr;
        let problem = "#/components/schemas/Problem";
        for item in doc.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.options,
                &mut item.head,
                &mut item.patch,
                &mut item.trace,
            ];
            for op in operations.into_iter().flatten() {
                for response in op.responses.responses.values_mut() {
                    let RefOr::T(response) = response else { continue };
                    let is_problem = |c: &utoipa::openapi::Content| matches!(&c.schema, Some(RefOr::Ref(r)) if r.ref_location == problem);
                    if response.content.get("application/json").is_some_and(is_problem) {
                        // unwrap: just found
                        let content = response.content.shift_remove("application/json").unwrap();
                        response.content.insert("application/problem+json".to_string(), content);
                    }
                }
            }
        }
    }
}

/// This document.
#[utoipa::path(get, path = "/api/openapi.json", tag = "meta",
    responses((status = 200, description = "OpenAPI 3 document", body = serde_json::Value)))]
#[route("/api/openapi.json", method = "GET", method = "HEAD")]
pub async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok().json(ApiDoc::openapi())
}

pub fn configure(cfg: &mut actix_web::web::ServiceConfig) {
    cfg.service(openapi_json);
}
