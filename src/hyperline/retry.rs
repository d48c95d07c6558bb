//! The in-process retries of one delivery, with `backon`.
//!
//! [`step`](super::verdict::step) is the retry decision as data: it maps
//! each answer to "done with this verdict" or "retry, for this reason"
//! (`verdict.rs`). [`purchase_with_retry`] is the
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

use super::attempt::{Attempt, RetryContext, note_retry};
use super::verdict::{Attempted, Bounds, Retry, RetryReason, Verdict};
use crate::contract::Command;

/// Full jitter: a uniform delay between the configured floor and the
/// exponential ceiling, so replicas that failed together do not retry together.
fn full_jitter(floor: Duration, ceiling: Duration) -> Duration {
    if ceiling <= floor {
        return floor;
    }
    let ms = rand::rng().random_range(floor.as_millis()..=ceiling.as_millis());
    Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX))
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
