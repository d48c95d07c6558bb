//! Parsing a delivery into a [`Command`], or into the precise reason it is not one.
//!
//! Bad input must never crash the worker nor loop through the queue: every
//! byte string ends here as either a valid command or an [`InvalidCommand`]
//! that carries enough of the raw ids for the `invalid_command` event to tell
//! the publisher which message it was.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::ids::{
    CommandId, CreditCount, CustomerId, IdError, MAX_JSON_INTEGER, PriceId, ProductId,
};

/// Bodies above this are refused before any JSON parsing, so a huge message
/// costs a length check, not a parse.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// How the purchase is priced: exactly one of the two.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pricing {
    /// `amount_excluding_tax`, in the currency's smallest unit.
    Amount(u64),
    /// `price_id` of a bundle price.
    PriceId(PriceId),
}

/// A valid credit-purchase command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    /// The Idempotency-Key of every attempt.
    pub id: CommandId,
    /// Whose credits.
    pub customer_id: CustomerId,
    /// Which credits.
    pub product_id: ProductId,
    /// How many.
    pub credit_count: CreditCount,
    /// At what price.
    pub pricing: Pricing,
    /// `expires_at` exactly as the publisher wrote it (valid RFC 3339).
    pub expires_at: Option<String>,
}

/// The ids that could be read from an invalid message, for its event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawIds {
    /// The raw `command_id` (or `message_id`) when it was a string of at most
    /// 255 bytes.
    pub command_id: Option<String>,
    /// The raw `customer_id` under the same rule.
    pub customer_id: Option<String>,
    /// The raw `product_id` under the same rule.
    pub product_id: Option<String>,
    /// `credit_count` when it was a valid count.
    pub credit_count: Option<u64>,
}

/// Why a message is not a command. `Display` is the event's `error.message`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidReason {
    /// Over [`MAX_BODY_BYTES`].
    #[error("body is {0} bytes, over the 65536-byte limit")]
    TooLarge(usize),
    /// Not UTF-8.
    #[error("body is not valid UTF-8")]
    NotUtf8,
    /// Not a JSON object.
    #[error("body is not a JSON object")]
    NotAnObject,
    /// Not parseable JSON.
    #[error("body is not valid JSON: {0}")]
    Json(String),
    /// No `command_id` in the body and no AMQP `message_id`.
    #[error("command_id is missing (neither the body nor the message_id property has one)")]
    MissingCommandId,
    /// A required field is absent or null.
    #[error("{0} is missing")]
    Missing(&'static str),
    /// A field of the wrong JSON type.
    #[error("{field} must be {expected}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
    /// A field's value breaks its rule.
    #[error("{field} {error}")]
    Field { field: &'static str, error: IdError },
    /// Both `amount_excluding_tax` and `price_id`.
    #[error("give exactly one of amount_excluding_tax and price_id, not both")]
    BothPricings,
    /// Neither `amount_excluding_tax` nor `price_id`.
    #[error("give exactly one of amount_excluding_tax and price_id")]
    NoPricing,
    /// `expires_at` is not an RFC 3339 date-time.
    #[error("expires_at is not an RFC 3339 date-time")]
    ExpiresAt,
}

/// A message that is not a valid command, with what could be read of it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct InvalidCommand {
    /// What is wrong.
    pub reason: InvalidReason,
    /// What could be read (boxed: the error travels up by value and should
    /// stay small).
    pub raw: Box<RawIds>,
}

/// The fields of section 2, unparsed. `Option<&RawValue>` maps both an absent
/// field and `null` to `None`, which is what the contract says they mean.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow)]
    command_id: Option<&'a RawValue>,
    #[serde(borrow)]
    customer_id: Option<&'a RawValue>,
    #[serde(borrow)]
    product_id: Option<&'a RawValue>,
    #[serde(borrow)]
    credit_count: Option<&'a RawValue>,
    #[serde(borrow)]
    amount_excluding_tax: Option<&'a RawValue>,
    #[serde(borrow)]
    price_id: Option<&'a RawValue>,
    #[serde(borrow)]
    expires_at: Option<&'a RawValue>,
}

