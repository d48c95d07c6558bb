//! The command rules of docs/contract.md section 2, restated from the contract's
//! text alone with byte-level predicates of their own, and what holds of
//! every verdict of `Command::parse`.
//!
//! Written without the parser's code, so that a rule the parser loosened (or
//! tightened) shows up as a disagreement: the property tests build their
//! reference oracle on these predicates, the fuzz target and the property
//! tests check every verdict with [`check_verdict`], and the hostile stream
//! checks every request path with [`purchase_path_ok`].

use credit_purchase_worker::contract::{Command, InvalidCommand, Pricing};
use credit_purchase_worker::hyperline::{HyperlineClient, purchase_path};
use serde_json::Value;

/// The characters of a command id: `[A-Za-z0-9._:-]`.
pub const COMMAND_ID_CHARS: &[u8] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-";

/// The characters of a customer or product id, which go into the URL path:
/// `[A-Za-z0-9_-]`.
pub const PATH_ID_CHARS: &[u8] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";

/// The largest integer of the contract, 2^53 − 1 (the largest every JSON
/// reader holds exactly).
pub const MAX_INTEGER: u64 = 9_007_199_254_740_991;

/// [`MAX_INTEGER`] in decimal. JSON forbids leading zeros, so between two
/// integers written without sign the longer is the larger, and at equal
/// length the text orders them.
pub const MAX_INTEGER_TEXT: &str = "9007199254740991";

/// An echoed id is at most this many bytes (an AMQP short string).
const MAX_ECHO_BYTES: usize = 255;

/// `[A-Za-z0-9._:-]`, 16 to 255 characters.
pub fn command_id_ok(s: &str) -> bool {
    (16..=255).contains(&s.len()) && s.bytes().all(|b| COMMAND_ID_CHARS.contains(&b))
}

/// `[A-Za-z0-9_-]`, 1 to 128 characters (ASCII only, so bytes = characters).
pub fn path_id_ok(s: &str) -> bool {
    (1..=128).contains(&s.len()) && s.bytes().all(|b| PATH_ID_CHARS.contains(&b))
}

/// A non-empty string of at most 255 characters (characters, not bytes).
pub fn price_id_ok(s: &str) -> bool {
    (1..=255).contains(&s.chars().count())
}

/// A JSON integer from 0 to 2^53 − 1 written without sign, fraction or
/// exponent; `-0` has a sign and is refused.
pub fn whole_number(raw: &str) -> Option<u64> {
    if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if raw.len() > MAX_INTEGER_TEXT.len()
        || (raw.len() == MAX_INTEGER_TEXT.len() && raw > MAX_INTEGER_TEXT)
    {
        return None;
    }
    Some(
        raw.bytes()
            .fold(0_u64, |n, digit| n * 10 + u64::from(digit - b'0')),
    )
}

/// RFC 3339 `date-time` (section 5.6, with the lower-case `t` and `z` its
/// note allows): `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`, a real calendar day,
/// and a leap second only as 23:59:60 UTC on the last day of a month.
pub fn rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let number = |from: usize, to: usize| -> Option<i64> {
        let part = b.get(from..to)?;
        part.iter()
            .all(u8::is_ascii_digit)
            .then(|| part.iter().fold(0, |n, d| n * 10 + i64::from(d - b'0')))
    };
    let (Some(year), Some(month), Some(day), Some(hour), Some(minute), Some(second)) = (
        number(0, 4),
        number(5, 7),
        number(8, 10),
        number(11, 13),
        number(14, 16),
        number(17, 19),
    ) else {
        return false;
    };
    if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') || b[13] != b':' {
        return false;
    }
    if b[16] != b':' {
        return false;
    }
    let mut rest = &b[19..];
    if let Some(fraction) = rest.strip_prefix(b".") {
        let digits = fraction.iter().take_while(|d| d.is_ascii_digit()).count();
        if digits == 0 {
            return false;
        }
        rest = &fraction[digits..];
    }
    let offset_minutes = match rest {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2]
            if [h1, h2, m1, m2].iter().all(|d| d.is_ascii_digit()) =>
        {
            let hours = i64::from((h1 - b'0') * 10 + (h2 - b'0'));
            let minutes = i64::from((m1 - b'0') * 10 + (m2 - b'0'));
            if hours > 23 || minutes > 59 {
                return false;
            }
            let magnitude = hours * 60 + minutes;
            if *sign == b'-' { -magnitude } else { magnitude }
        }
        _ => return false,
    };
    let leap_year = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap_year => 29,
        2 => 28,
        _ => return false,
    };
    if day == 0 || day > days_in_month || hour > 23 || minute > 59 || second > 60 {
        return false;
    }
    if second == 60 {
        // The UTC time must be 23:59(:60) and the UTC day the last of its
        // month; an offset moves the UTC day by at most one either way.
        let utc_minutes = hour * 60 + minute - offset_minutes;
        if utc_minutes.rem_euclid(1440) != 23 * 60 + 59 {
            return false;
        }
        return match utc_minutes.div_euclid(1440) {
            -1 => day == 1,
            0 => day == days_in_month,
            _ => day + 1 == days_in_month,
        };
    }
    true
}

