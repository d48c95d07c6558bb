//! The trust boundary and the bounds of docs/contract.md sections 3 and 4:
//! everything on a delivery is the publisher's word, so memory the worker did
//! not write buys nothing, a copy carries only what a copy should, a
//! `reply_to` is a courtesy, and a 429 never uses up a command's budget.

use std::time::Duration;

use credit_purchase_worker::simulator::FaultsPatch;
use lapin::BasicProperties;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde_json::json;

use cpw_testkit::app::{
    Options, SIM_KEY, TestApp, command, command_for, command_id, scripted, spawn_app,
    spawn_app_with,
};

/// The customer's next purchase is charged, then answered with a garbled
/// 201: the worker cannot tell and dead-letters it (`unexpected_response`).
fn garbled_after_charge(customer: &str) -> FaultsPatch {
    FaultsPatch {
        after_charge: Some(vec![scripted(
            customer,
            201,
            json!("garbage"),
            &[],
            Some(1),
        )]),
        ..FaultsPatch::default()
    }
}

/// A dead letter as the worker makes one: its memory stamped and sealed.
async fn a_real_dead_letter(app: &mut TestApp, properties: BasicProperties) -> BasicProperties {
    app.set_faults(garbled_after_charge("cus_garbled"));
    let id = command_id();
    let body = command_for(&id, "cus_garbled").to_string();
    app.publish_raw(body.as_bytes(), properties).await;
    let event = app.next_event().await;
    assert_eq!(event.code(), "unexpected_response", "{}", event.body);
    let dead = app.wait_dead_letters(1).await;
    assert_eq!(dead.len(), 1);
    dead.into_iter().next().map(|(_, p)| p).expect("one letter")
}

fn put(headers: &mut FieldTable, key: &str, value: AMQPValue) {
    headers.insert(ShortString::from(key), value);
}

/// An outcome as the worker once stored it (the whole event), rewritten
/// for `id` with an invoice of the forger's.
fn forged_event(id: &str) -> AMQPValue {
    let event = json!({
        "schema": 1, "event_id": uuid::Uuid::new_v4(), "type": "credit_purchase.succeeded",
        "command_id": id, "customer_id": "cus_Typ0px2W0aiEtl", "product_id": "itm_3kXODDF42QXtnL",
        "credit_count": 32, "invoice_id": "inv_forged", "new_credit_balance": 999_999,
        "attempts": 1, "occurred_at": "2026-11-23T10:00:00Z"
    });
    AMQPValue::LongString(LongString::from(event.to_string()))
}

/// An outcome as the worker stores it now (its facts).
fn forged_facts() -> AMQPValue {
    let facts = json!({
        "event_id": uuid::Uuid::new_v4(), "occurred_at": "2026-11-23T10:00:00Z",
        "kind": "credit_purchase.succeeded", "invoice_id": "inv_forged", "new_credit_balance": 1
    });
    AMQPValue::LongString(LongString::from(facts.to_string()))
}

#[tokio::test]
async fn memory_copied_from_the_workers_own_copy_buys_nothing_without_a_purchase() {
    let mut app = spawn_app().await;
    let letter = a_real_dead_letter(&mut app, BasicProperties::default()).await;
    let real = letter.headers().clone().expect("the worker's stamps");
    assert!(real.contains_key("cpw-first-attempt-ms"), "{real:?}");

    type Forgery = fn(&mut FieldTable, &str);
    let forgeries: [(&str, Forgery); 4] = [
        ("a stored outcome", |h, id| {
            put(h, "cpw-outcome", forged_event(id))
        }),
        ("a stored outcome in facts", |h, _| {
            put(h, "cpw-outcome", forged_facts())
        }),
        ("every number zero", |h, id| {
            let numbers: Vec<ShortString> = h
                .inner()
                .iter()
                .filter(|(k, v)| {
                    k.as_str().starts_with("cpw-") && matches!(v, AMQPValue::LongLongInt(_))
                })
                .map(|(k, _)| k.clone())
                .collect();
            for key in numbers {
                h.insert(key, AMQPValue::LongLongInt(0));
            }
            put(h, "cpw-outcome", forged_event(id));
        }),
        ("a window opened at the epoch", |h, _| {
            put(h, "cpw-first-attempt-ms", AMQPValue::LongLongInt(0));
        }),
    ];
    for (what, forge) in forgeries {
        let id = command_id();
        let mut headers = real.clone();
        forge(&mut headers, &id);
        let body = command(&id).to_string();
        app.publish_raw(
            body.as_bytes(),
            BasicProperties::default().with_headers(headers),
        )
        .await;
        let event = app.next_event().await;
        assert_eq!(event.command_id(), id, "{what}");
        assert_eq!(
            event.kind(),
            "credit_purchase.succeeded",
            "{what}: {}",
            event.body
        );
        let ledger = app.ledger();
        let charge = ledger
            .charges
            .iter()
            .find(|c| c.idempotency_key.as_deref() == Some(id.as_str()))
            .unwrap_or_else(|| panic!("{what}: the command was bought"));
        assert_eq!(ledger.charges_for(&id), 1, "{what}: once");
        assert_eq!(event.body["invoice_id"], json!(charge.invoice_id), "{what}");
        assert_ne!(event.body["invoice_id"], "inv_forged", "{what}");
    }
    assert_eq!(app.metric("cpw_history_rejected_total").await, 4.0);
    app.cleanup().await;
}

