//! What can be read off one dead letter: why and when it died, which command
//! it is, and where its 24-hour idempotency window started.
//!
//! RabbitMQ records a dead letter's history in headers (`x-death`, an array of
//! tables, most recent first; `x-first-death-*`), and the worker adds its own
//! (`cpw-*`). Both `list` and `replay` need the same reading, and `replay`
//! needs the opposite too: a copy stripped of that history, so the worker
//! gives it a fresh retry budget and the broker does not take it for a
//! dead-letter cycle.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde::Serialize;

use crate::broker::history::{
    DEAD_LETTERED_HEADER, DELIVERED_COUNT_HEADER, DELIVERY_COUNT_HEADER, ERROR_CODE_HEADER,
    QUEUE_HEADER, REPLICA_HEADER,
};
use crate::broker::{
    DeliveryHistory, HistoryKeys, Message, Provenance, copy_properties, header_str, header_u64,
};
use crate::configuration::IDEMPOTENCY_WINDOW;
use crate::contract::{Command, ErrorCode};

/// Besides the worker's in-process budget, how much younger than 24 hours a
/// command must be to be replayed without `--force`: the copy may wait in a
/// backlog before a worker takes it.
pub const REPLAY_MARGIN: Duration = Duration::from_secs(60 * 60);

/// One dead letter, as `list` shows it (`--json` prints exactly this).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct DeadLetterInfo {
    /// The body's `command_id`, else the `message_id`.
    pub command_id: Option<String>,
    /// Why the broker dead-lettered it on its own (`expired`,
    /// `delivery_limit`, `maxlen`), from the latest `x-death` entry. Absent
    /// for a letter the worker rejected or dead-lettered: its `error_code`
    /// says why, in one field.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_reason: Option<String>,
    /// The queue it was consumed from (the worker's stamp) or died in.
    pub queue: Option<String>,
    /// When it first died (RFC 3339, UTC): the worker's stamp, else the
    /// earliest `x-death` entry.
    pub died_at: Option<String>,
    /// How many times it died there for its latest reason (`x-death` only).
    pub count: Option<u64>,
    /// The worker's error code: its stamp (`cpw-error-code`), else what the
    /// message alone tells (an unparseable body is `invalid_command`; a
    /// command that went through every delay step is `retries_exhausted`).
    pub error_code: Option<&'static str>,
    /// Why the body is not a valid command, when it is not.
    pub invalid_reason: Option<String>,
    /// What the code means for this letter, in words: what went wrong and
    /// which tool settles it.
    pub detail: Option<String>,
    /// The HTTP status of the latest answer (`cpw-last-status`).
    pub last_status: Option<u16>,
    /// HTTP requests made for it, per the worker (`cpw-attempts`).
    pub attempts: Option<u64>,
    /// When its first request that may have charged was made (RFC 3339,
    /// `cpw-first-attempt-ms`); empty when its first request is unknown.
    pub first_attempt: Option<String>,
    /// When its latest request was made (RFC 3339, `cpw-last-attempt-ms`).
    pub last_attempt: Option<String>,
    /// Delivered to a worker at least once with no first request recorded
    /// before its deliveries: a request may have charged before
    /// [`DeadLetterInfo::unrecorded_before`], and its first request (the
    /// start of its window) is unknown. Never "no request could have charged".
    pub first_request_unknown: bool,
    /// When it is: the moment before which a request no history records may
    /// have been made (RFC 3339): the worker's stamp (`cpw-unrecorded-before-ms`),
    /// else its death.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unrecorded_before: Option<String>,
    /// The replica (broker connection name) that dead-lettered it.
    pub replica: Option<String>,
    /// Unix milliseconds of [`DeadLetterInfo::first_attempt`].
    #[serde(skip)]
    pub first_attempt_ms: Option<u64>,
    /// Unix milliseconds of [`DeadLetterInfo::unrecorded_before`].
    #[serde(skip)]
    pub unrecorded_before_ms: Option<u64>,
    /// Unix milliseconds of [`DeadLetterInfo::died_at`].
    #[serde(skip)]
    pub died_ms: Option<u64>,
    /// Dead-lettered by the worker with its history stamped on: without a
    /// first attempt, no request that may have charged was ever made.
    #[serde(skip)]
    pub stamped: bool,
}

