//! The delivery's spans, apart from its path: the consumer span (messaging
//! semantic conventions) that continues the publisher's `traceparent`, the
//! outcome recorded on it, and the producer span of an event. They are
//! disabled unless spans are exported (`telemetry::SPANS`), so reading
//! `Pipeline::handle` and the executor top to bottom is reading the
//! command's path, not its tracing.

use super::Pipeline;
use super::decision::Outcome;
use crate::broker::Received;
use crate::contract::ResultEvent;
use crate::telemetry;

/// What became of the delivery, on its consumer span: a failure is an
/// error of the span, its code the error type.
pub(super) fn record_outcome(span: &tracing::Span, outcome: &Outcome) {
    if span.is_disabled() {
        return;
    }
    let kind = match outcome {
        Outcome::Succeeded => "succeeded",
        Outcome::Failed(_) => "failed",
        Outcome::Deferred(_) => "deferred",
        Outcome::Returned(_) => "returned",
    };
    span.record("outcome", kind);
    if let Outcome::Failed(code) = outcome {
        span.record("error_code", code.as_str());
        span.record("error.type", code.as_str());
        span.record("otel.status_code", "error");
    }
}

/// A delivery's place in its trace.
pub(super) struct Trace {
    /// The consumer span, disabled unless spans are exported.
    pub consumer: tracing::Span,
    /// What the request and the event carry: the consumer span's own when
    /// it is exported, else one hop of the publisher's trace.
    pub traceparent: String,
    exported: bool,
}

impl Trace {
    /// The trace id a latency observation links to, when it is exported
    /// and sampled.
    pub fn exemplar(&self) -> Option<&str> {
        match self.exported {
            true => telemetry::sampled_trace_id(&self.traceparent),
            false => None,
        }
    }
}

impl Pipeline {
    /// The delivery's consumer span, continuing the publisher's `incoming`
    /// `traceparent`. `ids` are the command's id, customer and product, when
    /// it parsed.
    pub(super) fn trace(
        &self,
        delivery: &Received,
        message_id: Option<&str>,
        ids: Option<(&str, &str, &str)>,
        incoming: Option<&str>,
    ) -> Trace {
        let consumer = self.consumer_span(delivery, message_id);
        if let Some((command_id, customer_id, product_id)) = ids {
            consumer.record("command_id", command_id);
            consumer.record("customer_id", customer_id);
            consumer.record("product_id", product_id);
        }
        let (traceparent, exported) = match telemetry::continue_trace(&consumer, incoming) {
            Some(own) => (own, true),
            None => (telemetry::child_traceparent(incoming), false),
        };
        Trace {
            consumer,
            traceparent,
            exported,
        }
    }

    /// The consumer span of a delivery (messaging semantic conventions),
    /// disabled unless spans are exported.
    fn consumer_span(&self, delivery: &Received, message_id: Option<&str>) -> tracing::Span {
        tracing::info_span!(
            target: telemetry::SPANS,
            "process",
            otel.name = format!("process {}", self.topology.lane(delivery.lane).queue),
            otel.kind = "consumer",
            otel.status_code = tracing::field::Empty,
            messaging.system = "rabbitmq",
            messaging.operation.type = "process",
            messaging.operation.name = "process",
            messaging.destination.name = delivery.exchange.as_str(),
            messaging.rabbitmq.destination.routing_key = delivery.routing_key.as_str(),
            messaging.message.id = message_id,
            command_id = tracing::field::Empty,
            customer_id = tracing::field::Empty,
            product_id = tracing::field::Empty,
            outcome = tracing::field::Empty,
            error_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
        )
    }
}

/// The producer span of an event's publish and confirm (messaging semantic
/// conventions), disabled unless spans are exported.
pub(super) fn producer_span(exchange: &str, key: &str, event: &ResultEvent) -> tracing::Span {
    tracing::info_span!(
        target: telemetry::SPANS,
        "send",
        otel.name = format!("send {exchange}"),
        otel.kind = "producer",
        otel.status_code = tracing::field::Empty,
        messaging.system = "rabbitmq",
        messaging.operation.type = "send",
        messaging.operation.name = "publish",
        messaging.destination.name = exchange,
        messaging.rabbitmq.destination.routing_key = key,
        messaging.message.id = %event.event_id,
        command_id = event.command_id.as_deref(),
        error.type = tracing::field::Empty,
    )
}
