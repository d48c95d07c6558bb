//! The in-process retries of one delivery, with `backon`.
//!
//! [`step`] is the retry decision as data: it maps each answer to "done with
//! this verdict" or "retry, for this reason". [`purchase_with_retry`] is the
//! loop that sleeps. Every attempt sends the same Idempotency-Key and body,
//! so a retry after a lost answer replays the first charge instead of making
//! a second one.
//!
//! Three bounds hold whatever Hyperline does:
//! - the delivery's deadline: no request starts that could end after it, and
//!   no wait at the gate outlasts it, so every delivery is settled well inside
//!   RabbitMQ's consumer timeout;
//! - the idempotency window: no request starts that could reach Hyperline
//!   after it has forgotten the key of the command's first request;
//! - shutdown: a cancelled delivery stops at once and reports what it did.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::credentials::Credentials;
use super::gate::Gate;
use super::{HyperlineClient, PurchaseAnswer, PurchaseResponse, Quota, Receipt, TransientCause};
use crate::clock::{millis, now_ms};
use crate::configuration::RetrySettings;
use crate::contract::Command;
use crate::operations::Metrics;
use crate::operations::metrics::ReasonLabel;
use crate::telemetry;

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

/// Maps an answer to a step: the status table of docs/contract.md section 4.
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
                (None, TransientCause::Network(text)) => text.clone(),
                (None, c) => c.label().replace('_', " "),
            },
            wait: None,
        }),
    }
}

