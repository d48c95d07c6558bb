//! A SIGTERM while the broker answers slowly: the stop still drains, acks
//! what was answered, and puts the rest back, so a replica started after
//! it answers no command a second time.

use std::collections::HashMap;
use std::time::Duration;

use credit_purchase_worker::simulator::Faults;
use lapin::BasicProperties;

use cpw_testkit::app::{Options, command, command_id, spawn_without_worker};
use cpw_testkit::broker::amqp_url;
use cpw_testkit::process::terminate;
use cpw_testkit::proxy::Proxy;

/// Longer than the worker's bound on a broker call of its session (10 s):
/// the consumer's `basic.cancel` is not answered in time, and neither are
/// the channel and connection closes; shorter than the confirm timeout
/// (30 s), so every event in flight is confirmed in the end.
const SLOW: Duration = Duration::from_secs(11);

#[tokio::test]
async fn a_sigterm_while_the_broker_answers_slowly_answers_each_command_once() {
    let faults = Faults {
        latency_ms: 1000,
        rate_limit: 0,
        ..Faults::default()
    };
    let options = Options::default()
        .faults(faults)
        .env("CPW__WORKER__SHUTDOWN_GRACE_SECS", 5);
    let mut app = spawn_without_worker(options).await;
    let proxy = Proxy::start(&amqp_url()).await;
    // Half of them name a `reply_to` no queue answers to: its tries must
    // not hold the command.
    let missing = format!("{}.no-such-reply-queue", app.queue);
    let mut ids = Vec::new();
    for n in 0..60 {
        let id = command_id();
        let props = match n % 2 {
            0 => BasicProperties::default().with_reply_to(missing.as_str().into()),
            _ => BasicProperties::default(),
        };
        app.publish_raw(command(&id).to_string().as_bytes(), props)
            .await;
        ids.push(id);
    }
    let mut child = app.spawn_process_with(&[("CPW__AMQP__URL", proxy.url())]);
    app.wait_requests(10).await;
    proxy.slow_answers(SLOW);
    let status = terminate(&mut child, Duration::from_secs(90)).await;
    assert_eq!(status.code(), Some(0), "a graceful stop");
    drop(proxy);

    app.start_worker().await;
    let mut events = app.events_answering(&ids).await;
    while let Some(late) = app.next_event_within(Duration::from_secs(3)).await {
        events.push(late);
    }
    let mut per_command: HashMap<&str, Vec<&str>> = HashMap::new();
    for e in &events {
        per_command
            .entry(e.command_id())
            .or_default()
            .push(e.kind());
    }
    let twice: Vec<_> = per_command.iter().filter(|(_, k)| k.len() > 1).collect();
    assert!(
        twice.is_empty(),
        "{} of {} commands answered more than once: {twice:?}",
        twice.len(),
        ids.len()
    );
    for id in &ids {
        assert_eq!(
            per_command.get(id.as_str()),
            Some(&vec!["credit_purchase.succeeded"]),
            "{id}"
        );
    }
    app.assert_charged_once(&ids);
    app.wait_until_drained().await;
    app.cleanup().await;
}
