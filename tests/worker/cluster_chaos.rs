//! The cluster chaos run: three in-process workers and 2,000 commands
//! against a real three-node cluster (`cpw_testkit::cluster`), with 10 %
//! transient API faults, while four times one broker node is stopped, hard
//! (SIGKILL) or gracefully (`stop_app`), the node holding the commands
//! queue's leader included, then brought back. At the end: every command
//! charged exactly once and answered, every queue empty once the workers
//! stop (so every command was acked), no worker restarted by hand, and
//! exactly the planned stops made.
//!
//! The stops are scheduled by progress (`cpw_testkit::strikes`): each is due
//! a quarter into a tranche of the commands, and the next tranche is
//! published only once it has happened and the node is back, so a fast
//! machine cannot answer every command before a stop is due, nor a slow one
//! stop more often, and each stop meets commands in flight.
//!
//! Seeded: `CLUSTER_CHAOS_SEED=<n>` replays the choices of a run (which node,
//! how); the seed is printed either way. `CLUSTER_CHAOS_COMMANDS` scales it.
//! Events are collected in a quorum queue of their own, read at the end,
//! since any node may die meanwhile.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cpw_testkit::broker::as_command;
use cpw_testkit::cluster::Cluster;
use cpw_testkit::strikes::{Schedule, charged, wait_charged, wait_count};
use credit_purchase_worker::broker::{Topology, connect_first};
use credit_purchase_worker::simulator::Faults;
use credit_purchase_worker::startup::Application;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cluster::{ONE_CLUSTER, cluster};
use cpw_testkit::app::{Options, WAIT, command, command_id, spawn_without_worker};

/// The node stops of a run: the leader's node hard, a worker's node
/// gracefully, two more at random.
const STOPS: usize = 4;

/// Bound on each stage of the run (a tranche answered up to the next stop,
/// a stopped node back, the last tranche answered): a hang fails the test,
/// a slow machine only takes longer.
const STAGE: Duration = Duration::from_secs(240);

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What the chaos did.
#[derive(Debug, Default)]
struct Damage {
    kills: usize,
    hard: usize,
    leader_kills: usize,
    leader_moves: usize,
    /// Per stop: commands published and not yet charged once it was made.
    in_flight: Vec<usize>,
}

/// The AMQP ports of the nodes the workers are on, from their `/readyz`.
async fn worker_ports(ops: &[std::net::SocketAddr]) -> Vec<u16> {
    let mut ports = Vec::new();
    for addr in ops {
        let Ok(answer) = reqwest::get(format!("http://{addr}/readyz")).await else {
            continue;
        };
        let body = answer.text().await.unwrap_or_default();
        if let Some(port) = body
            .split_whitespace()
            .find_map(|f| f.strip_prefix("node="))
            .and_then(|node| node.rsplit(':').next())
            .and_then(|port| port.parse().ok())
        {
            ports.push(port);
        }
    }
    ports
}

/// What the chaos task needs: the cluster, whom to look at, when to strike.
struct Chaos {
    cluster: Arc<Mutex<Cluster>>,
    queue: String,
    ops: Vec<std::net::SocketAddr>,
    sim_url: String,
    schedule: Schedule,
    seed: u64,
    /// Tranches published so far.
    published: watch::Receiver<usize>,
    /// Stops made and their nodes back: the publisher holds the next tranche
    /// until then, so that the next stop, a quarter into it, meets the rest
    /// in flight (published while a node is still booting, a tranche would
    /// be answered before the next stop could be made).
    stopped: watch::Sender<usize>,
}