/// Reads a dead letter. `delay_steps` is the number of configured
/// redelivery steps, to recognise a command that used them all.
/// Its memory is believed only when `keys` verify it.
pub fn inspect(
    body: &[u8],
    properties: &BasicProperties,
    delay_steps: usize,
    keys: Option<&HistoryKeys>,
) -> DeadLetterInfo {
    let headers = properties.headers().as_ref();
    let message_id = properties.message_id().as_ref().map(|m| m.as_str());
    let parsed = Command::parse(body, message_id);
    let (command_id, invalid_reason) = match &parsed {
        Ok(command) => (Some(command.id.as_str().to_owned()), None),
        Err(e) => (e.raw.command_id.clone(), Some(e.reason.to_string())),
    };
    let deaths = deaths(headers);
    let latest = deaths.first();
    let (history, provenance) = DeliveryHistory::read(Message::of(properties, body), keys);
    // The stamp is the worker's word only when its MAC verifies.
    let ours = provenance == Provenance::Verified;
    let stamped_code = header_str(headers, ERROR_CODE_HEADER).filter(|_| ours);
    let dead_lettered_ms = header_u64(headers, DEAD_LETTERED_HEADER).filter(|_| ours);
    let guessed_code = match &parsed {
        Err(_) => Some(ErrorCode::InvalidCommand),
        Ok(_) if delay_steps > 0 && history.step as usize >= delay_steps => {
            Some(ErrorCode::RetriesExhausted)
        }
        Ok(_) => None,
    };
    let error_code = stamped_code
        .as_deref()
        .and_then(ErrorCode::parse)
        .or(guessed_code)
        .map(ErrorCode::as_str);
    let earliest_death = deaths.iter().filter_map(|d| d.time_secs).min();
    let stamped = dead_lettered_ms.is_some();
    let died_ms = earliest_death
        .map(|s| s.saturating_mul(1000))
        .into_iter()
        .chain(dead_lettered_ms)
        .min();
    // An invalid body never reaches Hyperline, however often delivered.
    let unrecorded_before_ms = parsed
        .is_ok()
        .then(|| unrecorded_before(&history, headers, &deaths, died_ms))
        .flatten();
    // `rejected` is the worker's own reject, whose why is the code.
    let broker_reason = latest
        .and_then(|d| d.reason.clone())
        .or_else(|| header_str(headers, "x-first-death-reason"))
        .filter(|r| !stamped && r != "rejected");
    // When its first request is unknown, no estimate stands in for it.
    let first_attempt_ms = history
        .first_attempt_ms
        .filter(|_| unrecorded_before_ms.is_none());
    DeadLetterInfo {
        command_id,
        broker_reason: broker_reason.clone(),
        queue: header_str(headers, QUEUE_HEADER)
            .or_else(|| latest.and_then(|d| d.queue.clone()))
            .or_else(|| header_str(headers, "x-first-death-queue")),
        died_at: died_ms.and_then(crate::clock::rfc3339_ms),
        count: latest.and_then(|d| d.count),
        detail: invalid_reason.clone().or_else(|| {
            let charge = match (unrecorded_before_ms, history.first_attempt_ms) {
                (Some(before), _) => Charge::Unknown(before),
                (None, Some(_)) => Charge::Recorded,
                (None, None) => Charge::NoRequest,
            };
            match error_code {
                Some(code) => explain(code, history.last_status, charge),
                None => unrecorded_before_ms.map(|before| {
                    let why = broker_reason.as_deref().unwrap_or("dead-lettered");
                    let lead = format!(
                        "broker: {why}; it may have been delivered to a worker whose request \
                         was cut short"
                    );
                    unknown_first(before, &lead)
                }),
            }
        }),
        error_code,
        invalid_reason,
        last_status: history.last_status,
        attempts: (history.attempts > 0 || stamped).then_some(u64::from(history.attempts)),
        first_attempt: first_attempt_ms.and_then(crate::clock::rfc3339_ms),
        last_attempt: history.last_attempt_ms.and_then(crate::clock::rfc3339_ms),
        first_request_unknown: unrecorded_before_ms.is_some(),
        unrecorded_before: unrecorded_before_ms.and_then(crate::clock::rfc3339_ms),
        replica: header_str(headers, REPLICA_HEADER),
        first_attempt_ms,
        unrecorded_before_ms,
        died_ms,
        stamped,
    }
}

