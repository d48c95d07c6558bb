//! Every row of docs/contract.md section 4: the event, the ack (queue empty), the
//! charges in the ledger and the Idempotency-Key on every request.

use std::time::Duration;

use credit_purchase_worker::simulator::{FaultsPatch, ScriptedResponse};
use serde_json::json;

use cpw_testkit::app::{command, command_for, command_id, spawn_app};

fn script(customer: &str, status: u16, body: serde_json::Value, times: Option<u32>) -> FaultsPatch {
    FaultsPatch {
        scripted: Some(vec![ScriptedResponse {
            customer_id: Some(customer.into()),
            status,
            body,
            headers: Default::default(),
            times,
        }]),
        ..FaultsPatch::default()
    }
}

/// Every request the simulator saw carried the command's id as its key.
fn assert_keys(app: &cpw_testkit::app::TestApp, id: &str, at_least: usize) {
    let requests = app.sim.requests();
    assert!(
        requests.len() >= at_least,
        "expected at least {at_least} requests, got {}",
        requests.len()
    );
    for r in &requests {
        assert_eq!(r.idempotency_key.as_deref(), Some(id), "{r:?}");
    }
}

#[tokio::test]
async fn success_publishes_succeeded_then_acks() {
    let mut app = spawn_app().await;
    let id = command_id();
    app.publish(&command(&id)).await;
    let event = app.next_event().await;
    assert_eq!(event.kind(), "credit_purchase.succeeded");
    assert_eq!(event.command_id(), id);
    assert_eq!(event.body["credit_count"], 32);
    assert_eq!(event.body["attempts"], 1);
    assert_eq!(event.body["new_credit_balance"], 32);
    let ledger = app.ledger();
    assert_eq!(ledger.charges_for(&id), 1);
    assert_eq!(
        event.body["invoice_id"].as_str(),
        Some(ledger.charges[0].invoice_id.as_str())
    );
    assert_eq!(
        event
            .properties
            .correlation_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some(id.as_str())
    );
    assert_keys(&app, &id, 1);
    app.wait_until_drained().await;
    assert_eq!(app.depth(&app.dead_queue()).await, 0);
    app.cleanup().await;
}

