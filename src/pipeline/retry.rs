//! The in-process retries of one delivery, with `backon`.
//!
//! [`step`] is the retry decision as data: it maps each answer to "done with
//! this verdict" or "retry, for this reason". [`purchase_with_retry`] is the
//! loop that sleeps. Every attempt sends the same Idempotency-Key and body,
//! so a retry after a lost answer replays the first charge instead of making
//! a second one.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use rand::Rng;

use super::credentials::Credentials;
use super::gate::Gate;
use crate::configuration::RetrySettings;
use crate::contract::Command;
use crate::hyperline::{HyperlineClient, PurchaseAnswer, Quota, Receipt};
use crate::operations::Metrics;
use crate::operations::metrics::ReasonLabel;

/// How the in-process attempts of a delivery ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Bought (or replayed).
    Succeeded(Receipt),
    /// 400/404/422.
    Rejected {
        /// The status.
        status: u16,
        /// Hyperline's message.
        message: String,
    },
    /// 417.
    IdempotencyConflict {
        /// Hyperline's message.
        message: String,
    },
    /// An undocumented answer.
    Unexpected {
        /// The status.
        status: u16,
        /// What was unexpected.
        detail: String,
    },
    /// 401/403, or the replica already knows its key is refused.
    CredentialFault,
    /// Transient failures outlasted this delivery's budget.
    Exhausted {
        /// The status of the last answer, if one arrived.
        last_status: Option<u16>,
        /// What the last failure was.
        last_error: String,
    },
}

/// Why an attempt is retried; the metrics label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retry {
    /// `server_error`, `timeout`, `connect`, `network`, `in_progress`, `rate_limited`.
    pub reason: &'static str,
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

/// Maps an answer to a step: the status table of CONTRACT section 4.
pub fn step(answer: PurchaseAnswer, conflict_delay: Duration) -> Step {
    match answer {
        PurchaseAnswer::Succeeded(r) => Step::Done(Verdict::Succeeded(r)),
        PurchaseAnswer::Rejected { status, message } => {
            Step::Done(Verdict::Rejected { status, message })
        }
        PurchaseAnswer::IdempotencyConflict { message } => {
            Step::Done(Verdict::IdempotencyConflict { message })
        }
        PurchaseAnswer::UnexpectedResponse { status, detail } => {
            Step::Done(Verdict::Unexpected { status, detail })
        }
        PurchaseAnswer::CredentialFault { .. } => Step::Done(Verdict::CredentialFault),
        PurchaseAnswer::InProgress => Step::Retry(Retry {
            reason: "in_progress",
            status: Some(409),
            detail: "409: the first request with this key is still running".into(),
            wait: Some(conflict_delay),
        }),
        PurchaseAnswer::RateLimited { wait } => Step::Retry(Retry {
            reason: "rate_limited",
            status: Some(429),
            detail: "429: rate limited".into(),
            wait,
        }),
        PurchaseAnswer::Transient { status, cause } => Step::Retry(Retry {
            reason: cause.label(),
            status,
            detail: match (&status, &cause) {
                (Some(s), _) => format!("HTTP {s}"),
                (None, crate::hyperline::TransientCause::Network(text)) => text.clone(),
                (None, c) => c.label().replace('_', " "),
            },
            wait: None,
        }),
    }
}

/// What [`purchase_with_retry`] reports: the verdict and the requests made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempted {
    /// How it ended.
    pub verdict: Verdict,
    /// HTTP requests made during this delivery.
    pub requests: u32,
}

/// Shared by the retry loop of every command of a replica.
pub struct RetryContext<'a> {
    /// The API.
    pub client: &'a HyperlineClient,
    /// The replica-wide pacing.
    pub gate: &'a Gate,
    /// The replica-wide credential state.
    pub credentials: &'a Credentials,
    /// The budget.
    pub settings: &'a RetrySettings,
    /// Requests, retries and rate-limit waits are counted here.
    pub metrics: &'a Metrics,
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

