//! A real memory alarm on a RabbitMQ node of the test's own
//! (`cpw_testkit::cluster`, one node), raised with purchases in flight: the
//! broker blocks the worker's connection as soon as it publishes. While it
//! does, `/readyz` says so and the worker takes no new delivery; once the
//! alarm clears, every command is answered, charged once and acked.
//! Skipped, with the reason printed, where RabbitMQ is not installed.

use std::time::Duration;

use cpw_testkit::broker::as_command;
use cpw_testkit::cluster::Cluster;
use cpw_testkit::wait_until;
use credit_purchase_worker::simulator::Faults;
use lapin::BasicProperties;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};

use crate::cluster::ONE_CLUSTER;
use cpw_testkit::app::{Options, TestApp, command, command_id, spawn_without_worker};

/// A purchase takes this long: the alarm is up before the first answers.
/// `rabbitmqctl` starts an Erlang VM to raise it, which took over 5 s on a
/// loaded machine: the purchases answered first, nothing was published
/// under the alarm, and the connection was never blocked.
const LATENCY_MS: u64 = 10_000;

/// Commands that reach the commands queue while the connection is blocked
/// wait this long in a queue of the test's own first.
const LATE_MS: u64 = 10_000;

/// A memory alarm on node 0, cleared when dropped (also when the test
/// fails), back to RabbitMQ's default watermark.
struct MemoryAlarm<'a>(&'a Cluster);

impl<'a> MemoryAlarm<'a> {
    fn raise(cluster: &'a Cluster) -> MemoryAlarm<'a> {
        let raised = tokio::task::block_in_place(|| {
            cluster.ctl(0, &["set_vm_memory_high_watermark", "absolute", "1"])
        });
        assert!(
            raised,
            "rabbitmqctl set_vm_memory_high_watermark absolute 1"
        );
        MemoryAlarm(cluster)
    }
}

impl Drop for MemoryAlarm<'_> {
    fn drop(&mut self) {
        let cleared =
            tokio::task::block_in_place(|| self.0.ctl(0, &["set_vm_memory_high_watermark", "0.4"]));
        if !cleared && !std::thread::panicking() {
            panic!("rabbitmqctl set_vm_memory_high_watermark 0.4");
        }
    }
}

/// A value of the worker's `/metrics`.
async fn metric(app: &TestApp, name: &str) -> f64 {
    let addr = app.ops_addr.expect("worker started");
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("/metrics answers")
        .text()
        .await
        .expect("a body");
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} in\n{text}"))
}

/// A queue of the test's own whose messages expire into the commands queue:
/// commands that arrive there while no one can publish.
async fn holding_queue(app: &TestApp) -> String {
    let name = format!("{}.holding", app.queue);
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-dead-letter-exchange"),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        ShortString::from("x-dead-letter-routing-key"),
        AMQPValue::LongString(app.queue.as_str().into()),
    );
    app.channel
        .queue_declare(name.as_str().into(), QueueDeclareOptions::default(), args)
        .await
        .expect("holding queue");
    name
}

/// A node of the test's own, or `None` (printed) where there can be none.
fn one_node() -> Option<Cluster> {
    match tokio::task::block_in_place(|| Cluster::start(1)) {
        Ok(cluster) => Some(cluster),
        Err(skip) => {
            println!("skipped: {skip}");
            None
        }
    }
}

/// A ready worker on that node, whose purchases take [`LATENCY_MS`], with
/// short confirm waits.
async fn on_node(cluster: &Cluster) -> TestApp {
    let faults = Faults {
        latency_ms: LATENCY_MS,
        rate_limit: 0,
        ..Faults::default()
    };
    let mut app = spawn_without_worker(
        Options::default()
            .driver(&cluster.url(0))
            .env("CPW__AMQP__URL", cluster.url(0))
            .env("CPW__AMQP__PREFETCH", 16)
            .env("CPW__AMQP__CONFIRM_TIMEOUT_SECS", 2)
            .env("CPW__HYPERLINE__TIMEOUT_SECS", 15)
            .faults(faults),
    )
    .await;
    app.start_worker().await;
    app.wait_readyz(200).await;
    app
}

async fn wait_blocked(app: &TestApp) {
    wait_until(
        "/readyz to say the broker blocked the connection",
        Duration::from_millis(100),
        async || {
            app.readyz_body()
                .await
                .contains("the broker blocked the connection: resource alarm")
        },
    )
    .await;
}

