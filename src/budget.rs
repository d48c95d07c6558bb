//! The time budget of one delivery, in one place: RabbitMQ's consumer
//! timeout, what a delivery may still wait for once its deadline has come,
//! and the waits that count toward it (the confirms, the in-process hold)
//! or stay out of it (the `reply_to` copy, sent after the command is
//! settled).
//!
//! RabbitMQ closes the channel of a delivery left unacked for its
//! `consumer_timeout`, with every delivery on it, so the start-up check
//! adds these waits up before the worker consumes anything. Plain numbers
//! that import nothing of the crate: the configuration checks the settings
//! against them, the pipeline and the publisher wait by them, and none of
//! the three reaches into another for a constant.

use std::time::Duration;

/// RabbitMQ closes the channel of a delivery left unacked this long (its
/// default `consumer_timeout`); every delivery must be settled well before.
pub const CONSUMER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The refusal threshold of the start-up check: 5/6 of RabbitMQ's default
/// `consumer_timeout`, so a delivery is settled with minutes to spare.
pub const BUDGET_LIMIT_SECS: u64 = CONSUMER_TIMEOUT.as_secs() * 5 / 6;

/// The longest wait in process before a command refused by the broker is
/// put back (the wait doubles with each setback). The start-up check of the
/// consumer-timeout budget counts it.
pub const MAX_HOLD: Duration = Duration::from_secs(30);

/// The waits of `amqp.confirm_timeout_secs` a delivery may still make once
/// its deadline has come, in `pipeline/executor.rs`, each bounded by the
/// confirm timeout: the event, written then confirmed (2 waits); then the
/// command's copy (to a delay queue or the dead-letter exchange) and, when
/// that is refused, its copy back to the commands queue, each waiting its
/// turn on the copies channel, opening it again after a refusal, written,
/// confirmed (2 × 4 waits). The event's `reply_to` copy is tried after the
/// command is settled and counts for nothing. docs/blocked-and-bounds.md
/// and docs/configuration.md state this number; tests/docs.rs holds them to it.
pub const CONFIRM_WAITS_AFTER_DEADLINE: u64 = 2 + 2 * 4;

/// Tries of a `reply_to` copy before it is dropped.
pub const REPLY_TRIES: u32 = 3;

/// The pause before the next try of a `reply_to` copy, times the tries so far.
pub const REPLY_PAUSE: Duration = Duration::from_millis(200);

/// The settings the consumer-timeout budget counts, as numbers.
#[derive(Clone, Copy, Debug)]
pub struct TimeBudget {
    /// `worker.delivery_deadline_secs`.
    pub deadline_secs: u64,
    /// `amqp.confirm_timeout_secs`.
    pub confirm_timeout_secs: u64,
    /// The credit-transaction lookup at the closed window, up to one
    /// request's deadline (`hyperline.timeout_secs`), when
    /// `hyperline.reconcile_at_window` is on.
    pub lookup_secs: Option<u64>,
}

impl TimeBudget {
    /// Everything a delivery may still wait for once its deadline has come,
    /// in seconds, in the worst case (RabbitMQ closes the channel, with every
    /// delivery on it, when one outlasts the consumer timeout): the
    /// credit-transaction lookup at the closed window
    /// (`hyperline.reconcile_at_window`), up to one request's deadline; the
    /// [`CONFIRM_WAITS_AFTER_DEADLINE`];
    /// one in-process hold before the copy back, at most [`MAX_HOLD`].
    pub fn after_deadline_secs(&self) -> u64 {
        self.lookup_secs
            .unwrap_or(0)
            .saturating_add(
                self.confirm_timeout_secs
                    .saturating_mul(CONFIRM_WAITS_AFTER_DEADLINE),
            )
            .saturating_add(MAX_HOLD.as_secs())
    }

    /// The consumer-timeout budget as the start-up check counts it, in words,
    /// for `check`: the pages quote the command instead of copying numbers that
    /// drift from the code (they once said 10 waits while the code counted 16).
    pub fn line(&self) -> String {
        let deadline = self.deadline_secs;
        let after = self.after_deadline_secs();
        let lookup = match self.lookup_secs {
            Some(secs) => format!(", the lookup at the window {secs} s"),
            None => String::new(),
        };
        format!(
            "consumer-timeout budget: a delivery is settled within {} s (worker.delivery_deadline_secs \
             {deadline} s + {after} s after it: {CONFIRM_WAITS_AFTER_DEADLINE} waits of \
             amqp.confirm_timeout_secs {} s, an in-process hold of {} s{lookup}), under the {} s limit \
             (5/6 of RabbitMQ's 30 min consumer_timeout)",
            deadline.saturating_add(after),
            self.confirm_timeout_secs,
            MAX_HOLD.as_secs(),
            BUDGET_LIMIT_SECS,
        )
    }
}
