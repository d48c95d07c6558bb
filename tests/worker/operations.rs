//! What operators see: `/metrics` moved by the right amounts after real
//! traffic, `/readyz` flipping on a broker cut, traces crossing the worker.

use std::time::Duration;

use credit_purchase_worker::broker::header_str;
use credit_purchase_worker::simulator::{FaultsPatch, ScriptedResponse};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde_json::json;

use cpw_testkit::app::{TestApp, command, command_for, command_id, spawn_app};

async fn scrape(app: &TestApp) -> String {
    let addr = app.ops_addr.expect("worker started");
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("text")
}

/// The value of one sample line (name with labels), 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_count_real_traffic() {
    let mut app = spawn_app().await;
    app.set_faults(FaultsPatch {
        scripted: Some(vec![
            ScriptedResponse {
                customer_id: Some("cus_missing".into()),
                status: 404,
                body: json!({"message": "no such customer"}),
                headers: Default::default(),
                times: None,
            },
            ScriptedResponse {
                customer_id: Some("cus_flaky".into()),
                status: 503,
                body: json!({"message": "busy"}),
                headers: Default::default(),
                times: Some(1),
            },
        ]),
        ..FaultsPatch::default()
    });
    let before = scrape(&app).await;
    assert_eq!(sample(&before, "cpw_commands_received_total"), 0.0);
    for _ in 0..3 {
        app.publish(&command(&command_id())).await;
    }
    app.publish(&command_for(&command_id(), "cus_missing"))
        .await;
    app.publish(&command_for(&command_id(), "cus_flaky")).await;
    app.publish_raw(b"not json", BasicProperties::default())
        .await;
    app.events_until(Duration::from_secs(30), |e| e.len() == 6)
        .await;
    // Outcomes are counted right after the settlement that follows the event.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = scrape(&app).await;
        if sample(&text, "cpw_commands_received_total") == 6.0
            && sample(&text, "cpw_in_flight_commands") == 0.0
        {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics never settled:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        sample(&text, "cpw_outcomes_total{type=\"succeeded\",code=\"\"}"),
        4.0,
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "cpw_outcomes_total{type=\"failed\",code=\"rejected\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            "cpw_outcomes_total{type=\"failed\",code=\"invalid_command\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(&text, "cpw_hyperline_requests_total{status=\"2xx\"}"),
        4.0
    );
    assert_eq!(
        sample(&text, "cpw_hyperline_requests_total{status=\"4xx\"}"),
        1.0
    );
    assert_eq!(
        sample(&text, "cpw_hyperline_requests_total{status=\"5xx\"}"),
        1.0
    );
    assert_eq!(
        sample(&text, "cpw_retries_total{reason=\"server_error\"}"),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            "cpw_hyperline_request_duration_seconds_count{status=\"2xx\"}"
        ),
        4.0
    );
    assert_eq!(sample(&text, "cpw_processing_duration_seconds_count"), 6.0);
    assert_eq!(sample(&text, "cpw_credentials_refused"), 0.0);
    assert!(text.contains("# TYPE cpw_reconnects counter"));
    assert_eq!(sample(&text, "cpw_prefetch"), 32.0);
    assert_eq!(sample(&text, "cpw_ready"), 1.0);
    assert!(
        text.contains("cpw_queue_messages{queue=\"dead_letters\"}"),
        "{text}"
    );
    // The rarer paths, so that their series exist too: a command that
    // exhausts its attempts goes to the first delay step, and one refused
    // for the key is returned.
    app.set_faults(FaultsPatch {
        scripted: Some(vec![ScriptedResponse {
            customer_id: Some("cus_down".into()),
            status: 503,
            body: json!({"message": "down"}),
            headers: Default::default(),
            times: None,
        }]),
        ..FaultsPatch::default()
    });
    app.publish(&command_for(&command_id(), "cus_down")).await;
    scrape_until(&app, "cpw_redeliveries_total{step=\"1\"}").await;
    // A `reply_to` naming no queue: the reply is dropped, and counted.
    let nowhere = format!("cpw-ops-no-reply-{}", uuid::Uuid::new_v4().simple());
    let props = BasicProperties::default().with_reply_to(nowhere.as_str().into());
    let body = command(&command_id()).to_string();
    app.publish_raw(body.as_bytes(), props).await;
    scrape_until(&app, "cpw_replies_dropped_total{reason=\"unroutable\"}").await;
    app.set_faults(FaultsPatch {
        reject_auth: Some(true),
        ..FaultsPatch::default()
    });
    app.publish(&command(&command_id())).await;
    let text = scrape_until(&app, "cpw_requeued_total{reason=\"credential_fault\"}").await;
    // The dashboard and the alert rules cannot drift from the code.
    let missing: Vec<String> = deploy_metric_names()
        .into_iter()
        .filter(|name| !exposed(&text, name))
        .collect();
    assert!(
        missing.is_empty(),
        "used but not exposed: {missing:?}\n{text}"
    );
    app.cleanup().await;
}

