//! Lanes (`amqp.lanes`): commands queues that share the write budget by
//! weight. What they must keep: the shares under contention, a lane's
//! copies in its own queues, no head-of-line blocking between lanes, and a
//! deployment without lanes exactly as it was.

use std::collections::HashMap;

use cpw_testkit::app::{Options, TestApp, spawn_without_worker};
use cpw_testkit::commands::{command, command_id};
use credit_purchase_worker::broker::Topology;
use credit_purchase_worker::configuration::Settings;
use credit_purchase_worker::simulator::{Faults, FaultsPatch};
use lapin::BasicProperties;

const TWO_LANES: &str = "interactive:4,bulk:1";

/// The lane of each charge, in the order the simulator made them.
fn charged_lanes<'a>(app: &TestApp, lane_of: &'a HashMap<String, &'a str>) -> Vec<&'a str> {
    app.ledger()
        .charges
        .iter()
        .filter_map(|charge| charge.idempotency_key.as_deref())
        .filter_map(|key| lane_of.get(key).copied())
        .collect()
}

/// 100 commands wait in each lane before the worker starts; the simulator
/// allows 20 writes a second, so the gate, not the API's speed, decides who
/// goes. In the steady state (past the first turns, while both lanes still
/// wait) four writes in five are the interactive lane's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_lanes_share_the_write_budget_by_their_shares() {
    let options = Options::default()
        .env("CPW__AMQP__LANES", TWO_LANES)
        .faults(Faults {
            rate_limit: 20,
            rate_limit_window_ms: 1_000,
            ..Faults::default()
        });
    let mut app = spawn_without_worker(options).await;
    let mut lane_of: HashMap<String, &str> = HashMap::new();
    // Bulk first: a FIFO queue would answer all of it before any checkout.
    for lane in ["bulk", "interactive"] {
        let queue = format!("{}.{lane}", app.queue);
        for _ in 0..100 {
            let id = command_id();
            let body = command(&id).to_string();
            app.publish_to(&queue, body.as_bytes(), BasicProperties::default())
                .await;
            lane_of.insert(id, lane);
        }
    }
    app.start_worker().await;
    let ids: Vec<String> = lane_of.keys().cloned().collect();
    app.events_answering(&ids).await;
    app.assert_charged_once(&ids);
    let order = charged_lanes(&app, &lane_of);
    assert_eq!(order.len(), 200, "every command charged");
    // Charges 21 to 120: the interactive lane (100 commands at 4 in 5)
    // still waits until about the 125th.
    let steady = &order[20..120];
    let interactive = steady.iter().filter(|lane| **lane == "interactive").count();
    assert!(
        (75..=85).contains(&interactive),
        "{interactive} of 100 writes were the interactive lane's (share 4 of 5): {order:?}"
    );
    let writes = app
        .metric("cpw_lane_writes_total{lane=\"interactive\"}")
        .await;
    assert!(writes >= 100.0, "the lane's writes are counted: {writes}");
    app.cleanup().await;
}

/// Bulk commands fill the bulk lane's prefetch, all waiting at the gate
/// (2 writes a second); a checkout published then gets its turn among the
/// next few writes, not after the bulk lane's slots drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_does_not_wait_behind_the_bulk_lanes_deliveries() {
    let options = Options::default()
        .env("CPW__AMQP__LANES", TWO_LANES)
        .env("CPW__HYPERLINE__MAX_REQUESTS_PER_SECOND", "4");
    let mut app = spawn_without_worker(options).await;
    let bulk = format!("{}.bulk", app.queue);
    let mut lane_of: HashMap<String, &str> = HashMap::new();
    for _ in 0..60 {
        let id = command_id();
        let body = command(&id).to_string();
        app.publish_to(&bulk, body.as_bytes(), BasicProperties::default())
            .await;
        lane_of.insert(id, "bulk");
    }
    app.start_worker().await;
    // The bulk lane holds its whole prefetch (32) by now.
    cpw_testkit::wait_until(
        "the bulk lane to be written to",
        std::time::Duration::from_millis(20),
        async || app.ledger().charges.len() >= 3,
    )
    .await;
    let checkout = command_id();
    let before = app.ledger().charges.len();
    let body = command(&checkout).to_string();
    app.publish_to(
        &format!("{}.interactive", app.queue),
        body.as_bytes(),
        BasicProperties::default(),
    )
    .await;
    lane_of.insert(checkout.clone(), "interactive");
    let ids: Vec<String> = lane_of.keys().cloned().collect();
    let events = app.events_answering(&ids).await;
    assert!(
        events
            .iter()
            .all(|e| e.kind() == "credit_purchase.succeeded"),
        "every command succeeded"
    );
    let ledger = app.ledger();
    let at = ledger
        .charges
        .iter()
        .position(|c| c.idempotency_key.as_deref() == Some(checkout.as_str()))
        .expect("the checkout charged");
    assert!(
        at <= before + 2,
        "the checkout was charge {} of the worker; {before} were made when it was published",
        at + 1
    );
    app.assert_charged_once(&ids);
    app.cleanup().await;
}