/// The string `raw` holds, or `None` if it is not a string.
fn as_string(raw: &RawValue) -> Option<String> {
    let text = raw.get();
    // Without a backslash, a string's value is its text between the
    // quotes: `serde_json` checked it (no control character; the body is
    // UTF-8) when it read the body, and a `RawValue` starts and ends with
    // its value. Decoding it again cost a deserializer per field
    // (BENCHMARKS.md, issue 30).
    match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        Some(plain) if !plain.contains('\\') => Some(plain.to_owned()),
        _ => serde_json::from_str::<String>(text).ok(),
    }
}

/// A raw id worth echoing in an event: a string of at most 255 bytes.
fn echo(raw: Option<&RawValue>) -> Option<String> {
    raw.and_then(as_string).filter(|s| s.len() <= 255)
}

/// A JSON integer written without fraction or exponent, in 0 ..= 2^53 − 1.
/// `serde_json` would accept `32.0` as a float and `1e3` too, so the text is
/// checked, not the number.
fn json_integer(field: &'static str, raw: &RawValue, min: u64) -> Result<u64, InvalidReason> {
    let text = raw.get();
    let digits = text.strip_prefix('-').unwrap_or(text);
    let is_number = text.starts_with(|c: char| c == '-' || c.is_ascii_digit());
    if !is_number {
        return Err(InvalidReason::WrongType {
            field,
            expected: "a JSON integer",
        });
    }
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(InvalidReason::WrongType {
            field,
            expected: "a whole number written without fraction or exponent",
        });
    }
    let range = InvalidReason::Field {
        field,
        error: IdError::Range {
            min,
            max: MAX_JSON_INTEGER,
        },
    };
    if text.starts_with('-') {
        return Err(range);
    }
    match digits.parse::<u64>() {
        Ok(n) if (min..=MAX_JSON_INTEGER).contains(&n) => Ok(n),
        _ => Err(range),
    }
}

fn string_field(field: &'static str, raw: &RawValue) -> Result<String, InvalidReason> {
    as_string(raw).ok_or(InvalidReason::WrongType {
        field,
        expected: "a string",
    })
}

fn required<'a>(
    field: &'static str,
    raw: Option<&'a RawValue>,
) -> Result<&'a RawValue, InvalidReason> {
    raw.ok_or(InvalidReason::Missing(field))
}

fn field<T>(
    field: &'static str,
    raw: Option<&RawValue>,
    parse: impl FnOnce(String) -> Result<T, IdError>,
) -> Result<T, InvalidReason> {
    parse(string_field(field, required(field, raw)?)?)
        .map_err(|error| InvalidReason::Field { field, error })
}

impl Command {
    /// Parses an AMQP body, with the delivery's `message_id` as the fallback
    /// command id.
    pub fn parse(body: &[u8], message_id: Option<&str>) -> Result<Command, InvalidCommand> {
        let fallback_id = || message_id.filter(|id| id.len() <= 255).map(str::to_owned);
        let fail = |reason, raw: RawIds| InvalidCommand {
            reason,
            raw: Box::new(raw),
        };
        let bare = || RawIds {
            command_id: fallback_id(),
            ..RawIds::default()
        };
        if body.len() > MAX_BODY_BYTES {
            return Err(fail(InvalidReason::TooLarge(body.len()), bare()));
        }
        let text = std::str::from_utf8(body).map_err(|_| fail(InvalidReason::NotUtf8, bare()))?;
        if !text.trim_start().starts_with('{') {
            return Err(fail(InvalidReason::NotAnObject, bare()));
        }
        let fields: Fields<'_> = serde_json::from_str(text)
            .map_err(|e| fail(InvalidReason::Json(e.to_string()), bare()))?;
        // Read for the event of an invalid command only: a valid one would
        // decode and copy every id twice.
        let raw = || RawIds {
            command_id: match fields.command_id {
                Some(id) => echo(Some(id)),
                None => fallback_id(),
            },
            customer_id: echo(fields.customer_id),
            product_id: echo(fields.product_id),
            credit_count: fields
                .credit_count
                .and_then(|c| json_integer("credit_count", c, 1).ok()),
        };
        Self::from_fields(&fields, message_id).map_err(|reason| fail(reason, raw()))
    }

