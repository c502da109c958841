//! `GET /api/stats`: counts per status, total amount, and per product the
//! count and average price. Read from the running totals kept by triggers
//! (`order_stats` + pending deltas), never by scanning orders.

use std::collections::BTreeMap;

use actix_web::{route, web, HttpResponse};
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Serialize, Serializer};
use serde_json::value::RawValue;

use crate::domain::Status;
use crate::error::ApiError;
use crate::startup::AppState;

/// A money amount, sent as an exact JSON number with two decimals (`1234.50`),
/// as orders' `unit_price` is: never through `f64`, which rounds sums beyond
/// about 10^13 cents.
struct Amount(Decimal);

impl Serialize for Amount {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let cents = self.0.round_dp_with_strategy(2, RoundingStrategy::MidpointAwayFromZero);
        // `Decimal`'s text is digits, an optional sign and point: a JSON number.
        RawValue::from_string(format!("{cents:.2}")).map_err(serde::ser::Error::custom)?.serialize(s)
    }
}

#[derive(Serialize)]
struct StatusTotals {
    count: i64,
    amount: Amount,
}

#[derive(Serialize)]
struct ProductStats {
    product: String,
    count: i64,
    avg_price: Amount,
}

#[derive(Serialize)]
struct Stats {
    total_orders: i64,
    total_amount: Amount,
    by_status: BTreeMap<&'static str, StatusTotals>,
    /// The `PRODUCTS` products with the most orders.
    products: Vec<ProductStats>,
    /// How many products have orders (`products` holds at most `PRODUCTS`).
    product_count: i64,
    position: i64,
    ingest: serde_json::Value,
}

/// Products in an answer, those with the most orders: product names are
/// free text, and every distinct one would otherwise be in every answer
/// (the dashboard asks again every 1.5 s while orders change).
pub const PRODUCTS: i64 = 100;

#[utoipa::path(get, path = "/api/stats", tag = "orders",
    responses(
        (status = 200, description = "Order statistics", body = crate::routes::openapi::StatsDoc),
        (status = 403, description = "A token confined to one customer (forbidden): the statistics cover every customer", body = crate::routes::openapi::ProblemDoc),
    ))]
#[route("/api/stats", method = "GET", method = "HEAD")]
pub async fn stats(req: actix_web::HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    crate::auth::unconfined(&req, "statistics cover every customer")?;
    let mut client = state.pool.get().await?;
    // One snapshot for the totals and their position (positions are visible
    // as a prefix): a change committed between two statements would be in
    // the position but not in the totals.
    let tx = crate::db::snapshot(&mut client).await?;
    let head = crate::changes::handed_head(&*tx).await?;
    let position = head.pos;
    let statuses =
        tx.query("SELECT status, sum(n)::bigint, sum(amount) FROM order_stats_current GROUP BY status", &[]).await?;
    let top = tx
        .query(
            "SELECT product, sum(n)::bigint AS n, sum(price_sum), count(*) OVER () FROM order_stats_current \
             GROUP BY product HAVING sum(n) > 0 ORDER BY n DESC, product LIMIT $1",
            &[&PRODUCTS],
        )
        .await?;
    tx.commit().await?;
    state.hub.note_handed_out(position, head.committed_micros);
    let mut by_status: BTreeMap<&'static str, (i64, Decimal)> =
        Status::ALL.iter().map(|s| (s.as_str(), (0, Decimal::ZERO))).collect();
    let (mut total, mut amount) = (0i64, Decimal::ZERO);
    for r in &statuses {
        let status: String = r.try_get(0)?;
        let n: i64 = r.try_get(1)?;
        let amt: Decimal = r.try_get(2)?;
        if let Some(e) = by_status.get_mut(status.as_str()) {
            e.0 += n;
            e.1 += amt;
        }
        total += n;
        amount += amt;
    }
    let product_count = top.first().map(|r| r.try_get(3)).transpose()?.unwrap_or(0);
    let products = top
        .iter()
        .map(|r| {
            let (n, price_sum): (i64, Decimal) = (r.try_get(1)?, r.try_get(2)?);
            Ok(ProductStats { product: r.try_get(0)?, count: n, avg_price: Amount(price_sum / Decimal::from(n)) })
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
    let body = Stats {
        total_orders: total,
        total_amount: Amount(amount),
        by_status: by_status
            .into_iter()
            .map(|(s, (count, a))| (s, StatusTotals { count, amount: Amount(a) }))
            .collect(),
        products,
        product_count,
        position,
        ingest: state.ingest.stats(),
    };
    Ok(HttpResponse::Ok().json(body))
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(stats);
}
