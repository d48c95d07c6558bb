//! One delivery, top to bottom: delivery → command → purchase → outcome →
//! event → ack.
//!
//! The order of the last two steps is the promise: a command is settled (acked,
//! rejected to the dead-letter queue, or moved to a delay queue) only after
//! what it produced is confirmed by the broker. If that fails, the command is
//! put back and its next delivery replays the same charge.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::Instrument;

use super::Pipeline;
pub use super::redelivery::{ATTEMPTS_HEADER, FIRST_ATTEMPT_HEADER, REFRESH_HEADER, STEP_HEADER};
use super::retry::{Attempted, RetryContext, Verdict, purchase_with_retry};
pub use super::settlement::{Received, Settle};
use crate::broker::{PublishError, Publisher, Routed, header_str, header_u64};
use crate::configuration::IDEMPOTENCY_WINDOW;
use crate::contract::{Command, ErrorCode, EventError, ResultEvent};
use crate::operations::metrics::{OutcomeLabels, ReasonLabel, StepLabel};

/// What became of one delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `succeeded` event published, command acked.
    Succeeded,
    /// `failed` event published, command acked or dead-lettered.
    Failed(ErrorCode),
    /// Copied to the delay queue of this step (0-based), original acked.
    Deferred(usize),
    /// Near the broker's delivery limit: copied back to the commands queue
    /// as a fresh message, original acked.
    Refreshed,
    /// Put back on the queue: a credential fault.
    CredentialFault,
    /// Put back on the queue: its event or copy could not be confirmed.
    NotConfirmed,
}

