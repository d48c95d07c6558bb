//! Prometheus metrics: what an operator needs to scale replicas against
//! Hyperline's shared write limit and to be paged for the right reason.
//!
//! Names follow Prometheus conventions (`cpw_` prefix, `_total` counters,
//! `_seconds` in base units); the text comes from `prometheus-client`, never
//! from hand-written formatting.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::registry::Registry;

/// `type` and `code` of an outcome (`code` empty for successes).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `succeeded` or `failed`.
    pub r#type: &'static str,
    /// The error code of a failure.
    pub code: &'static str,
}

/// One label named `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// The status class of a Hyperline answer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// `2xx`, `4xx`, `429`, `5xx`, `timeout`, `connect`, `network`...
    pub status: &'static str,
}

/// Which queue a depth is of.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabel {
    /// `commands` or `dead_letters`.
    pub queue: &'static str,
}

/// A lane (`amqp.lanes`; `default` without lanes).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LaneLabel {
    pub lane: String,
}

/// A broker node.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabel {
    /// Its `host:port`, as in `amqp.url` (no credentials).
    pub node: String,
}

/// The delay step of a broker-side redelivery.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabel {
    /// 1-based step number.
    pub step: u32,
}

/// The exemplar of a latency: the trace of one sampled observation per
/// bucket, so a spike on a dashboard links to a trace of it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceLabel {
    /// The W3C trace id (32 hex digits).
    pub trace_id: String,
}

/// A latency histogram with exemplars (shown only in the OpenMetrics
/// format, which `/metrics` serves).
pub type LatencyHistogram = HistogramWithExemplars<TraceLabel>;

type HistogramFamily<L> = Family<L, LatencyHistogram, fn() -> LatencyHistogram>;

fn latency_histogram() -> LatencyHistogram {
    // 5 ms to ~80 s: an instant local endpoint up to a purchase that
    // "can take a few seconds" plus its retries.
    HistogramWithExemplars::new(exponential_buckets(0.005, 2.0, 15))
}

/// The exemplar of an observation made under the trace `trace_id`.
fn exemplar(trace_id: Option<&str>) -> Option<TraceLabel> {
    trace_id.map(|id| TraceLabel {
        trace_id: id.to_owned(),
    })
}

/// Every metric of the worker.
pub struct Metrics {
    registry: Registry,
    /// Deliveries taken from the commands queue.
    pub commands_received: Counter,
    /// Final outcomes, by event type and error code.
    pub outcomes: Family<OutcomeLabels, Counter>,
    /// Commands put back on the queue (credential fault, unconfirmed event).
    pub requeued: Family<ReasonLabel, Counter>,
    /// Hyperline requests by status class.
    pub hyperline_requests: Family<StatusLabel, Counter>,
    /// Hyperline request latency by status class.
    pub hyperline_latency: HistogramFamily<StatusLabel>,
    /// In-process retries by reason.
    pub retries: Family<ReasonLabel, Counter>,
    /// Broker-side redeliveries by step.
    pub redeliveries: Family<StepLabel, Counter>,
    /// Commands being processed now.
    pub in_flight: Gauge,
    /// `amqp.prefetch`: the most commands in flight.
    pub prefetch: Gauge,
    /// Messages ready in the commands and dead-letter queues.
    pub queue_messages: Family<QueueLabel, Gauge>,
    /// Delivery to settlement.
    pub processing: LatencyHistogram,
    /// Broker sessions that ended in an error and were rebuilt.
    pub reconnects: Counter,
    /// 1 on the broker node this replica is connected to, 0 on the others
    /// it has been on.
    pub broker_node: Family<NodeLabel, Gauge>,
    /// 429s and exhausted quotas that paused the replica.
    pub rate_limit_waits: Counter,
    /// Time the replica was told to pause, summed.
    pub rate_limit_wait_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    /// 1 while Hyperline refuses the key.
    pub credentials_refused: Gauge,
    /// 1 while the broker blocks this replica's connection (a resource alarm).
    pub broker_blocked: Gauge,
    /// 1 while `/readyz` says ready; set at each scrape.
    pub ready: Gauge,
    /// Acks, nacks and rejects that had no effect (channel gone).
    pub settlements_lost: Counter,
    /// Deliveries carrying `cpw-*` headers the worker did not write.
    pub history_rejected: Counter,
    /// `reply_to` copies given up on, by reason.
    pub replies_dropped: Family<ReasonLabel, Counter>,
    /// Messages ready in each lane's commands queue.
    pub lane_messages: Family<LaneLabel, Gauge>,
    /// Writes the gate admitted, by lane.
    pub lane_writes: Family<LaneLabel, Counter>,
    /// From asking for a turn at the write gate to the gate's admission.
    pub lane_gate_wait: HistogramFamily<LaneLabel>,
    /// When the oldest command waiting for its turn was published (Unix
    /// seconds); 0 when none waits.
    pub lane_oldest_since: Family<LaneLabel, Gauge>,
    /// Each lane's configured share and objective, for the dashboard and
    /// the alert to compare with.
    pub lane_share: Family<LaneLabel, Gauge>,
    pub lane_objective: Family<LaneLabel, Gauge>,
    /// The label sets every charge is counted under, taken from their
    /// families at first use, not looked up per command: a lookup hashes
    /// the labels (SipHash) and takes the family's lock, three times per
    /// charge. A family's handle shares its value, so `/metrics` shows the
    /// same figures, and a label set still appears only once used.
    hot: HotLabels,
}

