//! Copies of a command put back through the broker: into a delay queue when
//! its in-process retries are spent, or back into the commands queue when its
//! delivery count nears the broker's limit.
//!
//! Both are republishes, never dead-letters: the copy drops the broker's
//! death and delivery-count headers (brokers before 4.0.1 silently drop a
//! message that cycles back through dead-lettering) and carries our own
//! counters instead. The original is acked only once the copy is confirmed
//! and routed.

use lapin::types::{AMQPValue, FieldTable, ShortString};

use super::Pipeline;
use super::handler::{Outcome, Received, Settle};
use crate::broker::{Publisher, REDELIVERY_HEADERS, header_u64};
use crate::contract::{Command, ErrorCode, EventError, ResultEvent};

/// Our headers on a command copied to a delay queue.
pub const ATTEMPTS_HEADER: &str = "cpw-attempts";
/// The number of delay steps the command went through.
pub const STEP_HEADER: &str = "cpw-redelivery-step";
/// Unix milliseconds of the command's first request to Hyperline: the start
/// of its 24-hour idempotency window.
pub const FIRST_ATTEMPT_HEADER: &str = "cpw-first-attempt-ms";

/// How often a command was copied back to the commands queue because its
/// deliveries neared the broker's limit.
pub const REFRESH_HEADER: &str = "cpw-refreshes";
/// The header a quorum queue puts on a redelivered message.
const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";
/// Refreshes before a command is declared a poison message.
const MAX_REFRESHES: u64 = 3;

/// The delivery's headers without the broker's, with ours set.
fn copied_headers(delivery: &Received, set: &[(&str, u64)]) -> FieldTable {
    let mut headers = FieldTable::default();
    if let Some(old) = delivery.properties.headers() {
        for (k, v) in old.inner() {
            if !REDELIVERY_HEADERS.contains(&k.as_str()) {
                headers.insert(k.clone(), v.clone());
            }
        }
    }
    for (k, v) in set {
        headers.insert(
            ShortString::from(*k),
            AMQPValue::LongLongInt(i64::try_from(*v).unwrap_or(i64::MAX)),
        );
    }
    headers
}

impl Pipeline {
    /// Publishes a copy to `queue` and acks the original once it is
    /// confirmed; requeues the original otherwise.
    async fn copy_then_ack(
        &self,
        delivery: &Received,
        publisher: &Publisher,
        queue: &str,
        headers: FieldTable,
        outcome: Outcome,
    ) -> Outcome {
        let props = delivery
            .properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(2);
        match Box::pin(publisher.publish_routed("", queue, &delivery.data, props)).await {
            Ok(()) => self.settle(delivery, Settle::Ack, outcome),
            Err(e) => {
                tracing::error!(error = %e, queue, "could not copy the command: requeueing it");
                self.settle(delivery, Settle::Requeue, Outcome::NotConfirmed)
            }
        }
    }

    /// Copies the command to the delay queue of `step`, then acks the original.
    pub(super) async fn defer(
        &self,
        delivery: &Received,
        publisher: &Publisher,
        queue: &str,
        step: usize,
        attempts: u32,
        first_attempt: u64,
    ) -> Outcome {
        let headers = copied_headers(
            delivery,
            &[
                (ATTEMPTS_HEADER, u64::from(attempts)),
                (STEP_HEADER, u64::try_from(step + 1).unwrap_or(u64::MAX)),
                (FIRST_ATTEMPT_HEADER, first_attempt),
            ],
        );
        self.copy_then_ack(delivery, publisher, queue, headers, Outcome::Deferred(step))
            .await
    }

    /// Whether the delivery has used half the broker's delivery limit, and
    /// must go through [`Pipeline::refresh`] instead of a purchase.
    pub(super) fn worn(&self, delivery: &Received) -> bool {
        let Some(limit) = self.topology.delivery_limit() else {
            return false;
        };
        let headers = delivery.properties.headers().as_ref();
        header_u64(headers, DELIVERY_COUNT_HEADER).unwrap_or(0) >= u64::from(limit) / 2
    }

    /// A quorum queue dead-letters a message after `x-delivery-limit`
    /// deliveries without anyone publishing an event, and on brokers before
    /// 4.3 every return counts: a command that keeps landing on replicas that
    /// crash or lose their connection would vanish unanswered. Past half the
    /// limit, the command is copied back as a fresh message instead; after
    /// [`MAX_REFRESHES`] copies it is a poison message and fails with an event.
    /// Called only for a [`Pipeline::worn`] delivery.
    pub(super) async fn refresh(
        &self,
        delivery: &Received,
        publisher: &Publisher,
        command: &Command,
        traceparent: &str,
    ) -> Outcome {
        let headers = delivery.properties.headers().as_ref();
        let deliveries = header_u64(headers, DELIVERY_COUNT_HEADER).unwrap_or(0);
        let refreshes = header_u64(headers, REFRESH_HEADER).unwrap_or(0);
        if refreshes >= MAX_REFRESHES {
            let attempts = u32::try_from(header_u64(headers, ATTEMPTS_HEADER).unwrap_or(0))
                .unwrap_or(u32::MAX);
            let message = format!(
                "delivered {} times without an outcome (workers crashed or lost their connection while handling it): \
                 dead-lettered as a possible poison message",
                (refreshes + 1) * deliveries
            );
            tracing::error!(
                deliveries,
                refreshes,
                "giving up on a command that never completes"
            );
            let event = ResultEvent::failed(
                command,
                attempts,
                EventError {
                    code: ErrorCode::RetriesExhausted,
                    message,
                    http_status: None,
                },
            );
            let outcome = Outcome::Failed(ErrorCode::RetriesExhausted);
            return self
                .finish(
                    delivery,
                    publisher,
                    &event,
                    outcome,
                    Settle::DeadLetter,
                    traceparent,
                )
                .await;
        }
        tracing::warn!(
            deliveries,
            refreshes,
            "near the broker's delivery limit: copying the command back as a fresh message"
        );
        let headers = copied_headers(delivery, &[(REFRESH_HEADER, refreshes + 1)]);
        let queue = &self.topology.queue;
        self.copy_then_ack(delivery, publisher, queue, headers, Outcome::Refreshed)
            .await
    }
}
