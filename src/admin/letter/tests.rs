//! Reading dead letters: the worker's stamps, the broker's marks, the window.

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