    fn from_fields(f: &Fields<'_>, message_id: Option<&str>) -> Result<Command, InvalidReason> {
        let id = match (f.command_id, message_id) {
            (Some(raw), _) => field("command_id", Some(raw), CommandId::parse)?,
            (None, Some(message_id)) => {
                CommandId::parse(message_id).map_err(|error| InvalidReason::Field {
                    field: "command_id (from message_id)",
                    error,
                })?
            }
            (None, None) => return Err(InvalidReason::MissingCommandId),
        };
        let customer_id = field("customer_id", f.customer_id, CustomerId::parse)?;
        let product_id = field("product_id", f.product_id, ProductId::parse)?;
        let count = json_integer("credit_count", required("credit_count", f.credit_count)?, 1)?;
        let credit_count = CreditCount::parse(count).map_err(|error| InvalidReason::Field {
            field: "credit_count",
            error,
        })?;
        let pricing = match (f.amount_excluding_tax, f.price_id) {
            (Some(_), Some(_)) => return Err(InvalidReason::BothPricings),
            (None, None) => return Err(InvalidReason::NoPricing),
            (Some(amount), None) => {
                Pricing::Amount(json_integer("amount_excluding_tax", amount, 0)?)
            }
            (None, Some(price)) => {
                Pricing::PriceId(field("price_id", Some(price), PriceId::parse)?)
            }
        };
        let expires_at = match f.expires_at {
            None => None,
            Some(raw) => {
                let text = string_field("expires_at", raw)?;
                time::OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339)
                    .map_err(|_| InvalidReason::ExpiresAt)?;
                // `time` takes any byte between the date and the time (a
                // space, but also CR, LF or NUL); RFC 3339's grammar, and the
                // published schema, say `T` (or `t`). The date is exactly 10
                // bytes, so the separator is the 11th.
                if !matches!(text.as_bytes().get(10), Some(b'T' | b't')) {
                    return Err(InvalidReason::ExpiresAt);
                }
                Some(text)
            }
        };
        Ok(Command {
            id,
            customer_id,
            product_id,
            credit_count,
            pricing,
            expires_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ID: &str = "6f1c1f0e-4c1a-4a51-9d7e-3f5d2b8e9a10";

    fn valid() -> serde_json::Value {
        json!({
            "command_id": ID,
            "customer_id": "cus_Typ0px2W0aiEtl",
            "product_id": "itm_3kXODDF42QXtnL",
            "credit_count": 32,
            "amount_excluding_tax": 24000,
            "price_id": null,
            "expires_at": null
        })
    }

    fn parse(value: &serde_json::Value) -> Result<Command, InvalidCommand> {
        Command::parse(value.to_string().as_bytes(), None)
    }

    fn with(key: &str, value: serde_json::Value) -> serde_json::Value {
        let mut v = valid();
        v[key] = value;
        v
    }

    fn without(key: &str) -> serde_json::Value {
        let mut v = valid();
        v.as_object_mut().map(|o| o.remove(key));
        v
    }

    fn reason(value: &serde_json::Value) -> InvalidReason {
        match parse(value) {
            Ok(c) => panic!("accepted {value}: {c:?}"),
            Err(e) => e.reason,
        }
    }

    #[test]
    fn the_contract_example_is_valid() {
        let c = parse(&valid()).expect("valid");
        assert_eq!(c.id.as_str(), ID);
        assert_eq!(c.customer_id.as_str(), "cus_Typ0px2W0aiEtl");
        assert_eq!(c.credit_count.get(), 32);
        assert_eq!(c.pricing, Pricing::Amount(24000));
        assert_eq!(c.expires_at, None);
    }

    #[test]
    fn oversized_body_is_refused_before_parsing() {
        let body = vec![b' '; MAX_BODY_BYTES + 1];
        let e = Command::parse(&body, Some(ID)).unwrap_err();
        assert_eq!(e.reason, InvalidReason::TooLarge(MAX_BODY_BYTES + 1));
        assert_eq!(e.raw.command_id.as_deref(), Some(ID));
        let mut padded = valid().to_string().into_bytes();
        padded.resize(MAX_BODY_BYTES, b' ');
        assert!(Command::parse(&padded, None).is_ok());
    }

    #[test]
    fn non_utf8_non_json_and_non_objects_are_refused() {
        assert_eq!(
            Command::parse(&[0xff, 0xfe], None).unwrap_err().reason,
            InvalidReason::NotUtf8
        );
        assert!(matches!(
            Command::parse(b"{nope", None).unwrap_err().reason,
            InvalidReason::Json(_)
        ));
        for body in ["[]", "42", "\"x\"", "null", ""] {
            assert_eq!(
                Command::parse(body.as_bytes(), None).unwrap_err().reason,
                InvalidReason::NotAnObject
            );
        }
    }

    #[test]
    fn command_id_falls_back_to_message_id() {
        let body = without("command_id").to_string();
        let c = Command::parse(body.as_bytes(), Some(ID)).expect("valid");
        assert_eq!(c.id.as_str(), ID);
        let body = with("command_id", json!(null)).to_string();
        assert!(Command::parse(body.as_bytes(), Some(ID)).is_ok());
        assert_eq!(
            Command::parse(body.as_bytes(), None).unwrap_err().reason,
            InvalidReason::MissingCommandId
        );
        let e = Command::parse(body.as_bytes(), Some("short")).unwrap_err();
        assert!(matches!(e.reason, InvalidReason::Field { .. }));
        assert_eq!(e.raw.command_id.as_deref(), Some("short"));
    }

    #[test]
    fn body_command_id_wins_over_message_id_and_is_checked() {
        let c = Command::parse(valid().to_string().as_bytes(), Some("other-id-0000000000"))
            .expect("valid");
        assert_eq!(c.id.as_str(), ID);
        assert!(matches!(
            reason(&with("command_id", json!("too-short"))),
            InvalidReason::Field {
                field: "command_id",
                ..
            }
        ));
        assert!(matches!(
            reason(&with("command_id", json!("has/slash-0000000000"))),
            InvalidReason::Field { .. }
        ));
        assert!(matches!(
            reason(&with("command_id", json!(12345678901234567_u64))),
            InvalidReason::WrongType { .. }
        ));
    }

    #[test]
    fn path_ids_are_required_and_checked() {
        for key in ["customer_id", "product_id"] {
            assert_eq!(reason(&without(key)), InvalidReason::Missing(key));
            assert_eq!(reason(&with(key, json!(null))), InvalidReason::Missing(key));
            assert!(matches!(
                reason(&with(key, json!(7))),
                InvalidReason::WrongType { .. }
            ));
            for bad in ["", "../x", "a/b", "%2F", "a?b", "a\r\nb"] {
                assert!(
                    matches!(reason(&with(key, json!(bad))), InvalidReason::Field { .. }),
                    "{key}={bad:?}"
                );
            }
        }
    }

    #[test]
    fn credit_count_must_be_a_whole_positive_json_integer() {
        assert_eq!(
            reason(&without("credit_count")),
            InvalidReason::Missing("credit_count")
        );
        for bad in ["32.0", "3.2e1", "1e3", "\"32\"", "true"] {
            let body = valid()
                .to_string()
                .replace("\"credit_count\":32", &format!("\"credit_count\":{bad}"));
            assert!(
                matches!(
                    Command::parse(body.as_bytes(), None).unwrap_err().reason,
                    InvalidReason::WrongType { .. }
                ),
                "{bad}"
            );
        }
        for bad in [
            json!(0),
            json!(-1),
            json!(MAX_JSON_INTEGER + 1),
            json!(u64::MAX),
        ] {
            assert!(
                matches!(
                    reason(&with("credit_count", bad.clone())),
                    InvalidReason::Field { .. }
                ),
                "{bad}"
            );
        }
        let body = valid().to_string().replace(
            "\"credit_count\":32",
            "\"credit_count\":123456789012345678901234567890",
        );
        assert!(matches!(
            Command::parse(body.as_bytes(), None).unwrap_err().reason,
            InvalidReason::Field { .. }
        ));
        assert_eq!(
            parse(&with("credit_count", json!(MAX_JSON_INTEGER))).map(|c| c.credit_count.get()),
            Ok(MAX_JSON_INTEGER)
        );
    }

    #[test]
    fn exactly_one_pricing() {
        assert_eq!(
            reason(&with("price_id", json!("price_1"))),
            InvalidReason::BothPricings
        );
        assert_eq!(
            reason(&without("amount_excluding_tax")),
            InvalidReason::NoPricing
        );
        let by_price = with("amount_excluding_tax", json!(null));
        let by_price = {
            let mut v = by_price;
            v["price_id"] = json!("price_bundle_10");
            v
        };
        assert_eq!(
            parse(&by_price).map(|c| c.pricing).ok(),
            PriceId::parse("price_bundle_10").ok().map(Pricing::PriceId)
        );
        let mut empty_price = by_price.clone();
        empty_price["price_id"] = json!("");
        assert!(matches!(
            reason(&empty_price),
            InvalidReason::Field {
                field: "price_id",
                ..
            }
        ));
        let mut long_price = by_price;
        long_price["price_id"] = json!("p".repeat(256));
        assert!(matches!(
            reason(&long_price),
            InvalidReason::Field {
                field: "price_id",
                ..
            }
        ));
    }

    #[test]
    fn amount_is_a_non_negative_integer() {
        assert_eq!(
            parse(&with("amount_excluding_tax", json!(0))).map(|c| c.pricing),
            Ok(Pricing::Amount(0))
        );
        assert!(matches!(
            reason(&with("amount_excluding_tax", json!(-5))),
            InvalidReason::Field { .. }
        ));
        assert!(matches!(
            reason(&with("amount_excluding_tax", json!(1.5))),
            InvalidReason::WrongType { .. }
        ));
        assert!(matches!(
            reason(&with("amount_excluding_tax", json!("100"))),
            InvalidReason::WrongType { .. }
        ));
        assert!(matches!(
            reason(&with("amount_excluding_tax", json!(MAX_JSON_INTEGER + 1))),
            InvalidReason::Field { .. }
        ));
    }

    #[test]
    fn expires_at_is_rfc3339_and_kept_verbatim() {
        let c = parse(&with("expires_at", json!("2027-01-01T00:00:00+01:00"))).expect("valid");
        assert_eq!(c.expires_at.as_deref(), Some("2027-01-01T00:00:00+01:00"));
        let c = parse(&with("expires_at", json!("2027-01-01t00:00:00.5z"))).expect("valid");
        assert_eq!(c.expires_at.as_deref(), Some("2027-01-01t00:00:00.5z"));
        for bad in [
            json!("tomorrow"),
            json!("2027-01-01"),
            json!(1700000000),
            json!("2027-01-01 00:00:00Z"),
            json!("2027-01-01\n00:00:00Z"),
            json!("2027-01-01\u{0}00:00:00Z"),
            json!("2027-01-01/00:00:00Z"),
        ] {
            assert!(
                matches!(
                    reason(&with("expires_at", bad.clone())),
                    InvalidReason::ExpiresAt | InvalidReason::WrongType { .. }
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn unknown_fields_are_ignored() {
        assert!(parse(&with("note", json!({"deep": [1, 2, {"x": null}]}))).is_ok());
    }

    #[test]
    fn raw_ids_are_echoed_only_when_short_strings() {
        let mut v = with("credit_count", json!(0));
        v["customer_id"] = json!("c".repeat(300));
        let e = parse(&v).unwrap_err();
        assert_eq!(e.raw.command_id.as_deref(), Some(ID));
        assert_eq!(e.raw.customer_id, None);
        assert_eq!(e.raw.product_id.as_deref(), Some("itm_3kXODDF42QXtnL"));
        assert_eq!(e.raw.credit_count, None);
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = format!("{{\"x\":{}{}}}", "[".repeat(30_000), "]".repeat(30_000));
        assert!(Command::parse(deep.as_bytes(), None).is_err());
    }
}
