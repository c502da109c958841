//! Who may see and change what.
//!
//! Tokens carry scopes — `read` (streams and GETs), `write` (REST changes),
//! `admin` (dead letters, metrics) — and optionally a row restriction to one
//! customer, enforced by the REST queries and by the hub's filters. Tokens are
//! static API keys from configuration and/or HS256 JWTs signed with a
//! configured secret (`exp` required and checked).
//!
//! A token is read from `Authorization: Bearer`, the `ordercast_token`
//! cookie, or the `access_token` query parameter (EventSource cannot set
//! headers; the access log never prints query strings). With no keys and no
//! JWT secret configured, authentication is off (local development); the
//! server then refuses to listen on a non-loopback address unless told
//! `--insecure`.

use std::collections::HashMap;

use actix_web::dev::ServiceRequest;
use actix_web::http::Method;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Read,
    Write,
    Admin,
}

impl Scope {
    fn bit(self) -> u8 {
        match self {
            Scope::Read => 1,
            Scope::Write => 2,
            Scope::Admin => 4,
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "read" => Some(Scope::Read),
            "write" => Some(Scope::Write),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }
}

/// The authenticated caller of a request.
#[derive(Clone, PartialEq, Eq)]
pub struct Principal {
    /// Named in history as `api:<name>`: an API key's name, `jwt:<sub>` for
    /// a JWT, the client's address without authentication.
    pub name: String,
    scopes: u8,
    /// Row restriction: only this customer's orders (lowercased).
    pub customer: Option<String>,
    /// That customer as the token names it (trimmed, case kept): the name a
    /// dashboard gives the orders it creates for it.
    pub customer_name: Option<String>,
    /// Unix seconds after which the token is no longer valid (JWTs).
    pub expires_at: Option<i64>,
}

// Keep secrets out of logs: a principal prints its name and scopes only.
impl std::fmt::Debug for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Principal").field("name", &self.name).field("scopes", &self.scopes).finish()
    }
}

impl Principal {
    /// Everyone, when authentication is off.
    pub fn anonymous(name: String) -> Principal {
        Principal { name, scopes: 7, customer: None, customer_name: None, expires_at: None }
    }

    pub fn has(&self, scope: Scope) -> bool {
        self.scopes & scope.bit() != 0
    }

    pub fn expired(&self) -> bool {
        expired(self.expires_at)
    }

    /// The scopes held, by name, narrowest first.
    pub fn scope_names(&self) -> Vec<&'static str> {
        [Scope::Read, Scope::Write, Scope::Admin].into_iter().filter(|s| self.has(*s)).map(Scope::as_str).collect()
    }
}

/// Whether a token expiring at `expires_at` (Unix seconds; None: never)
/// has expired.
pub fn expired(expires_at: Option<i64>) -> bool {
    expires_at.is_some_and(|t| t <= chrono::Utc::now().timestamp())
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing token: send Authorization: Bearer <token>")]
    Missing,
    #[error("invalid token")]
    Invalid,
    #[error("token expired")]
    Expired,
    #[error("this token lacks the {0} scope")]
    Forbidden(&'static str),
    /// This address failed too many token checks: retry in this many seconds.
    #[error("too many invalid tokens from this address; retry in {0} s")]
    Throttled(u64),
}

impl AuthError {
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing_token",
            AuthError::Invalid => "invalid_token",
            AuthError::Expired => "token_expired",
            AuthError::Forbidden(_) => "insufficient_scope",
            AuthError::Throttled(_) => "rate_limited",
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            AuthError::Forbidden(_) => 403,
            AuthError::Throttled(_) => 429,
            _ => 401,
        }
    }

    /// WebSocket close code for the same failure.
    pub fn close_code(&self) -> u16 {
        match self {
            AuthError::Forbidden(_) => 4003,
            // Try Again Later (RFC 6455's registry).
            AuthError::Throttled(_) => 1013,
            _ => 4001,
        }
    }
}

