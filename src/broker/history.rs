//! What the worker learned about a command, carried by the command itself.
//!
//! A command can come back to the worker many times: from a delay queue, after
//! a credential pause, after an event the broker refused, after its
//! delivery count neared the broker's limit. Between those deliveries the
//! only memory is the message, so everything that must survive (how many
//! requests were made, when the first one left, which delay step it is at,
//! an outcome already decided) travels in our `cpw-*` headers. They are read
//! once per delivery into a [`DeliveryHistory`] and written back by one rule,
//! [`DeliveryHistory::stamp`], on every copy: a path that forgets one header
//! forgets, say, the start of the 24-hour idempotency window, and a late
//! retry then charges twice.

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use super::publish::{header_str, header_u64};

/// HTTP requests made for the command, across its deliveries.
pub const ATTEMPTS_HEADER: &str = "cpw-attempts";
/// The number of delay steps the command went through.
pub const STEP_HEADER: &str = "cpw-redelivery-step";
/// Unix milliseconds of the command's first request that may have charged:
/// the start of its 24-hour idempotency window.
pub const FIRST_ATTEMPT_HEADER: &str = "cpw-first-attempt-ms";
/// Unix milliseconds of the command's latest request.
pub const LAST_ATTEMPT_HEADER: &str = "cpw-last-attempt-ms";
/// The HTTP status of the latest answer.
pub const LAST_STATUS_HEADER: &str = "cpw-last-status";
/// How often the command was copied back to the commands queue because its
/// deliveries neared the broker's limit.
pub const REFRESH_HEADER: &str = "cpw-refreshes";
/// How often the command was put back for a reason outside itself (its
/// event or its copy refused by the broker); it paces the next wait.
pub const SETBACKS_HEADER: &str = "cpw-setbacks";
/// The event already decided for the command but not yet confirmed by the
/// broker (its JSON): the next delivery publishes it instead of calling the
/// API again.
pub const OUTCOME_HEADER: &str = "cpw-outcome";
/// On a dead letter: the worker's error code.
pub const ERROR_CODE_HEADER: &str = "cpw-error-code";
/// On a dead letter: Unix milliseconds of the moment the worker dead-lettered it.
pub const DEAD_LETTERED_HEADER: &str = "cpw-dead-lettered-ms";
/// On a dead letter: the replica (connection name) that dead-lettered it.
pub const REPLICA_HEADER: &str = "cpw-replica";
/// On a dead letter: the queue it was consumed from.
pub const QUEUE_HEADER: &str = "cpw-queue";

/// The header a quorum queue puts on a redelivered message.
const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// Headers the broker adds when it dead-letters or redelivers a message. A
/// copy we publish must not carry them: brokers before 4.0.1 silently drop a
/// message that comes back to a queue it was dead-lettered from, with no
/// rejection in between (the cycle detection that lost Celery's retries).
pub const BROKER_HISTORY_HEADERS: [&str; 8] = [
    "x-death",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-first-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-last-death-exchange",
    DELIVERY_COUNT_HEADER,
];

/// Where a dead letter came from, stamped on it so `dead-letters` can tell
/// why it died without guessing from the body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeathMark<'a> {
    /// The worker's error code.
    pub code: &'a str,
    /// Unix milliseconds of the decision.
    pub at_ms: u64,
    /// The replica that made it.
    pub replica: &'a str,
    /// The queue the command was consumed from.
    pub queue: &'a str,
}

/// The history of one command, as far as the worker knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeliveryHistory {
    /// HTTP requests made, across deliveries.
    pub attempts: u32,
    /// Start of the idempotency window (Unix ms), once a request may have charged.
    pub first_attempt_ms: Option<u64>,
    /// The latest request (Unix ms).
    pub last_attempt_ms: Option<u64>,
    /// The latest HTTP status.
    pub last_status: Option<u16>,
    /// Delay steps used.
    pub step: u32,
    /// Copies made because the delivery count neared the broker's limit.
    pub refreshes: u32,
    /// Returns for reasons outside the command.
    pub setbacks: u32,
    /// The broker's delivery count of this delivery (never stamped: the
    /// broker counts, and a copy starts again from zero).
    pub deliveries: u64,
    /// An event decided but not confirmed (JSON).
    pub outcome: Option<String>,
}

