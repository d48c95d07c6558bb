//! Spans over OTLP: the worker's binary, pointed at an OTLP/HTTP receiver in
//! the test, exports one consumer span per delivery, a client span per
//! request and a producer span per event, in the publisher's trace, and the
//! `traceparent` it sends on names them. Without an endpoint it connects to
//! nothing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use credit_purchase_worker::broker::header_str;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use tokio::process::Child;

use cpw_testkit::app::{Options, command, command_id, spawn_without_worker};
use cpw_testkit::process::terminate;

/// A key that must appear in no span.
const KEY: &str = "sk_trace_test_5ec2e7_never_exported";
const PUBLISHER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PUBLISHER_SPAN: &str = "00f067aa0ba902b7";

/// What the receiver was sent: each request body, as received.
type Bodies = Arc<Mutex<Vec<Bytes>>>;

async fn receive(State(bodies): State<Bodies>, body: Bytes) -> StatusCode {
    bodies.lock().expect("receiver lock").push(body);
    StatusCode::OK
}

/// Starts an OTLP/HTTP receiver; returns its base URL and what it receives.
async fn otlp_receiver() -> (String, Bodies) {
    let bodies = Bodies::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = Router::new()
        .route("/v1/traces", post(receive))
        .with_state(bodies.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), bodies)
}

/// SIGTERM, and the exit of a graceful stop.
async fn stop(mut child: Child) {
    let status = terminate(&mut child, Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0));
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An attribute's value as text (strings and integers).
fn attr(span: &Span, key: &str) -> Option<String> {
    let value = span.attributes.iter().find(|kv| kv.key == key)?;
    match value.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        Value::BoolValue(b) => Some(b.to_string()),
        other => Some(format!("{other:?}")),
    }
}

fn one_of_kind(spans: &[Span], kind: SpanKind) -> &Span {
    let found: Vec<&Span> = spans.iter().filter(|s| s.kind == kind as i32).collect();
    assert_eq!(found.len(), 1, "one {kind:?} span in {spans:#?}");
    found[0]
}

fn expect_attrs(span: &Span, expected: &[(&str, Option<&str>)]) {
    for (key, value) in expected {
        let got = attr(span, key);
        assert!(got.is_some(), "{key} missing on {}: {span:#?}", span.name);
        if let Some(value) = value {
            assert_eq!(got.as_deref(), Some(*value), "{key} on {}", span.name);
        }
    }
}

