//! `/api/session`: signing a browser in and out, and who the caller is.
//!
//! `POST` checks a token and keeps it in a cookie, `HttpOnly` (a script on
//! the page, an injected one too, cannot read it) and `SameSite=Strict`, for
//! as long as the token is valid (30 days at most). Over HTTPS the cookie is
//! `Secure` and named `__Host-ordercast_token`, which only this host can set
//! (a sibling domain could plant an `ordercast_token` cookie); over plain
//! HTTP it is `ordercast_token`. The browser then sends it with every request,
//! WebSocket handshake and EventSource of this origin. `GET` says who the
//! token is: its name, scopes and customer, so the dashboard offers only
//! what the token may do. `DELETE` forgets the cookie.
//!
//! These routes need no scope: they authenticate the token themselves. As
//! every write, `POST` and `DELETE` are refused from another site (the auth
//! guard), so no page elsewhere can sign a browser in with its own token.

use actix_web::http::StatusCode;
use actix_web::{delete, post, route, web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use crate::auth::{AuthError, Principal, Scope};
use crate::domain::ValidationError;
use crate::error::{problem_response, ApiError};
use crate::startup::AppState;

/// The cookies a token is read from, in this order (`auth::token`).
pub const COOKIES: [&str; 2] = [SECURE_COOKIE, COOKIE];
pub const SECURE_COOKIE: &str = "__Host-ordercast_token";
const COOKIE: &str = "ordercast_token";
/// The longest cookie browsers keep (RFC 6265 asks for at least 4,096
/// bytes of name and value; they keep no more).
const COOKIE_MAX: usize = 4096;
/// How long a cookie keeps a token that does not expire (an API key).
const MAX_AGE_SECS: i64 = 30 * 24 * 3600;
/// A sign-in body is a token and its JSON: far below this.
const BODY_LIMIT: usize = 16 * 1024;

/// What the session answers say about a caller.
fn describe(p: &Principal, authentication: bool) -> Value {
    json!({
        "authentication": authentication,
        "name": p.name,
        "scopes": p.scope_names(),
        "customer": p.customer,
        "customer_name": p.customer_name,
        "expires_at": p.expires_at.and_then(|t| chrono::DateTime::from_timestamp(t, 0)),
    })
}

/// Can `token` be a cookie's value as is (RFC 6265's cookie-octet)?
pub fn cookie_safe(token: &str) -> bool {
    !token.is_empty()
        && token.bytes().all(|b| matches!(b, 0x21 | 0x23..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E))
}

/// The `Set-Cookie` value keeping `token` (cookie-safe) in `name` for
/// `max_age` seconds; 0 removes the cookie.
fn set_cookie(name: &str, secure: bool, token: &str, max_age: i64) -> (&'static str, String) {
    let secure = if secure { "; Secure" } else { "" };
    ("Set-Cookie", format!("{name}={token}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"))
}

/// A 200 that keeps `token` (checked, cookie-safe) in the cookie for as
/// long as it is valid: over HTTPS in the `__Host-` cookie, and a plain one
/// is removed; over HTTP in the plain one.
fn keep(https: bool, token: &str, principal: &Principal) -> actix_web::HttpResponseBuilder {
    let now = chrono::Utc::now().timestamp();
    let max_age = principal.expires_at.map_or(MAX_AGE_SECS, |exp| (exp - now).clamp(1, MAX_AGE_SECS));
    let mut resp = HttpResponse::Ok();
    resp.insert_header(("Cache-Control", "no-store"));
    if https {
        resp.append_header(set_cookie(SECURE_COOKIE, true, token, max_age));
        resp.append_header(set_cookie(COOKIE, true, "", 0));
    } else {
        resp.append_header(set_cookie(COOKIE, false, token, max_age));
    }
    resp
}

/// A sign-in body: `{"token": "...", "scope": "read"}`, the scope optional:
/// one the token must hold to be kept.
fn token_of(body: &[u8]) -> Result<(String, Option<Scope>), ApiError> {
    let value = super::orders::parse_body(body)?;
    let fields = crate::domain::object(&value)?;
    crate::domain::reject_unknown(fields, &["token", "scope"])?;
    let scope = match fields.get("scope") {
        None | Some(Value::Null) => None,
        other => match other.and_then(Value::as_str).and_then(Scope::parse) {
            Some(scope) => Some(scope),
            None => return Err(ValidationError::new("scope", "must be read, write or admin").into()),
        },
    };
    match fields.get("token") {
        Some(Value::String(t)) if !t.trim().is_empty() => Ok((t.trim().to_owned(), scope)),
        _ => Err(ValidationError::new("token", "must be the token as issued (a non-empty string)").into()),
    }
}

/// Signs the browser in: checks the token and keeps it in an `HttpOnly`
/// cookie.
#[utoipa::path(post, path = "/api/session", tag = "session",
    request_body(content = serde_json::Value, description = "{\"token\": \"...\", \"scope\": \"read\"}: an API key or a JWT, and optionally a scope it must hold to be kept"),
    responses(
        (status = 200, description = "Signed in: Set-Cookie __Host-ordercast_token over HTTPS (Secure), ordercast_token over HTTP, HttpOnly, SameSite=Strict; the body as GET's", body = serde_json::Value),
        (status = 401, description = "The token is not valid (invalid_token) or has expired (token_expired)", body = crate::routes::openapi::ProblemDoc),
        (status = 403, description = "The token lacks the scope asked for (insufficient_scope); nothing is kept", body = crate::routes::openapi::ProblemDoc),
        (status = 409, description = "Authentication is off: this server takes no tokens (authentication_off)", body = crate::routes::openapi::ProblemDoc),
        (status = 422, description = "No token in the body, or one a cookie cannot carry (token_not_cookie_safe: characters or length; send it as Authorization: Bearer)", body = crate::routes::openapi::ProblemDoc),
        (status = 429, description = "Too many invalid tokens from this address (rate_limited, with Retry-After)", body = crate::routes::openapi::ProblemDoc),
    ))]