fn small(headers: Option<&FieldTable>, key: &str) -> u32 {
    header_u64(headers, key).map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
}

fn is_ours(key: &str) -> bool {
    key.starts_with("cpw-")
}

/// The headers of `original` without the broker's history and without ours.
fn foreign(original: Option<&FieldTable>) -> FieldTable {
    let mut headers = FieldTable::default();
    for (k, v) in original.map(FieldTable::inner).into_iter().flatten() {
        if !BROKER_HISTORY_HEADERS.contains(&k.as_str()) && !is_ours(k.as_str()) {
            headers.insert(k.clone(), v.clone());
        }
    }
    headers
}

fn put_u64(headers: &mut FieldTable, key: &str, value: u64) {
    headers.insert(
        ShortString::from(key),
        AMQPValue::LongLongInt(i64::try_from(value).unwrap_or(i64::MAX)),
    );
}

fn put_str(headers: &mut FieldTable, key: &str, value: &str) {
    headers.insert(
        ShortString::from(key),
        AMQPValue::LongString(LongString::from(value)),
    );
}

impl DeliveryHistory {
    /// Reads a delivery's headers. Whatever a header holds, this never
    /// fails: a missing or hostile value reads as "not known".
    pub fn read(headers: Option<&FieldTable>) -> Self {
        DeliveryHistory {
            attempts: small(headers, ATTEMPTS_HEADER),
            first_attempt_ms: header_u64(headers, FIRST_ATTEMPT_HEADER),
            last_attempt_ms: header_u64(headers, LAST_ATTEMPT_HEADER),
            last_status: header_u64(headers, LAST_STATUS_HEADER)
                .and_then(|s| u16::try_from(s).ok()),
            step: small(headers, STEP_HEADER),
            refreshes: small(headers, REFRESH_HEADER),
            setbacks: small(headers, SETBACKS_HEADER),
            deliveries: header_u64(headers, DELIVERY_COUNT_HEADER).unwrap_or(0),
            outcome: header_str(headers, OUTCOME_HEADER),
        }
    }

    /// The headers of a copy: the original's own headers (a `traceparent`,
    /// a publisher's), without the broker's history, with this history.
    pub fn stamp(&self, original: Option<&FieldTable>) -> FieldTable {
        let mut headers = foreign(original);
        let counters = [
            (ATTEMPTS_HEADER, self.attempts),
            (STEP_HEADER, self.step),
            (REFRESH_HEADER, self.refreshes),
            (SETBACKS_HEADER, self.setbacks),
        ];
        for (key, value) in counters {
            if value > 0 {
                put_u64(&mut headers, key, u64::from(value));
            }
        }
        let times = [
            (FIRST_ATTEMPT_HEADER, self.first_attempt_ms),
            (LAST_ATTEMPT_HEADER, self.last_attempt_ms),
            (LAST_STATUS_HEADER, self.last_status.map(u64::from)),
        ];
        for (key, value) in times {
            if let Some(value) = value {
                put_u64(&mut headers, key, value);
            }
        }
        if let Some(outcome) = &self.outcome {
            put_str(&mut headers, OUTCOME_HEADER, outcome);
        }
        headers
    }

    /// [`DeliveryHistory::stamp`] plus why, when and where it died.
    pub fn stamp_dead(&self, original: Option<&FieldTable>, mark: &DeathMark<'_>) -> FieldTable {
        let mut headers = self.stamp(original);
        put_str(&mut headers, ERROR_CODE_HEADER, mark.code);
        put_u64(&mut headers, DEAD_LETTERED_HEADER, mark.at_ms);
        put_str(&mut headers, REPLICA_HEADER, mark.replica);
        put_str(&mut headers, QUEUE_HEADER, mark.queue);
        headers
    }

