//! What the attempts of one delivery are bounded by and end with, as data:
//! the [`Verdict`], the [`Step`] one answer leads to ([`step`], the status
//! table of docs/contract.md section 4), what was learned ([`Attempted`]),
//! and the [`Bounds`] they keep ([`window_open`]).
//!
//! Apart from the loop (`retry.rs`) and the attempt (`attempt.rs`) that both
//! speak these types, so that neither has to import the other's.

use std::time::Duration;

use tokio::time::Instant;

use super::{FinalAnswer, PurchaseAnswer, TransientCause};
use crate::clock::millis;

/// How the in-process attempts of a delivery ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Hyperline's final answer about the command: bought, refused, a
    /// reused key or an undocumented answer.
    Answered(FinalAnswer),
    /// 401/403, or the replica already knows its key is refused.
    CredentialFault,
    /// Transient failures outlasted this delivery's attempts or deadline.
    Exhausted {
        /// The status of the last answer, if one arrived.
        last_status: Option<u16>,
        /// What the last failure was.
        last_error: String,
    },
    /// A 429 asked for a wait longer than a delivery may be held: the whole
    /// replica pauses that long, and the command waits in the broker.
    RateLimited {
        /// What the answer asked for.
        wait: Duration,
    },
    /// The replica's gate would not let a request go before the deadline
    /// (a long pause, a slow probe): the command waits in the broker.
    Held {
        /// How much of the replica's pause is left.
        paused_for: Duration,
    },
    /// Another request could reach Hyperline after it forgot the key of
    /// the command's first request, and charge a second time.
    WindowClosed {
        /// Unix milliseconds of that first request.
        first_attempt_ms: u64,
    },
    /// The replica is shutting down.
    Interrupted,
}

/// Why an attempt is retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryReason {
    /// A 5xx or 408.
    ServerError,
    /// No answer within the request's deadline.
    Timeout,
    /// The request never left.
    Connect,
    /// The connection broke mid-way.
    Network,
    /// A 409: the first request with this key is still running.
    InProgress,
    /// A 429: waited on without using an attempt.
    RateLimited,
}

impl RetryReason {
    /// The metrics label and the log's `reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::ServerError => "server_error",
            RetryReason::Timeout => "timeout",
            RetryReason::Connect => "connect",
            RetryReason::Network => "network",
            RetryReason::InProgress => "in_progress",
            RetryReason::RateLimited => "rate_limited",
        }
    }
}

impl From<&TransientCause> for RetryReason {
    fn from(cause: &TransientCause) -> Self {
        match cause {
            TransientCause::ServerError => RetryReason::ServerError,
            TransientCause::Timeout => RetryReason::Timeout,
            TransientCause::Connect => RetryReason::Connect,
            TransientCause::Network(_) => RetryReason::Network,
        }
    }
}

/// Why an attempt is retried, and what the retry needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retry {
    /// The metrics label.
    pub reason: RetryReason,
    /// The status, if an answer arrived.
    pub status: Option<u16>,
    /// For the log and the `retries_exhausted` event.
    pub detail: String,
    /// A wait the answer imposes instead of the backoff.
    pub wait: Option<Duration>,
}

/// The decision for one answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// No more attempts for this delivery.
    Done(Verdict),
    /// Try again.
    Retry(Retry),
}

/// Maps an answer to a step: the status table of docs/contract.md section 4.
pub fn step(answer: PurchaseAnswer, conflict_delay: Duration) -> Step {
    match answer {
        PurchaseAnswer::Final(answer) => Step::Done(Verdict::Answered(answer)),
        PurchaseAnswer::CredentialFault { .. } => Step::Done(Verdict::CredentialFault),
        PurchaseAnswer::InProgress => Step::Retry(Retry {
            reason: RetryReason::InProgress,
            status: Some(409),
            detail: "409: the first request with this key is still running".into(),
            wait: Some(conflict_delay),
        }),
        PurchaseAnswer::RateLimited { wait } => Step::Retry(Retry {
            reason: RetryReason::RateLimited,
            status: Some(429),
            detail: "429: rate limited".into(),
            wait,
        }),
        PurchaseAnswer::Transient { status, cause } => Step::Retry(Retry {
            reason: RetryReason::from(&cause),
            status,
            detail: match (&status, &cause) {
                (Some(s), _) => format!("HTTP {s}"),
                (None, TransientCause::Network(text)) => text.clone(),
                (None, c) => c.label().replace('_', " "),
            },
            wait: None,
        }),
    }
}

