//! What becomes of a delivery: one pure function from what the worker
//! learned to a plan, read as the table of docs/contract.md section 4.
//!
//! Every way a command leaves the worker is decided here and nowhere else:
//! which event is published, where the command goes (acked, copied to a delay
//! queue, copied back to the commands queue, copied to the dead-letter
//! exchange), what its copy remembers, and whether the replica stops for
//! its refused key. (A 429's pause of the replica's requests is the
//! attempt's: [`hyperline::retry`](crate::hyperline::retry) pauses the gate
//! as the answer arrives, for the long waits that end here too.)
//! The executor only carries a plan out; when the broker refuses part of it
//! (the event, a copy), the refusal comes back here as an input, so that a
//! path that returns a command to the broker can never forget its history nor
//! come back at once.

use std::time::Duration;

use crate::broker::DeliveryHistory;
use crate::budget::MAX_HOLD;
use crate::clock::{millis, rfc3339_ms};
use crate::contract::{ErrorCode, OutcomeFacts, ResultEvent};
use crate::hyperline::FinalAnswer;
use crate::hyperline::matching::ChargeLookup;
use crate::hyperline::verdict::{Attempted, Verdict, window_open};

/// Copies made near the broker's delivery limit before a command is
/// declared a poison message (workers crash or lose their connection every
/// time they hold it).
pub const MAX_REFRESHES: u32 = 3;

/// What the worker learned about a delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// The body is not a valid command.
    Invalid,
    /// An outcome decided on an earlier delivery whose event the broker did
    /// not confirm then.
    Stored(OutcomeFacts),
    /// The delivery used half the broker's delivery limit.
    Worn,
    /// A request may have been made before this moment (Unix ms) that no
    /// history records, and nothing bounds how much earlier the first one
    /// was ([`WindowStart::Unknown`]): no request may be sent.
    StartUnknown { before_ms: u64 },
    /// The purchase attempts of this delivery.
    Attempted(Attempted),
    /// The purchase attempts of this delivery, which would have failed the
    /// command for its closed window, and what Hyperline's credit
    /// transactions say about its charge (`hyperline.reconcile_at_window`).
    Looked {
        attempted: Attempted,
        /// The transactions' verdict.
        lookup: ChargeLookup,
    },
    /// The broker did not confirm the plan's event.
    EventRefused(ResultEvent),
    /// The broker did not confirm the plan's copy.
    CopyRefused {
        /// The event it already confirmed for this delivery, if any.
        published: Option<ResultEvent>,
        /// What the refused plan would have made of the delivery.
        refused: Outcome,
    },
}

/// The event a plan publishes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventPlan {
    /// `failed` / `invalid_command`, from what could be read of the body.
    Invalid,
    /// `succeeded`.
    Succeeded {
        invoice_id: String,
        /// The balance after the purchase.
        new_credit_balance: u64,
    },
    /// `failed` with this error.
    Failed {
        code: ErrorCode,
        /// Human readable.
        message: String,
        /// The deciding HTTP status.
        http_status: Option<u16>,
    },
    /// The outcome decided earlier: the same event id and facts, on the
    /// command's own fields.
    Stored(OutcomeFacts),
    /// `succeeded` with `"reconciled": true`: the charge found among the
    /// credit transactions.
    Reconciled {
        /// The transaction's invoice.
        invoice_id: String,
        /// Its `balance_after`.
        new_credit_balance: u64,
        /// The transaction, for the log.
        transaction_id: String,
    },
}

/// Where the command goes once the event (if any) is confirmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Done with.
    Ack,
    /// The original, unchanged, to the dead-letter queue (`basic.reject`):
    /// a message that is not a command has no history to keep, and a reject
    /// dead-letters it exactly once, even if the replica dies right after.
    RejectToDlx,
    /// A copy to the dead-letter exchange stamped with the history and why
    /// it died, then ack: an operator must look. (A crash between the two
    /// leaves a second dead letter of the command, never none.)
    CopyToDlx(ErrorCode),
    /// A copy to the delay queue of this step index, then ack.
    Delay(usize),
    /// A copy back to the commands queue, then ack.
    Return,
}

