//! Request bodies as JSON values, refusing an object that names one key
//! twice. RFC 8259 leaves such an object's meaning to the parser: serde_json
//! keeps the last value, other parsers (a gateway's, a validator's in front
//! of ordercast) the first, so `{"status":"cancelled","status":"processing"}`
//! could pass a check as one order and be stored as another.

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// `body` as a JSON value; an error names a key given twice in one object.
pub fn parse(body: &[u8]) -> serde_json::Result<Value> {
    serde_json::from_slice::<Unique>(body).map(|u| u.0)
}

struct Unique(Value);

impl<'de> Deserialize<'de> for Unique {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueVisitor).map(Unique)
    }
}

struct UniqueVisitor;

impl<'de> Visitor<'de> for UniqueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // As serde_json's own `Value` (JSON has no NaN or infinity).
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Unique(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut fields = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if fields.contains_key(&key) {
                let shown: String = key.chars().take(64).collect();
                return Err(de::Error::custom(format!("the key {shown:?} appears twice in one object")));
            }
            let Unique(v) = map.next_value()?;
            fields.insert(key, v);
        }
        Ok(Value::Object(fields))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_read_as_serde_json_reads_them_but_a_key_twice_is_refused() {
        let text = r#"{"a":[1,-2,3.5,1e300,"x",null,true,{"b":{}}],"c":"\u00e9"}"#;
        assert_eq!(parse(text.as_bytes()).unwrap(), serde_json::from_str::<Value>(text).unwrap());
        assert_eq!(parse(b"7").unwrap(), json!(7));
        let e = parse(br#"{"status":"cancelled","status":"processing"}"#).unwrap_err();
        assert!(e.to_string().starts_with(r#"the key "status" appears twice in one object"#), "{e}");
        assert!(parse(br#"{"a":{"b":1,"b":2}}"#).is_err(), "nested");
        assert!(parse(br#"[{"b":1},{"b":2}]"#).is_ok(), "one key each in two objects");
        // serde_json's own refusals stay: its depth limit, trailing data.
        assert!(parse("[".repeat(200).as_bytes()).is_err());
        assert!(parse(b"{} x").is_err());
    }
}