#[post("/api/session")]
pub async fn sign_in(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let Some(auth) = &state.auth else {
        return Ok(problem_response(
            StatusCode::CONFLICT,
            "authentication_off",
            "authentication is off on this server: it takes no tokens, and every request may do everything",
        ));
    };
    let body = super::orders::read_body(&req, payload, BODY_LIMIT).await?;
    let (token, scope) = token_of(&body)?;
    let principal = match auth.check(req.peer_addr().map(|a| a.ip()), &token) {
        Ok(p) => p,
        Err(e) => return Ok(crate::auth::refusal(&e)),
    };
    if let Some(scope) = scope.filter(|s| !principal.has(*s)) {
        return Ok(crate::auth::refusal(&AuthError::Forbidden(scope.as_str())));
    }
    let https = crate::auth::over_https(&req);
    let name = if https { SECURE_COOKIE } else { COOKIE };
    let problem = if !cookie_safe(&token) {
        Some("holds characters a cookie cannot carry (spaces, quotes, commas, semicolons or backslashes)")
    } else if name.len() + 1 + token.len() > COOKIE_MAX {
        Some("is longer than browsers keep in a cookie (4,096 bytes with its name)")
    } else {
        None
    };
    if let Some(problem) = problem {
        let message = format!("this token {problem}: send it as Authorization: Bearer instead");
        return Err(ValidationError::with_code("token", "token_not_cookie_safe", message).into());
    }
    Ok(keep(https, &token, &principal).json(describe(&principal, true)))
}

/// Who the caller is: the token's name, scopes, customer and expiry.
#[utoipa::path(get, path = "/api/session", tag = "session",
    responses(
        (status = 200, description = "{authentication, name, scopes, customer (lowercased, as orders are matched), customer_name (as the token names it), expires_at}; with authentication off, every scope. Sets no cookie", body = serde_json::Value),
        (status = 401, description = "No token (missing_token), or not a valid one (invalid_token, token_expired)", body = crate::routes::openapi::ProblemDoc),
        (status = 429, description = "Too many invalid tokens from this address (rate_limited, with Retry-After)", body = crate::routes::openapi::ProblemDoc),
    ))]
#[route("/api/session", method = "GET", method = "HEAD")]
pub async fn who(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let Some(auth) = &state.auth else {
        return HttpResponse::Ok().json(describe(&crate::auth::principal(&req), false));
    };
    let Some(token) = crate::auth::token(&req) else {
        return crate::auth::refusal(&AuthError::Missing);
    };
    match auth.check(req.peer_addr().map(|a| a.ip()), &token) {
        Ok(p) => HttpResponse::Ok().insert_header(("Cache-Control", "no-store")).json(describe(&p, true)),
        Err(e) => crate::auth::refusal(&e),
    }
}

/// Signs the browser out: the cookie is removed.
#[utoipa::path(delete, path = "/api/session", tag = "session",
    responses((status = 204, description = "Signed out: Set-Cookie removes the cookie (both names over HTTPS)")))]
#[delete("/api/session")]
pub async fn sign_out(req: HttpRequest) -> HttpResponse {
    let https = crate::auth::over_https(&req);
    let mut resp = HttpResponse::NoContent();
    resp.insert_header(("Cache-Control", "no-store"));
    if https {
        resp.append_header(set_cookie(SECURE_COOKIE, true, "", 0));
    }
    resp.append_header(set_cookie(COOKIE, https, "", 0)).finish()
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(sign_in).service(who).service(sign_out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_values_are_cookie_octets() {
        assert!(cookie_safe("viewer-secret-1"));
        assert!(cookie_safe("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln_-"));
        for bad in ["", "has space", "quo\"te", "com,ma", "semi;colon", "back\\slash", "tab\t", "caf\u{e9}"] {
            assert!(!cookie_safe(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_sign_in_body_is_a_token_and_nothing_else() {
        assert_eq!(token_of(br#"{"token": " abc12345 "}"#).unwrap(), ("abc12345".into(), None));
        assert_eq!(token_of(br#"{"token": "abc12345", "scope": "write"}"#).unwrap().1, Some(Scope::Write));
        for (body, code) in [
            (&br#"{"token": "#[..], "malformed_json"),
            (br#"["abc12345"]"#, "invalid_body"),
            (br#"{}"#, "validation_failed"),
            (br#"{"token": ""}"#, "validation_failed"),
            (br#"{"token": 12345678}"#, "validation_failed"),
            (br#"{"token": "abc12345", "remember": true}"#, "unknown_field"),
            (br#"{"token": "abc12345", "scope": "root"}"#, "validation_failed"),
        ] {
            let e = token_of(body).unwrap_err();
            assert_eq!(e.code(), code, "{}", String::from_utf8_lossy(body));
        }
    }
}
