//! Server-Sent Events: the fallback transport for browsers without WebSocket.
//!
//! `GET /api/events` takes the same filters as `/ws`. Every change carries
//! `id: <position>`, so EventSource's automatic reconnect resumes with
//! `Last-Event-ID`. `GET /api/orders/{id}/events` follows one order: its
//! current state first, then its changes.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header;
use actix_web::{get, web, HttpRequest, HttpResponse};
use bytes::Bytes;

use super::ws::{open_stream, position_message, ready_message, resync_message, snapshot_messages, Opened};
use super::{parse_position, QueryPairs, StreamParams};
use crate::changes::feed::{redacted, Item};
use crate::domain::ValidationError;
use crate::error::ApiError;
use crate::startup::AppState;

/// Comment lines keep proxies from timing the stream out.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
/// EventSource reconnect delay suggested to browsers, in milliseconds.
const RETRY_MS: u32 = 1000;
/// The same after a refusal while the database is away or the server full.
const REFUSED_RETRY_MS: std::ops::Range<u32> = 2000..5000;

/// The most of a shared batch handed to the HTTP layer at once. It copies
/// each piece into the connection's own buffer and asks for the next only
/// while that holds under 32 KiB: a batch handed whole (2,000 changes of a
/// bulk update, megabytes) would be copied whole for every stream, and kept
/// for as long as a client that stopped reading held its connection.
const PIECE_BYTES: usize = 16 * 1024;

/// The last event of a stream whose token expired.
const TOKEN_EXPIRED: &str = r#"{"type":"error","code":"token_expired","message":"token expired"}"#;

/// A shared batch's events as pieces of at most `PIECE_BYTES` (a change
/// larger than that is a piece alone), each a view of the shared bytes:
/// the first is returned, the others queued in `rest`.
fn in_pieces(batch: &crate::hub::SharedBatch, rest: &mut VecDeque<Bytes>) -> Bytes {
    let all = &batch.sse_events;
    if all.len() <= PIECE_BYTES {
        return all.clone();
    }
    let (mut start, mut end) = (0, 0);
    for change in &batch.changes {
        if end > start && end - start + change.sse.len() > PIECE_BYTES {
            rest.push_back(all.slice(start..end));
            start = end;
        }
        end += change.sse.len();
    }
    debug_assert_eq!(end, all.len(), "the batch's events are its changes' events");
    rest.push_back(all.slice(start..end));
    rest.pop_front().unwrap_or_default()
}

fn event(name: &str, id: Option<i64>, data: &str) -> Bytes {
    let id = id.map(|i| format!("id: {i}\n")).unwrap_or_default();
    Bytes::from(format!("event: {name}\n{id}data: {data}\n\n"))
}

