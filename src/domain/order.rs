use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::ValidationError;

/// An order's status. The allowed transitions are enforced by the database
/// (`order_transitions` and the `orders_guard` trigger); `allowed_next` mirrors
/// them so clients can be offered only legal actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    Processing,
    Processed,
    Shipped,
    Delivered,
    Cancelled,
    Failed,
}

impl Status {
    pub const ALL: [Status; 7] = [
        Status::Pending,
        Status::Processing,
        Status::Processed,
        Status::Shipped,
        Status::Delivered,
        Status::Cancelled,
        Status::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Processing => "processing",
            Status::Processed => "processed",
            Status::Shipped => "shipped",
            Status::Delivered => "delivered",
            Status::Cancelled => "cancelled",
            Status::Failed => "failed",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn allowed_next(self) -> &'static [Status] {
        use Status::*;
        match self {
            Pending => &[Processing, Processed, Cancelled, Failed],
            Processing => &[Processed, Failed, Cancelled],
            Processed => &[Shipped, Cancelled],
            Shipped => &[Delivered],
            Delivered | Cancelled | Failed => &[],
        }
    }
}

impl FromStr for Status {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| {
            ValidationError::new(
                "status",
                format!("unknown status {s:?}; expected one of: {}", Status::ALL.map(Status::as_str).join(", ")),
            )
        })
    }
}

pub const MAX_TEXT: usize = 200;
pub const MAX_EMAIL: usize = 254;
pub const MAX_ERROR_MESSAGE: usize = 2000;
pub const MAX_QUANTITY: i64 = 1_000_000;

/// A validated new order.
#[derive(Debug, Clone, PartialEq)]
pub struct NewOrder {
    pub external_id: Option<String>,
    pub customer_name: String,
    pub customer_email: Option<String>,
    pub product: String,
    pub quantity: i32,
    pub unit_price: Decimal,
    pub status: Option<Status>,
}

/// A validated partial update. `Some(None)` clears a nullable field.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OrderPatch {
    pub customer_name: Option<String>,
    pub customer_email: Option<Option<String>>,
    pub product: Option<String>,
    pub quantity: Option<i32>,
    pub unit_price: Option<Decimal>,
    pub status: Option<Status>,
    pub error_message: Option<Option<String>>,
    /// Optimistic concurrency: the version the caller last saw.
    pub version: Option<i32>,
}

pub(crate) fn object(value: &Value) -> Result<&Map<String, Value>, ValidationError> {
    value.as_object().ok_or_else(|| ValidationError::with_code("body", "invalid_body", "expected a JSON object"))
}

pub(crate) fn reject_unknown(map: &Map<String, Value>, known: &[&str]) -> Result<(), ValidationError> {
    match map.keys().find(|k| !known.contains(&k.as_str())) {
        None => Ok(()),
        Some(k) => Err(ValidationError::unknown_field(
            k,
            format!("unknown field {k:?}; expected one of: {}", known.join(", ")),
        )),
    }
}

fn text(field: &'static str, v: &Value, max: usize) -> Result<String, ValidationError> {
    let s = v.as_str().ok_or_else(|| ValidationError::new(field, "must be a string"))?.trim();
    if s.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if s.chars().count() > max {
        return Err(ValidationError::new(field, format!("must be at most {max} characters")));
    }
    if s.contains('\0') {
        return Err(ValidationError::new(field, "must not contain NUL characters"));
    }
    Ok(s.to_string())
}

fn email(v: &Value) -> Result<Option<String>, ValidationError> {
    if v.is_null() {
        return Ok(None);
    }
    let s = text("customer_email", v, MAX_EMAIL)?;
    let valid = match s.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty() && !domain.is_empty() && !domain.contains('@') && !s.chars().any(char::is_whitespace)
        }
        None => false,
    };
    if !valid {
        return Err(ValidationError::new("customer_email", "must be an email address"));
    }
    Ok(Some(s))
}

/// A JSON number that is a whole number, also when written with a fraction
/// or an exponent (`2.0`, `1e3`): an integer to JSON Schema, and to the
/// published event schema.
fn whole_number(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_f64().filter(|f| f.fract() == 0.0 && f.abs() <= 1e15).map(|f| f as i64))
}

fn quantity(v: &Value) -> Result<i32, ValidationError> {
    let q = whole_number(v).ok_or_else(|| ValidationError::new("quantity", "must be a whole number"))?;
    if !(1..=MAX_QUANTITY).contains(&q) {
        return Err(ValidationError::new("quantity", format!("must be between 1 and {MAX_QUANTITY}")));
    }
    Ok(q as i32)
}

