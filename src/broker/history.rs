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
//!
//! Headers are whatever the publisher says, so the memory is believed only
//! when its MAC verifies ([`seal`](super::seal)): a publisher who copies or
//! invents `cpw-*` headers gets a command read as never seen before.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use super::publish::{header_str, header_u64};
use super::seal::{HistoryKeys, Provenance, is_ours};
use crate::contract::OutcomeFacts;

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
/// The facts of the outcome already decided for the command but not yet
/// confirmed by the broker (JSON of [`OutcomeFacts`]): the next delivery
/// publishes its event, rebuilt from the command's own body, instead of
/// calling the API again.
pub const OUTCOME_HEADER: &str = "cpw-outcome";
/// Unix milliseconds before which a request of the command may have been
/// made that no history records: set when a worn delivery is refreshed (its
/// earlier deliveries ended without an outcome, perhaps killed mid-request),
/// kept at its earliest. The first request is then unknown: the 24-hour
/// guard and the dead letter must not take the recorded one for it.
pub const UNRECORDED_BEFORE_HEADER: &str = "cpw-unrecorded-before-ms";
/// On a dead letter: the worker's error code.
pub const ERROR_CODE_HEADER: &str = "cpw-error-code";
/// On a dead letter: Unix milliseconds of the moment the worker dead-lettered it.
pub const DEAD_LETTERED_HEADER: &str = "cpw-dead-lettered-ms";
/// On a dead letter: the replica (connection name) that dead-lettered it.
pub const REPLICA_HEADER: &str = "cpw-replica";
/// On a dead letter: the queue it was consumed from.
pub const QUEUE_HEADER: &str = "cpw-queue";

/// The header a quorum queue puts on a redelivered message.
pub const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// The broker's delivery count of a dead letter, kept under this name when
/// `dead-letters` puts the letter back as a fresh copy (which must not
/// carry `x-delivery-count`): the proof that it was delivered to a worker.
/// Unsigned, as the count is: it can only make the tools more careful.
pub const DELIVERED_COUNT_HEADER: &str = "x-cpw-delivery-count";

/// Headers the broker adds when it dead-letters or redelivers a message. A
/// copy we publish must not carry them: brokers before 4.0.1 silently drop a
/// message that comes back to a queue it was dead-lettered from, with no
/// rejection in between (the cycle detection that lost Celery's retries).
pub const BROKER_HISTORY_HEADERS: [&str; 9] = [
    "x-death",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-first-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-last-death-exchange",
    DELIVERY_COUNT_HEADER,
    DELIVERED_COUNT_HEADER,
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
    /// A request may have been made before this moment (Unix ms) that no
    /// history records ([`UNRECORDED_BEFORE_HEADER`]).
    pub unrecorded_before_ms: Option<u64>,
    /// Returns for reasons outside the command.
    pub setbacks: u32,
    /// The broker's delivery count of this delivery (never stamped: the
    /// broker counts, and a copy starts again from zero).
    pub deliveries: u64,
    /// The publisher's `timestamp` property, in Unix ms (never stamped: a
    /// copy keeps the property itself). The publisher's word: only ever a
    /// lower bound of the first request, never proof of anything else.
    pub published_ms: Option<u64>,
    /// An outcome decided but not confirmed.
    pub outcome: Option<OutcomeFacts>,
}

/// The parts of a message its memory is bound to: memory lifted from one
/// message does not verify on another.
#[derive(Clone, Copy, Debug)]
pub struct Message<'a> {
    pub headers: Option<&'a FieldTable>,
    /// The body, as published.
    pub body: &'a [u8],
    /// The `message_id` property.
    pub message_id: Option<&'a str>,
}

impl<'a> Message<'a> {
    /// The parts of a delivered message.
    pub fn of(properties: &'a BasicProperties, body: &'a [u8]) -> Self {
        Message {
            headers: properties.headers().as_ref(),
            body,
            message_id: properties.message_id().as_ref().map(|m| m.as_str()),
        }
    }
}

