//! Orders: validation of `POST /orders` bodies and the order record returned to clients.

use serde::Serialize;
use serde_json::{Map, Value};

/// Largest accepted `POST /orders` body.
pub const BODY_BYTES_MAX: usize = 64 * 1024;
/// Longest accepted `item`, in characters.
pub const ITEM_CHARS_MAX: usize = 200;
/// Longest accepted `Idempotency-Key`, in bytes.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 255;

/// A validated order request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    pub item: String,
    pub qty: i64,
}

/// A stored order, as returned by `POST /orders` and `GET /orders/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Order {
    pub id: i64,
    pub item: String,
    pub qty: i64,
    /// The instance that wrote the row.
    pub instance: String,
    /// The version of the instance that wrote the row.
    pub version: String,
    pub created_at_ms: i64,
}

/// A request that failed validation: names the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

fn invalid(field: &str, message: impl Into<String>) -> Invalid {
    Invalid { field: field.to_string(), message: message.into() }
}

/// Parses and validates a `POST /orders` body: a JSON object with a non-empty string `item` and a positive
/// integer `qty`, and nothing else.
pub fn parse_new_order(body: &[u8]) -> Result<NewOrder, Invalid> {
    let value: Value = serde_json::from_slice(body).map_err(|e| invalid("body", format!("invalid JSON: {e}")))?;
    let Value::Object(map) = value else {
        return Err(invalid("body", "expected a JSON object like {\"item\": \"book\", \"qty\": 1}"));
    };
    check_fields(&map)?;
    let item = match map.get("item") {
        None => return Err(invalid("item", "is required")),
        Some(Value::String(s)) if s.trim().is_empty() => return Err(invalid("item", "must not be empty")),
        Some(Value::String(s)) if s.chars().count() > ITEM_CHARS_MAX => {
            return Err(invalid("item", format!("must be at most {ITEM_CHARS_MAX} characters")))
        }
        Some(Value::String(s)) => s.clone(),
        Some(other) => return Err(invalid("item", format!("must be a string, got {}", kind(other)))),
    };
    let qty = match map.get("qty") {
        None => return Err(invalid("qty", "is required")),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(q) if q > 0 => q,
            _ => return Err(invalid("qty", format!("must be a positive integer, got {n}"))),
        },
        Some(other) => return Err(invalid("qty", format!("must be a positive integer, got {}", kind(other)))),
    };
    Ok(NewOrder { item, qty })
}

fn check_fields(map: &Map<String, Value>) -> Result<(), Invalid> {
    match map.keys().find(|k| !matches!(k.as_str(), "item" | "qty")) {
        Some(unknown) => Err(invalid(unknown, "unknown field (expected only item and qty)")),
        None => Ok(()),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Validates an `Idempotency-Key` header value.
pub fn parse_idempotency_key(raw: &[u8]) -> Result<String, Invalid> {
    const FIELD: &str = "Idempotency-Key";
    let s = std::str::from_utf8(raw).map_err(|_| invalid(FIELD, "must be visible ASCII"))?;
    if s.is_empty() {
        return Err(invalid(FIELD, "must not be empty"));
    }
    if s.len() > IDEMPOTENCY_KEY_BYTES_MAX {
        return Err(invalid(FIELD, format!("must be at most {IDEMPOTENCY_KEY_BYTES_MAX} bytes")));
    }
    if !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(FIELD, "must be visible ASCII without spaces"));
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(body: &str) -> String {
        parse_new_order(body.as_bytes()).unwrap_err().field
    }

    #[test]
    fn accepts_a_valid_order() {
        let o = parse_new_order(br#"{"item":"book","qty":3}"#).unwrap();
        assert_eq!(o, NewOrder { item: "book".into(), qty: 3 });
    }

    #[test]
    fn names_the_offending_field() {
        assert_eq!(field_of("{"), "body");
        assert_eq!(field_of("[1]"), "body");
        assert_eq!(field_of(r#"{"qty":1}"#), "item");
        assert_eq!(field_of(r#"{"item":"","qty":1}"#), "item");
        assert_eq!(field_of(r#"{"item":7,"qty":1}"#), "item");
        assert_eq!(field_of(r#"{"item":"a"}"#), "qty");
        assert_eq!(field_of(r#"{"item":"a","qty":0}"#), "qty");
        assert_eq!(field_of(r#"{"item":"a","qty":-2}"#), "qty");
        assert_eq!(field_of(r#"{"item":"a","qty":1.5}"#), "qty");
        assert_eq!(field_of(r#"{"item":"a","qty":"2"}"#), "qty");
        assert_eq!(field_of(r#"{"item":"a","qty":1,"price":3}"#), "price");
        let long = format!(r#"{{"item":"{}","qty":1}}"#, "x".repeat(ITEM_CHARS_MAX + 1));
        assert_eq!(field_of(&long), "item");
    }

    #[test]
    fn idempotency_keys() {
        assert!(parse_idempotency_key(b"abc-123").is_ok());
        assert!(parse_idempotency_key(b"").is_err());
        assert!(parse_idempotency_key(b"a b").is_err());
        assert!(parse_idempotency_key("x".repeat(256).as_bytes()).is_err());
    }
}
