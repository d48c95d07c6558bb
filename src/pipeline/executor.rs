//! Carries a [`Plan`] out: the credential fault, the event, the copy, the
//! settlement.
//!
//! The order is the promise: a command is acked only after what it produced
//! (its event, its copy in a delay queue, the commands queue or the
//! dead-letter exchange) is confirmed by the broker. When the broker refuses
//! a part, the refusal goes back to [`decide`] for a new plan that keeps the
//! history and waits before the command comes back; only when even the copy
//! back to the commands queue is refused is the delivery requeued as it came
//! (the broker is then in trouble, and that copy was itself held back first).
//!
//! A `reply_to` copy of the event comes last, after the settlement: it is a
//! courtesy to the requester, and its tries (each waiting for a confirm)
//! once held the ack, long enough at shutdown for the replica to stop with
//! the event out and the command unacked, answered again by the next one.

use tracing::Instrument;

use super::Pipeline;
use super::decision::{EventPlan, Input, Outcome, Plan, Route, decide};
use super::spans::producer_span;
use crate::broker::history::DeathMark;
use crate::broker::{
    DroppedReply, Message, PublishError, Publisher, Received, Settle, copy_properties,
};
use crate::clock::{millis, now_ms};
use crate::contract::{Command, ErrorCode, EventError, InvalidCommand, PendingRecord, ResultEvent};
use crate::operations::metrics::{OutcomeLabels, ReasonLabel, StepLabel};
use crate::telemetry;

