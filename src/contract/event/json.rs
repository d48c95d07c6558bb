//! The event's JSON body, written field by field: the bytes `serde_json`
//! writes for the derived `Serialize` (same order, same escaping), without
//! its machinery.
//!
//! Why by hand: every command publishes one event, and through the derive
//! each key went through `serde_json`'s string escaper, each field through
//! a generic `serialize_entry`, and `occurred_at` through a `String` of its
//! own (BENCHMARKS.md, issue 30, has the count). Here the keys are
//! literals and only the values are escaped. The derive stays the
//! reference: the tests compare both on every kind of event and on
//! arbitrary strings.

use serde::Serializer as _;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use super::{EventError, ResultEvent};

/// An event is 300 to 500 bytes: `to_vec` would start at 128 and copy it
/// twice on the way.
const CAPACITY: usize = 512;

/// The JSON body of `event`; empty if its time cannot be written in RFC
/// 3339 (a year outside 0000 to 9999), as the derive fails then too.
pub(super) fn encode(event: &ResultEvent) -> Vec<u8> {
    let mut out = Vec::with_capacity(CAPACITY);
    out.extend_from_slice(b"{\"schema\":");
    integer(&mut out, u64::from(event.schema));
    out.extend_from_slice(b",\"event_id\":");
    uuid(&mut out, event.event_id);
    out.extend_from_slice(b",\"type\":\"");
    // The type's names need no escaping.
    out.extend_from_slice(event.kind.as_str().as_bytes());
    out.extend_from_slice(b"\",\"command_id\":");
    optional_string(&mut out, event.command_id.as_deref());
    out.extend_from_slice(b",\"customer_id\":");
    optional_string(&mut out, event.customer_id.as_deref());
    out.extend_from_slice(b",\"product_id\":");
    optional_string(&mut out, event.product_id.as_deref());
    out.extend_from_slice(b",\"credit_count\":");
    optional_integer(&mut out, event.credit_count);
    if let Some(invoice_id) = &event.invoice_id {
        out.extend_from_slice(b",\"invoice_id\":");
        string(&mut out, invoice_id);
    }
    if let Some(balance) = event.new_credit_balance {
        out.extend_from_slice(b",\"new_credit_balance\":");
        integer(&mut out, balance);
    }
    out.extend_from_slice(b",\"attempts\":");
    integer(&mut out, u64::from(event.attempts));
    out.extend_from_slice(b",\"occurred_at\":");
    if !time(&mut out, event.occurred_at) {
        return Vec::new();
    }
    if let Some(error) = &event.error {
        out.extend_from_slice(b",\"error\":");
        error_object(&mut out, error);
    }
    if event.reconciled {
        out.extend_from_slice(b",\"reconciled\":true");
    }
    out.push(b'}');
    out
}

fn error_object(out: &mut Vec<u8>, error: &EventError) {
    out.extend_from_slice(b"{\"code\":\"");
    // The codes' names need no escaping.
    out.extend_from_slice(error.code.as_str().as_bytes());
    out.extend_from_slice(b"\",\"message\":");
    string(out, &error.message);
    out.extend_from_slice(b",\"http_status\":");
    optional_integer(out, error.http_status.map(u64::from));
    out.push(b'}');
}

/// `value` quoted and escaped by `serde_json` itself, so a string is
/// written exactly as the derive writes it. Writing into a `Vec` cannot
/// fail.
fn string(out: &mut Vec<u8>, value: &str) {
    let _ = serde_json::Serializer::new(out).serialize_str(value);
}

fn optional_string(out: &mut Vec<u8>, value: Option<&str>) {
    match value {
        Some(value) => string(out, value),
        None => out.extend_from_slice(b"null"),
    }
}

fn integer(out: &mut Vec<u8>, value: u64) {
    let _ = serde_json::Serializer::new(out).serialize_u64(value);
}

fn optional_integer(out: &mut Vec<u8>, value: Option<u64>) {
    match value {
        Some(value) => integer(out, value),
        None => out.extend_from_slice(b"null"),
    }
}

/// Hyphenated, lower case, as `uuid`'s `Serialize` writes it.
fn uuid(out: &mut Vec<u8>, id: Uuid) {
    let mut buffer = Uuid::encode_buffer();
    out.push(b'"');
    out.extend_from_slice(id.hyphenated().encode_lower(&mut buffer).as_bytes());
    out.push(b'"');
}

