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
    products: Vec<ProductStats>,
    position: i64,
    ingest: serde_json::Value,
}

#[utoipa::path(get, path = "/api/stats", tag = "orders",
    responses(
        (status = 200, description = "Order statistics", body = crate::routes::openapi::StatsDoc),
        (status = 403, description = "A token confined to one customer (forbidden): the statistics cover every customer", body = crate::routes::openapi::ProblemDoc),
    ))]
#[route("/api/stats", method = "GET", method = "HEAD")]
pub async fn stats(req: actix_web::HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    if crate::auth::principal(&req).customer.is_some() {
        return Err(ApiError::Forbidden("statistics cover every customer; a restricted token cannot read them".into()));
    }
    let mut client = state.pool.get().await?;
    // One snapshot for the totals and their position (positions are visible
    // as a prefix): a change committed between two statements would be in
    // the position but not in the totals.
    let tx = crate::db::snapshot(&mut client).await?;
    let head = crate::changes::handed_head(&*tx).await?;
    let position = head.pos;
    let rows = tx.query("SELECT status, product, n, amount, price_sum FROM order_stats_current", &[]).await?;
    tx.commit().await?;
    state.hub.note_handed_out(position, head.committed_micros);
    let mut by_status: BTreeMap<&'static str, (i64, Decimal)> =
        Status::ALL.iter().map(|s| (s.as_str(), (0, Decimal::ZERO))).collect();
    let mut products: BTreeMap<String, (i64, Decimal)> = BTreeMap::new();
    let (mut total, mut amount) = (0i64, Decimal::ZERO);
    for r in &rows {
        let status: String = r.get(0);
        let product: String = r.get(1);
        let n: i64 = r.get(2);
        let amt: Decimal = r.get(3);
        let price_sum: Decimal = r.get(4);
        if let Some(e) = by_status.get_mut(status.as_str()) {
            e.0 += n;
            e.1 += amt;
        }
        let p = products.entry(product).or_default();
        p.0 += n;
        p.1 += price_sum;
        total += n;
        amount += amt;
    }
    let mut products: Vec<ProductStats> = products
        .into_iter()
        .filter(|(_, (n, _))| *n > 0)
        .map(|(product, (n, price_sum))| ProductStats {
            product,
            count: n,
            avg_price: Amount(price_sum / Decimal::from(n)),
        })
        .collect();
    products.sort_by_key(|p| std::cmp::Reverse(p.count));
    let body = Stats {
        total_orders: total,
        total_amount: Amount(amount),
        by_status: by_status
            .into_iter()
            .map(|(s, (count, a))| (s, StatusTotals { count, amount: Amount(a) }))
            .collect(),
        products,
        position,
        ingest: state.ingest.stats(),
    };
    Ok(HttpResponse::Ok().json(body))
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(stats);
}
