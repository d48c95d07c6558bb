//! Every invalid-command rule of docs/contract.md section 2 ends in the dead-letter
//! queue with an `invalid_command` event, and never reaches the API.

use std::collections::HashSet;
use std::time::Duration;

use lapin::BasicProperties;
use serde_json::{Value, json};

use cpw_testkit::app::{command, command_id, spawn_app};

fn with(key: &str, value: Value) -> Vec<u8> {
    let mut c = command(&command_id());
    c[key] = value;
    c.to_string().into_bytes()
}

fn without(key: &str) -> Vec<u8> {
    let mut c = command(&command_id());
    c.as_object_mut().map(|o| o.remove(key));
    c.to_string().into_bytes()
}

#[tokio::test]
async fn every_rule_dead_letters_with_an_event_and_no_request() {
    let mut app = spawn_app().await;
    let mut big = command(&command_id());
    big["padding"] = json!("x".repeat(64 * 1024));
    let by_price = {
        let mut c = command(&command_id());
        c["amount_excluding_tax"] = Value::Null;
        c["price_id"] = json!("");
        c.to_string().into_bytes()
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("over 64 KiB", big.to_string().into_bytes()),
        ("not UTF-8", vec![0xff, 0xfe, b'{', b'}']),
        ("not JSON", b"{\"command_id\": ".to_vec()),
        ("not an object", b"[1, 2, 3]".to_vec()),
        ("no command id anywhere", without("command_id")),
        (
            "command id too short",
            with("command_id", json!("short-id")),
        ),
        (
            "command id with a slash",
            with("command_id", json!("6f1c1f0e-4c1a-4a51/9d7e")),
        ),
        (
            "command id not a string",
            with("command_id", json!(1234567890123456_u64)),
        ),
        ("customer missing", without("customer_id")),
        (
            "customer with path traversal",
            with("customer_id", json!("../admin")),
        ),
        (
            "customer percent-encoded",
            with("customer_id", json!("cus%2Fx")),
        ),
        ("product with a query", with("product_id", json!("itm?x=1"))),
        (
            "product with CR/LF",
            with("product_id", json!("itm\r\nX-Injected: 1")),
        ),
        ("credit_count zero", with("credit_count", json!(0))),
        ("credit_count fractional", with("credit_count", json!(1.5))),
        ("credit_count a string", with("credit_count", json!("32"))),
        (
            "credit_count past 2^53-1",
            with("credit_count", json!(9_007_199_254_740_992_u64)),
        ),
        ("both amount and price", with("price_id", json!("price_1"))),
        ("neither amount nor price", without("amount_excluding_tax")),
        ("empty price_id", by_price),
        ("negative amount", with("amount_excluding_tax", json!(-1))),
        (
            "expires_at not RFC 3339",
            with("expires_at", json!("next tuesday")),
        ),
    ];
    for (_, body) in &cases {
        app.publish_raw(body, BasicProperties::default()).await;
    }
    let events = app
        .events_until(Duration::from_secs(60), |e| e.len() == cases.len())
        .await;
    for e in &events {
        assert_eq!(
            (e.kind(), e.code()),
            ("credit_purchase.failed", "invalid_command"),
            "{}",
            e.body
        );
        assert_eq!(e.body["attempts"], 0);
        assert_eq!(e.body["error"]["http_status"], Value::Null);
        assert!(
            e.body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    assert!(
        app.no_event_for(Duration::from_millis(500)).await,
        "one event per message"
    );
    assert_eq!(
        app.sim.requests().len(),
        0,
        "no invalid command reaches the API"
    );
    let dead = app.wait_dead_letters(cases.len() as u32).await;
    assert_eq!(dead.len(), cases.len());
    let originals: HashSet<Vec<u8>> = cases.iter().map(|(_, b)| b.clone()).collect();
    assert!(
        dead.iter().all(|(body, _)| originals.contains(body)),
        "the originals are dead-lettered unchanged"
    );
    app.wait_until_drained().await;
    app.cleanup().await;
}

#[tokio::test]
async fn the_event_echoes_the_raw_ids_of_an_invalid_command() {
    let mut app = spawn_app().await;
    let id = command_id();
    let mut c = command(&id);
    c["credit_count"] = json!(0);
    app.publish(&c).await;
    let e = app.next_event().await;
    assert_eq!(e.code(), "invalid_command");
    assert_eq!(e.command_id(), id);
    assert_eq!(e.body["customer_id"], "cus_Typ0px2W0aiEtl");
    assert_eq!(
        e.properties.correlation_id().as_ref().map(|s| s.as_str()),
        Some(id.as_str())
    );
    app.cleanup().await;
}

#[tokio::test]
async fn message_id_stands_in_for_a_missing_command_id() {
    let mut app = spawn_app().await;
    let id = command_id();
    let mut c = command(&id);
    c.as_object_mut().map(|o| o.remove("command_id"));
    app.publish_raw(
        c.to_string().as_bytes(),
        BasicProperties::default().with_message_id(id.as_str().into()),
    )
    .await;
    let e = app.next_event().await;
    assert_eq!(e.kind(), "credit_purchase.succeeded");
    assert_eq!(e.command_id(), id);
    assert_eq!(app.ledger().charges_for(&id), 1);
    app.cleanup().await;
}

/// The identity properties carry an invalid command's raw id byte for byte,
/// control characters included (docs/contract.md section 3): AMQP short strings are
/// length-prefixed, so the broker and lapin pass them through intact. Only
/// `cloudEvents:subject` is left out for such an id; an id over 255 bytes is
/// not echoed at all.
#[tokio::test]
async fn the_correlation_id_carries_a_raw_id_with_control_characters() {
    let mut app = spawn_app().await;
    let control = "bad\u{1}id\nx".to_owned();
    // 254 bytes of `é` and a control character: the longest id echoed.
    let longest = format!("{}\u{1}", "é".repeat(127));
    assert_eq!(longest.len(), 255);
    let too_long = format!("{}\r\n", "x".repeat(300));
    for id in [&control, &longest, &too_long] {
        let mut c = command(&command_id());
        c["command_id"] = json!(id);
        app.publish(&c).await;
    }
    let mut events = app
        .events_until(Duration::from_secs(60), |e| e.len() == 3)
        .await;
    events.sort_by_key(|e| e.body["command_id"].as_str().map(str::len));
    let [none, short, long] = &events[..] else {
        panic!("three events")
    };
    for e in &events {
        assert_eq!(e.code(), "invalid_command", "{}", e.body);
    }
    for (e, id) in [(short, &control), (long, &longest)] {
        assert_eq!(e.body["command_id"].as_str(), Some(id.as_str()));
        assert_eq!(
            e.properties
                .correlation_id()
                .as_ref()
                .map(|s| s.as_str().as_bytes()),
            Some(id.as_bytes()),
            "correlation_id is the raw id, byte for byte"
        );
        let subject = e
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("cloudEvents:subject").cloned());
        assert!(subject.is_none(), "no cloudEvents:subject: {subject:?}");
    }
    assert_eq!(none.body["command_id"], Value::Null, "over 255 bytes");
    assert!(none.properties.correlation_id().is_none());
    assert_eq!(app.wait_dead_letters(3).await.len(), 3);
    app.cleanup().await;
}
