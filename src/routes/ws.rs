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
//! One `select!` loop per connection over client frames, the feed, a
//! heartbeat and server shutdown.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_web::body::{BodyStream, BoxBody};
use actix_web::{get, web, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, CloseCode, CloseReason};
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{parse_position, QueryPairs, StreamParams};
use crate::changes::feed::{Feed, FeedError, Item};
use crate::changes::wire;
use crate::domain::{Filter, ValidationError};
use crate::error::ApiError;
use crate::startup::AppState;

/// How often the server pings.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// A client silent (no pong, no message) for this long is closed.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Snapshot rows per `snapshot` message.
const SNAPSHOT_CHUNK: usize = 200;
/// Writes (each one frame or a batch of frames) queued for the connection
/// before the session waits for the client to read. Small, so that a client
/// that stops reading backs up into its hub queue (and is marked lagged)
/// rather than here.
const OUT_QUEUE: usize = 4;

/// Close codes, documented in the README.
pub const CLOSE_HEARTBEAT_TIMEOUT: u16 = 4000;
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;
pub const CLOSE_UNAVAILABLE: u16 = 4503;
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
        let value: Value = serde_json::from_str(text)
            .map_err(|e| ValidationError::with_code("message", "malformed_json", format!("malformed JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| ValidationError::with_code("message", "invalid_message", "expected a JSON object"))?;
        match obj.get("type").and_then(Value::as_str) {
            Some("ping") => Ok(ClientMessage::Ping),
            Some("subscribe") => {
                if let Some(k) = obj.keys().find(|k| !["type", "filter", "since", "snapshot"].contains(&k.as_str())) {
                    return Err(ValidationError::with_code("message", "unknown_field", format!("unknown field {k:?}")));
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
    pub snapshot: Option<crate::routes::orders::Page>,
}

/// Opens a feed for stream parameters: with a snapshot, the rows and the
/// position they reflect are read in one snapshot and the feed continues
/// after that position, so nothing falls between the two.
pub async fn open_stream(state: &AppState, params: &StreamParams) -> Result<Opened, ApiError> {
    let (since, snapshot) = if params.snapshot {
        let page =
            crate::routes::orders::list_page(&state.pool, &params.filter, None, params.snapshot_limit, None).await?;
        (Some(page.position), Some(page))
    } else {
        (params.since, None)
    };
    let mut feed = Feed::open(&state.hub, &state.pool, params.filter.clone(), since).await.map_err(|e| match e {
        FeedError::Hub(_) => ApiError::Unavailable("the server is shutting down".into()),
        FeedError::Db(e) => e,
    })?;
    let resync = feed.take_initial_resync();
    Ok(Opened { seq: feed.position(), feed, snapshot, resync })
}

#[utoipa::path(get, path = "/ws", tag = "realtime",
    params(
        ("status" = Option<String>, Query, description = "Only changes to orders in (or leaving) these statuses"),
        ("id" = Option<String>, Query, description = "Only these order ids"),
        ("customer" = Option<String>, Query, description = "Only this customer (exact, case-insensitive)"),
        ("since" = Option<i64>, Query, description = "Resume after this position (the last seq received)"),
        ("snapshot" = Option<bool>, Query, description = "Send the matching current rows first"),
    ),
    responses(
        (status = 101, description = "WebSocket upgrade; see the README for the message protocol"),
        (status = 422, description = "Invalid filter or position", body = crate::routes::openapi::ProblemDoc),
    ))]
#[get("/ws")]
pub async fn ws(
    req: HttpRequest,
    body: web::Payload,
    query: QueryPairs,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
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
    if let Some((code, reason)) = refusal {
        let (response, session, _stream) = actix_ws::handle(&req, body)?;
        actix_web::rt::spawn(async move {
            let reason = CloseReason { code: CloseCode::Other(code), description: Some(reason) };
            let _ = session.close(Some(reason)).await;
        });
        return Ok(response);
    }
    let principal = crate::auth::principal(&req);
    let ip = req.peer_addr().map(|a| a.ip()).unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
    let slot = state.connections.acquire(ip).map_err(too_many)?;
    let mut params = StreamParams::from_query(&query)?;
    restrict(&mut params.filter, &principal);
    let opened = open_stream(&state, &params).await?;
    // actix-ws does the handshake and parses the client's frames; outgoing
    // frames bypass its `Session` (which re-frames and copies every message)
    // and go out as the complete, shared frames built once per change.
    let (response, _session, stream) = actix_ws::handle(&req, body)?;
    let (response, handshake_body) = response.into_parts();
    let (out, out_rx) = mpsc::channel(OUT_QUEUE);
    let response = response
        .set_body(BodyStream::new(FrameBody { frames: out_rx, _handshake_body: handshake_body }))
        .map_into_boxed_body();
    let stream = stream
        .max_frame_size(state.settings.max_frame_bytes)
        .aggregate_continuations()
        .max_continuation_size(state.settings.max_frame_bytes);
    let state = state.into_inner();
    actix_web::rt::spawn(async move {
        state.sessions.ws.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        run_session(state.clone(), out, stream, opened, params, principal).await;
        state.sessions.ws.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        drop(slot);
    });
    Ok(response)
}

/// A restricted token only ever sees its own customer's orders, whatever
/// filter it asks for.
pub fn restrict(filter: &mut Filter, principal: &crate::auth::Principal) {
    if let Some(c) = &principal.customer {
        filter.customer = Some(c.clone());
    }
}

pub fn too_many(refused: crate::limits::Refused) -> ApiError {
    match refused {
        crate::limits::Refused::Total => {
            ApiError::Unavailable("the server holds its maximum of streaming connections".into())
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

/// The response body of a WebSocket connection: complete frames, written by
/// the HTTP dispatcher as they come (whatever is queued goes out in one write).
struct FrameBody {
    frames: mpsc::Receiver<Bytes>,
    /// actix-ws's own body, never polled: dropping it tells its message stream
    /// that the connection is gone, so it must live exactly as long as ours.
    _handshake_body: BoxBody,
}

impl futures_util::Stream for FrameBody {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.frames.poll_recv(cx).map(|f| f.map(Ok))
    }
}

struct Conn {
    out: mpsc::Sender<Bytes>,
    write_timeout: Duration,
}

impl Conn {
    /// Queues complete frames. Only when the queue is full (the client is
    /// not reading) does it wait, with a timer: a client that does not read
    /// for `write_timeout` is too slow and gets closed.
    async fn send_frames(&mut self, frames: Bytes) -> Result<(), Outcome> {
        let frames = match self.out.try_send(frames) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(Outcome::Close(None)),
            Err(mpsc::error::TrySendError::Full(frames)) => frames,
        };
        match tokio::time::timeout(self.write_timeout, self.out.send(frames)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Outcome::Close(None)),
            Err(_) => Err(close(CLOSE_SLOW_CONSUMER, "slow consumer: the client stopped reading")),
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
    async fn announce(&mut self, opened: &Opened, params: &StreamParams) -> Result<(), Outcome> {
        if let Some((reason, position)) = opened.resync {
            self.send(resync_message(reason, position)).await?;
        }
        if let Some(page) = &opened.snapshot {
            for msg in snapshot_messages(page) {
                self.send(msg).await?;
            }
        }
        self.send(ready_message(opened, params)).await
    }
}

pub fn ready_message(opened: &Opened, params: &StreamParams) -> String {
    json!({
        "type": "ready",
        "seq": opened.seq,
        "snapshot": opened.snapshot.is_some(),
        "filter": filter_json(&params.filter),
    })
    .to_string()
}

/// `{"type":"snapshot","seq":P,"orders":[...],"last":bool,"truncated":bool}`
/// messages of at most `SNAPSHOT_CHUNK` rows (one, possibly empty, at least).
pub fn snapshot_messages(page: &crate::routes::orders::Page) -> Vec<String> {
    let chunks: Vec<&[String]> =
        if page.items.is_empty() { vec![&[]] } else { page.items.chunks(SNAPSHOT_CHUNK).collect() };
    let n = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, chunk)| {
            format!(
                r#"{{"type":"snapshot","seq":{},"orders":[{}],"last":{},"truncated":{}}}"#,
                page.position,
                chunk.join(","),
                i + 1 == n,
                page.next_cursor.is_some()
            )
        })
        .collect()
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

async fn run_session(
    state: std::sync::Arc<AppState>,
    out: mpsc::Sender<Bytes>,
    mut stream: actix_ws::AggregatedMessageStream,
    mut opened: Opened,
    mut params: StreamParams,
    principal: crate::auth::Principal,
) {
    let max_subscribes = state.settings.max_subscribes_per_minute;
    let mut subscribes: std::collections::VecDeque<Instant> = std::collections::VecDeque::new();
    let mut conn = Conn { out, write_timeout: state.settings.slow_client_timeout() };
    let mut shutdown = state.shutdown.subscribe();
    let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
    heartbeat.tick().await;
    let mut last_heard = Instant::now();

    let mut outcome = match conn.announce(&opened, &params).await {
        Ok(()) => Outcome::Continue,
        Err(o) => o,
    };
    while let Outcome::Continue = outcome {
        outcome = tokio::select! {
            msg = stream.recv() => {
                last_heard = Instant::now();
                match msg {
                    None => Outcome::Close(None),
                    Some(Ok(AggregatedMessage::Text(text))) => match ClientMessage::parse(&text) {
                        Ok(ClientMessage::Ping) => conn.send_json(json!({"type": "pong"})).await.err().unwrap_or(Outcome::Continue),
                        Ok(ClientMessage::Subscribe { .. }) if {
                            while subscribes.front().is_some_and(|t| t.elapsed() > Duration::from_secs(60)) {
                                subscribes.pop_front();
                            }
                            subscribes.len() as u32 >= max_subscribes
                        } => conn
                            .send_json(json!({"type": "error", "code": "too_many_subscribes", "message": format!("at most {max_subscribes} subscribe messages per minute")}))
                            .await
                            .err()
                            .unwrap_or(Outcome::Continue),
                        Ok(ClientMessage::Subscribe { mut filter, since, snapshot }) => {
                            subscribes.push_back(Instant::now());
                            restrict(&mut filter, &principal);
                            let next = StreamParams { filter, since, snapshot, snapshot_limit: params.snapshot_limit };
                            match open_stream(&state, &next).await {
                                Ok(o) => {
                                    opened = o;
                                    params = next;
                                    conn.announce(&opened, &params).await.err().unwrap_or(Outcome::Continue)
                                }
                                Err(ApiError::Validation(e)) => conn.send_json(error_message(&e)).await.err().unwrap_or(Outcome::Continue),
                                Err(e) => close(CLOSE_UNAVAILABLE, format!("cannot subscribe: {}", e.code())),
                            }
                        }
                        Err(e) => conn.send_json(error_message(&e)).await.err().unwrap_or(Outcome::Continue),
                    },
                    Some(Ok(AggregatedMessage::Binary(_))) => conn
                        .send_json(json!({"type": "error", "code": "binary_not_supported", "message": "send JSON text frames"}))
                        .await
                        .err()
                        .unwrap_or(Outcome::Continue),
                    Some(Ok(AggregatedMessage::Ping(bytes))) => {
                        // A control frame carries at most 125 bytes.
                        let bytes = &bytes[..bytes.len().min(125)];
                        conn.send_frames(wire::frame(wire::OP_PONG, bytes)).await.err().unwrap_or(Outcome::Continue)
                    }
                    Some(Ok(AggregatedMessage::Pong(_))) => Outcome::Continue,
                    Some(Ok(AggregatedMessage::Close(_))) => Outcome::Close(Some(CloseCode::Normal.into())),
                    Some(Err(e)) => {
                        let code = match e {
                            actix_ws::ProtocolError::Overflow => CloseCode::Size,
                            _ => CloseCode::Protocol,
                        };
                        Outcome::Close(Some(CloseReason { code, description: Some(e.to_string()) }))
                    }
                }
            }
            item = opened.feed.next() => match item {
                Some(Item::Change(c)) => conn.send_frames(c.ws_frame.clone()).await.err().unwrap_or(Outcome::Continue),
                Some(Item::Batch(b)) => conn.send_frames(b.ws_frames.clone()).await.err().unwrap_or(Outcome::Continue),
                Some(Item::Resync { reason, position }) => {
                    conn.send(resync_message(reason, position)).await.err().unwrap_or(Outcome::Continue)
                }
                None => close(1001, format!("server shutting down; resume with since={}", opened.feed.position())),
            },
            _ = heartbeat.tick() => {
                if principal.expired() {
                    close(CLOSE_TOKEN_EXPIRED, "token expired")
                } else if last_heard.elapsed() > CLIENT_TIMEOUT {
                    close(CLOSE_HEARTBEAT_TIMEOUT, "heartbeat timeout")
                } else {
                    conn.send_frames(wire::frame(wire::OP_PING, b"")).await.err().unwrap_or(Outcome::Continue)
                }
            }
            _ = shutdown.wait_for(|s| *s) => {
                close(1001, format!("server shutting down; resume with since={}", opened.feed.position()))
            }
        };
    }
    if let Outcome::Close(reason) = outcome {
        if let Some(r) = &reason {
            if r.code == CloseCode::Other(CLOSE_SLOW_CONSUMER) {
                state.hub.stats.slow_disconnects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            log::debug!("closing WebSocket: {:?} {:?}", r.code, r.description);
        }
        // The close frame may not get through to a client that stopped
        // reading; do not wait for it forever.
        let frame = match &reason {
            Some(r) => wire::close_frame(u16::from(r.code), r.description.as_deref().unwrap_or("")),
            None => wire::frame(wire::OP_CLOSE, b""),
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.out.send(frame)).await;
        // Dropping `conn` ends the response body: the connection closes once
        // the queued frames are written.
    }
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(ws);
}

#[cfg(test)]
mod tests {
    use super::*;

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
        ] {
            assert_eq!(ClientMessage::parse(bad).unwrap_err().code, code, "{bad}");
        }
    }
}