impl Outcome {
    /// A label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed(code) => code.as_str(),
            Outcome::Deferred(_) => "deferred",
            Outcome::Refreshed => "refreshed",
            Outcome::CredentialFault => "credential_fault",
            Outcome::NotConfirmed => "not_confirmed",
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Pipeline {
    /// Handles one delivery to the end and reports what became of it.
    ///
    /// The delivery is borrowed all the way down: moved through the layers,
    /// it would be stored once per layer in the task's state.
    pub async fn handle(&self, delivery: &Received, publisher: &Publisher) -> Outcome {
        let started = std::time::Instant::now();
        self.metrics.commands_received.inc();
        self.metrics.in_flight.inc();
        let outcome = self.handle_delivery(delivery, publisher).await;
        self.metrics.in_flight.dec();
        self.metrics
            .processing
            .observe(started.elapsed().as_secs_f64());
        match &outcome {
            Outcome::Succeeded => self.count_outcome("succeeded", ""),
            Outcome::Failed(code) => self.count_outcome("failed", code.as_str()),
            Outcome::Deferred(step) => {
                let step = u32::try_from(step + 1).unwrap_or(u32::MAX);
                self.metrics
                    .redeliveries
                    .get_or_create(&StepLabel { step })
                    .inc();
            }
            Outcome::CredentialFault | Outcome::NotConfirmed | Outcome::Refreshed => {
                self.metrics
                    .requeued
                    .get_or_create(&ReasonLabel {
                        reason: outcome.label(),
                    })
                    .inc();
            }
        }
        outcome
    }

    fn count_outcome(&self, r#type: &'static str, code: &'static str) {
        self.metrics
            .outcomes
            .get_or_create(&OutcomeLabels { r#type, code })
            .inc();
    }

    async fn handle_delivery(&self, delivery: &Received, publisher: &Publisher) -> Outcome {
        let props = &delivery.properties;
        let headers = props.headers().as_ref();
        let message_id = props.message_id().as_ref().map(|m| m.as_str().to_owned());
        // One hop of the publisher's trace, shared by the request and the event.
        let traceparent =
            crate::telemetry::child_traceparent(header_str(headers, "traceparent").as_deref());
        let span = tracing::info_span!(
            "command",
            command_id = tracing::field::Empty,
            customer_id = tracing::field::Empty,
            product_id = tracing::field::Empty,
            attempt = header_u64(headers, ATTEMPTS_HEADER).unwrap_or(0),
            trace_id = traceparent.get(3..35).unwrap_or_default(),
            redelivered = delivery.redelivered,
        );
        async move {
            let command = match Command::parse(&delivery.data, message_id.as_deref()) {
                Ok(command) => command,
                Err(invalid) => {
                    tracing::warn!(reason = %invalid.reason, "invalid command: dead-lettering it");
                    let event = ResultEvent::invalid(&invalid);
                    let outcome = Outcome::Failed(ErrorCode::InvalidCommand);
                    let settle = Settle::DeadLetter;
                    return Box::pin(self.finish(
                        delivery,
                        publisher,
                        &event,
                        outcome,
                        settle,
                        &traceparent,
                    ))
                    .await;
                }
            };
            let span = tracing::Span::current();
            span.record("command_id", command.id.as_str());
            span.record("customer_id", command.customer_id.as_str());
            span.record("product_id", command.product_id.as_str());
            if self.worn(delivery) {
                return Box::pin(self.refresh(delivery, publisher, &command, &traceparent)).await;
            }
            self.purchase(delivery, publisher, &command, &traceparent)
                .await
        }
        .instrument(span)
        .await
    }

    async fn purchase(
        &self,
        delivery: &Received,
        publisher: &Publisher,
        command: &Command,
        traceparent: &str,
    ) -> Outcome {
        let headers = delivery.properties.headers().as_ref();
        let earlier =
            u32::try_from(header_u64(headers, ATTEMPTS_HEADER).unwrap_or(0)).unwrap_or(u32::MAX);
        let step =
            usize::try_from(header_u64(headers, STEP_HEADER).unwrap_or(0)).unwrap_or(usize::MAX);
        let first_attempt = header_u64(headers, FIRST_ATTEMPT_HEADER).unwrap_or_else(now_ms);

        // Hyperline forgets a key 24 h after its first use; a request after
        // that could charge a second time. Configuration keeps normal retries
        // far inside the window; this guards a replay of an old dead letter.
        let age = Duration::from_millis(now_ms().saturating_sub(first_attempt));
        if age + self.settings.in_process_budget() >= IDEMPOTENCY_WINDOW {
            let error = EventError {
                code: ErrorCode::RetriesExhausted,
                message: format!(
                    "first attempted {}h ago: another request could fall outside Hyperline's 24 h idempotency window and charge twice",
                    age.as_secs() / 3600
                ),
                http_status: None,
            };
            let event = ResultEvent::failed(command, earlier, error);
            let outcome = Outcome::Failed(ErrorCode::RetriesExhausted);
            return Box::pin(self.finish(
                delivery,
                publisher,
                &event,
                outcome,
                Settle::DeadLetter,
                traceparent,
            ))
            .await;
        }

        let ctx = RetryContext {
            client: &self.client,
            gate: &self.gate,
            credentials: &self.credentials,
            settings: &self.settings,
            metrics: &self.metrics,
        };
        // Boxed, like the publish below: each phase's state is allocated
        // while it runs, so a command waiting on the API holds only that.
        let Attempted { verdict, requests } =
            Box::pin(purchase_with_retry(&ctx, command, Some(traceparent))).await;
        let attempts = earlier.saturating_add(requests);
        // The conclusion, boxed: while the API is called, its state (the
        // event, the publish, the settlement) takes no room in the task.
        Box::pin(async move {
            let failed = |code: ErrorCode, message: String, http_status: Option<u16>| {
                ResultEvent::failed(
                    command,
                    attempts,
                    EventError {
                        code,
                        message,
                        http_status,
                    },
                )
            };
            let (event, outcome, settle) = match verdict {
                Verdict::Succeeded(receipt) => {
                    tracing::info!(invoice_id = %receipt.invoice_id, attempts, "credits purchased");
                    let event = ResultEvent::succeeded(
                        command,
                        receipt.invoice_id,
                        receipt.new_credit_balance,
                        attempts,
                    );
                    (event, Outcome::Succeeded, Settle::Ack)
                }
                Verdict::Rejected { status, message } => {
                    tracing::warn!(status, hyperline_message = %message, "purchase rejected");
                    (
                        failed(ErrorCode::Rejected, message, Some(status)),
                        Outcome::Failed(ErrorCode::Rejected),
                        Settle::Ack,
                    )
                }
                Verdict::IdempotencyConflict { message } => {
                    tracing::warn!(hyperline_message = %message, "command_id reused for another purchase");
                    let code = ErrorCode::IdempotencyConflict;
                    (
                        failed(code, message, Some(417)),
                        Outcome::Failed(code),
                        Settle::Ack,
                    )
                }
                Verdict::Unexpected { status, detail } => {
                    tracing::error!(status, %detail, "unexpected answer: dead-lettering for an operator");
                    let code = ErrorCode::UnexpectedResponse;
                    (
                        failed(code, detail, Some(status)),
                        Outcome::Failed(code),
                        Settle::DeadLetter,
                    )
                }
                Verdict::CredentialFault => {
                    if self.credentials.report_fault() {
                        tracing::error!(
                            "Hyperline refuses the API key: pausing consumption until it is accepted"
                        );
                    }
                    return self
                        .settle(delivery, Settle::Requeue, Outcome::CredentialFault);
                }
                Verdict::Exhausted {
                    last_status,
                    last_error,
                } => {
                    if let Some((delay, queue)) = self.topology.retry_queues.get(step) {
                        tracing::warn!(%last_error, delay_secs = delay, "in-process retries spent: moving to a delay queue");
                        return self
                            .defer(delivery, publisher, queue, step, attempts, first_attempt)
                            .await;
                    }
                    tracing::error!(%last_error, attempts, "retries exhausted: dead-lettering");
                    let message =
                        format!("gave up after {attempts} attempts; last failure: {last_error}");
                    let code = ErrorCode::RetriesExhausted;
                    (
                        failed(code, message, last_status),
                        Outcome::Failed(code),
                        Settle::DeadLetter,
                    )
                }
            };
            self.finish(delivery, publisher, &event, outcome, settle, traceparent)
                .await
        })
        .await
    }

    /// Publishes the event (results exchange and `reply_to`), then settles.
    pub(super) async fn finish(
        &self,
        delivery: &Received,
        publisher: &Publisher,
        event: &ResultEvent,
        outcome: Outcome,
        settle: Settle,
        traceparent: &str,
    ) -> Outcome {
        match Box::pin(self.publish_event(delivery, publisher, event, traceparent)).await {
            Ok(()) => self.settle(delivery, settle, outcome),
            Err(e) => {
                tracing::error!(error = %e, "event not confirmed: requeueing the command");
                self.settle(delivery, Settle::Requeue, Outcome::NotConfirmed)
            }
        }
    }

    async fn publish_event(
        &self,
        delivery: &Received,
        publisher: &Publisher,
        event: &ResultEvent,
        traceparent: &str,
    ) -> Result<(), PublishError> {
        let body = event.to_json();
        let props = event.amqp_properties(Some(traceparent));
        let reply_to = delivery
            .properties
            .reply_to()
            .as_ref()
            .map(|r| r.as_str())
            .filter(|r| !r.is_empty());
        // The properties (a dozen headers) are copied only when a second
        // publish needs them.
        let (exchange, key) = (&self.topology.results_exchange, event.routing_key());
        let (to_results, to_reply) = match reply_to {
            None => (publisher.send(exchange, key, &body, props).await?, None),
            Some(queue) => {
                let sent = publisher.send(exchange, key, &body, props.clone()).await?;
                (sent, Some(publisher.send("", queue, &body, props).await?))
            }
        };
        if publisher.confirm(exchange, to_results).await? == Routed::No {
            tracing::warn!(%exchange, "no queue is bound to receive this event");
        }
        if let (Some(queue), Some(confirm)) = (reply_to, to_reply)
            && publisher.confirm(queue, confirm).await? == Routed::No
        {
            tracing::warn!(reply_to = %queue, "the reply_to queue does not exist; the event is on the results exchange only");
        }
        Ok(())
    }

    /// Acks, dead-letters or requeues. A settlement that fails at once
    /// (the channel is gone) has no effect: the broker will redeliver, which
    /// is safe, but it is counted and logged so a lost ack never passes for
    /// one.
    pub(super) fn settle(&self, delivery: &Received, settle: Settle, outcome: Outcome) -> Outcome {
        let result = delivery.settle(settle);
        if let Err(e) = result {
            self.metrics.settlements_lost.inc();
            tracing::warn!(error = %e, outcome = outcome.label(), "settlement failed: the broker will redeliver");
        }
        outcome
    }
}