/// `^/v1/customers/[A-Za-z0-9_-]{1,128}/credits/[A-Za-z0-9_-]{1,128}/purchase$`:
/// the route's segments and nothing else, so no id added a segment, a query
/// or a fragment.
pub fn purchase_path_ok(path: &str) -> bool {
    match path.split('/').collect::<Vec<_>>().as_slice() {
        [
            "",
            "v1",
            "customers",
            customer,
            "credits",
            product,
            "purchase",
        ] => path_id_ok(customer) && path_id_ok(product),
        _ => false,
    }
}

/// Returns early with an error naming the broken invariant.
macro_rules! ensure {
    ($holds:expr, $($why:tt)+) => {
        if !$holds {
            return Err(format!($($why)+));
        }
    };
}

/// What holds of every verdict of `Command::parse`, whatever the input: a
/// valid command keeps the rules above, makes a path of exactly the route's
/// segments and a JSON request body carrying exactly its purchase; an invalid
/// one says why and echoes only ids that fit in an AMQP short string.
pub fn check_verdict(verdict: &Result<Command, InvalidCommand>) -> Result<(), String> {
    match verdict {
        Ok(command) => check_valid(command),
        Err(error) => {
            let raw = &error.raw;
            for id in [&raw.command_id, &raw.customer_id, &raw.product_id]
                .into_iter()
                .flatten()
            {
                ensure!(
                    id.len() <= MAX_ECHO_BYTES,
                    "echoed an id of {} bytes",
                    id.len()
                );
            }
            ensure!(!error.to_string().is_empty(), "no reason given: {error:?}");
            Ok(())
        }
    }
}

fn check_valid(c: &Command) -> Result<(), String> {
    ensure!(command_id_ok(c.id.as_str()), "command id {:?}", c.id);
    ensure!(path_id_ok(c.customer_id.as_str()), "{:?}", c.customer_id);
    ensure!(path_id_ok(c.product_id.as_str()), "{:?}", c.product_id);
    let count = c.credit_count.get();
    ensure!((1..=MAX_INTEGER).contains(&count), "credit_count {count}");
    match &c.pricing {
        Pricing::Amount(a) => ensure!(*a <= MAX_INTEGER, "amount {a}"),
        Pricing::PriceId(p) => ensure!(price_id_ok(p.as_str()), "{p:?}"),
    }
    if let Some(at) = &c.expires_at {
        ensure!(rfc3339(at), "expires_at {at:?}");
    }
    let path = purchase_path(&c.customer_id, &c.product_id);
    ensure!(purchase_path_ok(&path), "path {path:?}");
    let body: Value = serde_json::from_slice(&HyperlineClient::body(c))
        .map_err(|e| format!("the request body is not JSON: {e}"))?;
    ensure!(
        body["credit_count"].as_u64() == Some(count),
        "request body {body}"
    );
    let pricing_sent = match &c.pricing {
        Pricing::Amount(a) => {
            body["amount_excluding_tax"].as_u64() == Some(*a) && body.get("price_id").is_none()
        }
        Pricing::PriceId(p) => {
            body["price_id"].as_str() == Some(p.as_str())
                && body.get("amount_excluding_tax").is_none()
        }
    };
    ensure!(pricing_sent, "request body {body} for {:?}", c.pricing);
    ensure!(
        body["expires_at"].as_str() == c.expires_at.as_deref(),
        "request body {body}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_integer_limit_is_2_to_the_53_minus_1() {
        assert_eq!(MAX_INTEGER, (1_u64 << 53) - 1);
        assert_eq!(MAX_INTEGER.to_string(), MAX_INTEGER_TEXT);
        assert_eq!(
            MAX_INTEGER,
            credit_purchase_worker::contract::MAX_JSON_INTEGER
        );
    }

    #[test]
    fn the_date_check_knows_the_edges() {
        for good in [
            "2027-01-01T00:00:00Z",
            "2027-01-01t00:00:00.5z",
            "2028-02-29T23:59:59+23:59",
            "2027-06-30T23:59:60Z",
            "2027-06-30T22:59:60-01:00",
            "2027-07-01T00:59:60+01:00",
        ] {
            assert!(rfc3339(good), "{good}");
        }
        for bad in [
            "2027-01-01 00:00:00Z",
            "2027-02-29T00:00:00Z",
            "2027-06-29T23:59:60Z",
            "2027-01-01T00:00:00+24:00",
            "2027-01-01T00:00:00.Z",
            "2027-01-01T00:00Z",
        ] {
            assert!(!rfc3339(bad), "{bad}");
        }
    }

    #[test]
    fn only_the_routes_segments_make_a_purchase_path() {
        assert!(purchase_path_ok(
            "/v1/customers/cus_1/credits/itm-1/purchase"
        ));
        for bad in [
            "/v1/customers/cus_1/credits/itm_1/purchase/",
            "/v1/customers/cus/1/credits/itm_1/purchase",
            "/v1/customers//credits/itm_1/purchase",
            "/v1/customers/cus_1/credits/itm_1/purchase?x=1",
            "/v1/customers/cus.1/credits/itm_1/purchase",
        ] {
            assert!(!purchase_path_ok(bad), "{bad}");
        }
    }
}
