//! `GET /ws`: the WebSocket stream.
//!
//! Protocol (JSON text frames):
//! - client -> server: `{"type":"subscribe","filter":{...},"since":N,"snapshot":true}`
//!   (replaces the current subscription), `{"type":"ping"}`.
//! - server -> client: `ready` (with `seq`, a valid resume position), optional
//!   `snapshot` chunks, then `change` messages; `resync` when the client's
//!   position is gone; `error` for a bad client message; `pong`.
//!
//! A client that sends nothing gets every change from now on; the same
//! subscription can be given as query parameters (`/ws?status=pending&since=42`).
//! The handshake runs through the HTTP server like any request (auth, CORS,
//! limits, parameters); the 101 response carries the opened feed, and once
//! it is written the server hands the raw connection to `start` (see
//! `startup::upgrade`). From then on one task per connection runs a
//! `select!` loop over client frames, the feed, a heartbeat and server
//! shutdown, writing straight to the socket (`ws_socket`).

use std::time::{Duration, Instant};

use actix_web::{get, web, HttpRequest, HttpResponse};
use actix_ws::{CloseCode, CloseReason};
use bytes::Bytes;
use serde_json::{json, Value};

use super::{parse_position, QueryPairs, StreamParams};
use crate::changes::feed::{Feed, FeedError, Item};
use crate::changes::wire;
use crate::domain::{Filter, ValidationError};
use crate::error::ApiError;
use crate::startup::AppState;

use super::ws_socket::{Incoming, ReadError, Socket};

/// How often the server pings.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// A client silent (no pong, no message) for this long is closed.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Snapshot rows per `snapshot` message.
const SNAPSHOT_CHUNK: usize = 200;
/// Bytes queued for the connection beyond what the socket took before the
/// session stops taking changes from its feed. Small, so that a client that
/// stops reading backs up into its hub queue (and is marked lagged, to catch
/// up from the log later) rather than here.
const OUT_LIMIT: usize = 64 * 1024;
/// How long a closing connection may take to send its close frame and see
/// the client's.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Close codes, documented in the README.
pub const CLOSE_HEARTBEAT_TIMEOUT: u16 = 4000;
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;
/// The handshake's query is invalid (a filter, `since`, an unknown parameter).
pub const CLOSE_INVALID_QUERY: u16 = 4422;
pub const CLOSE_UNAVAILABLE: u16 = 4503;
/// RFC 6455's "internal error".
pub const CLOSE_INTERNAL_ERROR: u16 = 1011;
pub const CLOSE_FORBIDDEN: u16 = 4003;
pub const CLOSE_TOKEN_EXPIRED: u16 = 4001;

/// A parsed client message.
#[derive(Debug, PartialEq)]
pub enum ClientMessage {
    Subscribe { filter: Filter, since: Option<i64>, snapshot: bool },
    Ping,
}