#[tokio::test]
async fn rejections_fail_and_ack() {
    let mut app = spawn_app().await;
    for status in [400, 404, 422] {
        let customer = format!("cus_rejected_{status}");
        app.set_faults(script(
            &customer,
            status,
            json!({"message": format!("refused with {status}")}),
            None,
        ));
        let id = command_id();
        app.publish(&command_for(&id, &customer)).await;
        let event = app.next_event().await;
        assert_eq!(
            (event.kind(), event.code()),
            ("credit_purchase.failed", "rejected"),
            "{status}"
        );
        assert_eq!(event.body["error"]["http_status"], status);
        assert_eq!(
            event.body["error"]["message"],
            format!("refused with {status}")
        );
        assert_eq!(event.body["attempts"], 1);
        assert_eq!(app.ledger().charges_for(&id), 0);
    }
    app.wait_until_drained().await;
    assert_eq!(
        app.depth(&app.dead_queue()).await,
        0,
        "rejections are acked, not dead-lettered"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_reused_id_with_another_body_is_an_idempotency_conflict() {
    let mut app = spawn_app().await;
    let id = command_id();
    app.publish(&command(&id)).await;
    assert_eq!(app.next_event().await.kind(), "credit_purchase.succeeded");
    let mut other = command(&id);
    other["credit_count"] = json!(64);
    app.publish(&other).await;
    let event = app.next_event().await;
    assert_eq!(
        (event.kind(), event.code()),
        ("credit_purchase.failed", "idempotency_conflict")
    );
    assert_eq!(event.body["error"]["http_status"], 417);
    assert_eq!(app.ledger().charges_for(&id), 1);
    assert_keys(&app, &id, 2);
    app.wait_until_drained().await;
    assert_eq!(app.depth(&app.dead_queue()).await, 0);
    app.cleanup().await;
}

#[tokio::test]
async fn in_progress_is_retried_until_the_first_request_completes() {
    // The first request takes 3 s, past the 2 s client timeout; the retries
    // meet 409 while it runs, then the replay of its success.
    let mut app = spawn_app().await;
    app.set_faults(FaultsPatch {
        latency_ms: Some(3000),
        ..FaultsPatch::default()
    });
    let id = command_id();
    app.publish(&command(&id)).await;
    let event = app.next_event().await;
    assert_eq!(event.kind(), "credit_purchase.succeeded");
    let ledger = app.ledger();
    assert_eq!(ledger.charges_for(&id), 1);
    assert!(ledger.conflicts >= 1, "a 409 was seen: {ledger:?}");
    assert!(ledger.replayed >= 1, "the success was replayed: {ledger:?}");
    assert_eq!(
        event.body["invoice_id"].as_str(),
        Some(ledger.charges[0].invoice_id.as_str())
    );
    assert_keys(&app, &id, 2);
    app.cleanup().await;
}

/// One of the worker's own requests (with the key of one of `ids`) met a 429.
fn worker_refused(app: &cpw_testkit::app::TestApp, ids: &[String]) -> bool {
    app.sim.requests().iter().any(|r| {
        r.status == Some(429) && r.idempotency_key.as_ref().is_some_and(|k| ids.contains(k))
    })
}

#[tokio::test]
async fn rate_limits_slow_the_replica_and_every_command_is_charged_once() {
    let mut app = spawn_app().await;
    app.set_faults(FaultsPatch {
        rate_limit: Some(3),
        rate_limit_window_ms: Some(1000),
        ..FaultsPatch::default()
    });
    // The limit is per account: another client spends the quota until the
    // worker has met a 429 (it paces itself by the announced quota and would
    // not hit the limit on its own).
    let ids: Vec<String> = (0..12).map(|_| command_id()).collect();
    let publish = async {
        for id in &ids {
            app.publish(&command(id)).await;
        }
    };
    tokio::join!(
        app.spend_quota_until(|| worker_refused(&app, &ids)),
        publish
    );
    let events = app
        .events_until(Duration::from_secs(60), |e| e.len() == ids.len())
        .await;
    assert!(
        events
            .iter()
            .all(|e| e.kind() == "credit_purchase.succeeded")
    );
    app.assert_charged_once(&ids);
    let ledger = app.ledger();
    assert!(ledger.rate_limited >= 1, "the limit was hit: {ledger:?}");
    assert!(
        worker_refused(&app, &ids),
        "the worker's own request met the limit"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn server_errors_are_retried_with_the_same_key() {
    let mut app = spawn_app().await;
    app.set_faults(script(
        "cus_flaky",
        503,
        json!({"message": "unavailable"}),
        Some(2),
    ));
    let id = command_id();
    app.publish(&command_for(&id, "cus_flaky")).await;
    let event = app.next_event().await;
    assert_eq!(event.kind(), "credit_purchase.succeeded");
    assert_eq!(event.body["attempts"], 3);
    assert_eq!(app.ledger().charges_for(&id), 1);
    assert_keys(&app, &id, 3);
    app.cleanup().await;
}

#[tokio::test]
async fn a_hang_times_out_and_the_retry_replays_the_charge() {
    let mut app = spawn_app().await;
    app.set_faults(FaultsPatch {
        hang_rate: Some(1.0),
        ..FaultsPatch::default()
    });
    let id = command_id();
    app.publish(&command(&id)).await;
    app.wait_requests(1).await;
    app.set_faults(FaultsPatch {
        hang_rate: Some(0.0),
        ..FaultsPatch::default()
    });
    let event = app.next_event().await;
    assert_eq!(event.kind(), "credit_purchase.succeeded");
    assert!(event.body["attempts"].as_u64() >= Some(2));
    let ledger = app.ledger();
    assert_eq!(
        ledger.charges_for(&id),
        1,
        "the hung request charged; the retry replayed it"
    );
    assert!(ledger.replayed >= 1);
    assert_keys(&app, &id, 2);
    app.cleanup().await;
}

#[tokio::test]
async fn a_dropped_connection_is_retried_and_charged_once() {
    let mut app = spawn_app().await;
    app.set_faults(FaultsPatch {
        drop_rate: Some(1.0),
        ..FaultsPatch::default()
    });
    let id = command_id();
    app.publish(&command(&id)).await;
    app.wait_requests(1).await;
    app.set_faults(FaultsPatch {
        drop_rate: Some(0.0),
        ..FaultsPatch::default()
    });
    let event = app.next_event().await;
    assert_eq!(event.kind(), "credit_purchase.succeeded");
    assert_eq!(app.ledger().charges_for(&id), 1);
    assert_keys(&app, &id, 2);
    app.cleanup().await;
}

#[tokio::test]
async fn an_undocumented_success_body_is_dead_lettered_for_an_operator() {
    let mut app = spawn_app().await;
    app.set_faults(script("cus_odd", 201, json!({"status": "ok"}), None));
    let id = command_id();
    app.publish(&command_for(&id, "cus_odd")).await;
    let event = app.next_event().await;
    assert_eq!(
        (event.kind(), event.code()),
        ("credit_purchase.failed", "unexpected_response")
    );
    assert_eq!(event.body["error"]["http_status"], 201);
    let dead = app.wait_dead_letters(1).await;
    assert_eq!(dead.len(), 1);
    let body: serde_json::Value = serde_json::from_slice(&dead[0].0).expect("json");
    assert_eq!(body["command_id"], id.as_str());
    app.wait_until_drained().await;
    app.cleanup().await;
}
