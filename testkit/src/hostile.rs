//! Hostile inputs: what a publisher could put in a command to change the URL
//! or a header the worker writes, to pass for an allowed character, or to
//! trip the JSON and number rules.
//!
//! Plain data, so that the property tests (`tests/parser_props.rs`, drawing
//! with proptest) and the hostile stream (`tests/worker/hostile.rs`, drawing
//! with a seeded `rand` generator) attack with one vocabulary; the tests
//! below check that each list is what its name says, against [`crate::rules`].

/// Separators, traversal and their percent-encodings: what could change a
/// URL path.
pub const URL_TRICKS: &[&str] = &[
    "/",
    "..",
    "../",
    "../../admin",
    "%2F",
    "%2f",
    "%2e%2e",
    "?",
    "?x=1",
    "#",
    "#frag",
    "%00",
    "%0d%0a",
    "\\",
];

/// Line ends, NUL, control characters and quotes: what could end a header
/// line or a string.
pub const LINE_TRICKS: &[&str] = &[
    "\r\n",
    "\r",
    "\n",
    "\r\nX-Evil: 1",
    "\0",
    "\u{85}",
    "\u{7F}",
    "\u{2028}",
    "\t",
    "\"",
    "'",
];

/// Characters that pass for allowed ones, or hide: direction overrides,
/// zero-width characters, homoglyphs, combining marks, emoji.
pub const LOOKALIKES: &[&str] = &[
    "\u{202E}",
    "\u{200D}",
    "\u{200B}",
    "\u{200C}",
    "\u{FEFF}",
    "а",
    "е",
    "о",
    "ο",
    "Ａ",
    "０",
    "‐",
    "−",
    "\u{301}",
    "é",
    "😀",
    "\u{FFFD}",
    "İ",
    "ß",
    "Ω",
    "\u{1F1FA}\u{1F1F8}",
];

/// Punctuation outside the path ids' characters (`.` and `:` are allowed in
/// a command id, not in a path id) and markup.
pub const PUNCTUATION: &[&str] = &[" ", ":", ".", "<", ">", "{", "}", "<script>", "@", "+", "*"];

/// Every piece of a hostile string: each holds at least one byte that no
/// customer or product id may hold.
pub fn pieces() -> Vec<&'static str> {
    [URL_TRICKS, LINE_TRICKS, LOOKALIKES, PUNCTUATION].concat()
}

/// Whole customer or product ids that try to change the request: traversal,
/// an encoded slash, a query, a fragment, a header injection, NUL, lookalikes,
/// a space, nothing at all.
pub const PATH_TRICKS: &[&str] = &[
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
    "cus 1",
    "cus_1 ",
    "",
    "../../v1/customers/x/credits/y/purchase",
];

/// Integers at the contract's edges, all valid (`0` only as an amount).
pub const EDGE_INTEGERS: &[&str] = &["0", "1", "32", "9007199254740990", "9007199254740991"];

/// Integers past the contract's range: above 2^53 − 1, or negative.
pub const OUT_OF_RANGE_NUMBERS: &[&str] = &[
    "9007199254740992",
    "9007199254740993",
    "18446744073709551615",
    "18446744073709551616",
    "123456789012345678901234567890",
    "1e400",
    "-1e400",
    "-1",
    "-5",
];

/// Numbers the contract refuses whatever their value: fractions, exponents,
/// signs, leading zeros, and tokens that are not JSON numbers at all.
pub const NOT_INTEGERS: &[&str] = &[
    "-0",
    "32.0",
    "3.2e1",
    "1e3",
    "1E3",
    "1e+3",
    "1e-3",
    "1.0e0",
    "0.5",
    "-0.0",
    "1.0",
    "4.9e-324",
    "9007199254740991.0",
    "9.007199254740991e15",
    "00",
    "01",
    "+1",
    ".5",
    "1.",
    "NaN",
    "Infinity",
    "-Infinity",
    "0x10",
    "1_000",
    "١٢",
];