/// The planned node stops, each once its tranche is published and a
/// quarter of it charged: the first kills the commands queue's leader's
/// node hard, the second stops a node a worker is on gracefully, the rest
/// pick the leader's node or a worker's, hard or gracefully, at random.
/// Notes where the leader went; brings the node back after 3 s. One node
/// down at a time, so the quorum queues keep their majority. The cluster
/// calls block, hence `block_in_place`.
async fn unleash(mut c: Chaos) -> Damage {
    let mut rng = StdRng::seed_from_u64(c.seed);
    let mut damage = Damage::default();
    let http = reqwest::Client::new();
    let blocking = |f: &mut dyn FnMut(&mut Cluster)| {
        tokio::task::block_in_place(|| {
            let mut nodes = c
                .cluster
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&mut nodes);
        });
    };
    for k in 0..c.schedule.strikes() {
        let what = format!("node stop {k}");
        wait_count(&mut c.published, k + 1, STAGE, &what).await;
        let mut leader = None;
        blocking(&mut |nodes| leader = (0..3).find_map(|i| nodes.leader_of(i, &c.queue)));
        let ports = worker_ports(&c.ops).await;
        let mut on_worker = None;
        blocking(&mut |nodes| {
            on_worker = ports.iter().find_map(|p| nodes.node_with_port(*p));
        });
        // Looked up first (`rabbitmqctl` takes seconds on a busy machine):
        // with every node up and none stopped since, the leader stays put,
        // and the stop lands when it is due, its tranche still in flight.
        wait_charged(&c.sim_url, c.schedule.due(k), STAGE, &what).await;
        let (victim, hard) = match k {
            0 => (leader, true),
            1 => (on_worker, false),
            _ if rng.random_bool(0.5) => (leader, rng.random_bool(0.5)),
            _ => (on_worker, rng.random_bool(0.5)),
        };
        let victim = victim.unwrap_or_else(|| rng.random_range(0..3));
        blocking(&mut |nodes| {
            if hard {
                nodes.kill(victim);
            } else {
                nodes.stop_app(victim);
            }
        });
        let done = charged(&http, &c.sim_url).await.unwrap_or(0);
        damage
            .in_flight
            .push(c.schedule.tranche(k).end.saturating_sub(done));
        damage.kills += 1;
        damage.hard += usize::from(hard);
        damage.leader_kills += usize::from(leader == Some(victim));
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut now = None;
        blocking(&mut |nodes| now = nodes.leader_of((victim + 1) % 3, &c.queue));
        if now.is_some() && now != leader {
            damage.leader_moves += 1;
        }
        println!(
            "cluster chaos: node {victim} stopped {} at {done} charged, {} in flight \
             (workers on ports {ports:?}; leader was {leader:?}, now {now:?})",
            if hard { "hard" } else { "gracefully" },
            damage.in_flight[k]
        );
        blocking(&mut |nodes| nodes.bring_back(victim));
        c.stopped.send_replace(k + 1);
    }
    damage
}

/// Publishes `n` commands, each confirmed, on a connection to the first
/// node that answers (the driver's node may be down). A publish nacked or
/// lost while the commands queue elects a new leader is made again with
/// the same `command_id`, as docs/publishing.md asks of a producer: a copy
/// that got through after all is charged once and answered again.
async fn publish_tranche(urls: &[String], queue: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    let mut open: Option<(Connection, lapin::Channel)> = None;
    for _ in 0..n {
        let id = command_id();
        let body = command(&id).to_string();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (connection, channel) = match open.take() {
                Some(open) => open,
                None => confirmed_channel(urls).await,
            };
            let properties = as_command(BasicProperties::default());
            let confirm =
                match cpw_testkit::broker::send(&channel, queue, body.as_bytes(), properties).await
                {
                    Ok(pending) => pending.await.ok(),
                    Err(_) => None,
                };
            if confirm.is_some_and(|c| c.is_ack()) {
                open = Some((connection, channel));
                break;
            }
            let _ = connection.close(200, "publish not confirmed".into()).await;
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} not confirmed by any node within {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        ids.push(id);
    }
    if let Some((connection, _)) = open {
        let _ = connection.close(200, "tranche published".into()).await;
    }
    ids
}

/// A channel in confirm mode on the first node that answers.
async fn confirmed_channel(urls: &[String]) -> (Connection, lapin::Channel) {
    let (connection, _) = connect_first(urls, 0, "cluster-chaos-publisher", None, WAIT)
        .await
        .expect("a node answers");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    (connection, channel)
}

