//! The dashboard: files from `web/`, embedded in the binary at compile time
//! so one binary is the whole product.

use actix_web::http::header;
use actix_web::{route, web, HttpResponse};
use rust_embed::RustEmbed;

#[derive(RustEmbed)]
#[folder = "web/"]
struct Assets;

fn serve(path: &str) -> HttpResponse {
    match Assets::get(path) {
        Some(file) => {
            let mime = mime_guess::from_path(path).first_or_octet_stream();
            let cache = if path == "index.html" { "no-cache" } else { "public, max-age=300" };
            HttpResponse::Ok()
                .insert_header((header::CONTENT_TYPE, mime.as_ref()))
                .insert_header((header::CACHE_CONTROL, cache))
                .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
                .body(file.data.into_owned())
        }
        None => crate::error::problem_response(
            actix_web::http::StatusCode::NOT_FOUND,
            "not_found",
            &format!("no such file: /{path}"),
        ),
    }
}

#[route("/", method = "GET", method = "HEAD")]
async fn index() -> HttpResponse {
    serve("index.html")
}

async fn asset(path: web::Path<String>) -> HttpResponse {
    serve(&path)
}

/// Whether the dashboard has the file a request names (the path as the
/// router matches it: percent-decoded).
fn has_file(ctx: &actix_web::guard::GuardContext<'_>) -> bool {
    let url = actix_web::dev::Url::new(ctx.head().uri.clone());
    Assets::get(url.path().trim_start_matches('/')).is_some()
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(index).service(
        web::resource("/{path:.*\\.(js|css|png|svg|ico|map|txt|html|json)}")
            // Checked before the method, so a path with no file is not this
            // route's at all: 404 `not_found` from the catch-all whatever the
            // method (`DELETE /api/x.json` was a 405 naming GET), while a
            // file's path answers another method 405 with `Allow: GET`.
            .guard(actix_web::guard::fn_guard(has_file))
            .guard(actix_web::guard::Any(actix_web::guard::Get()).or(actix_web::guard::Head()))
            .to(asset),
    );
}