/// Configured credentials.
pub struct Auth {
    /// SHA-256 of the secret -> principal. A token is looked up by its
    /// digest, so the time the lookup takes tells nothing about how much of
    /// a secret a guess got right.
    keys: HashMap<[u8; 32], Principal>,
    jwt: Option<DecodingKey>,
    /// A JWT's `aud` must hold this one when set (not checked otherwise).
    audience: Option<String>,
    /// A JWT's `iss` must be this one when set.
    issuer: Option<String>,
    /// Invalid tokens per client address (see [`Auth::check`]).
    failures: crate::limits::RateLimiter,
}

/// Invalid tokens one address may send at once, and then per second, unless
/// configured otherwise: far more than typing mistakes need, far too few to
/// guess a key.
const FAILURE_BURST: f64 = 50.0;
const FAILURE_RATE: f64 = 5.0;

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: i64,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    scopes: Option<Vec<String>>,
    #[serde(default)]
    customer: Option<String>,
}

fn parse_scopes(list: impl IntoIterator<Item = impl AsRef<str>>) -> Result<u8, String> {
    let mut bits = 0;
    for s in list {
        let s = s.as_ref().trim();
        if s.is_empty() {
            continue;
        }
        bits |= Scope::parse(s).ok_or_else(|| format!("unknown scope {s:?} (read, write, admin)"))?.bit();
    }
    Ok(bits)
}