/// A command of the interactive lane that the API fails goes to the
/// interactive lane's delay queue, never the bulk lane's, and comes back to
/// its lane to succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_command_stays_in_its_lane() {
    let options = Options::default()
        .env("CPW__AMQP__LANES", TWO_LANES)
        .env("CPW__RETRY__REDELIVERY_DELAYS_SECS", "4");
    let mut app = spawn_without_worker(options).await;
    app.set_faults(FaultsPatch {
        fail_rate: Some(1.0),
        ..FaultsPatch::default()
    });
    app.start_worker().await;
    let id = command_id();
    let body = command(&id).to_string();
    let interactive = format!("{}.interactive", app.queue);
    app.publish_to(&interactive, body.as_bytes(), BasicProperties::default())
        .await;
    let own_delay = format!("{interactive}.retry.4s");
    app.wait_depth(&own_delay, 1).await;
    assert_eq!(
        app.depth(&format!("{}.bulk.retry.4s", app.queue)).await,
        0,
        "nothing in the other lane's delay queue"
    );
    app.set_faults(FaultsPatch {
        fail_rate: Some(0.0),
        ..FaultsPatch::default()
    });
    let event = app.event_for(&id).await;
    assert_eq!(event["type"], "credit_purchase.succeeded", "{event}");
    app.assert_charged_once(std::slice::from_ref(&id));
    app.cleanup().await;
}

/// Without `amqp.lanes` the topology is the one every release before lanes
/// declared, name for name; and a deployment that adds lanes later can keep
/// its existing queue as one of them, with the commands already in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_without_lanes_keeps_its_queues_and_can_add_lanes_over_them() {
    let env = |extra: &[(&str, &str)]| {
        let mut env = vec![(
            "CPW__RETRY__REDELIVERY_DELAYS_SECS".to_owned(),
            "30,300,30".to_owned(),
        )];
        env.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        env
    };
    let settings = Settings::load_from(None, env(&[])).expect("defaults");
    let topology = Topology::new(&settings.amqp, &settings.retry.redelivery_delays_secs);
    let names: Vec<String> = topology.objects().into_iter().map(|o| o.name).collect();
    assert_eq!(
        names,
        [
            "credit-purchases",
            "credit-purchase-results",
            "credit-purchases.dlx",
            "credit-purchases.dead",
            "credit-purchases",
            "credit-purchases.retry.30s",
            "credit-purchases.retry.300s",
            "credit-purchase-results.log",
        ]
    );
    let lanes = Settings::load_from(
        None,
        env(&[("CPW__AMQP__LANES", "interactive:4,bulk:1:credit-purchases")]),
    )
    .expect("lanes over the existing queue");
    let with_lanes = Topology::new(&lanes.amqp, &lanes.retry.redelivery_delays_secs);
    let existing: Vec<_> = topology.objects().into_iter().map(|o| o.name).collect();
    for object in with_lanes.objects() {
        if let Some(same) = topology
            .objects()
            .into_iter()
            .find(|o| o.name == object.name && o.what == object.what)
        {
            assert_eq!(
                format!("{:?}", same.shape),
                format!("{:?}", object.shape),
                "{} is declared as before",
                object.name
            );
        }
    }
    assert!(
        existing
            .iter()
            .all(|name| with_lanes.objects().iter().any(|o| &o.name == name))
    );

    // On the broker: commands wait in a queue of the release without lanes;
    // the worker starts with lanes, the old queue as its bulk lane.
    let mut app = spawn_without_worker(Options::default()).await;
    let ids = app.publish_commands(5).await;
    let lanes = format!("interactive:4,bulk:1:{}", app.queue);
    app.env.insert("CPW__AMQP__LANES".to_owned(), lanes);
    let settings = app.settings();
    let topology = Topology::new(&settings.amqp, &settings.retry.redelivery_delays_secs);
    for queue in topology.queue_names() {
        app.guard_queue(&queue);
    }
    app.start_worker().await;
    app.events_answering(&ids).await;
    app.assert_charged_once(&ids);
    let interactive = command_id();
    let body = command(&interactive).to_string();
    app.publish_to(
        &format!("{}.interactive", app.queue),
        body.as_bytes(),
        BasicProperties::default(),
    )
    .await;
    let event = app.event_for(&interactive).await;
    assert_eq!(event["type"], "credit_purchase.succeeded", "{event}");
    app.cleanup().await;
}