/// RFC 3339, as `time::serde::rfc3339` writes it, without its `String`;
/// `false` if the time cannot be written so.
fn time(out: &mut Vec<u8>, at: OffsetDateTime) -> bool {
    let mut stamp = [0u8; 40];
    let mut cursor = &mut stamp[..];
    if at.format_into(&mut cursor, &Rfc3339).is_err() {
        return false;
    }
    let written = 40 - cursor.len();
    out.push(b'"');
    out.extend_from_slice(stamp.get(..written).unwrap_or_default());
    out.push(b'"');
    true
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::contract::{ErrorCode, EventKind};

    /// What the derive writes: the reference.
    fn derived(event: &ResultEvent) -> Vec<u8> {
        serde_json::to_vec(event).unwrap_or_default()
    }

    fn event() -> ResultEvent {
        ResultEvent {
            schema: 1,
            event_id: Uuid::from_u128(0x6f1c1f0e_4c1a_4a51_9d7e_3f5d2b8e9a10),
            kind: EventKind::Succeeded,
            command_id: Some("cmd-1".into()),
            customer_id: Some("cus_1".into()),
            product_id: Some("itm_1".into()),
            credit_count: Some(32),
            invoice_id: Some("inv_1".into()),
            new_credit_balance: Some(2032),
            attempts: 1,
            occurred_at: OffsetDateTime::from_unix_timestamp_nanos(1_790_000_000_123_000_000)
                .unwrap_or(OffsetDateTime::UNIX_EPOCH),
            error: None,
            reconciled: false,
        }
    }

    #[test]
    fn every_kind_of_event_is_written_as_the_derive_writes_it() {
        let failed = ResultEvent {
            kind: EventKind::Failed,
            invoice_id: None,
            new_credit_balance: None,
            attempts: 0,
            error: Some(EventError {
                code: ErrorCode::InvalidCommand,
                message: "body is not valid JSON: \"x\"\n\u{1}".into(),
                http_status: None,
            }),
            ..event()
        };
        let events = [
            event(),
            ResultEvent {
                reconciled: true,
                ..event()
            },
            ResultEvent {
                error: Some(EventError {
                    code: ErrorCode::Rejected,
                    message: "no such customer".into(),
                    http_status: Some(404),
                }),
                ..failed.clone()
            },
            ResultEvent {
                command_id: None,
                customer_id: None,
                product_id: None,
                credit_count: None,
                ..failed.clone()
            },
            ResultEvent {
                occurred_at: OffsetDateTime::UNIX_EPOCH,
                ..failed
            },
        ];
        for event in &events {
            let ours = encode(event);
            assert_eq!(
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&derived(event))
            );
        }
    }

    #[test]
    fn a_time_rfc_3339_cannot_write_gives_no_body_as_the_derive_does() {
        let event = ResultEvent {
            occurred_at: OffsetDateTime::UNIX_EPOCH
                .replace_year(-1)
                .unwrap_or(OffsetDateTime::UNIX_EPOCH),
            ..event()
        };
        assert_eq!(encode(&event), derived(&event));
        assert!(encode(&event).is_empty());
    }

    proptest! {
        #[test]
        fn arbitrary_values_are_written_as_the_derive_writes_them(
            command_id in proptest::option::of(any::<String>()),
            customer_id in proptest::option::of(any::<String>()),
            invoice_id in proptest::option::of(any::<String>()),
            message in any::<String>(),
            credit_count in proptest::option::of(any::<u64>()),
            balance in proptest::option::of(any::<u64>()),
            attempts in any::<u32>(),
            http_status in proptest::option::of(any::<u16>()),
            millis in 0_i64..253_402_300_799_999,
            id in any::<u128>(),
            reconciled in any::<bool>(),
        ) {
            let event = ResultEvent {
                event_id: Uuid::from_u128(id),
                command_id,
                customer_id,
                invoice_id,
                credit_count,
                new_credit_balance: balance,
                attempts,
                occurred_at: OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000)
                    .unwrap_or(OffsetDateTime::UNIX_EPOCH),
                error: Some(EventError {
                    code: ErrorCode::UnexpectedResponse,
                    message,
                    http_status,
                }),
                reconciled,
                ..event()
            };
            prop_assert_eq!(encode(&event), derived(&event));
        }
    }
}
