//! Redirects are never followed (docs/contract.md section 4): a 307 would re-send the
//! purchase, its key and body to wherever `Location` points, and a 302 would
//! turn it into a GET. Either answer is undocumented, so the command fails
//! with `unexpected_response` and is dead-lettered for an operator.

use std::collections::BTreeMap;
use std::time::Duration;

use credit_purchase_worker::simulator::{FaultsPatch, ScriptedResponse};
use serde_json::json;

use cpw_testkit::app::{command, command_id, spawn_app};

/// The customer of [`command`]; the redirect target is another one.
const CUSTOMER: &str = "cus_Typ0px2W0aiEtl";

/// A purchase answered with `status` and a `Location` that points at the
/// simulator's own purchase URL for another customer, where a followed
/// redirect would be charged.
async fn redirect_is_not_followed(status: u16) {
    let mut app = spawn_app().await;
    let elsewhere = format!(
        "{}/v1/customers/cus_elsewhere/credits/itm_3kXODDF42QXtnL/purchase",
        app.sim.base_url()
    );
    app.set_faults(FaultsPatch {
        scripted: Some(vec![ScriptedResponse {
            customer_id: Some(CUSTOMER.into()),
            status,
            body: json!({"message": "moved"}),
            headers: BTreeMap::from([("location".to_owned(), elsewhere)]),
            times: None,
        }]),
        ..FaultsPatch::default()
    });
    let id = command_id();
    app.publish(&command(&id)).await;

    let event = app.next_event().await;
    assert_eq!(
        (event.kind(), event.code()),
        ("credit_purchase.failed", "unexpected_response"),
        "{}",
        event.body
    );
    assert_eq!(event.command_id(), id);
    assert_eq!(event.body["error"]["http_status"], status);
    assert_eq!(event.body["attempts"], 1);
    let dead = app.wait_dead_letters(1).await;
    assert_eq!(dead.len(), 1, "the command is dead-lettered");
    let requests = app.sim.requests();
    assert_eq!(
        requests.len(),
        1,
        "only the original request reached the simulator: {requests:?}"
    );
    assert_eq!(requests[0].method, "POST");
    assert!(requests[0].path.contains(CUSTOMER), "{:?}", requests[0]);
    let ledger = app.ledger();
    assert!(ledger.charges.is_empty(), "nothing charged: {ledger:?}");
    assert!(
        app.no_event_for(Duration::from_millis(500)).await,
        "exactly one event"
    );
    app.wait_until_drained().await;
    app.cleanup().await;
}

#[tokio::test]
async fn a_307_is_not_followed_and_is_unexpected() {
    redirect_is_not_followed(307).await;
}

#[tokio::test]
async fn a_302_is_not_followed_and_is_unexpected() {
    redirect_is_not_followed(302).await;
}