/// When a letter that was delivered to a worker may have had a request no
/// history records (Unix ms), when it has no recorded first request from
/// before: its first request is then unknown.
///
/// Delivered means: the worker's own stamp says so (it refreshed the command
/// or dead-lettered it as worn, `cpw-unrecorded-before-ms`; or, from a
/// worker before that stamp, `cpw-refreshes`), or the broker's does (a
/// delivery count), or the broker dead-lettered it on its own (`x-death`:
/// expired, at its delivery limit, dropped by a length limit). RabbitMQ
/// 3.10 keeps no delivery count on such a letter, so a command that expired
/// after a delivery cannot be told from one that was never delivered: any
/// of them may have been. A delivery killed mid-request records nothing, so
/// any delivery may have charged.
fn unrecorded_before(
    history: &DeliveryHistory,
    headers: Option<&FieldTable>,
    deaths: &[Death],
    died_ms: Option<u64>,
) -> Option<u64> {
    if let Some(before) = history.unrecorded_before_ms {
        return Some(before);
    }
    let counted = [DELIVERY_COUNT_HEADER, DELIVERED_COUNT_HEADER]
        .iter()
        .any(|name| header_u64(headers, name).is_some_and(|n| n > 0));
    let delivered = counted || !deaths.is_empty() || history.refreshes > 0;
    match (delivered, history.first_attempt_ms) {
        // Its deliveries came after its recorded first request.
        (_, Some(_)) | (false, None) => None,
        (true, None) => died_ms.or(Some(crate::clock::now_ms())),
    }
}

/// What is known of a letter's charge.
#[derive(Clone, Copy)]
enum Charge {
    /// A request that may have charged is recorded.
    Recorded,
    /// A request may have charged before this moment (Unix ms), no first
    /// request known.
    Unknown(u64),
    /// Never delivered with a request that may have charged.
    NoRequest,
}

/// A letter whose first request is unknown, in words, after `lead` (what
/// happened to it).
fn unknown_first(before_ms: u64, lead: &str) -> String {
    let before = crate::clock::rfc3339_ms(before_ms).unwrap_or_else(|| "-".to_owned());
    format!(
        "{lead}: a request may have charged before {before}, first request unknown \
         (dead-letters reconcile; a replay needs --force)"
    )
}

/// What a worker's code means for its letter, with the tool that settles it.
fn explain(code: &str, status: Option<u16>, charge: Charge) -> Option<String> {
    let http = status.map_or_else(|| "no answer".to_owned(), |s| format!("HTTP {s}"));
    let may_have_charged = matches!(charge, Charge::Recorded);
    if let (Charge::Unknown(before), "retries_exhausted") = (charge, code) {
        return Some(unknown_first(
            before,
            &format!(
                "transient failures or crashes outlasted the retry budget (last: {http}); \
                 delivered to workers without an outcome"
            ),
        ));
    }
    match (code, status) {
        ("unexpected_response", Some(200..=299)) => Some(format!(
            "{http} whose body is not the documented one: the charge may have happened \
             (dead-letters reconcile)"
        )),
        ("unexpected_response", _) => Some(format!(
            "{http}, an answer Hyperline does not document: the charge may have happened \
             (dead-letters reconcile)"
        )),
        ("retries_exhausted", _) if may_have_charged => Some(format!(
            "transient failures outlasted the retry budget (last: {http}); a request may have \
             charged (dead-letters reconcile)"
        )),
        ("retries_exhausted", _) => Some(format!(
            "transient failures outlasted the retry budget (last: {http}); no request could have \
             charged (dead-letters replay)"
        )),
        _ => None,
    }
}