/// Valid RFC 3339 date-times at the edges: lower case, leap days, leap
/// seconds (with offsets), long fractions, `-00:00`, year 0.
pub const EDGE_DATE_TIMES: &[&str] = &[
    "2027-01-01T00:00:00Z",
    "2028-02-29T00:00:00Z",
    "2000-02-29T00:00:00Z",
    "2027-06-30T23:59:60Z",
    "2027-06-30T23:59:60.5Z",
    "2027-06-30T22:59:60-01:00",
    "2027-07-01T00:59:60+01:00",
    "2027-12-31T23:59:60z",
    "0000-01-01T00:00:00Z",
    "2027-01-01T00:00:00.123456789012Z",
    "2027-01-01T00:00:00-00:00",
];

/// Near-misses of RFC 3339: another separator (a line end, NUL, a slash), no
/// offset, out-of-range fields, days that do not exist, misplaced leap
/// seconds, padding, full-width digits, a header injection, prose.
pub const BAD_DATE_TIMES: &[&str] = &[
    "2027-01-01 00:00:00Z",
    "2027-01-01\n00:00:00Z",
    "2027-01-01\r00:00:00Z",
    "2027-01-01\r\n00:00:00Z",
    "2027-01-01\u{0}00:00:00Z",
    "2027-01-01/00:00:00Z",
    "2027-01-01é00:00:00Z",
    "2027-01-01T00:00:00",
    "2027-01-01T00:00:00.Z",
    "2027-01-01T00:00:00+0100",
    "2027-01-01T00:00:00+24:00",
    "2027-01-01T00:00:00+23:60",
    "2027-01-01T24:00:00Z",
    "2027-01-01T25:00:00Z",
    "2027-01-01T00:60:00Z",
    "2027-01-01T00:00:61Z",
    "2027-02-29T00:00:00Z",
    "2027-02-30T00:00:00Z",
    "2100-02-29T00:00:00Z",
    "2027-04-31T00:00:00Z",
    "2027-00-10T00:00:00Z",
    "2027-01-00T00:00:00Z",
    "2027-06-29T23:59:60Z",
    "2027-01-01T00:00:00Z ",
    " 2027-01-01T00:00:00Z",
    "2027-01-01T00:00:00ZZ",
    "２０２７-01-01T00:00:00Z",
    "2027-1-01T00:00:00Z",
    "2027-01-01T00:00:00\u{202E}Z",
    "2027-01-01T00:00:00Z\r\nX-Evil: 1",
    "2027-01-01",
    "next tuesday",
];

/// JSON tokens, the contract's keys and ids among them, and pieces that are
/// not JSON (comments, a BOM, a lone quote or backslash, a lone surrogate):
/// strung together they make mostly broken documents, sometimes objects.
pub const JSON_TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "null",
    "true",
    "1",
    " ",
    "\n",
    "\"command_id\"",
    "\"customer_id\"",
    "\"product_id\"",
    "\"credit_count\"",
    "\"amount_excluding_tax\"",
    "\"price_id\"",
    "\"expires_at\"",
    "\"6f1c1f0e-4c1a-4a51-9d7e-3f5d2b8e9a10\"",
    "\"cus_1\"",
    "\"itm_1\"",
    "\"x\"",
    "\"\\ud800\"",
    "\"\\u0000\"",
    "\"",
    "\\",
    "\u{FEFF}",
    "/*",
    "*/",
    "//",
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{path_id_ok, rfc3339, whole_number};

    #[test]
    fn no_piece_fits_in_a_path_id() {
        for piece in pieces() {
            assert!(!path_id_ok(&format!("cus_{piece}")), "{piece:?}");
        }
        for trick in PATH_TRICKS {
            assert!(!path_id_ok(trick), "{trick:?}");
        }
    }

    #[test]
    fn the_numbers_are_what_their_lists_say() {
        for n in EDGE_INTEGERS {
            assert!(whole_number(n).is_some(), "{n}");
        }
        // `whole_number` reads the raw text of a value already read as JSON:
        // what is not JSON (`00`, `NaN`) never reaches it.
        let json = |n: &str| serde_json::from_str::<serde_json::Value>(n).is_ok();
        for n in OUT_OF_RANGE_NUMBERS.iter().chain(NOT_INTEGERS) {
            assert!(!json(n) || whole_number(n).is_none(), "{n}");
        }
    }

    #[test]
    fn the_date_times_are_what_their_lists_say() {
        for at in EDGE_DATE_TIMES {
            assert!(rfc3339(at), "{at:?}");
        }
        for at in BAD_DATE_TIMES {
            assert!(!rfc3339(at), "{at:?}");
        }
    }
}