/// A decimal read exactly from its text, `12.50` or `1.5e3`, written as a
/// JSON number is (`-`, digits, an optional fraction, an optional exponent;
/// no `_` separators, `+` only in the exponent): None when it is not, or has
/// more digits than a `Decimal` holds (28), where `Decimal::from_str` and
/// `from_scientific` would round (`0.999...9`, 29 nines, to 1). The work is
/// bounded whatever the exponent (`0e2147483647` is 0 at once).
fn exact_decimal(text: &str) -> Option<Decimal> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let (mantissa, exponent) = match text.split_once(['e', 'E']) {
        Some((m, e)) => {
            let unsigned = e.strip_prefix(['+', '-']).unwrap_or(e);
            if !digits(unsigned) {
                return None;
            }
            (m, e.strip_prefix('+').unwrap_or(e).parse::<i32>().ok()?)
        }
        None => (text, 0),
    };
    let unsigned = mantissa.strip_prefix('-').unwrap_or(mantissa);
    let (whole, fraction) = unsigned.split_once('.').map_or((unsigned, None), |(w, f)| (w, Some(f)));
    if !digits(whole) || fraction.is_some_and(|f| !digits(f)) {
        return None;
    }
    let mut d = Decimal::from_str_exact(mantissa).ok()?;
    if d.is_zero() {
        return Some(Decimal::ZERO);
    }
    if exponent >= 0 {
        // Past this, a mantissa that is not zero no longer fits (at most
        // 28 digits, 10^28 and more after the point moved by its scale).
        if exponent > 28 + d.scale() as i32 {
            return None;
        }
        for _ in 0..exponent {
            d = d.checked_mul(Decimal::TEN)?;
        }
    } else {
        let scale = d.scale().checked_add(exponent.unsigned_abs())?;
        if scale > 28 {
            return None;
        }
        d.set_scale(scale).ok()?;
    }
    Some(d)
}

fn price(v: &Value) -> Result<Decimal, ValidationError> {
    let raw = match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.trim().to_string(),
        _ => return Err(ValidationError::new("unit_price", "must be a number")),
    };
    // A JSON number arrives as the double it reads as (19.999999999999999999
    // is 20, as in every JSON parser); a string is taken exactly, and more
    // digits than fit are refused, not rounded.
    let d = exact_decimal(&raw)
        .ok_or_else(|| {
            ValidationError::new("unit_price", "must be a number below 10000000000 with at most 2 decimal places")
        })?
        .normalize();
    if d.is_sign_negative() {
        return Err(ValidationError::new("unit_price", "must not be negative"));
    }
    if d.scale() > 2 {
        return Err(ValidationError::new("unit_price", "must have at most 2 decimal places"));
    }
    if d >= Decimal::from(10_000_000_000i64) {
        return Err(ValidationError::new("unit_price", "must be below 10000000000"));
    }
    Ok(d)
}

fn version(v: &Value) -> Result<i32, ValidationError> {
    whole_number(v)
        .filter(|n| (1..=i32::MAX as i64).contains(n))
        .map(|n| n as i32)
        .ok_or_else(|| ValidationError::new("version", "must be a positive whole number"))
}

/// The body a cancel or a delete may carry: `{"version": N}`, the expected
/// current version (like If-Match), or nothing (`None`).
pub fn parse_version_body(value: &Value) -> Result<Option<i32>, ValidationError> {
    let map = object(value)?;
    reject_unknown(map, &["version"])?;
    match map.get("version") {
        None => Ok(None),
        Some(Value::Null) => Err(ValidationError::new("version", "cannot be null")),
        Some(v) => version(v).map(Some),
    }
}

fn status(v: &Value) -> Result<Status, ValidationError> {
    v.as_str().ok_or_else(|| ValidationError::new("status", "must be a string"))?.parse()
}

fn error_message(v: &Value) -> Result<Option<String>, ValidationError> {
    if v.is_null() {
        return Ok(None);
    }
    text("error_message", v, MAX_ERROR_MESSAGE).map(Some)
}

fn required<'a>(map: &'a Map<String, Value>, field: &'static str) -> Result<&'a Value, ValidationError> {
    match map.get(field) {
        Some(v) if !v.is_null() => Ok(v),
        _ => Err(ValidationError::with_code(field, "missing_field", "is required")),
    }
}

