//! A command whose AMQP short strings are not UTF-8 stops no replica. pika
//! passes `bytes` through, so any publisher may send such a `message_id`,
//! `type`, `reply_to` or header name; RabbitMQ keeps the bytes as they came.
//! The frame decoder reads them lossily (U+FFFD, at most 255 bytes:
//! patches/amq-protocol-types), so the command is answered like any other,
//! or refused as `invalid_command` when its id is unusable, dead-lettered by
//! the broker as it came; the replica never loses its connection. Unpatched,
//! the first such delivery closed the connection, came back first on the
//! next one, and no command behind it was ever answered.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use credit_purchase_worker::simulator::FaultsPatch;
use serde_json::{Value, json};

use cpw_testkit::app::{Options, command, command_for, command_id, scripted, spawn_app_with};
use cpw_testkit::pika::{self, Message};

/// The `message_id` of the report.
const BAD_ID: &[u8] = b"\xff\xfe-not-utf8";
/// A customer whose first four purchases meet a 503: the command spends its
/// attempts, and the worker's own copy of it (the delay step) carries the
/// properties as the worker read them.
const FLAKY: &str = "cus_flaky_until_the_copy";

#[tokio::test]
async fn properties_that_are_not_utf8_stop_no_replica_on_a_quorum_queue() {
    properties_that_are_not_utf8_stop_no_replica("quorum").await;
}

#[tokio::test]
async fn properties_that_are_not_utf8_stop_no_replica_on_a_classic_queue() {
    properties_that_are_not_utf8_stop_no_replica("classic").await;
}

async fn properties_that_are_not_utf8_stop_no_replica(queue_type: &str) {
    let options = Options::default().env("CPW__AMQP__QUEUE_TYPE", queue_type);
    let mut app = spawn_app_with(options).await;
    app.set_faults(FaultsPatch {
        scripted: Some(vec![scripted(
            FLAKY,
            503,
            json!({"message": "down"}),
            &[],
            Some(4),
        )]),
        ..FaultsPatch::default()
    });

    // First in the queue: no command_id in the body, so the id is the
    // message_id, which is not UTF-8; every other short string is bad too.
    let mut unusable = command(&command_id());
    unusable.as_object_mut().map(|o| o.remove("command_id"));
    let mut refused = Message::new(unusable.to_string());
    for name in ["message_id", "type", "correlation_id", "reply_to"] {
        refused = refused.property(name, BAD_ID);
    }
    let refused = refused
        .property("content_type", b"application/json\xff".as_slice())
        .property("content_encoding", b"\xc3(".as_slice())
        .property("app_id", b"\xe2\x82".as_slice())
        .header(b"x-\xff-name".as_slice(), b"value".as_slice());

    // Valid commands, each with one bad short string (the body's command_id
    // wins over a bad message_id): answered.
    let mut messages = vec![refused.clone()];
    let mut answered = Vec::new();
    let one_bad = [
        ("message_id", BAD_ID.to_vec()),
        ("message_id", vec![0xff; 255]),
        ("type", BAD_ID.to_vec()),
        ("correlation_id", BAD_ID.to_vec()),
        ("reply_to", BAD_ID.to_vec()),
        ("content_type", b"application/\xffjson".to_vec()),
    ];
    for (name, value) in one_bad {
        let id = command_id();
        messages.push(Message::new(command(&id).to_string()).property(name, value));
        answered.push(id);
    }
    let id = command_id();
    messages
        .push(Message::new(command(&id).to_string()).header(b"\xfe".as_slice(), b"v".as_slice()));
    answered.push(id);
    // Copied by the worker to a delay queue and back: the copy carries the
    // lossy reading, re-encoded, and the memory it carries still verifies.
    let copied = command_id();
    messages.push(
        Message::new(command_for(&copied, FLAKY).to_string())
            .property("message_id", vec![0xff; 255])
            .property("type", BAD_ID),
    );
    answered.push(copied.clone());
    // The three valid commands behind the bad ones.
    for _ in 0..3 {
        let id = command_id();
        messages.push(Message::new(command(&id).to_string()));
        answered.push(id);
    }
    pika::publish(&app.queue, &messages).await;

    // The refused command's event echoes its id as the worker read it.
    let echoed = "\u{fffd}\u{fffd}-not-utf8".to_owned();
    let mut ids = answered.clone();
    ids.push(echoed.clone());
    let events = app.events_answering(&ids).await;
    let by_id: HashMap<&str, &Value> = events.iter().map(|e| (e.command_id(), &e.body)).collect();
    for id in &answered {
        assert_eq!(
            by_id[id.as_str()]["type"],
            "credit_purchase.succeeded",
            "{}",
            by_id[id.as_str()]
        );
    }
    assert_eq!(
        by_id[copied.as_str()]["attempts"],
        5,
        "the copy's memory verified"
    );
    app.assert_charged_once(&answered);
    let invalid = by_id[echoed.as_str()];
    assert_eq!(invalid["error"]["code"], "invalid_command", "{invalid}");
    assert_eq!(invalid["attempts"], 0);
    assert!(
        app.no_event_for(Duration::from_millis(500)).await,
        "one event per command"
    );

    // The broker dead-lettered the refused command itself: every byte as it
    // came.
    let dead_queue = app.dead_queue();
    app.wait_depth(&dead_queue, 1).await;
    let dead = pika::take(&dead_queue).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].body, refused.body);
    let kept: BTreeMap<String, Vec<u8>> = dead[0]
        .properties
        .iter()
        .filter(|(name, _)| refused.properties.contains_key(*name))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    assert_eq!(kept, refused.properties, "the short strings as they came");
    assert_eq!(
        dead[0].headers.get(b"x-\xff-name".as_slice()),
        Some(&b"value".to_vec()),
        "{dead:?}"
    );

    assert_eq!(
        app.metric("cpw_reconnects_total").await,
        0.0,
        "the replica never lost its connection"
    );
    assert_eq!(app.readyz().await, 200);
    app.cleanup().await;
}