impl ClientMessage {
    pub fn parse(text: &str) -> Result<ClientMessage, ValidationError> {
        // A key twice is refused, as in REST bodies (`domain::json`).
        let value: Value = crate::domain::json::parse(text.as_bytes())
            .map_err(|e| ValidationError::with_code("message", "malformed_json", format!("malformed JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| ValidationError::with_code("message", "invalid_message", "expected a JSON object"))?;
        match obj.get("type").and_then(Value::as_str) {
            Some("ping") => Ok(ClientMessage::Ping),
            Some("subscribe") => {
                if let Some(k) = obj.keys().find(|k| !["type", "filter", "since", "snapshot"].contains(&k.as_str())) {
                    return Err(ValidationError::unknown_field(k, format!("unknown field {k:?}")));
                }
                let since = match obj.get("since") {
                    None | Some(Value::Null) => None,
                    Some(Value::Number(n)) => Some(parse_position(&n.to_string())?),
                    Some(Value::String(s)) => Some(parse_position(s)?),
                    Some(_) => {
                        return Err(ValidationError::with_code("since", "invalid_position", "since must be a position"))
                    }
                };
                let snapshot = match obj.get("snapshot") {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => return Err(ValidationError::new("snapshot", "must be true or false")),
                };
                let filter = Filter::from_json(obj.get("filter").unwrap_or(&Value::Null))?;
                Ok(ClientMessage::Subscribe { filter, since, snapshot })
            }
            Some(other) => Err(ValidationError::with_code(
                "type",
                "unknown_type",
                format!("unknown message type {other:?}; expected subscribe or ping"),
            )),
            None => Err(ValidationError::with_code("type", "invalid_message", "a message needs a \"type\"")),
        }
    }
}

/// An open feed plus what to send before its first change.
pub struct Opened {
    pub feed: Feed,
    /// Set when the requested position is gone: the client must reload.
    pub resync: Option<(&'static str, i64)>,
    /// Resume position valid from the start (`since`, or the live start).
    pub seq: i64,
    /// The snapshot's rows, until they are sent: taken then, so that an
    /// idle stream does not hold them (up to 10,000 rows of JSON).
    pub snapshot: Option<crate::routes::orders::Page>,
    /// The snapshot's share of `ORDERCAST_SNAPSHOT_MEMORY_MIB`, held until
    /// its rows are sent (`snapshot_messages` consumes them).
    pub snapshot_held: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// A share of the snapshot memory (`AppState::snapshots`, in KiB): `kib`,
/// all of it at most, so a page larger than the whole goes alone.
fn snapshot_share(state: &AppState, kib: usize) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    let kib = kib.min(state.settings.snapshot_memory_mib as usize * 1024) as u32;
    state.snapshots.clone().try_acquire_many_owned(kib).map_err(|_| {
        ApiError::Busy(format!(
            "the streams hold as many snapshot rows as they may ({} MiB, ORDERCAST_SNAPSHOT_MEMORY_MIB) until \
             clients read them: retry shortly",
            state.settings.snapshot_memory_mib
        ))
    })
}

/// Makes `share` hold `kib` (all of the memory at most): it takes the rest,
/// refused as `snapshot_share` is, or lets the surplus go.
fn fit_share(state: &AppState, share: &mut tokio::sync::OwnedSemaphorePermit, kib: usize) -> Result<(), ApiError> {
    let kib = kib.min(state.settings.snapshot_memory_mib as usize * 1024);
    let held = share.num_permits();
    if kib > held {
        share.merge(snapshot_share(state, kib - held)?);
    } else {
        drop(share.split(held - kib));
    }
    Ok(())
}

/// Opens a feed for stream parameters: with a snapshot, the rows and the
/// position they reflect are read in one snapshot and the feed continues
/// after that position, so nothing falls between the two.
/// A snapshot's position that the feed opened after it cannot continue from
/// (retention pruned past it meanwhile, or it lies in a range the database
/// lost) is read again this many times; then the stream opens with the
/// resync alone.
const SNAPSHOT_TRIES: u32 = 3;

pub async fn open_stream(state: &AppState, params: &StreamParams) -> Result<Opened, ApiError> {
    let mut tries = 0;
    loop {
        tries += 1;
        let (since, snapshot) = if params.snapshot {
            // Taken before the read, for the most a page holds (refused, a
            // stream costs no read), and cut to what the page holds after.
            let mut share = snapshot_share(state, crate::routes::orders::PAGE_BYTES / 1024 + 1)?;
            let page =
                crate::routes::orders::list_page(&state.stream_pool, &params.filter, None, params.snapshot_limit, None)
                    .await?;
            // The row that reaches `PAGE_BYTES` is in the page whatever its
            // size: a page past the share takes the rest (all of the memory
            // at most) or is let go, refused like a stream that found no
            // share.
            fit_share(state, &mut share, page.items.iter().map(String::len).sum::<usize>() / 1024 + 1)?;
            state.hub.note_handed_out(page.position, page.committed_micros);
            (Some(page.position), Some((share, page)))
        } else {
            (params.since, None)
        };
        let mut feed = Feed::open(&state.hub, &state.stream_pool, params.filter.clone(), since, params.viewer.clone())
            .await
            .map_err(|e| match e {
                FeedError::Hub(_) => ApiError::ShuttingDown,
                FeedError::Db(e) => e,
            })?;
        let resync = feed.take_initial_resync();
        // A snapshot is no reload the feed can go on from after a resync: its
        // rows stand at its position, and the feed goes on after a later one.
        // Before, the client got both, and one that took the snapshot and
        // went on after `ready` missed the changes between them.
        if resync.is_some() && snapshot.is_some() {
            if tries < SNAPSHOT_TRIES {
                continue;
            }
            return Ok(Opened { seq: feed.position(), feed, snapshot: None, snapshot_held: None, resync });
        }
        let (snapshot_held, snapshot) = snapshot.unzip();
        return Ok(Opened { seq: feed.position(), feed, snapshot, snapshot_held, resync });
    }
}

#[utoipa::path(get, path = "/ws", tag = "realtime",
    params(
        ("status" = Option<String>, Query, description = "Only changes to orders in (or leaving) these statuses"),
        ("id" = Option<String>, Query, description = "Only these order ids"),
        ("customer" = Option<String>, Query, description = "Only this customer (exact, case-insensitive)"),
        ("since" = Option<i64>, Query, description = "Resume after this position (the last seq received)"),
        ("snapshot" = Option<bool>, Query, description = "Send the matching current rows first, newest first"),
        ("snapshot_limit" = Option<i64>, Query, description = "At most this many snapshot rows (default 1000, at most 10000), and as many as fit in 4 MiB of JSON; the last snapshot message says truncated: true when more matched"),
    ),
    responses(
        (status = 101, description = "WebSocket upgrade; see the README for the message protocol"),
        (status = 400, description = "Not a WebSocket handshake", body = crate::routes::openapi::ProblemDoc),
        (status = 422, description = "Invalid filter or position, for a request that is not a WebSocket handshake (a handshake is upgraded and closed with 4422 and the problem's code and message)", body = crate::routes::openapi::ProblemDoc),
    ))]
#[get("/ws")]
pub async fn ws(req: HttpRequest, query: QueryPairs, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    // Refusals a browser can read: upgrade, then close with a code and reason.
    let refusal = {
        use actix_web::HttpMessage;
        req.extensions().get::<crate::auth::AuthError>().cloned()
    }
    .map(|e| (e.close_code(), e.to_string()))
    .or_else(|| {
        (!crate::auth::origin_allowed(&req, &state.settings.allowed_origins))
            .then(|| (CLOSE_FORBIDDEN, "origin not allowed".to_string()))
    });
    let handshake = || {
        actix_http::ws::handshake(req.head())
            .map_err(|e| ApiError::BadRequest(format!("not a WebSocket handshake: {e}"), "websocket_handshake_failed"))
    };
    // A refused handshake holds a place under the connection limits too
    // while it closes (up to CLOSE_LINGER): refusals cannot pile up beyond
    // what one address, or everyone, may hold.
    let ip = req.peer_addr().map(|a| a.ip()).unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
    if let Some((code, reason)) = refusal {
        let slot = state.connections.acquire(ip).map_err(too_many)?;
        return Ok(switch(handshake()?, Handoff::Refuse { code, reason, slot }));
    }
    // A query a browser got wrong is refused so that it can read why too
    // (a browser's WebSocket shows neither the status nor the body of a
    // refused handshake): 4422 with the problem's code and message.
    let mut params = match StreamParams::from_query(&query) {
        Ok(params) => params,
        Err(e) if actix_http::ws::verify_handshake(req.head()).is_ok() => {
            let reason = format!("{}: {e}", e.code());
            let slot = state.connections.acquire(ip).map_err(too_many)?;
            return Ok(switch(handshake()?, Handoff::Refuse { code: CLOSE_INVALID_QUERY, reason, slot }));
        }
        Err(e) => return Err(e),
    };
    refuse_while_shutting_down(&state)?;
    let principal = crate::auth::principal(&req);
    let slot = state.connections.acquire(ip).map_err(too_many)?;
    restrict(&mut params, &principal);
    let handshake = handshake()?;
    let opened = match open_stream(&state, &params).await {
        Ok(opened) => opened,
        // The database away (or the stream pool busy past its wait): a
        // browser reads no status of a refused handshake, and would take
        // WebSocket for blocked on the way. Upgraded, then closed with 4503
        // and the error's code, as a `subscribe` that cannot open its
        // stream: the client reconnects with its `since` after a pause.
        Err(e @ (ApiError::Unavailable(_) | ApiError::Busy(_))) => {
            let reason = format!("cannot open the stream: {}", e.code());
            return Ok(switch(handshake, Handoff::Refuse { code: CLOSE_UNAVAILABLE, reason, slot }));
        }
        // A failure of the server's own (logged, as a REST 500 is): 1011
        // with its code, which a browser can read, where a 500 to the
        // handshake reaches it as 1006 and nothing more.
        Err(ApiError::Unexpected(e)) => {
            log::error!("opening a stream failed: {e:#}");
            let reason = "cannot open the stream: internal_error".to_string();
            return Ok(switch(handshake, Handoff::Refuse { code: CLOSE_INTERNAL_ERROR, reason, slot }));
        }
        Err(e) => return Err(e),
    };
    let session = Session { state: state.into_inner(), opened, params, principal, _slot: slot };
    Ok(switch(handshake, Handoff::Session(Box::new(session))))
}

/// The 101 response, carrying what the connection continues with once the
/// HTTP server has handed it over (`startup::upgrade` takes it out).
fn switch(mut handshake: actix_http::ResponseBuilder, handoff: Handoff) -> HttpResponse {
    let mut response = HttpResponse::from(handshake.finish().map_into_boxed_body());
    response.extensions_mut().insert(handoff);
    response
}

/// What an accepted WebSocket handshake continues with.
pub enum Handoff {
    /// Close at once with this code and reason (auth, origin, query),
    /// holding a place under the connection limits until closed.
    Refuse { code: u16, reason: String, slot: crate::limits::ConnectionSlot },
    /// Stream changes.
    Session(Box<Session>),
}

/// A subscribed session, ready to run on its connection.
pub struct Session {
    state: std::sync::Arc<AppState>,
    opened: Opened,
    params: StreamParams,
    principal: crate::auth::Principal,
    /// The connection's place under the connection limits, held while it runs.
    _slot: crate::limits::ConnectionSlot,
}

/// Runs an upgraded connection: called with the socket once the 101
/// response is written; `early` holds bytes the client sent right behind
/// its handshake.
pub fn start(io: tokio::net::TcpStream, early: bytes::BytesMut, handoff: Handoff) {
    match handoff {
        Handoff::Refuse { code, reason, slot } => {
            actix_web::rt::spawn(async move {
                let _slot = slot;
                let socket = match Socket::take_over(io, early, 125) {
                    Ok(s) => s,
                    Err(e) => {
                        log::debug!("WebSocket connection lost at the handshake: {e}");
                        return;
                    }
                };
                socket.shut_down(wire::close_frame(code, &reason), CLOSE_LINGER).await;
            });
        }
        Handoff::Session(session) => {
            /// Counts the session out however it ends (a panic included).
            struct Counted(std::sync::Arc<AppState>);
            impl Drop for Counted {
                fn drop(&mut self) {
                    self.0.sessions.ws.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            let fut = async move {
                session.state.sessions.ws.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let _counted = Counted(session.state.clone());
                run_session(session, io, early).await;
            };
            actix_web::rt::spawn(fut);
        }
    }
}

/// A restricted token only ever sees its own customer's orders, whatever
/// filter it asks for, and sees an order that moves to or from another
/// customer only as leaving or entering its view (`changes::Move`).
pub fn restrict(params: &mut StreamParams, principal: &crate::auth::Principal) {
    params.viewer.clone_from(&principal.customer);
    if let Some(c) = &principal.customer {
        params.filter.customer = Some(c.clone());
    }
}

/// A stream asked for once the server has begun to stop would only be
/// closed again at once: 503 `shutting_down` instead.
pub fn refuse_while_shutting_down(state: &AppState) -> Result<(), ApiError> {
    match *state.shutdown.borrow() {
        true => Err(ApiError::ShuttingDown),
        false => Ok(()),
    }
}

pub fn too_many(refused: crate::limits::Refused) -> ApiError {
    match refused {
        crate::limits::Refused::Total => {
            ApiError::Full("the server holds its maximum of streaming connections; retry later".into())
        }
        crate::limits::Refused::PerIp => ApiError::TooMany("too many streaming connections from this address".into()),
    }
}

enum Outcome {
    Continue,
    Close(Option<CloseReason>),
}

fn close(code: u16, description: impl Into<String>) -> Outcome {
    Outcome::Close(Some(CloseReason { code: CloseCode::Other(code), description: Some(description.into()) }))
}

/// How many times the slow-client time a client far behind that keeps
/// reading is waited for in all (see `Conn::write_some`): meanwhile its
/// session hears nothing else, not even a shutdown.
const WRITE_WAIT_MAX: u32 = 6;
/// How often the kernel's queue for a client far behind is looked at.
const PROGRESS_SAMPLE: Duration = Duration::from_millis(500);

/// The connection and the rules for writing to it.
struct Conn {
    socket: Socket,
    write_timeout: Duration,
    /// When a client far behind last read some of what waited for it (see
    /// `write_some`): alive, though its pong waits behind that data.
    drained_at: Option<Instant>,
    /// When the client's token expires (Unix seconds; JWTs only). Nothing
    /// is written to the socket from then on: not a change, not even one
    /// queued before.
    token_expires: Option<i64>,
}

impl Conn {
    /// Queues a frame and writes what the socket takes now. Waits only while
    /// the client is far behind (more than `OUT_LIMIT` bytes unwritten), at
    /// most `write_timeout`: a client that does not read is too slow.
    async fn send_frames(&mut self, frames: Bytes) -> Result<(), Outcome> {
        self.check_token()?;
        self.socket.send(frames).map_err(|_| Outcome::Close(None))?;
        self.write_some().await
    }

    /// 4001 once the token has expired.
    fn check_token(&self) -> Result<(), Outcome> {
        match crate::auth::expired(self.token_expires) {
            true => Err(close(CLOSE_TOKEN_EXPIRED, "token expired")),
            false => Ok(()),
        }
    }

    /// Writes without waiting; then, if too much is still queued, waits for
    /// the client to read it down. A client that reads nothing of it for
    /// `write_timeout` is too slow (4008); one that reads, however slowly
    /// (a 3 MB batch on a slow link), is waited for, up to `WRITE_WAIT_MAX`
    /// times as long in all, and never past its token's expiry. Reading is
    /// seen as the socket taking more, or the kernel's queue for the client
    /// going down (sampled every `PROGRESS_SAMPLE`: the socket takes more
    /// only once a good part of its buffer is free). Meanwhile nothing more
    /// is taken from the hub for it: a client too far behind is let go
    /// there (it catches up from the log).
    async fn write_some(&mut self) -> Result<(), Outcome> {
        self.check_token()?;
        self.socket.flush().map_err(|_| Outcome::Close(None))?;
        if self.socket.pending() <= OUT_LIMIT {
            return Ok(());
        }
        let now = tokio::time::Instant::now();
        let expiry = self.token_expires.map(|t| {
            let left = t.saturating_mul(1000).saturating_sub(chrono::Utc::now().timestamp_millis());
            now + Duration::from_millis(left.max(0) as u64)
        });
        let timeout = self.write_timeout;
        let last = expiry.map_or(now + timeout * WRITE_WAIT_MAX, |e| e.min(now + timeout * WRITE_WAIT_MAX));
        let next_deadline = || (tokio::time::Instant::now() + timeout).min(last);
        // Boxed: only a client far behind waits here.
        let drained = Box::pin(async {
            let mut deadline = next_deadline();
            let mut kernel = self.socket.unacknowledged();
            while self.socket.pending() > OUT_LIMIT {
                let before = self.socket.pending();
                let sample = (tokio::time::Instant::now() + PROGRESS_SAMPLE).min(deadline);
                if let Ok(r) = tokio::time::timeout_at(sample, self.socket.writable()).await {
                    r.map_err(|_| Outcome::Close(None))?;
                }
                self.socket.flush().map_err(|_| Outcome::Close(None))?;
                let now_in_kernel = self.socket.unacknowledged();
                let read = self.socket.pending() < before || now_in_kernel.zip(kernel).is_some_and(|(n, k)| n < k);
                kernel = now_in_kernel;
                let now = tokio::time::Instant::now();
                if !read && now >= deadline {
                    return Err(None);
                }
                if now >= last {
                    self.check_token().map_err(Some)?;
                    return Err(Some(close(CLOSE_SLOW_CONSUMER, "slow consumer: the client reads too slowly")));
                }
                if read {
                    deadline = next_deadline();
                    self.drained_at = Some(Instant::now());
                }
            }
            Ok(())
        })
        .await;
        match drained {
            Ok(()) => Ok(()),
            Err(Some(outcome)) => Err(outcome),
            Err(None) => {
                self.check_token()?;
                Err(close(CLOSE_SLOW_CONSUMER, "slow consumer: the client stopped reading"))
            }
        }
    }

    async fn send(&mut self, text: impl AsRef<str>) -> Result<(), Outcome> {
        self.send_frames(wire::frame(wire::OP_TEXT, text.as_ref().as_bytes())).await
    }

    async fn send_json(&mut self, v: Value) -> Result<(), Outcome> {
        self.send(v.to_string()).await
    }

    /// A resync if the position is gone, snapshot chunks (if asked for),
    /// then `ready`: a client that has
    /// `ready` has everything up to its `seq`.
    async fn announce(&mut self, opened: &mut Opened, params: &StreamParams) -> Result<(), Outcome> {
        if let Some((reason, position)) = opened.resync {
            self.send(resync_message(reason, position)).await?;
        }
        if let Some(page) = opened.snapshot.take() {
            for msg in snapshot_messages(page) {
                self.send(msg).await?;
            }
        }
        opened.snapshot_held = None;
        self.send(ready_message(opened, params)).await
    }
}

pub fn ready_message(opened: &Opened, params: &StreamParams) -> String {
    json!({
        "type": "ready",
        "seq": opened.seq,
        // Whether a snapshot came before it (not beside a resync).
        "snapshot": params.snapshot && opened.resync.is_none(),
        "filter": filter_json(&params.filter),
    })
    .to_string()
}

/// `{"type":"snapshot","seq":P,"orders":[...],"last":bool,"truncated":bool}`
/// messages of at most `SNAPSHOT_CHUNK` rows (one, possibly empty, at least),
/// each made when it is asked for, from rows taken out of the page: the rows
/// and their messages are not all held at once.
pub fn snapshot_messages(page: crate::routes::orders::Page) -> impl Iterator<Item = String> {
    let n = page.items.len().div_ceil(SNAPSHOT_CHUNK).max(1);
    let (position, truncated) = (page.position, page.next_cursor.is_some());
    let mut items = page.items.into_iter();
    (0..n).map(move |i| {
        let chunk: Vec<String> = items.by_ref().take(SNAPSHOT_CHUNK).collect();
        format!(
            r#"{{"type":"snapshot","seq":{position},"orders":[{}],"last":{},"truncated":{truncated}}}"#,
            chunk.join(","),
            i + 1 == n,
        )
    })
}

/// Where a filtered client stands: every change up to `seq` that it did not
/// receive did not match its filter. A valid resume position.
pub fn position_message(position: i64) -> String {
    format!(r#"{{"type":"position","seq":{position}}}"#)
}

pub fn resync_message(reason: &str, position: i64) -> String {
    json!({
        "type": "resync",
        "reason": reason,
        "seq": position,
        "message": "the changes after your position are no longer available: reload (e.g. subscribe with snapshot) and continue from seq",
    })
    .to_string()
}

pub fn filter_json(f: &Filter) -> Value {
    json!({
        "status": f.statuses.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        "id": f.ids.iter().collect::<Vec<_>>(),
        "customer": f.customer,
    })
}

fn error_message(e: &ValidationError) -> Value {
    json!({"type": "error", "code": e.code, "field": e.field, "message": e.message})
}

/// Answers one client message.
async fn handle_message(
    state: &std::sync::Arc<AppState>,
    conn: &mut Conn,
    session: &mut SessionState,
    message: Incoming,
) -> Outcome {
    // A client whose token has expired is not answered (a `subscribe` would
    // run its queries first): it gets the 4001 close.
    if let Err(expired) = conn.check_token() {
        return expired;
    }
    let max_subscribes = state.settings.max_subscribes_per_minute;
    let sent = match message {
        Incoming::Text(text) => match ClientMessage::parse(&text) {
            Ok(ClientMessage::Ping) => conn.send_json(json!({"type": "pong"})).await,
            Ok(ClientMessage::Subscribe { .. }) if {
                while session.subscribes.front().is_some_and(|t| t.elapsed() > Duration::from_secs(60)) {
                    session.subscribes.pop_front();
                }
                session.subscribes.len() as u32 >= max_subscribes
            } => {
                conn.send_json(json!({"type": "error", "code": "too_many_subscribes", "message": format!("at most {max_subscribes} subscribe messages per minute")}))
                    .await
            }
            Ok(ClientMessage::Subscribe { filter, since, snapshot }) => {
                session.subscribes.push_back(Instant::now());
                let mut next =
                    StreamParams { filter, since, snapshot, snapshot_limit: session.params.snapshot_limit, viewer: None };
                restrict(&mut next, &session.principal);
                match open_stream(state, &next).await {
                    Ok(o) => {
                        session.opened = o;
                        session.params = next;
                        conn.announce(&mut session.opened, &session.params).await
                    }
                    Err(ApiError::Validation(e)) => conn.send_json(error_message(&e)).await,
                    // As at the handshake: a failure of the server's own is
                    // logged and closes with 1011, anything else (the
                    // database away, the snapshot memory spent, the server
                    // stopping) with 4503, for the client to come back.
                    Err(ApiError::Unexpected(e)) => {
                        log::error!("a subscribe failed: {e:#}");
                        Err(close(CLOSE_INTERNAL_ERROR, "cannot subscribe: internal_error".to_string()))
                    }
                    Err(e) => Err(close(CLOSE_UNAVAILABLE, format!("cannot subscribe: {}", e.code()))),
                }
            }
            Err(e) => conn.send_json(error_message(&e)).await,
        },
        Incoming::Binary => {
            conn.send_json(json!({"type": "error", "code": "binary_not_supported", "message": "send JSON text frames"}))
                .await
        }
        // A control frame carries at most 125 bytes (the parser enforces it).
        Incoming::Ping(bytes) => conn.send_frames(wire::frame(wire::OP_PONG, &bytes)).await,
        Incoming::Pong => Ok(()),
        Incoming::Close(_) => Err(Outcome::Close(Some(CloseCode::Normal.into()))),
    };
    sent.err().unwrap_or(Outcome::Continue)
}

/// What a session changes as it runs.
struct SessionState {
    opened: Opened,
    params: StreamParams,
    principal: crate::auth::Principal,
    subscribes: std::collections::VecDeque<Instant>,
}

/// Arguments are small (a box, the socket, an empty buffer) because they stay
/// in the session's future for its whole life.
async fn run_session(session: Box<Session>, io: tokio::net::TcpStream, early: bytes::BytesMut) {
    // Moved out in a block of its own, so the box is freed now rather than
    // when the session ends.
    let Session { state, opened, params, principal, _slot } = {
        let session = session;
        *session
    };
    let socket = match Socket::take_over(io, early, state.settings.max_frame_bytes) {
        Ok(s) => s,
        Err(e) => {
            log::debug!("WebSocket connection lost at the handshake: {e}");
            return;
        }
    };
    let mut conn = Conn {
        socket,
        write_timeout: state.settings.slow_client_timeout(),
        drained_at: None,
        token_expires: principal.expires_at,
    };
    let mut session = SessionState { opened, params, principal, subscribes: Default::default() };
    let mut heartbeat = state.heartbeat.clone();
    heartbeat.mark_unchanged();
    // Kept across loop turns (not re-created, and re-registered with the
    // shared channels, on every frame sent): re-armed only when it fires.
    let mut signal = std::pin::pin!(next_signal(heartbeat, state.shutdown.subscribe()));
    let mut last_heard = Instant::now();
    let mut messages = Vec::new();

    let mut outcome = match Box::pin(conn.announce(&mut session.opened, &session.params)).await {
        Ok(()) => Outcome::Continue,
        Err(o) => o,
    };
    // A protocol error in what came with the handshake does not replace a
    // close the announcement already chose (4008, 4503): the client is
    // told the first thing that went wrong.
    if let Err(e) = conn.socket.early_messages(&mut messages) {
        if let Outcome::Continue = outcome {
            outcome = read_failed(e);
        }
    }
    while let Outcome::Continue = outcome {
        // Client messages first (rare; their handling is boxed so that it
        // does not size every idle session's future).
        for message in messages.drain(..) {
            last_heard = Instant::now();
            outcome = Box::pin(handle_message(&state, &mut conn, &mut session, message)).await;
            if !matches!(outcome, Outcome::Continue) {
                break;
            }
        }
        if !matches!(outcome, Outcome::Continue) {
            break;
        }
        let behind = conn.socket.pending() > OUT_LIMIT;
        outcome = tokio::select! {
            r = conn.socket.readable() => match r {
                Ok(()) => match conn.socket.read_messages(&mut messages) {
                    Ok(more) => {
                        if more {
                            // A client sending without pause gets its turn
                            // again after the other connections on this
                            // thread have had theirs.
                            tokio::task::yield_now().await;
                        }
                        Outcome::Continue
                    }
                    Err(e) => read_failed(e),
                },
                Err(_) => Outcome::Close(None),
            },
            item = session.opened.feed.next(), if !behind => match item {
                Some(item) => match session.opened.feed.try_next() {
                    // The usual case at a modest rate: one frame (or one
                    // shared batch of frames), written at once.
                    None if conn.socket.pending() == 0 => conn.send_frames(item_frames(item)).await.err().unwrap_or(Outcome::Continue),
                    // More is waiting: everything this client has queued goes
                    // out in one vectored write.
                    mut more => {
                        conn.socket.queue(item_frames(item));
                        while let Some(item) = more {
                            conn.socket.queue(item_frames(item));
                            more = if conn.socket.pending() <= OUT_LIMIT { session.opened.feed.try_next() } else { None };
                        }
                        conn.write_some().await.err().unwrap_or(Outcome::Continue)
                    }
                },
                None => shutting_down(&mut session.opened.feed),
            },
            r = conn.socket.writable(), if conn.socket.pending() > 0 => match r {
                Ok(()) => conn.write_some().await.err().unwrap_or(Outcome::Continue),
                Err(_) => Outcome::Close(None),
            },
            (fired, heartbeat, shutdown) = &mut signal => match fired {
                Signal::Heartbeat => {
                    signal.set(next_signal(heartbeat, shutdown));
                    conn.socket.release_idle_buffers();
                    // An expired token is closed by the ping's write (see
                    // `Conn::check_token`).
                    // A client reading down a large queue is alive though
                    // its pong is still behind it.
                    let alive = conn.drained_at.map_or(last_heard, |d| d.max(last_heard));
                    if alive.elapsed() > CLIENT_TIMEOUT {
                        close(CLOSE_HEARTBEAT_TIMEOUT, "heartbeat timeout")
                    } else {
                        // A filtered client whose last matching change is
                        // long past learns where it stands (`position`).
                        if let Some(p) = session.opened.feed.progress() {
                            conn.socket.queue(wire::frame(wire::OP_TEXT, position_message(p).as_bytes()));
                        }
                        conn.send_frames(wire::frame(wire::OP_PING, b"")).await.err().unwrap_or(Outcome::Continue)
                    }
                }
                Signal::Shutdown => shutting_down(&mut session.opened.feed),
            },
        };
    }
    let Outcome::Close(mut reason) = outcome else { return };
    // Whatever ended the session (the client's close, a shutdown, a protocol
    // error, a failed subscribe), once the token has expired the close is
    // 4001, which drops what is queued: nothing more goes out after `exp`.
    if let Err(Outcome::Close(expired)) = conn.check_token() {
        reason = expired;
    }
    if let Some(r) = &reason {
        if r.code == CloseCode::Other(CLOSE_SLOW_CONSUMER) {
            state.hub.stats.slow_disconnects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        log::debug!("closing WebSocket: {:?} {:?}", r.code, r.description);
    }
    Box::pin(finish(conn.socket, reason)).await;
}

/// Ends a session's connection with a close frame (`None`: without a code).
///
/// Closes that end a session the client cannot or may not go on with drop
/// the changes queued for it: only the rest of a frame already begun goes
/// out, then the close, so a client that reads again gets the close
/// promptly and resumes from the last change it received. A slow consumer
/// (4008) could not read them in time for the close to follow, a client
/// silent past the heartbeat timeout (4000) is not reading either, and a
/// client whose token expired (4001) may not receive them at all (a session
/// ending for another reason after the expiry closes with 4001 too: see
/// `run_session`). Other closes go out after what is queued (a client that
/// does not read does not get to hold the connection open: see
/// `shut_down`): a shutdown's (1001) `since=N` covers every change queued,
/// so the client must receive all of them for the close to be right.
async fn finish(mut socket: Socket, reason: Option<CloseReason>) {
    let frame = match &reason {
        Some(r) => wire::close_frame(u16::from(r.code), r.description.as_deref().unwrap_or("")),
        None => wire::frame(wire::OP_CLOSE, b""),
    };
    if reason.as_ref().is_some_and(drops_queued) {
        socket.discard_unsent();
    }
    socket.shut_down(frame, CLOSE_LINGER).await;
}

/// Whether a close drops the changes queued for the client (see `finish`).
fn drops_queued(reason: &CloseReason) -> bool {
    matches!(reason.code, CloseCode::Other(CLOSE_SLOW_CONSUMER | CLOSE_HEARTBEAT_TIMEOUT | CLOSE_TOKEN_EXPIRED))
}

enum Signal {
    Heartbeat,
    Shutdown,
}

/// The next server-wide event for a session: a heartbeat tick or shutdown.
/// Hands the receivers back so the session can wait for the one after.
async fn next_signal(
    mut heartbeat: tokio::sync::watch::Receiver<u64>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> (Signal, tokio::sync::watch::Receiver<u64>, tokio::sync::watch::Receiver<bool>) {
    let fired = tokio::select! {
        biased;
        _ = shutdown.wait_for(|s| *s) => Signal::Shutdown,
        Ok(()) = heartbeat.changed() => Signal::Heartbeat,
        // The heartbeat's sender is gone only as the server stops.
        else => Signal::Shutdown,
    };
    (fired, heartbeat, shutdown)
}

/// The frames a feed item goes out as: shared, except a resync notice.
fn item_frames(item: Item) -> Bytes {
    match item {
        Item::Change(c) => c.ws_frame.clone(),
        Item::Batch(b) => b.ws_frames.clone(),
        Item::Redacted(c, side) => crate::changes::feed::redacted(&c, side).ws_frame.clone(),
        Item::Resync { reason, position } => wire::frame(wire::OP_TEXT, resync_message(reason, position).as_bytes()),
    }
}

/// The close for a server shutdown, carrying the client's resume position
/// (past the changes its filter skipped, when it has everything else).
fn shutting_down(feed: &mut Feed) -> Outcome {
    feed.progress();
    close(1001, format!("server shutting down; resume with since={}", feed.position()))
}

fn read_failed(e: ReadError) -> Outcome {
    match e {
        ReadError::Gone => Outcome::Close(None),
        ReadError::Protocol(reason) => Outcome::Close(Some(reason)),
    }
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(ws);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The frames a server sent: (opcode, payload); panics on a cut frame.
    fn server_frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut frames = Vec::new();
        while !bytes.is_empty() {
            let (header, len) = match bytes[1] & 0x7f {
                126 => (4, u16::from_be_bytes([bytes[2], bytes[3]]) as usize),
                127 => (10, u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize),
                n => (2, n as usize),
            };
            assert!(bytes.len() >= header + len, "the stream ends mid-frame");
            frames.push((bytes[0] & 0x0f, bytes[header..header + len].to_vec()));
            bytes = &bytes[header + len..];
        }
        frames
    }

    /// A client that stopped reading, with frames waiting in the kernel and
    /// in the session's queue, reads again once the session closes: on 4000,
    /// 4001 and 4008 it gets what the kernel held, the rest of the frame
    /// begun, then the close; on 1001, everything queued first.
    #[tokio::test]
    async fn a_close_that_drops_the_queue_follows_the_frame_begun() {
        use tokio::io::AsyncReadExt;
        for (code, drops) in
            [(CLOSE_HEARTBEAT_TIMEOUT, true), (CLOSE_TOKEN_EXPIRED, true), (CLOSE_SLOW_CONSUMER, true), (1001, false)]
        {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let client = tokio::net::TcpSocket::new_v4().unwrap();
            client.set_recv_buffer_size(4096).unwrap();
            let mut client = client.connect(listener.local_addr().unwrap()).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            let mut socket = Socket::new(server, bytes::BytesMut::new(), 1000);
            // Numbered frames of one size, sent until the kernel takes no
            // more, then 20 more queued.
            let frame = |n: usize| wire::frame(wire::OP_TEXT, format!("{n:0>1000}").as_bytes());
            let size = frame(0).len();
            let (mut total, mut extra) = (0, 0);
            while extra < 20 {
                socket.send(frame(total)).unwrap();
                total += 1;
                if socket.pending() > 0 {
                    extra += 1;
                }
            }
            let written = total * size - socket.pending();
            let reason = CloseReason { code: CloseCode::Other(code), description: Some("bye".into()) };
            let closing = tokio::spawn(finish(socket, Some(reason)));
            let mut got = Vec::new();
            tokio::time::timeout(Duration::from_secs(30), client.read_to_end(&mut got)).await.unwrap().unwrap();
            drop(client);
            closing.await.unwrap();
            let frames = server_frames(&got);
            let (close, texts) = frames.split_last().unwrap();
            assert_eq!((close.0, &close.1[..2]), (wire::OP_CLOSE, &code.to_be_bytes()[..]), "{code}");
            let numbers: Vec<usize> =
                texts.iter().map(|(_, t)| std::str::from_utf8(t).unwrap().parse().unwrap()).collect();
            assert_eq!(numbers, (0..numbers.len()).collect::<Vec<_>>(), "{code}: in order, none missing");
            // The frames the kernel took, the last perhaps in part.
            let begun = written.div_ceil(size);
            assert_eq!(numbers.len(), if drops { begun } else { total }, "{code}: {begun} begun of {total}");
        }
    }

    #[test]
    fn closes_the_client_cannot_or_may_not_go_on_after_drop_what_is_queued() {
        let reason = |code: u16| CloseReason { code: CloseCode::Other(code), description: None };
        for code in [CLOSE_HEARTBEAT_TIMEOUT, CLOSE_TOKEN_EXPIRED, CLOSE_SLOW_CONSUMER] {
            assert!(drops_queued(&reason(code)), "{code}");
        }
        // A shutdown's `since=N` counts what is queued; a failed subscribe
        // or a protocol error leaves the client's position as it is.
        for code in [1001, CLOSE_UNAVAILABLE, 1002, 1007, 1009] {
            assert!(!drops_queued(&reason(code)), "{code}");
        }
        for code in [CloseCode::Normal, CloseCode::Protocol, CloseCode::Size] {
            assert!(!drops_queued(&CloseReason { code, description: None }), "{code:?}");
        }
    }

    #[test]
    fn client_messages_parse_or_say_why() {
        assert_eq!(ClientMessage::parse(r#"{"type":"ping"}"#), Ok(ClientMessage::Ping));
        match ClientMessage::parse(r#"{"type":"subscribe","filter":{"status":"pending"},"since":"12"}"#).unwrap() {
            ClientMessage::Subscribe { filter, since, snapshot } => {
                assert_eq!(since, Some(12));
                assert!(!snapshot);
                assert_eq!(filter.statuses.len(), 1);
            }
            other => panic!("{other:?}"),
        }
        for (bad, code) in [
            ("{", "malformed_json"),
            ("[]", "invalid_message"),
            (r#"{"type":"dance"}"#, "unknown_type"),
            (r#"{"type":"subscribe","since":-1}"#, "invalid_position"),
            (r#"{"type":"subscribe","since":true}"#, "invalid_position"),
            (r#"{"type":"subscribe","filter":{"status":"nope"}}"#, "validation_failed"),
            (r#"{"type":"subscribe","extra":1}"#, "unknown_field"),
            (r#"{"type":"ping","type":"subscribe"}"#, "malformed_json"),
        ] {
            assert_eq!(ClientMessage::parse(bad).unwrap_err().code, code, "{bad}");
        }
        // An unknown key is named in `field`.
        assert_eq!(ClientMessage::parse(r#"{"type":"subscribe","extra":1}"#).unwrap_err().field, "extra");
    }
}
