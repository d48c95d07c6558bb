//! The logs as operators run them: the binary with its default `log.level`
//! and format, nothing set but the broker, the simulator and the key. A
//! charge must be traceable from its `command_id` to its `invoice_id` in
//! one line that a log pipeline can query without digging into a nested
//! object, and every line must be one JSON object.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::helpers::{Event, Options, spawn_without_worker};

#[tokio::test]
async fn a_charge_is_one_json_line_from_command_id_to_invoice_id_at_the_default_level() {
    let dir: PathBuf = std::env::temp_dir().join(format!("cpw-logs-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut app = spawn_without_worker(Options::default()).await;
    let stderr = std::fs::File::create(dir.join("stderr.log")).expect("log file");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_credit-purchase-worker"))
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

    let ids = app.publish_commands(5).await;
    let events: Vec<Event> = app
        .events_until(Duration::from_secs(30), |events| events.len() >= ids.len())
        .await;
    assert_eq!(events.len(), ids.len(), "every command answered");
    let pid = child.id().expect("running").to_string();
    let signalled = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(signalled.success());
    tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exits after SIGTERM")
        .expect("exit status");

    let logs = std::fs::read_to_string(dir.join("stderr.log")).expect("log read");
    let lines: Vec<Map<String, Value>> = logs
        .lines()
        .map(|line| match serde_json::from_str(line) {
            Ok(Value::Object(fields)) => fields,
            _ => panic!("a log line that is not one JSON object: {line}"),
        })
        .collect();
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
    let _ = std::fs::remove_dir_all(&dir);
}
