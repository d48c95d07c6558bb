//! Classification of Hyperline's answers: one function that knows the status
//! table of docs/contract.md section 4, separate from the loop that sleeps.

use std::time::Duration;

use reqwest::header::HeaderMap;
use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// What Hyperline returned for a purchase, as the worker must treat it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PurchaseAnswer {
    /// An answer that ends the command's attempts, as it is.
    Final(FinalAnswer),
    /// 409: a request with this key is still running; ask again shortly.
    InProgress,
    /// 429: wait at least `wait` (when the headers said) before any request.
    RateLimited {
        /// From `Retry-After` / `X-RateLimit-Reset`, the later of the two.
        wait: Option<Duration>,
    },
    /// 5xx, 408, timeout, connection error: retry with backoff.
    Transient {
        /// The status, when an answer arrived.
        status: Option<u16>,
        /// What went wrong.
        cause: TransientCause,
    },
    /// 401, 403: the key is wrong, not the command.
    CredentialFault {
        /// The HTTP status.
        status: u16,
    },
}

/// An answer about the command itself, which no retry changes: it becomes
/// the command's event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FinalAnswer {
    /// 2xx with the documented body: the credits are bought (maybe a replay).
    Succeeded(Receipt),
    /// 400, 404, 422: the purchase is refused for good.
    Rejected {
        /// The HTTP status.
        status: u16,
        /// Hyperline's `message`.
        message: String,
    },
    /// 417: the key was already used for another purchase.
    IdempotencyConflict {
        /// Hyperline's `message`.
        message: String,
    },
    /// Anything undocumented (a 2xx with another body, a 3xx, an unknown
    /// 4xx): the charge may have happened, so an operator must look.
    UnexpectedResponse {
        /// The HTTP status.
        status: u16,
        /// What was unexpected.
        detail: String,
    },
}

/// A successful purchase.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Receipt {
    /// The invoice Hyperline made.
    pub invoice_id: String,
    /// The customer's balance of this product after the purchase.
    pub new_credit_balance: u64,
}

/// Why an attempt failed transiently; the metrics label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransientCause {
    /// A 5xx or 408.
    ServerError,
    /// The total deadline passed: the purchase may or may not have happened,
    /// which is why every retry carries the same Idempotency-Key.
    Timeout,
    /// The request was never sent (connect or DNS failure).
    Connect,
    /// The connection broke mid-way.
    Network(String),
}

impl TransientCause {
    /// A short label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            TransientCause::ServerError => "server_error",
            TransientCause::Timeout => "timeout",
            TransientCause::Connect => "connect",
            TransientCause::Network(_) => "network",
        }
    }
}

/// The rate-limit headers of an answer: how much of the write budget is left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    /// `X-RateLimit-Remaining`.
    pub remaining: u64,
    /// Time until `X-RateLimit-Reset`.
    pub reset_after: Duration,
}

#[derive(Deserialize)]
struct ErrorBody {
    message: String,
}

/// Error messages come from the network: keep them short in events and logs.
const MAX_MESSAGE_CHARS: usize = 500;

