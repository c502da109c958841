//! Order events: the bytes of one Kafka message turned into a validated
//! `OrderEvent`, or into a `Rejection` naming why it can never be applied.
//!
//! JSON and Avro meet in one place: an Avro datum is converted to the same
//! JSON shape (`avro::to_json`) and both go through `parse_event`, whose order
//! fields are checked by the REST API's own parsers (`NewOrder::parse`,
//! `OrderPatch::parse`), so Kafka and REST accept and reject the same things.

use std::fmt;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::avro;
use super::settings::Format;
use crate::domain::{NewOrder, OrderPatch, Status, ValidationError};

/// Why a message was dead-lettered. The string forms are stable: they appear
/// in the `dlq-reason` header, the `dead_letters` table and `GET /api/dlq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No value at all (a tombstone).
    EmptyPayload,
    /// A content-type this ingest does not decode.
    UnsupportedContentType,
    /// Not UTF-8 or not JSON.
    InvalidJson,
    /// Not a datum of `schemas/order-event.avsc`.
    InvalidAvro,
    /// The envelope is wrong: event_id, type, occurred_at, unknown fields.
    InvalidEvent,
    /// An order field failed the shared validation.
    ValidationFailed,
    /// The message key is not the order's external_id.
    KeyMismatch,
    /// An update, status change or cancellation for an order that does not exist.
    UnknownOrder,
    /// order_created for an external_id that already exists.
    OrderExists,
    /// The status machine forbids the change.
    InvalidTransition,
    /// The order has left `pending`: its product, quantity and unit price
    /// can no longer change.
    OrderLocked,
    /// The database refused the change (a constraint or trigger).
    DatabaseRejected,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::EmptyPayload => "empty_payload",
            Reason::UnsupportedContentType => "unsupported_content_type",
            Reason::InvalidJson => "invalid_json",
            Reason::InvalidAvro => "invalid_avro",
            Reason::InvalidEvent => "invalid_event",
            Reason::ValidationFailed => "validation_failed",
            Reason::KeyMismatch => "key_mismatch",
            Reason::UnknownOrder => "unknown_order",
            Reason::OrderExists => "order_exists",
            Reason::InvalidTransition => "invalid_transition",
            Reason::OrderLocked => "order_locked",
            Reason::DatabaseRejected => "database_rejected",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A permanent failure: this message will never apply, whatever we retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: Reason,
    pub detail: String,
    /// The event's id when the envelope got that far, for the operator.
    pub event_id: Option<Uuid>,
}

impl Rejection {
    /// The detail is cut to `MAX_DETAIL` bytes: it goes into the dead letter's
    /// `dlq-detail` header next to the original message, and must not make
    /// that message too large for the dead-letter topic.
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Rejection { reason, detail: cap_detail(detail.into()), event_id: None }
    }
}

/// The longest dead-letter detail kept, in bytes.
pub const MAX_DETAIL: usize = 1024;

/// A detail cut to `MAX_DETAIL` bytes at a character boundary, marked as cut.
pub fn cap_detail(s: String) -> String {
    let len = s.len();
    cap_detail_of(s, len)
}

/// `cap_detail` for the start of a detail of `len` bytes in all.
pub fn cap_detail_of(s: String, len: usize) -> String {
    if len <= MAX_DETAIL {
        return s;
    }
    format!("{}… (cut, {len} bytes in all)", crate::prefix_within(&s, MAX_DETAIL))
}

/// A value from the message quoted in a detail: at most 100 characters of it.
pub fn quote(s: &str) -> String {
    match s.char_indices().nth(100) {
        None => format!("{s:?}"),
        Some((end, _)) => format!("{:?}… ({} bytes in all)", &s[..end], s.len()),
    }
}

impl From<ValidationError> for Rejection {
    fn from(e: ValidationError) -> Self {
        Rejection::new(Reason::ValidationFailed, format!("order.{}: {} ({})", e.field, e.message, e.code))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    OrderCreated,
    OrderUpdated,
    StatusChanged,
    OrderCancelled,
}

impl EventType {
    pub const ALL: [EventType; 4] =
        [EventType::OrderCreated, EventType::OrderUpdated, EventType::StatusChanged, EventType::OrderCancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::OrderCreated => "order_created",
            EventType::OrderUpdated => "order_updated",
            EventType::StatusChanged => "status_changed",
            EventType::OrderCancelled => "order_cancelled",
        }
    }
}

