//! Steps with the same delay share one delay queue (docs/contract.md section 5), so
//! `retry.redelivery_delays_secs = [1, 1, 1]` is a valid budget of three
//! broker-side steps through `<queue>.retry.1s`.

use credit_purchase_worker::simulator::Faults;

use cpw_testkit::app::{Options, command, command_id, spawn_app_with};

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

    // 4 attempts per delivery: the first one and 3 delay steps, all
    // three steps through the one queue.
    app.expect_exhausted(&id, 16, 3).await;
    assert_eq!(app.depth(&format!("{}.retry.1s", app.queue)).await, 0);
    app.wait_until_drained().await;
    app.cleanup().await;
}