/// What became of a delivery: the label of metrics and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `succeeded` event published, command acked.
    Succeeded,
    /// `failed` event published, command acked or dead-lettered.
    Failed(ErrorCode),
    /// Copied to the delay queue of this step (1-based), a step used.
    Deferred(u32),
    /// Put back through the broker without using a step, for this reason.
    Returned(&'static str),
}

impl Outcome {
    /// A label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed(code) => code.as_str(),
            Outcome::Deferred(_) => "deferred",
            Outcome::Returned(reason) => reason,
        }
    }
}

/// What to do with a delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Published and confirmed first.
    pub event: Option<EventPlan>,
    /// Then the command goes here.
    pub route: Route,
    /// What the command's copy carries (and the event's `attempts`).
    pub history: DeliveryHistory,
    /// A wait in process before any of it: the broker refused something,
    /// and coming back at once would spin.
    pub hold: Duration,
    /// The key is refused: the replica stops consuming until it is accepted.
    pub credential_fault: bool,
    pub outcome: Outcome,
    /// Set when the plan fails the command for its closed idempotency window
    /// (the start of that window, Unix ms): Hyperline's credit transactions
    /// may then tell whether it was charged after all (see [`Input::Looked`]).
    pub closed_window: Option<u64>,
}

impl Plan {
    fn new(event: Option<EventPlan>, route: Route, history: DeliveryHistory) -> Plan {
        let outcome = match (&event, route) {
            (Some(EventPlan::Succeeded { .. } | EventPlan::Reconciled { .. }), _) => {
                Outcome::Succeeded
            }
            (Some(EventPlan::Invalid), _) => Outcome::Failed(ErrorCode::InvalidCommand),
            (Some(EventPlan::Failed { code, .. }), _) => Outcome::Failed(*code),
            (Some(EventPlan::Stored(facts)), _) => match &facts.error {
                Some(error) => Outcome::Failed(error.code),
                None => Outcome::Succeeded,
            },
            (None, Route::Delay(_)) => Outcome::Deferred(history.step),
            (None, _) => Outcome::Returned("returned"),
        };
        Plan {
            event,
            route,
            history,
            hold: Duration::ZERO,
            credential_fault: false,
            outcome,
            closed_window: None,
        }
    }

    fn returned(mut self, reason: &'static str) -> Plan {
        self.outcome = Outcome::Returned(reason);
        self
    }

    fn failed(
        code: ErrorCode,
        message: String,
        http_status: Option<u16>,
        h: DeliveryHistory,
    ) -> Plan {
        let route = match code.dead_letters() {
            true => Route::CopyToDlx(code),
            false => Route::Ack,
        };
        let event = EventPlan::Failed {
            code,
            message,
            http_status,
        };
        Plan::new(Some(event), route, h)
    }
}

/// The settings and the moment a plan is made for.
#[derive(Clone, Copy, Debug)]
pub struct Policy<'a> {
    /// `retry.redelivery_delays_secs`, one per step (a delay may repeat).
    pub delays: &'a [u64],
    /// Hyperline's idempotency window.
    pub window: Duration,
    /// The total deadline of one request.
    pub request_timeout: Duration,
    /// Now, in Unix milliseconds.
    pub now_ms: u64,
}

impl Policy<'_> {
    /// Whether a command with this history, coming back after `delay` for
    /// another purchase, could still send one inside its window.
    fn window_open_after(&self, h: &DeliveryHistory, delay: Duration) -> bool {
        let at = self.now_ms.saturating_add(millis(delay));
        match window_start(h) {
            WindowStart::NotYet => true,
            WindowStart::From(first) => window_open(first, at, self.window, self.request_timeout),
            WindowStart::Unknown { .. } => false,
        }
    }

    fn delay_of(&self, route: Route) -> Duration {
        match route {
            Route::Delay(step) => Duration::from_secs(self.delays.get(step).copied().unwrap_or(0)),
            _ => Duration::ZERO,
        }
    }

    /// The step whose queue waits at least `wait`, else the longest.
    fn park_for(&self, wait: Duration) -> Option<usize> {
        let fits = self
            .delays
            .iter()
            .enumerate()
            .filter(|(_, d)| Duration::from_secs(**d) >= wait)
            .min_by_key(|(_, d)| **d);
        let longest = self.delays.iter().enumerate().max_by_key(|(_, d)| **d);
        fits.or(longest).map(|(i, _)| i)
    }

    /// The queue a command waits in after its `setbacks`th setback: the
    /// steps' delays in turn, then the last one.
    fn after_setbacks(&self, setbacks: u32) -> Option<usize> {
        let last = self.delays.len().checked_sub(1)?;
        Some((setbacks as usize).min(last))
    }
}

