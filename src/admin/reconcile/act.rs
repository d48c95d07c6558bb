//! Act: carry out a verdict (with `--apply`), checking every broker answer.
//!
//! The letter is removed only after what replaces it (the `succeeded` event,
//! or the replayed copy) is confirmed: until then it is the only trace of the
//! command. The removal itself is an ack, which the broker never answers:
//! an ack refused by a closed channel (`Ok(false)`) or failed is reported as
//! not done, and the caller confirms the others by closing their channel
//! (the close is answered after every ack before it). A letter whose removal
//! failed comes back; the next run finds its command's `succeeded` event in
//! the results log, or its replay in the commands queue, and never buys it
//! twice (see [`judge`](super::judge)). A replay goes back to the letter's
//! own lane (see [`lane`](super::super::lane)), the first for a letter of
//! no configured lane.

use lapin::message::Delivery;
use lapin::options::BasicAckOptions;

use super::super::lane::home;
use super::judge::{Judged, Verdict};
use super::render::{Found, Row, Status};
use super::select::Letter;
use crate::broker::{
    DeliveryHistory, HistoryKeys, Message, PublishError, Publisher, Topology, copy_properties,
    header_str,
};
use crate::contract::ResultEvent;
use crate::hyperline::matching::{Candidate, ChargeLookup};

/// Where and whether to act.
pub struct Acting<'a> {
    /// The worker's publisher (confirm-mode channels).
    pub publisher: &'a Publisher,
    pub topology: &'a Topology,
    /// Without it, nothing is done: the rows say what would be.
    pub apply: bool,
    /// Sign what a replay keeps of a letter's memory.
    pub keys: &'a HistoryKeys,
}

/// What carrying a verdict out takes.
enum Plan {
    /// Publish the letter's `succeeded` event with this charge.
    Publish(Candidate),
    /// Replay the command with its history reset.
    Replay,
    /// Only remove the letter.
    Remove,
}

