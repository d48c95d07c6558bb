//! Newtypes for the fields of a command, each built only through `parse`, so a
//! value that exists is valid and nothing checks it twice.
//!
//! The id rules matter beyond tidiness: `customer_id` and `product_id` are
//! spliced into the request path, so a `/`, `..`, `%2F` or `?` that slipped
//! through would send the purchase to another URL.

use std::fmt;

/// The largest integer a JSON number carries exactly in every language
/// (2^53 − 1): publishers in JavaScript cannot send more without losing digits.
pub const MAX_JSON_INTEGER: u64 = (1 << 53) - 1;

/// Why a field's value was refused; the message goes into the `failed` event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Outside the allowed length range.
    #[error("must be {min} to {max} characters long, got {got}")]
    Length { min: usize, max: usize, got: usize },
    /// A character outside the allowed set.
    #[error("contains {found:?} at position {position}; allowed: {allowed}")]
    Character {
        found: char,
        position: usize,
        allowed: &'static str,
    },
    /// An integer outside the allowed range.
    #[error("must be an integer from {min} to {max}")]
    Range { min: u64, max: u64 },
}

fn check_chars(
    value: &str,
    min: usize,
    max: usize,
    allowed: &'static str,
    ok: impl Fn(char) -> bool,
) -> Result<(), IdError> {
    // One pass: every command checks three ids on the hot path. An ASCII
    // id (every valid one) is read a byte at a time, without decoding
    // UTF-8: a byte is then a character, at the same position.
    let (got, first_bad) = if value.is_ascii() {
        let first_bad = value
            .bytes()
            .map(char::from)
            .enumerate()
            .find(|(_, c)| !ok(*c));
        (value.len(), first_bad)
    } else {
        let mut got = 0;
        let mut first_bad = None;
        for (position, c) in value.chars().enumerate() {
            got = position + 1;
            if first_bad.is_none() && !ok(c) {
                first_bad = Some((position, c));
            }
        }
        (got, first_bad)
    };
    if got < min || got > max {
        return Err(IdError::Length { min, max, got });
    }
    match first_bad {
        Some((position, found)) => Err(IdError::Character {
            found,
            position,
            allowed,
        }),
        None => Ok(()),
    }
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $min:expr, $max:expr, $allowed:expr, $ok:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Accepts the value only when it follows the contract's rule.
            pub fn parse(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                check_chars(&value, $min, $max, $allowed, $ok)?;
                Ok(Self(value))
            }

            /// The value as sent by the publisher.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }
    };
}

fn is_command_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
}

fn is_path_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-')
}

string_id!(
    /// The command's identity and its `Idempotency-Key`: 16 to 255 of
    /// `[A-Za-z0-9._:-]` (Hyperline wants keys of at least 16 characters).
    CommandId, 16, 255, "A-Z a-z 0-9 . _ : -", is_command_id_char
);
string_id!(
    /// A Hyperline customer id; goes into the URL path.
    CustomerId, 1, 128, "A-Z a-z 0-9 _ -", is_path_id_char
);
string_id!(
    /// A Hyperline product id; goes into the URL path.
    ProductId, 1, 128, "A-Z a-z 0-9 _ -", is_path_id_char
);
string_id!(
    /// A bundle price id; goes into the JSON body only, so any character is
    /// allowed.
    PriceId, 1, 255, "any character", |_| true
);

/// How many credits to buy: a whole number from 1 to 2^53 − 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct CreditCount(u64);

impl CreditCount {
    /// Accepts 1 ..= 2^53 − 1.
    pub fn parse(value: u64) -> Result<Self, IdError> {
        if (1..=MAX_JSON_INTEGER).contains(&value) {
            Ok(Self(value))
        } else {
            Err(IdError::Range {
                min: 1,
                max: MAX_JSON_INTEGER,
            })
        }
    }

    /// The number of credits.
    pub fn get(self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_id_length_bounds() {
        assert!(CommandId::parse("a".repeat(15)).is_err());
        assert!(CommandId::parse("a".repeat(16)).is_ok());
        assert!(CommandId::parse("a".repeat(255)).is_ok());
        assert!(CommandId::parse("a".repeat(256)).is_err());
    }

    #[test]
    fn command_id_character_set() {
        assert!(CommandId::parse("6f1c1f0e-4c1a:4a51.9d7e_3f5d").is_ok());
        for bad in [
            "6f1c1f0e-4c1a-4a51/",
            "6f1c1f0e 4c1a-4a51",
            "6f1c1f0e-4c1a-4a5é",
        ] {
            assert!(
                matches!(CommandId::parse(bad), Err(IdError::Character { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn positions_and_lengths_count_characters_ascii_or_not() {
        let character = |found, position| IdError::Character {
            found,
            position,
            allowed: "A-Z a-z 0-9 . _ : -",
        };
        assert_eq!(
            CommandId::parse(format!("{}/", "a".repeat(16))),
            Err(character('/', 16))
        );
        assert_eq!(
            CommandId::parse(format!("{}/é", "é".repeat(15))),
            Err(character('é', 0))
        );
        assert_eq!(
            CommandId::parse(format!("{}é/", "a".repeat(14))),
            Err(character('é', 14))
        );
        assert_eq!(
            CommandId::parse("é".repeat(15)),
            Err(IdError::Length {
                min: 16,
                max: 255,
                got: 15
            })
        );
    }

    #[test]
    fn path_ids_refuse_anything_that_changes_the_url() {
        assert!(CustomerId::parse("cus_Typ0px2W0aiEtl").is_ok());
        assert!(ProductId::parse("itm-3kXODDF42QXtnL").is_ok());
        for bad in ["", "a/b", "..", "%2F", "a?b", "a\r\nb", "a.b", "a:b", "ä"] {
            assert!(CustomerId::parse(bad).is_err(), "{bad:?}");
            assert!(ProductId::parse(bad).is_err(), "{bad:?}");
        }
        assert!(CustomerId::parse("c".repeat(128)).is_ok());
        assert!(CustomerId::parse("c".repeat(129)).is_err());
    }

    #[test]
    fn price_id_is_non_empty_and_bounded() {
        assert!(PriceId::parse("").is_err());
        assert!(PriceId::parse("price/ä?").is_ok());
        assert!(PriceId::parse("p".repeat(255)).is_ok());
        assert!(PriceId::parse("p".repeat(256)).is_err());
    }

    #[test]
    fn credit_count_range() {
        assert!(CreditCount::parse(0).is_err());
        assert_eq!(CreditCount::parse(1).map(CreditCount::get), Ok(1));
        assert!(CreditCount::parse(MAX_JSON_INTEGER).is_ok());
        assert!(CreditCount::parse(MAX_JSON_INTEGER + 1).is_err());
    }
}