/// Where the command's 24-hour idempotency window starts, for the guard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowStart {
    /// No request that may have charged was made: the next one opens it.
    NotYet,
    /// At this moment (Unix ms) or later: the guard counts from here.
    From(u64),
    /// A request may have been made before `before_ms` that no history
    /// records, and nothing bounds it from below: the window may have closed.
    Unknown { before_ms: u64 },
}

/// Where the window of a command with history `h` starts, as the guard must
/// count it: from the earliest moment its first request may have been made.
///
/// A refreshed delivery ([`DeliveryHistory::unrecorded_before_ms`]) may have
/// been preceded by requests that no history records (a worker killed
/// mid-request records nothing), so the recorded first request is not the
/// first. The only lower bound is the publisher's `timestamp` property
/// ([`DeliveryHistory::published_ms`]): no request precedes the command's publication. It is the
/// publisher's word, so it is used only to shorten the window (taken as its
/// start, the earliest possible), and one later than the unrecorded bound
/// (impossible) bounds nothing. A publisher who lies about it can only get
/// its own command refused sooner, or bought as if republished.
pub fn window_start(h: &DeliveryHistory) -> WindowStart {
    let Some(before_ms) = h.unrecorded_before_ms else {
        return h
            .first_attempt_ms
            .map_or(WindowStart::NotYet, WindowStart::From);
    };
    match h.published_ms.filter(|p| *p <= before_ms) {
        Some(published) => {
            WindowStart::From(h.first_attempt_ms.map_or(published, |f| f.min(published)))
        }
        None => WindowStart::Unknown { before_ms },
    }
}

/// The in-process wait after `setbacks` setbacks: 1 s doubling to 30 s.
fn hold_after(setbacks: u32) -> Duration {
    Duration::from_secs(1)
        .saturating_mul(1 << setbacks.min(5))
        .min(MAX_HOLD)
}

/// The history after a delivery's attempts.
fn learn(history: &DeliveryHistory, attempted: &Attempted) -> DeliveryHistory {
    DeliveryHistory {
        attempts: history.attempts.saturating_add(attempted.requests),
        first_attempt_ms: history.first_attempt_ms.or(attempted.first_sent_ms),
        last_attempt_ms: attempted.last_sent_ms.or(history.last_attempt_ms),
        last_status: attempted.last_status.or(history.last_status),
        ..history.clone()
    }
}

