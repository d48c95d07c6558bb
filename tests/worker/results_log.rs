//! The results log's coverage: from when it holds every event, which
//! `dead-letters reconcile` and the check at the window rely on to settle a
//! letter as charged; and its size on `/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use credit_purchase_worker::broker::history::{ATTEMPTS_HEADER, OUTCOME_HEADER};
use credit_purchase_worker::broker::results_log;
use credit_purchase_worker::clock::{now_ms, rfc3339_ms};
use credit_purchase_worker::operations::depths::SAMPLE_EVERY;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde_json::json;

use cpw_testkit::app::{SIM_KEY, TestApp, command, command_id, spawn_app};
use cpw_testkit::broker::{as_command, sealed};

const HOUR_MS: u64 = 3_600_000;

/// The name of the app's results log (on by default).
fn log_name(app: &TestApp) -> String {
    let log = app.topology.results_log.as_ref().expect("a results log");
    log.name.clone()
}

/// A stored outcome decided two hours ago, published again into a log that
/// begins with it: the log covers from that publish, not from the outcome's
/// `occurred_at` (which made a charge made before the log began look
/// covered, and a letter settled on a log that could not know its claims).
#[tokio::test]
async fn a_republished_stored_outcome_does_not_backdate_the_logs_coverage() {
    let mut app = spawn_app().await;
    let log = log_name(&app);
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

/// The log's size on `/metrics` (`cpw_queue_messages{queue="results_log"}`)
/// while events keep coming, as they do whenever the replica has work. It
/// was read by consuming the log until a pause of 300 ms: under a steady
/// flow the pause never came, each sample ran into its 10-s bound and was
/// dropped, and the gauge stayed at 0 (while the replica parsed every
/// event it published). It is now the broker's own count.
#[tokio::test]
async fn the_logs_size_is_sampled_while_events_keep_coming() {
    let app = spawn_app().await;
    let log = log_name(&app);
    let channel = app.connection.create_channel().await.expect("a channel");
    let published = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&published);
    // One record every 20 ms straight into the log, for as long as the test
    // runs (readers of the log skip a type they do not know).
    let flow = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tick.tick().await;
            let sent = channel
                .basic_publish(
                    "".into(),
                    log.as_str().into(),
                    BasicPublishOptions::default(),
                    br#"{"type":"test.flow"}"#,
                    BasicProperties::default(),
                )
                .await;
            if sent.is_err() {
                return;
            }
            counted.fetch_add(1, Ordering::Relaxed);
        }
    });
    let addr = app.ops_addr.expect("worker started");
    let series = "cpw_queue_messages{queue=\"results_log\"} ";
    // Two sampling periods: one sample at least falls in the flow.
    let deadline = tokio::time::Instant::now() + 2 * SAMPLE_EVERY + Duration::from_secs(5);
    let kept = loop {
        let text = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .expect("scrape")
            .text()
            .await
            .expect("text");
        let kept: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if kept > 0 {
            break kept;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the results log's size was never sampled while records kept coming \
             ({} published):\n{text}",
            published.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    flow.abort();
    let sent = published.load(Ordering::Relaxed);
    assert!(kept <= sent, "{kept} kept of {sent} published");
    app.cleanup().await;
}
