//! Property tests of `Command::parse` (CONTRACT.md section 2).
//!
//! Whatever the bytes and the `message_id`, the parser answers a valid
//! [`Command`] or an `InvalidCommand`, and never panics. Its verdict is
//! compared with a reference oracle written here from the contract's text
//! alone: it walks the document with `serde_json::Value` (and raw text for
//! the integers, which must be written without fraction or exponent) and
//! re-checks every rule with its own byte-level predicates, so a rule that the
//! parser loosened, or tightened, shows up as a disagreement with the body
//! that caused it.
//!
//! The generators aim near the valid region, since random bytes are refused
//! at the first byte: a valid command with one field mutated (hostile
//! strings: `/`, `..`, `%2F`, `?`, `#`, CR/LF, NUL, U+202E, zero-width
//! joiners, homoglyphs; hostile numbers: huge, negative, fractional,
//! exponents, strings for numbers; nested objects, duplicate keys, escaped
//! keys), plus the 64 KiB boundary and deep nesting.
//!
//! `PROPTEST_CASES` raises the number of cases per property (default 512).

use std::fmt;

use credit_purchase_worker::contract::{Command, InvalidCommand, MAX_BODY_BYTES, Pricing};
use credit_purchase_worker::hyperline::{HyperlineClient, purchase_path};
use proptest::prelude::*;
use proptest::sample::Index;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

// ---------------------------------------------------------------------------
// The reference oracle: section 2, restated.
// ---------------------------------------------------------------------------

/// "A body over 64 KiB is invalid", written out rather than taken from the
/// crate (a test checks that the two agree).
const BODY_LIMIT: usize = 65_536;

/// 2^53 − 1 in decimal. JSON forbids leading zeros, so between two integers
/// written without sign the longer is the larger, and at equal length the
/// text orders them.
const MAX_INTEGER_TEXT: &str = "9007199254740991";
const MAX_INTEGER: u64 = 9_007_199_254_740_991;

/// The fields the contract names; any other key is ignored.
const FIELDS: [&str; 7] = [
    "command_id",
    "customer_id",
    "product_id",
    "credit_count",
    "amount_excluding_tax",
    "price_id",
    "expires_at",
];

/// `[A-Za-z0-9._:-]`, 16 to 255 characters.
fn command_id_ok(s: &str) -> bool {
    (16..=255).contains(&s.len())
        && s.bytes().all(
            |b| matches!(b, b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b':' | b'-'),
        )
}

