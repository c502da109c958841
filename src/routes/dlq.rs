//! `GET /api/dlq`: the most recent dead letters of the Kafka ingest, newest
//! first, from the `dead_letters` table (the dead-letter topic gets the same
//! messages). Keys and payloads are shown as text when they are UTF-8, else
//! base64, cut at `KEY_PREVIEW` and `PAYLOAD_PREVIEW` bytes; headers past
//! `HEADERS_PREVIEW` by their keys alone; details at `MAX_DETAIL` bytes.

use actix_web::{route, web, HttpResponse};
use base64::Engine;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::{parse_limit, QueryPairs};
use crate::error::ApiError;
use crate::ingest::event::{cap_detail_of, MAX_DETAIL};
use crate::startup::AppState;

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 500;
/// Payload bytes shown per dead letter; the full message is in the topic.
pub const PAYLOAD_PREVIEW: i32 = 4096;
/// Key bytes shown per dead letter (a key is rarely longer).
pub const KEY_PREVIEW: i32 = 4096;
/// The most of a dead letter's headers shown (as JSON text, in bytes):
/// past it, only their keys, of the first `HEADER_KEYS` headers, each cut to
/// `HEADER_KEY_PREVIEW` characters. With the detail cut to `MAX_DETAIL`
/// bytes, a page then holds at most 500 times about 40 KiB.
pub const HEADERS_PREVIEW: i32 = 16 * 1024;
pub const HEADER_KEYS: i64 = 100;
pub const HEADER_KEY_PREVIEW: i32 = 256;

/// One dead-lettered Kafka message.
#[derive(Serialize, ToSchema)]
#[schema(as = DeadLetter)]
pub struct DeadLetterDoc {
    /// Pass as `before` to page further back.
    pub id: i64,
    /// Stable code: empty_payload, unsupported_content_type, invalid_json, invalid_avro,
    /// invalid_event, validation_failed, key_mismatch, unknown_order, order_exists,
    /// invalid_transition, order_locked, database_rejected.
    pub reason: String,
    /// What exactly was wrong.
    pub detail: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub group_id: String,
    /// The first 4096 bytes of the key, as text or base64 (see key_encoding).
    pub key: Option<String>,
    /// "utf8" or "base64".
    pub key_encoding: String,
    pub key_size: i32,
    pub key_truncated: bool,
    /// The first 4096 bytes of the value, as text or base64 (see payload_encoding).
    pub payload: Option<String>,
    /// "utf8" or "base64".
    pub payload_encoding: String,
    pub payload_size: i32,
    pub payload_truncated: bool,
    /// The original headers, `[{"key", "value" | "value_base64"}]`; past
    /// 16 KiB of JSON, only their keys (see headers_truncated).
    pub headers: serde_json::Value,
    pub headers_truncated: bool,
    pub event_id: Option<String>,
    /// The original message's timestamp.
    pub message_timestamp: Option<String>,
    pub received_at: String,
    /// When it was produced to the dead-letter topic (null: not yet).
    pub published_at: Option<String>,
}

/// A page of dead letters.
#[derive(Serialize, ToSchema)]
#[schema(as = DeadLetterPage)]
pub struct DeadLetterPageDoc {
    pub items: Vec<DeadLetterDoc>,
    /// Pass as `before` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// A payload's preview as text or base64. `cut`: the stored payload is
/// longer than the preview, so an incomplete UTF-8 sequence at the end may
/// be the preview's doing; otherwise it is in the message, which is not text.
fn text_or_base64(bytes: &[u8], cut: bool) -> (String, &'static str) {
    match std::str::from_utf8(bytes) {
        Ok(s) => (s.to_string(), "utf8"),
        Err(e) if cut && e.error_len().is_none() && e.valid_up_to() + 4 > bytes.len() => {
            // Cut inside a UTF-8 sequence by the preview limit: still text.
            (String::from_utf8_lossy(&bytes[..e.valid_up_to()]).into_owned(), "utf8")
        }
        Err(_) => (base64::engine::general_purpose::STANDARD.encode(bytes), "base64"),
    }
}

/// Recent dead letters of the Kafka ingest, newest first.
#[utoipa::path(get, path = "/api/dlq", tag = "ingest",
    params(
        ("limit" = Option<i64>, Query, description = "Page size (default 50, at most 500)"),
        ("reason" = Option<String>, Query, description = "Only this reason code"),
        ("before" = Option<String>, Query, description = "next_cursor of the previous page"),
    ),
    responses(
        (status = 200, description = "Dead letters, newest first", body = DeadLetterPageDoc),
        (status = 403, description = "A token restricted to one customer", body = crate::routes::openapi::ProblemDoc),
        (status = 422, description = "Invalid parameter", body = crate::routes::openapi::ProblemDoc),
    ))]