/// Whether a request may have charged: anything but an answer given before
/// the purchase is processed (authentication, the rate limit) or a request
/// that never left (a connect failure). Such a request starts the command's
/// idempotency window.
fn may_have_charged(response: &PurchaseResponse) -> bool {
    !matches!(
        (response.status, &response.answer),
        (Some(401 | 403 | 429), _)
            | (
                None,
                PurchaseAnswer::Transient {
                    cause: TransientCause::Connect,
                    ..
                },
            )
    )
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
    /// The API.
    pub client: &'a HyperlineClient,
    /// The replica-wide pacing.
    pub gate: &'a Gate,
    /// The replica-wide credential state.
    pub credentials: &'a Credentials,
    /// The budget.
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

/// What the attempts learned, kept outside the retried future so that an
/// interrupted delivery still reports it.
#[derive(Default)]
struct Tally {
    requests: AtomicU32,
    first_sent_ms: Mutex<Option<u64>>,
    last: Mutex<(Option<u64>, Option<u16>)>,
    last_failure: Mutex<Option<(Option<u16>, String)>>,
    /// The latest answer was a 429.
    rate_limited: std::sync::atomic::AtomicBool,
}

impl Tally {
    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        // Plain values, each written whole: a poisoned lock is still usable.
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn first_sent(&self) -> Option<u64> {
        *Self::lock(&self.first_sent_ms)
    }

    /// The verdict of a delivery whose deadline came before its next
    /// request. Waiting on a 429 is not a failure: such a delivery waits in
    /// the broker without using a step.
    fn out_of_time(&self, gate: &Gate) -> Verdict {
        if self.rate_limited.load(Ordering::Relaxed) {
            return Verdict::Held {
                paused_for: gate.paused_for(),
            };
        }
        match Self::lock(&self.last_failure).clone() {
            Some((last_status, last_error)) => Verdict::Exhausted {
                last_status,
                last_error: format!("{last_error} (the delivery's deadline came)"),
            },
            None => Verdict::Held {
                paused_for: gate.paused_for(),
            },
        }
    }
}

/// The client span of one HTTP attempt (`attempt` is 1-based), disabled
/// unless spans are exported; the client records the URL on it.
fn client_span(attempt: u32) -> tracing::Span {
    tracing::info_span!(
        target: telemetry::SPANS,
        "POST",
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        http.request.method = "POST",
        http.request.resend_count = attempt.checked_sub(1).filter(|n| *n > 0),
        attempt,
        url.full = tracing::field::Empty,
        server.address = tracing::field::Empty,
        server.port = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
    )
}

/// The answer of an attempt, on its client span: the status, and what went
/// wrong (the status for a 4xx/5xx, the cause when no answer came).
fn record_answer(span: &tracing::Span, response: &PurchaseResponse) {
    if span.is_disabled() {
        return;
    }
    if let Some(status) = response.status {
        span.record("http.response.status_code", status);
    }
    let error = match response.status {
        Some(status @ 400..) => Some(status.to_string()),
        Some(_) => None,
        None => Some(response.status_class().to_owned()),
    };
    if let Some(error) = error {
        span.record("error.type", error);
        span.record("otel.status_code", "error");
    }
}

/// One line and one count per retry.
fn note_retry(ctx: &RetryContext<'_>, retry: &Retry) {
    tracing::info!(reason = retry.reason, detail = %retry.detail, "retrying the purchase");
    ctx.metrics
        .retries
        .get_or_create(&ReasonLabel {
            reason: retry.reason,
        })
        .inc();
}

/// Attempts the purchase up to `retry.attempts` times, within `bounds`;
/// 429s are waited on apart from those attempts, within the same bounds.
pub async fn purchase_with_retry(
    ctx: &RetryContext<'_>,
    command: &Command,
    traceparent: Option<&str>,
    bounds: Bounds,
) -> Attempted {
    let tally = Tally::default();
    let floor = Duration::from_millis(ctx.settings.initial_backoff_ms);
    let max_rate_wait = Duration::from_secs(ctx.settings.max_rate_limit_wait_secs);
    let conflict_delay = Duration::from_millis(ctx.settings.conflict_delay_ms);
    let latest_start = bounds
        .deadline
        .checked_sub(ctx.request_timeout)
        .unwrap_or(bounds.deadline);
    let backoff = ExponentialBuilder::default()
        .with_min_delay(floor)
        .with_max_delay(Duration::from_millis(ctx.settings.max_backoff_ms))
        .with_factor(2.0)
        .with_max_times(ctx.settings.attempts.saturating_sub(1) as usize);

    let attempt = || async {
        // A 429 goes round this loop, not backon's: waiting on the rate limit
        // is Hyperline asking to wait, not a failed attempt, so it never uses
        // one up (nor, past the deadline, a delay step: see `out_of_time`).
        loop {
            if ctx.credentials.is_faulted() {
                return Ok(Verdict::CredentialFault);
            }
            if let Some(first) = bounds.first_attempt_ms.or_else(|| tally.first_sent())
                && !window_open(first, now_ms(), bounds.window, ctx.request_timeout)
            {
                return Ok(Verdict::WindowClosed {
                    first_attempt_ms: first,
                });
            }
            if Instant::now() >= latest_start {
                return Ok(tally.out_of_time(ctx.gate));
            }
            // After a refused key came back, one request proves it first.
            let Ok(_trial) = tokio::time::timeout_at(latest_start, ctx.credentials.trial()).await
            else {
                return Ok(tally.out_of_time(ctx.gate));
            };
            let Ok(permit) = tokio::time::timeout_at(latest_start, ctx.gate.admit()).await else {
                return Ok(tally.out_of_time(ctx.gate));
            };
            if ctx.credentials.is_faulted() {
                return Ok(Verdict::CredentialFault);
            }
            // A gate open at once is admitted even past the instant: look again.
            if Instant::now() > latest_start {
                drop(permit);
                return Ok(tally.out_of_time(ctx.gate));
            }
            let attempt = tally.requests.fetch_add(1, Ordering::Relaxed) + 1;
            let sent_ms = now_ms();
            let sent = std::time::Instant::now();
            // Counted as the window's start before the request leaves: if the
            // replica stops while it is out, it may have charged.
            let opens_window = {
                let mut first = Tally::lock(&tally.first_sent_ms);
                let opens = first.is_none();
                if opens {
                    *first = Some(sent_ms);
                }
                opens
            };
            let span = client_span(attempt);
            let exported = telemetry::exported_traceparent(&span);
            let response = ctx
                .client
                .purchase(command, exported.as_deref().or(traceparent))
                .instrument(span.clone())
                .await;
            record_answer(&span, &response);
            let exemplar = exported.as_deref().and_then(telemetry::sampled_trace_id);
            ctx.metrics
                .hyperline_request(response.status_class(), sent.elapsed(), exemplar);
            *Tally::lock(&tally.last) = (Some(sent_ms), response.status);
            if opens_window && !may_have_charged(&response) {
                *Tally::lock(&tally.first_sent_ms) = None;
            }
            if let Some(status) = response.status {
                ctx.credentials.heard(status);
            }
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
                Step::Done(verdict) => return Ok(verdict),
                Step::Retry(retry) => {
                    let limited = retry.reason == "rate_limited";
                    tally.rate_limited.store(limited, Ordering::Relaxed);
                    if limited {
                        // The quota is the account's: every request of the
                        // replica holds back for as long as the answer asks.
                        let wait = retry.wait.unwrap_or(floor);
                        ctx.gate.pause_for(wait);
                        ctx.metrics.rate_limit_wait(wait);
                        if wait > max_rate_wait {
                            // Too long to hold the delivery: RabbitMQ's consumer
                            // timeout would close the channel. A delay queue waits.
                            return Ok(Verdict::RateLimited { wait });
                        }
                        // The gate holds the next request until the wait is over.
                        note_retry(ctx, &retry);
                        continue;
                    }
                    *Tally::lock(&tally.last_failure) = Some((retry.status, retry.detail.clone()));
                    return Err(retry);
                }
            }
        }
    };

    let retried = attempt
        .retry(backoff)
        .when(|_| true)
        .adjust(|retry: &Retry, next| {
            let left = bounds.deadline.saturating_duration_since(Instant::now());
            next.map(|ceiling| {
                let wait = match retry.reason {
                    "in_progress" => retry.wait.unwrap_or(ceiling),
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
    let (last_sent_ms, last_status) = *Tally::lock(&tally.last);
    Attempted {
        verdict,
        requests: tally.requests.load(Ordering::Relaxed),
        first_sent_ms: tally.first_sent(),
        last_sent_ms,
        last_status,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
