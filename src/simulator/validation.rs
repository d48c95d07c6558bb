//! The request rules of the purchase endpoint, as Hyperline documents them.
//! Each violation gets a message naming the field at fault, because the
//! worker passes it on in its `rejected` event and the publisher has to know
//! what to fix.

use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// A validated purchase body.
pub(crate) struct Purchase {
    pub(crate) credit_count: u64,
    pub(crate) amount_excluding_tax: Option<u64>,
    pub(crate) price_id: Option<String>,
}

/// Applies the documented body rules: `credit_count` an integer of at least
/// 1; exactly one of `amount_excluding_tax` (an integer of at least 0) and
/// `price_id` (a non-empty string); `expires_at`, if given, RFC 3339. `null`
/// counts as absent; unknown fields are ignored.
pub(crate) fn parse_purchase(body: &[u8]) -> Result<Purchase, String> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|error| format!("request body is not valid JSON: {error}"))?;
    let Value::Object(fields) = value else {
        return Err("request body must be a JSON object".to_owned());
    };
    let credit_count = present(&fields, "credit_count")
        .ok_or("credit_count is required")?
        .as_u64()
        .filter(|count| *count >= 1)
        .ok_or("credit_count must be an integer greater than or equal to 1")?;
    let amount_excluding_tax = match present(&fields, "amount_excluding_tax") {
        None => None,
        Some(amount) => Some(amount.as_u64().ok_or(
            "amount_excluding_tax must be an integer greater than or equal to 0 \
             (in the currency's smallest unit)",
        )?),
    };
    let price_id = match present(&fields, "price_id") {
        None => None,
        Some(Value::String(id)) if !id.is_empty() => Some(id.clone()),
        Some(_) => return Err("price_id must be a non-empty string".to_owned()),
    };
    match (&amount_excluding_tax, &price_id) {
        (Some(_), Some(_)) => {
            return Err("give either amount_excluding_tax or price_id, not both".to_owned());
        }
        (None, None) => {
            return Err("either amount_excluding_tax or price_id is required".to_owned());
        }
        _ => {}
    }
    if let Some(expires_at) = present(&fields, "expires_at")
        && expires_at
            .as_str()
            .is_none_or(|text| OffsetDateTime::parse(text, &Rfc3339).is_err())
    {
        return Err("expires_at must be an RFC 3339 date-time".to_owned());
    }
    Ok(Purchase {
        credit_count,
        amount_excluding_tax,
        price_id,
    })
}

/// A field that is there and not `null`.
fn present<'a>(fields: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    fields.get(name).filter(|value| !value.is_null())
}

/// Ids the simulator knows: `[A-Za-z0-9_-]{1,128}`; anything else is an
/// unknown customer or product, as the real API answers for a bad id.
pub(crate) fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}