impl Auth {
    /// `None` when nothing is configured (authentication off).
    ///
    /// `api_keys`: comma-separated `name:secret:scope+scope[:customer=Name]`,
    /// e.g. `dashboard:s3cret:read+write,ops:t0ken:read+write+admin`.
    pub fn from_config(api_keys: Option<&str>, jwt_secret: Option<&str>) -> anyhow::Result<Option<Auth>> {
        let mut keys = HashMap::new();
        for spec in api_keys.unwrap_or("").split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let parts: Vec<&str> = spec.split(':').collect();
            let (name, secret, scopes) = match parts.as_slice() {
                [name, secret, scopes, ..] => (*name, *secret, *scopes),
                _ => anyhow::bail!("an API key must look like name:secret:read+write[:customer=Name]"),
            };
            if name.is_empty() || secret.len() < 8 {
                anyhow::bail!("API key {name:?}: the name must be set and the secret at least 8 characters");
            }
            let scopes = parse_scopes(scopes.split('+')).map_err(|e| anyhow::anyhow!("API key {name:?}: {e}"))?;
            let mut customer_name = None;
            for extra in &parts[3..] {
                match extra.split_once('=') {
                    Some(("customer", c)) if !c.trim().is_empty() => customer_name = Some(c.trim().to_string()),
                    _ => anyhow::bail!("API key {name:?}: unknown option {extra:?} (customer=Name)"),
                }
            }
            let customer = customer_name.as_deref().map(crate::domain::fold_case);
            let principal = Principal { name: name.to_string(), scopes, customer, customer_name, expires_at: None };
            if let Some(other) = keys.insert(openssl::sha::sha256(secret.as_bytes()), principal) {
                anyhow::bail!("API keys {:?} and {name:?} have the same secret: each key needs its own", other.name);
            }
        }
        let jwt = match jwt_secret.map(str::trim).filter(|s| !s.is_empty()) {
            Some(s) if s.len() < 16 => anyhow::bail!("the JWT secret must be at least 16 bytes"),
            Some(s) => Some(DecodingKey::from_secret(s.as_bytes())),
            None => None,
        };
        let failures = crate::limits::RateLimiter::new(FAILURE_RATE, FAILURE_BURST);
        Ok((!keys.is_empty() || jwt.is_some()).then_some(Auth { keys, jwt, audience: None, issuer: None, failures }))
    }

    /// The same, checking JWTs' `aud` (it must hold `audience`) and `iss`
    /// (it must be `issuer`) when they are set. Without an audience, `aud`
    /// is not checked: an identity provider's tokens carry one.
    pub fn expecting(self, audience: Option<&str>, issuer: Option<&str>) -> Auth {
        let set = |v: Option<&str>| v.map(str::trim).filter(|v| !v.is_empty()).map(str::to_owned);
        Auth { audience: set(audience), issuer: set(issuer), ..self }
    }

    /// The same, throttling `rate` invalid tokens per second per address
    /// after a `burst` (0: no throttle).
    pub fn throttling(self, rate: f64, burst: f64) -> Auth {
        Auth { failures: crate::limits::RateLimiter::new(rate, burst), ..self }
    }

    /// [`Auth::authenticate`] for a request from `client`: each invalid
    /// token counts against the client's address (an IPv6 client's /64),
    /// and an address over the burst of invalid tokens, then the rate per
    /// second ([`Auth::throttling`]), has none checked until it is back
    /// under (`Throttled`, 429), a valid one neither: guessing a key gets no
    /// answer faster than that, on any route that checks tokens.
    pub fn check(&self, client: Option<std::net::IpAddr>, token: &str) -> Result<Principal, AuthError> {
        let key = client.map(|ip| crate::limits::client_key(ip).to_string());
        if let Some(retry) = key.as_deref().and_then(|k| self.failures.blocked(k)) {
            return Err(AuthError::Throttled(retry));
        }
        let result = self.authenticate(token);
        if let (Err(AuthError::Invalid), Some(k)) = (&result, &key) {
            let _ = self.failures.check(k);
        }
        result
    }

    pub fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        if let Some(p) = self.keys.get(&openssl::sha::sha256(token.as_bytes())) {
            return Ok(p.clone());
        }
        let Some(key) = &self.jwt else { return Err(AuthError::Invalid) };
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        // A token is not valid before its `nbf` (jsonwebtoken skips it by default).
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        match &self.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
            _ => AuthError::Invalid,
        })?;
        let c = data.claims;
        // Scopes of other services (`openid`, `profile`) are not ordercast's:
        // only its own count. A token with none of them has none.
        let ours = |list: &mut dyn Iterator<Item = &str>| {
            list.filter_map(|s| Scope::parse(s.trim())).fold(0, |b, s| b | s.bit())
        };
        let scopes = match (c.scopes, c.scope) {
            (Some(list), _) => ours(&mut list.iter().map(String::as_str)),
            (None, Some(s)) => ours(&mut s.split(' ')),
            (None, None) => Scope::Read.bit(),
        };
        // A `customer` claim restricts the token; a blank one is a mistake
        // in the issuer, never "no restriction" (API keys refuse it too).
        let customer_name = match c.customer.as_deref().map(str::trim) {
            None => None,
            Some("") => return Err(AuthError::Invalid),
            Some(name) => Some(name.to_string()),
        };
        let customer = customer_name.as_deref().map(crate::domain::fold_case);
        // Both go to the database (the actor of every write, the customer of
        // every read), which refuses a NUL in text: a token carrying one
        // could do nothing but fail.
        if c.sub.contains('\0') || customer.as_deref().is_some_and(|c| c.contains('\0')) {
            return Err(AuthError::Invalid);
        }
        // `jwt:` keeps a token's subject apart from an API key of the same
        // name (a key's name holds no `:`): in history and in the write rate.
        let name = format!("jwt:{}", c.sub);
        Ok(Principal { name, scopes, customer, customer_name, expires_at: Some(c.exp) })
    }
}

