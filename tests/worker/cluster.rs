//! A worker on a real three-node RabbitMQ cluster (`cpw_testkit::cluster`)
//! loses its node with purchases in flight: it must consume again from
//! another node within 10 s, and every command must end charged once and
//! answered. Skipped, with the reason printed, where RabbitMQ is not
//! installed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cpw_testkit::cluster::Cluster;
use cpw_testkit::proxy::Proxy;
use cpw_testkit::wait_until;
use credit_purchase_worker::simulator::Faults;

use cpw_testkit::app::{Options, TestApp, spawn_without_worker};

/// How soon a worker whose node died must consume again (the bound).
const FAILOVER: Duration = Duration::from_secs(10);

/// One cluster at a time: three more Erlang VMs per test are plenty for a
/// small machine, and the failover timings should not measure contention.
pub(crate) static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The cluster, or `None` (printed) where there can be none.
pub(crate) fn cluster() -> Option<Cluster> {
    match tokio::task::block_in_place(|| Cluster::start(3)) {
        Ok(cluster) => {
            println!(
                "cluster: 3 nodes of RabbitMQ ({}) up and joined in {:?}",
                cluster.suite, cluster.started_in
            );
            Some(cluster)
        }
        Err(skip) => {
            println!("skipped: {skip}");
            None
        }
    }
}

/// The port of the node `/readyz` names, once the worker is ready.
async fn consuming_on(app: &TestApp) -> u16 {
    app.wait_readyz(200).await;
    let body = app.readyz_body().await;
    body.split_whitespace()
        .find_map(|field| field.strip_prefix("node="))
        .and_then(|node| node.rsplit(':').next())
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("/readyz names the node: {body:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_node_dies_moves_to_another_and_charges_once() {
    let _one = ONE_CLUSTER.lock().await;
    let Some(mut cluster) = cluster() else {
        return;
    };
    let faults = Faults {
        latency_ms: 1000,
        rate_limit: 0,
        ..Faults::default()
    };
    // The test's own connection stays on node 0; the worker is given every
    // node and must not be on node 0 when its node is killed.
    let mut app = spawn_without_worker(
        Options::default()
            .driver(&cluster.url(0))
            .env("CPW__AMQP__URL", cluster.urls().join(","))
            .env("CPW__AMQP__PREFETCH", 64)
            .faults(faults),
    )
    .await;
    let mut starts = 0;
    let node = loop {
        app.start_worker().await;
        starts += 1;
        let port = consuming_on(&app).await;
        let node = cluster.node_with_port(port).expect("a node of the cluster");
        if node != 0 {
            break node;
        }
        // A third of the starts land on node 0: a random start, as it should.
        assert!(
            starts < 12,
            "12 starts, all on node 0: the start is not random"
        );
        app.stop_worker().await;
    };

    let ids = app.publish_commands(50).await;
    app.wait_requests(50).await;
    let killed = Instant::now();
    tokio::task::block_in_place(|| cluster.kill(node));
    let moved = loop {
        let port = consuming_on(&app).await;
        if cluster.node_with_port(port) != Some(node) {
            break killed.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "cluster: node {node} killed with 50 purchases in flight; consuming again after {moved:?}"
    );
    assert!(moved < FAILOVER, "consuming again after {moved:?}");
    let metrics = app.metrics().await;
    let gauge = |i: usize| {
        format!(
            "cpw_broker_node{{node=\"127.0.0.1:{}\"}}",
            cluster.nodes[i].port
        )
    };
    assert!(metrics.contains(&format!("{} 0", gauge(node))), "{metrics}");
    assert_eq!(
        (0..3)
            .filter(|i| metrics.contains(&format!("{} 1", gauge(*i))))
            .count(),
        1,
        "one node connected: {metrics}"
    );

    let events = app.events_answering(&ids).await;
    let mut per_command: HashMap<&str, usize> = HashMap::new();
    for event in &events {
        assert_eq!(event.kind(), "credit_purchase.succeeded", "{}", event.body);
        *per_command.entry(event.command_id()).or_default() += 1;
    }
    let duplicates: usize = per_command.values().map(|n| n - 1).sum();
    println!("cluster: 50 answered, {duplicates} duplicate events");
    app.assert_charged_once(&ids);
    app.wait_until_drained().await;
    app.cleanup().await;
}

/// Khepri (RabbitMQ 4.3's only metadata store) needs a majority for every
/// declaration, and a node that dies mid-declaration leaves the worker's
/// `queue.declare` unanswered or refused. The worker is given two nodes
/// through proxies that hold every broker frame 150 ms (so its comparison
/// and declaration of the topology take seconds), and the node behind the
/// one it connected to is killed while it declares: the worker must declare
/// again on the other, serve, and charge every command once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_while_the_worker_declares_its_topology_costs_nothing() {
    let _one = ONE_CLUSTER.lock().await;
    let Some(mut cluster) = cluster() else {
        return;
    };
    let proxies = [
        Proxy::start(&cluster.url(1)).await,
        Proxy::start(&cluster.url(2)).await,
    ];
    for proxy in &proxies {
        proxy.slow_answers(Duration::from_millis(150));
    }
    let faults = Faults {
        rate_limit: 0,
        ..Faults::default()
    };
    // The test's own connection stays on node 0, which is never killed.
    let mut app = spawn_without_worker(
        Options::default()
            .driver(&cluster.url(0))
            .env(
                "CPW__AMQP__URL",
                format!("{},{}", proxies[0].url(), proxies[1].url()),
            )
            .faults(faults),
    )
    .await;
    app.start_worker().await;

    // The node gauge is set on connecting, before the topology is compared
    // and declared.
    let label = |proxy: &Proxy| {
        let url = url::Url::parse(proxy.url()).expect("a URL");
        format!(
            "cpw_broker_node{{node=\"127.0.0.1:{}\"}}",
            url.port().expect("a port")
        )
    };
    let mut on = None;
    wait_until(
        "the worker to connect",
        Duration::from_millis(20),
        async || {
            let metrics = app.metrics().await;
            on = (0..2).find(|i| metrics.contains(&format!("{} 1", label(&proxies[*i]))));
            on.is_some()
        },
    )
    .await;
    let on = on.expect("waited for it");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_ne!(
        app.readyz().await,
        200,
        "still declaring when its node is killed"
    );
    let node = on + 1;
    tokio::task::block_in_place(|| cluster.kill(node));
    for proxy in &proxies {
        proxy.slow_answers(Duration::ZERO);
    }
    println!("cluster: node {node} killed while the worker declared its topology through it");

    app.wait_readyz(200).await;
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(&format!("{} 1", label(&proxies[1 - on]))),
        "consuming on the other node: {metrics}"
    );
    let ids = app.publish_commands(20).await;
    for event in app.events_answering(&ids).await {
        assert_eq!(event.kind(), "credit_purchase.succeeded", "{}", event.body);
    }
    app.assert_charged_once(&ids);
    app.wait_until_drained().await;
    app.cleanup().await;
}