/// The plan for a delivery.
pub fn decide(input: Input, history: &DeliveryHistory, policy: Policy<'_>) -> Plan {
    match input {
        Input::Invalid => Plan::new(
            Some(EventPlan::Invalid),
            Route::RejectToDlx,
            history.clone(),
        ),
        Input::Stored(facts) => {
            let route = match facts.error.as_ref().map(|e| e.code) {
                Some(ErrorCode::InvalidCommand) => Route::RejectToDlx,
                Some(code) if code.dead_letters() => Route::CopyToDlx(code),
                _ => Route::Ack,
            };
            Plan::new(Some(EventPlan::Stored(facts)), route, history.clone())
        }
        Input::Worn if history.refreshes >= MAX_REFRESHES => {
            let deliveries = history
                .deliveries
                .saturating_mul(u64::from(history.refreshes) + 1);
            let h = worn(history, policy.now_ms);
            let message = format!(
                "delivered about {deliveries} times without an outcome (workers crashed or lost \
                 their connection while handling it): dead-lettered as a possible poison message; \
                 {}",
                unrecorded(&h)
            );
            Plan::failed(ErrorCode::RetriesExhausted, message, None, h)
        }
        Input::Worn => {
            let h = DeliveryHistory {
                refreshes: history.refreshes + 1,
                ..worn(history, policy.now_ms)
            };
            Plan::new(None, Route::Return, h).returned("refreshed")
        }
        Input::StartUnknown { before_ms } => {
            let h = DeliveryHistory {
                unrecorded_before_ms: Some(before_ms),
                ..history.clone()
            };
            let message = format!(
                "{}, and the command has no `timestamp` property to bound it: another request \
                 could reach Hyperline after it forgot the Idempotency-Key and charge twice; \
                 `dead-letters reconcile` looks it up in Hyperline's credit transactions",
                unrecorded(&h)
            );
            Plan::failed(ErrorCode::RetriesExhausted, message, h.last_status, h)
        }
        Input::Attempted(attempted) => {
            let h = learn(history, &attempted);
            let plan = after_attempts(&attempted, h.clone(), policy);
            // A command sent back for another purchase that could only
            // come back past its window is answered now instead.
            match (plan.event.is_none(), window_start(&h)) {
                (true, WindowStart::From(first))
                    if !policy.window_open_after(&h, policy.delay_of(plan.route)) =>
                {
                    window_closed(first, h)
                }
                _ => plan,
            }
        }
        Input::Looked { attempted, lookup } => looked(history, &attempted, lookup, policy),
        Input::EventRefused(event) => {
            let h = DeliveryHistory {
                setbacks: history.setbacks.saturating_add(1),
                outcome: Some(event.facts()),
                ..history.clone()
            };
            set_back(h, history.setbacks, policy).returned("event_refused")
        }
        Input::CopyRefused { published, refused } => {
            // A step the copy never reached is not used up.
            let step = match refused {
                Outcome::Deferred(_) => history.step.saturating_sub(1),
                _ => history.step,
            };
            let h = DeliveryHistory {
                step,
                setbacks: history.setbacks.saturating_add(1),
                outcome: published
                    .as_ref()
                    .map(ResultEvent::facts)
                    .or(history.outcome.clone()),
                ..history.clone()
            };
            let mut plan = Plan::new(None, Route::Return, h).returned("copy_refused");
            plan.hold = hold_after(history.setbacks);
            plan
        }
    }
}

/// Back through a delay queue, or, with none configured, back to the
/// commands queue after a wait in process; never a step, never dead-lettered.
fn set_back(h: DeliveryHistory, setbacks: u32, policy: Policy<'_>) -> Plan {
    match policy.after_setbacks(setbacks) {
        Some(queue) => Plan::new(None, Route::Delay(queue), h),
        None => {
            let mut plan = Plan::new(None, Route::Return, h);
            plan.hold = hold_after(setbacks);
            plan
        }
    }
}

fn after_attempts(attempted: &Attempted, h: DeliveryHistory, policy: Policy<'_>) -> Plan {
    match &attempted.verdict {
        Verdict::Answered(FinalAnswer::Succeeded(receipt)) => Plan::new(
            Some(EventPlan::Succeeded {
                invoice_id: receipt.invoice_id.clone(),
                new_credit_balance: receipt.new_credit_balance,
            }),
            Route::Ack,
            h,
        ),
        Verdict::Answered(FinalAnswer::Rejected { status, message }) => {
            Plan::failed(ErrorCode::Rejected, message.clone(), Some(*status), h)
        }
        Verdict::Answered(FinalAnswer::IdempotencyConflict { message }) => Plan::failed(
            ErrorCode::IdempotencyConflict,
            message.clone(),
            Some(417),
            h,
        ),
        Verdict::Answered(FinalAnswer::UnexpectedResponse { status, detail }) => Plan::failed(
            ErrorCode::UnexpectedResponse,
            detail.clone(),
            Some(*status),
            h,
        ),
        Verdict::CredentialFault => {
            let mut plan = Plan::new(None, Route::Return, h).returned("credential_fault");
            plan.credential_fault = true;
            plan
        }
        Verdict::Exhausted {
            last_status,
            last_error,
        } => match policy.delays.get(h.step as usize) {
            Some(_) => {
                let queue = h.step as usize;
                let h = DeliveryHistory {
                    step: h.step + 1,
                    ..h
                };
                Plan::new(None, Route::Delay(queue), h)
            }
            None => {
                let message = format!(
                    "gave up after {} attempts; last failure: {last_error}",
                    h.attempts
                );
                Plan::failed(ErrorCode::RetriesExhausted, message, *last_status, h)
            }
        },
        Verdict::RateLimited { wait } => park(h, *wait, policy).returned("rate_limited"),
        Verdict::Held { paused_for } => park(h, *paused_for, policy).returned("held"),
        Verdict::WindowClosed { first_attempt_ms } => window_closed(*first_attempt_ms, h),
        Verdict::Interrupted => Plan::new(None, Route::Return, h).returned("interrupted"),
    }
}

