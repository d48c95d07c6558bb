//! Past the in-process budget, commands go through the broker-side delay
//! queues; past the last one, a single `retries_exhausted` and a dead letter.

use credit_purchase_worker::simulator::FaultsPatch;
use lapin::BasicProperties;

use cpw_testkit::app::{command, command_id, spawn_app};

#[tokio::test]
async fn retries_exhausted_across_the_delay_queues() {
    let mut app = spawn_app().await;
    app.set_faults(FaultsPatch {
        fail_rate: Some(1.0),
        ..FaultsPatch::default()
    });
    let id = command_id();
    let reply_queue = format!("{}.replies", app.queue);
    app.channel
        .queue_declare(
            reply_queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .expect("reply queue");
    app.publish_raw(
        command(&id).to_string().as_bytes(),
        BasicProperties::default().with_reply_to(reply_queue.as_str().into()),
    )
    .await;
    // 4 attempts per delivery, 3 deliveries (the first and 2 delay steps).
    let event = app.expect_exhausted(&id, 12, 2).await;
    assert!(
        event.body["error"]["http_status"]
            .as_u64()
            .is_some_and(|s| (500..600).contains(&s))
    );
    for step in [1, 2] {
        assert_eq!(app.depth(&format!("{}.retry.{step}s", app.queue)).await, 0);
    }
    app.wait_until_drained().await;
    // reply_to got the same event.
    let reply = app
        .channel
        .basic_get(
            reply_queue.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .expect("get");
    let reply = reply.expect("the event was also sent to reply_to");
    let body: serde_json::Value = serde_json::from_slice(&reply.delivery.data).expect("json");
    assert_eq!(body["event_id"], event.body["event_id"]);
    app.cleanup().await;
}

#[tokio::test]
async fn a_command_that_recovers_in_a_delay_queue_succeeds_once() {
    let mut app = spawn_app().await;
    app.set_faults(FaultsPatch {
        fail_rate: Some(1.0),
        ..FaultsPatch::default()
    });
    let id = command_id();
    app.publish(&command(&id)).await;
    // The first delivery spends its 4 attempts, then the command waits 1 s.
    app.wait_requests(4).await;
    app.set_faults(FaultsPatch {
        fail_rate: Some(0.0),
        ..FaultsPatch::default()
    });
    let event = app.next_event().await;
    assert_eq!(event.kind(), "credit_purchase.succeeded");
    assert_eq!(event.body["attempts"], 5, "the count crosses the broker");
    assert_eq!(app.ledger().charges_for(&id), 1);
    assert_eq!(app.take_dead_letters().await.len(), 0);
    app.cleanup().await;
}