/// Hyperline's `message`, else the body as text; bounded.
pub(super) fn message_of(body: &[u8]) -> String {
    let text = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => e.message,
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    text.chars().take(MAX_MESSAGE_CHARS).collect()
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// Time until an `X-RateLimit-Reset` value: an RFC 3339 date-time as
/// documented, or (seen in other APIs) Unix seconds or a delta in seconds.
fn until_reset(value: &str, now: OffsetDateTime) -> Option<Duration> {
    let at = match OffsetDateTime::parse(value, &Rfc3339) {
        Ok(at) => at,
        Err(_) => {
            let n: i64 = value.parse().ok()?;
            if n > 1_000_000_000 {
                OffsetDateTime::from_unix_timestamp(n).ok()?
            } else {
                return Some(Duration::from_secs(n.max(0).unsigned_abs()));
            }
        }
    };
    Some(Duration::try_from(at - now).unwrap_or(Duration::ZERO))
}

/// The wait a 429 asks for: no earlier than `Retry-After` (seconds or an
/// HTTP date) and no earlier than `X-RateLimit-Reset`. Unbounded: a number
/// of seconds too large for a `u64` is the longest wait there is, not no
/// wait at all; the gate caps what it pauses for.
pub fn rate_limit_wait(headers: &HeaderMap, now: OffsetDateTime) -> Option<Duration> {
    let retry_after = header(headers, "retry-after").and_then(|v| match v.parse::<u64>() {
        Ok(secs) => Some(Duration::from_secs(secs)),
        Err(_) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => Some(Duration::MAX),
        Err(_) => httpdate::parse_http_date(v).ok().map(|at| {
            at.duration_since(std::time::SystemTime::now())
                .unwrap_or(Duration::ZERO)
        }),
    });
    let reset = header(headers, "x-ratelimit-reset").and_then(|v| until_reset(v, now));
    match (retry_after, reset) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// The quota an answer's rate-limit headers announce, if they do.
pub(super) fn quota(headers: &HeaderMap, now: OffsetDateTime) -> Option<Quota> {
    let remaining = header(headers, "x-ratelimit-remaining")?.parse().ok()?;
    let reset_after = until_reset(header(headers, "x-ratelimit-reset")?, now)?;
    Some(Quota {
        remaining,
        reset_after,
    })
}

/// A 2xx: bought, if its body is the documented one.
fn success(status: u16, body: &[u8]) -> FinalAnswer {
    match serde_json::from_slice::<Receipt>(body) {
        Ok(receipt) if !receipt.invoice_id.is_empty() => FinalAnswer::Succeeded(receipt),
        Ok(_) => FinalAnswer::UnexpectedResponse {
            status,
            detail: "a success without an invoice_id".into(),
        },
        Err(e) => FinalAnswer::UnexpectedResponse {
            status,
            detail: format!("a success whose body is not the documented shape: {e}"),
        },
    }
}

/// Classifies one HTTP answer, and reads its rate-limit quota if it has one.
pub fn classify(
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
    now: OffsetDateTime,
) -> (PurchaseAnswer, Option<Quota>) {
    let answer = match status {
        200..=299 => PurchaseAnswer::Final(success(status, body)),
        400 | 404 | 422 => PurchaseAnswer::Final(FinalAnswer::Rejected {
            status,
            message: message_of(body),
        }),
        401 | 403 => PurchaseAnswer::CredentialFault { status },
        409 => PurchaseAnswer::InProgress,
        417 => PurchaseAnswer::Final(FinalAnswer::IdempotencyConflict {
            message: message_of(body),
        }),
        429 => PurchaseAnswer::RateLimited {
            wait: rate_limit_wait(headers, now),
        },
        408 | 500..=599 => PurchaseAnswer::Transient {
            status: Some(status),
            cause: TransientCause::ServerError,
        },
        _ => PurchaseAnswer::Final(FinalAnswer::UnexpectedResponse {
            status,
            detail: format!("an undocumented status: {}", message_of(body)),
        }),
    };
    (answer, quota(headers, now))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-23 10:00:00 UTC);

    fn answer(status: u16, body: &str) -> PurchaseAnswer {
        classify(status, &HeaderMap::new(), body.as_bytes(), NOW).0
    }

    /// The final answer of `status` and `body`, if it is one.
    fn final_answer(status: u16, body: &str) -> Option<FinalAnswer> {
        match answer(status, body) {
            PurchaseAnswer::Final(answer) => Some(answer),
            _ => None,
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).expect("header"));
        }
        h
    }

    #[test]
    fn success_with_the_documented_body() {
        let want = Some(FinalAnswer::Succeeded(Receipt {
            invoice_id: "inv_1".into(),
            new_credit_balance: 2032,
        }));
        assert_eq!(
            final_answer(201, r#"{"invoice_id":"inv_1","new_credit_balance":2032}"#),
            want
        );
        assert_eq!(
            final_answer(
                200,
                r#"{"invoice_id":"inv_1","new_credit_balance":2032,"extra":1}"#
            ),
            want
        );
    }

    #[test]
    fn success_with_another_body_is_unexpected() {
        for body in [
            "",
            "{}",
            r#"{"invoice_id":"inv_1"}"#,
            r#"{"invoice_id":"","new_credit_balance":1}"#,
            r#"{"invoice_id":"i","new_credit_balance":-1}"#,
            "<html>",
        ] {
            assert!(
                matches!(
                    final_answer(201, body),
                    Some(FinalAnswer::UnexpectedResponse { status: 201, .. })
                ),
                "{body}"
            );
        }
        assert!(matches!(
            final_answer(204, ""),
            Some(FinalAnswer::UnexpectedResponse { status: 204, .. })
        ));
    }

    #[test]
    fn rejections_carry_hyperline_message() {
        for status in [400, 404, 422] {
            assert_eq!(
                final_answer(status, r#"{"message":"customer not found"}"#),
                Some(FinalAnswer::Rejected {
                    status,
                    message: "customer not found".into()
                })
            );
        }
        assert_eq!(
            final_answer(400, "plain"),
            Some(FinalAnswer::Rejected {
                status: 400,
                message: "plain".into()
            })
        );
        let Some(FinalAnswer::Rejected { message, .. }) = final_answer(400, &"x".repeat(10_000))
        else {
            panic!("not rejected")
        };
        assert_eq!(message.len(), MAX_MESSAGE_CHARS);
    }

    #[test]
    fn idempotency_conflict_and_in_progress() {
        assert_eq!(
            final_answer(417, r#"{"message":"key reused"}"#),
            Some(FinalAnswer::IdempotencyConflict {
                message: "key reused".into()
            })
        );
        assert_eq!(
            answer(409, r#"{"message":"in progress"}"#),
            PurchaseAnswer::InProgress
        );
    }

    #[test]
    fn credential_faults() {
        assert_eq!(
            answer(401, ""),
            PurchaseAnswer::CredentialFault { status: 401 }
        );
        assert_eq!(
            answer(403, ""),
            PurchaseAnswer::CredentialFault { status: 403 }
        );
    }

    #[test]
    fn server_errors_are_transient() {
        for status in [408, 500, 502, 503, 504, 599] {
            assert_eq!(
                answer(status, ""),
                PurchaseAnswer::Transient {
                    status: Some(status),
                    cause: TransientCause::ServerError
                }
            );
        }
    }

    #[test]
    fn undocumented_statuses_are_unexpected() {
        for status in [301, 302, 307, 308, 405, 413, 418] {
            assert!(
                matches!(
                    final_answer(status, ""),
                    Some(FinalAnswer::UnexpectedResponse { .. })
                ),
                "{status}"
            );
        }
    }

    #[test]
    fn rate_limited_waits_for_retry_after() {
        let h = headers(&[("retry-after", "7")]);
        assert_eq!(
            classify(429, &h, b"", NOW).0,
            PurchaseAnswer::RateLimited {
                wait: Some(Duration::from_secs(7))
            }
        );
        assert_eq!(answer(429, ""), PurchaseAnswer::RateLimited { wait: None });
    }

    #[test]
    fn rate_limited_waits_for_the_reset_date_time() {
        let h = headers(&[("x-ratelimit-reset", "2026-11-23T10:00:04Z")]);
        assert_eq!(rate_limit_wait(&h, NOW), Some(Duration::from_secs(4)));
        let h = headers(&[
            ("x-ratelimit-reset", "2026-11-23T10:00:09Z"),
            ("retry-after", "2"),
        ]);
        assert_eq!(
            rate_limit_wait(&h, NOW),
            Some(Duration::from_secs(9)),
            "the later of the two"
        );
        let h = headers(&[(
            "x-ratelimit-reset",
            &NOW.unix_timestamp().saturating_add(5).to_string(),
        )]);
        assert_eq!(
            rate_limit_wait(&h, NOW),
            Some(Duration::from_secs(5)),
            "unix seconds"
        );
        let h = headers(&[("x-ratelimit-reset", "2026-11-23T09:59:00Z")]);
        assert_eq!(
            rate_limit_wait(&h, NOW),
            Some(Duration::ZERO),
            "a reset in the past"
        );
        let h = headers(&[("x-ratelimit-reset", "garbage"), ("retry-after", "soon")]);
        assert_eq!(rate_limit_wait(&h, NOW), None);
    }

    #[test]
    fn an_absurd_retry_after_is_read_as_a_long_wait_never_as_none() {
        let wait = |v: &str| rate_limit_wait(&headers(&[("retry-after", v)]), NOW);
        assert_eq!(
            wait("18446744073709551615"),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(wait("99999999999999999999999"), Some(Duration::MAX));
        let ten_years = std::time::SystemTime::now() + Duration::from_secs(10 * 365 * 86_400);
        let asked = wait(&httpdate::fmt_http_date(ten_years)).expect("a date");
        assert!(asked > Duration::from_secs(9 * 365 * 86_400), "{asked:?}");
    }

    #[test]
    fn quota_is_read_from_every_answer() {
        let h = headers(&[
            ("x-ratelimit-remaining", "3"),
            ("x-ratelimit-reset", "2026-11-23T10:00:02Z"),
        ]);
        let (_, q) = classify(
            201,
            &h,
            br#"{"invoice_id":"i","new_credit_balance":1}"#,
            NOW,
        );
        assert_eq!(
            q,
            Some(Quota {
                remaining: 3,
                reset_after: Duration::from_secs(2)
            })
        );
    }
}