/// `[A-Za-z0-9_-]`, 1 to 128 characters (ASCII only, so bytes = characters).
fn path_id_ok(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| matches!(b, b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
}

/// A non-empty string of at most 255 characters (characters, not bytes).
fn price_id_ok(s: &str) -> bool {
    (1..=255).contains(&s.chars().count())
}

/// A JSON integer from 0 to 2^53 − 1 written without sign, fraction or
/// exponent; `-0` has a sign and is refused.
fn whole_number(raw: &str) -> Option<u64> {
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
fn rfc3339(s: &str) -> bool {
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

/// The members of a JSON object in document order, duplicates kept, each
/// value as its raw text.
struct Members(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, Box<RawValue>>()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(MembersVisitor)
    }
}

/// What the oracle expects of a valid command.
#[derive(Debug, PartialEq, Eq)]
struct Expected {
    id: String,
    customer_id: String,
    product_id: String,
    credit_count: u64,
    pricing: ExpectedPricing,
    expires_at: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
enum ExpectedPricing {
    Amount(u64),
    PriceId(String),
}

/// What the oracle expects an invalid command's event to echo: the raw ids
/// that are strings of at most 255 bytes, and the count when it is valid.
#[derive(Debug, Default, PartialEq, Eq)]
struct Echo {
    command_id: Option<String>,
    customer_id: Option<String>,
    product_id: Option<String>,
    credit_count: Option<u64>,
}

fn string_value(raw: &str) -> Option<String> {
    match serde_json::from_str::<Value>(raw) {
        Ok(Value::String(s)) => Some(s),
        _ => None,
    }
}

fn short(s: String) -> Option<String> {
    (s.len() <= 255).then_some(s)
}

/// Section 2 applied to a delivery: the valid command, or what its event
/// must echo.
fn oracle(body: &[u8], message_id: Option<&str>) -> Result<Expected, Echo> {
    let bare = Echo {
        command_id: message_id.map(str::to_owned).and_then(short),
        ..Echo::default()
    };
    if body.len() > BODY_LIMIT {
        return Err(bare);
    }
    let Ok(text) = std::str::from_utf8(body) else {
        return Err(bare);
    };
    let Ok(Members(members)) = serde_json::from_str::<Members>(text) else {
        return Err(bare);
    };
    // A field given twice is ambiguous: which one would be charged?
    for name in FIELDS {
        if members.iter().filter(|(key, _)| key == name).count() > 1 {
            return Err(bare);
        }
    }
    // Absent and null mean the same.
    let get = |name: &str| {
        members
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, raw)| raw.get())
            .filter(|raw| *raw != "null")
    };
    let echo = Echo {
        command_id: match get("command_id") {
            Some(raw) => string_value(raw).and_then(short),
            None => bare.command_id,
        },
        customer_id: get("customer_id").and_then(string_value).and_then(short),
        product_id: get("product_id").and_then(string_value).and_then(short),
        credit_count: get("credit_count")
            .and_then(whole_number)
            .filter(|n| *n >= 1),
    };
    let id = match get("command_id") {
        Some(raw) => string_value(raw),
        None => message_id.map(str::to_owned),
    }
    .filter(|id| command_id_ok(id));
    let customer_id = get("customer_id")
        .and_then(string_value)
        .filter(|s| path_id_ok(s));
    let product_id = get("product_id")
        .and_then(string_value)
        .filter(|s| path_id_ok(s));
    let credit_count = echo.credit_count;
    let pricing = match (get("amount_excluding_tax"), get("price_id")) {
        (Some(amount), None) => whole_number(amount).map(ExpectedPricing::Amount),
        (None, Some(price)) => string_value(price)
            .filter(|p| price_id_ok(p))
            .map(ExpectedPricing::PriceId),
        _ => None,
    };
    let expires_at = match get("expires_at") {
        None => Some(None),
        Some(raw) => string_value(raw).filter(|s| rfc3339(s)).map(Some),
    };
    match (
        id,
        customer_id,
        product_id,
        credit_count,
        pricing,
        expires_at,
    ) {
        (
            Some(id),
            Some(customer_id),
            Some(product_id),
            Some(credit_count),
            Some(pricing),
            Some(expires_at),
        ) => Ok(Expected {
            id,
            customer_id,
            product_id,
            credit_count,
            pricing,
            expires_at,
        }),
        _ => Err(echo),
    }
}

// ---------------------------------------------------------------------------
// The comparison.
// ---------------------------------------------------------------------------

fn expected_of(c: &Command) -> Expected {
    Expected {
        id: c.id.as_str().to_owned(),
        customer_id: c.customer_id.as_str().to_owned(),
        product_id: c.product_id.as_str().to_owned(),
        credit_count: c.credit_count.get(),
        pricing: match &c.pricing {
            Pricing::Amount(a) => ExpectedPricing::Amount(*a),
            Pricing::PriceId(p) => ExpectedPricing::PriceId(p.as_str().to_owned()),
        },
        expires_at: c.expires_at.clone(),
    }
}

fn echo_of(e: &InvalidCommand) -> Echo {
    Echo {
        command_id: e.raw.command_id.clone(),
        customer_id: e.raw.customer_id.clone(),
        product_id: e.raw.product_id.clone(),
        credit_count: e.raw.credit_count,
    }
}

/// What holds of every valid command, checked without the oracle.
fn check_valid(c: &Command) -> Result<(), TestCaseError> {
    prop_assert!(command_id_ok(c.id.as_str()), "{:?}", c.id);
    prop_assert!(path_id_ok(c.customer_id.as_str()), "{:?}", c.customer_id);
    prop_assert!(path_id_ok(c.product_id.as_str()), "{:?}", c.product_id);
    prop_assert!((1..=MAX_INTEGER).contains(&c.credit_count.get()));
    match &c.pricing {
        Pricing::Amount(a) => prop_assert!(*a <= MAX_INTEGER),
        Pricing::PriceId(p) => prop_assert!(price_id_ok(p.as_str()), "{p:?}"),
    }
    if let Some(at) = &c.expires_at {
        prop_assert!(rfc3339(at), "{at:?}");
    }
    // The path has exactly the five separators of the route: nothing in an
    // id can add a segment, a query or a fragment.
    let path = purchase_path(&c.customer_id, &c.product_id);
    let segments: Vec<&str> = path.split('/').collect();
    prop_assert_eq!(segments.len(), 7, "{}", path);
    prop_assert_eq!(
        (
            segments[0],
            segments[1],
            segments[2],
            segments[4],
            segments[6]
        ),
        ("", "v1", "customers", "credits", "purchase")
    );
    // The request body is JSON and carries exactly the command's purchase.
    let body: Value = serde_json::from_slice(&HyperlineClient::body(c))
        .map_err(|e| TestCaseError::fail(format!("request body is not JSON: {e}")))?;
    prop_assert_eq!(body["credit_count"].as_u64(), Some(c.credit_count.get()));
    match &c.pricing {
        Pricing::Amount(a) => {
            prop_assert_eq!(body["amount_excluding_tax"].as_u64(), Some(*a));
            prop_assert!(body.get("price_id").is_none());
        }
        Pricing::PriceId(p) => {
            prop_assert_eq!(body["price_id"].as_str(), Some(p.as_str()));
            prop_assert!(body.get("amount_excluding_tax").is_none());
        }
    }
    prop_assert_eq!(body["expires_at"].as_str(), c.expires_at.as_deref());
    Ok(())
}

/// Parses, checks the invariants, and compares with the oracle.
fn agree(body: &[u8], message_id: Option<&str>) -> Result<(), TestCaseError> {
    let got = Command::parse(body, message_id);
    let expected = oracle(body, message_id);
    let shown = || {
        format!(
            "body {:?} (len {}), message_id {message_id:?}",
            shorten(&String::from_utf8_lossy(body)),
            body.len()
        )
    };
    match (&got, &expected) {
        (Ok(command), Ok(want)) => {
            check_valid(command)?;
            prop_assert_eq!(&expected_of(command), want, "{}", shown());
        }
        (Err(error), Err(want)) => {
            for id in [
                &error.raw.command_id,
                &error.raw.customer_id,
                &error.raw.product_id,
            ]
            .into_iter()
            .flatten()
            {
                prop_assert!(id.len() <= 255, "echoed id of {} bytes", id.len());
            }
            prop_assert!(!error.to_string().is_empty());
            prop_assert_eq!(&echo_of(error), want, "{}: {}", error, shown());
        }
        (Ok(command), Err(_)) => {
            return Err(TestCaseError::fail(format!(
                "the parser accepted what the contract refuses: {command:?}; {}",
                shown()
            )));
        }
        (Err(error), Ok(_)) => {
            return Err(TestCaseError::fail(format!(
                "the parser refused a valid command ({error}); {}",
                shown()
            )));
        }
    }
    Ok(())
}

fn shorten(s: &str) -> String {
    if s.chars().count() <= 400 {
        return s.to_owned();
    }
    let head: String = s.chars().take(300).collect();
    let tail: Vec<char> = s.chars().rev().take(80).collect();
    let tail: String = tail.into_iter().rev().collect();
    format!("{head}…[{} chars]…{tail}", s.chars().count())
}

// ---------------------------------------------------------------------------
// Generators.
// ---------------------------------------------------------------------------

/// Pieces of hostile strings: what could change a URL or a header, and what
/// looks like an allowed character but is not.
fn hostile_piece() -> BoxedStrategy<String> {
    prop_oneof![
        6 => "[A-Za-z0-9_-]{1,12}",
        8 => prop::sample::select(vec![
            "/", "..", "../", "%2F", "%2f", "%2e%2e", "?", "?x=1", "#", "#frag", "\r\n",
            "\r", "\n", "\r\nX-Evil: 1", "\0", "%00", "\u{202E}", "\u{200D}", "\u{200B}",
            "\u{200C}", "\u{FEFF}", "\u{2028}", "\u{85}", "\u{7F}", "а", "е", "о", "ο",
            "Ａ", "０", "‐", "−", "\u{301}", "é", "😀", " ", "\t", ":", ".", "\\", "\"",
            "'", "<", ">", "{", "}", "\u{FFFD}", "İ", "ß", "Ω", "\u{1F1FA}\u{1F1F8}",
        ])
        .prop_map(str::to_owned),
        2 => any::<char>().prop_map(String::from),
    ]
    .boxed()
}

fn hostile_string() -> BoxedStrategy<String> {
    prop::collection::vec(hostile_piece(), 0..6)
        .prop_map(|pieces| pieces.concat())
        .boxed()
}

/// Strings of one fill character at the length boundaries of the rules, with
/// an optional intruder character somewhere.
fn boundary_string() -> BoxedStrategy<String> {
    let length = prop_oneof![
        prop::sample::select(vec![0_usize, 1, 15, 16, 17, 127, 128, 129, 254, 255, 256]),
        0_usize..300,
    ];
    let fill = prop::sample::select(vec!['a', 'Z', '7', '_', '-', '.', ':', 'é', 'а', '😀']);
    let intruder = prop::option::of((any::<Index>(), hostile_piece()));
    (length, fill, intruder)
        .prop_map(|(length, fill, intruder)| {
            let mut s: Vec<String> = std::iter::repeat_n(fill.to_string(), length).collect();
            if let Some((at, piece)) = intruder
                && !s.is_empty()
            {
                let i = at.index(s.len());
                s[i] = piece;
            }
            s.concat()
        })
        .boxed()
}

/// A JSON string literal for `s`: plain, or with every character `\u`-escaped
/// (the parser must read the same text either way).
fn string_literal(s: &str, escape_all: bool) -> String {
    if !escape_all {
        return serde_json::to_string(s).unwrap_or_default();
    }
    let mut out = String::from("\"");
    for unit in s.encode_utf16() {
        out.push_str(&format!("\\u{unit:04x}"));
    }
    out.push('"');
    out
}

fn string_json() -> BoxedStrategy<String> {
    (
        prop_oneof![hostile_string(), boundary_string()],
        prop::bool::weighted(0.15),
    )
        .prop_map(|(s, escape)| string_literal(&s, escape))
        .boxed()
}

/// Numbers as written in JSON, near every edge of the integer rules, and a
/// few tokens that are not JSON at all.
fn number_text() -> BoxedStrategy<String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "0", "1", "-1", "-0", "32", "32.0", "3.2e1", "1e3", "1E3", "1e+3", "1e-3", "0.5",
            "-5", "-0.0", "1.0", "9007199254740990", "9007199254740991", "9007199254740992",
            "9007199254740993", "18446744073709551615", "18446744073709551616",
            "123456789012345678901234567890", "1e400", "-1e400", "4.9e-324",
            "9007199254740991.0", "9.007199254740991e15", "00", "01", "+1", ".5", "1.", "NaN",
            "Infinity", "-Infinity", "0x10", "1_000", "١٢",
        ])
        .prop_map(str::to_owned),
        2 => any::<u64>().prop_map(|n| n.to_string()),
        2 => (MAX_INTEGER - 3..=MAX_INTEGER + 3).prop_map(|n| n.to_string()),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => "[1-9][0-9]{0,40}",
        1 => ("-?[1-9][0-9]{0,5}", "(\\.[0-9]{1,3})?", "([eE][+-]?[0-9]{1,3})?")
            .prop_map(|(a, b, c)| format!("{a}{b}{c}")),
        1 => any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| {
            serde_json::to_string(&f).unwrap_or_else(|_| "0".to_owned())
        }),
    ]
    .boxed()
}

