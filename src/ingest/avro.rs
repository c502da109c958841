//! Avro order events (`schemas/order-event.avsc`, embedded at build time).
//!
//! A datum is decoded with apache-avro and converted to the JSON shape of
//! `schemas/order-event.schema.json`, so that one parser validates both
//! formats. Two framings are accepted: the bare binary datum, and Avro
//! single-object encoding (`C3 01` + the schema's CRC-64-AVRO fingerprint),
//! which lets a producer say which schema it used; a fingerprint of another
//! schema is rejected rather than misread. There is no schema registry, so the
//! Confluent framing (a registry id) is not decoded.

use std::sync::LazyLock;

use apache_avro::types::Value as Avro;
use apache_avro::Schema;
use chrono::{DateTime, SecondsFormat};
use rust_decimal::Decimal;
use serde_json::{Map, Value};

use super::event::{Reason, Rejection};

pub const SCHEMA_TEXT: &str = include_str!("../../schemas/order-event.avsc");

pub static SCHEMA: LazyLock<Schema> =
    LazyLock::new(|| Schema::parse_str(SCHEMA_TEXT).expect("schemas/order-event.avsc is a valid Avro schema"));

/// `C3 01` + the 8-byte fingerprint of SCHEMA.
pub static SINGLE_OBJECT_HEADER: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let mut h = vec![0xC3, 0x01];
    h.extend_from_slice(&SCHEMA.fingerprint::<apache_avro::rabin::Rabin>().bytes);
    h
});

fn invalid(detail: impl Into<String>) -> Rejection {
    Rejection::new(Reason::InvalidAvro, detail)
}

/// Decodes an Avro message into the JSON event shape.
pub fn decode(bytes: &[u8]) -> Result<Value, Rejection> {
    let mut body = bytes;
    if bytes.starts_with(&[0xC3, 0x01]) {
        // A bare datum of this schema cannot start with C3 01: that would be
        // a negative string length for event_id.
        if !bytes.starts_with(&SINGLE_OBJECT_HEADER) {
            return Err(invalid(
                "single-object encoding with a schema fingerprint that is not schemas/order-event.avsc",
            ));
        }
        body = &bytes[SINGLE_OBJECT_HEADER.len()..];
    }
    let datum = apache_avro::from_avro_datum(&SCHEMA, &mut body, None)
        .map_err(|e| invalid(format!("not an order event datum: {e}")))?;
    if !body.is_empty() {
        return Err(invalid(format!("{} bytes left over after the datum", body.len())));
    }
    to_json(datum)
}

/// Avro -> JSON in the shape `event::parse_event` reads. A null (an absent
/// optional field) is left out, which is what "not given" means in JSON.
pub fn to_json(value: Avro) -> Result<Value, Rejection> {
    Ok(match value {
        Avro::Null => Value::Null,
        Avro::Boolean(b) => Value::Bool(b),
        Avro::Int(i) => Value::from(i),
        Avro::Long(i) => Value::from(i),
        Avro::Float(f) => Value::from(f64::from(f)),
        Avro::Double(f) => Value::from(f),
        Avro::String(s) | Avro::Enum(_, s) => Value::String(s),
        Avro::Uuid(u) => Value::String(u.to_string()),
        Avro::Union(_, inner) => to_json(*inner)?,
        Avro::Decimal(d) => {
            // The schema's scale is 2; the unscaled value is a big-endian
            // two's-complement integer of any length.
            let bytes = <Vec<u8>>::try_from(&d).map_err(|e| invalid(format!("bad decimal: {e}")))?;
            if bytes.is_empty() || bytes.len() > 16 {
                return Err(invalid("unit_price: decimal out of range"));
            }
            let mut buf = [if bytes[0] & 0x80 != 0 { 0xFF } else { 0 }; 16];
            buf[16 - bytes.len()..].copy_from_slice(&bytes);
            let unscaled = i128::from_be_bytes(buf);
            let price = Decimal::try_from_i128_with_scale(unscaled, 2)
                .map_err(|_| invalid("unit_price: decimal out of range"))?;
            Value::String(price.to_string())
        }
        Avro::TimestampMillis(ms) => {
            let t = DateTime::from_timestamp_millis(ms).ok_or_else(|| invalid("occurred_at out of range"))?;
            Value::String(t.to_rfc3339_opts(SecondsFormat::Millis, true))
        }
        Avro::Record(fields) => {
            let mut map = Map::new();
            for (name, v) in fields {
                let v = to_json(v)?;
                if !v.is_null() {
                    map.insert(name, v);
                }
            }
            Value::Object(map)
        }
        other => return Err(invalid(format!("unexpected Avro value {other:?}"))),
    })
}