#[tokio::test]
async fn spans_are_exported_in_the_publishers_trace_and_flushed_at_shutdown() {
    let (endpoint, bodies) = otlp_receiver().await;
    // A schedule far beyond the test: the spans arrive only because the
    // shutdown flushes them.
    let mut app = spawn_without_worker(
        Options::default()
            .api_key(KEY)
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
            .env("OTEL_BSP_SCHEDULE_DELAY", "600000"),
    )
    .await;
    let child = app.spawn_process();
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(LongString::from(format!(
            "00-{PUBLISHER_TRACE}-{PUBLISHER_SPAN}-01"
        ))),
    );
    let id = command_id();
    let message_id = format!("msg-{id}");
    app.publish_raw(
        command(&id).to_string().as_bytes(),
        BasicProperties::default()
            .with_headers(headers)
            .with_message_id(message_id.as_str().into()),
    )
    .await;
    let event = app.next_event().await;
    assert_eq!(event.kind(), "credit_purchase.succeeded");
    stop(child).await;

    let bodies = bodies.lock().expect("receiver lock").clone();
    assert!(!bodies.is_empty(), "no span was exported");
    let mut spans = Vec::new();
    for body in &bodies {
        assert!(
            !body.windows(KEY.len()).any(|w| w == KEY.as_bytes()),
            "the API key was exported"
        );
        let request = ExportTraceServiceRequest::decode(body.as_ref()).expect("OTLP protobuf");
        for resource in request.resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.clone());
            assert_eq!(
                service,
                Some(Value::StringValue("credit-purchase-worker".into()))
            );
            spans.extend(resource.scope_spans.into_iter().flat_map(|s| s.spans));
        }
    }

    let consumer = one_of_kind(&spans, SpanKind::Consumer);
    assert_eq!(hex(&consumer.trace_id), PUBLISHER_TRACE);
    assert_eq!(hex(&consumer.parent_span_id), PUBLISHER_SPAN);
    expect_attrs(
        consumer,
        &[
            ("messaging.system", Some("rabbitmq")),
            ("messaging.operation.type", Some("process")),
            ("messaging.destination.name", None),
            (
                "messaging.rabbitmq.destination.routing_key",
                Some(&app.queue),
            ),
            ("messaging.message.id", Some(&message_id)),
            ("command_id", Some(&id)),
            ("customer_id", None),
            ("product_id", None),
            ("outcome", Some("succeeded")),
        ],
    );

    let client = one_of_kind(&spans, SpanKind::Client);
    assert_eq!(hex(&client.trace_id), PUBLISHER_TRACE);
    assert_eq!(
        client.parent_span_id, consumer.span_id,
        "client under consumer"
    );
    let sent = app.sim.requests()[0]
        .traceparent
        .clone()
        .expect("the request carries the trace");
    assert_eq!(
        sent,
        format!("00-{PUBLISHER_TRACE}-{}-01", hex(&client.span_id)),
        "Hyperline received the client span's traceparent"
    );
    expect_attrs(
        client,
        &[
            ("http.request.method", Some("POST")),
            ("http.response.status_code", None),
            ("attempt", Some("1")),
            ("server.address", Some("127.0.0.1")),
        ],
    );
    let url = attr(client, "url.full").expect("url.full");
    assert!(
        url.starts_with(&app.sim.base_url()) && url.ends_with("/purchase"),
        "{url}"
    );

    let producer = one_of_kind(&spans, SpanKind::Producer);
    assert_eq!(
        producer.parent_span_id, consumer.span_id,
        "producer under consumer"
    );
    let on_event = header_str(event.properties.headers().as_ref(), "traceparent")
        .expect("the event carries the trace");
    assert_eq!(
        on_event,
        format!("00-{PUBLISHER_TRACE}-{}-01", hex(&producer.span_id)),
        "the event names the producer span"
    );
    let results_exchange = app.settings().amqp.results_exchange;
    expect_attrs(
        producer,
        &[
            ("messaging.system", Some("rabbitmq")),
            ("messaging.operation.type", Some("send")),
            ("messaging.destination.name", Some(&results_exchange)),
            (
                "messaging.rabbitmq.destination.routing_key",
                Some("credit_purchase.succeeded"),
            ),
            ("messaging.message.id", event.body["event_id"].as_str()),
        ],
    );
    app.cleanup().await;
}

/// The SDK's default endpoint is `localhost:4318`: a worker that exported
/// without being asked would connect there.
#[tokio::test]
async fn without_an_endpoint_no_connection_is_attempted() {
    let default_endpoint = tokio::net::TcpListener::bind("127.0.0.1:4318")
        .await
        .expect("port 4318 (the OTLP/HTTP default) is free for this test");
    let mut app = spawn_without_worker(
        Options::default()
            .env("OTEL_SERVICE_NAME", "cpw-no-endpoint")
            .env("OTEL_BSP_SCHEDULE_DELAY", "50"),
    )
    .await;
    let child = app.spawn_process();
    app.publish(&command(&command_id())).await;
    let event = app.next_event().await;
    assert_eq!(event.kind(), "credit_purchase.succeeded");
    stop(child).await;
    let accepted =
        tokio::time::timeout(Duration::from_millis(500), default_endpoint.accept()).await;
    assert!(
        accepted.is_err(),
        "the worker connected to the default endpoint"
    );
    app.cleanup().await;
}