    /// The headers of a command given a fresh start (`dead-letters replay`):
    /// neither the broker's history nor ours, except the start of the
    /// idempotency window, which no replay may forget.
    pub fn fresh_start(original: Option<&FieldTable>, first_attempt_ms: Option<u64>) -> FieldTable {
        let mut headers = foreign(original);
        if let Some(first) = first_attempt_ms {
            put_u64(&mut headers, FIRST_ATTEMPT_HEADER, first);
        }
        headers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in entries {
            t.insert(ShortString::from(*k), v.clone());
        }
        t
    }

    #[test]
    fn a_stamped_copy_reads_back_the_same_history() {
        let history = DeliveryHistory {
            attempts: 7,
            first_attempt_ms: Some(1_700_000_000_000),
            last_attempt_ms: Some(1_700_000_100_000),
            last_status: Some(503),
            step: 2,
            refreshes: 1,
            setbacks: 3,
            deliveries: 0,
            outcome: Some("{\"schema\":1}".into()),
        };
        let headers = history.stamp(None);
        assert_eq!(DeliveryHistory::read(Some(&headers)), history);
    }

    #[test]
    fn a_copy_drops_the_brokers_history_and_keeps_the_publishers_headers() {
        let original = table(&[
            ("x-death", AMQPValue::LongString("d".into())),
            ("x-first-death-queue", AMQPValue::LongString("q".into())),
            ("x-delivery-count", AMQPValue::LongLongInt(4)),
            ("cpw-attempts", AMQPValue::LongLongInt(99)),
            ("traceparent", AMQPValue::LongString("00-ab".into())),
        ]);
        let history = DeliveryHistory::read(Some(&original));
        assert_eq!((history.attempts, history.deliveries), (99, 4));
        let copy = DeliveryHistory {
            attempts: 100,
            ..history
        }
        .stamp(Some(&original));
        let mut keys: Vec<_> = copy.inner().keys().map(|k| k.as_str().to_owned()).collect();
        keys.sort();
        assert_eq!(keys, ["cpw-attempts", "traceparent"]);
        assert_eq!(header_u64(Some(&copy), ATTEMPTS_HEADER), Some(100));
    }

    #[test]
    fn hostile_headers_read_as_bounded_or_unknown() {
        let original = table(&[
            (ATTEMPTS_HEADER, AMQPValue::LongLongInt(i64::MAX)),
            (REFRESH_HEADER, AMQPValue::LongLongInt(-5)),
            (LAST_STATUS_HEADER, AMQPValue::LongLongInt(70_000)),
            (STEP_HEADER, AMQPValue::LongString("two".into())),
            ("x-delivery-count", AMQPValue::LongLongInt(i64::MAX)),
        ]);
        let h = DeliveryHistory::read(Some(&original));
        assert_eq!(
            (h.attempts, h.refreshes, h.last_status, h.step),
            (u32::MAX, 0, None, 0)
        );
        assert_eq!(h.deliveries, i64::MAX as u64);
    }

    #[test]
    fn a_fresh_start_keeps_only_the_window() {
        let original = table(&[
            (ATTEMPTS_HEADER, AMQPValue::LongLongInt(9)),
            (OUTCOME_HEADER, AMQPValue::LongString("{}".into())),
            ("x-death", AMQPValue::LongString("d".into())),
            ("traceparent", AMQPValue::LongString("00-ab".into())),
        ]);
        let fresh = DeliveryHistory::fresh_start(Some(&original), Some(5));
        let mut keys: Vec<_> = fresh
            .inner()
            .keys()
            .map(|k| k.as_str().to_owned())
            .collect();
        keys.sort();
        assert_eq!(keys, [FIRST_ATTEMPT_HEADER, "traceparent"]);
    }

    #[test]
    fn a_dead_letter_says_why_when_and_where() {
        let mark = DeathMark {
            code: "unexpected_response",
            at_ms: 42,
            replica: "worker@a",
            queue: "credit-purchases",
        };
        let headers = DeliveryHistory::default().stamp_dead(None, &mark);
        assert_eq!(
            header_str(Some(&headers), ERROR_CODE_HEADER).as_deref(),
            Some("unexpected_response")
        );
        assert_eq!(header_u64(Some(&headers), DEAD_LETTERED_HEADER), Some(42));
        assert_eq!(
            header_str(Some(&headers), REPLICA_HEADER).as_deref(),
            Some("worker@a")
        );
    }
}