/// `depth` arrays or objects around a leaf.
fn nested(depth: usize, objects: bool, leaf: &str) -> String {
    if objects {
        format!("{}{leaf}{}", "{\"a\":".repeat(depth), "}".repeat(depth))
    } else {
        format!("{}{leaf}{}", "[".repeat(depth), "]".repeat(depth))
    }
}

/// Any value a hostile publisher could put in a field, as JSON text.
fn hostile_value() -> BoxedStrategy<String> {
    prop_oneof![
        8 => string_json(),
        6 => number_text(),
        2 => number_text().prop_map(|n| format!("\"{n}\"")),
        2 => prop::sample::select(vec!["null", "true", "false", "[]", "{}", "\"\"", "[null]"])
            .prop_map(str::to_owned),
        2 => (string_json(), any::<bool>()).prop_map(|(v, object)| {
            if object { format!("{{\"value\":{v}}}") } else { format!("[{v}]") }
        }),
        1 => (1_usize..300, any::<bool>()).prop_map(|(d, objects)| nested(d, objects, "1")),
    ]
    .boxed()
}

fn valid_command_id() -> BoxedStrategy<String> {
    "[A-Za-z0-9._:-]{16,64}".boxed()
}

fn valid_path_id() -> BoxedStrategy<String> {
    prop_oneof!["[A-Za-z0-9_-]{1,24}", "[a-z_-]{120,128}"].boxed()
}