impl NewOrder {
    pub const FIELDS: [&'static str; 7] =
        ["external_id", "customer_name", "customer_email", "product", "quantity", "unit_price", "status"];

    /// An external_id as every path must accept it: text, not blank, at
    /// most MAX_TEXT characters, no NUL; trimmed.
    pub fn parse_external_id(v: &Value) -> Result<String, ValidationError> {
        text("external_id", v, MAX_TEXT)
    }

    pub fn parse(value: &Value) -> Result<NewOrder, ValidationError> {
        let map = object(value)?;
        reject_unknown(map, &Self::FIELDS)?;
        Ok(NewOrder {
            external_id: match map.get("external_id") {
                None | Some(Value::Null) => None,
                Some(v) => Some(text("external_id", v, MAX_TEXT)?),
            },
            customer_name: text("customer_name", required(map, "customer_name")?, MAX_TEXT)?,
            customer_email: map.get("customer_email").map(email).transpose()?.flatten(),
            product: text("product", required(map, "product")?, MAX_TEXT)?,
            quantity: quantity(required(map, "quantity")?)?,
            unit_price: price(required(map, "unit_price")?)?,
            status: match map.get("status") {
                None | Some(Value::Null) => None,
                Some(v) => Some(status(v)?),
            },
        })
    }
}

impl OrderPatch {
    pub const FIELDS: [&'static str; 8] =
        ["customer_name", "customer_email", "product", "quantity", "unit_price", "status", "error_message", "version"];

    pub fn parse(value: &Value) -> Result<OrderPatch, ValidationError> {
        let map = object(value)?;
        reject_unknown(map, &Self::FIELDS)?;
        let non_null = |field: &'static str| -> Result<Option<&Value>, ValidationError> {
            match map.get(field) {
                None => Ok(None),
                Some(Value::Null) => Err(ValidationError::new(field, "cannot be null")),
                Some(v) => Ok(Some(v)),
            }
        };
        let patch = OrderPatch {
            customer_name: non_null("customer_name")?.map(|v| text("customer_name", v, MAX_TEXT)).transpose()?,
            customer_email: map.get("customer_email").map(email).transpose()?,
            product: non_null("product")?.map(|v| text("product", v, MAX_TEXT)).transpose()?,
            quantity: non_null("quantity")?.map(quantity).transpose()?,
            unit_price: non_null("unit_price")?.map(price).transpose()?,
            status: non_null("status")?.map(status).transpose()?,
            error_message: map.get("error_message").map(error_message).transpose()?,
            version: non_null("version")?.map(version).transpose()?,
        };
        if patch.is_empty() {
            return Err(ValidationError::with_code(
                "body",
                "empty_patch",
                format!("nothing to change; send at least one of: {}", Self::FIELDS[..7].join(", ")),
            ));
        }
        Ok(patch)
    }

    /// True when the patch changes nothing (a version alone is not a change).
    pub fn is_empty(&self) -> bool {
        self.customer_name.is_none()
            && self.customer_email.is_none()
            && self.product.is_none()
            && self.quantity.is_none()
            && self.unit_price.is_none()
            && self.status.is_none()
            && self.error_message.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn valid() -> Value {
        json!({"customer_name": "Ada", "product": "Widget", "quantity": 2, "unit_price": 9.5})
    }

    #[test]
    fn a_minimal_order_parses_and_is_trimmed() {
        let mut v = valid();
        v["customer_name"] = json!("  Ada  ");
        let o = NewOrder::parse(&v).unwrap();
        assert_eq!(o.customer_name, "Ada");
        assert_eq!(o.unit_price, Decimal::from_str("9.5").unwrap());
        assert_eq!(o.status, None);
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            ("customer_name", json!("")),
            ("customer_name", json!(12)),
            ("product", json!("   ")),
            ("quantity", json!(0)),
            ("quantity", json!(2.5)),
            ("quantity", json!("2")),
            ("quantity", json!(10_000_000)),
            ("unit_price", json!(-1)),
            ("unit_price", json!(1.234)),
            ("unit_price", json!("abc")),
            ("unit_price", json!(true)),
            ("customer_email", json!("not-an-email")),
            ("status", json!("teleported")),
        ];
        for (field, bad) in cases {
            let mut v = valid();
            v[field] = bad.clone();
            let err = NewOrder::parse(&v).unwrap_err();
            assert_eq!(err.field, field, "{field} = {bad}");
        }
    }

    #[test]
    fn a_whole_quantity_may_be_written_with_a_fraction_or_an_exponent() {
        for (q, expected) in [(json!(2.0), 2), (json!(1e3), 1000), (json!(1_000_000.0), 1_000_000)] {
            let mut v = valid();
            v["quantity"] = q.clone();
            assert_eq!(NewOrder::parse(&v).unwrap().quantity, expected, "{q}");
        }
        for (q, says) in [(json!(2.5), "whole number"), (json!(0.0), "between"), (json!(1e7), "between")] {
            let mut v = valid();
            v["quantity"] = q.clone();
            let err = NewOrder::parse(&v).unwrap_err();
            assert_eq!(err.field, "quantity", "{q}");
            assert!(err.message.contains(says), "{q}: {}", err.message);
        }
        assert_eq!(OrderPatch::parse(&json!({"quantity": 4.0})).unwrap().quantity, Some(4));
        // The body's version is read the same way.
        assert_eq!(OrderPatch::parse(&json!({"quantity": 4, "version": 2.0})).unwrap().version, Some(2));
        assert_eq!(OrderPatch::parse(&json!({"quantity": 4, "version": 2.5})).unwrap_err().field, "version");
    }

