//! The answer when no route takes a request: 405 `method_not_allowed` with
//! `Allow` when a route has the path but not the method, 204 with `Allow` to
//! `OPTIONS` on such a path, 404 `not_found` when no route has the path.
//!
//! The methods come from the routes themselves, not from a table. While the
//! router looks for a route, each method guard it checks (only those of
//! routes whose path pattern matched the request, the percent-decoded path
//! the router and `crate::auth::guard` use) notes its method on the request,
//! and an actix-web `Resource` with no route for a request answers an empty
//! 405 listing those methods in `Allow`, or without `Allow` when none was
//! noted. The catch-all resource here is registered after every route, so it
//! gets exactly the requests no route took, and turns that answer into ours.
//! That the method guards of app-level routes (the `#[get]`-style macros')
//! feed this `Allow` is actix-web's behaviour rather than its documented
//! promise: the test at the bottom pins it, so an upgrade that changes it
//! fails there.

use actix_web::body::BoxBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderMap, HeaderValue, ALLOW};
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, HttpResponse};

use crate::error::problem_response;

/// The catch-all's resource name; requests it answers are counted as
/// `unmatched` in the HTTP metrics.
pub const NAME: &str = "ordercast_fallback";

/// Registers the catch-all: call after every other `configure`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/{tail:.*}").name(NAME).wrap(from_fn(answer)));
}

/// The 404 for a path no route has.
pub fn not_found(req: &actix_web::HttpRequest) -> HttpResponse {
    problem_response(StatusCode::NOT_FOUND, "not_found", &format!("no route for {} {}", req.method(), req.path()))
}

async fn answer(req: ServiceRequest, next: Next<BoxBody>) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let res = next.call(req).await?;
    let allowed = allowed_methods(res.headers());
    let (req, _) = res.into_parts();
    if allowed.is_empty() {
        let resp = not_found(&req);
        return Ok(ServiceResponse::new(req, resp));
    }
    let allow = allowed.iter().map(Method::as_str).collect::<Vec<_>>().join(", ");
    let mut resp = if req.method() == Method::OPTIONS {
        HttpResponse::NoContent().finish()
    } else {
        problem_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            &format!("{} is not allowed on {}; allowed: {allow}", req.method(), req.path()),
        )
    };
    // Built from method names, which are HTTP tokens: always a valid value.
    if let Ok(v) = HeaderValue::from_str(&allow) {
        resp.headers_mut().insert(ALLOW, v);
    }
    Ok(ServiceResponse::new(req, resp))
}

/// The methods of the routes that have the path, from actix-web's `Allow`,
/// plus `OPTIONS` (answered here); deduplicated, in a fixed order. Empty
/// when no route has the path.
fn allowed_methods(headers: &HeaderMap) -> Vec<Method> {
    let mut methods: Vec<Method> = headers
        .get_all(ALLOW)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|m| m.trim().parse::<Method>().ok())
        .collect();
    if methods.is_empty() {
        return methods;
    }
    methods.push(Method::OPTIONS);
    methods.sort_by(|a, b| (rank(a), a.as_str()).cmp(&(rank(b), b.as_str())));
    methods.dedup();
    methods
}

fn rank(m: &Method) -> usize {
    const ORDER: [Method; 7] =
        [Method::GET, Method::HEAD, Method::POST, Method::PUT, Method::PATCH, Method::DELETE, Method::OPTIONS];
    ORDER.iter().position(|o| o == m).unwrap_or(ORDER.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(values: &[&'static str]) -> Vec<String> {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(ALLOW, HeaderValue::from_static(v));
        }
        allowed_methods(&h).iter().map(|m| m.to_string()).collect()
    }

    #[test]
    fn allowed_methods_are_deduplicated_ordered_and_include_options() {
        assert!(allow(&[]).is_empty());
        assert_eq!(allow(&["GET"]), ["GET", "OPTIONS"]);
        assert_eq!(allow(&["POST, GET"]), ["GET", "POST", "OPTIONS"]);
        assert_eq!(allow(&["DELETE, PUT, GET, PATCH, GET", "OPTIONS"]), ["GET", "PUT", "PATCH", "DELETE", "OPTIONS"]);
    }

    /// Pins the actix-web behaviour this module relies on: routes declared
    /// with the method macros leave their methods for the catch-all to list.
    #[actix_web::test]
    async fn the_catch_all_lists_the_methods_of_the_routes_that_have_the_path() {
        use actix_web::test::{call_service, init_service, read_body_json, TestRequest};

        #[actix_web::get("/things/{id}")]
        async fn get_thing() -> HttpResponse {
            HttpResponse::Ok().finish()
        }
        #[actix_web::delete("/things/{id}")]
        async fn delete_thing() -> HttpResponse {
            HttpResponse::NoContent().finish()
        }
        #[actix_web::post("/things")]
        async fn create_thing() -> HttpResponse {
            HttpResponse::Created().finish()
        }

        let app = init_service(
            actix_web::App::new().service(create_thing).service(get_thing).service(delete_thing).configure(configure),
        )
        .await;
        let call =
            |method: Method, uri: &str| call_service(&app, TestRequest::default().method(method).uri(uri).to_request());
        let res = call(Method::GET, "/things/1").await;
        assert_eq!(res.status(), StatusCode::OK);
        for (method, uri, allow) in [
            (Method::PUT, "/things/1", "GET, DELETE, OPTIONS"),
            (Method::GET, "/things", "POST, OPTIONS"),
            (Method::HEAD, "/things/1", "GET, DELETE, OPTIONS"),
        ] {
            let res = call(method.clone(), uri).await;
            assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED, "{method} {uri}");
            assert_eq!(res.headers().get(ALLOW).unwrap(), allow, "{method} {uri}");
            if method != Method::HEAD {
                let body: serde_json::Value = read_body_json(res).await;
                assert_eq!(body["code"], "method_not_allowed");
            }
        }
        let res = call(Method::OPTIONS, "/things").await;
        assert_eq!(
            (res.status(), res.headers().get(ALLOW).unwrap().to_str().unwrap()),
            (StatusCode::NO_CONTENT, "POST, OPTIONS")
        );
        for (method, uri) in [(Method::GET, "/nothing"), (Method::DELETE, "/things/1/more"), (Method::OPTIONS, "/")] {
            let res = call(method.clone(), uri).await;
            assert_eq!(res.status(), StatusCode::NOT_FOUND, "{method} {uri}");
            assert!(res.headers().get(ALLOW).is_none());
            let body: serde_json::Value = read_body_json(res).await;
            assert_eq!(body["code"], "not_found");
        }
    }
}
