//! `hyperline.reconcile_at_window`: a command whose idempotency window
//! closed before it got an answer is looked up in Hyperline's credit
//! transactions before it is failed. The window is shortened (the worker's
//! setting and the simulator's replay TTL alike) and the command arrives with
//! a first request already older than it, as after a long outage. The
//! check follows the evidence rules of `dead-letters reconcile`: a charge is
//! proven only when the results log covers it and no other command's
//! `succeeded` event claims it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use credit_purchase_worker::broker::history::FIRST_ATTEMPT_HEADER;
use credit_purchase_worker::simulator::Faults;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde_json::json;

use cpw_testkit::broker::sealed;

use cpw_testkit::app::{Options, SIM_KEY, TestApp, command, command_id, spawn_app_with};

/// Hyperline forgets a key after this many seconds here, and the worker knows it.
const WINDOW_SECS: u64 = 14;

async fn app(reconcile: bool) -> TestApp {
    let faults = Faults {
        replay_ttl_secs: WINDOW_SECS,
        ..Faults::default()
    };
    let options = Options::default()
        .faults(faults)
        .env("CPW__HYPERLINE__IDEMPOTENCY_WINDOW_SECS", WINDOW_SECS)
        .env("CPW__WORKER__DELIVERY_DEADLINE_SECS", 5)
        .env("CPW__RETRY__REDELIVERY_DELAYS_SECS", 1)
        .env("CPW__AMQP__CONFIRM_TIMEOUT_SECS", 2)
        .env("CPW__HYPERLINE__RECONCILE_AT_WINDOW", reconcile);
    spawn_app_with(options).await
}

fn now_ms() -> i64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock");
    i64::try_from(since.as_millis()).expect("ms")
}

/// The clock margin of a 14 s window (1/96 of it), rounded up.
const MARGIN_MS: i64 = 146;

/// How long after a transaction every command that could have made it has
/// spoken here (`Settings::unseen_bound`: 2 × the 5 s deadline, the 2 s
/// lookup, 4 × the 2 s confirm timeout), with the clock margin.
const UNSEEN_MS: i64 = 20_000 + MARGIN_MS;

/// A command bought through the worker, whose event gives the results log
/// its first entry; returns once the clock has passed that entry by the
/// margin, so the log covers every charge made from then on.
async fn warm_log(app: &mut TestApp) -> serde_json::Value {
    let id = command_id();
    app.publish(&command(&id)).await;
    let event = app.next_event().await;
    assert_eq!(event.kind(), "credit_purchase.succeeded", "{}", event.body);
    let logged = now_ms();
    cpw_testkit::wait_until(
        "the clock to pass the log's first event by the margin",
        Duration::from_millis(20),
        async || now_ms() > logged + MARGIN_MS + 200,
    )
    .await;
    event.body
}

/// Publishes `id` as a command whose first request left `ago_ms` ago.
async fn publish_first_attempted(app: &TestApp, id: &str, ago_ms: i64) {
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from(FIRST_ATTEMPT_HEADER),
        AMQPValue::LongLongInt(now_ms() - ago_ms),
    );
    let body = command(id).to_string();
    let props = BasicProperties::default().with_headers(headers);
    let props = sealed(props, body.as_bytes(), SIM_KEY);
    app.publish_raw(body.as_bytes(), props).await;
}

/// A purchase made straight at the simulator under `key`, as the command's
/// own first request would have made it before its answer was lost.
async fn buy_directly(app: &TestApp, key: &str) {
    let charged = reqwest::Client::new()
        .post(format!(
            "{}/v1/customers/cus_Typ0px2W0aiEtl/credits/itm_3kXODDF42QXtnL/purchase",
            app.sim.base_url()
        ))
        .bearer_auth("sim_test_key")
        .header("Idempotency-Key", key)
        .json(&json!({"credit_count": 32, "amount_excluding_tax": 24000}))
        .send()
        .await
        .expect("an answer");
    assert_eq!(charged.status(), 201);
}