/// The history of a worn delivery: its deliveries ended without an outcome,
/// perhaps killed mid-request, and recorded nothing, so a request may have
/// been made before `now_ms` (the earliest such moment is kept).
fn worn(history: &DeliveryHistory, now_ms: u64) -> DeliveryHistory {
    DeliveryHistory {
        unrecorded_before_ms: history.unrecorded_before_ms.or(Some(now_ms)),
        ..history.clone()
    }
}

/// What a history with requests no history records says of them.
fn unrecorded(h: &DeliveryHistory) -> String {
    let before = h
        .unrecorded_before_ms
        .and_then(rfc3339_ms)
        .unwrap_or_else(|| "now".to_owned());
    format!("a request may have charged before {before} (first request unknown)")
}

/// `retries_exhausted`: another request could charge a second time.
fn window_closed(first_attempt_ms: u64, h: DeliveryHistory) -> Plan {
    let first = rfc3339_ms(first_attempt_ms)
        .unwrap_or_else(|| format!("{first_attempt_ms} ms after the epoch"));
    let left = match h.unrecorded_before_ms {
        None => format!("its first request left at {first}"),
        Some(_) => format!(
            "{}, and the command was published at {first}",
            unrecorded(&h)
        ),
    };
    let message = format!(
        "{left}: another request could reach Hyperline after it \
         forgot the Idempotency-Key and charge twice; `dead-letters reconcile` looks it \
         up in Hyperline's credit transactions before replaying it"
    );
    let status = h.last_status;
    let mut plan = Plan::failed(ErrorCode::RetriesExhausted, message, status, h);
    plan.closed_window = Some(first_attempt_ms);
    plan
}

/// The plan once the credit transactions were read for a command whose
/// window closed.
fn looked(
    history: &DeliveryHistory,
    attempted: &Attempted,
    lookup: ChargeLookup,
    policy: Policy<'_>,
) -> Plan {
    let h = learn(history, attempted);
    match lookup {
        // A charge means a request was made, whatever a lost count says.
        ChargeLookup::Charged(found) => Plan::new(
            Some(EventPlan::Reconciled {
                invoice_id: found.invoice_id,
                new_credit_balance: found.balance_after,
                transaction_id: found.transaction_id,
            }),
            Route::Ack,
            DeliveryHistory {
                attempts: h.attempts.max(1),
                ..h
            },
        ),
        // Hyperline holds no charge of the command: it starts again as new,
        // with a fresh budget and a window from this delivery's own first
        // request (which may still be completing), else from its next one.
        ChargeLookup::NotCharged => {
            let fresh = DeliveryHistory {
                first_attempt_ms: attempted.first_sent_ms,
                // No charge since the window's start: nor by a request
                // that no history records.
                unrecorded_before_ms: None,
                step: 0,
                ..h
            };
            Plan::new(None, Route::Return, fresh).returned("not_charged")
        }
        // Too young at the window is uncertain: the command is failed and
        // dead-lettered, and `dead-letters reconcile` judges it once every
        // command that could claim its charge has spoken.
        ChargeLookup::Uncertain { reason, .. } | ChargeLookup::TooYoung { reason, .. } => {
            let mut plan = decide(Input::Attempted(attempted.clone()), history, policy);
            if let Some(EventPlan::Failed { message, .. }) = &mut plan.event {
                message.push_str(&format!(
                    " (Hyperline's credit transactions could not tell: {reason})"
                ));
            }
            plan
        }
    }
}

/// Waits `wait` in a delay queue without using a step.
fn park(h: DeliveryHistory, wait: Duration, policy: Policy<'_>) -> Plan {
    match policy.park_for(wait) {
        Some(queue) => Plan::new(None, Route::Delay(queue), h),
        None => Plan::new(None, Route::Return, h),
    }
}

#[cfg(test)]
mod tests;
