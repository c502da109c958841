//! `/api/session`: signing a browser in and out, and who the caller is.
//!
//! `POST` checks a token and keeps it in the `ordercast_token` cookie,
//! `HttpOnly` (a script on the page, an injected one too, cannot read it),
//! `SameSite=Strict`, `Secure` over HTTPS, for as long as the token is valid
//! (30 days at most). The browser then sends it with every request,
//! WebSocket handshake and EventSource of this origin. `GET` says who the
//! token is: its name, scopes and customer, so the dashboard offers only
//! what the token may do. `DELETE` forgets the cookie.
//!
//! These routes need no scope: they authenticate the token themselves. As
//! every write, `POST` and `DELETE` are refused from another site (the auth
//! guard), so no page elsewhere can sign a browser in with its own token.

use actix_web::http::StatusCode;
use actix_web::{delete, get, post, web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use crate::auth::{AuthError, Principal};
use crate::domain::ValidationError;
use crate::error::{problem_response, ApiError};
use crate::startup::AppState;

pub const COOKIE: &str = "ordercast_token";
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
        "expires_at": p.expires_at.and_then(|t| chrono::DateTime::from_timestamp(t, 0)),
    })
}

/// Can `token` be a cookie's value as is (RFC 6265's cookie-octet)?
pub fn cookie_safe(token: &str) -> bool {
    !token.is_empty()
        && token.bytes().all(|b| matches!(b, 0x21 | 0x23..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E))
}

/// The `Set-Cookie` value keeping `token` (cookie-safe) for `max_age`
/// seconds; 0 removes the cookie.
fn set_cookie(req: &HttpRequest, token: &str, max_age: i64) -> (&'static str, String) {
    let secure = if req.connection_info().scheme() == "https" { "; Secure" } else { "" };
    ("Set-Cookie", format!("{COOKIE}={token}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"))
}

/// The token of a sign-in body: `{"token": "..."}` and nothing else.
fn token_of(body: &[u8]) -> Result<String, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}"), "malformed_json"))?;
    let fields = crate::domain::object(&value)?;
    crate::domain::reject_unknown(fields, &["token"])?;
    match fields.get("token") {
        Some(Value::String(t)) if !t.trim().is_empty() => Ok(t.trim().to_owned()),
        _ => Err(ValidationError::new("token", "must be the token as issued (a non-empty string)").into()),
    }
}

/// Signs the browser in: checks the token and keeps it in an `HttpOnly`
/// cookie.
#[utoipa::path(post, path = "/api/session", tag = "session",
    request_body(content = serde_json::Value, description = "{\"token\": \"...\"}: an API key or a JWT"),
    responses(
        (status = 200, description = "Signed in: Set-Cookie ordercast_token (HttpOnly, SameSite=Strict); the body as GET's", body = serde_json::Value),
        (status = 401, description = "The token is not valid (invalid_token) or has expired (token_expired)", body = crate::routes::openapi::ProblemDoc),
        (status = 409, description = "Authentication is off: this server takes no tokens (authentication_off)", body = crate::routes::openapi::ProblemDoc),
        (status = 422, description = "No token in the body, or one a cookie cannot carry (token_not_cookie_safe: send it as Authorization: Bearer)", body = crate::routes::openapi::ProblemDoc),
        (status = 429, description = "Too many sign-in attempts from this address (rate_limited)", body = crate::routes::openapi::ProblemDoc),
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
    // Each attempt counts against the write rate of the client's address,
    // so tokens cannot be guessed here faster than writes can be made.
    if let Some(peer) = req.peer_addr() {
        if let Err(retry) = state.write_limiter.check(&crate::limits::client_key(peer.ip()).to_string()) {
            return Ok(crate::auth::rate_limited("too many sign-in attempts", retry));
        }
    }
    let body = super::orders::read_body(&req, payload, BODY_LIMIT).await?;
    let token = token_of(&body)?;
    let principal = match auth.authenticate(&token) {
        Ok(p) => p,
        Err(e) => return Ok(crate::auth::refusal(&e)),
    };
    if !cookie_safe(&token) {
        return Err(ValidationError::with_code(
            "token",
            "token_not_cookie_safe",
            "this token holds characters a cookie cannot carry (spaces, quotes, commas, semicolons or \
             backslashes): send it as Authorization: Bearer instead",
        )
        .into());
    }
    let now = chrono::Utc::now().timestamp();
    let max_age = principal.expires_at.map_or(MAX_AGE_SECS, |exp| (exp - now).clamp(1, MAX_AGE_SECS));
    Ok(HttpResponse::Ok()
        .insert_header(("Cache-Control", "no-store"))
        .insert_header(set_cookie(&req, &token, max_age))
        .json(describe(&principal, true)))
}

/// Who the caller is: the token's name, scopes, customer and expiry.
#[utoipa::path(get, path = "/api/session", tag = "session",
    responses(
        (status = 200, description = "{authentication, name, scopes, customer, expires_at}; with authentication off, every scope", body = serde_json::Value),
        (status = 401, description = "No token (missing_token), or not a valid one (invalid_token, token_expired)", body = crate::routes::openapi::ProblemDoc),
    ))]
#[get("/api/session")]
pub async fn who(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let Some(auth) = &state.auth else {
        return HttpResponse::Ok().json(describe(&crate::auth::principal(&req), false));
    };
    let result = match crate::auth::token(&req) {
        None => Err(AuthError::Missing),
        Some(t) => auth.authenticate(&t),
    };
    match result {
        Ok(p) => HttpResponse::Ok().insert_header(("Cache-Control", "no-store")).json(describe(&p, true)),
        Err(e) => crate::auth::refusal(&e),
    }
}

/// Signs the browser out: the cookie is removed.
#[utoipa::path(delete, path = "/api/session", tag = "session",
    responses((status = 204, description = "Signed out: Set-Cookie removes ordercast_token")))]
#[delete("/api/session")]
pub async fn sign_out(req: HttpRequest) -> HttpResponse {
    HttpResponse::NoContent().insert_header(set_cookie(&req, "", 0)).finish()
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
        assert_eq!(token_of(br#"{"token": " abc12345 "}"#).unwrap(), "abc12345");
        for (body, code) in [
            (&br#"{"token": "#[..], "malformed_json"),
            (br#"["abc12345"]"#, "invalid_body"),
            (br#"{}"#, "validation_failed"),
            (br#"{"token": ""}"#, "validation_failed"),
            (br#"{"token": 12345678}"#, "validation_failed"),
            (br#"{"token": "abc12345", "remember": true}"#, "unknown_field"),
        ] {
            let e = token_of(body).unwrap_err();
            assert_eq!(e.code(), code, "{}", String::from_utf8_lossy(body));
        }
    }
}