/// What an event does to the order.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Create(NewOrder),
    Update(OrderPatch),
}

/// A validated event, ready to apply.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderEvent {
    pub event_id: Uuid,
    pub kind: EventType,
    pub external_id: String,
    pub change: Change,
    pub occurred_at: DateTime<Utc>,
}

const ENVELOPE_FIELDS: [&str; 4] = ["event_id", "type", "order", "occurred_at"];

/// How to read one message: from its content-type header, else the default.
pub fn format_of(content_type: Option<&[u8]>, default: Format) -> Result<Format, Rejection> {
    let Some(raw) = content_type else { return Ok(default) };
    let value = String::from_utf8_lossy(raw);
    let essence = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match essence.as_str() {
        "application/json" | "text/json" => Ok(Format::Json),
        "application/avro" | "avro/binary" | "application/vnd.apache.avro+binary" | "application/x-avro-binary" => {
            Ok(Format::Avro)
        }
        _ => Err(Rejection::new(
            Reason::UnsupportedContentType,
            format!("content-type {value:?} is not application/json or application/avro"),
        )),
    }
}

/// Decodes and validates one message.
pub fn decode(payload: Option<&[u8]>, key: Option<&[u8]>, format: Format) -> Result<OrderEvent, Rejection> {
    let bytes = match payload {
        Some(b) if !b.is_empty() => b,
        _ => return Err(Rejection::new(Reason::EmptyPayload, "the message has no value")),
    };
    let value = match format {
        // A key twice in one object is refused, as by the REST API: which
        // of its values counts is the parser's guess (serde_json's the last).
        Format::Json => crate::domain::json::parse(bytes)
            .map_err(|e| Rejection::new(Reason::InvalidJson, format!("not valid JSON: {e}")))?,
        Format::Avro => avro::decode(bytes)?,
    };
    let key = match key {
        None => None,
        Some(k) => Some(
            std::str::from_utf8(k)
                .map_err(|_| Rejection::new(Reason::KeyMismatch, "the message key is not UTF-8 text"))?,
        ),
    };
    parse_event(&value, key)
}

fn envelope_error(detail: impl Into<String>) -> Rejection {
    Rejection::new(Reason::InvalidEvent, detail)
}

/// Validates the envelope, then the order with the REST parsers.
pub fn parse_event(value: &Value, key: Option<&str>) -> Result<OrderEvent, Rejection> {
    let map = value.as_object().ok_or_else(|| envelope_error("the event must be a JSON object"))?;
    if let Some(k) = map.keys().find(|k| !ENVELOPE_FIELDS.contains(&k.as_str())) {
        return Err(envelope_error(format!("unknown field {}; expected {}", quote(k), ENVELOPE_FIELDS.join(", "))));
    }
    let event_id = match map.get("event_id") {
        Some(Value::String(s)) => {
            Uuid::parse_str(s).map_err(|_| envelope_error(format!("event_id {} is not a UUID", quote(s))))?
        }
        Some(_) => return Err(envelope_error("event_id must be a UUID string")),
        None => return Err(envelope_error("event_id is required")),
    };
    parse_identified(map, event_id, key).map_err(|r| Rejection { event_id: Some(event_id), ..r })
}