#[route("/api/dlq", method = "GET", method = "HEAD")]
pub async fn list(
    req: actix_web::HttpRequest,
    query: QueryPairs,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    // Dead letters are any customer's messages, undecodable ones included.
    crate::auth::unconfined(&req, "dead letters hold every customer's messages")?;
    let mut limit = DEFAULT_LIMIT;
    let mut reason: Option<String> = None;
    let mut before: Option<i64> = None;
    for (k, v) in query.iter() {
        match k.as_str() {
            "limit" => limit = parse_limit("limit", v, MAX_LIMIT)?.unwrap_or(DEFAULT_LIMIT),
            "access_token" => {}
            "reason" if v.contains('\0') => {
                return Err(crate::domain::ValidationError::new("reason", "must not contain NUL characters").into())
            }
            "reason" => reason = Some(v.trim().to_string()).filter(|s| !s.is_empty()),
            "before" | "cursor" => before = super::parse_cursor("before", v)?,
            other => return Err(super::unknown_parameter(other).into()),
        }
    }
    let client = state.pool.get().await?;
    let rows = client
        .query(
            "SELECT id, reason, left(detail, $9), kafka_topic, kafka_partition, kafka_offset, group_id, \
                    substring(message_key FROM 1 FOR $5), COALESCE(length(message_key), 0), \
                    substring(payload FROM 1 FOR $4), COALESCE(length(payload), 0), \
                    CASE WHEN octet_length(headers::text) <= $6 THEN headers \
                         ELSE (SELECT COALESCE(jsonb_agg(jsonb_build_object('key', left(h->>'key', $8)) \
                                                         ORDER BY i), '[]') \
                               FROM jsonb_array_elements(headers) WITH ORDINALITY AS e(h, i) WHERE i <= $7) END, \
                    octet_length(headers::text) > $6, \
                    event_id::text, message_timestamp, received_at, published_at, octet_length(detail) \
             FROM dead_letters \
             WHERE ($1::text IS NULL OR reason = $1) AND ($2::bigint IS NULL OR id < $2) \
             ORDER BY id DESC LIMIT $3",
            &[
                &reason,
                &before,
                &(limit + 1),
                &PAYLOAD_PREVIEW,
                &KEY_PREVIEW,
                &HEADERS_PREVIEW,
                &HEADER_KEYS,
                &HEADER_KEY_PREVIEW,
                // Characters: at least `MAX_DETAIL` bytes, cut to it below.
                &(MAX_DETAIL as i32),
            ],
        )
        .await?;
    let more = rows.len() as i64 > limit;
    let rows = &rows[..rows.len().min(limit as usize)];
    let stamp = |t: Option<DateTime<Utc>>| t.map(|t| t.to_rfc3339());
    let items: Vec<Value> = rows
        .iter()
        .map(|r| {
            let preview = |bytes: Option<Vec<u8>>, size: i32, limit: i32| match bytes {
                Some(b) => {
                    let (text, encoding) = text_or_base64(&b, size > limit);
                    (Some(text), encoding)
                }
                None => (None, "utf8"),
            };
            let (key_size, size): (i32, i32) = (r.get(8), r.get(10));
            let (key, key_encoding) = preview(r.get(7), key_size, KEY_PREVIEW);
            let (payload, encoding) = preview(r.get(9), size, PAYLOAD_PREVIEW);
            json!({
                "id": r.get::<_, i64>(0),
                "reason": r.get::<_, String>(1),
                // Dead letters recorded before details were capped may be long.
                "detail": cap_detail_of(r.get::<_, String>(2), r.get::<_, i32>(17) as usize),
                "topic": r.get::<_, String>(3),
                "partition": r.get::<_, i32>(4),
                "offset": r.get::<_, i64>(5),
                "group_id": r.get::<_, String>(6),
                "key": key,
                "key_encoding": key_encoding,
                "key_size": key_size,
                "key_truncated": key_size > KEY_PREVIEW,
                "payload": payload,
                "payload_encoding": encoding,
                "payload_size": size,
                "payload_truncated": size > PAYLOAD_PREVIEW,
                "headers": r.get::<_, Value>(11),
                "headers_truncated": r.get::<_, bool>(12),
                "event_id": r.get::<_, Option<String>>(13),
                "message_timestamp": stamp(r.get(14)),
                "received_at": stamp(Some(r.get(15))),
                "published_at": stamp(r.get(16)),
            })
        })
        .collect();
    let next_cursor = if more { rows.last().map(|r| r.get::<_, i64>(0).to_string()) } else { None };
    Ok(HttpResponse::Ok().json(json!({"items": items, "next_cursor": next_cursor})))
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(list);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_text_when_they_are_utf8_even_when_cut_mid_character() {
        assert_eq!(text_or_base64(b"{\"a\":1}", false), ("{\"a\":1}".to_string(), "utf8"));
        assert_eq!(text_or_base64("xé".as_bytes()[..2].as_ref(), true), ("x".to_string(), "utf8"));
        assert_eq!(text_or_base64(&[0xff, 0xfe, 0x00, 0x01, 0x02], false).1, "base64");
    }

    #[test]
    fn a_whole_payload_ending_in_an_incomplete_character_is_base64() {
        let bytes = "xé".as_bytes()[..2].to_vec();
        assert_eq!(text_or_base64(&bytes, false), ("eMM=".to_string(), "base64"));
        let four = [b'{', 0xf0, 0x9f, 0x98];
        assert_eq!(text_or_base64(&four, false).1, "base64");
        assert_eq!(text_or_base64(&four, true), ("{".to_string(), "utf8"));
    }
}
