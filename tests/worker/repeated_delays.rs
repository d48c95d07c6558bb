//! Steps with the same delay share one delay queue (CONTRACT section 5), so
//! `retry.redelivery_delays_secs = [1, 1, 1]` is a valid budget of three
//! broker-side steps through `<queue>.retry.1s`.

use std::time::Duration;

use credit_purchase_worker::broker::header_u64;
use credit_purchase_worker::simulator::Faults;

use crate::helpers::{Options, command, command_id, spawn_app_with};

#[tokio::test]
async fn repeated_delays_share_a_queue_and_count_as_separate_steps() {
    let mut app = spawn_app_with(
        Options::default()
            .env("CPW__RETRY__REDELIVERY_DELAYS_SECS", "1,1,1")
            .faults(Faults {
                fail_rate: 1.0,
                rate_limit: 0,
                ..Faults::default()
            }),
    )
    .await;
    let id = command_id();
    app.publish(&command(&id)).await;

    let event = app.next_event().await;
    assert_eq!(
        (event.kind(), event.code()),
        ("credit_purchase.failed", "retries_exhausted"),
        "{}",
        event.body
    );
    // 4 attempts per delivery: the first one and 3 delay steps.
    assert_eq!(event.body["attempts"], 16);
    assert!(
        app.no_event_for(Duration::from_secs(1)).await,
        "exactly one event"
    );
    let requests = app.sim.requests();
    assert_eq!(requests.len(), 16);
    assert!(
        requests
            .iter()
            .all(|r| r.idempotency_key.as_deref() == Some(id.as_str())),
        "one key throughout"
    );
    assert_eq!(app.ledger().charges_for(&id), 0);
    let dead = app.wait_dead_letters(1).await;
    assert_eq!(dead.len(), 1);
    let headers = dead[0].1.headers().clone();
    assert_eq!(
        header_u64(headers.as_ref(), "cpw-redelivery-step"),
        Some(3),
        "three steps, all through the one queue"
    );
    assert_eq!(app.depth(&format!("{}.retry.1s", app.queue)).await, 0);
    app.wait_until_drained().await;
    app.cleanup().await;
}