/// Encodes an event in the bare binary form; for producers written in Rust
/// and for tests. `unit_price` is given as a decimal string ("9.50").
pub fn encode(event: &Value) -> Result<Vec<u8>, String> {
    let o = &event["order"];
    let opt_str = |v: &Value| match v.as_str() {
        Some(s) => Avro::Union(1, Box::new(Avro::String(s.to_string()))),
        None => Avro::Union(0, Box::new(Avro::Null)),
    };
    let price = match &o["unit_price"] {
        Value::Null => Avro::Union(0, Box::new(Avro::Null)),
        v => {
            let text = v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
            let d: Decimal = text.parse().map_err(|e| format!("unit_price {text:?}: {e}"))?;
            let unscaled = (d * Decimal::from(100)).trunc().mantissa();
            let bytes = unscaled.to_be_bytes();
            let skip = bytes
                .windows(2)
                .take_while(|w| (w[0] == 0 && w[1] & 0x80 == 0) || (w[0] == 0xFF && w[1] & 0x80 != 0))
                .count();
            Avro::Union(1, Box::new(Avro::Decimal(apache_avro::Decimal::from(bytes[skip..].to_vec()))))
        }
    };
    let status = match o["status"].as_str() {
        Some(s) => {
            let i = crate::domain::Status::ALL.iter().position(|st| st.as_str() == s).ok_or(format!("status {s:?}"))?;
            Avro::Union(1, Box::new(Avro::Enum(i as u32, s.to_string())))
        }
        None => Avro::Union(0, Box::new(Avro::Null)),
    };
    let kind = event["type"].as_str().unwrap_or("");
    let kind_index =
        super::event::EventType::ALL.iter().position(|t| t.as_str() == kind).ok_or(format!("type {kind:?}"))?;
    let occurred = event["occurred_at"].as_str().ok_or("occurred_at")?;
    let occurred = DateTime::parse_from_rfc3339(occurred).map_err(|e| e.to_string())?.timestamp_millis();
    let record = Avro::Record(vec![
        (
            "event_id".into(),
            Avro::Uuid(event["event_id"].as_str().ok_or("event_id")?.parse().map_err(|e| format!("{e}"))?),
        ),
        ("type".into(), Avro::Enum(kind_index as u32, kind.to_string())),
        (
            "order".into(),
            Avro::Record(vec![
                ("external_id".into(), Avro::String(o["external_id"].as_str().ok_or("external_id")?.to_string())),
                ("customer_name".into(), opt_str(&o["customer_name"])),
                ("customer_email".into(), opt_str(&o["customer_email"])),
                ("product".into(), opt_str(&o["product"])),
                (
                    "quantity".into(),
                    match o["quantity"].as_i64() {
                        Some(q) => Avro::Union(1, Box::new(Avro::Int(i32::try_from(q).map_err(|e| e.to_string())?))),
                        None => Avro::Union(0, Box::new(Avro::Null)),
                    },
                ),
                ("unit_price".into(), price),
                ("status".into(), status),
                ("error_message".into(), opt_str(&o["error_message"])),
            ]),
        ),
        ("occurred_at".into(), Avro::TimestampMillis(occurred)),
    ]);
    apache_avro::to_avro_datum(&SCHEMA, record).map_err(|e| e.to_string())
}

/// The single-object framing of `encode`.
pub fn encode_single_object(event: &Value) -> Result<Vec<u8>, String> {
    let mut out = SINGLE_OBJECT_HEADER.clone();
    out.extend(encode(event)?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::event::{parse_event, Change};
    use serde_json::json;

    fn event() -> Value {
        json!({
            "event_id": "5b6f0a5e-3f43-4c1e-9d55-0d3a0c2a7f10",
            "type": "order_created",
            "order": {"external_id": "ext-1", "customer_name": "Ada", "product": "Widget", "quantity": 2, "unit_price": "9.50", "status": "pending"},
            "occurred_at": "2025-01-31T12:00:00.000Z"
        })
    }

    #[test]
    fn a_datum_decodes_to_the_json_event_shape() {
        let json = decode(&encode(&event()).unwrap()).unwrap();
        assert_eq!(json["order"]["unit_price"], "9.50");
        assert_eq!(json["order"].get("customer_email"), None, "null means not given");
        let e = parse_event(&json, Some("ext-1")).unwrap();
        let Change::Create(o) = e.change else { panic!("not a create") };
        assert_eq!(o.unit_price, Decimal::new(95, 1));
        assert_eq!(e.occurred_at.timestamp(), 1738324800);
    }

    #[test]
    fn single_object_encoding_is_checked_against_the_fingerprint() {
        let framed = encode_single_object(&event()).unwrap();
        assert_eq!(decode(&framed).unwrap(), decode(&encode(&event()).unwrap()).unwrap());
        let mut other = framed.clone();
        other[5] ^= 0xFF;
        assert_eq!(decode(&other).unwrap_err().reason, Reason::InvalidAvro);
    }

    #[test]
    fn negative_and_large_prices_survive_the_decimal_conversion() {
        for price in ["0.01", "0.00", "123.45", "9999999999.99", "-1.50"] {
            let mut e = event();
            e["order"]["unit_price"] = json!(price);
            let json = decode(&encode(&e).unwrap()).unwrap();
            assert_eq!(
                json["order"]["unit_price"].as_str().unwrap().parse::<Decimal>().unwrap(),
                price.parse::<Decimal>().unwrap()
            );
        }
    }

    #[test]
    fn garbage_and_trailing_bytes_are_invalid_avro() {
        assert_eq!(decode(b"{\"event_id\": 1}").unwrap_err().reason, Reason::InvalidAvro);
        let mut bytes = encode(&event()).unwrap();
        bytes.push(0);
        assert_eq!(decode(&bytes).unwrap_err().reason, Reason::InvalidAvro);
        assert_eq!(decode(&[0x02]).unwrap_err().reason, Reason::InvalidAvro);
    }

    #[test]
    fn the_avro_schema_lists_every_status_and_event_type() {
        for s in crate::domain::Status::ALL {
            assert!(SCHEMA_TEXT.contains(&format!("\"{}\"", s.as_str())), "{s:?}");
        }
        for t in crate::ingest::event::EventType::ALL {
            assert!(SCHEMA_TEXT.contains(&format!("\"{}\"", t.as_str())), "{t:?}");
        }
    }
}
