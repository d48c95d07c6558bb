//! `amqp.quorum_initial_group_size` on queues that already exist: RabbitMQ
//! compares `x-quorum-initial-group-size` on every redeclaration, so a queue
//! created before the setting existed must not stop the worker from
//! starting, while a queue created with another size is still refused.

use cpw_testkit::broker::{connect, worker_env};
use cpw_testkit::guard::Declared;
use credit_purchase_worker::broker::Topology;
use credit_purchase_worker::configuration::Settings;
use lapin::options::QueueDeclareOptions;
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
    channel
        .queue_declare(
            queue.as_str().into(),
            durable,
            commands_arguments(&topology, group_size),
        )
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