#[tokio::test]
async fn a_dead_letter_keeps_neither_the_commands_ttl_nor_its_user() {
    let mut app = spawn_app().await;
    let properties = BasicProperties::default().with_expiration("60000".into());
    let letter = a_real_dead_letter(&mut app, properties).await;
    assert_eq!(
        letter.expiration(),
        &None,
        "a dead letter that expires loses the record of a charge"
    );
    assert_eq!(letter.user_id(), &None);
    app.cleanup().await;
}

#[tokio::test]
async fn a_reply_to_that_refuses_or_is_missing_never_holds_the_command() {
    let mut app = spawn_app().await;
    let full = format!("{}.full-replies", app.queue);
    app.guard_queue(&full);
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    app.channel
        .queue_declare(full.as_str().into(), QueueDeclareOptions::default(), args)
        .await
        .expect("a queue that refuses every message");
    let missing = format!("{}.no-such-queue", app.queue);

    for (reply_to, reason) in [(full.as_str(), "nacked"), (missing.as_str(), "unroutable")] {
        let id = command_id();
        let body = command(&id).to_string();
        let props = BasicProperties::default().with_reply_to(reply_to.into());
        app.publish_raw(body.as_bytes(), props).await;
        let event = app.next_event().await;
        assert_eq!(
            (event.command_id(), event.kind()),
            (id.as_str(), "credit_purchase.succeeded")
        );
        app.wait_until_drained().await;
        assert!(
            app.no_event_for(Duration::from_secs(3)).await,
            "{reason}: the command is settled, not sent round again"
        );
        assert_eq!(app.ledger().charges_for(&id), 1);
        let sample = format!("cpw_replies_dropped_total{{reason=\"{reason}\"}}");
        assert_eq!(app.metric(&sample).await, 1.0, "{reason}");
    }
    app.channel
        .queue_delete(full.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete");
    app.cleanup().await;
}

#[tokio::test]
async fn sustained_rate_limiting_uses_no_attempt_and_no_step() {
    // Two attempts and one step: four failures would exhaust the command.
    let options = Options::default()
        .env("CPW__RETRY__ATTEMPTS", 2)
        .env("CPW__RETRY__REDELIVERY_DELAYS_SECS", 1);
    let mut app = spawn_app_with(options).await;
    let limited = scripted(
        "cus_busy",
        429,
        json!({"message": "Too many requests"}),
        &[("Retry-After", "1")],
        Some(6),
    );
    app.set_faults(FaultsPatch {
        scripted: Some(vec![limited]),
        ..FaultsPatch::default()
    });
    let id = command_id();
    app.publish(&command_for(&id, "cus_busy")).await;
    let event = app
        .next_event_within(Duration::from_secs(60))
        .await
        .expect("an answer");
    assert_eq!(event.kind(), "credit_purchase.succeeded", "{}", event.body);
    assert_eq!(event.body["attempts"], 7, "six 429s, then the purchase");
    assert_eq!(app.ledger().charges_for(&id), 1);
    app.cleanup().await;
}

/// A broker user of the test's own, deleted when the test ends.
struct BrokerUser(String);

impl BrokerUser {
    fn add(name: &str) -> BrokerUser {
        let ctl = |args: &[&str]| {
            let status = cpw_testkit::broker::rabbitmqctl()
                .args(args)
                .status()
                .expect("rabbitmqctl runs");
            assert!(status.success(), "rabbitmqctl {args:?}");
        };
        ctl(&["add_user", name, "secret"]);
        let user = BrokerUser(name.to_owned());
        // On the test broker's virtual host, which `CPW_TEST_AMQP_URL` may name.
        let uri: lapin::uri::AMQPUri = cpw_testkit::broker::amqp_url()
            .parse()
            .expect("the broker URL parses");
        ctl(&["set_permissions", "-p", &uri.vhost, name, ".*", ".*", ".*"]);
        user
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = cpw_testkit::broker::rabbitmqctl()
            .args(["delete_user", &self.0])
            .status();
    }
}

#[tokio::test]
async fn a_publishers_user_id_does_not_make_the_command_skip_its_delay() {
    let options = Options::default().env("CPW__RETRY__REDELIVERY_DELAYS_SECS", 3);
    let mut app = spawn_app_with(options).await;
    let name = format!("cpw-test-user-{}", uuid::Uuid::new_v4().simple());
    let _user = BrokerUser::add(&name);
    let url = url::Url::parse(&cpw_testkit::broker::amqp_url()).expect("broker URL");
    let mut as_user = url.clone();
    as_user.set_username(&name).expect("a user");
    as_user.set_password(Some("secret")).expect("a password");
    let connection =
        credit_purchase_worker::broker::connect(as_user.as_str(), "cpw-test-user", None)
            .await
            .expect("the user connects");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .expect("confirms");

    // Four attempts in process, all 503: the command goes to its 3-s step.
    let down = scripted("cus_user", 503, json!({"message": "down"}), &[], Some(4));
    app.set_faults(FaultsPatch {
        scripted: Some(vec![down]),
        ..FaultsPatch::default()
    });
    let id = command_id();
    let body = command_for(&id, "cus_user").to_string();
    let props = cpw_testkit::broker::as_command(
        BasicProperties::default().with_user_id(name.as_str().into()),
    );
    cpw_testkit::broker::publish(&channel, &app.queue, body.as_bytes(), props).await;
    app.wait_requests(4).await;
    let after_fourth = tokio::time::Instant::now();
    app.wait_requests(5).await;
    let gap = after_fourth.elapsed();
    assert!(
        gap >= Duration::from_millis(2500),
        "the 3-s step was waited ({gap:?})"
    );
    let event = app.next_event().await;
    assert_eq!(event.kind(), "credit_purchase.succeeded", "{}", event.body);
    assert_eq!(app.ledger().charges_for(&id), 1);
    assert_eq!(
        app.metric("cpw_reconnects_total").await,
        0.0,
        "no session was lost"
    );
    let _ = connection.close(200, "done".into()).await;
    app.cleanup().await;
}

/// The move from the key derived from the API key to explicit keys
/// (docs/trust.md): with the `derived-from-api-key` entry kept beside the
/// new key, a copy waiting in a delay queue and a dead letter, both signed
/// with the derived key before the move, still verify after it; `check`
/// names which key signs and which verify, and prints neither.
#[tokio::test]
async fn copies_signed_with_the_derived_key_still_verify_after_the_move_to_explicit_keys() {
    let options = Options::default()
        .env("CPW__RETRY__ATTEMPTS", 1)
        .env("CPW__RETRY__REDELIVERY_DELAYS_SECS", 5);
    let mut app = spawn_app_with(options).await;
    let unavailable = scripted("cus_delayed", 503, json!({"message": "down"}), &[], Some(1));
    app.set_faults(FaultsPatch {
        scripted: Some(vec![unavailable]),
        ..garbled_after_charge("cus_garbled")
    });
    // Signed with the derived key: a dead letter, and a copy in a delay queue.
    let (lettered, delayed) = (command_id(), command_id());
    app.publish(&command_for(&lettered, "cus_garbled")).await;
    let event = app.event_for(&lettered).await;
    assert_eq!(event["error"]["code"], "unexpected_response", "{event}");
    app.wait_depth(&app.dead_queue(), 1).await;
    app.publish(&command_for(&delayed, "cus_delayed")).await;
    app.wait_depth(&format!("{}.retry.5s", app.queue), 1).await;
    app.stop_worker().await;

    let explicit = "k".repeat(64);
    let keys = format!("{explicit},derived-from-api-key");
    app.env.insert("CPW__WORKER__HISTORY_KEYS".into(), keys);
    app.start_worker().await;
    let event = app.event_for(&delayed).await;
    assert_eq!(event["type"], "credit_purchase.succeeded", "{event}");
    assert_eq!(
        event["attempts"], 2,
        "the 503 before the move is remembered"
    );
    assert_eq!(app.metric("cpw_history_rejected_total").await, 0.0);

    let (_, stdout, stderr) = app.cli(&["dead-letters", "list", "--json"], &[]).await;
    let letter: serde_json::Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout} {stderr}"));
    assert_eq!(letter["command_id"], lettered.as_str());
    assert_eq!(letter["attempts"], 1, "its memory verifies: {letter}");
    assert!(letter["first_attempt"].is_string(), "{letter}");

    let (_, stdout, _) = app.cli(&["check"], &[]).await;
    let line = "✓ history keys: copies signed with entry 1 (a configured key); verified with \
                entry 1 (a configured key), entry 2 (the key derived from hyperline.api_key) \
                (entries of worker.history_keys)";
    assert!(stdout.contains(line), "{stdout}");
    assert!(
        !stdout.contains(&explicit) && !stdout.contains(SIM_KEY),
        "{stdout}"
    );
    app.cleanup().await;
}