/// The decoder alone: a content header whose short strings are not UTF-8 is
/// read, each at most 255 bytes (three bytes of U+FFFD for each bad one would
/// reach 765), and the worker's copy of those properties encodes into a
/// header that reads back the same. Without the bound, that copy's encoder
/// would write a wrong length and the broker would close the connection.
#[test]
fn bad_short_strings_are_read_within_bounds_and_their_copy_encodes() {
    use lapin::protocol::basic::{gen_properties, parse_properties};
    use lapin::types::FieldTable;

    // content_type, message_id and type (AMQP 0-9-1 property flags 15, 7, 5).
    let flags: u16 = (1 << 15) | (1 << 7) | (1 << 5);
    let mut header = flags.to_be_bytes().to_vec();
    for value in [b"application/\xffjson".as_slice(), &[0xff; 255], BAD_ID] {
        header.push(u8::try_from(value.len()).expect("a short string"));
        header.extend(value);
    }
    let (rest, read) = parse_properties(&header[..]).expect("the header is read");
    assert!(rest.is_empty());
    let text = |s: &Option<lapin::types::ShortString>| s.as_ref().map(|s| s.to_string());
    assert_eq!(
        text(read.content_type()).as_deref(),
        Some("application/\u{fffd}json")
    );
    assert_eq!(text(read.message_id()), Some("\u{fffd}".repeat(85)));
    assert_eq!(
        text(read.kind()).as_deref(),
        Some("\u{fffd}\u{fffd}-not-utf8")
    );

    let copy = credit_purchase_worker::broker::copy_properties(&read, FieldTable::default());
    let encoded = gen_properties::<Vec<u8>>(&copy)(Vec::new().into())
        .expect("the copy encodes")
        .write;
    let (rest, again) = parse_properties(&encoded[..]).expect("the copy is read");
    assert!(rest.is_empty());
    assert_eq!(text(again.message_id()), text(read.message_id()));
    assert_eq!(text(again.kind()), text(read.kind()));
    assert_eq!(text(again.content_type()), text(read.content_type()));
}