struct Stream {
    _slot: crate::limits::ConnectionSlot,
    principal: crate::auth::Principal,
    prelude: VecDeque<Bytes>,
    /// The rest of a large batch, in pieces (see `PIECE_BYTES`).
    pieces: VecDeque<Bytes>,
    opened: Opened,
    keepalive: tokio::time::Interval,
    shutdown: tokio::sync::watch::Receiver<bool>,
    done: bool,
    state: Arc<AppState>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.state.sessions.sse.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

fn stream_response(
    state: Arc<AppState>,
    mut opened: Opened,
    params: &StreamParams,
    slot: crate::limits::ConnectionSlot,
    principal: crate::auth::Principal,
) -> HttpResponse {
    let mut prelude = VecDeque::new();
    prelude.push_back(Bytes::from(format!("retry: {RETRY_MS}\n\n")));
    if let Some((reason, position)) = opened.resync {
        prelude.push_back(event("resync", Some(position), &resync_message(reason, position)));
    }
    // The rows go out from the prelude: the page itself is not kept.
    if let Some(page) = opened.snapshot.take() {
        for msg in snapshot_messages(page) {
            prelude.push_back(event("snapshot", None, &msg));
        }
    }
    prelude.push_back(event("ready", Some(opened.seq), &ready_message(&opened, params)));
    let mut keepalive = tokio::time::interval(KEEPALIVE_INTERVAL);
    keepalive.reset();
    state.sessions.sse.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let st = Stream {
        _slot: slot,
        principal,
        prelude,
        pieces: VecDeque::new(),
        opened,
        keepalive,
        shutdown: state.shutdown.subscribe(),
        done: false,
        state,
    };
    let body = futures_util::stream::unfold(st, |mut st| async move {
        if let Some(b) = st.prelude.pop_front() {
            if st.prelude.is_empty() {
                // The snapshot's rows are on their way: their share of the
                // snapshot memory is free again.
                st.opened.snapshot_held = None;
            }
            return Some((Ok::<_, Infallible>(b), st));
        }
        if st.done {
            return None;
        }
        if let Some(piece) = st.pieces.pop_front() {
            if !st.principal.expired() {
                return Some((Ok(piece), st));
            }
            st.pieces.clear();
            st.done = true;
            return Some((Ok(event("error", None, TOKEN_EXPIRED)), st));
        }
        let chunk = tokio::select! {
            item = st.opened.feed.next() => match item {
                Some(Item::Change(c)) => c.sse.clone(),
                Some(Item::Batch(b)) => in_pieces(&b, &mut st.pieces),
                Some(Item::Redacted(c, side)) => redacted(&c, side).sse.clone(),
                Some(Item::Resync { reason, position }) => event("resync", Some(position), &resync_message(reason, position)),
                None => {
                    st.done = true;
                    event("shutdown", None, r#"{"type":"shutdown"}"#)
                }
            },
            // (An expired token is answered below.)
            _ = st.keepalive.tick() => {
                if let Some(p) = st.opened.feed.progress() {
                    // A filtered stream whose last matching change is long
                    // past moves its Last-Event-ID on: EventSource keeps the
                    // id of any event, even one nobody listens for.
                    event("position", Some(p), &position_message(p))
                } else {
                    // An event, not a comment: a page can tell a quiet
                    // stream from a dead one (EventSource hides comments).
                    Bytes::from_static(b"event: heartbeat\ndata: {\"type\":\"heartbeat\"}\n\n")
                }
            }
            _ = st.shutdown.wait_for(|s| *s) => {
                st.done = true;
                // With the id of a position it moved to, as `position`
                // events have: EventSource resumes from it.
                let moved = st.opened.feed.progress();
                event("shutdown", moved, &format!(r#"{{"type":"shutdown","seq":{}}}"#, st.opened.feed.position()))
            }
        };
        // Nothing more once the token has expired, whatever woke the stream
        // (the keep-alive check alone let changes through for up to 15 s).
        let chunk = if !st.done && st.principal.expired() {
            st.done = true;
            event("error", None, TOKEN_EXPIRED)
        } else {
            chunk
        };
        Some((Ok(chunk), st))
    });
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body)
}

/// `Last-Event-ID` (set by EventSource on reconnect) wins over `since` and
/// turns a snapshot request into a resume. A value that is not a position is
/// refused alike (422 `invalid_position`) whether it is text or not.
fn apply_last_event_id(req: &HttpRequest, params: &mut StreamParams) -> Result<(), ApiError> {
    if let Some(v) = req.headers().get("Last-Event-ID") {
        let v = v.to_str().map_err(|_| {
            ValidationError::with_code(
                "since",
                "invalid_position",
                "Last-Event-ID is not a position: it must be a non-negative whole number (visible ASCII digits)",
            )
        })?;
        if !v.trim().is_empty() {
            params.since = Some(parse_position(v)?);
            params.snapshot = false;
        }
    }
    Ok(())
}

#[utoipa::path(get, path = "/api/events", tag = "realtime",
    params(
        ("status" = Option<String>, Query, description = "Only changes to orders in (or leaving) these statuses"),
        ("id" = Option<String>, Query, description = "Only these order ids"),
        ("customer" = Option<String>, Query, description = "Only this customer"),
        ("since" = Option<i64>, Query, description = "Resume after this position"),
        ("snapshot" = Option<bool>, Query, description = "Send the matching current rows first, newest first"),
        ("snapshot_limit" = Option<i64>, Query, description = "At most this many snapshot rows (default 1000, at most 10000), and as many as fit in 4 MiB of JSON; the last snapshot message says truncated: true when more matched"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume position (sent by EventSource on reconnect)"),
    ),
    responses(
        (status = 200, description = "text/event-stream: events snapshot, ready, change, position, resync, shutdown, heartbeat (every 15 s); error (then the end) for a refusal asked with Accept: text/event-stream", content_type = "text/event-stream", body = String),
        (status = 422, description = "Invalid filter or position", body = crate::routes::openapi::ProblemDoc),
        (status = 503, description = "Refused for now, asked without Accept: text/event-stream: shutting_down, database_unavailable, too_many_connections, or server_busy (a snapshot while the streams hold all the snapshot memory they may)", body = crate::routes::openapi::ProblemDoc),
    ))]
#[get("/api/events")]
pub async fn events(req: HttpRequest, query: QueryPairs, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let opened = open_events(&req, query, state).await;
    retry_later(&req, opened)
}

async fn open_events(
    req: &HttpRequest,
    query: QueryPairs,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let (slot, principal) = admit(req, &state)?;
    let mut params = StreamParams::from_query(&query)?;
    apply_last_event_id(req, &mut params)?;
    super::ws::restrict(&mut params, &principal);
    let opened = open_stream(&state, &params).await?;
    Ok(stream_response(state.into_inner(), opened, &params, slot, principal))
}

#[utoipa::path(get, path = "/api/orders/{id}/events", tag = "realtime",
    params(
        ("id" = i64, Path, description = "Order id"),
        ("since" = Option<i64>, Query, description = "Resume after this position (no snapshot)"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume position (sent by EventSource on reconnect; wins over since)"),
    ),
    responses(
        (status = 200, description = "text/event-stream: the order's current state (snapshot), then its changes", content_type = "text/event-stream", body = String),
        (status = 400, description = "Invalid order id", body = crate::routes::openapi::ProblemDoc),
        (status = 404, description = "No such order", body = crate::routes::openapi::ProblemDoc),
        (status = 422, description = "Invalid position or unknown query parameter", body = crate::routes::openapi::ProblemDoc),
        (status = 503, description = "Refused for now, asked without Accept: text/event-stream: shutting_down, database_unavailable, too_many_connections, or server_busy (the streams hold all the snapshot memory they may; the order's state is its snapshot)", body = crate::routes::openapi::ProblemDoc),
    ))]
#[get("/api/orders/{id}/events")]
pub async fn order_events(
    req: HttpRequest,
    path: web::Path<String>,
    query: QueryPairs,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let opened = open_order_events(&req, &path, &query, state).await;
    retry_later(&req, opened)
}

async fn open_order_events(
    req: &HttpRequest,
    path: &str,
    query: &[(String, String)],
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = super::orders::parse_id(path)?;
    let mut params = StreamParams { snapshot: true, snapshot_limit: 1, ..Default::default() };
    for (k, v) in query {
        match k.as_str() {
            "since" => {
                params.since = Some(parse_position(v)?);
                params.snapshot = false;
            }
            "access_token" => {}
            other => return Err(super::unknown_parameter(other).into()),
        }
    }
    let (slot, principal) = admit(req, &state)?;
    params.filter.ids = params.filter.ids.with([id]);
    apply_last_event_id(req, &mut params)?;
    super::ws::restrict(&mut params, &principal);
    let opened = open_stream(&state, &params).await?;
    if opened.snapshot.as_ref().is_some_and(|p| p.items.is_empty()) {
        return Err(ApiError::NotFound(format!("order {id} does not exist")));
    }
    Ok(stream_response(state.into_inner(), opened, &params, slot, principal))
}

/// A refusal for now (503: the server is stopping, the database is away,
/// the server holds its maximum of connections), asked for by an event-stream
/// client, is answered as a stream: `retry:`, an `error` event carrying the
/// problem's code, and the end. EventSource gives up for good on any status
/// but 200; this way it tries again after the pause, resuming with its
/// `Last-Event-ID`. The pause is a second when the server stops (another
/// instance, or this one restarted, takes over at once), 2-5 s, spread at
/// random, otherwise: clients refused together do not all come back
/// together, and a refusal that lasts costs one request per client every
/// few seconds. Other clients, and every other refusal, get the problem.
fn retry_later(req: &HttpRequest, opened: Result<HttpResponse, ApiError>) -> Result<HttpResponse, ApiError> {
    use actix_web::ResponseError;
    use rand::Rng;
    let e = match opened {
        Err(e) if e.status_code() == actix_web::http::StatusCode::SERVICE_UNAVAILABLE && wants_event_stream(req) => e,
        other => return other,
    };
    let retry = match e {
        ApiError::ShuttingDown => RETRY_MS,
        _ => rand::thread_rng().gen_range(REFUSED_RETRY_MS),
    };
    let data = serde_json::json!({ "type": "error", "status": 503, "code": e.code(), "message": e.to_string() });
    let mut body = format!("retry: {retry}\n\n").into_bytes();
    body.extend_from_slice(&event("error", None, &data.to_string()));
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(body))
}

