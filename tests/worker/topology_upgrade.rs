//! Queue arguments added after queues existed: RabbitMQ compares
//! `x-quorum-initial-group-size` and `x-delivery-limit` on every
//! redeclaration, so a queue created before the worker declared them must
//! not stop the worker from starting, while a queue created with another
//! value is still refused. And the dead queue's explicit limit itself.

use std::time::Duration;

use cpw_testkit::broker::{connect, publish, worker_env};
use cpw_testkit::guard::Declared;
use cpw_testkit::wait_until;
use credit_purchase_worker::broker::Topology;
use credit_purchase_worker::configuration::Settings;
use lapin::BasicProperties;
use lapin::options::{
    BasicGetOptions, BasicNackOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};

/// The commands queue's arguments as declared before the group size
/// existed, plus `group_size` when given.
fn commands_arguments(topology: &Topology, group_size: Option<i64>) -> FieldTable {
    let mut args = FieldTable::default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    args.insert("x-queue-type".into(), text("quorum"));
    args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    args.insert("x-overflow".into(), text("reject-publish"));
    args.insert("x-dead-letter-exchange".into(), text(&topology.dlx));
    args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(20));
    if let Some(size) = group_size {
        args.insert(
            "x-quorum-initial-group-size".into(),
            AMQPValue::LongLongInt(size),
        );
    }
    args
}

/// Declares the commands queue with `group_size`, then the worker's whole
/// topology over it; what the worker's declaration returned.
async fn redeclare_over(group_size: Option<i64>) -> Result<(), String> {
    redeclare_over_queue(|topology| {
        (
            topology.queue.clone(),
            commands_arguments(topology, group_size),
        )
    })
    .await
}

/// Declares the queue `earlier` names with the arguments it gives, then the
/// worker's whole topology over it; what the worker's declaration returned.
async fn redeclare_over_queue(
    earlier: impl FnOnce(&Topology) -> (String, FieldTable),
) -> Result<(), String> {
    let queue = format!("cpw-test-upgrade-{}", uuid::Uuid::new_v4().simple());
    let env = worker_env(&queue, "http://127.0.0.1:1", "unused");
    let settings = Settings::load_from(None, env).expect("valid settings");
    assert_eq!(settings.amqp.quorum_initial_group_size, 3, "the default");
    let topology = Topology::new(&settings.amqp, &settings.retry.redelivery_delays_secs);
    let declared = Declared::topology(&topology);
    let connection = connect("cpw-test-upgrade").await.expect("broker reachable");
    let channel = connection.create_channel().await.expect("channel");
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let (name, arguments) = earlier(&topology);
    channel
        .queue_declare(name.as_str().into(), durable, arguments)
        .await
        .expect("the queue as an earlier version declared it");
    let result = topology
        .declare(&connection)
        .await
        .map_err(|e| e.to_string());
    drop(declared);
    result
}

#[tokio::test]
async fn a_quorum_queue_created_without_a_group_size_is_kept() {
    redeclare_over(None)
        .await
        .expect("the worker starts on a queue of an earlier version");
}

#[tokio::test]
async fn a_quorum_queue_created_with_another_group_size_is_still_refused() {
    let refused = redeclare_over(Some(5)).await.expect_err("inequivalent");
    assert!(
        refused.contains("x-quorum-initial-group-size"),
        "the broker's reason: {refused}"
    );
    redeclare_over(Some(3))
        .await
        .expect("the same size is idempotent");
}

/// The dead-letter queue as releases before its explicit delivery limit
/// declared it, with or without a group size.
fn earlier_dead_arguments(group_size: Option<i64>) -> FieldTable {
    let mut args = FieldTable::default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    args.insert("x-queue-type".into(), text("quorum"));
    args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    args.insert("x-overflow".into(), text("reject-publish"));
    if let Some(size) = group_size {
        args.insert(
            "x-quorum-initial-group-size".into(),
            AMQPValue::LongLongInt(size),
        );
    }
    args
}

#[tokio::test]
async fn a_dead_letter_queue_created_without_a_delivery_limit_is_kept() {
    for group_size in [Some(3), None] {
        redeclare_over_queue(|topology| {
            (topology.dead.clone(), earlier_dead_arguments(group_size))
        })
        .await
        .unwrap_or_else(|e| panic!("group size {group_size:?}: the worker starts: {e}"));
    }
}

#[tokio::test]
async fn a_dead_letter_queue_with_another_delivery_limit_is_still_refused() {
    let refused = redeclare_over_queue(|topology| {
        let mut args = earlier_dead_arguments(Some(3));
        args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(20));
        (topology.dead.clone(), args)
    })
    .await
    .expect_err("inequivalent");
    assert!(
        refused.contains("x-delivery-limit"),
        "the broker's reason: {refused}"
    );
}

/// From RabbitMQ 4.0 a quorum queue without `x-delivery-limit` drops a
/// message at its 20th return; the dead queue has no dead-letter exchange,
/// so a letter read thirty times by tools that hand it back with `nack`
/// (or crash holding it) would be gone. Shows on 4.x only: 3.x has no
/// default limit.
#[tokio::test]
async fn a_letter_returned_thirty_times_stays_in_the_dead_queue() {
    let queue = format!("cpw-test-worn-dead-{}", uuid::Uuid::new_v4().simple());
    let env = worker_env(&queue, "http://127.0.0.1:1", "unused");
    let settings = Settings::load_from(None, env).expect("valid settings");
    let topology = Topology::new(&settings.amqp, &settings.retry.redelivery_delays_secs);
    let declared = Declared::topology(&topology);
    let connection = connect("cpw-test-worn-dead")
        .await
        .expect("broker reachable");
    topology.declare(&connection).await.expect("the topology");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    publish(
        &channel,
        &topology.dead,
        b"a letter",
        BasicProperties::default(),
    )
    .await;
    for read in 1..=30 {
        let letter = get(
            &channel,
            &topology.dead,
            &format!("the letter at read {read}"),
        )
        .await;
        letter
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await
            .expect("nack");
    }
    let last = get(&channel, &topology.dead, "the letter after 30 returns").await;
    assert_eq!(last.data, b"a letter", "the same letter");
    drop(declared);
}

/// `basic.get` from `queue` until a message comes (a nacked message is back
/// in the queue a moment after the nack), within the testkit's bound.
async fn get(channel: &lapin::Channel, queue: &str, what: &str) -> lapin::message::Delivery {
    let mut got = None;
    wait_until(what, Duration::from_millis(20), async || {
        got = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .expect("basic.get");
        got.is_some()
    })
    .await;
    got.map(|m| m.delivery).expect("waited for it")
}
