//! Crashes, cuts, credential faults and shutdowns: nothing charged twice,
//! nothing lost, every command answered.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use credit_purchase_worker::simulator::{Faults, FaultsPatch};

use cpw_testkit::app::{Event, Options, command, command_id, spawn_app_with, spawn_without_worker};
use cpw_testkit::process::terminate;

/// Every id has at least one succeeded event and no other outcome.
fn assert_all_succeeded(events: &[Event], ids: &[String]) {
    let mut kinds: HashMap<&str, HashSet<&str>> = HashMap::new();
    for e in events {
        kinds.entry(e.command_id()).or_default().insert(e.kind());
    }
    for id in ids {
        let k = kinds
            .get(id.as_str())
            .unwrap_or_else(|| panic!("no event for {id}"));
        assert_eq!(k.len(), 1, "{id} has one distinct outcome: {k:?}");
        assert!(k.contains("credit_purchase.succeeded"), "{id}: {k:?}");
    }
}

fn succeeded_ids(events: &[Event]) -> HashSet<String> {
    events
        .iter()
        .filter(|e| e.kind() == "credit_purchase.succeeded")
        .map(|e| e.command_id().to_owned())
        .collect()
}

#[tokio::test]
async fn a_worker_killed_mid_purchase_charges_once_after_restart() {
    let faults = Faults {
        latency_ms: 1500,
        rate_limit: 0,
        ..Faults::default()
    };
    let mut app = spawn_without_worker(Options::default().faults(faults)).await;
    let mut child = app.spawn_process();
    let id = command_id();
    app.publish(&command(&id)).await;
    app.wait_requests(1).await;
    child.start_kill().expect("SIGKILL");
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("killed process exits");
    assert_eq!(
        app.ledger().charges.len(),
        0,
        "killed before the purchase completed"
    );
    app.start_worker().await;
    let event = app.next_event().await;
    assert_eq!(event.kind(), "credit_purchase.succeeded");
    assert_eq!(event.command_id(), id);
    let ledger = app.ledger();
    assert_eq!(ledger.charges_for(&id), 1, "{ledger:?}");
    assert!(
        app.sim
            .requests()
            .iter()
            .all(|r| r.idempotency_key.as_deref() == Some(id.as_str()))
    );
    app.wait_until_drained().await;
    app.cleanup().await;
}