/// A valid RFC 3339 date-time, in the forms the rule must accept.
fn valid_date_time() -> BoxedStrategy<String> {
    (
        (1000_u32..=9999, 1_u32..=12, 1_u32..=28),
        (0_u32..=23, 0_u32..=59, 0_u32..=59),
        prop::sample::select(vec!["T", "t"]),
        prop::option::of("[0-9]{1,12}"),
        prop_oneof![
            Just("Z".to_owned()),
            Just("z".to_owned()),
            ("[+-]", 0_u32..=23, 0_u32..=59).prop_map(|(s, h, m)| format!("{s}{h:02}:{m:02}")),
        ],
    )
        .prop_map(|((y, mo, d), (h, mi, s), sep, fraction, offset)| {
            let fraction = fraction.map(|f| format!(".{f}")).unwrap_or_default();
            format!("{y:04}-{mo:02}-{d:02}{sep}{h:02}:{mi:02}:{s:02}{fraction}{offset}")
        })
        .boxed()
}

/// Near-misses of RFC 3339, and a few leap seconds.
const TRICKY_DATE_TIMES: &[&str] = &[
    "2027-01-01T00:00:00Z",
    "2027-01-01 00:00:00Z",
    "2027-01-01\n00:00:00Z",
    "2027-01-01\r00:00:00Z",
    "2027-01-01\u{0}00:00:00Z",
    "2027-01-01/00:00:00Z",
    "2027-01-01é00:00:00Z",
    "2027-01-01T00:00:00",
    "2027-01-01T00:00:00.Z",
    "2027-01-01T00:00:00+0100",
    "2027-01-01T00:00:00+24:00",
    "2027-01-01T00:00:00+23:60",
    "2027-01-01T24:00:00Z",
    "2027-01-01T00:60:00Z",
    "2027-01-01T00:00:61Z",
    "2027-02-29T00:00:00Z",
    "2028-02-29T00:00:00Z",
    "2100-02-29T00:00:00Z",
    "2000-02-29T00:00:00Z",
    "2027-04-31T00:00:00Z",
    "2027-00-10T00:00:00Z",
    "2027-01-00T00:00:00Z",
    "2027-06-30T23:59:60Z",
    "2027-06-30T23:59:60.5Z",
    "2027-06-29T23:59:60Z",
    "2027-06-30T22:59:60-01:00",
    "2027-07-01T00:59:60+01:00",
    "2027-12-31T23:59:60z",
    "0000-01-01T00:00:00Z",
    "2027-01-01T00:00:00Z ",
    " 2027-01-01T00:00:00Z",
    "2027-01-01T00:00:00ZZ",
    "２０２７-01-01T00:00:00Z",
    "2027-1-01T00:00:00Z",
    "2027-01-01T00:00:00.123456789012Z",
    "2027-01-01T00:00:00-00:00",
    "2027-01-01T00:00:00\u{202E}Z",
];

