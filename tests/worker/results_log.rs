//! The results log's coverage: from when it holds every event, which
//! `dead-letters reconcile` and the check at the window rely on to settle a
//! letter as charged.

use credit_purchase_worker::broker::history::{ATTEMPTS_HEADER, OUTCOME_HEADER};
use credit_purchase_worker::broker::results_log;
use credit_purchase_worker::clock::{now_ms, rfc3339_ms};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde_json::json;

use cpw_testkit::app::{SIM_KEY, command, command_id, spawn_app};
use cpw_testkit::broker::{as_command, sealed};

const HOUR_MS: u64 = 3_600_000;

/// A stored outcome decided two hours ago, published again into a log that
/// begins with it: the log covers from that publish, not from the outcome's
/// `occurred_at` (which made a charge made before the log began look
/// covered, and a letter settled on a log that could not know its claims).
#[tokio::test]
async fn a_republished_stored_outcome_does_not_backdate_the_logs_coverage() {
    let mut app = spawn_app().await;
    let log = app
        .topology
        .results_log
        .as_ref()
        .expect("a results log")
        .name
        .clone();
    let decided_ms = now_ms() - 2 * HOUR_MS;
    let decided = rfc3339_ms(decided_ms).expect("a time");
    let facts = json!({
        "event_id": uuid::Uuid::new_v4(), "occurred_at": decided,
        "kind": "credit_purchase.succeeded", "invoice_id": "inv_stored", "new_credit_balance": 7
    });
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from(OUTCOME_HEADER),
        AMQPValue::LongString(LongString::from(facts.to_string())),
    );
    headers.insert(
        ShortString::from(ATTEMPTS_HEADER),
        AMQPValue::LongLongInt(1),
    );
    let id = command_id();
    let body = command(&id).to_string();
    let properties = as_command(BasicProperties::default().with_headers(headers));
    let published_after = now_ms();
    app.publish_raw(
        body.as_bytes(),
        sealed(properties, body.as_bytes(), SIM_KEY),
    )
    .await;
    let event = app.next_event().await;
    assert_eq!(event.body["invoice_id"], "inv_stored", "{}", event.body);
    let occurred = event.body["occurred_at"].as_str().unwrap_or_default();
    assert!(
        occurred.starts_with(&decided[..19]),
        "the stored event: {occurred}"
    );
    assert!(app.ledger().charges.is_empty(), "nothing bought");

    let evidence = results_log::evidence(&app.connection, &log, decided_ms)
        .await
        .expect("the log is read");
    let claim = evidence
        .succeeded
        .iter()
        .find(|s| s.invoice_id == "inv_stored");
    assert_eq!(claim.map(|s| s.command_id.as_str()), Some(id.as_str()));
    let since = evidence.complete_since_ms.expect("the log says from when");
    assert!(
        since >= published_after,
        "the log covers from {since} ms, {} min before it began",
        published_after.saturating_sub(since) / 60_000
    );
    app.cleanup().await;
}
