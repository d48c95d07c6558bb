//! A key refused on purchases only: the credential probe accepts it, the
//! purchases refuse it. The replica must not flap between the two.

use std::time::Duration;

use credit_purchase_worker::simulator::{FaultsPatch, ScriptedResponse};
use serde_json::json;

use cpw_testkit::app::{Options, command_for, command_id, spawn_app_with};

#[tokio::test]
async fn a_key_refused_only_on_purchases_does_not_flap_the_replica() {
    let mut app = spawn_app_with(Options::default()).await;
    app.set_faults(FaultsPatch {
        scripted: Some(vec![ScriptedResponse {
            customer_id: Some("cus_scoped".into()),
            status: 403,
            body: json!({"message": "missing scope credits:write"}),
            headers: Default::default(),
            times: None,
        }]),
        ..FaultsPatch::default()
    });
    let id = command_id();
    app.publish(&command_for(&id, "cus_scoped")).await;
    app.wait_requests(1).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    let purchases = app
        .sim
        .requests()
        .iter()
        .filter(|r| r.idempotency_key.as_deref() == Some(id.as_str()))
        .count();
    assert!(
        purchases <= 5,
        "{purchases} refused purchases in 20 s: the replica flaps"
    );
    assert!(
        app.no_event_for(Duration::from_millis(10)).await,
        "no event for a key fault"
    );
    // The scope is granted: the command, kept all along, succeeds once.
    app.set_faults(FaultsPatch {
        scripted: Some(Vec::new()),
        ..FaultsPatch::default()
    });
    let event = app.next_event().await;
    assert_eq!(event.kind(), "credit_purchase.succeeded");
    assert_eq!(event.command_id(), id);
    app.assert_charged_once(&[id]);
    app.cleanup().await;
}