/// The token of a request, from the header, the cookie or (a GET's) the query. The
/// scheme is matched without regard to case (RFC 9110); an `Authorization`
/// of another scheme (a proxy's Basic credentials, say) is not ordercast's,
/// and the cookie or the query may still carry the token.
pub fn token(req: &actix_web::HttpRequest) -> Option<String> {
    if let Some(v) = req.headers().get(actix_web::http::header::AUTHORIZATION).and_then(|h| h.to_str().ok()) {
        if let Some((scheme, token)) = v.trim().split_once(' ') {
            if scheme.eq_ignore_ascii_case("bearer") {
                return Some(token.trim().to_string());
            }
        }
    }
    if let Some(cookies) = req.headers().get(actix_web::http::header::COOKIE).and_then(|c| c.to_str().ok()) {
        // The cookie `POST /api/session` sets over HTTPS, which no other
        // site can set; the plain one only over HTTP: over HTTPS it could
        // have been planted by a sibling domain (`Domain=example.com`).
        let names: &[&str] =
            if over_https(req) { &[crate::routes::session::SECURE_COOKIE] } else { &crate::routes::session::COOKIES };
        for name in names {
            if let Some(v) = cookies.split(';').find_map(|c| c.trim().strip_prefix(name)?.strip_prefix('=')) {
                return Some(v.to_string());
            }
        }
    }
    // In the URL only for reads: what cannot send a header (EventSource, a
    // browser's WebSocket handshake) sends GETs. A write's URL would carry
    // the token into proxies' logs and browser history for nothing.
    if !matches!(*req.method(), actix_web::http::Method::GET | actix_web::http::Method::HEAD) {
        return None;
    }
    form_urlencoded::parse(req.query_string().as_bytes())
        .find(|(k, _)| k == "access_token")
        .map(|(_, v)| v.into_owned())
}

/// Did the browser reach the server over HTTPS? Behind a proxy that ends
/// TLS, as the proxy says (`X-Forwarded-Proto`, `Forwarded`), or as the
/// request's `Origin` says (browsers send it with every POST and DELETE, and
/// with WebSocket handshakes).
pub fn over_https(req: &actix_web::HttpRequest) -> bool {
    req.connection_info().scheme().eq_ignore_ascii_case("https")
        || req
            .headers()
            .get(actix_web::http::header::ORIGIN)
            .and_then(|o| o.to_str().ok())
            .is_some_and(|o| o.split_once("://").is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("https")))
}

/// Which scope a request needs; `None`: public (health, docs, the
/// dashboard's files).
pub fn required_scope(method: &Method, path: &str) -> Option<Scope> {
    if path == "/metrics" || path.starts_with("/api/dlq") {
        return Some(Scope::Admin);
    }
    // `/api/session` authenticates the token itself: signing in needs none,
    // and signing out or asking who one is no particular scope.
    if path == "/api/health"
        || path == "/api/health/live"
        || path == "/api/openapi.json"
        || path == "/api/session"
        || !(path.starts_with("/api/") || path == "/ws")
    {
        return None;
    }
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        Some(Scope::Read)
    } else {
        Some(Scope::Write)
    }
}

/// The caller of a request: set by [`guard`] for scoped routes; anonymous
/// (named by IP) otherwise.
pub fn principal(req: &actix_web::HttpRequest) -> Principal {
    use actix_web::HttpMessage;
    req.extensions().get::<Principal>().cloned().unwrap_or_else(|| Principal::anonymous(peer_ip(req)))
}

/// Refuses a token confined to one customer (403 `forbidden`) a route that
/// covers every customer; `covers` says what the route holds.
pub fn unconfined(req: &actix_web::HttpRequest, covers: &str) -> Result<(), crate::error::ApiError> {
    match principal(req).customer {
        Some(_) => Err(crate::error::ApiError::Forbidden(format!("{covers}; a restricted token cannot read them"))),
        None => Ok(()),
    }
}

/// What the write rate is counted under: the token; without authentication
/// the client's address (an IPv6 host as its /64, as for connections).
fn rate_key(
    authenticated: bool,
    peer: Option<std::net::SocketAddr>,
    principal: &Principal,
) -> std::borrow::Cow<'_, str> {
    match peer {
        Some(peer) if !authenticated => crate::limits::client_key(peer.ip()).to_string().into(),
        _ => principal.name.as_str().into(),
    }
}

fn peer_ip(req: &actix_web::HttpRequest) -> String {
    req.peer_addr().map(|a| a.ip().to_string()).unwrap_or_else(|| "unknown".into())
}

