//! The API key cannot leak. The worker binary runs with a distinctive key,
//! debug logs in JSON, and traffic that exercises every path that handles
//! text from the network or reports a failure: 5xx, hangs past the timeout,
//! dropped connections, 429s, a 400 whose message echoes the key, a period
//! of 401s (pause, probes, recovery), invalid commands, and a SIGTERM. Then
//! every log line, every event (body and properties), every dead letter and
//! every request the simulator recorded is searched for the key: it must
//! appear nowhere.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use credit_purchase_worker::simulator::{Faults, FaultsPatch, ScriptedResponse};
use lapin::BasicProperties;
use serde_json::json;

use cpw_testkit::app::{Event, Options, TestApp, command, command_for, spawn_without_worker};
use cpw_testkit::process::{terminate, worker_binary};

/// The part of the key no legitimate output can contain.
const CANARY: &str = "LEAKCANARY";

/// The worker binary with debug logs in JSON, stdout and stderr to files.
fn spawn_logged(app: &TestApp, dir: &Path) -> tokio::process::Child {
    let file = |name: &str| {
        Stdio::from(std::fs::File::create(dir.join(name)).expect("log file can be created"))
    };
    tokio::process::Command::new(worker_binary())
        .arg("run")
        .envs(app.env.iter())
        .env("RUST_LOG", "debug")
        .env("CPW__LOG__FORMAT", "json")
        .stdout(file("stdout.log"))
        .stderr(file("stderr.log"))
        .kill_on_drop(true)
        .spawn()
        .expect("binary starts")
}

/// Events until every id in `ids` has one, bounded.
async fn events_for(app: &mut TestApp, ids: &[String], within: Duration) -> Vec<Event> {
    let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
    app.events_until(within, |events| {
        let seen: HashSet<&str> = events.iter().map(Event::command_id).collect();
        wanted.is_subset(&seen)
    })
    .await
}

/// Polls (bounded) until the simulator refused a credential probe: a
/// request without Idempotency-Key answered 401.
async fn wait_for_refused_probe(app: &TestApp) {
    cpw_testkit::wait_until(
        "the worker to probe its refused key",
        Duration::from_millis(50),
        async || {
            app.sim
                .requests()
                .iter()
                .any(|r| r.idempotency_key.is_none() && r.status == Some(401))
        },
    )
    .await;
}

