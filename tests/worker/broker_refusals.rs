//! The broker says no: an event it refuses, a copy it cannot route. The
//! command must wait in the broker with what the worker learned (never a hot
//! loop of purchases), and must never be acked on a copy that went nowhere.

use std::time::Duration;

use credit_purchase_worker::simulator::{FaultsPatch, ScriptedResponse};
use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{
    BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde_json::json;

use cpw_testkit::app::{
    Options, SIM_KEY, TestApp, WAIT, command, command_for, command_id, spawn_app_with,
};
use cpw_testkit::broker::{amqp_url, sealed};
use cpw_testkit::proxy::Proxy;
use credit_purchase_worker::broker::history::STEP_HEADER;

/// Sum of the ready messages in these queues.
async fn parked(app: &TestApp, queues: &[String]) -> u32 {
    let mut total = 0;
    for queue in queues {
        total += app.depth(queue).await;
    }
    total
}

/// Waits until `n` commands wait in these queues.
async fn wait_parked(app: &TestApp, queues: &[String], n: u32) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while parked(app, queues).await != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never {n} commands waiting in the broker (now {})",
            parked(app, queues).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_refused_event_waits_in_the_broker_without_replaying_the_purchase() {
    let mut app = spawn_app_with(Options::default()).await;
    // A queue that refuses every event: the broker nacks each publish.
    let blocker = format!("{}.blocker", app.queue);
    app.guard_queue(&blocker);
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    app.channel
        .queue_declare(
            blocker.as_str().into(),
            QueueDeclareOptions::default(),
            args,
        )
        .await
        .expect("blocker");
    app.channel
        .queue_bind(
            blocker.as_str().into(),
            app.results_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind blocker");
    let id = command_id();
    app.publish(&command(&id)).await;

    // Twenty seconds of refusals: the purchase is made once, and its
    // outcome waits in the delay queues instead of being bought again.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let purchases = app.sim.requests().len();
    assert!(
        purchases <= 3,
        "{purchases} purchase requests in 20 s: a hot loop"
    );
    assert_eq!(app.ledger().charges_for(&id), 1);
    app.stop_worker().await;
    let queues = [
        app.queue.clone(),
        format!("{}.retry.1s", app.queue),
        format!("{}.retry.2s", app.queue),
    ];
    wait_parked(&app, &queues, 1).await;
    assert_eq!(
        app.take_dead_letters().await.len(),
        0,
        "never dead-lettered"
    );

    // The blocker goes: the command is answered, from what it carried.
    app.channel
        .queue_delete(blocker.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("blocker gone");
    let after = format!("{}.after", app.queue);
    app.channel
        .queue_declare(
            after.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("after");
    app.channel
        .queue_bind(
            after.as_str().into(),
            app.results_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind after");
    let mut events = app
        .channel
        .basic_consume(
            after.as_str().into(),
            "after".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume after");
    app.start_worker().await;
    let delivery = tokio::time::timeout(WAIT, events.next())
        .await
        .expect("an event once the blocker is gone")
        .expect("stream")
        .expect("delivery");
    let event: serde_json::Value = serde_json::from_slice(&delivery.data).expect("json");
    assert_eq!(event["type"], "credit_purchase.succeeded");
    assert_eq!(event["command_id"], id.as_str());
    assert_eq!(event["attempts"], 1);
    wait_parked(&app, &queues, 0).await;
    assert_eq!(app.sim.requests().len(), purchases, "no purchase replayed");
    assert_eq!(app.ledger().charges_for(&id), 1);
    app.cleanup().await;
}

/// Commands of each kind: enough for the broker to confirm several
/// publishes with one multiple ack.
const N: usize = 40;

#[tokio::test]
async fn an_unroutable_copy_is_never_taken_for_a_routed_one() {
    let mut app =
        spawn_app_with(Options::default().env("CPW__RETRY__REDELIVERY_DELAYS_SECS", "1")).await;
    // The delay queue is gone (once the worker declared its topology):
    // every copy to it is returned.
    app.wait_readyz(200).await;
    app.channel
        .queue_delete(
            format!("{}.retry.1s", app.queue).as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await
        .expect("delete the delay queue");
    app.set_faults(FaultsPatch {
        scripted: Some(vec![ScriptedResponse {
            customer_id: Some("cus_failing".into()),
            status: 503,
            body: json!({"message": "down"}),
            headers: Default::default(),
            times: None,
        }]),
        ..FaultsPatch::default()
    });
    // Events returned too (their reply_to queue does not exist), on the
    // same channel in the old design, interleaved with the copies.
    let nowhere = format!("{}.nowhere", app.queue);
    let mut failing = Vec::new();
    let mut ok = Vec::new();
    for _ in 0..N {
        let id = command_id();
        app.publish(&command_for(&id, "cus_failing")).await;
        failing.push(id);
        let id = command_id();
        app.publish_raw(
            command(&id).to_string().as_bytes(),
            BasicProperties::default().with_reply_to(nowhere.as_str().into()),
        )
        .await;
        ok.push(id);
    }
    let events = app
        .events_until(WAIT, |events| {
            ok.iter()
                .all(|id| events.iter().any(|e| e.command_id() == id))
        })
        .await;
    assert!(
        events
            .iter()
            .all(|e| !failing.contains(&e.command_id().to_owned())),
        "no event for a command whose copy went nowhere"
    );
    // Let the failing commands meet the missing queue a few times.
    app.wait_requests(N * 2 * 4 + N).await;
    app.stop_worker().await;
    wait_parked(&app, &[app.queue.clone()], N as u32).await;
    assert_eq!(app.take_dead_letters().await.len(), 0);
    app.assert_charged_once(&ok);
    app.cleanup().await;
}

/// A copy whose confirm comes too late is not confirmed; the channel it
/// went out on must not carry the next one. Here the broker's ack of the
/// late copy reaches the worker after the return of the next copy, an
/// unroutable one (as when the broker acks both at once and the client
/// resolves the older first): on the same channel, the return was read
/// against the late copy, the unroutable one taken for routed, and its
/// command acked with its copy nowhere, never answered.
#[tokio::test]
async fn a_copy_after_one_that_timed_out_goes_on_a_fresh_channel() {
    let proxy = Proxy::start(&amqp_url()).await;
    let options = Options::default()
        .env("CPW__AMQP__URL", proxy.url())
        .env("CPW__AMQP__CONFIRM_TIMEOUT_SECS", 1)
        .env("CPW__RETRY__REDELIVERY_DELAYS_SECS", "1,2");
    let mut app = spawn_app_with(options).await;
    app.wait_readyz(200).await;
    // Copies to the second delay step go nowhere.
    app.channel
        .queue_delete(
            format!("{}.retry.2s", app.queue).as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await
        .expect("delete the delay queue");
    let down = |customer: &str| ScriptedResponse {
        customer_id: Some(customer.into()),
        status: 503,
        body: json!({"message": "down"}),
        headers: Default::default(),
        times: Some(4),
    };
    app.set_faults(FaultsPatch {
        scripted: Some(vec![down("cus_late"), down("cus_lost")]),
        ..FaultsPatch::default()
    });
    // The first command's copy, to the first delay step, is confirmed
    // only after the confirm timeout.
    proxy.hold_next_confirm();
    let late = command_id();
    app.publish(&command_for(&late, "cus_late")).await;
    cpw_testkit::wait_until(
        "the late copy's confirm to be held",
        Duration::from_millis(20),
        async || proxy.holding(),
    )
    .await;
    // The second one is at the second step: its copy is unroutable.
    let lost = command_id();
    let body = command_for(&lost, "cus_lost").to_string();
    let mut headers = FieldTable::default();
    headers.insert(STEP_HEADER.into(), AMQPValue::LongLongInt(1));
    let props = sealed(
        BasicProperties::default().with_headers(headers),
        body.as_bytes(),
        SIM_KEY,
    );
    app.publish_raw(body.as_bytes(), props).await;
    let event = app.event_for(&lost).await;
    assert_eq!(event["type"], "credit_purchase.succeeded", "{event}");
    assert_eq!(app.ledger().charges_for(&lost), 1);
    app.cleanup().await;
}