/// Is the request's `Origin` acceptable for a WebSocket or a write? Non-browser clients
/// send none; browsers must be same-origin or on the allow-list, so another
/// site cannot open a stream with the user's cookie.
pub fn origin_allowed(req: &actix_web::HttpRequest, allowed: &[String]) -> bool {
    let Some(origin) = req.headers().get(actix_web::http::header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else { return false };
    if allowed.iter().any(|a| a.trim_end_matches('/') == origin) {
        return true;
    }
    let host = req.headers().get(actix_web::http::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    origin.split_once("://").is_some_and(|(_, rest)| rest == host)
}

/// Why a request that changes something is refused as coming from another
/// site (cross-site request forgery), if it is. A browser sends `Origin` with
/// every POST, PUT, PATCH and DELETE (a plain HTML form too), so a write from
/// a page that is neither same-origin nor in `allowed` is refused; without
/// `Origin`, a browser's `Sec-Fetch-Site: cross-site` is refused as well.
/// Clients that send neither (curl, servers) are not browsers and pass.
pub fn cross_site_write(req: &actix_web::HttpRequest, allowed: &[String]) -> Option<&'static str> {
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return None;
    }
    if req.headers().contains_key(actix_web::http::header::ORIGIN) {
        return (!origin_allowed(req, allowed))
            .then_some("this origin may not make changes: only the server's own origin and ORDERCAST_ALLOWED_ORIGINS");
    }
    let fetch_site = req.headers().get("sec-fetch-site").and_then(|v| v.to_str().ok()).unwrap_or("");
    fetch_site
        .trim()
        .eq_ignore_ascii_case("cross-site")
        .then_some("a cross-site request may not make changes (Sec-Fetch-Site: cross-site)")
}

/// Why a request is refused as possibly a DNS-rebinding attack, if it is.
/// With authentication off (loopback only, no `--insecure`), a web page on
/// any domain that resolves to 127.0.0.1 would be "same-origin" with the
/// server (its `Origin` and `Host` both name that domain) and could read and
/// change orders. So such a server answers only requests addressed to a
/// loopback name or address, or to a host of `ORDERCAST_ALLOWED_ORIGINS`.
pub fn rebinding_host(req: &actix_web::HttpRequest, allowed: &[String]) -> Option<&'static str> {
    // The Host header itself (the authority in HTTP/2), never
    // `connection_info()`: that prefers `X-Forwarded-Host` and `Forwarded`,
    // which the page's own script may set on a same-origin request.
    let authority = match req.headers().get(actix_web::http::header::HOST) {
        Some(h) => h.to_str().unwrap_or_default(),
        None => req.uri().authority().map_or("", |a| a.as_str()),
    };
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let loopback = host == "localhost"
        || host.ends_with(".localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    let listed = allowed.iter().any(|a| {
        let rest = a.split_once("://").map_or(a.as_str(), |(_, r)| r).trim_end_matches('/');
        rest.eq_ignore_ascii_case(authority)
            || rest.rsplit_once(':').map_or(rest, |(h, _)| h).eq_ignore_ascii_case(&host)
    });
    (!loopback && !listed).then_some(
        "with authentication off, ordercast answers only requests addressed to localhost or a loopback address \
         (configure tokens, or list the host in ORDERCAST_ALLOWED_ORIGINS)",
    )
}