/// See [`Metrics`]'s `hot`.
#[derive(Default)]
struct HotLabels {
    /// `outcomes{type="succeeded",code=""}`.
    succeeded: OnceLock<Counter>,
    /// `hyperline_requests` and `hyperline_latency`, `status="2xx"`.
    answered: OnceLock<(Counter, LatencyHistogram)>,
}

/// The outcome labels of a success.
const SUCCEEDED: OutcomeLabels = OutcomeLabels {
    r#type: "succeeded",
    code: "",
};

/// The status class of a purchase answered.
const ANSWERED: &str = "2xx";

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("cpw");
        let m = Metrics {
            commands_received: Counter::default(),
            outcomes: Family::default(),
            requeued: Family::default(),
            hyperline_requests: Family::default(),
            hyperline_latency: Family::new_with_constructor(latency_histogram),
            retries: Family::default(),
            redeliveries: Family::default(),
            in_flight: Gauge::default(),
            prefetch: Gauge::default(),
            queue_messages: Family::default(),
            processing: latency_histogram(),
            reconnects: Counter::default(),
            broker_node: Family::default(),
            rate_limit_waits: Counter::default(),
            rate_limit_wait_seconds: Counter::default(),
            credentials_refused: Gauge::default(),
            broker_blocked: Gauge::default(),
            ready: Gauge::default(),
            settlements_lost: Counter::default(),
            history_rejected: Counter::default(),
            replies_dropped: Family::default(),
            lane_messages: Family::default(),
            lane_writes: Family::default(),
            lane_gate_wait: Family::new_with_constructor(latency_histogram),
            lane_oldest_since: Family::default(),
            lane_share: Family::default(),
            lane_objective: Family::default(),
            hot: HotLabels::default(),
            registry: Registry::default(),
        };
        m.register_commands(&mut registry);
        m.register_replica(&mut registry);
        m.register_lanes(&mut registry);
        Metrics { registry, ..m }
    }

    /// The metrics of the commands' path: deliveries, requests, outcomes.
    fn register_commands(&self, registry: &mut Registry) {
        registry.register(
            "commands_received",
            "Deliveries taken from the commands queue",
            self.commands_received.clone(),
        );
        registry.register(
            "outcomes",
            "Final outcomes of commands, by event type and error code",
            self.outcomes.clone(),
        );
        registry.register(
            "requeued",
            "Commands put back on the queue, by reason",
            self.requeued.clone(),
        );
        registry.register(
            "hyperline_requests",
            "Purchase requests sent to Hyperline, by status class",
            self.hyperline_requests.clone(),
        );
        registry.register_with_unit(
            "hyperline_request_duration",
            "Latency of purchase requests, by status class",
            prometheus_client::registry::Unit::Seconds,
            self.hyperline_latency.clone(),
        );
        registry.register(
            "retries",
            "In-process retries of purchases, by reason",
            self.retries.clone(),
        );
        registry.register(
            "redeliveries",
            "Commands moved to a broker-side delay queue, by step",
            self.redeliveries.clone(),
        );
        registry.register(
            "in_flight_commands",
            "Commands being processed by this replica",
            self.in_flight.clone(),
        );
        registry.register(
            "prefetch",
            "The most commands this replica processes at once (amqp.prefetch)",
            self.prefetch.clone(),
        );
        registry.register(
            "queue_messages",
            "Messages ready in the commands and dead-letter queues, read by this replica",
            self.queue_messages.clone(),
        );
        registry.register_with_unit(
            "processing_duration",
            "Time from delivery to settlement of a command",
            prometheus_client::registry::Unit::Seconds,
            self.processing.clone(),
        );
    }

    /// The metrics of the lanes (docs/operations.md, "Lanes").
    fn register_lanes(&self, registry: &mut Registry) {
        registry.register(
            "lane_messages",
            "Messages ready in each lane's commands queue, read by this replica",
            self.lane_messages.clone(),
        );
        registry.register(
            "lane_writes",
            "Purchase requests the write gate admitted, by lane",
            self.lane_writes.clone(),
        );
        registry.register_with_unit(
            "lane_gate_wait",
            "Time from asking for a turn at the write gate to being admitted, by lane",
            prometheus_client::registry::Unit::Seconds,
            self.lane_gate_wait.clone(),
        );
        registry.register(
            "lane_oldest_waiting_since_seconds",
            "Publish time (Unix seconds) of the oldest command of the lane waiting for its turn at the write gate; 0 when none waits",
            self.lane_oldest_since.clone(),
        );
        registry.register(
            "lane_share",
            "The lane's share of the write budget (amqp.lanes)",
            self.lane_share.clone(),
        );
        registry.register_with_unit(
            "lane_objective",
            "How long the lane's oldest command may wait before the CpwLaneWaitingTooLong alert",
            prometheus_client::registry::Unit::Seconds,
            self.lane_objective.clone(),
        );
    }

    /// The metrics of the replica's state: broker, key, readiness, trust.
    fn register_replica(&self, registry: &mut Registry) {
        registry.register(
            "reconnects",
            "Broker sessions rebuilt after a failure",
            self.reconnects.clone(),
        );
        registry.register(
            "broker_node",
            "1 on the broker node this replica is connected to (label node: host:port)",
            self.broker_node.clone(),
        );
        registry.register(
            "rate_limit_waits",
            "Pauses of the whole replica for Hyperline's rate limit",
            self.rate_limit_waits.clone(),
        );
        registry.register_with_unit(
            "rate_limit_wait",
            "Time the replica was asked to pause for the rate limit",
            prometheus_client::registry::Unit::Seconds,
            self.rate_limit_wait_seconds.clone(),
        );
        registry.register(
            "credentials_refused",
            "1 while Hyperline refuses the API key",
            self.credentials_refused.clone(),
        );
        registry.register(
            "broker_blocked",
            "1 while the broker blocks this replica's connection (a memory or disk alarm)",
            self.broker_blocked.clone(),
        );
        registry.register(
            "ready",
            "1 while this replica is ready (what /readyz answers)",
            self.ready.clone(),
        );
        registry.register(
            "settlements_lost",
            "Acks, nacks or rejects that had no effect because the channel was gone",
            self.settlements_lost.clone(),
        );
        registry.register(
            "history_rejected",
            "Deliveries whose worker headers (cpw-*) did not verify: handled as new commands",
            self.history_rejected.clone(),
        );
        registry.register(
            "replies_dropped",
            "Events not delivered to a command's reply_to after bounded tries (the results exchange has them)",
            self.replies_dropped.clone(),
        );
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// Records one Hyperline request, made under the sampled trace
    /// `trace_id` if any.
    pub fn hyperline_request(&self, status: &'static str, took: Duration, trace_id: Option<&str>) {
        let label = StatusLabel { status };
        let observe = |requests: &Counter, latency: &LatencyHistogram| {
            requests.inc();
            latency.observe(took.as_secs_f64(), exemplar(trace_id), None);
        };
        if status == ANSWERED {
            let (requests, latency) = self.hot.answered.get_or_init(|| {
                (
                    self.hyperline_requests.get_or_create_owned(&label),
                    self.hyperline_latency.get_or_create_owned(&label),
                )
            });
            observe(requests, latency);
        } else {
            observe(
                &self.hyperline_requests.get_or_create(&label),
                &self.hyperline_latency.get_or_create(&label),
            );
        }
    }

    /// Counts a final outcome.
    pub fn outcome(&self, labels: OutcomeLabels) {
        if labels == SUCCEEDED {
            self.hot
                .succeeded
                .get_or_init(|| self.outcomes.get_or_create_owned(&labels))
                .inc();
        } else {
            self.outcomes.get_or_create(&labels).inc();
        }
    }

    /// Records the processing of one delivery, made under the sampled trace
    /// `trace_id` if any.
    pub fn observe_processing(&self, took: Duration, trace_id: Option<&str>) {
        self.processing
            .observe(took.as_secs_f64(), exemplar(trace_id), None);
    }

    /// Records a pause of the replica.
    pub fn rate_limit_wait(&self, wait: Duration) {
        self.rate_limit_waits.inc();
        self.rate_limit_wait_seconds.inc_by(wait.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handles_kept_for_a_charge_count_in_their_families() {
        let m = Metrics::new();
        assert!(
            !m.encode().contains("type=\"succeeded\""),
            "a label set appears once used, not before"
        );
        for _ in 0..2 {
            m.outcome(SUCCEEDED);
            m.hyperline_request("2xx", Duration::from_millis(20), None);
        }
        m.outcome(OutcomeLabels {
            r#type: "failed",
            code: "rejected",
        });
        let text = m.encode();
        for line in [
            "cpw_outcomes_total{type=\"succeeded\",code=\"\"} 2",
            "cpw_outcomes_total{type=\"failed\",code=\"rejected\"} 1",
            "cpw_hyperline_requests_total{status=\"2xx\"} 2",
            "cpw_hyperline_request_duration_seconds_count{status=\"2xx\"} 2",
        ] {
            assert!(text.contains(line), "{line} in:\n{text}");
        }
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        let m = Metrics::new();
        m.commands_received.inc();
        m.outcomes
            .get_or_create(&OutcomeLabels {
                r#type: "failed",
                code: "rejected",
            })
            .inc();
        m.hyperline_request("2xx", Duration::from_millis(20), None);
        m.rate_limit_wait(Duration::from_secs(2));
        let text = m.encode();
        for line in [
            "cpw_commands_received_total 1",
            "cpw_outcomes_total{type=\"failed\",code=\"rejected\"} 1",
            "cpw_hyperline_requests_total{status=\"2xx\"} 1",
            "cpw_hyperline_request_duration_seconds_count{status=\"2xx\"} 1",
            "cpw_rate_limit_waits_total 1",
            "cpw_rate_limit_wait_seconds_total 2.0",
            "cpw_in_flight_commands 0",
            "cpw_credentials_refused 0",
            "cpw_broker_blocked 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn latencies_carry_the_trace_of_a_sampled_observation() {
        let m = Metrics::new();
        let trace = "0af7651916cd43dd8448eb211c80319c";
        m.hyperline_request("2xx", Duration::from_millis(20), Some(trace));
        m.observe_processing(Duration::from_millis(30), Some(trace));
        m.observe_processing(Duration::from_secs(2), None);
        let text = m.encode();
        let exemplars: Vec<&str> = text.lines().filter(|l| l.contains(" # {")).collect();
        assert_eq!(exemplars.len(), 2, "{text}");
        for line in exemplars {
            assert!(
                line.contains(&format!("# {{trace_id=\"{trace}\"}}")),
                "{line}"
            );
        }
    }
}
