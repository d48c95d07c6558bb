//! Time: a hanging API, a long `Retry-After`, an absurd one, and a command
//! whose idempotency window passes while the replica waits out a refused key.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use credit_purchase_worker::broker::header_u64;
use credit_purchase_worker::broker::history::FIRST_ATTEMPT_HEADER;
use credit_purchase_worker::simulator::{Faults, FaultsPatch, ScriptedResponse};
use serde_json::json;
use tokio::time::Instant;

use cpw_testkit::app::{
    Options, TestApp, WAIT, command, command_for, command_id, scripted, spawn_app_with,
};

/// The distinct commands that reached the simulator.
fn tried(app: &TestApp) -> usize {
    let keys: BTreeSet<_> = app
        .sim
        .requests()
        .into_iter()
        .filter_map(|r| r.idempotency_key)
        .collect();
    keys.len()
}

async fn metrics(app: &TestApp) -> String {
    let addr = app.ops_addr.expect("worker started");
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("metrics answer")
        .text()
        .await
        .expect("metrics text")
}

#[tokio::test]
async fn a_hanging_api_does_not_serialise_the_replica() {
    // Every request is taken and never answered: each one times out (2 s).
    let faults = Faults {
        rate_limit: 0,
        hang_rate: 1.0,
        hang_secs: 30,
        ..Faults::default()
    };
    let app = spawn_app_with(Options::default().faults(faults)).await;
    let timeout = app.settings().hyperline.timeout();
    app.publish_commands(8).await;
    app.wait_requests(1).await;
    let first = Instant::now();
    let deadline = first + 2 * timeout;
    while tried(&app) < 6 {
        assert!(
            Instant::now() < deadline,
            "only {} of 8 commands tried within {:?} of the first request",
            tried(&app),
            2 * timeout
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.cleanup().await;
}

/// The longest 429 wait the worker spends in process here (a knob, 60 s by
/// default), and a `Retry-After` longer than it: the test waits out seconds,
/// not the minute a default configuration would need.
const MAX_RATE_LIMIT_WAIT_SECS: u64 = 2;
const LONG_RETRY_AFTER_SECS: u64 = 4;

#[tokio::test]
async fn a_long_retry_after_pauses_every_command_without_using_a_step() {
    let options = Options::default().env(
        "CPW__RETRY__MAX_RATE_LIMIT_WAIT_SECS",
        MAX_RATE_LIMIT_WAIT_SECS,
    );
    let mut app = spawn_app_with(options).await;
    app.set_faults(FaultsPatch {
        scripted: Some(vec![ScriptedResponse {
            customer_id: None,
            status: 429,
            body: json!({"message": "slow down"}),
            headers: [("Retry-After".to_owned(), LONG_RETRY_AFTER_SECS.to_string())].into(),
            times: Some(1),
        }]),
        ..FaultsPatch::default()
    });
    let ids = app.publish_commands(3).await;
    app.wait_requests(1).await;
    let refused = Instant::now();
    let retry_after = Duration::from_secs(LONG_RETRY_AFTER_SECS);
    let deadline = refused + retry_after + Duration::from_secs(20);
    while app.sim.requests().len() < 2 {
        assert!(Instant::now() < deadline, "no request after the pause");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let waited = refused.elapsed();
    assert!(
        waited >= retry_after - Duration::from_millis(500),
        "a request {waited:?} after a {retry_after:?} Retry-After"
    );
    let events = app
        .events_until(WAIT, |events| events.len() == ids.len())
        .await;
    assert!(
        events
            .iter()
            .all(|e| e.kind() == "credit_purchase.succeeded")
    );
    app.assert_charged_once(&ids);
    let text = metrics(&app).await;
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("cpw_redeliveries_total{")),
        "no delay step used:\n{text}"
    );
    app.cleanup().await;
}

/// `Retry-After` values no replica should honour: the largest number of
/// seconds a `u64` holds (which overflowed `Instant + Duration` and panicked
/// the delivery's task), 10^12 s (31,700 years) and an HTTP date ten years
/// ahead. Each pauses the replica for its longest pause (here the 5 s
/// delivery deadline) and no longer: the next request goes then, and every
/// command is answered and charged once.
#[tokio::test]
async fn an_absurd_retry_after_pauses_the_replica_for_the_longest_pause_only() {
    let options = Options::default()
        .env("CPW__WORKER__DELIVERY_DEADLINE_SECS", 5)
        .env("CPW__RETRY__MAX_RATE_LIMIT_WAIT_SECS", 1);
    let mut app = spawn_app_with(options).await;
    let longest = app.settings().longest_rate_limit_pause();
    assert_eq!(longest, Duration::from_secs(5));
    let ten_years = SystemTime::now() + Duration::from_secs(10 * 365 * 86_400);
    let values = [
        u64::MAX.to_string(),
        10u64.pow(12).to_string(),
        httpdate::fmt_http_date(ten_years),
    ];
    for retry_after in values {
        let limited = scripted(
            "cus_absurd",
            429,
            json!({"message": "slow down"}),
            &[("Retry-After", retry_after.as_str())],
            Some(1),
        );
        app.set_faults(FaultsPatch {
            scripted: Some(vec![limited]),
            ..FaultsPatch::default()
        });
        let before = app.sim.requests().len();
        let refused = command_id();
        app.publish(&command_for(&refused, "cus_absurd")).await;
        app.wait_requests(before + 1).await;
        let at = Instant::now();
        let mut ids = app.publish_commands(2).await;
        while app.sim.requests().len() < before + 2 {
            assert!(
                at.elapsed() < longest + Duration::from_secs(3),
                "Retry-After: {retry_after}: no request within the longest pause"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let paused = at.elapsed();
        assert!(
            paused >= longest - Duration::from_millis(500),
            "Retry-After: {retry_after}: the next request came {paused:?} after the 429"
        );
        ids.push(refused);
        let events = app.events_answering(&ids).await;
        assert!(
            events
                .iter()
                .all(|e| e.kind() == "credit_purchase.succeeded"),
            "Retry-After: {retry_after}: {:?}",
            events.iter().map(|e| &e.body).collect::<Vec<_>>()
        );
        app.assert_charged_once(&ids);
    }
    app.cleanup().await;
}

#[tokio::test]
async fn a_credential_outage_longer_than_the_window_never_charges_twice() {
    // Hyperline forgets a key after 14 s here, and the worker knows it.
    let faults = Faults {
        rate_limit: 0,
        hang_rate: 1.0,
        hang_secs: 30,
        replay_ttl_secs: 14,
        ..Faults::default()
    };
    let options = Options::default()
        .faults(faults)
        .env("CPW__HYPERLINE__IDEMPOTENCY_WINDOW_SECS", 14)
        .env("CPW__WORKER__DELIVERY_DEADLINE_SECS", 5)
        .env("CPW__RETRY__REDELIVERY_DELAYS_SECS", 1);
    let mut app = spawn_app_with(options).await;
    let id = command_id();
    app.publish(&command(&id)).await;
    // The first request charges and hangs; the key is revoked before the
    // retry, so the command goes back while the replica waits out the key.
    app.wait_requests(1).await;
    let charged = Instant::now();
    app.set_faults(FaultsPatch {
        reject_auth: Some(true),
        hang_rate: Some(0.0),
        ..FaultsPatch::default()
    });
    app.wait_readyz(503).await;
    tokio::time::sleep_until(charged + Duration::from_secs(15)).await;
    app.set_faults(FaultsPatch {
        reject_auth: Some(false),
        ..FaultsPatch::default()
    });
    let event = app.next_event().await;
    assert_eq!(
        (event.kind(), event.code()),
        ("credit_purchase.failed", "retries_exhausted"),
        "{}",
        event.body
    );
    assert_eq!(app.ledger().charges_for(&id), 1, "never charged twice");
    let dead = app.wait_dead_letters(1).await;
    assert!(
        header_u64(dead[0].1.headers().as_ref(), FIRST_ATTEMPT_HEADER).is_some(),
        "the dead letter keeps the start of its window"
    );
    app.cleanup().await;
}
