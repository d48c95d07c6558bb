//! The logs as operators run them: the binary with its default `log.level`
//! and format, nothing set but the broker, the simulator and the key. A
//! charge must be traceable from its `command_id` to its `invoice_id` in
//! one line that a log pipeline can query without digging into a nested
//! object, and every line must be one JSON object.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use credit_purchase_worker::simulator::FaultsPatch;
use serde_json::{Map, Value, json};

use cpw_testkit::app::{
    Event, Options, TestApp, command_for, command_id, scripted, spawn_without_worker,
};
use cpw_testkit::process::{terminate, worker_binary};

/// The binary as operators run it, its log in a file of its own.
struct Binary {
    dir: PathBuf,
    child: tokio::process::Child,
}

impl Binary {
    fn start(app: &TestApp) -> Binary {
        let dir: PathBuf = std::env::temp_dir().join(format!("cpw-logs-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let stderr = std::fs::File::create(dir.join("stderr.log")).expect("log file");
        let child = tokio::process::Command::new(worker_binary())
            .arg("run")
            .envs(app.env.iter())
            .env_remove("RUST_LOG")
            .env_remove("CPW__LOG__LEVEL")
            .env_remove("CPW__LOG__FORMAT")
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("binary starts");
        Binary { dir, child }
    }

    fn text(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).expect("log read")
    }

    /// SIGTERM, and the wait for a clean exit.
    async fn stop(&mut self) {
        let status = terminate(&mut self.child, Duration::from_secs(30)).await;
        assert!(status.success(), "{status:?}");
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Each line, as one JSON object.
fn json_lines(logs: &str) -> Vec<Map<String, Value>> {
    logs.lines()
        .map(|line| match serde_json::from_str(line) {
            Ok(Value::Object(fields)) => fields,
            _ => panic!("a log line that is not one JSON object: {line}"),
        })
        .collect()
}

#[tokio::test]
async fn a_charge_is_one_json_line_from_command_id_to_invoice_id_at_the_default_level() {
    let mut app = spawn_without_worker(Options::default()).await;
    let mut binary = Binary::start(&app);

    let ids = app.publish_commands(5).await;
    let events: Vec<Event> = app
        .events_until(Duration::from_secs(30), |events| events.len() >= ids.len())
        .await;
    assert_eq!(events.len(), ids.len(), "every command answered");
    binary.stop().await;

    let logs = binary.text();
    let lines = json_lines(&logs);
    for line in &lines {
        for key in ["timestamp", "level", "message", "target"] {
            assert!(line.contains_key(key), "no {key} in {line:?}");
        }
    }
    let purchased: HashMap<&str, Vec<&Map<String, Value>>> = lines
        .iter()
        .filter(|l| l["message"] == "credits purchased")
        .fold(HashMap::new(), |mut by_id, line| {
            let id = line.get("command_id").and_then(Value::as_str);
            by_id.entry(id.unwrap_or_default()).or_default().push(line);
            by_id
        });
    for event in &events {
        let id = event.command_id();
        let found = purchased.get(id).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(
            found.len(),
            1,
            "one `credits purchased` line with a top-level command_id {id}; lines: {logs}"
        );
        assert_eq!(found[0]["invoice_id"], event.body["invoice_id"]);
        assert_eq!(found[0]["level"], "INFO");
        assert_eq!(found[0]["customer_id"], event.body["customer_id"]);
    }
    app.cleanup().await;
}

/// Fields a log pipeline reads as numbers.
const NUMBERS: [&str; 8] = [
    "http_status",
    "attempts",
    "attempt",
    "step",
    "setbacks",
    "hold_ms",
    "retry_in_ms",
    "next_probe_in_ms",
];

#[tokio::test]
async fn every_field_of_every_outcome_is_typed_and_a_clean_stop_warns_of_nothing() {
    let mut app = spawn_without_worker(Options::default()).await;
    app.set_faults(FaultsPatch {
        scripted: Some(vec![
            scripted("cus_rejected", 422, json!({"message": "no"}), &[], None),
            scripted("cus_down", 503, json!({"message": "down"}), &[], None),
            scripted(
                "cus_busy",
                429,
                json!({"message": "slow"}),
                &[("Retry-After", "1")],
                Some(1),
            ),
        ]),
        after_charge: Some(vec![scripted(
            "cus_garbled",
            201,
            json!("garbage"),
            &[],
            None,
        )]),
        ..FaultsPatch::default()
    });
    let mut binary = Binary::start(&app);
    for customer in [
        "cus_ok",
        "cus_rejected",
        "cus_down",
        "cus_busy",
        "cus_garbled",
    ] {
        app.publish(&command_for(&command_id(), customer)).await;
    }
    app.publish_raw(b"{not json", lapin::BasicProperties::default())
        .await;
    let events: Vec<Event> = app
        .events_until(Duration::from_secs(60), |events| events.len() >= 6)
        .await;
    let mut codes: Vec<&str> = events.iter().map(Event::code).collect();
    codes.sort_unstable();
    assert_eq!(
        codes,
        [
            "",
            "",
            "invalid_command",
            "rejected",
            "retries_exhausted",
            "unexpected_response"
        ]
    );
    app.wait_until_drained().await;
    // Every line of the outcomes is out (WARN and ERROR at once, INFO
    // within 50 ms) once the line of the last dead letter is.
    let before_stop = app_logged(&binary, "failed: dead-lettering for an operator", 2).await;
    binary.stop().await;

    let logs = binary.text();
    let mut typed = 0;
    for line in json_lines(&logs) {
        for (key, value) in &line {
            if let Value::String(text) = value {
                assert!(
                    !text.starts_with("Some(") && text != "None",
                    "{key} is Rust Debug text: {line:?}"
                );
            }
            if NUMBERS.contains(&key.as_str()) {
                assert!(
                    value.is_number() || value.is_null(),
                    "{key} is not a number: {line:?}"
                );
                typed += usize::from(key == "http_status");
            }
        }
    }
    assert!(
        typed >= 3,
        "http_status logged as a number on the failures: {logs}"
    );
    let after_stop = &logs[before_stop.min(logs.len())..];
    for line in json_lines(after_stop) {
        assert!(
            !matches!(line["level"].as_str(), Some("WARN" | "ERROR")),
            "a clean stop logs no WARN: {line:?}"
        );
    }
    app.cleanup().await;
}

/// Waits (bounded) until `message` was logged `n` times; the log's length then.
async fn app_logged(binary: &Binary, message: &str, n: usize) -> usize {
    cpw_testkit::wait_until(
        &format!("{n} lines `{message}`"),
        Duration::from_millis(50),
        async || binary.text().matches(message).count() >= n,
    )
    .await;
    binary.text().len()
}