fn occurrences(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

#[tokio::test]
async fn the_api_key_appears_in_no_log_event_dead_letter_or_request() {
    let key = format!("sk_live_{CANARY}_{}", uuid::Uuid::new_v4().simple());
    let dir: PathBuf = std::env::temp_dir().join(format!("cpw-leak-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let faults = Faults {
        fail_rate: 0.2,
        hang_rate: 0.05,
        drop_rate: 0.05,
        hang_secs: 5,
        rate_limit: 15,
        rate_limit_window_ms: 500,
        scripted: vec![
            ScriptedResponse {
                customer_id: Some("cus_scripted".to_owned()),
                status: 400,
                body: json!({ "message": format!("bad key {key}") }),
                headers: Default::default(),
                times: None,
            },
            // The worker paces itself to the announced quota, so the limiter
            // alone may never answer 429: script a few.
            ScriptedResponse {
                customer_id: Some("cus_throttled".to_owned()),
                status: 429,
                body: json!({ "message": "too many requests" }),
                headers: [("Retry-After".to_owned(), "1".to_owned())]
                    .into_iter()
                    .collect(),
                times: Some(2),
            },
        ],
        ..Faults::default()
    };
    let mut app = spawn_without_worker(
        Options::default()
            .api_key(&key)
            .faults(faults)
            .env("CPW__HYPERLINE__TIMEOUT_SECS", 1)
            .env("CPW__WORKER__SHUTDOWN_GRACE_SECS", 5),
    )
    .await;
    let mut child = spawn_logged(&app, &dir);

    // Faults, throttling, a key-echoing 400, invalid commands.
    let mut ids = app.publish_commands(30).await;
    for customer in [
        "cus_scripted",
        "cus_scripted",
        "cus_scripted",
        "cus_throttled",
    ] {
        let id = cpw_testkit::app::command_id();
        app.publish(&command_for(&id, customer)).await;
        ids.push(id);
    }
    for bad in [
        json!(0),
        json!("32"),
        json!(1.5),
        json!(9_007_199_254_740_992_u64),
    ] {
        let id = cpw_testkit::app::command_id();
        let mut c = command(&id);
        c["credit_count"] = bad;
        app.publish(&c).await;
        ids.push(id);
    }
    app.publish_raw(
        b"\xff not even UTF-8",
        BasicProperties::default().with_message_id("leak-test-not-utf8-0001".into()),
    )
    .await;
    ids.push("leak-test-not-utf8-0001".to_owned());
    let mut events = events_for(&mut app, &ids, Duration::from_secs(90)).await;
    let rejected: Vec<&Event> = events.iter().filter(|e| e.code() == "rejected").collect();
    assert!(
        !rejected.is_empty()
            && rejected.iter().all(|e| {
                e.body["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("[REDACTED]"))
            }),
        "the scripted 400 came back redacted"
    );

    // A refused key: pause, probes, then recovery.
    app.set_faults(FaultsPatch {
        reject_auth: Some(true),
        ..FaultsPatch::default()
    });
    let paused = app.publish_commands(5).await;
    wait_for_refused_probe(&app).await;
    app.set_faults(FaultsPatch {
        reject_auth: Some(false),
        fail_rate: Some(0.0),
        hang_rate: Some(0.0),
        drop_rate: Some(0.0),
        ..FaultsPatch::default()
    });
    events.extend(events_for(&mut app, &paused, Duration::from_secs(60)).await);

    // A graceful stop.
    let status = terminate(&mut child, Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0));
    while let Some(e) = app.next_event_within(Duration::from_millis(200)).await {
        events.push(e);
    }

    let logs = ["stderr.log", "stdout.log"]
        .iter()
        .map(|name| std::fs::read_to_string(dir.join(name)).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() > 20, "the worker logged: {} lines", lines.len());
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"level\":\"WARN\"") || l.contains("\"level\":\"ERROR\"")),
        "some warnings were logged (else this test proves little)"
    );
    let ledger = app.ledger();
    let throttled = app
        .sim
        .requests()
        .iter()
        .filter(|r| r.status == Some(429))
        .count();
    assert!(
        ledger.faults > 0 && throttled > 0,
        "faults and 429s were exercised: {} faults, {throttled} answered 429",
        ledger.faults,
    );

    let mut places: Vec<(String, String)> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        places.push((format!("log line {}", i + 1), (*line).to_owned()));
    }
    for e in &events {
        places.push((
            format!("event {}", e.command_id()),
            format!("{} {:?}", e.body, e.properties),
        ));
    }
    for (body, properties) in app.take_dead_letters().await {
        places.push((
            "dead letter".to_owned(),
            format!("{} {properties:?}", String::from_utf8_lossy(&body)),
        ));
    }
    for r in app.sim.requests() {
        places.push((
            format!("request {}", r.path),
            serde_json::to_string(&r).unwrap_or_default(),
        ));
    }
    let leaks: Vec<String> = places
        .iter()
        .filter(|(_, text)| occurrences(text, CANARY) > 0)
        .map(|(place, text)| format!("{place}: {text}"))
        .collect();
    assert!(
        leaks.is_empty(),
        "the API key leaked in {} places (logs in {}):\n{}",
        leaks.len(),
        dir.display(),
        leaks.join("\n")
    );
    println!(
        "searched {} log lines, {} events, {} places in all: no key",
        lines.len(),
        events.len(),
        places.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
    app.cleanup().await;
}