fn parse_identified(map: &Map<String, Value>, event_id: Uuid, key: Option<&str>) -> Result<OrderEvent, Rejection> {
    let kind = match map.get("type") {
        Some(Value::String(s)) => EventType::ALL.into_iter().find(|t| t.as_str() == s).ok_or_else(|| {
            envelope_error(format!(
                "unknown event type {}; expected one of: {}",
                quote(s),
                EventType::ALL.map(EventType::as_str).join(", ")
            ))
        })?,
        Some(_) => return Err(envelope_error("type must be a string")),
        None => return Err(envelope_error("type is required")),
    };
    let occurred_at = match map.get("occurred_at") {
        Some(Value::String(s)) => DateTime::parse_from_rfc3339(s)
            .map_err(|e| envelope_error(format!("occurred_at {} is not an RFC 3339 time: {e}", quote(s))))?
            .with_timezone(&Utc),
        Some(_) => return Err(envelope_error("occurred_at must be an RFC 3339 string")),
        None => return Err(envelope_error("occurred_at is required")),
    };
    let order = match map.get("order") {
        Some(Value::Object(o)) => o,
        Some(_) => return Err(envelope_error("order must be an object")),
        None => return Err(envelope_error("order is required")),
    };
    // The same rule for every event type as for creates (and REST): a NUL
    // or an unbounded length would otherwise reach the batch statements
    // (failing a whole multi-row UPDATE) and the dead letters' details.
    let (external_id, as_sent) = match order.get("external_id") {
        Some(v) => (NewOrder::parse_external_id(v)?, v.as_str().unwrap_or_default()),
        None => return Err(Rejection::new(Reason::ValidationFailed, "order.external_id: is required")),
    };
    // The key may be the external_id as the producer sent it, before the
    // surrounding spaces are trimmed off.
    if let Some(k) = key {
        if k != external_id && k != as_sent {
            return Err(Rejection::new(
                Reason::KeyMismatch,
                format!("the message key {} is not the order's external_id {}", quote(k), quote(&external_id)),
            ));
        }
    }
    let change = match kind {
        EventType::OrderCreated => Change::Create(NewOrder::parse(&Value::Object(order.clone()))?),
        EventType::OrderUpdated | EventType::StatusChanged | EventType::OrderCancelled => {
            let mut fields: Map<String, Value> = order.clone();
            fields.remove("external_id");
            match kind {
                EventType::StatusChanged if !fields.contains_key("status") => {
                    return Err(ValidationError::with_code("status", "missing_field", "is required").into())
                }
                EventType::OrderCancelled => match fields.get("status") {
                    None => {
                        fields.insert("status".into(), Value::from(Status::Cancelled.as_str()));
                    }
                    Some(Value::String(s)) if s == Status::Cancelled.as_str() => {}
                    Some(other) => {
                        return Err(ValidationError::new(
                            "status",
                            format!("order_cancelled cannot set the status to {other}"),
                        )
                        .into())
                    }
                },
                _ => {}
            }
            if fields.contains_key("version") {
                // Events are ordered by their partition, not by versions a
                // producer may not know.
                return Err(ValidationError::with_code(
                    "version",
                    "unknown_field",
                    "is not accepted in events; Kafka keeps one order's events in order",
                )
                .into());
            }
            Change::Update(OrderPatch::parse(&Value::Object(fields))?)
        }
    };
    Ok(OrderEvent { event_id, kind, external_id, change, occurred_at })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn created() -> Value {
        json!({
            "event_id": "5b6f0a5e-3f43-4c1e-9d55-0d3a0c2a7f10",
            "type": "order_created",
            "order": {"external_id": "ext-1", "customer_name": "Ada", "product": "Widget", "quantity": 2, "unit_price": 9.5, "status": "pending"},
            "occurred_at": "2025-01-31T12:00:00Z"
        })
    }

    fn reason(v: &Value, key: Option<&str>) -> Reason {
        parse_event(v, key).unwrap_err().reason
    }

    #[test]
    fn a_created_event_parses_with_the_rest_rules() {
        let e = parse_event(&created(), Some("ext-1")).unwrap();
        assert_eq!(e.kind, EventType::OrderCreated);
        assert_eq!(e.external_id, "ext-1");
        let Change::Create(o) = e.change else { panic!("not a create") };
        assert_eq!(o.external_id.as_deref(), Some("ext-1"));
        assert_eq!(o.quantity, 2);
        assert_eq!(o.status, Some(Status::Pending));
    }

    #[test]
    fn envelope_errors_are_invalid_event() {
        for (field, bad) in [
            ("event_id", json!("nope")),
            ("event_id", json!(7)),
            ("type", json!("order_teleported")),
            ("occurred_at", json!("yesterday")),
            // RFC 3339 has 4-digit years, all of them within PostgreSQL's
            // timestamptz (ingested_events.occurred_at); Avro's
            // timestamp-millis passes through the same parse.
            ("occurred_at", json!("-29719-04-05T22:13:20.000Z")),
            ("occurred_at", json!("+10000-01-01T00:00:00Z")),
            ("order", json!([1])),
        ] {
            let mut v = created();
            v[field] = bad.clone();
            assert_eq!(reason(&v, None), Reason::InvalidEvent, "{field} = {bad}");
        }
        let mut v = created();
        v["extra"] = json!(1);
        assert_eq!(reason(&v, None), Reason::InvalidEvent);
        assert_eq!(reason(&json!("x"), None), Reason::InvalidEvent);
    }

    #[test]
    fn order_fields_fail_validation_with_the_field_named() {
        let mut v = created();
        v["order"]["quantity"] = json!("two");
        let r = parse_event(&v, None).unwrap_err();
        assert_eq!(r.reason, Reason::ValidationFailed);
        assert!(r.detail.starts_with("order.quantity:"), "{}", r.detail);
        let mut v = created();
        v["order"]["unit_price"] = json!(1.234);
        assert_eq!(reason(&v, None), Reason::ValidationFailed);
        let mut v = created();
        v["order"].as_object_mut().unwrap().remove("external_id");
        assert_eq!(reason(&v, None), Reason::ValidationFailed);
    }

    #[test]
    fn the_key_must_be_the_external_id() {
        assert_eq!(reason(&created(), Some("ext-2")), Reason::KeyMismatch);
        assert!(parse_event(&created(), None).is_ok());
        // An external_id sent with spaces around it is stored trimmed; the
        // key may be either form, nothing else.
        let mut padded = created();
        padded["order"]["external_id"] = json!(" ext-1 ");
        for key in [" ext-1 ", "ext-1"] {
            let e = parse_event(&padded, Some(key)).unwrap();
            assert_eq!(e.external_id, "ext-1", "key {key:?}");
        }
        assert_eq!(reason(&padded, Some("ext-1 ")), Reason::KeyMismatch);
        assert_eq!(reason(&created(), Some(" ext-1")), Reason::KeyMismatch);
    }

    #[test]
    fn updates_become_patches() {
        let v = json!({"event_id": Uuid::new_v4(), "type": "status_changed", "order": {"external_id": "e", "status": "shipped"}, "occurred_at": "2025-01-31T12:00:00+01:00"});
        let e = parse_event(&v, Some("e")).unwrap();
        assert_eq!(e.change, Change::Update(OrderPatch { status: Some(Status::Shipped), ..Default::default() }));

        let v = json!({"event_id": Uuid::new_v4(), "type": "status_changed", "order": {"external_id": "e", "quantity": 3}, "occurred_at": "2025-01-31T12:00:00Z"});
        assert_eq!(reason(&v, None), Reason::ValidationFailed);

        let v = json!({"event_id": Uuid::new_v4(), "type": "order_cancelled", "order": {"external_id": "e"}, "occurred_at": "2025-01-31T12:00:00Z"});
        let e = parse_event(&v, None).unwrap();
        assert_eq!(e.change, Change::Update(OrderPatch { status: Some(Status::Cancelled), ..Default::default() }));

        let v = json!({"event_id": Uuid::new_v4(), "type": "order_cancelled", "order": {"external_id": "e", "status": "shipped"}, "occurred_at": "2025-01-31T12:00:00Z"});
        assert_eq!(reason(&v, None), Reason::ValidationFailed);

        let v = json!({"event_id": Uuid::new_v4(), "type": "order_updated", "order": {"external_id": "e"}, "occurred_at": "2025-01-31T12:00:00Z"});
        assert_eq!(reason(&v, None), Reason::ValidationFailed, "an update must change something");

        let v = json!({"event_id": Uuid::new_v4(), "type": "order_updated", "order": {"external_id": "e", "quantity": 1, "version": 2}, "occurred_at": "2025-01-31T12:00:00Z"});
        assert_eq!(reason(&v, None), Reason::ValidationFailed);
    }

    /// An update, status change or cancellation checks its external_id as a
    /// create does: a NUL or an over-long one is invalid alone, before any
    /// statement sees it.
    #[test]
    fn every_event_types_external_id_is_validated_like_a_creates() {
        let long = "x".repeat(201);
        for kind in ["order_created", "order_updated", "status_changed", "order_cancelled"] {
            for bad in [json!("a\u{0}b"), json!(long), json!("  "), json!(7), Value::Null] {
                let mut v = created();
                v["type"] = json!(kind);
                if kind != "order_created" {
                    v["order"] = json!({"status": "cancelled"});
                }
                v["order"]["external_id"] = bad.clone();
                let r = parse_event(&v, None).unwrap_err();
                assert_eq!(r.reason, Reason::ValidationFailed, "{kind} with {bad}: {r:?}");
                assert!(r.detail.starts_with("order.external_id:"), "{kind}: {}", r.detail);
                assert!(r.detail.len() < 200, "the detail does not repeat the value: {}", r.detail);
            }
            let mut v = created();
            v["type"] = json!(kind);
            if kind != "order_created" {
                v["order"] = json!({"status": "cancelled"});
            }
            v["order"]["external_id"] = json!("y".repeat(200));
            assert!(parse_event(&v, None).is_ok(), "{kind}: 200 characters are fine");
        }
    }

    #[test]
    fn details_and_the_values_they_quote_are_cut() {
        let key = "k".repeat(500_000);
        let r = parse_event(&created(), Some(&key)).unwrap_err();
        assert_eq!(r.reason, Reason::KeyMismatch);
        assert!(r.detail.len() < 300, "{}", r.detail);
        assert!(r.detail.contains("(500000 bytes in all)"), "{}", r.detail);
        let long = "é".repeat(1000); // 2 bytes each: a cut inside one must move back
        let cut = Rejection::new(Reason::DatabaseRejected, format!("x{long}")).detail;
        assert!(cut.len() <= MAX_DETAIL + 40 && cut.ends_with("… (cut, 2001 bytes in all)"), "{cut}");
        assert!(cut.starts_with("xéé"));
        assert_eq!(Rejection::new(Reason::DatabaseRejected, "short").detail, "short");
        assert_eq!(quote("ab"), "\"ab\"");
    }

    #[test]
    fn bytes_that_are_not_json_are_rejected_before_validation() {
        assert_eq!(decode(Some(b"\xff\xfe"), None, Format::Json).unwrap_err().reason, Reason::InvalidJson);
        assert_eq!(decode(Some(b"{\"event_id\":"), None, Format::Json).unwrap_err().reason, Reason::InvalidJson);
        assert_eq!(decode(None, None, Format::Json).unwrap_err().reason, Reason::EmptyPayload);
        assert_eq!(decode(Some(b""), None, Format::Json).unwrap_err().reason, Reason::EmptyPayload);
        let bytes = serde_json::to_vec(&created()).unwrap();
        assert!(decode(Some(&bytes), Some(b"ext-1"), Format::Json).is_ok());
        assert_eq!(decode(Some(&bytes), Some(b"\xff"), Format::Json).unwrap_err().reason, Reason::KeyMismatch);
        // A key named twice: its reason says which.
        let text = String::from_utf8(bytes).unwrap();
        let twice = text.replacen('{', r#"{"type":"order_cancelled","#, 1);
        let e = decode(Some(twice.as_bytes()), Some(b"ext-1"), Format::Json).unwrap_err();
        assert_eq!(e.reason, Reason::InvalidJson);
        assert!(e.detail.contains(r#"the key "type" appears twice"#), "{}", e.detail);
    }

    #[test]
    fn the_content_type_header_picks_the_format() {
        assert_eq!(format_of(None, Format::Avro), Ok(Format::Avro));
        assert_eq!(format_of(Some(b"application/json; charset=utf-8"), Format::Avro), Ok(Format::Json));
        assert_eq!(format_of(Some(b"Application/Avro"), Format::Json), Ok(Format::Avro));
        assert_eq!(format_of(Some(b"text/xml"), Format::Json).unwrap_err().reason, Reason::UnsupportedContentType);
    }

    /// The JSON Schema in schemas/ documents what this parser accepts.
    #[test]
    fn the_json_schema_lists_the_same_types_statuses_and_fields() {
        let schema: Value = serde_json::from_str(include_str!("../../schemas/order-event.schema.json")).unwrap();
        let types: Vec<&str> =
            schema["properties"]["type"]["enum"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(types, EventType::ALL.map(EventType::as_str));
        let required: Vec<&str> = schema["required"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(required, ENVELOPE_FIELDS);
        let order = &schema["$defs"]["order"];
        let statuses: Vec<&str> =
            order["properties"]["status"]["enum"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(statuses, Status::ALL.map(Status::as_str));
        let mut fields: Vec<&str> = order["properties"].as_object().unwrap().keys().map(String::as_str).collect();
        fields.sort_unstable();
        let mut known: Vec<&str> = NewOrder::FIELDS.to_vec();
        known.push("error_message");
        known.sort_unstable();
        assert_eq!(fields, known);
        for example in schema["examples"].as_array().unwrap() {
            parse_event(example, None).unwrap_or_else(|e| panic!("schema example rejected: {e:?}"));
        }
    }
}
