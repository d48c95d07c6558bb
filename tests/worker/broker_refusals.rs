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

use cpw_testkit::app::{Options, TestApp, WAIT, command, command_for, command_id, spawn_app_with};

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