/// The worker is stopped while blocked: it stops within its bounds (its
/// in-flight commands go back unacked, the connection's close cannot be
/// written and is given up on), and a worker started after the alarm
/// answers every command, charged once. Before, the publishes waited for
/// the alarm to end, and so did the stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_while_blocked_stops_and_nothing_is_lost() {
    let _one = ONE_CLUSTER.lock().await;
    let Some(cluster) = one_node() else {
        return;
    };
    let mut app = on_node(&cluster).await;
    let ids = app.publish_commands(4).await;
    app.wait_requests(4).await;
    let alarm = MemoryAlarm::raise(&cluster);
    wait_blocked(&app).await;
    let stopping = std::time::Instant::now();
    app.stop_worker().await;
    println!("blocked: stopped in {:?}", stopping.elapsed());
    drop(alarm);

    app.start_worker().await;
    app.events_answering(&ids).await;
    app.assert_charged_once(&ids);
    app.cleanup().await;
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_alarm_pauses_the_replica_and_every_command_completes_once_it_clears() {
    let _one = ONE_CLUSTER.lock().await;
    let Some(cluster) = one_node() else {
        return;
    };
    let mut app = on_node(&cluster).await;
    let holding = holding_queue(&app).await;
    app.guard_queue(&holding);

    let in_flight = app.publish_commands(4).await;
    let late: Vec<String> = (0..4).map(|_| command_id()).collect();
    for id in &late {
        let properties = BasicProperties::default().with_expiration(LATE_MS.to_string().into());
        let body = command(id).to_string();
        cpw_testkit::broker::publish(
            &app.channel,
            &holding,
            body.as_bytes(),
            as_command(properties),
        )
        .await;
    }
    app.wait_requests(4).await;
    let alarm = MemoryAlarm::raise(&cluster);

    // The purchases answer; their events are the worker's first publishes
    // under the alarm, and the broker blocks the connection.
    wait_blocked(&app).await;
    let body = app.readyz_body().await;
    println!("blocked: /readyz {:?}", body);
    assert_eq!(app.readyz().await, 503, "{body}");
    assert!(body.contains("blocked=true"), "{body}");
    assert_eq!(metric(&app, "cpw_broker_blocked").await, 1.0);

    // The late commands reach the commands queue and are pushed to the
    // worker, which leaves them there.
    wait_until(
        "the late commands to expire into the commands queue",
        Duration::from_millis(100),
        async || app.depth(&holding).await == 0,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        metric(&app, "cpw_commands_received_total").await,
        4.0,
        "no delivery taken while blocked"
    );
    assert_eq!(app.sim.requests().len(), 4, "no purchase while blocked");
    assert_eq!(app.readyz().await, 503);

    drop(alarm);
    app.wait_readyz(200).await;
    assert_eq!(metric(&app, "cpw_broker_blocked").await, 0.0);
    assert!(!app.readyz_body().await.contains("blocked the connection"));

    let ids: Vec<String> = in_flight.iter().chain(&late).cloned().collect();
    let events = app.events_answering(&ids).await;
    for event in &events {
        assert_eq!(event.kind(), "credit_purchase.succeeded", "{}", event.body);
    }
    println!(
        "blocked: {} commands answered with {} events after the alarm",
        ids.len(),
        events.len()
    );
    app.assert_charged_once(&ids);

    // Every command acked: nothing left in the commands queue or its delay
    // queues, and nothing unacked comes back when the worker stops.
    let settings = app.settings();
    let topology = credit_purchase_worker::broker::Topology::new(
        &settings.amqp,
        &settings.retry.redelivery_delays_secs,
    );
    let mut queues = vec![app.queue.clone()];
    queues.extend(topology.lanes[0].delay_queues().map(|(_, q)| q.clone()));
    let mut quiet = 0;
    wait_until(
        "every queue to drain",
        Duration::from_millis(200),
        async || {
            let mut ready = 0;
            for queue in &queues {
                ready += app.depth(queue).await;
            }
            let busy = metric(&app, "cpw_in_flight_commands").await;
            // Drained and idle, and still so a second later (copies in a
            // delay queue come back).
            quiet = if ready == 0 && busy == 0.0 {
                quiet + 1
            } else {
                0
            };
            quiet >= 10
        },
    )
    .await;
    app.stop_worker().await;
    assert_eq!(app.depth(&app.queue).await, 0, "nothing left unacked");
    app.assert_charged_once(&ids);
    let _ = app
        .channel
        .queue_delete(holding.as_str().into(), Default::default())
        .await;
    app.cleanup().await;
    drop(cluster);
}
