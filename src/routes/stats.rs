//! `GET /api/stats`: counts per status, total amount, and per product the
//! count and average price. Read from the running totals kept by triggers
//! (`order_stats` + pending deltas), never by scanning orders.

use std::collections::BTreeMap;

use actix_web::{get, web, HttpResponse};
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use serde_json::json;

use crate::domain::Status;
use crate::error::ApiError;
use crate::startup::AppState;

#[utoipa::path(get, path = "/api/stats", tag = "orders",
    responses((status = 200, description = "Order statistics", body = crate::routes::openapi::StatsDoc)))]
#[get("/api/stats")]
pub async fn stats(req: actix_web::HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    if crate::auth::principal(&req).customer.is_some() {
        return Err(ApiError::Forbidden("statistics cover every customer; a restricted token cannot read them".into()));
    }
    let client = state.pool.get().await?;
    let rows = client.query("SELECT status, product, n, amount, price_sum FROM order_stats_current", &[]).await?;
    let position: i64 = client.query_one("SELECT change_head()", &[]).await?.get(0);
    let mut by_status: BTreeMap<&str, (i64, Decimal)> =
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
    let mut products: Vec<_> = products
        .into_iter()
        .filter(|(_, (n, _))| *n > 0)
        .map(|(product, (n, price_sum))| {
            let avg = (price_sum / Decimal::from(n)).round_dp(2);
            json!({"product": product, "count": n, "avg_price": avg.to_f64()})
        })
        .collect();
    products.sort_by(|a, b| b["count"].as_i64().cmp(&a["count"].as_i64()));
    let body = json!({
        "total_orders": total,
        "total_amount": amount.round_dp(2).to_f64(),
        "by_status": by_status.iter().map(|(s, (n, a))| (s.to_string(), json!({"count": n, "amount": a.round_dp(2).to_f64()}))).collect::<serde_json::Map<_, _>>(),
        "products": products,
        "position": position,
        "ingest": state.ingest.stats(),
    });
    Ok(HttpResponse::Ok().json(body))
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(stats);
}