/// What the attempts of one delivery report
/// ([`purchase_with_retry`](super::retry::purchase_with_retry)): the
/// verdict and what was learned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempted {
    /// How it ended.
    pub verdict: Verdict,
    /// HTTP requests made during this delivery.
    pub requests: u32,
    /// Unix ms of this delivery's first request that may have charged.
    pub first_sent_ms: Option<u64>,
    /// Unix ms of this delivery's last request.
    pub last_sent_ms: Option<u64>,
    /// The status of this delivery's last answer.
    pub last_status: Option<u16>,
}

/// The bounds of one delivery's attempts.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// No request may end after this.
    pub deadline: Instant,
    /// Unix ms of the command's first request that may have charged, from
    /// an earlier delivery.
    pub first_attempt_ms: Option<u64>,
    /// Hyperline's idempotency window.
    pub window: Duration,
}

/// Whether a request sent at `at_ms`, lasting at most `request_timeout`,
/// would still be inside the window opened at `first_ms`. A margin of 1/96
/// of the window (15 minutes of 24 hours) covers clocks that disagree
/// between replicas.
pub fn window_open(first_ms: u64, at_ms: u64, window: Duration, request_timeout: Duration) -> bool {
    let ends = first_ms.saturating_add(millis(window));
    at_ms.saturating_add(millis(request_timeout + window / 96)) < ends
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hyperline::Receipt;

    const DELAY: Duration = Duration::from_millis(500);

    #[test]
    fn final_answers_end_the_attempts() {
        let receipt = Receipt {
            invoice_id: "inv".into(),
            new_credit_balance: 1,
        };
        for answer in [
            FinalAnswer::Succeeded(receipt),
            FinalAnswer::Rejected {
                status: 404,
                message: "m".into(),
            },
            FinalAnswer::IdempotencyConflict {
                message: "m".into(),
            },
            FinalAnswer::UnexpectedResponse {
                status: 201,
                detail: "d".into(),
            },
        ] {
            assert_eq!(
                step(PurchaseAnswer::Final(answer.clone()), DELAY),
                Step::Done(Verdict::Answered(answer))
            );
        }
        assert_eq!(
            step(PurchaseAnswer::CredentialFault { status: 401 }, DELAY),
            Step::Done(Verdict::CredentialFault)
        );
    }

    #[test]
    fn in_progress_waits_the_conflict_delay() {
        let Step::Retry(r) = step(PurchaseAnswer::InProgress, DELAY) else {
            panic!("not retried")
        };
        assert_eq!(
            (r.reason, r.wait, r.status),
            (RetryReason::InProgress, Some(DELAY), Some(409))
        );
    }

    #[test]
    fn rate_limits_carry_their_wait() {
        let Step::Retry(r) = step(
            PurchaseAnswer::RateLimited {
                wait: Some(Duration::from_secs(3)),
            },
            DELAY,
        ) else {
            panic!("not retried")
        };
        assert_eq!(
            (r.reason, r.wait),
            (RetryReason::RateLimited, Some(Duration::from_secs(3)))
        );
    }

    #[test]
    fn transient_failures_are_retried_with_backoff() {
        for (cause, label) in [
            (TransientCause::Timeout, RetryReason::Timeout),
            (TransientCause::Connect, RetryReason::Connect),
            (TransientCause::ServerError, RetryReason::ServerError),
        ] {
            let Step::Retry(r) = step(
                PurchaseAnswer::Transient {
                    status: None,
                    cause,
                },
                DELAY,
            ) else {
                panic!("not retried")
            };
            assert_eq!((r.reason, r.wait), (label, None));
        }
    }
}