/// Whether the request's `Accept` names `text/event-stream`, as EventSource's does.
fn wants_event_stream(req: &HttpRequest) -> bool {
    req.headers()
        .get_all(header::ACCEPT)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|m| m.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream")))
}

/// Takes a connection slot for the caller (429/503 when over the limits).
fn admit(
    req: &HttpRequest,
    state: &AppState,
) -> Result<(crate::limits::ConnectionSlot, crate::auth::Principal), ApiError> {
    super::ws::refuse_while_shutting_down(state)?;
    let ip = req.peer_addr().map(|a| a.ip()).unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
    let slot = state.connections.acquire(ip).map_err(super::ws::too_many)?;
    Ok((slot, crate::auth::principal(req)))
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(events).service(order_events);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A large batch goes out as views of its shared bytes, cut between
    /// changes, none over the piece size but a change that is larger alone;
    /// together they are the batch.
    #[test]
    fn a_large_batch_goes_out_in_pieces_cut_between_changes() {
        let sized = |pos: i64, len: usize| {
            Arc::new(crate::changes::Change {
                sse: Bytes::from(vec![b'a' + (pos % 26) as u8; len]),
                ..Arc::into_inner(crate::hub::tests::change(pos)).unwrap()
            })
        };
        let lens = [5000, 7000, 6000, 40_000, 100, 16_384, 1, 9000, 9000];
        let changes: Vec<_> = lens.iter().enumerate().map(|(i, &l)| sized(i as i64, l)).collect();
        let batch = crate::hub::SharedBatch::new(changes);
        let mut rest = VecDeque::new();
        let first = in_pieces(&batch, &mut rest);
        let pieces: Vec<Bytes> = std::iter::once(first).chain(rest.drain(..)).collect();
        let sizes: Vec<usize> = pieces.iter().map(Bytes::len).collect();
        assert_eq!(sizes, [12_000, 6000, 40_000, 100, 16_384, 9001, 9000]);
        assert_eq!(pieces.concat(), batch.sse_events.to_vec());
        // Views, not copies.
        let base = batch.sse_events.as_ptr() as usize;
        assert!(pieces.iter().all(|p| (base..base + batch.sse_events.len()).contains(&(p.as_ptr() as usize))));
        // A small batch is handed over as it is.
        let small = crate::hub::SharedBatch::new(vec![sized(1, 100), sized(2, 100)]);
        assert_eq!(in_pieces(&small, &mut rest).len(), 200);
        assert!(rest.is_empty());
    }
}