/// Middleware: refuses cross-site writes, authenticates, checks the route's scope and the write rate,
/// and records the principal for the handlers. A failed WebSocket request is
/// let through with the error attached, so it can be upgraded and closed
/// with a code and reason a browser can see.
pub async fn guard(
    req: ServiceRequest,
    next: actix_web::middleware::Next<actix_web::body::BoxBody>,
) -> Result<actix_web::dev::ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    use actix_web::HttpMessage;
    let Some(state) = req.app_data::<actix_web::web::Data<crate::startup::AppState>>().cloned() else {
        return next.call(req).await;
    };
    if state.auth.is_none() && !state.settings.insecure {
        if let Some(why) = rebinding_host(req.request(), &state.settings.allowed_origins) {
            let resp = crate::error::problem_response(actix_web::http::StatusCode::FORBIDDEN, "host_not_allowed", why);
            return Ok(req.into_response(resp));
        }
    }
    if let Some(why) = cross_site_write(req.request(), &state.settings.allowed_origins) {
        let resp = crate::error::problem_response(actix_web::http::StatusCode::FORBIDDEN, "origin_not_allowed", why);
        return Ok(req.into_response(resp));
    }
    // The path the router matches: percent-decoded (`/%61pi/orders` is
    // routed to `/api/orders`), unlike `req.path()`, the raw request target.
    let routed = req.match_info().as_str().to_owned();
    let Some(scope) = required_scope(req.method(), &routed) else {
        return next.call(req).await;
    };
    let result = match &state.auth {
        None => Ok(Principal::anonymous(peer_ip(req.request()))),
        Some(auth) => match token(req.request()) {
            None => Err(AuthError::Missing),
            Some(t) => auth.check(req.peer_addr().map(|a| a.ip()), &t),
        }
        .and_then(|p| if p.has(scope) { Ok(p) } else { Err(AuthError::Forbidden(scope.as_str())) }),
    };
    match result {
        Ok(p) => {
            if scope == Scope::Write {
                let key = rate_key(state.auth.is_some(), req.peer_addr(), &p);
                if let Err(retry) = state.write_limiter.check(&key) {
                    return Ok(req.into_response(rate_limited("too many writes", retry)));
                }
            }
            req.extensions_mut().insert(p);
            next.call(req).await
        }
        // Only a handshake (a GET with the upgrade headers the handler
        // accepts) is upgraded to be refused with a close code; any other
        // request, a plain GET too, is refused like every protected request.
        Err(e) if routed == "/ws" && actix_http::ws::verify_handshake(req.head()).is_ok() => {
            req.extensions_mut().insert(e);
            next.call(req).await
        }
        Err(e) => Ok(req.into_response(refusal(&e))),
    }
}

/// The answer to a request refused for its token: 401 (with
/// `WWW-Authenticate: Bearer`) or 403, with the reason's code.
pub fn refusal(e: &AuthError) -> actix_web::HttpResponse {
    let status = actix_web::http::StatusCode::from_u16(e.status()).unwrap_or(actix_web::http::StatusCode::UNAUTHORIZED);
    let mut resp = crate::error::problem_response(status, e.code(), &e.to_string());
    if e.status() == 401 {
        resp.headers_mut().insert(
            actix_web::http::header::WWW_AUTHENTICATE,
            actix_web::http::header::HeaderValue::from_static("Bearer"),
        );
    }
    if let AuthError::Throttled(retry) = e {
        resp.headers_mut()
            .insert(actix_web::http::header::RETRY_AFTER, actix_web::http::header::HeaderValue::from(*retry));
    }
    resp
}