/// What an event can be built from.
#[derive(Clone, Copy, Debug)]
pub enum Subject<'a> {
    /// A valid command.
    Command(&'a Command),
    /// A message that is not one.
    Invalid(&'a InvalidCommand),
}

/// Where a copy of the command goes.
enum Destination<'a> {
    /// To an exchange, with the original's routing key.
    Exchange(&'a str),
    /// To a queue, through the default exchange.
    Queue(&'a str),
}

/// An event confirmed on the results exchange, as its command's
/// `reply_to` copy is sent once the command is settled.
struct Reply {
    body: Vec<u8>,
    properties: lapin::BasicProperties,
}

impl Pipeline {
    /// Carries out `plan`, and whatever the broker's refusals make of it;
    /// then, the command settled, sends the event to its `reply_to`.
    pub(super) async fn execute(
        &self,
        delivery: &Received,
        publisher: &Publisher,
        subject: Subject<'_>,
        plan: Plan,
        traceparent: &str,
    ) -> Outcome {
        let mut reply = None;
        let outcome =
            Box::pin(self.carry_out(delivery, publisher, subject, plan, traceparent, &mut reply))
                .await;
        if let Some(reply) = reply {
            Box::pin(self.reply(delivery, publisher, reply)).await;
        }
        outcome
    }

    /// The plan to its settlement; `reply` receives the event once it is
    /// confirmed, when the command names a `reply_to`.
    async fn carry_out(
        &self,
        delivery: &Received,
        publisher: &Publisher,
        subject: Subject<'_>,
        plan: Plan,
        traceparent: &str,
        reply: &mut Option<Reply>,
    ) -> Outcome {
        let mut plan = plan;
        let mut published: Option<ResultEvent> = None;
        loop {
            log_plan(&plan, subject);
            if !plan.hold.is_zero() {
                // Cut short at shutdown: the copy then goes at once.
                tokio::select! {
                    () = tokio::time::sleep(plan.hold) => {}
                    () = self.stop_requests.cancelled() => {}
                }
            }
            if plan.credential_fault && self.account.credentials.report_fault() {
                tracing::error!(
                    "Hyperline refuses the API key: pausing consumption until it is accepted"
                );
            }
            if let Some(event_plan) = plan.event.take() {
                let event = build_event(event_plan, subject, plan.history.attempts);
                match Box::pin(self.publish_event(delivery, publisher, &event, traceparent)).await {
                    Ok(confirmed) => *reply = confirmed,
                    Err(e) => {
                        tracing::error!(error = %e, "event not confirmed: the command waits with its outcome");
                        plan = decide(Input::EventRefused(event), &plan.history, self.policy());
                        continue;
                    }
                }
                published = Some(event);
            }
            let original = Message::of(&delivery.properties, &delivery.data);
            let keys = &self.history_keys;
            // A copy goes back to the lane it came from, never to another's.
            let lane = self.topology.lane(delivery.lane);
            let (to, headers) = match plan.route {
                Route::Ack => return self.settle(delivery, Settle::Ack, plan.outcome),
                Route::RejectToDlx => {
                    return self.settle(delivery, Settle::DeadLetter, plan.outcome);
                }
                Route::CopyToDlx(code) => {
                    let mark = DeathMark {
                        code: code.as_str(),
                        at_ms: now_ms(),
                        replica: &self.replica,
                        queue: &lane.queue,
                    };
                    let dlx = Destination::Exchange(&self.topology.dlx);
                    (dlx, plan.history.stamp_dead(original, &mark, keys))
                }
                Route::Delay(step) => {
                    let queue = lane.retry_queues.get(step).map(|(_, q)| q);
                    // The steps and their queues come from the same setting.
                    let queue = queue.unwrap_or(&lane.queue);
                    (
                        Destination::Queue(queue),
                        plan.history.stamp(original, keys),
                    )
                }
                Route::Return => (
                    Destination::Queue(&lane.queue),
                    plan.history.stamp(original, keys),
                ),
            };
            let pending = match (plan.route, subject) {
                (Route::Delay(_) | Route::Return, Subject::Command(command)) => plan
                    .history
                    .first_attempt_ms
                    .map(|first| PendingRecord::of(command, first, plan.history.attempts)),
                _ => None,
            };
            let recorded = match &pending {
                Some(record) => {
                    let lane = self.lane_label(delivery);
                    self.publish_pending(publisher, record, lane).await
                }
                None => Ok(()),
            };
            let copied = match recorded {
                Ok(()) => self.copy(delivery, publisher, to, headers).await,
                Err(e) => Err(e),
            };
            match copied {
                Ok(()) => return self.settle(delivery, Settle::Ack, plan.outcome),
                // Refused again after a wait: the broker is in trouble, and
                // the delivery goes back as it came.
                Err(e) if plan.route == Route::Return && !plan.hold.is_zero() => {
                    tracing::error!(error = %e, "the broker refuses the command's copy: requeueing it as it came");
                    return self.settle(delivery, Settle::Requeue, Outcome::Returned("requeued"));
                }
                Err(e) => {
                    tracing::error!(error = %e, "copy not confirmed: the command goes back to its queue after a wait");
                    let input = Input::CopyRefused {
                        published: published.take(),
                        refused: plan.outcome,
                    };
                    plan = decide(input, &plan.history, self.policy());
                }
            }
        }
    }

    /// Publishes a copy of the command with `headers`; the original is acked
    /// only once it is confirmed.
    async fn copy(
        &self,
        delivery: &Received,
        publisher: &Publisher,
        to: Destination<'_>,
        headers: lapin::types::FieldTable,
    ) -> Result<(), PublishError> {
        let props = copy_properties(&delivery.properties, headers);
        let (exchange, key) = match to {
            Destination::Exchange(exchange) => (exchange, delivery.routing_key.as_str()),
            Destination::Queue(queue) => ("", queue),
        };
        Box::pin(publisher.publish_routed(exchange, key, &delivery.data, props)).await
    }

    /// Publishes the `pending` record of a command whose request may have
    /// charged and that goes back to the broker with no event, straight to
    /// the results log, confirmed: until its event, it is how `dead-letters
    /// reconcile` and the check at the window know it is in flight. Refused,
    /// it is the copy that is refused: the command is not sent on unseen.
    /// Unroutable (no stream of that name: a managed topology without the
    /// log) it is not needed: a log created later covers none of the
    /// charges this command could have made, so none is settled with them.
    async fn publish_pending(
        &self,
        publisher: &Publisher,
        record: &PendingRecord,
        lane: Option<&str>,
    ) -> Result<(), PublishError> {
        let Some(log) = &self.topology.results_log else {
            return Ok(());
        };
        let body = record.to_json();
        let props = record.amqp_properties(lane);
        let returned = Box::pin(publisher.publish_event("", &log.name, &body, props)).await?;
        match returned {
            Some(d) if d.queue == log.name => tracing::warn!(
                log = %d.queue,
                detail = %d.detail,
                "no results log to record the command in flight (see `check`)"
            ),
            // A reply sent earlier on the channel, returned with this confirm.
            Some(d) => self.drop_reply(&d),
            None => {}
        }
        Ok(())
    }

    /// The name of the delivery's lane for its event's `cpw-lane`, only
    /// where lanes are configured: the default configuration's events, and
    /// their cost, stay as they were.
    fn lane_label(&self, delivery: &Received) -> Option<&str> {
        self.topology
            .named_lanes
            .then(|| self.topology.lane(delivery.lane).name.as_str())
    }

    /// Publishes the event to the results exchange, confirmed; what its
    /// `reply_to` copy needs, when the command names one.
    async fn publish_event(
        &self,
        delivery: &Received,
        publisher: &Publisher,
        event: &ResultEvent,
        traceparent: &str,
    ) -> Result<Option<Reply>, PublishError> {
        let (exchange, key) = (&self.topology.results_exchange, event.routing_key());
        let span = producer_span(exchange, key, event);
        let exported = telemetry::exported_traceparent(&span);
        let body = event.to_json();
        let props = event.amqp_properties(
            Some(exported.as_deref().unwrap_or(traceparent)),
            self.lane_label(delivery),
        );
        // The properties (a dozen headers) are copied only when a second
        // publish needs them.
        let reply_props = crate::broker::reply_to(&delivery.properties).map(|_| props.clone());
        let published = publisher
            .publish_event(exchange, key, &body, props)
            .instrument(span.clone())
            .await
            .map(|dropped| dropped.iter().for_each(|d| self.drop_reply(d)));
        if let Err(e) = &published
            && !span.is_disabled()
        {
            span.record("error.type", e.kind());
            span.record("otel.status_code", "error");
        }
        published.map(|()| reply_props.map(|properties| Reply { body, properties }))
    }

    /// Sends the event to the settled command's `reply_to`: a few bounded
    /// tries, given up once the drain period is over (the replica stops
    /// taking requests), so a reply never keeps the replica from stopping;
    /// the results exchange has the event.
    async fn reply(&self, delivery: &Received, publisher: &Publisher, reply: Reply) {
        let Some(queue) = crate::broker::reply_to(&delivery.properties) else {
            return;
        };
        let tries = publisher.publish_reply(queue, &reply.body, reply.properties);
        let dropped = tokio::select! {
            dropped = tries => dropped,
            () = self.stop_requests.cancelled() => vec![DroppedReply {
                queue: queue.to_owned(),
                reason: "stopping",
                detail: "the replica stopped before the broker confirmed it".to_owned(),
            }],
        };
        dropped.iter().for_each(|d| self.drop_reply(d));
    }

    /// A `reply_to` copy given up on: the event is on the results
    /// exchange and the command is settled; the requester is told nothing.
    fn drop_reply(&self, dropped: &DroppedReply) {
        tracing::warn!(
            reply_to = %dropped.queue,
            reason = dropped.reason,
            detail = %dropped.detail,
            "the event could not be delivered to the command's reply_to: dropped (the results exchange has it)"
        );
        self.metrics
            .replies_dropped
            .get_or_create(&ReasonLabel {
                reason: dropped.reason,
            })
            .inc();
    }

    /// Acks or requeues, and counts the outcome. A settlement that fails at
    /// once (the channel is gone) has no effect: the broker will redeliver,
    /// which is safe, but it is counted and logged so a lost ack never
    /// passes for one.
    fn settle(&self, delivery: &Received, settle: Settle, outcome: Outcome) -> Outcome {
        if let Err(e) = delivery.settle(settle) {
            self.metrics.settlements_lost.inc();
            tracing::warn!(error = %e, outcome = outcome.label(), "settlement failed: the broker will redeliver");
        }
        let m = &self.metrics;
        match outcome {
            Outcome::Succeeded => m.outcome(OutcomeLabels {
                r#type: "succeeded",
                code: "",
            }),
            Outcome::Failed(code) => m.outcome(OutcomeLabels {
                r#type: "failed",
                code: code.as_str(),
            }),
            Outcome::Deferred(step) => {
                m.redeliveries.get_or_create(&StepLabel { step }).inc();
            }
            Outcome::Returned(reason) => {
                m.requeued.get_or_create(&ReasonLabel { reason }).inc();
            }
        }
        outcome
    }
}

/// The event of a plan, for its subject.
fn build_event(plan: EventPlan, subject: Subject<'_>, attempts: u32) -> ResultEvent {
    match (plan, subject) {
        (EventPlan::Stored(facts), Subject::Command(c)) => {
            ResultEvent::restored(ResultEvent::base(facts.kind, c, attempts), facts)
        }
        (EventPlan::Stored(facts), Subject::Invalid(invalid)) => {
            ResultEvent::restored(ResultEvent::invalid(invalid), facts)
        }
        (_, Subject::Invalid(invalid)) => ResultEvent::invalid(invalid),
        (
            EventPlan::Succeeded {
                invoice_id,
                new_credit_balance,
            },
            Subject::Command(c),
        ) => ResultEvent::succeeded(c, invoice_id, new_credit_balance, attempts),
        (
            EventPlan::Reconciled {
                invoice_id,
                new_credit_balance,
                ..
            },
            Subject::Command(c),
        ) => ResultEvent::reconciled(c, invoice_id, new_credit_balance, attempts),
        (
            EventPlan::Failed {
                code,
                message,
                http_status,
            },
            Subject::Command(c),
        ) => ResultEvent::failed(
            c,
            attempts,
            EventError {
                code,
                message,
                http_status,
            },
        ),
        // `decide` plans an invalid-command event only for a body that did
        // not parse; should that ever change, the event still says so.
        (EventPlan::Invalid, Subject::Command(c)) => {
            let error = EventError {
                code: ErrorCode::InvalidCommand,
                message: "not a valid command".into(),
                http_status: None,
            };
            ResultEvent::failed(c, attempts, error)
        }
    }
}

/// One line per decision, at the level an operator needs: a charge is
/// traceable from `command_id` (the span) to `invoice_id` in one line.
fn log_plan(plan: &Plan, subject: Subject<'_>) {
    let attempts = plan.history.attempts;
    match (&plan.event, plan.route) {
        (Some(EventPlan::Succeeded { invoice_id, .. }), _) => {
            tracing::info!(%invoice_id, attempts, "credits purchased");
        }
        (
            Some(EventPlan::Reconciled {
                invoice_id,
                transaction_id,
                ..
            }),
            _,
        ) => {
            tracing::warn!(%invoice_id, %transaction_id, attempts, "charge found in Hyperline's credit transactions: succeeded, reconciled");
        }
        (Some(EventPlan::Invalid), _) => {
            if let Subject::Invalid(invalid) = subject {
                tracing::warn!(reason = %invalid.reason, "invalid command: dead-lettering it");
            }
        }
        (
            Some(EventPlan::Failed {
                code,
                message,
                http_status,
            }),
            route,
        ) => {
            let code = code.as_str();
            match route {
                Route::CopyToDlx(_) => {
                    tracing::error!(code, http_status, detail = %message, attempts, "failed: dead-lettering for an operator")
                }
                _ => tracing::warn!(code, http_status, detail = %message, attempts, "failed"),
            }
        }
        (Some(EventPlan::Stored(facts)), _) => {
            tracing::info!(event_id = %facts.event_id, "publishing the outcome decided on an earlier delivery");
        }
        (None, Route::Delay(_)) => {
            let outcome = plan.outcome.label();
            let (step, setbacks) = (plan.history.step, plan.history.setbacks);
            tracing::warn!(
                outcome,
                step,
                setbacks,
                attempts,
                "moving the command to a delay queue"
            );
        }
        (None, _) => {
            let hold_ms = millis(plan.hold);
            tracing::warn!(
                outcome = plan.outcome.label(),
                hold_ms,
                attempts,
                "putting the command back on its queue"
            );
        }
    }
}