fn tricky_date_time() -> BoxedStrategy<String> {
    prop::sample::select(TRICKY_DATE_TIMES)
        .prop_map(str::to_owned)
        .boxed()
}

fn expires_value() -> BoxedStrategy<String> {
    prop_oneof![
        valid_date_time().prop_map(|s| string_literal(&s, false)),
        tricky_date_time().prop_map(|s| string_literal(&s, false)),
        hostile_value(),
    ]
    .boxed()
}

/// Members `(key, raw JSON value)` and a `message_id`.
type Template = (Vec<(String, String)>, Option<String>);

/// A valid command as a template, in any of its valid shapes.
fn valid_template() -> BoxedStrategy<Template> {
    (
        valid_command_id(),
        0_u8..4,
        valid_path_id(),
        valid_path_id(),
        1..=MAX_INTEGER,
        prop_oneof![
            (0..=MAX_INTEGER).prop_map(|a| (Some(a), None)),
            prop_oneof![hostile_string(), boundary_string()]
                .prop_filter("a valid price id", |p| price_id_ok(p))
                .prop_map(|p| (None, Some(p))),
        ],
        prop::option::of(prop::option::of(valid_date_time())),
        valid_command_id(),
    )
        .prop_map(
            |(id, placement, customer, product, count, (amount, price), expires, other_id)| {
                let quote = |s: &str| string_literal(s, false);
                let mut members = Vec::new();
                // Where the id is: the body, message_id only, both (the body
                // wins), or a null in the body and message_id.
                let (in_body, message_id) = match placement {
                    0 => (Some(quote(&id)), None),
                    1 => (None, Some(id)),
                    2 => (Some(quote(&id)), Some(other_id)),
                    _ => (Some("null".to_owned()), Some(id)),
                };
                if let Some(raw) = in_body {
                    members.push(("command_id".to_owned(), raw));
                }
                members.push(("customer_id".to_owned(), quote(&customer)));
                members.push(("product_id".to_owned(), quote(&product)));
                members.push(("credit_count".to_owned(), count.to_string()));
                members.push((
                    "amount_excluding_tax".to_owned(),
                    amount.map_or_else(|| "null".to_owned(), |a| a.to_string()),
                ));
                members.push((
                    "price_id".to_owned(),
                    price.map_or_else(|| "null".to_owned(), |p| quote(&p)),
                ));
                match expires {
                    None => {}
                    Some(None) => members.push(("expires_at".to_owned(), "null".to_owned())),
                    Some(Some(at)) => members.push(("expires_at".to_owned(), quote(&at))),
                }
                (members, message_id)
            },
        )
        .boxed()
}

