//! RabbitMQ ends a consumer whose delivery stays unacknowledged past
//! `consumer_timeout`: 3.x closes the channel, 4.3 answers on a quorum queue
//! with `basic.cancel` and leaves the channel open. lapin's consumer stream
//! simply ends on a cancel, and a worker that does not consume again sits
//! idle, reporting ready, while its queue fills. Here a node of its own
//! (the suite `CPW_TEST_BROKER_SUITE` names) has a 5-s timeout, the API
//! holds the first command's request past it, and a command published after
//! the broker ended the consumer must still be answered; each is charged
//! once.

use std::time::Duration;

use cpw_testkit::app::{Options, command, command_id, spawn_without_worker};
use cpw_testkit::cluster::Cluster;
use credit_purchase_worker::simulator::{Faults, FaultsPatch};

use crate::cluster::ONE_CLUSTER;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_the_broker_times_out_consumes_again() {
    let _one = ONE_CLUSTER.lock().await;
    let node = match tokio::task::block_in_place(|| {
        Cluster::start_with(1, &["consumer_timeout = 5000"])
    }) {
        Ok(node) => node,
        Err(skip) => {
            println!("skipped: {skip}");
            return;
        }
    };
    println!(
        "a node of RabbitMQ ({}) with a 5-s consumer timeout",
        node.suite
    );
    // 4.3's quorum queue times its consumers out itself, within seconds;
    // before it, the channel checks once a minute (RabbitMQ's docs: values
    // under a minute are not supported), so the hold must outlast a check.
    let hold = match node.suite.as_str() {
        "sid" => Duration::from_secs(20),
        _ => Duration::from_secs(75),
    };
    let faults = Faults {
        latency_ms: u64::try_from(hold.as_millis()).expect("a few seconds"),
        rate_limit: 0,
        ..Faults::default()
    };
    let mut app = spawn_without_worker(
        Options::default()
            .driver(&node.url(0))
            .env("CPW__AMQP__URL", node.url(0))
            .env("CPW__HYPERLINE__TIMEOUT_SECS", hold.as_secs() + 30)
            // The redelivered command meets its own first request still
            // running (409). The test's budget of 409s is a few hundred
            // milliseconds, so one delay step past the hold stands in for
            // the defaults' (minutes, beyond any request's timeout).
            .env("CPW__RETRY__REDELIVERY_DELAYS_SECS", hold.as_secs() + 5)
            .faults(faults),
    )
    .await;
    app.start_worker().await;
    app.wait_readyz(200).await;

    // Held past the timeout: the broker ends the consumer, which the worker
    // counts as a lost session and rebuilds.
    let held = command_id();
    app.publish(&command(&held)).await;
    app.wait_requests(1).await;
    let ended = tokio::time::timeout(hold, async {
        while app.metric("cpw_reconnects_total").await < 1.0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    assert!(
        ended.await.is_ok(),
        "the broker ended the consumer of a delivery held {hold:?}"
    );

    // Published after the consumer was ended: answered only by a replica
    // that consumes again.
    app.set_faults(FaultsPatch {
        latency_ms: Some(0),
        ..FaultsPatch::default()
    });
    let after = command_id();
    app.publish(&command(&after)).await;
    let ids = [held, after];
    // The held command may have to wait out its delay step behind its own
    // first request: the bound is the hold, the step and a margin.
    let answered_both = |events: &[cpw_testkit::broker::Event]| {
        ids.iter()
            .all(|id| events.iter().any(|e| e.command_id() == id))
    };
    let events = app
        .events_until(hold * 2 + Duration::from_secs(60), answered_both)
        .await;
    for event in events
        .iter()
        .filter(|e| ids.iter().any(|id| id == e.command_id()))
    {
        assert_eq!(event.kind(), "credit_purchase.succeeded", "{}", event.body);
    }
    app.assert_charged_once(&ids);
    app.wait_readyz(200).await;
    app.cleanup().await;
    drop(node);
}
