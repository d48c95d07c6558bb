//! What operators see: `/metrics` moved by the right amounts after real
//! traffic, `/readyz` flipping on a broker cut, traces crossing the worker.

use std::time::Duration;

use credit_purchase_worker::broker::header_str;
use credit_purchase_worker::simulator::{FaultsPatch, ScriptedResponse};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde_json::json;

use crate::helpers::{TestApp, command, command_for, command_id, spawn_app};

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
    app.cleanup().await;
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