    #[test]
    fn missing_and_unknown_fields_are_rejected() {
        let err = NewOrder::parse(&json!({"product": "x", "quantity": 1, "unit_price": 1})).unwrap_err();
        assert_eq!((&*err.field, err.code), ("customer_name", "missing_field"));
        let mut v = valid();
        v["admin"] = json!(true);
        let err = NewOrder::parse(&v).unwrap_err();
        assert_eq!((&*err.field, err.code), ("admin", "unknown_field"));
        // A long key is cut in `field` (whole in the message), on a
        // character's boundary.
        let key = "é".repeat(100);
        let mut v = valid();
        v[&key] = json!(1);
        let err = OrderPatch::parse(&v).unwrap_err();
        assert_eq!((&*err.field, err.code), (format!("{}...", "é".repeat(64)).as_str(), "unknown_field"));
        assert!(err.message.contains(&key));
        assert_eq!(NewOrder::parse(&json!([1])).unwrap_err().code, "invalid_body");
    }

    #[test]
    fn prices_in_strings_are_read_exactly_exponents_too() {
        for (text, ok) in [
            ("12.50", Some("12.5")),
            ("1.5e1", Some("15")),
            ("1E3", Some("1000")),
            ("1e+2", Some("100")),
            ("125e-2", Some("1.25")),
            ("-0", Some("0")),
            ("0.99999999999999999999999999999", None),
            ("0.99999999999999999999999999999e0", None),
            ("19.999", None),
            ("1e-40", None),
            ("abc", None),
            // Zero and any exponent: zero, at once (it never overflows, so a
            // multiplication per unit of exponent ran two billion times).
            ("0e2147483647", Some("0")),
            ("0.00E2147483647", Some("0")),
            ("1e2147483647", None),
            ("0.0000000001e2147483647", None),
            ("1e99999999999", None),
            // Only the JSON number's grammar: no separators, no sign after a
            // sign, no bare point.
            ("1_000", None),
            ("1_2.5_0", None),
            ("1e+-2", None),
            ("1e-+2", None),
            ("1e", None),
            ("e2", None),
            ("+5", None),
            (".5", None),
            ("5.", None),
            ("1.2.3", None),
            (" 5", Some("5")),
            ("007.50", Some("7.5")),
            ("1.5e-1", Some("0.15")),
            ("1.5e-3", None),
            ("150e-2", Some("1.5")),
        ] {
            let mut v = valid();
            v["unit_price"] = json!(text);
            match ok {
                Some(d) => assert_eq!(NewOrder::parse(&v).unwrap().unit_price, Decimal::from_str(d).unwrap(), "{text}"),
                None => assert_eq!(NewOrder::parse(&v).unwrap_err().field, "unit_price", "{text}"),
            }
        }
    }

    #[test]
    fn prices_accept_strings_and_exponents() {
        let mut v = valid();
        v["unit_price"] = json!("12.30");
        assert_eq!(NewOrder::parse(&v).unwrap().unit_price, Decimal::from_str("12.3").unwrap());
        v["unit_price"] = json!(1e3);
        assert_eq!(NewOrder::parse(&v).unwrap().unit_price, Decimal::from(1000));
    }

    #[test]
    fn sql_metacharacters_are_kept_verbatim() {
        let mut v = valid();
        v["customer_name"] = json!("Robert'); DROP TABLE orders;--");
        assert_eq!(NewOrder::parse(&v).unwrap().customer_name, "Robert'); DROP TABLE orders;--");
    }

    #[test]
    fn a_patch_needs_a_change_and_may_clear_nullable_fields() {
        assert_eq!(OrderPatch::parse(&json!({})).unwrap_err().code, "empty_patch");
        assert_eq!(OrderPatch::parse(&json!({"version": 3})).unwrap_err().code, "empty_patch");
        let p = OrderPatch::parse(&json!({"customer_email": null, "status": "shipped", "version": 2})).unwrap();
        assert_eq!(p.customer_email, Some(None));
        assert_eq!(p.status, Some(Status::Shipped));
        assert_eq!(p.version, Some(2));
        assert_eq!(OrderPatch::parse(&json!({"product": null})).unwrap_err().field, "product");
    }

    #[test]
    fn transitions_mirror_the_database_rules() {
        assert!(Status::Pending.allowed_next().contains(&Status::Processed));
        assert!(Status::Delivered.allowed_next().is_empty());
        assert!(!Status::Shipped.allowed_next().contains(&Status::Cancelled));
    }
}