/// 429 `rate_limited`: `what` (too many writes, say), retry in `retry` s.
pub fn rate_limited(what: &str, retry: u64) -> actix_web::HttpResponse {
    let mut resp = crate::error::problem_response(
        actix_web::http::StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        &format!("{what}; retry in {retry} s"),
    );
    resp.headers_mut().insert(actix_web::http::header::RETRY_AFTER, actix_web::http::header::HeaderValue::from(retry));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_counted_per_token_or_without_one_per_client_address() {
        let peer = |s: &str| Some(s.parse::<std::net::SocketAddr>().unwrap());
        let anonymous = Principal::anonymous("2001:db8::1".into());
        assert_eq!(rate_key(false, peer("[2001:db8:0:0:1::7]:5000"), &anonymous), "2001:db8::");
        assert_eq!(rate_key(false, peer("[2001:db8:0:0:ffff::9]:6000"), &anonymous), "2001:db8::");
        assert_eq!(rate_key(false, peer("192.0.2.7:5000"), &anonymous), "192.0.2.7");
        let token = Principal { name: "ops".into(), scopes: 7, customer: None, customer_name: None, expires_at: None };
        assert_eq!(rate_key(true, peer("192.0.2.7:5000"), &token), "ops");
    }

    #[test]
    fn api_keys_parse_with_scopes_and_restrictions() {
        let auth = Auth::from_config(Some("dash:s3cretkey:read+write, ada:adasecret:read:customer=Ada"), None)
            .unwrap()
            .unwrap();
        let dash = auth.authenticate("s3cretkey").unwrap();
        assert!(dash.has(Scope::Read) && dash.has(Scope::Write) && !dash.has(Scope::Admin));
        let ada = auth.authenticate("adasecret").unwrap();
        assert_eq!(ada.customer.as_deref(), Some("ada"));
        assert_eq!(ada.customer_name.as_deref(), Some("Ada"));
        assert_eq!(auth.authenticate("nope"), Err(AuthError::Invalid));
        assert!(Auth::from_config(None, None).unwrap().is_none());
        for bad in [
            "x",
            "a:short:read",
            "a:longenough:fly",
            "a:longenough:read:colour=red",
            "a:samesecret:admin,b:samesecret:read",
        ] {
            assert!(Auth::from_config(Some(bad), None).is_err(), "{bad}");
        }
    }

    /// An HS256 JWT of `claims`, signed with `secret`.
    fn signed(secret: &[u8], claims: &serde_json::Value) -> String {
        let key = jsonwebtoken::EncodingKey::from_secret(secret);
        jsonwebtoken::encode(&jsonwebtoken::Header::new(Algorithm::HS256), claims, &key).unwrap()
    }

    #[test]
    fn jwts_are_verified_and_expire() {
        let secret = "0123456789abcdef0123456789abcdef";
        let auth = Auth::from_config(None, Some(secret)).unwrap().unwrap();
        let make = |exp: i64, scope: &str| {
            signed(secret.as_bytes(), &serde_json::json!({"sub": "svc", "exp": exp, "scope": scope, "customer": "Bob"}))
        };
        let now = chrono::Utc::now().timestamp();
        let p = auth.authenticate(&make(now + 60, "read write")).unwrap();
        assert!(p.has(Scope::Write) && !p.has(Scope::Admin));
        assert_eq!(p.customer.as_deref(), Some("bob"));
        // Its own name and write rate, never those of an API key named "svc".
        assert_eq!((p.name.as_str(), rate_key(true, None, &p).as_ref()), ("jwt:svc", "jwt:svc"));
        assert_eq!(auth.authenticate(&make(now - 5, "read")), Err(AuthError::Expired));
        let forged = signed(b"another secret entirely!", &serde_json::json!({"sub": "svc", "exp": now + 60}));
        assert_eq!(auth.authenticate(&forged), Err(AuthError::Invalid));
    }

    /// An identity provider's token: an `aud`, an `iss`, and scopes of other
    /// services beside ordercast's. Before, any `aud` made the token
    /// invalid (jsonwebtoken checks it unless told otherwise, and there was
    /// no setting for it), and so did a scope ordercast does not know.
    #[test]
    fn a_jwt_from_an_identity_provider_is_checked_for_its_audience_and_issuer_when_set() {
        let secret = "0123456789abcdef0123456789abcdef";
        let exp = chrono::Utc::now().timestamp() + 60;
        let make = |claims: serde_json::Value| signed(secret.as_bytes(), &claims);
        let idp = make(serde_json::json!({"sub": "svc", "exp": exp, "aud": ["ordercast", "billing"],
                                          "iss": "https://id.example", "scope": "openid read write"}));
        let open = Auth::from_config(None, Some(secret)).unwrap().unwrap();
        let p = open.authenticate(&idp).unwrap();
        assert!(p.has(Scope::Read) && p.has(Scope::Write) && !p.has(Scope::Admin));
        let strict = |aud: Option<&str>, iss: Option<&str>| {
            Auth::from_config(None, Some(secret)).unwrap().unwrap().expecting(aud, iss)
        };
        assert!(strict(Some("ordercast"), Some("https://id.example")).authenticate(&idp).is_ok());
        assert_eq!(strict(Some("shipping"), None).authenticate(&idp), Err(AuthError::Invalid));
        assert_eq!(strict(None, Some("https://other.example")).authenticate(&idp), Err(AuthError::Invalid));
        // A token without the claim a setting asks for is refused too.
        let bare = make(serde_json::json!({"sub": "svc", "exp": exp, "scope": "read"}));
        assert_eq!(strict(Some("ordercast"), None).authenticate(&bare), Err(AuthError::Invalid));
        assert_eq!(strict(None, Some("https://id.example")).authenticate(&bare), Err(AuthError::Invalid));
        // Only other services' scopes: none of ordercast's.
        let theirs = make(serde_json::json!({"sub": "svc", "exp": exp, "scopes": ["openid", "profile"]}));
        let p = open.authenticate(&theirs).unwrap();
        assert!(!p.has(Scope::Read) && !p.has(Scope::Write) && !p.has(Scope::Admin));
    }

    #[test]
    fn a_jwt_with_a_blank_customer_claim_is_invalid() {
        let secret = "0123456789abcdef0123456789abcdef";
        let auth = Auth::from_config(None, Some(secret)).unwrap().unwrap();
        let exp = chrono::Utc::now().timestamp() + 60;
        let make = |claims: serde_json::Value| signed(secret.as_bytes(), &claims);
        for blank in ["", "  ", "\t"] {
            let token = make(serde_json::json!({"sub": "svc", "exp": exp, "scope": "read", "customer": blank}));
            assert_eq!(auth.authenticate(&token), Err(AuthError::Invalid), "{blank:?}");
        }
        let unrestricted = auth.authenticate(&make(serde_json::json!({"sub": "svc", "exp": exp}))).unwrap();
        assert_eq!(unrestricted.customer, None);
        let null = make(serde_json::json!({"sub": "svc", "exp": exp, "customer": null}));
        assert_eq!(auth.authenticate(&null).unwrap().customer, None);
        let ada = make(serde_json::json!({"sub": "svc", "exp": exp, "customer": " Ada "}));
        let ada = auth.authenticate(&ada).unwrap();
        assert_eq!((ada.customer.as_deref(), ada.customer_name.as_deref()), (Some("ada"), Some("Ada")));
        // A NUL, which the database refuses in text, in either claim it is given.
        for claims in [
            serde_json::json!({"sub": "svc", "exp": exp, "customer": "A\u{0}da"}),
            serde_json::json!({"sub": "s\u{0}vc", "exp": exp}),
        ] {
            assert_eq!(auth.authenticate(&make(claims.clone())), Err(AuthError::Invalid), "{claims}");
        }
    }

    #[test]
    fn scopes_follow_the_route() {
        assert_eq!(required_scope(&Method::GET, "/api/orders"), Some(Scope::Read));
        assert_eq!(required_scope(&Method::POST, "/api/orders"), Some(Scope::Write));
        assert_eq!(required_scope(&Method::GET, "/ws"), Some(Scope::Read));
        assert_eq!(required_scope(&Method::GET, "/metrics"), Some(Scope::Admin));
        assert_eq!(required_scope(&Method::GET, "/api/dlq"), Some(Scope::Admin));
        assert_eq!(required_scope(&Method::POST, "/api/session"), None);
        assert_eq!(required_scope(&Method::DELETE, "/api/session"), None);
        assert_eq!(required_scope(&Method::GET, "/api/health"), None);
        assert_eq!(required_scope(&Method::GET, "/api/health/live"), None);
        assert_eq!(required_scope(&Method::GET, "/"), None);
        assert_eq!(required_scope(&Method::GET, "/js/app.js"), None);
    }
}
