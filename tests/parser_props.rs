//! Property tests of `Command::parse` (docs/contract.md section 2).
//!
//! Whatever the bytes and the `message_id`, the parser answers a valid
//! [`Command`] or an `InvalidCommand`, and never panics. Its verdict is
//! compared with a reference oracle written here from the contract's text
//! alone: it walks the document with `serde_json::Value` (and raw text for
//! the integers, which must be written without fraction or exponent) and
//! re-checks every rule with the byte-level predicates of
//! `cpw_testkit::rules` (the contract restated, shared with the fuzz target),
//! so a rule that the parser loosened, or tightened, shows up as a
//! disagreement with the body that caused it.
//!
//! The generators aim near the valid region, since random bytes are refused
//! at the first byte: a valid command with one field mutated (hostile
//! strings: `/`, `..`, `%2F`, `?`, `#`, CR/LF, NUL, U+202E, zero-width
//! joiners, homoglyphs; hostile numbers: huge, negative, fractional,
//! exponents, strings for numbers; nested objects, duplicate keys, escaped
//! keys), plus the 64 KiB boundary and deep nesting. The hostile pieces come
//! from `cpw_testkit::hostile`, which the hostile stream through the worker
//! draws from too.
//!
//! `PROPTEST_CASES` raises the number of cases per property (default 512).

use std::fmt;

use cpw_testkit::commands::command;
use cpw_testkit::hostile::{
    BAD_DATE_TIMES, EDGE_DATE_TIMES, EDGE_INTEGERS, JSON_TOKENS, NOT_INTEGERS,
    OUT_OF_RANGE_NUMBERS, PATH_TRICKS, pieces,
};
use cpw_testkit::rules::{
    MAX_INTEGER, check_verdict, command_id_ok, path_id_ok, price_id_ok, rfc3339, whole_number,
};
use credit_purchase_worker::contract::{Command, InvalidCommand, MAX_BODY_BYTES, Pricing};
use proptest::prelude::*;
use proptest::sample::Index;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

// ---------------------------------------------------------------------------
// The reference oracle: section 2, restated (the rules of each value are
// `cpw_testkit::rules`).
// ---------------------------------------------------------------------------

/// "A body over 64 KiB is invalid", written out rather than taken from the
/// crate (a test checks that the two agree).
const BODY_LIMIT: usize = 65_536;

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

/// Parses, checks the invariants, and compares with the oracle.
fn agree(body: &[u8], message_id: Option<&str>) -> Result<(), TestCaseError> {
    let got = Command::parse(body, message_id);
    let expected = oracle(body, message_id);
    check_verdict(&got).map_err(TestCaseError::fail)?;
    let shown = || {
        format!(
            "body {:?} (len {}), message_id {message_id:?}",
            shorten(&String::from_utf8_lossy(body)),
            body.len()
        )
    };
    match (&got, &expected) {
        (Ok(command), Ok(want)) => {
            prop_assert_eq!(&expected_of(command), want, "{}", shown());
        }
        (Err(error), Err(want)) => {
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
        8 => prop::sample::select(pieces()).prop_map(str::to_owned),
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
        4 => prop::sample::select([EDGE_INTEGERS, OUT_OF_RANGE_NUMBERS, NOT_INTEGERS].concat())
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

/// Near-misses of RFC 3339, and valid date-times at the edges.
fn tricky_date_time() -> BoxedStrategy<String> {
    prop::sample::select([EDGE_DATE_TIMES, BAD_DATE_TIMES].concat())
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
        4 => prop::sample::select(JSON_TOKENS).prop_map(|t| (*t).to_owned()),
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

/// The command id of the contract's example.
const EXAMPLE_ID: &str = "6f1c1f0e-4c1a-4a51-9d7e-3f5d2b8e9a10";

/// The contract's example command, as compact JSON.
fn example() -> String {
    command(EXAMPLE_ID).to_string()
}

/// [`example`] without its closing brace, for members to be appended.
fn example_open() -> String {
    let mut text = example();
    text.pop();
    text
}

fn delta_of(body: &[u8]) -> i64 {
    body.len() as i64 - BODY_LIMIT as i64
}

/// A valid command of `BODY_LIMIT + delta` bytes (or as close as whole
/// padding characters allow). Whitespace pads after the object; other
/// characters fill an unknown string member.
fn padded_command(delta: i64, padding: char) -> Vec<u8> {
    let target = usize::try_from(BODY_LIMIT as i64 + delta).unwrap_or(BODY_LIMIT);
    if padding.is_ascii_whitespace() {
        let mut body = example();
        let fill = target.saturating_sub(body.len());
        body.push_str(&padding.to_string().repeat(fill));
        return body.into_bytes();
    }
    let head = format!("{},\"padding\":\"", example_open());
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
}

#[test]
fn the_oracle_knows_the_contract_example() {
    let body = example();
    let expected = oracle(body.as_bytes(), None).expect("the contract's example is valid");
    assert_eq!(expected.credit_count, 32);
    assert_eq!(expected.pricing, ExpectedPricing::Amount(24000));
    agree(body.as_bytes(), None).expect("agree");
}

#[test]
fn every_tricky_date_time_gets_the_oracles_verdict() {
    for at in EDGE_DATE_TIMES.iter().chain(BAD_DATE_TIMES) {
        let mut body = command(EXAMPLE_ID);
        body["expires_at"] = Value::from(*at);
        agree(body.to_string().as_bytes(), None).unwrap_or_else(|e| panic!("{at:?}: {e}"));
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
    let e = Command::parse(&body, Some(EXAMPLE_ID)).unwrap_err();
    assert_eq!(e.raw.command_id.as_deref(), Some(EXAMPLE_ID));
    assert_eq!(e.raw.customer_id, None);
    // A huge body is refused on its length alone.
    let huge = vec![b'{'; 16 * BODY_LIMIT];
    assert!(Command::parse(&huge, None).is_err());
}

/// A valid command with `value` under an unknown key.
fn with_unknown(value: &str) -> Vec<u8> {
    format!("{},\"note\":{value}}}", example_open()).into_bytes()
}

#[test]
fn deep_nesting_is_a_verdict_not_a_crash() {
    // The deepest an unknown member can be and still fit in 64 KiB.
    let max_depth = (BODY_LIMIT - example_open().len() - 20) / 2;
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
        let known = example().replace(
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
    for &value in PATH_TRICKS {
        for key in ["customer_id", "product_id", "command_id"] {
            let padded = format!("{value}-000000000000000");
            let value = if key == "command_id" { &padded } else { value };
            let mut body = command(EXAMPLE_ID);
            body[key] = Value::from(value);
            let body = body.to_string();
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