fn small(headers: Option<&FieldTable>, key: &str) -> u32 {
    header_u64(headers, key).map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
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

/// The properties of a copy of `original` (a delay step, a park, a dead
/// letter, a replay) with `headers`, persistent. Two of the publisher's
/// properties are dropped:
/// - `expiration`: a dead letter that inherits a command's TTL expires from
///   `<queue>.dead`, the one record of a charge that may have happened
///   (RabbitMQ itself drops it when it dead-letters), and a delay step's
///   copy could expire before its step;
/// - `user_id`: RabbitMQ checks it against the publishing connection's user,
///   so the worker's copy of another user's command would be refused
///   (PRECONDITION_FAILED) and the command would skip its delay.
pub fn copy_properties(original: &BasicProperties, headers: FieldTable) -> BasicProperties {
    let mut props = BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(2);
    let o = original;
    let text = [
        (
            o.content_type(),
            BasicProperties::with_content_type as fn(_, _) -> _,
        ),
        (o.content_encoding(), BasicProperties::with_content_encoding),
        (o.correlation_id(), BasicProperties::with_correlation_id),
        (o.reply_to(), BasicProperties::with_reply_to),
        (o.message_id(), BasicProperties::with_message_id),
        (o.kind(), BasicProperties::with_type),
        (o.app_id(), BasicProperties::with_app_id),
        (o.cluster_id(), BasicProperties::with_cluster_id),
    ];
    for (value, with) in text {
        if let Some(value) = value {
            props = with(props, value.clone());
        }
    }
    if let Some(priority) = *o.priority() {
        props = props.with_priority(priority);
    }
    if let Some(timestamp) = *o.timestamp() {
        props = props.with_timestamp(timestamp);
    }
    props
}

impl DeliveryHistory {
    /// Reads a delivery's memory, believed only when `keys` verify it:
    /// anything else reads as a command never seen before (the broker's
    /// delivery count aside, which the broker writes). Whatever a header
    /// holds, this never fails: a hostile value reads as "not known".
    pub fn read(message: Message<'_>, keys: Option<&HistoryKeys>) -> (Self, Provenance) {
        let headers = message.headers;
        let deliveries = header_u64(headers, DELIVERY_COUNT_HEADER).unwrap_or(0);
        let provenance = HistoryKeys::provenance(keys, headers, message.body, message.message_id);
        if provenance != Provenance::Verified {
            let blank = DeliveryHistory {
                deliveries,
                ..DeliveryHistory::default()
            };
            return (blank, provenance);
        }
        let history = DeliveryHistory {
            attempts: small(headers, ATTEMPTS_HEADER),
            first_attempt_ms: header_u64(headers, FIRST_ATTEMPT_HEADER),
            last_attempt_ms: header_u64(headers, LAST_ATTEMPT_HEADER),
            last_status: header_u64(headers, LAST_STATUS_HEADER)
                .and_then(|s| u16::try_from(s).ok()),
            step: small(headers, STEP_HEADER),
            refreshes: small(headers, REFRESH_HEADER),
            unrecorded_before_ms: header_u64(headers, UNRECORDED_BEFORE_HEADER),
            setbacks: small(headers, SETBACKS_HEADER),
            deliveries,
            // A property, not memory: the handler reads it.
            published_ms: None,
            outcome: header_str(headers, OUTCOME_HEADER)
                .and_then(|json| serde_json::from_str(&json).ok()),
        };
        (history, provenance)
    }

    /// The headers of a copy: the original's own headers (a `traceparent`,
    /// a publisher's), without the broker's history, with this history,
    /// sealed.
    /// A history with nothing to remember writes no header of ours at all:
    /// the copy reads as a command never seen, which it is.
    pub fn stamp(&self, original: Message<'_>, keys: &HistoryKeys) -> FieldTable {
        let mut headers = self.unsealed(original.headers);
        if headers.inner().keys().any(|k| is_ours(k.as_str())) {
            keys.seal(&mut headers, original.body, original.message_id);
        }
        headers
    }

    fn unsealed(&self, original: Option<&FieldTable>) -> FieldTable {
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
            (UNRECORDED_BEFORE_HEADER, self.unrecorded_before_ms),
        ];
        for (key, value) in times {
            if let Some(value) = value {
                put_u64(&mut headers, key, value);
            }
        }
        if let Some(json) = self
            .outcome
            .as_ref()
            .and_then(|o| serde_json::to_string(o).ok())
        {
            put_str(&mut headers, OUTCOME_HEADER, &json);
        }
        headers
    }

    /// [`DeliveryHistory::stamp`] plus why, when and where it died.
    pub fn stamp_dead(
        &self,
        original: Message<'_>,
        mark: &DeathMark<'_>,
        keys: &HistoryKeys,
    ) -> FieldTable {
        let mut headers = self.unsealed(original.headers);
        put_str(&mut headers, ERROR_CODE_HEADER, mark.code);
        put_u64(&mut headers, DEAD_LETTERED_HEADER, mark.at_ms);
        put_str(&mut headers, REPLICA_HEADER, mark.replica);
        put_str(&mut headers, QUEUE_HEADER, mark.queue);
        keys.seal(&mut headers, original.body, original.message_id);
        headers
    }

    /// The headers of a command given a fresh start (`dead-letters replay`):
    /// neither the broker's history nor ours, except the start of the
    /// idempotency window, which no replay may forget.
    pub fn fresh_start(
        original: Message<'_>,
        first_attempt_ms: Option<u64>,
        keys: &HistoryKeys,
    ) -> FieldTable {
        let fresh = DeliveryHistory {
            first_attempt_ms,
            ..DeliveryHistory::default()
        };
        fresh.stamp(original, keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{EventKind, OutcomeFacts};

    fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in entries {
            t.insert(ShortString::from(*k), v.clone());
        }
        t
    }

    fn keys() -> HistoryKeys {
        HistoryKeys::derived(b"test key")
    }

    fn message(headers: Option<&FieldTable>) -> Message<'_> {
        Message {
            headers,
            body: b"{}",
            message_id: Some("m"),
        }
    }

    fn read(headers: &FieldTable) -> (DeliveryHistory, Provenance) {
        DeliveryHistory::read(message(Some(headers)), Some(&keys()))
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
            unrecorded_before_ms: Some(1_699_999_000_000),
            setbacks: 3,
            deliveries: 0,
            published_ms: None,
            outcome: Some(OutcomeFacts {
                kind: EventKind::Succeeded,
                invoice_id: Some("inv_1".into()),
                new_credit_balance: Some(32),
                ..OutcomeFacts::example()
            }),
        };
        let headers = history.stamp(message(None), &keys());
        assert_eq!(read(&headers), (history, Provenance::Verified));
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
        let copy = DeliveryHistory {
            attempts: 100,
            ..DeliveryHistory::default()
        }
        .stamp(message(Some(&original)), &keys());
        let mut keys: Vec<_> = copy.inner().keys().map(|k| k.as_str().to_owned()).collect();
        keys.sort();
        assert_eq!(keys, ["cpw-attempts", "cpw-mac", "traceparent"]);
        assert_eq!(header_u64(Some(&copy), ATTEMPTS_HEADER), Some(100));
    }

    #[test]
    fn memory_that_does_not_verify_reads_as_a_new_command() {
        let forged = table(&[
            (ATTEMPTS_HEADER, AMQPValue::LongLongInt(9)),
            (FIRST_ATTEMPT_HEADER, AMQPValue::LongLongInt(0)),
            (OUTCOME_HEADER, AMQPValue::LongString("{}".into())),
            ("x-delivery-count", AMQPValue::LongLongInt(4)),
        ]);
        let (history, provenance) = read(&forged);
        assert_eq!(provenance, Provenance::Rejected);
        assert_eq!(
            history,
            DeliveryHistory {
                deliveries: 4,
                ..DeliveryHistory::default()
            }
        );
        // A real copy's memory, moved onto another command's body.
        let real = DeliveryHistory {
            attempts: 2,
            ..DeliveryHistory::default()
        }
        .stamp(message(None), &keys());
        let moved = Message {
            headers: Some(&real),
            body: b"{\"command_id\":\"other\"}",
            message_id: Some("m"),
        };
        let (history, provenance) = DeliveryHistory::read(moved, Some(&keys()));
        assert_eq!((history.attempts, provenance), (0, Provenance::Rejected));
    }

    #[test]
    fn hostile_values_in_verified_memory_read_as_bounded_or_unknown() {
        let mut original = table(&[
            (ATTEMPTS_HEADER, AMQPValue::LongLongInt(i64::MAX)),
            (REFRESH_HEADER, AMQPValue::LongLongInt(-5)),
            (LAST_STATUS_HEADER, AMQPValue::LongLongInt(70_000)),
            (OUTCOME_HEADER, AMQPValue::LongString("not json".into())),
        ]);
        keys().seal(&mut original, b"{}", Some("m"));
        original.insert("x-delivery-count".into(), AMQPValue::LongLongInt(i64::MAX));
        let (h, provenance) = read(&original);
        assert_eq!(provenance, Provenance::Verified);
        assert_eq!(
            (h.attempts, h.refreshes, h.last_status, h.outcome),
            (u32::MAX, 0, None, None)
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
        let fresh = DeliveryHistory::fresh_start(message(Some(&original)), Some(5), &keys());
        let mut names: Vec<_> = fresh
            .inner()
            .keys()
            .map(|k| k.as_str().to_owned())
            .collect();
        names.sort();
        assert_eq!(names, [FIRST_ATTEMPT_HEADER, "cpw-mac", "traceparent"]);
        assert_eq!(read(&fresh).0.first_attempt_ms, Some(5));
    }

    #[test]
    fn a_copy_keeps_the_publishers_properties_but_its_ttl_and_user() {
        let original = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id("m".into())
            .with_correlation_id("c".into())
            .with_reply_to("r".into())
            .with_priority(3)
            .with_timestamp(7)
            .with_type("t".into())
            .with_app_id("a".into())
            .with_expiration("6000".into())
            .with_user_id("alice".into())
            .with_delivery_mode(1);
        let copy = copy_properties(&original, FieldTable::default());
        let expected = original
            .clone()
            .with_delivery_mode(2)
            .with_headers(FieldTable::default());
        assert_eq!(copy.expiration(), &None);
        assert_eq!(copy.user_id(), &None);
        assert_eq!(
            (
                copy.content_type(),
                copy.message_id(),
                copy.reply_to(),
                copy.priority()
            ),
            (
                expected.content_type(),
                expected.message_id(),
                expected.reply_to(),
                expected.priority()
            )
        );
        assert_eq!(
            (
                copy.timestamp(),
                copy.kind(),
                copy.app_id(),
                copy.correlation_id()
            ),
            (
                expected.timestamp(),
                expected.kind(),
                expected.app_id(),
                expected.correlation_id()
            )
        );
        assert_eq!(copy.delivery_mode(), &Some(2));
    }

    #[test]
    fn a_dead_letter_says_why_when_and_where() {
        let mark = DeathMark {
            code: "unexpected_response",
            at_ms: 42,
            replica: "worker@a",
            queue: "credit-purchases",
        };
        let headers = DeliveryHistory::default().stamp_dead(message(None), &mark, &keys());
        assert_eq!(read(&headers).1, Provenance::Verified);
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
