//! The in-process retries of one delivery, with `backon`.
//!
//! [`step`] is the retry decision as data: it maps each answer to "done with
//! this verdict" or "retry, for this reason". [`purchase_with_retry`] is the
//! loop that sleeps, around one attempt at a time (`attempt.rs`: admit,
//! send, take in the quota). Every attempt sends the same Idempotency-Key
//! and body, so a retry after a lost answer replays the first charge
//! instead of making a second one.
//!
//! Three bounds hold whatever Hyperline does:
//! - the delivery's deadline: no request starts that could end after it, and
//!   no wait at the gate outlasts it, so every delivery is settled well inside
//!   RabbitMQ's consumer timeout;
//! - the idempotency window: no request starts that could reach Hyperline
//!   after it has forgotten the key of the command's first request;
//! - shutdown: a cancelled delivery stops at once and reports what it did.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::attempt::{Attempt, note_retry};
use super::credentials::Credentials;
use super::gate::Gate;
use super::{FinalAnswer, HyperlineClient, PurchaseAnswer, TransientCause};
use crate::clock::millis;
use crate::configuration::RetrySettings;
use crate::contract::Command;
use crate::operations::Metrics;

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

/// What [`purchase_with_retry`] reports: the verdict and what was learned.
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

/// Shared by the retry loop of every command of a replica.
pub struct RetryContext<'a> {
    pub client: &'a HyperlineClient,
    /// The replica-wide pacing.
    pub gate: &'a Gate,
    /// The replica-wide credential state.
    pub credentials: &'a Credentials,
    pub settings: &'a RetrySettings,
    /// The total deadline of one request.
    pub request_timeout: Duration,
    /// Requests, retries and rate-limit waits are counted here.
    pub metrics: &'a Metrics,
    /// Cancelled when the replica stops.
    pub cancel: &'a CancellationToken,
}

/// Full jitter: a uniform delay between the configured floor and the
/// exponential ceiling, so replicas that failed together do not retry together.
fn full_jitter(floor: Duration, ceiling: Duration) -> Duration {
    if ceiling <= floor {
        return floor;
    }
    let ms = rand::rng().random_range(floor.as_millis()..=ceiling.as_millis());
    Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX))
}

/// Whether a request sent at `at_ms`, lasting at most `request_timeout`,
/// would still be inside the window opened at `first_ms`. A margin of 1/96
/// of the window (15 minutes of 24 hours) covers clocks that disagree
/// between replicas.
pub fn window_open(first_ms: u64, at_ms: u64, window: Duration, request_timeout: Duration) -> bool {
    let ends = first_ms.saturating_add(millis(window));
    at_ms.saturating_add(millis(request_timeout + window / 96)) < ends
}

/// Attempts the purchase up to `retry.attempts` times, within `bounds`;
/// 429s are waited on apart from those attempts, within the same bounds.
pub async fn purchase_with_retry(
    ctx: &RetryContext<'_>,
    command: &Command,
    traceparent: Option<&str>,
    bounds: Bounds,
) -> Attempted {
    let attempt = Attempt::new(ctx, command, traceparent, bounds);
    let floor = attempt.floor();
    let backoff = ExponentialBuilder::default()
        .with_min_delay(floor)
        .with_max_delay(ctx.settings.max_backoff())
        .with_factor(2.0)
        .with_max_times(ctx.settings.attempts.saturating_sub(1) as usize);
    let retried = (|| attempt.run())
        .retry(backoff)
        .when(|_| true)
        .adjust(|retry: &Retry, next| {
            let left = bounds.deadline.saturating_duration_since(Instant::now());
            next.map(|ceiling| {
                let wait = match retry.reason {
                    RetryReason::InProgress => retry.wait.unwrap_or(ceiling),
                    _ => full_jitter(floor, ceiling),
                };
                wait.min(left)
            })
        })
        .notify(|retry: &Retry, _| note_retry(ctx, retry));
    let verdict = tokio::select! {
        result = retried => result.unwrap_or_else(|last| Verdict::Exhausted {
            last_status: last.status,
            last_error: last.detail,
        }),
        () = ctx.cancel.cancelled() => Verdict::Interrupted,
    };
    attempt.finish(verdict)
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

    #[test]
    fn full_jitter_stays_between_floor_and_ceiling() {
        let (floor, ceiling) = (Duration::from_millis(200), Duration::from_millis(800));
        let draws: Vec<_> = (0..500).map(|_| full_jitter(floor, ceiling)).collect();
        assert!(draws.iter().all(|d| *d >= floor && *d <= ceiling));
        assert!(
            draws.iter().any(|d| *d < Duration::from_millis(400)),
            "spread low"
        );
        assert!(
            draws.iter().any(|d| *d > Duration::from_millis(600)),
            "spread high"
        );
        assert_eq!(full_jitter(ceiling, floor), ceiling);
    }
}