impl Acting<'_> {
    /// Acts on one letter; gives its row, and the delivery when it stays
    /// in the queue (to be put back).
    pub async fn act(&self, judged: Judged) -> (Row, Option<Delivery>) {
        let Judged { letter, verdict } = judged;
        let mut row = Row {
            command_id: letter.command.id.as_str().to_owned(),
            customer_id: letter.command.customer_id.as_str().to_owned(),
            product_id: letter.command.product_id.as_str().to_owned(),
            error_code: letter.code,
            first_attempt: letter
                .history
                .first_attempt_ms
                .and_then(crate::clock::rfc3339_ms),
            died_at: letter.died_ms.and_then(crate::clock::rfc3339_ms),
            found: Found::Uncertain,
            action: String::new(),
            status: Status::Left,
            applied: false,
            transaction_id: None,
            invoice_id: None,
            new_credit_balance: None,
            candidates: Vec::new(),
            run_again_after: None,
            reason: None,
        };
        let (plan, found, words) = match verdict {
            Verdict::AlreadySucceeded => (
                Plan::Remove,
                Found::AlreadySucceeded,
                "remove the dead letter (its succeeded event is in the results log)",
            ),
            Verdict::Lookup(ChargeLookup::Charged(t)) => {
                row.transaction_id = Some(t.transaction_id.clone());
                row.invoice_id = Some(t.invoice_id.clone());
                row.new_credit_balance = Some(t.balance_after);
                (
                    Plan::Publish(t),
                    Found::Charged,
                    "publish succeeded (reconciled), then remove the dead letter",
                )
            }
            Verdict::Lookup(ChargeLookup::NotCharged) => (
                Plan::Replay,
                Found::NotCharged,
                "replay with its history reset, then remove the dead letter",
            ),
            Verdict::Lookup(ChargeLookup::Uncertain { reason, candidates }) => {
                row.action = "left for a person".into();
                row.reason = Some(reason);
                row.candidates = candidates;
                self.say(&row, "left for a person");
                return (row, Some(letter.delivery));
            }
            Verdict::Lookup(ChargeLookup::TooYoung {
                run_again_after_ms,
                reason,
                candidates,
            }) => {
                let after = crate::clock::rfc3339_ms(run_again_after_ms).unwrap_or_default();
                row.found = Found::TooYoung;
                row.action = format!("left: run again after {after}");
                row.run_again_after = Some(after);
                row.reason = Some(reason);
                row.candidates = candidates;
                self.say(&row, &row.action);
                return (row, Some(letter.delivery));
            }
        };
        row.found = found;
        if !self.apply {
            row.status = Status::Would;
            row.action = format!("would {words}");
            self.say(&row, &row.action);
            return (row, Some(letter.delivery));
        }
        row.action = words.to_owned();
        let sent = self.carry_out(&letter, plan).await;
        if let Err(e) = sent {
            row.status = Status::NotDone;
            row.reason = Some(format!("{e}: nothing was done, the dead letter stays"));
            self.say(&row, "not done");
            return (row, Some(letter.delivery));
        }
        // Only now: until its event or copy is confirmed, the dead letter
        // is the only trace of the command.
        let removed = letter.delivery.acker.ack(BasicAckOptions::default()).await;
        let failure = match removed {
            Ok(true) => None,
            Ok(false) => Some("the channel was already closed".to_owned()),
            Err(e) => Some(super::super::broker_says(&e)),
        };
        match failure {
            None => {
                row.status = Status::Done;
                row.applied = true;
                self.say(&row, "done");
            }
            Some(why) => {
                row.status = Status::NotDone;
                row.reason = Some(format!(
                    "the dead letter could not be removed ({why}): it comes back; a second run \
                     finds it settled and only removes it"
                ));
                self.say(&row, "not done");
            }
        }
        (row, None)
    }

    /// What the plan sends before the letter is removed: its event, its
    /// replay, or nothing.
    async fn carry_out(&self, letter: &Letter, plan: Plan) -> Result<(), PublishError> {
        // Its own lane's, never another's (see `lane`).
        let home = home(self.topology, letter.queue.as_deref());
        match plan {
            Plan::Publish(t) => {
                let event = ResultEvent::reconciled(
                    &letter.command,
                    t.invoice_id,
                    t.balance_after,
                    letter.history.attempts.max(1),
                );
                // Named as the worker names its events: only with lanes
                // configured, and only a lane the letter came from.
                let lane =
                    (self.topology.named_lanes && home.own).then_some(home.lane.name.as_str());
                self.publish(&letter.delivery, &event, lane).await
            }
            Plan::Replay => {
                let delivery = &letter.delivery;
                let message = Message::of(&delivery.properties, &delivery.data);
                let headers = DeliveryHistory::fresh_start(message, None, self.keys);
                let properties = copy_properties(&delivery.properties, headers);
                self.publisher
                    .publish_routed("", &home.lane.queue, &letter.delivery.data, properties)
                    .await?;
                if let Some(note) = home.note(letter.command.id.as_str()) {
                    eprintln!("{note}");
                }
                Ok(())
            }
            Plan::Remove => Ok(()),
        }
    }

    /// One line per letter on stderr, with both ids, for the record.
    fn say(&self, row: &Row, what: &str) {
        eprintln!(
            "{}: command_id={} transaction_id={} {}: {what}",
            match self.apply {
                true => "apply",
                false => "dry run",
            },
            row.command_id,
            row.transaction_id.as_deref().unwrap_or("-"),
            row.found.label(),
        );
    }

    /// The event, as the worker publishes one: to the results exchange and
    /// the command's `reply_to`, confirmed, naming its `lane` where lanes
    /// are configured.
    async fn publish(
        &self,
        delivery: &Delivery,
        event: &ResultEvent,
        lane: Option<&str>,
    ) -> Result<(), PublishError> {
        let headers = delivery.properties.headers().as_ref();
        let traceparent = header_str(headers, "traceparent");
        let body = event.to_json();
        let props = event.amqp_properties(traceparent.as_deref(), lane);
        let reply_to = crate::broker::reply_to(&delivery.properties);
        let reply_props = reply_to.map(|_| props.clone());
        let (exchange, key) = (&self.topology.results_exchange, event.routing_key());
        let mut dropped: Vec<_> = self
            .publisher
            .publish_event(exchange, key, &body, props)
            .await?
            .into_iter()
            .collect();
        if let (Some(queue), Some(props)) = (reply_to, reply_props) {
            dropped.extend(self.publisher.publish_reply(queue, &body, props).await);
        }
        for d in dropped {
            eprintln!(
                "note: the event could not be delivered to reply_to {}: {} (the results log has it)",
                d.queue, d.detail
            );
        }
        Ok(())
    }
}
