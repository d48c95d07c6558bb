//! A command that crashes its workers mid-request: each delivery is cut by a
//! SIGKILL while its request is open, so no delivery records a thing, until
//! the worker dead-letters the command as a possible poison message. Its
//! first request charged. The letter must say "may have charged, first
//! request unknown" (never "no request could have charged"), `replay` must
//! refuse it without `--force`, and `reconcile` must consider it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cpw_testkit::app::{Options, TestApp, command, command_id, spawn_without_worker};
use cpw_testkit::wait_until;
use credit_purchase_worker::simulator::Faults;
use lapin::BasicProperties;
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

/// A Hyperline that takes every request and never answers: each request it
/// has read the start of is counted.
async fn black_hole() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                if matches!(socket.read(&mut buf).await, Ok(n) if n > 0) {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                // Held open, unanswered, until the peer goes.
                while matches!(socket.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    (url, seen)
}

/// Starts a worker process, waits until `requested` says its request is
/// open, and kills it with SIGKILL.
async fn kill_at_request(app: &TestApp, what: &str, requested: impl Fn() -> bool) {
    let mut child = app.spawn_process();
    wait_until(what, Duration::from_millis(10), async || requested()).await;
    child.start_kill().expect("SIGKILL");
    tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the killed process exits")
        .expect("wait");
}

/// An app without a worker whose simulator charges every request and then
/// holds it open unanswered, with a delivery limit of 2 and a request
/// timeout (20 s) no kill waits for.
async fn hanging_app() -> TestApp {
    let faults = Faults {
        hang_rate: 1.0,
        rate_limit: 0,
        ..Faults::default()
    };
    spawn_without_worker(
        Options::default()
            .faults(faults)
            .env("CPW__AMQP__DELIVERY_LIMIT", 2)
            .env("CPW__HYPERLINE__TIMEOUT_SECS", 20),
    )
    .await
}

/// Starts a worker process and kills it once `id`'s first request has
/// charged. The simulator records a request as it arrives and charges it a
/// moment later, so the kill waits on the charge itself: killing at the
/// recorded request could leave a command that was never charged.
async fn kill_at_first_request(app: &TestApp, id: &str) {
    kill_at_request(app, "the first request's charge", || {
        app.ledger().charges_for(id) == 1
    })
    .await;
    assert_eq!(app.sim.requests().len(), 1, "one request was made");
}

/// Runs `dead-letters reconcile --json`, which must exit 0 or 1 (settled,
/// or left for a person), and returns its rows and what it printed.
async fn reconcile_json(app: &TestApp) -> (Vec<Value>, String) {
    let (code, out, stderr) = app.cli(&["dead-letters", "reconcile", "--json"], &[]).await;
    println!("--- dead-letters reconcile --json\n{out}{stderr}");
    assert!(matches!(code, Some(0 | 1)), "{out}{stderr}");
    let rows = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    (rows, out)
}

#[tokio::test]
async fn a_command_that_crashed_its_workers_mid_request_may_have_charged() {
    // A delivery limit of 2: every redelivery is worn, so the kills refresh
    // the command and then declare it poison in a few rounds.
    let mut app = hanging_app().await;
    let id = command_id();
    let published_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let body = command(&id).to_string();
    app.publish_raw(
        body.as_bytes(),
        BasicProperties::default().with_timestamp(published_s),
    )
    .await;

    // The first request charges, then hangs: killed.
    kill_at_first_request(&app, &id).await;

    // Every later request is held open by a Hyperline that never answers:
    // each worker is killed at its request, until one, finding the command
    // worn for the last time, dead-letters it.
    let (hole, seen) = black_hole().await;
    let simulator = app.env["CPW__HYPERLINE__BASE_URL"].clone();
    app.env
        .insert("CPW__HYPERLINE__BASE_URL".into(), hole.clone());
    let dead = app.dead_queue();
    let mut kills = 1;
    while app.depth(&dead).await == 0 {
        assert!(kills < 10, "dead-lettered after a few kills");
        let before = seen.load(Ordering::SeqCst);
        let mut child = app.spawn_process();
        let mut requested = false;
        wait_until(
            "a request, or the dead letter",
            Duration::from_millis(10),
            async || {
                requested = seen.load(Ordering::SeqCst) > before;
                requested || app.depth(&dead).await > 0
            },
        )
        .await;
        child.start_kill().expect("SIGKILL");
        let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        kills += usize::from(requested);
    }
    println!("killed at {kills} requests before the command was dead-lettered");
    app.env.insert("CPW__HYPERLINE__BASE_URL".into(), simulator);

    // What an operator sees.
    let (code, listed, stderr) = app.cli(&["dead-letters", "list"], &[]).await;
    assert_eq!(code, Some(0), "{stderr}");
    println!("--- dead-letters list\n{listed}");
    assert!(listed.contains("first request unknown"), "{listed}");
    assert!(
        !listed.contains("no request could have charged"),
        "{listed}"
    );
    let (code, json, stderr) = app.cli(&["dead-letters", "list", "--json"], &[]).await;
    assert_eq!(code, Some(0), "{stderr}");
    println!("--- dead-letters list --json\n{json}");
    let row: Value = serde_json::from_str(json.trim()).expect("one JSON line");
    assert_eq!(row["command_id"], id.as_str());
    assert_eq!(row["first_request_unknown"], true, "{row}");
    assert!(row["unrecorded_before"].is_string(), "{row}");
    assert!(
        row["first_attempt"].is_null(),
        "no estimate stands in: {row}"
    );
    let (code, shown, stderr) = app
        .cli(&["dead-letters", "show", "--command-id", &id], &[])
        .await;
    assert_eq!(code, Some(0), "{stderr}");
    println!("--- dead-letters show\n{shown}");
    let idempotency = shown
        .lines()
        .find(|l| l.starts_with("idempotency"))
        .unwrap_or_default();
    assert!(
        idempotency.contains("may have charged, first request unknown"),
        "{shown}"
    );
    assert!(!shown.contains("never opened"), "{shown}");

    // `replay` refuses it without --force: the letter stays, nothing bought.
    let (code, out, stderr) = app
        .cli(&["dead-letters", "replay", "--command-id", &id], &[])
        .await;
    println!("--- dead-letters replay\n{out}{stderr}");
    assert_eq!(code, Some(1), "{out}{stderr}");
    assert!(stderr.contains("first request unknown"), "{stderr}");
    assert_eq!(app.depth(&dead).await, 1, "the letter stays");

    // `reconcile` considers it: one row, the command's, never "not charged".
    let (rows, out) = reconcile_json(&app).await;
    assert_eq!(rows.len(), 1, "{out}");
    assert_eq!(rows[0]["command_id"], id.as_str());
    assert_ne!(rows[0]["found"], "not_charged", "{out}");
    let (_, text, _) = app.cli(&["dead-letters", "reconcile"], &[]).await;
    println!("--- dead-letters reconcile\n{text}");

    // The event says it too.
    let event = app.event_for(&id).await;
    assert_eq!(event["error"]["code"], "retries_exhausted", "{event}");
    let message = event["error"]["message"].as_str().unwrap_or_default();
    println!("--- the failed event's message\n{message}");
    assert!(message.contains("first request unknown"), "{message}");
    assert_eq!(
        app.ledger().charges_for(&id),
        1,
        "charged once, never again"
    );
    app.cleanup().await;
}

/// The broker's own dead letter of a command that was delivered, then
/// expired (a publisher's `expiration`) before it came back: its delivery
/// is the only trace, and it may have charged.
#[tokio::test]
async fn a_command_that_expired_after_a_delivery_may_have_charged() {
    let app = spawn_without_worker(Options::default()).await;
    let id = command_id();
    let body = command(&id).to_string();
    app.publish_raw(
        body.as_bytes(),
        BasicProperties::default().with_expiration("1500".into()),
    )
    .await;
    // A consumer that takes it and dies: the broker counts a delivery.
    let channel = app.connection.create_channel().await.expect("channel");
    let got = channel
        .basic_get(
            app.queue.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: false },
        )
        .await
        .expect("basic.get")
        .expect("the command");
    assert_eq!(got.delivery.data, body.as_bytes());
    channel.close(200, "gone".into()).await.expect("close");
    let dead = app.dead_queue();
    wait_until(
        "the expired letter",
        Duration::from_millis(50),
        async || app.depth(&dead).await == 1,
    )
    .await;

    let (code, json, stderr) = app.cli(&["dead-letters", "list", "--json"], &[]).await;
    assert_eq!(code, Some(0), "{stderr}");
    println!("--- dead-letters list --json\n{json}");
    let row: Value = serde_json::from_str(json.trim()).expect("one JSON line");
    assert_eq!(row["broker_reason"], "expired", "{row}");
    assert_eq!(row["first_request_unknown"], true, "{row}");
    let detail = row["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("first request unknown"), "{row}");
    // Read twice: the put-back copy keeps the proof of the delivery.
    let (_, again, _) = app.cli(&["dead-letters", "list", "--json"], &[]).await;
    let again: Value = serde_json::from_str(again.trim()).expect("one JSON line");
    assert_eq!(again["first_request_unknown"], true, "{again}");
    let (code, shown, _) = app
        .cli(&["dead-letters", "show", "--command-id", &id], &[])
        .await;
    assert_eq!(code, Some(0));
    println!("--- dead-letters show\n{shown}");
    assert!(
        shown.contains("may have charged, first request unknown"),
        "{shown}"
    );

    let (code, out, stderr) = app
        .cli(&["dead-letters", "replay", "--command-id", &id], &[])
        .await;
    assert_eq!(code, Some(1), "{out}{stderr}");
    assert!(stderr.contains("first request unknown"), "{stderr}");
    let (rows, out) = reconcile_json(&app).await;
    assert_eq!(rows.len(), 1, "considered: {out}");
    assert_eq!(rows[0]["error_code"], "expired", "{out}");
    // No charge at all, but no `timestamp` bounds its first request.
    assert_ne!(rows[0]["found"], "not_charged", "{out}");
    assert_eq!(app.depth(&dead).await, 1, "the letter stays");
    app.cleanup().await;
}

/// Without a `timestamp`, nothing bounds the first request of a command
/// whose worker was killed mid-request: once worn, it gets no further
/// request and is dead-lettered, its first request unknown.
#[tokio::test]
async fn a_worn_command_without_a_timestamp_gets_no_further_request() {
    let mut app = hanging_app().await;
    let id = command_id();
    app.publish(&command(&id)).await;
    kill_at_first_request(&app, &id).await;

    app.start_worker().await;
    let event = app.event_for(&id).await;
    assert_eq!(event["error"]["code"], "retries_exhausted", "{event}");
    let message = event["error"]["message"].as_str().unwrap_or_default();
    println!("--- the failed event's message\n{message}");
    assert!(message.contains("first request unknown"), "{message}");
    assert!(message.contains("`timestamp`"), "{message}");
    assert_eq!(app.sim.requests().len(), 1, "no request after the kill");
    let (code, json, stderr) = app.cli(&["dead-letters", "list", "--json"], &[]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let row: Value = serde_json::from_str(json.trim()).expect("one JSON line");
    assert_eq!(row["first_request_unknown"], true, "{row}");
    app.cleanup().await;
}
