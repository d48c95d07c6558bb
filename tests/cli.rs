//! The binary as a user meets it: help, configuration errors, the simulator.

use std::process::{Command, Stdio};
use std::time::Duration;

use cpw_testkit::process::worker_binary;
use tokio::io::{AsyncBufReadExt, BufReader};

#[test]
fn help_lists_every_subcommand() {
    let out = Command::new(worker_binary())
        .arg("--help")
        .output()
        .expect("runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for sub in [
        "run",
        "simulator",
        "demo",
        "publish",
        "dead-letters",
        "check",
    ] {
        assert!(text.contains(sub), "--help lacks {sub}:\n{text}");
    }
}

fn run_with(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = Command::new(worker_binary())
        .arg("run")
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_bad_value_stops_the_start_with_one_line_naming_the_key() {
    for (key, value, name) in [
        ("CPW__AMQP__PREFETCH", "0", "amqp.prefetch"),
        (
            "CPW__RETRY__REDELIVERY_DELAYS_SECS",
            "90000",
            "retry.redelivery_delays_secs",
        ),
        (
            "CPW__HYPERLINE__BASE_URL",
            "http://api.example.com",
            "hyperline.base_url",
        ),
        ("CPW__HYPERLINE__TIMEOUT_SECS", "soon", "timeout_secs"),
    ] {
        let (code, stderr) = run_with(&[(key, value), ("CPW__HYPERLINE__API_KEY", "k")]);
        assert_ne!(code, Some(0), "{key}={value} was accepted");
        assert!(code.is_some(), "exited, not killed");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
        assert!(stderr.contains(name), "{stderr:?} does not name {name}");
    }
}

#[test]
fn run_refuses_to_start_without_a_key() {
    let (code, stderr) = run_with(&[]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("hyperline.api_key"), "{stderr:?}");
}

#[test]
fn the_key_is_not_echoed_when_the_start_fails() {
    let (code, stderr) = run_with(&[
        ("CPW__HYPERLINE__API_KEY", "sk_very_secret_1234"),
        ("CPW__AMQP__PREFETCH", "0"),
    ]);
    assert_ne!(code, Some(0));
    assert!(!stderr.contains("sk_very_secret_1234"), "{stderr:?}");
}

#[tokio::test]
async fn the_simulator_subcommand_serves_the_contract() {
    let mut child = tokio::process::Command::new(worker_binary())
        .args([
            "simulator",
            "--listen",
            "127.0.0.1:0",
            "--api-key",
            "cli_key",
            "--rate-limit",
            "0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("announces itself")
        .expect("reads")
        .expect("a line");
    let base = line.split_whitespace().last().expect("url").to_owned();
    assert!(base.starts_with("http://127.0.0.1:"), "{line}");
    let http = reqwest::Client::new();
    let url = format!("{base}/v1/customers/cus_1/credits/itm_1/purchase");
    let buy = |key: &'static str| {
        http.post(&url)
            .bearer_auth(key)
            .header("Idempotency-Key", "cli-test-key-000000001")
            .json(&serde_json::json!({"credit_count": 5, "amount_excluding_tax": 100}))
            .send()
    };
    let first = buy("cli_key").await.expect("answer");
    assert_eq!(first.status().as_u16(), 201);
    let first: serde_json::Value = first.json().await.expect("json");
    let again: serde_json::Value = buy("cli_key")
        .await
        .expect("answer")
        .json()
        .await
        .expect("json");
    assert_eq!(first, again, "replayed");
    assert_eq!(buy("wrong").await.expect("answer").status().as_u16(), 401);
    let ledger: serde_json::Value = http
        .get(format!("{base}/_sim/ledger"))
        .send()
        .await
        .expect("ledger")
        .json()
        .await
        .expect("json");
    assert_eq!(ledger["charges"].as_array().map(Vec::len), Some(1));
    assert_eq!(ledger["replayed"], 1);
    child.start_kill().expect("stop");
}