/// Attempts the purchase up to `retry.attempts` times.
pub async fn purchase_with_retry(
    ctx: &RetryContext<'_>,
    command: &Command,
    traceparent: Option<&str>,
) -> Attempted {
    let requests = AtomicU32::new(0);
    let floor = Duration::from_millis(ctx.settings.initial_backoff_ms);
    let max_rate_wait = Duration::from_secs(ctx.settings.max_rate_limit_wait_secs);
    let conflict_delay = Duration::from_millis(ctx.settings.conflict_delay_ms);
    let backoff = ExponentialBuilder::default()
        .with_min_delay(floor)
        .with_max_delay(Duration::from_millis(ctx.settings.max_backoff_ms))
        .with_factor(2.0)
        .with_max_times(ctx.settings.attempts.saturating_sub(1) as usize);

    let attempt = || async {
        if ctx.credentials.is_faulted() {
            return Ok(Verdict::CredentialFault);
        }
        let permit = ctx.gate.admit().await;
        if ctx.credentials.is_faulted() {
            return Ok(Verdict::CredentialFault);
        }
        requests.fetch_add(1, Ordering::Relaxed);
        let sent = std::time::Instant::now();
        let response = ctx.client.purchase(command, traceparent).await;
        ctx.metrics
            .hyperline_request(response.status_class(), sent.elapsed());
        // What the answer announced paces the replica's next requests (never
        // for longer than a rate-limit wait may last in process). An answer
        // without rate-limit headers says the API announces none, unless it
        // may not come from the API itself (a gateway's 5xx, an auth failure).
        match (response.status, response.quota) {
            (Some(_), Some(quota)) => permit.answered(Some(Quota {
                reset_after: quota.reset_after.min(max_rate_wait),
                ..quota
            })),
            (Some(status @ 200..=499), None) if !matches!(status, 401 | 403 | 429) => {
                permit.answered(None);
            }
            _ => drop(permit),
        }
        if let Some(quota) = response.quota.filter(|q| q.remaining == 0) {
            // The window is spent: wait for its reset instead of collecting 429s.
            let wait = quota.reset_after.min(max_rate_wait);
            ctx.gate.pause_for(wait);
            ctx.metrics.rate_limit_wait(wait);
        }
        match step(response.answer, conflict_delay) {
            Step::Done(verdict) => Ok(verdict),
            Step::Retry(retry) => {
                if retry.reason == "rate_limited" {
                    let wait = retry.wait.unwrap_or(floor);
                    if wait > max_rate_wait {
                        // Too long to hold the delivery: RabbitMQ's consumer
                        // timeout would close the channel. Let a delay queue wait.
                        return Ok(Verdict::Exhausted {
                            last_status: Some(429),
                            last_error: retry.detail,
                        });
                    }
                    ctx.gate.pause_for(wait);
                    ctx.metrics.rate_limit_wait(wait);
                }
                Err(retry)
            }
        }
    };

    let result = attempt
        .retry(backoff)
        .when(|_| true)
        .adjust(|retry: &Retry, next| {
            next.map(|ceiling| match retry.reason {
                // The gate already holds every request until the window
                // resets; the command only needs to queue behind it.
                "rate_limited" => Duration::ZERO,
                "in_progress" => retry.wait.unwrap_or(ceiling),
                _ => full_jitter(floor, ceiling),
            })
        })
        .notify(|retry: &Retry, _| {
            tracing::info!(reason = retry.reason, detail = %retry.detail, "retrying the purchase");
            ctx.metrics
                .retries
                .get_or_create(&ReasonLabel {
                    reason: retry.reason,
                })
                .inc();
        })
        .await;
    let verdict = result.unwrap_or_else(|last| Verdict::Exhausted {
        last_status: last.status,
        last_error: last.detail,
    });
    Attempted {
        verdict,
        requests: requests.into_inner(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hyperline::TransientCause;

    const DELAY: Duration = Duration::from_millis(500);

    #[test]
    fn final_answers_end_the_attempts() {
        let receipt = Receipt {
            invoice_id: "inv".into(),
            new_credit_balance: 1,
        };
        assert_eq!(
            step(PurchaseAnswer::Succeeded(receipt.clone()), DELAY),
            Step::Done(Verdict::Succeeded(receipt))
        );
        assert!(matches!(
            step(
                PurchaseAnswer::Rejected {
                    status: 404,
                    message: "m".into()
                },
                DELAY
            ),
            Step::Done(Verdict::Rejected { status: 404, .. })
        ));
        assert!(matches!(
            step(
                PurchaseAnswer::IdempotencyConflict {
                    message: "m".into()
                },
                DELAY
            ),
            Step::Done(Verdict::IdempotencyConflict { .. })
        ));
        assert!(matches!(
            step(
                PurchaseAnswer::UnexpectedResponse {
                    status: 201,
                    detail: "d".into()
                },
                DELAY
            ),
            Step::Done(Verdict::Unexpected { .. })
        ));
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
            ("in_progress", Some(DELAY), Some(409))
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
            ("rate_limited", Some(Duration::from_secs(3)))
        );
    }

    #[test]
    fn transient_failures_are_retried_with_backoff() {
        for (cause, label) in [
            (TransientCause::Timeout, "timeout"),
            (TransientCause::Connect, "connect"),
            (TransientCause::ServerError, "server_error"),
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