/// One entry of `x-death`.
#[derive(Debug, Default)]
struct Death {
    reason: Option<String>,
    queue: Option<String>,
    time_secs: Option<u64>,
    count: Option<u64>,
}

/// The `x-death` entries, most recent first; empty when absent or malformed.
fn deaths(headers: Option<&FieldTable>) -> Vec<Death> {
    let Some(AMQPValue::FieldArray(entries)) = headers.and_then(|h| h.inner().get("x-death"))
    else {
        return Vec::new();
    };
    entries
        .as_slice()
        .iter()
        .filter_map(|entry| match entry {
            AMQPValue::FieldTable(t) => Some(Death {
                reason: header_str(Some(t), "reason"),
                queue: header_str(Some(t), "queue"),
                time_secs: header_u64(Some(t), "time"),
                count: header_u64(Some(t), "count"),
            }),
            _ => None,
        })
        .collect()
}

/// Whether a command may be replayed without `--force`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Window {
    /// Young enough: Hyperline still remembers its Idempotency-Key.
    Open,
    /// First attempted this long ago: too close to (or past) 24 hours.
    Closed(Duration),
    /// No `cpw-first-attempt-ms` and no worker's stamp: its age is unknown.
    Unknown,
    /// Delivered to a worker, and a request may have charged before
    /// `before_ms` that no history records: its first request is unknown.
    FirstUnknown {
        /// Unix ms.
        before_ms: u64,
    },
}

/// Judges the idempotency window at `now_ms`. `in_process_budget` is the
/// worker's own margin: it refuses a delivery whose age plus that budget
/// reaches 24 hours, so a replay it would refuse is refused here first.
pub fn window(info: &DeadLetterInfo, now_ms: u64, in_process_budget: Duration) -> Window {
    if let Some(before_ms) = info.unrecorded_before_ms {
        return Window::FirstUnknown { before_ms };
    }
    let Some(first) = info.first_attempt_ms else {
        return match info.stamped {
            true => Window::Open,
            false => Window::Unknown,
        };
    };
    let age = Duration::from_millis(now_ms.saturating_sub(first));
    let limit = IDEMPOTENCY_WINDOW.saturating_sub(REPLAY_MARGIN + in_process_budget);
    if age >= limit {
        Window::Closed(age)
    } else {
        Window::Open
    }
}