/// Scrapes until `series` is counted at least once (bounded).
async fn scrape_until(app: &TestApp, series: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = scrape(app).await;
        if sample(&text, series) >= 1.0 {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} never counted:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every `cpw_*` name in the dashboard's queries and the alert rules.
fn deploy_metric_names() -> std::collections::BTreeSet<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let read = |path: &str| std::fs::read_to_string(root.join(path)).expect(path);
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("grafana/credit-purchase-worker.json")).expect("dashboard JSON");
    let mut exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().expect("expr").to_owned())
        .collect();
    let rules: serde_json::Value =
        serde_norway::from_str(&read("prometheus/rules.yml")).expect("rules YAML");
    for group in rules["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            exprs.push(rule["expr"].as_str().expect("expr").to_owned());
        }
    }
    let names: std::collections::BTreeSet<String> = exprs
        .iter()
        .flat_map(|e| {
            e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("cpw_"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(names.len() >= 15, "{names:?}");
    names
}

/// Whether `/metrics` has samples of `name`, or declares its family (a
/// labelled family without traffic yet has no sample).
fn exposed(text: &str, name: &str) -> bool {
    let sampled = text.lines().any(|l| {
        l.strip_prefix(name)
            .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
    });
    let declared = [
        ("_total", "counter"),
        ("_bucket", "histogram"),
        ("_count", "histogram"),
        ("_sum", "histogram"),
        ("", "gauge"),
    ]
    .iter()
    .any(|(suffix, kind)| {
        name.strip_suffix(suffix)
            .is_some_and(|family| text.contains(&format!("# TYPE {family} {kind}\n")))
    });
    sampled || declared
}

#[tokio::test]
async fn readyz_flips_on_a_broker_cut_and_the_reconnect_is_counted() {
    let app = spawn_app().await;
    app.wait_readyz(200).await;
    assert!(app.cut_connections() >= 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.readyz().await != 503 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never reported the cut"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    app.wait_readyz(200).await;
    let text = scrape(&app).await;
    assert!(sample(&text, "cpw_reconnects_total") >= 1.0, "{text}");
    app.cleanup().await;
}

#[tokio::test]
async fn a_trace_crosses_the_worker() {
    let mut app = spawn_app().await;
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(LongString::from(format!("00-{trace}-b7ad6b7169203331-01"))),
    );
    let id = command_id();
    app.publish_raw(
        command(&id).to_string().as_bytes(),
        BasicProperties::default().with_headers(headers),
    )
    .await;
    let event = app.next_event().await;
    let on_event = header_str(event.properties.headers().as_ref(), "traceparent")
        .expect("the event carries the trace");
    let on_request = app.sim.requests()[0]
        .traceparent
        .clone()
        .expect("the request carries the trace");
    assert!(
        on_event.contains(trace) && on_request.contains(trace),
        "{on_event} / {on_request}"
    );
    assert_eq!(on_event, on_request, "one hop: the same span id on both");
    app.cleanup().await;
}