#[tokio::test]
async fn a_cut_connection_is_rebuilt_without_a_restart() {
    let faults = Faults {
        latency_ms: 20,
        rate_limit: 0,
        ..Faults::default()
    };
    let mut app = spawn_app_with(Options::default().faults(faults)).await;
    let ids = app.publish_commands(300).await;
    let mut events = app
        .events_until(Duration::from_secs(60), |e| e.len() >= 30)
        .await;
    let mut cut = 0;
    for _ in 0..2 {
        // The worker may still be reconnecting from the last cut: cut its
        // next connection as soon as it exists (bounded).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let n = app.cut_connections();
            if n > 0 {
                cut += n;
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the worker never reconnected"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let more = app
            .events_until(Duration::from_secs(60), |e| e.len() >= 20)
            .await;
        events.extend(more);
    }
    assert!(
        cut >= 2,
        "the broker closed our connection twice (closed {cut})"
    );
    let pending: HashSet<String> = ids.iter().cloned().collect();
    let mut seen = succeeded_ids(&events);
    while !pending.is_subset(&seen) {
        let e = app.next_event().await;
        seen.insert(e.command_id().to_owned());
        events.push(e);
    }
    assert_all_succeeded(&events, &ids);
    app.assert_charged_once(&ids);
    app.wait_until_drained().await;
    app.cleanup().await;
}

#[tokio::test]
async fn a_refused_key_pauses_the_replica_until_it_is_accepted() {
    let faults = Faults {
        reject_auth: true,
        rate_limit: 0,
        ..Faults::default()
    };
    let mut app = spawn_app_with(Options::default().faults(faults)).await;
    let ids = app.publish_commands(3).await;
    app.wait_requests(1).await;
    app.wait_readyz(503).await;
    assert!(
        app.no_event_for(Duration::from_millis(2500)).await,
        "a credential fault is not the command's: no event"
    );
    assert_eq!(
        app.depth(&app.queue).await,
        3,
        "the commands went back to the queue"
    );
    app.set_faults(FaultsPatch {
        reject_auth: Some(false),
        ..FaultsPatch::default()
    });
    let events = app
        .events_until(Duration::from_secs(60), |e| e.len() == ids.len())
        .await;
    assert_all_succeeded(&events, &ids);
    app.wait_readyz(200).await;
    app.assert_charged_once(&ids);
    app.cleanup().await;
}

#[tokio::test]
async fn sigterm_drains_in_flight_purchases_and_exits_zero() {
    let faults = Faults {
        latency_ms: 1000,
        rate_limit: 0,
        ..Faults::default()
    };
    let mut app = spawn_without_worker(
        Options::default()
            .faults(faults)
            .env("CPW__WORKER__SHUTDOWN_GRACE_SECS", 5),
    )
    .await;
    let ids = app.publish_commands(60).await;
    let mut child = app.spawn_process();
    app.wait_requests(10).await;
    let status = terminate(&mut child, Duration::from_secs(5 + 5)).await;
    assert_eq!(status.code(), Some(0), "exits within the grace period");
    app.start_worker().await;
    let mut events = Vec::new();
    let wanted: HashSet<String> = ids.iter().cloned().collect();
    while !wanted.is_subset(&succeeded_ids(&events)) {
        events.push(app.next_event().await);
    }
    assert_all_succeeded(&events, &ids);
    app.assert_charged_once(&ids);
    app.wait_until_drained().await;
    app.cleanup().await;
}

#[tokio::test]
async fn a_burst_of_2000_with_transient_faults_charges_each_once() {
    let faults = Faults {
        fail_rate: 0.1,
        rate_limit: 0,
        ..Faults::default()
    };
    let mut app = spawn_app_with(
        Options::default()
            .faults(faults)
            .env("CPW__AMQP__PREFETCH", 64),
    )
    .await;
    let ids = app.publish_commands(2000).await;
    let events = app
        .events_until(Duration::from_secs(180), |e| e.len() >= ids.len())
        .await;
    assert_all_succeeded(&events, &ids);
    assert!(
        app.no_event_for(Duration::from_millis(500)).await,
        "one outcome per command"
    );
    app.assert_charged_once(&ids);
    let ledger = app.ledger();
    assert!(
        ledger.faults > 100,
        "faults were injected: {}",
        ledger.faults
    );
    app.wait_until_drained().await;
    assert_eq!(app.depth(&app.dead_queue()).await, 0);
    app.cleanup().await;
}

/// A commands queue deleted under the worker (an operator's mistake, a
/// definitions import) ends its consumer with `basic.cancel`; lapin's
/// stream then just ends. The worker must declare the queue again and
/// consume from it, never stay ready on a consumer that is gone.
#[tokio::test]
async fn a_deleted_commands_queue_is_declared_again_and_consumed() {
    let mut app = spawn_app_with(Options::default()).await;
    let first = command_id();
    app.publish(&command(&first)).await;
    app.event_for(&first).await;

    let connection = cpw_testkit::broker::connect("cpw-test-delete-queue")
        .await
        .expect("broker reachable");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .queue_delete(app.topology.queue.as_str().into(), Default::default())
        .await
        .expect("the commands queue deleted");
    cpw_testkit::wait_until(
        "the worker to declare the commands queue again",
        Duration::from_millis(50),
        async || {
            let Ok(probe) = connection.create_channel().await else {
                return false;
            };
            let passive = lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            let found = probe
                .queue_declare(
                    app.topology.queue.as_str().into(),
                    passive,
                    Default::default(),
                )
                .await
                .is_ok();
            let _ = probe.close(200, "probed".into()).await;
            found
        },
    )
    .await;

    let after = command_id();
    app.publish(&command(&after)).await;
    let event = app.event_for(&after).await;
    assert_eq!(event["type"], "credit_purchase.succeeded", "{event}");
    assert!(
        app.metric("cpw_reconnects_total").await >= 1.0,
        "the lost consumer was counted as a lost session"
    );
    app.assert_charged_once(&[first, after]);
    app.wait_readyz(200).await;
    app.cleanup().await;
}