/// The properties of the copy sent back to the commands queue: the broker's
/// dead-letter history and the worker's counters are dropped, so the copy
/// starts a fresh in-process budget and is not taken for a dead-letter cycle.
/// The start of the idempotency window is kept,
/// so the worker's own 24-hour guard still holds, unless `forced`: then it is
/// dropped too, or the worker would refuse what the operator chose to force.
pub fn replay_properties(
    properties: &BasicProperties,
    body: &[u8],
    first_attempt_ms: Option<u64>,
    forced: bool,
    keys: &HistoryKeys,
) -> BasicProperties {
    let kept = first_attempt_ms.filter(|_| !forced);
    let headers = DeliveryHistory::fresh_start(Message::of(properties, body), kept, keys);
    copy_properties(properties, headers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::history::{ATTEMPTS_HEADER, FIRST_ATTEMPT_HEADER, STEP_HEADER};
    use lapin::types::{FieldArray, LongString};

    fn text(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s))
    }

    fn keys() -> HistoryKeys {
        HistoryKeys::derived(b"test key")
    }

    const ID: &str = "6f1c1f0e-4c1a-4a51-9d7e-3f5d2b8e9a10";

    /// A letter dead-lettered by the worker: its memory sealed for `body`.
    fn dead_properties(first_attempt_ms: Option<u64>, body: &[u8]) -> BasicProperties {
        let mut death = FieldTable::default();
        death.insert("reason".into(), text("rejected"));
        death.insert("queue".into(), text("credit-purchases"));
        death.insert("time".into(), AMQPValue::Timestamp(1_700_000_000));
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        let mut older = FieldTable::default();
        older.insert("reason".into(), text("expired"));
        older.insert("time".into(), AMQPValue::Timestamp(1_699_999_000));
        let mut headers = FieldTable::default();
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::FieldTable(death),
                AMQPValue::FieldTable(older),
            ])),
        );
        headers.insert("x-first-death-reason".into(), text("expired"));
        headers.insert(STEP_HEADER.into(), AMQPValue::LongLongInt(2));
        headers.insert(ATTEMPTS_HEADER.into(), AMQPValue::LongLongInt(9));
        headers.insert("traceparent".into(), text("00-abc"));
        if let Some(ms) = first_attempt_ms {
            headers.insert(
                FIRST_ATTEMPT_HEADER.into(),
                AMQPValue::LongLongInt(ms as i64),
            );
        }
        keys().seal(&mut headers, body, Some(ID));
        BasicProperties::default()
            .with_headers(headers)
            .with_message_id(ID.into())
    }

    #[test]
    fn the_latest_death_and_the_worker_headers_are_read() {
        let body = br#"{"customer_id":"cus_1","product_id":"itm_1","credit_count":1,"amount_excluding_tax":5}"#;
        let info = inspect(body, &dead_properties(None, body), 2, Some(&keys()));
        assert_eq!(
            info.command_id.as_deref(),
            Some("6f1c1f0e-4c1a-4a51-9d7e-3f5d2b8e9a10")
        );
        assert_eq!(
            info.broker_reason, None,
            "the worker's reject: its code says why"
        );
        assert_eq!(info.queue.as_deref(), Some("credit-purchases"));
        // The first death, not the latest.
        assert_eq!(info.died_at.as_deref(), Some("2023-11-14T21:56:40.000Z"));
        assert_eq!(info.count, Some(1));
        assert_eq!(info.error_code, Some("retries_exhausted"));
        assert_eq!(info.attempts, Some(9));
        // Dead-lettered by the broker with no cpw-first-attempt-ms: it may
        // have been delivered, and no death stands in for its first request.
        assert_eq!(info.first_attempt_ms, None);
        assert_eq!(info.unrecorded_before_ms, Some(1_699_999_000_000));
    }

    /// A letter as the broker dead-letters one on its own: `reason`, with
    /// these extra headers.
    fn broker_letter(reason: &str, extra: &[(&str, AMQPValue)]) -> BasicProperties {
        let mut death = FieldTable::default();
        death.insert("reason".into(), text(reason));
        death.insert("queue".into(), text("credit-purchases"));
        death.insert("time".into(), AMQPValue::Timestamp(1_700_000_000));
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        let mut headers = FieldTable::default();
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        for (k, v) in extra {
            headers.insert((*k).into(), v.clone());
        }
        BasicProperties::default()
            .with_headers(headers)
            .with_message_id(ID.into())
    }

    const BODY: &[u8] =
        br#"{"customer_id":"cus_1","product_id":"itm_1","credit_count":1,"amount_excluding_tax":5}"#;

    /// A letter delivered to a worker with no first request recorded may
    /// have charged: never "no request", never replayed without --force.
    #[test]
    fn a_delivered_letter_without_a_first_request_may_have_charged() {
        let now = 1_700_000_500_000;
        let budget = Duration::from_secs(110);
        let died = 1_700_000_000_000;
        // The worker's poison letter, stamped by its refreshes.
        let poison = DeliveryHistory {
            refreshes: 3,
            unrecorded_before_ms: Some(died - 60_000),
            ..DeliveryHistory::default()
        };
        let mark = crate::broker::history::DeathMark {
            code: "retries_exhausted",
            at_ms: died,
            replica: "w",
            queue: "credit-purchases",
        };
        let message = Message {
            headers: None,
            body: BODY,
            message_id: Some(ID),
        };
        let stamped = BasicProperties::default()
            .with_headers(poison.stamp_dead(message, &mark, &keys()))
            .with_message_id(ID.into());
        let count = |n| AMQPValue::LongLongInt(n);
        let cases = [
            ("poison", stamped, Some(died - 60_000)),
            ("limit", broker_letter("delivery_limit", &[]), Some(died)),
            (
                "expired after a delivery",
                broker_letter("expired", &[("x-delivery-count", count(2))]),
                Some(died),
            ),
            (
                "put back by dead-letters",
                broker_letter("expired", &[(DELIVERED_COUNT_HEADER, count(1))]),
                Some(died),
            ),
        ];
        for (name, properties, before) in cases {
            let info = inspect(BODY, &properties, 2, Some(&keys()));
            assert!(info.first_request_unknown, "{name}");
            assert_eq!(info.unrecorded_before_ms, before, "{name}");
            assert_eq!(info.first_attempt_ms, None, "{name}: no estimate");
            let detail = info.detail.clone().unwrap_or_default();
            assert!(detail.contains("first request unknown"), "{name}: {detail}");
            assert!(!detail.contains("no request"), "{name}: {detail}");
            assert_eq!(
                window(&info, now, budget),
                Window::FirstUnknown {
                    before_ms: before.unwrap_or_default()
                },
                "{name}"
            );
            let json = serde_json::to_value(&info).expect("json");
            assert_eq!(json["first_request_unknown"], true, "{name}");
            assert!(json["unrecorded_before"].is_string(), "{name}: {json}");
        }

        // Expired with no count: RabbitMQ 3.10 keeps none on a dead letter,
        // so it may have been delivered all the same.
        let expired = inspect(BODY, &broker_letter("expired", &[]), 2, Some(&keys()));
        assert!(expired.first_request_unknown);
        assert_eq!(expired.first_attempt_ms, None);
        // An invalid body never reaches Hyperline, however often delivered.
        let invalid = inspect(
            b"{}",
            &broker_letter("delivery_limit", &[]),
            2,
            Some(&keys()),
        );
        assert!(!invalid.first_request_unknown);
        // Exhausted with no request and never delivered so: no request.
        let plain = DeliveryHistory {
            step: 2,
            ..DeliveryHistory::default()
        };
        let message = Message {
            headers: None,
            body: BODY,
            message_id: Some(ID),
        };
        let properties = BasicProperties::default()
            .with_headers(plain.stamp_dead(message, &mark, &keys()))
            .with_message_id(ID.into());
        let info = inspect(BODY, &properties, 2, Some(&keys()));
        assert!(!info.first_request_unknown);
        assert_eq!(window(&info, now, budget), Window::Open);
    }

    #[test]
    fn a_letters_memory_is_believed_only_when_it_verifies() {
        let body = br#"{"customer_id":"cus_1","product_id":"itm_1","credit_count":1,"amount_excluding_tax":5}"#;
        let forged = dead_properties(Some(42), b"another body");
        let info = inspect(body, &forged, 2, Some(&keys()));
        assert_eq!((info.attempts, info.error_code), (None, None));
        let unkeyed = inspect(body, &dead_properties(Some(42), body), 2, None);
        assert_eq!(unkeyed.attempts, None);
    }

    #[test]
    fn a_stamped_letter_says_why_when_and_where_it_died() {
        let history = DeliveryHistory {
            attempts: 3,
            first_attempt_ms: Some(1_700_000_000_000),
            last_attempt_ms: Some(1_700_000_090_000),
            last_status: Some(200),
            step: 1,
            ..DeliveryHistory::default()
        };
        let mark = crate::broker::history::DeathMark {
            code: "unexpected_response",
            at_ms: 1_700_000_091_000,
            replica: "credit-purchase-worker@pod-a",
            queue: "credit-purchases",
        };
        let body = br#"{"customer_id":"cus_1","product_id":"itm_1","credit_count":1,"amount_excluding_tax":5}"#;
        let message = Message {
            headers: None,
            body,
            message_id: Some(ID),
        };
        let properties = BasicProperties::default()
            .with_headers(history.stamp_dead(message, &mark, &keys()))
            .with_message_id(ID.into());
        let info = inspect(body, &properties, 4, Some(&keys()));
        assert_eq!(info.error_code, Some("unexpected_response"));
        assert_eq!(info.last_status, Some(200));
        assert_eq!(info.attempts, Some(3));
        assert_eq!(
            info.first_attempt.as_deref(),
            Some("2023-11-14T22:13:20.000Z")
        );
        assert_eq!(
            info.last_attempt.as_deref(),
            Some("2023-11-14T22:14:50.000Z")
        );
        assert_eq!(info.died_at.as_deref(), Some("2023-11-14T22:14:51.000Z"));
        assert_eq!(
            info.replica.as_deref(),
            Some("credit-purchase-worker@pod-a")
        );
        assert_eq!(info.queue.as_deref(), Some("credit-purchases"));
        let json = serde_json::to_value(&info).expect("json");
        for key in [
            "error_code",
            "last_status",
            "attempts",
            "first_attempt",
            "last_attempt",
            "replica",
            "died_at",
        ] {
            assert!(!json[key].is_null(), "{key} in {json}");
        }
    }

    #[test]
    fn an_unparseable_body_is_an_invalid_command() {
        let info = inspect(b"{nope", &BasicProperties::default(), 2, Some(&keys()));
        assert_eq!(info.error_code, Some("invalid_command"));
        assert!(info.invalid_reason.is_some());
        assert_eq!(
            (info.command_id, info.broker_reason, info.first_attempt_ms),
            (None, None, None)
        );
    }

    #[test]
    fn the_window_closes_an_hour_and_a_budget_before_24_hours() {
        let budget = Duration::from_secs(110);
        let hour = 3_600_000;
        let info = |first| {
            inspect(
                b"{}",
                &dead_properties(Some(first), b"{}"),
                2,
                Some(&keys()),
            )
        };
        let now = 100 * 24 * hour;
        assert_eq!(window(&info(now - 2 * hour), now, budget), Window::Open);
        assert_eq!(
            window(&info(now - 23 * hour), now, budget),
            Window::Closed(Duration::from_secs(23 * 3600))
        );
        let bare = inspect(b"{}", &BasicProperties::default(), 2, Some(&keys()));
        assert_eq!(window(&bare, now, budget), Window::Unknown);
    }

    #[test]
    fn a_replayed_copy_keeps_the_window_start_and_nothing_else_of_its_history() {
        let letter = dead_properties(Some(42), b"{}");
        let copy = replay_properties(&letter, b"{}", Some(42), false, &keys());
        let headers = copy.headers().clone().unwrap_or_default();
        let names: Vec<&str> = headers.inner().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec![FIRST_ATTEMPT_HEADER, "cpw-mac", "traceparent"]);
        assert_eq!(copy.message_id(), letter.message_id());
        assert_eq!(*copy.delivery_mode(), Some(2));
        let (history, _) = DeliveryHistory::read(Message::of(&copy, b"{}"), Some(&keys()));
        assert_eq!(history.first_attempt_ms, Some(42));
        let forced = replay_properties(&letter, b"{}", Some(42), true, &keys());
        let names = forced.headers().clone().unwrap_or_default();
        assert_eq!(
            names.inner().keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            vec!["traceparent"]
        );
    }
}
