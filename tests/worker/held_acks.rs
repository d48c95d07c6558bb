//! Held acks go out on a timer once the delivery they wait behind grows old,
//! not only at the next settlement of the channel: on the real broker, with
//! the worker's own [`Settlements`] on a consuming channel.

use std::time::Duration;

use cpw_testkit::broker::{amqp_url, connect, depth, publish};
use cpw_testkit::guard::Declared;
use cpw_testkit::wait_until;
use credit_purchase_worker::broker::{Settle, Settlements};
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};

use cpw_testkit::app::WAIT;

/// Far above the 100 ms behind which acks are held, far below a slow API.
const PATIENCE: Duration = Duration::from_millis(1500);

async fn consuming(connection: &Connection, queue: &str) -> (Channel, lapin::Consumer) {
    let channel = connection.create_channel().await.expect("channel");
    channel
        .basic_qos(8, BasicQosOptions::default())
        .await
        .expect("qos");
    let consumer = channel
        .basic_consume(
            queue.into(),
            "held-acks".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    (channel, consumer)
}

/// Three deliveries; the second and third finish at once, the first never
/// does. Their acks are held behind the first, then must go out on their
/// own: when the channel closes with the first still open, only the first
/// goes back to the queue. Before the timer, all three went back (the held
/// acks waited for a settlement that never came).
#[tokio::test]
async fn held_acks_go_out_on_a_timer_behind_a_delivery_that_never_settles() {
    let connection = connect("cpw-test-held-acks").await.expect("broker");
    let queue = format!("cpw-test-held-{}", uuid::Uuid::new_v4().simple());
    let mut declared = Declared::on(&amqp_url());
    declared.add_queue(&queue);
    let publisher = connection.create_channel().await.expect("channel");
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    publisher
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("a queue of its own");
    for n in 1..=3u8 {
        publish(&publisher, &queue, &[n], BasicProperties::default()).await;
    }

    let (channel, mut consumer) = consuming(&connection, &queue).await;
    let settlements = Settlements::new(channel.clone(), 8);
    let mut taken = Vec::new();
    while taken.len() < 3 {
        let next = tokio::time::timeout(WAIT, consumer.next()).await;
        let delivery = next.expect("three deliveries").expect("open").expect("ok");
        taken.push(settlements.take(delivery, 0));
    }
    let slow = taken.remove(0);
    for done in &taken {
        done.settle(Settle::Ack).expect("channel open");
    }
    tokio::time::sleep(PATIENCE).await;
    // Closed with the slow one unsettled: the broker requeues what is unacked.
    channel.close(200, "test".into()).await.expect("close");
    wait_until(
        "the unacked to be requeued",
        Duration::from_millis(20),
        async || depth(&connection, &queue).await >= 1,
    )
    .await;
    // Whatever else was unacked goes back with it, at the same moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let left = depth(&connection, &queue).await;
    assert_eq!(left, 1, "only the slow delivery went back, {left} did");
    drop(slow);

    publisher
        .queue_delete(queue.as_str().into(), Default::default())
        .await
        .expect("delete");
    let _ = connection.close(200, "done".into()).await;
}