/// A durable quorum queue bound to every event: it outlives any one node.
async fn declare_collector(connection: &Connection, name: &str, exchange: &str) {
    let channel = connection.create_channel().await.expect("channel");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(name.into(), durable, args)
        .await
        .expect("collector queue");
    channel
        .queue_bind(
            name.into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("collector binding");
}

/// Reads the collector until every id has an event or `WAIT` passes;
/// the number of events per command id.
async fn collect(connection: &Connection, name: &str, ids: &[String]) -> HashMap<String, usize> {
    let channel = connection.create_channel().await.expect("channel");
    let mut consumer = channel
        .basic_consume(
            name.into(),
            "cluster-chaos-collector".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume the collector");
    let mut seen: HashMap<String, usize> = HashMap::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !ids.iter().all(|id| seen.contains_key(id)) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Ok(Some(Ok(delivery))) = tokio::time::timeout(left, consumer.next()).await else {
            break;
        };
        let body: serde_json::Value = serde_json::from_slice(&delivery.data).expect("an event");
        assert_eq!(body["type"], "credit_purchase.succeeded", "{body}");
        let id = body["command_id"].as_str().expect("command_id").to_owned();
        *seen.entry(id).or_default() += 1;
        delivery.ack(BasicAckOptions::default()).await.expect("ack");
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_chaos_run_keeps_every_promise() {
    let _one = ONE_CLUSTER.lock().await;
    let seed: u64 = env_or("CLUSTER_CHAOS_SEED", rand::rng().random());
    let commands: usize = env_or("CLUSTER_CHAOS_COMMANDS", 2000);
    println!("cluster chaos: seed={seed} (rerun with CLUSTER_CHAOS_SEED={seed})");
    let Some(cluster) = cluster() else {
        return;
    };
    let urls = cluster.urls();
    let faults = Faults {
        latency_ms: 600,
        latency_jitter_ms: 400,
        fail_rate: 0.1,
        rate_limit: 0,
        ..Faults::default()
    };
    let app = spawn_without_worker(
        Options::default()
            .driver(&cluster.url(0))
            .env("CPW__AMQP__URL", urls.join(","))
            .env("CPW__AMQP__PREFETCH", 16)
            .env("CPW__RETRY__ATTEMPTS", 5)
            .env("CPW__WORKER__SHUTDOWN_GRACE_SECS", 5)
            .faults(faults),
    )
    .await;
    let settings = app.settings();
    let topology = Topology::new(&settings.amqp, &settings.retry.redelivery_delays_secs);
    let collector = format!("{}.collected", app.queue);
    let (driver, _) = connect_first(&urls, 0, "cluster-chaos-driver", None, WAIT)
        .await
        .expect("the cluster answers");
    declare_collector(&driver, &collector, &settings.amqp.results_exchange).await;

    let started = Instant::now();
    let mut workers = Vec::new();
    for r in 0..3 {
        let mut env = app.env.clone();
        env.insert(
            "CPW__AMQP__CONNECTION_NAME".to_owned(),
            format!("{}-r{r}", app.connection_name),
        );
        let settings = credit_purchase_worker::configuration::Settings::load_from(None, env)
            .expect("valid settings");
        let worker = Application::build(settings).await.expect("worker builds");
        let ops = worker.ops_addr();
        let token = CancellationToken::new();
        let handle = tokio::spawn(worker.run_until_stopped(token.clone()));
        workers.push((ops, token, handle));
    }
    let cluster = Arc::new(Mutex::new(cluster));
    let schedule = Schedule::new(commands, STOPS);
    let (published, published_rx) = watch::channel(0);
    let (stopped_tx, mut stopped) = watch::channel(0);
    let chaos = tokio::spawn(unleash(Chaos {
        cluster: Arc::clone(&cluster),
        queue: app.queue.clone(),
        ops: workers.iter().map(|(ops, _, _)| *ops).collect(),
        sim_url: app.sim.base_url(),
        schedule,
        seed,
        published: published_rx,
        stopped: stopped_tx,
    }));
    let mut ids = Vec::with_capacity(commands);
    for k in 0..=STOPS {
        if k > 0 {
            wait_count(&mut stopped, k, STAGE, &format!("node stop {}", k - 1)).await;
        }
        ids.extend(publish_tranche(&urls, &app.queue, schedule.tranche(k).len()).await);
        published.send_replace(k + 1);
    }
    wait_charged(
        &app.sim.base_url(),
        commands,
        STAGE,
        &format!("every command charged (seed {seed})"),
    )
    .await;
    let damage = chaos.await.expect("chaos task");

    let (reader, _) = connect_first(&urls, 0, "cluster-chaos-reader", None, WAIT)
        .await
        .expect("the cluster answers");
    let answered = collect(&reader, &collector, &ids).await;
    let mut reconnects = 0.0;
    for (ops, _, _) in &workers {
        let text = reqwest::get(format!("http://{ops}/metrics"))
            .await
            .expect("/metrics")
            .text()
            .await
            .expect("a body");
        reconnects += text
            .lines()
            .find_map(|l| l.strip_prefix("cpw_reconnects_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
    }
    for (_, token, handle) in workers {
        token.cancel();
        tokio::time::timeout(WAIT, handle)
            .await
            .expect("worker stops in time")
            .expect("worker task")
            .expect("the cluster's topology matches the worker's");
    }
    let elapsed = started.elapsed();

    let ledger = app.ledger();
    for id in &ids {
        assert_eq!(ledger.charges_for(id), 1, "{id} charged once (seed {seed})");
        assert!(answered.contains_key(id), "{id} answered (seed {seed})");
    }
    let mut queues = vec![topology.queue.clone(), topology.dead.clone()];
    queues.extend(topology.lanes[0].delay_queues().map(|(_, q)| q.clone()));
    for queue in &queues {
        assert_eq!(
            cpw_testkit::broker::depth(&reader, queue).await,
            0,
            "{queue} empty: every command acked (seed {seed})"
        );
    }
    let duplicates: usize = answered.values().map(|n| n - 1).sum();
    println!(
        "cluster chaos: {commands} commands, {} node stops ({} hard, {} of the leader's node), \
         {} leader moves, in flight at each stop {:?}, {reconnects} reconnects, \
         {duplicates} duplicate events, {elapsed:.1?} (seed {seed})",
        damage.kills, damage.hard, damage.leader_kills, damage.leader_moves, damage.in_flight
    );
    assert!(
        damage.kills == STOPS
            && damage.leader_kills >= 1
            && damage.hard >= 1
            && damage.kills > damage.hard,
        "{STOPS} stops, the leader's node, a hard stop and a graceful one: {damage:?}"
    );
}