#[tokio::test]
async fn past_the_window_and_not_charged_it_is_purchased_once_with_the_setting_on() {
    let mut app = app(true).await;
    let id = command_id();
    publish_first_attempted(&app, &id, 20_000).await;
    let event = app.next_event().await;
    assert_eq!(event.kind(), "credit_purchase.succeeded", "{}", event.body);
    assert!(event.body.get("reconciled").is_none(), "{}", event.body);
    let ledger = app.ledger();
    assert_eq!(ledger.charges_for(&id), 1);
    assert_eq!(ledger.reads, 1, "looked up once");
    assert!(app.no_event_for(Duration::from_secs(2)).await);
    assert_eq!(app.ledger().charges_for(&id), 1, "exactly once");
    app.cleanup().await;
}

#[tokio::test]
async fn past_the_window_and_not_charged_it_is_refused_with_the_setting_off() {
    let mut app = app(false).await;
    let id = command_id();
    publish_first_attempted(&app, &id, 20_000).await;
    let event = app.next_event().await;
    assert_eq!(
        (event.kind(), event.code()),
        ("credit_purchase.failed", "retries_exhausted"),
        "{}",
        event.body
    );
    let ledger = app.ledger();
    assert_eq!((ledger.charges.len(), ledger.reads), (0, 0));
    app.wait_dead_letters(1).await;
    app.cleanup().await;
}

#[tokio::test]
async fn past_the_window_and_charged_once_it_succeeds_reconciled() {
    let mut app = app(true).await;
    warm_log(&mut app).await;
    let id = command_id();
    // The first request charged, and its answer was lost.
    buy_directly(&app, &id).await;
    // No command that could have made the charge can still be silent: the
    // check at the window would otherwise find it too young to judge.
    let charged_at = now_ms();
    cpw_testkit::wait_until(
        "the charge to pass the unseen bound",
        Duration::from_millis(100),
        async || now_ms() > charged_at + UNSEEN_MS + 200,
    )
    .await;
    let ago = now_ms() - charged_at + 2_000 + 1_000 * WINDOW_SECS as i64;
    publish_first_attempted(&app, &id, ago).await;
    let event = app.next_event().await;
    let charge = app
        .ledger()
        .charges
        .into_iter()
        .find(|c| c.idempotency_key.as_deref() == Some(id.as_str()))
        .expect("its charge");
    assert_eq!(event.kind(), "credit_purchase.succeeded", "{}", event.body);
    assert_eq!(event.body["reconciled"], true);
    assert_eq!(event.body["attempts"], 1, "a charge took a request");
    assert_eq!(event.body["invoice_id"], json!(charge.invoice_id));
    assert_eq!(
        event.body["new_credit_balance"],
        json!(charge.new_credit_balance)
    );
    assert!(app.no_event_for(Duration::from_secs(1)).await);
    assert_eq!(app.ledger().charges_for(&id), 1, "not charged again");
    app.cleanup().await;
}

#[tokio::test]
async fn past_the_window_another_commands_charge_is_never_taken_for_its_own() {
    let mut app = app(true).await;
    // Inside the window: the same purchase by another command, whose
    // succeeded event claims its charge in the results log.
    let other = warm_log(&mut app).await;
    let id = command_id();
    publish_first_attempted(&app, &id, 20_000).await;
    let event = app.next_event().await;
    assert_eq!(event.kind(), "credit_purchase.succeeded", "{}", event.body);
    assert!(
        event.body.get("reconciled").is_none(),
        "bought on its own, not settled with the other's charge: {}",
        event.body
    );
    assert_ne!(event.body["invoice_id"], other["invoice_id"]);
    assert_eq!(app.ledger().charges_for(&id), 1);
    assert!(app.no_event_for(Duration::from_secs(1)).await);
    app.cleanup().await;
}

#[tokio::test]
async fn past_the_window_a_charge_another_command_could_still_claim_is_left_to_reconcile() {
    let mut app = app(true).await;
    warm_log(&mut app).await;
    let id = command_id();
    // A charge just made under the command's key: another command of the
    // same purchase could have made it as well and not have spoken yet.
    buy_directly(&app, &id).await;
    publish_first_attempted(&app, &id, 2_000 + 1_000 * WINDOW_SECS as i64).await;
    let event = app.next_event().await;
    assert_eq!(event.kind(), "credit_purchase.failed", "{}", event.body);
    assert_eq!(event.code(), "retries_exhausted", "{}", event.body);
    let message = event.body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("run again after"), "{message}");
    assert!(app.no_event_for(Duration::from_secs(1)).await);
    assert_eq!(app.ledger().charges_for(&id), 1, "not charged again");
    app.cleanup().await;
}
