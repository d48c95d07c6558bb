//! One delivery, top to bottom: delivery → command → purchase → outcome, then
//! the plan is carried out: event → copy → ack.
//!
//! The delivery's history is read once, here; what to do is decided once, in
//! [`decision`](super::decision); the [`executor`](super::executor) carries it
//! out. Nothing in between reads a header or settles a delivery.

use tracing::Instrument;

use super::Pipeline;
use super::decision::{Input, Outcome, Policy, WindowStart, decide, window_start};
use super::executor::Subject;
use super::spans::record_outcome;
use crate::broker::{DeliveryHistory, Message, Provenance, Publisher, Received, header_str};
use crate::clock::now_ms;
use crate::contract::{Command, ErrorCode, EventKind, InvalidCommand, OutcomeFacts};
use crate::hyperline::RetryContext;
use crate::hyperline::admission::Place;
use crate::hyperline::retry::purchase_with_retry;
use crate::hyperline::verdict::{Attempted, Bounds};
use crate::operations::Metrics;
use crate::telemetry;

/// Counts a delivery in flight for as long as its task lives, also when the
/// task is aborted or panics (a gauge decremented after an `.await` would
/// stay up for those).
struct InFlight<'a>(&'a Metrics);

impl<'a> InFlight<'a> {
    fn new(metrics: &'a Metrics) -> Self {
        metrics.in_flight.inc();
        InFlight(metrics)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

/// An outcome decided on an earlier delivery, if it fits this one. The
/// memory is sealed to the body, so it is this message's; what is checked
/// is that the outcome is one the body can have: an invalid body's only
/// outcome is `invalid_command`, and a valid command never gets one.
fn stored(
    history: &DeliveryHistory,
    parsed: &Result<Command, InvalidCommand>,
) -> Option<OutcomeFacts> {
    let facts = history.outcome.clone()?;
    let invalid = facts
        .error
        .as_ref()
        .is_some_and(|e| e.code == ErrorCode::InvalidCommand);
    let fits = match parsed {
        Ok(_) => !invalid && (facts.kind == EventKind::Failed) == facts.error.is_some(),
        Err(_) => invalid,
    };
    fits.then_some(facts)
}

/// Since when a command waits, for its lane's "oldest waiting" gauge: its
/// publish time when the publisher stamped one that is not in the future
/// (the publisher's word, used for nothing but the gauge), else now.
fn waiting_since(delivery: &Received) -> i64 {
    let now = now_ms() / 1000;
    let published = delivery.properties.timestamp().filter(|s| *s <= now);
    i64::try_from(published.unwrap_or(now)).unwrap_or(i64::MAX)
}

impl Pipeline {
    /// Handles one delivery to the end and reports what became of it.
    ///
    /// The delivery is borrowed all the way down: moved through the layers,
    /// it would be stored once per layer in the task's state.
    pub async fn handle(&self, delivery: &Received, publisher: &Publisher) -> Outcome {
        let started = std::time::Instant::now();
        let deadline = tokio::time::Instant::now() + self.limits.deadline;
        self.metrics.commands_received.inc();
        let _in_flight = InFlight::new(&self.metrics);
        let props = &delivery.properties;
        let headers = props.headers().as_ref();
        let message = Message::of(props, &delivery.data);
        let (mut history, provenance) = DeliveryHistory::read(message, Some(&self.history_keys));
        history.published_ms = props.timestamp().map(|s| s.saturating_mul(1000));
        let incoming = header_str(headers, "traceparent");
        let message_id = message.message_id;
        let parsed = Command::parse(&delivery.data, message_id);
        let ids = parsed
            .as_ref()
            .ok()
            .map(|c| (c.id.as_str(), c.customer_id.as_str(), c.product_id.as_str()));
        let (command_id, customer_id, product_id) =
            (ids.map(|i| i.0), ids.map(|i| i.1), ids.map(|i| i.2));
        let consumer = self.consumer_span(delivery, message_id);
        if let Some((command_id, customer_id, product_id)) = ids {
            consumer.record("command_id", command_id);
            consumer.record("customer_id", customer_id);
            consumer.record("product_id", product_id);
        }
        let exported = telemetry::continue_trace(&consumer, incoming.as_deref());
        // The consumer span's, or (not exported) one hop of the publisher's
        // trace: what the request and the event carry when they have no
        // exported span of their own.
        let traceparent = match &exported {
            Some(own) => own.clone(),
            None => telemetry::child_traceparent(incoming.as_deref()),
        };
        // Every field given at once: the JSON log layer re-reads and
        // re-writes a span's fields at each later `record`.
        let span = tracing::info_span!(
            "command",
            command_id,
            customer_id,
            product_id,
            attempt = history.attempts,
            trace_id = traceparent.get(3..35).unwrap_or_default(),
            redelivered = delivery.redelivered,
        );
        let outcome = async {
            if provenance == Provenance::Rejected {
                self.metrics.history_rejected.inc();
                tracing::warn!(
                    "the delivery carries worker headers (cpw-*) that the worker did not write \
                     (no valid MAC): ignoring them, the command is handled as new"
                );
            }
            let mut attempted = None;
            let input = match (&parsed, stored(&history, &parsed)) {
                (_, Some(facts)) => Input::Stored(facts),
                (Err(_), None) => Input::Invalid,
                (Ok(_), None) if self.worn(&history) => Input::Worn,
                (Ok(command), None) => match window_start(&history) {
                    WindowStart::Unknown { before_ms } => Input::StartUnknown { before_ms },
                    start => {
                        let first = match start {
                            WindowStart::From(first) => Some(first),
                            _ => None,
                        };
                        let place = (delivery.lane, waiting_since(delivery));
                        let done =
                            Box::pin(self.purchase(command, first, deadline, &traceparent, place))
                                .await;
                        // Kept only for the lookup at the window, when it is on.
                        attempted = self.reconcile_at_window.then(|| done.clone());
                        Input::Attempted(done)
                    }
                },
            };
            let mut plan = decide(input, &history, self.policy());
            if let (Ok(command), Some(first), Some(attempted)) =
                (&parsed, plan.closed_window, attempted)
                && self.reconcile_at_window
            {
                let lookup = Box::pin(self.look_up(command, first, deadline)).await;
                plan = decide(Input::Looked { attempted, lookup }, &history, self.policy());
            }
            let subject = match &parsed {
                Ok(command) => Subject::Command(command),
                Err(invalid) => Subject::Invalid(invalid),
            };
            // The conclusion, boxed: while the API is called, its state (the
            // event, the publish, the settlement) takes no room in the task.
            Box::pin(self.execute(delivery, publisher, subject, plan, &traceparent)).await
        }
        .instrument(span)
        // Outside the `command` span: the export spans made inside find the
        // consumer span as their nearest exported ancestor.
        .instrument(consumer.clone())
        .await;
        record_outcome(&consumer, &outcome);
        let exemplar = exported.as_deref().and_then(telemetry::sampled_trace_id);
        self.metrics.observe_processing(started.elapsed(), exemplar);
        outcome
    }

    /// The settings and the moment a plan is made for.
    pub(super) fn policy(&self) -> Policy<'_> {
        Policy {
            delays: &self.retry.redelivery_delays_secs,
            window: self.limits.window,
            request_timeout: self.limits.request_timeout,
            now_ms: now_ms(),
        }
    }

    /// Whether the delivery has used half the broker's delivery limit: a
    /// quorum queue dead-letters a message at the limit without anyone
    /// publishing an event, and on brokers before 4.3 every return counts, so
    /// a command that keeps landing on replicas that crash would vanish
    /// unanswered. Past half the limit it is copied back as a fresh message.
    fn worn(&self, history: &DeliveryHistory) -> bool {
        self.topology
            .delivery_limit()
            .is_some_and(|limit| history.deliveries >= u64::from(limit) / 2)
    }

    /// The purchase attempts of this delivery, within its deadline and the
    /// command's idempotency window (from `first_ms`, when it is open), in
    /// the line of the lane `(index, waiting since)` in front of the gate.
    async fn purchase(
        &self,
        command: &Command,
        first_ms: Option<u64>,
        deadline: tokio::time::Instant,
        traceparent: &str,
        (lane, since_secs): (usize, i64),
    ) -> Attempted {
        let ctx = RetryContext {
            client: &self.client,
            gate: &self.gate,
            place: Place {
                admission: &self.admission,
                lane,
                since_secs,
            },
            credentials: &self.credentials,
            settings: &self.retry,
            request_timeout: self.limits.request_timeout,
            metrics: &self.metrics,
            cancel: &self.stop_requests,
        };
        let bounds = Bounds {
            deadline,
            first_attempt_ms: first_ms,
            window: self.limits.window,
        };
        purchase_with_retry(&ctx, command, Some(traceparent), bounds).await
    }
}