/// One change to a valid command.
#[derive(Clone, Debug)]
enum Mutation {
    Nothing,
    Set(&'static str, String),
    Remove(&'static str),
    Duplicate(&'static str, String),
    Unknown(String, String),
    EscapedKey(&'static str),
    RenamedKey(&'static str, String),
    MessageId(Option<String>),
}

fn field() -> BoxedStrategy<&'static str> {
    prop::sample::select(FIELDS.to_vec()).boxed()
}

fn mutation() -> BoxedStrategy<Mutation> {
    prop_oneof![
        1 => Just(Mutation::Nothing),
        12 => (field(), hostile_value()).prop_map(|(f, v)| Mutation::Set(f, v)),
        4 => expires_value().prop_map(|v| Mutation::Set("expires_at", v)),
        2 => field().prop_map(Mutation::Remove),
        2 => (field(), prop_oneof![hostile_value(), Just("null".to_owned())])
            .prop_map(|(f, v)| Mutation::Duplicate(f, v)),
        2 => (
            prop_oneof![hostile_string(), Just("note".to_owned())],
            prop_oneof![
                hostile_value(),
                (1_usize..2000, any::<bool>()).prop_map(|(d, o)| nested(d, o, "null")),
            ],
        )
            .prop_map(|(k, v)| Mutation::Unknown(k, v)),
        1 => field().prop_map(Mutation::EscapedKey),
        1 => (
            field(),
            prop::sample::select(vec!["", " ", "\u{200B}", "\u{0}", "_"]),
            any::<bool>(),
        )
            .prop_map(|(f, extra, upper)| {
                let name = if upper { f.to_uppercase() } else { format!("{f}{extra}") };
                Mutation::RenamedKey(f, name)
            }),
        2 => prop::option::of(prop_oneof![hostile_string(), boundary_string()])
            .prop_map(Mutation::MessageId),
    ]
    .boxed()
}

/// How the members are written out.
#[derive(Clone, Copy, Debug)]
enum Framing {
    Compact,
    Spaced,
    Bom,
    LeadingWhitespace,
    TrailingNewline,
    TrailingGarbage,
    TrailingComma,
    NonJsonSpace,
}

fn framing() -> BoxedStrategy<Framing> {
    prop_oneof![
        10 => Just(Framing::Compact),
        4 => Just(Framing::Spaced),
        1 => Just(Framing::Bom),
        1 => Just(Framing::LeadingWhitespace),
        1 => Just(Framing::TrailingNewline),
        1 => Just(Framing::TrailingGarbage),
        1 => Just(Framing::TrailingComma),
        1 => Just(Framing::NonJsonSpace),
    ]
    .boxed()
}

fn render(members: &[(String, String)], framing: Framing) -> Vec<u8> {
    let (colon, comma) = match framing {
        Framing::Spaced => (" :\t", " ,\r\n  "),
        _ => (":", ","),
    };
    let inner: Vec<String> = members
        .iter()
        .map(|(key, raw)| format!("{key}{colon}{raw}"))
        .collect();
    let mut object = format!("{{{}}}", inner.join(comma));
    match framing {
        Framing::Compact | Framing::Spaced => {}
        Framing::Bom => object.insert(0, '\u{FEFF}'),
        Framing::LeadingWhitespace => object.insert_str(0, " \t\r\n"),
        Framing::TrailingNewline => object.push('\n'),
        Framing::TrailingGarbage => object.push_str(" x"),
        Framing::TrailingComma => object.insert(object.len() - 1, ','),
        Framing::NonJsonSpace => object.insert(0, '\u{A0}'),
    }
    object.into_bytes()
}

/// A delivery to parse.
#[derive(Clone)]
struct Delivery {
    body: Vec<u8>,
    message_id: Option<String>,
    mutation: Mutation,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("body", &shorten(&String::from_utf8_lossy(&self.body)))
            .field("message_id", &self.message_id)
            .field("mutation", &self.mutation)
            .finish()
    }
}

fn near_valid() -> BoxedStrategy<Delivery> {
    (valid_template(), mutation(), framing())
        .prop_map(|((members, mut message_id), mutation, framing)| {
            // Keys as JSON text from here on, so one can be written escaped.
            let mut members: Vec<(String, String)> = members
                .into_iter()
                .map(|(key, raw)| (string_literal(&key, false), raw))
                .collect();
            let position = |members: &[(String, String)], name: &str| {
                let key = string_literal(name, false);
                members.iter().position(|(k, _)| *k == key)
            };
            let key = |name: &str| string_literal(name, false);
            match &mutation {
                Mutation::Nothing => {}
                Mutation::Set(name, value) => match position(&members, name) {
                    Some(i) => members[i].1.clone_from(value),
                    None => members.push((key(name), value.clone())),
                },
                Mutation::Remove(name) => {
                    let name = key(name);
                    members.retain(|(k, _)| *k != name);
                }
                Mutation::Duplicate(name, value) => members.push((key(name), value.clone())),
                Mutation::Unknown(name, value) => {
                    let at = members.len() / 2;
                    members.insert(at, (key(name), value.clone()));
                }
                Mutation::EscapedKey(name) => {
                    if let Some(i) = position(&members, name) {
                        members[i].0 = format!("\"\\u{:04x}{}\"", name.as_bytes()[0], &name[1..]);
                    }
                }
                Mutation::RenamedKey(name, renamed) => {
                    if let Some(i) = position(&members, name) {
                        members[i].0 = key(renamed);
                    }
                }
                Mutation::MessageId(id) => message_id.clone_from(id),
            }
            Delivery {
                body: render(&members, framing),
                message_id,
                mutation,
            }
        })
        .boxed()
}

/// Sequences of JSON tokens: mostly broken documents, sometimes objects.
fn json_token_soup() -> BoxedStrategy<Vec<u8>> {
    let token = prop_oneof![
        4 => prop::sample::select(vec![
            "{", "}", "[", "]", ":", ",", "null", "true", " ", "\n", "\"command_id\"",
            "\"customer_id\"", "\"product_id\"", "\"credit_count\"",
            "\"amount_excluding_tax\"", "\"price_id\"", "\"expires_at\"",
            "\"6f1c1f0e-4c1a-4a51-9d7e-3f5d2b8e9a10\"", "\"cus_1\"", "\"itm_1\"", "\"\\ud800\"",
            "\"\\u0000\"", "\"", "\\", "\u{FEFF}", "/*", "*/", "//",
        ])
        .prop_map(str::to_owned),
        2 => number_text(),
        1 => string_json(),
    ];
    prop::collection::vec(token, 0..40)
        .prop_map(|tokens| {
            let mut body = String::from("{");
            body.push_str(&tokens.concat());
            body.into_bytes()
        })
        .boxed()
}

fn any_message_id() -> BoxedStrategy<Option<String>> {
    prop_oneof![
        Just(None),
        valid_command_id().prop_map(Some),
        hostile_string().prop_map(Some),
        boundary_string().prop_map(Some),
        any::<String>().prop_map(Some),
    ]
    .boxed()
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(512);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// Any bytes, any message_id: a verdict, never a panic, and the oracle's.
    #[test]
    fn any_bytes_get_a_verdict(
        body in prop::collection::vec(any::<u8>(), 0..2048),
        message_id in any_message_id(),
    ) {
        agree(&body, message_id.as_deref())?;
    }

    /// Any text starting like an object.
    #[test]
    fn token_soup_gets_the_oracles_verdict(
        body in json_token_soup(),
        message_id in any_message_id(),
    ) {
        agree(&body, message_id.as_deref())?;
    }

    /// A valid command with one thing changed.
    #[test]
    fn near_valid_commands_get_the_oracles_verdict(delivery in near_valid()) {
        agree(&delivery.body, delivery.message_id.as_deref())?;
    }

    /// Valid commands stay valid however they are written (and the
    /// generator's templates really are valid).
    #[test]
    fn valid_templates_are_accepted(
        (members, message_id) in valid_template(),
        framing in prop_oneof![
            Just(Framing::Compact),
            Just(Framing::Spaced),
            Just(Framing::LeadingWhitespace),
            Just(Framing::TrailingNewline),
        ],
    ) {
        let members: Vec<(String, String)> = members
            .into_iter()
            .map(|(key, raw)| (string_literal(&key, false), raw))
            .collect();
        let body = render(&members, framing);
        prop_assert!(oracle(&body, message_id.as_deref()).is_ok());
        agree(&body, message_id.as_deref())?;
    }

    /// Around the 64 KiB limit, padded with whitespace, an unknown string, or
    /// multi-byte characters (the limit is on bytes).
    #[test]
    fn the_64_kib_boundary(
        delta in -3_i64..=3,
        padding in prop::sample::select(vec![' ', '\n', 'x', 'é', '😀']),
        message_id in prop::option::of(valid_command_id()),
    ) {
        let body = padded_command(delta, padding);
        prop_assert_eq!(delta_of(&body), delta);
        agree(&body, message_id.as_deref())?;
        let accepted = Command::parse(&body, message_id.as_deref()).is_ok();
        prop_assert_eq!(accepted, body.len() <= BODY_LIMIT, "len {}", body.len());
    }
}

const VALID: &str = r#"{"command_id":"6f1c1f0e-4c1a-4a51-9d7e-3f5d2b8e9a10","customer_id":"cus_Typ0px2W0aiEtl","product_id":"itm_3kXODDF42QXtnL","credit_count":32,"amount_excluding_tax":24000,"price_id":null,"expires_at":null"#;

fn delta_of(body: &[u8]) -> i64 {
    body.len() as i64 - BODY_LIMIT as i64
}

/// A valid command of `BODY_LIMIT + delta` bytes (or as close as whole
/// padding characters allow). Whitespace pads after the object; other
/// characters fill an unknown string member.
fn padded_command(delta: i64, padding: char) -> Vec<u8> {
    let target = usize::try_from(BODY_LIMIT as i64 + delta).unwrap_or(BODY_LIMIT);
    if padding.is_ascii_whitespace() {
        let mut body = format!("{VALID}}}");
        let fill = target.saturating_sub(body.len());
        body.push_str(&padding.to_string().repeat(fill));
        return body.into_bytes();
    }
    let head = format!("{VALID},\"padding\":\"");
    let tail = "\"}";
    let room = target.saturating_sub(head.len() + tail.len());
    let count = room / padding.len_utf8();
    let ascii = room % padding.len_utf8();
    format!(
        "{head}{}{}{tail}",
        padding.to_string().repeat(count),
        "x".repeat(ascii)
    )
    .into_bytes()
}

// ---------------------------------------------------------------------------
// Fixed cases: the oracle itself, the limit, deep nesting.
// ---------------------------------------------------------------------------

#[test]
fn the_oracle_uses_the_contracts_limit() {
    assert_eq!(MAX_BODY_BYTES, BODY_LIMIT);
    assert_eq!(MAX_INTEGER, (1_u64 << 53) - 1);
    assert_eq!(MAX_INTEGER.to_string(), MAX_INTEGER_TEXT);
}

#[test]
fn the_oracle_knows_the_contract_example() {
    let body = format!("{VALID}}}");
    let expected = oracle(body.as_bytes(), None).expect("the contract's example is valid");
    assert_eq!(expected.credit_count, 32);
    assert_eq!(expected.pricing, ExpectedPricing::Amount(24000));
    agree(body.as_bytes(), None).expect("agree");
}

#[test]
fn the_oracles_date_check_knows_the_edges() {
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
fn every_tricky_date_time_gets_the_oracles_verdict() {
    for at in TRICKY_DATE_TIMES {
        let body = format!("{VALID}}}").replace(
            "\"expires_at\":null",
            &format!("\"expires_at\":{}", string_literal(at, false)),
        );
        agree(body.as_bytes(), None).unwrap_or_else(|e| panic!("{at:?}: {e}"));
    }
}

#[test]
fn exactly_at_and_just_over_the_limit() {
    for delta in [-1_i64, 0, 1, 2] {
        for padding in [' ', 'x', 'é', '😀'] {
            let body = padded_command(delta, padding);
            assert_eq!(delta_of(&body), delta, "{padding:?}");
            let verdict = Command::parse(&body, None);
            assert_eq!(verdict.is_ok(), delta <= 0, "{delta} {padding:?}");
            agree(&body, None).expect("agree");
        }
    }
    // Over the limit, the ids are not read: only message_id is echoed.
    let body = padded_command(1, ' ');
    let e = Command::parse(&body, Some("6f1c1f0e-4c1a-4a51-9d7e-3f5d2b8e9a10")).unwrap_err();
    assert_eq!(
        e.raw.command_id.as_deref(),
        Some("6f1c1f0e-4c1a-4a51-9d7e-3f5d2b8e9a10")
    );
    assert_eq!(e.raw.customer_id, None);
    // A huge body is refused on its length alone.
    let huge = vec![b'{'; 16 * BODY_LIMIT];
    assert!(Command::parse(&huge, None).is_err());
}

/// A valid command with `value` under an unknown key.
fn with_unknown(value: &str) -> Vec<u8> {
    format!("{VALID},\"note\":{value}}}").into_bytes()
}

#[test]
fn deep_nesting_is_a_verdict_not_a_crash() {
    // The deepest an unknown member can be and still fit in 64 KiB.
    let max_depth = (BODY_LIMIT - VALID.len() - 20) / 2;
    for depth in [1, 127, 128, 129, 1_000, 10_000, max_depth] {
        for objects in [false, true] {
            let depth = if objects { depth / 6 } else { depth };
            let body = with_unknown(&nested(depth, objects, "null"));
            if body.len() > BODY_LIMIT {
                continue;
            }
            agree(&body, None).unwrap_or_else(|e| panic!("depth {depth}: {e}"));
        }
        // Unclosed: never valid.
        let open = with_unknown(&"[".repeat(depth));
        assert!(Command::parse(&open, None).is_err());
        // In a known field: the wrong type, whatever the depth.
        let mut known = format!("{VALID}}}");
        known = known.replace(
            "\"credit_count\":32",
            &format!(
                "\"credit_count\":{}",
                nested(depth.min(30_000), false, "32")
            ),
        );
        if known.len() <= BODY_LIMIT {
            assert!(Command::parse(known.as_bytes(), None).is_err());
            agree(known.as_bytes(), None).expect("agree");
        }
    }
    // A top level of nothing but brackets.
    for body in ["[".repeat(BODY_LIMIT), "{\"a\":".repeat(BODY_LIMIT / 5)] {
        assert!(Command::parse(body.as_bytes(), None).is_err());
        agree(body.as_bytes(), None).expect("agree");
    }
}

#[test]
fn hostile_ids_never_get_through() {
    let evil = [
        "cus_1/../admin",
        "..",
        "cus%2F1",
        "cus_1?x=1",
        "cus_1#x",
        "cus_1\r\nX-Evil: 1",
        "cus_1\0",
        "cus\u{202E}1",
        "cus\u{200D}1",
        "cus_\u{0430}",
        "cus_1 ",
        "",
    ];
    for value in evil {
        for key in ["customer_id", "product_id", "command_id"] {
            let padded = format!("{value}-000000000000000");
            let value = if key == "command_id" { &padded } else { value };
            let original = match key {
                "customer_id" => "\"cus_Typ0px2W0aiEtl\"",
                "product_id" => "\"itm_3kXODDF42QXtnL\"",
                _ => "\"6f1c1f0e-4c1a-4a51-9d7e-3f5d2b8e9a10\"",
            };
            let body = format!("{VALID}}}").replace(
                &format!("\"{key}\":{original}"),
                &format!("\"{key}\":{}", string_literal(value, false)),
            );
            // `.` is allowed in a command id (not in a path id): ".." there
            // is harmless, it only ever travels in a header.
            let allowed = key == "command_id" && command_id_ok(value);
            assert_eq!(
                Command::parse(body.as_bytes(), None).is_ok(),
                allowed,
                "{key} = {value:?}"
            );
            agree(body.as_bytes(), None).expect("agree");
        }
    }
}
