//! The published contract (`docs/`): the JSON Schemas against the parser
//! and the events, and the AsyncAPI document against the topology.

use std::collections::{BTreeMap, BTreeSet};

use crate::common::*;
use cpw_testkit::commands::parsed;
use credit_purchase_worker::broker::Topology;
use credit_purchase_worker::broker::history::{ATTEMPTS_HEADER, FIRST_ATTEMPT_HEADER, STEP_HEADER};
use credit_purchase_worker::contract::{
    Command, ErrorCode, EventError, EventKind, InvalidCommand, MAX_JSON_INTEGER, ResultEvent,
};
use serde_json::{Value, json};

/// A validator that asserts `format` too (date-time, uuid), as a strict
/// consumer would.
pub(crate) fn validator(file: &str) -> jsonschema::Validator {
    let schema = json_file(&format!("docs/schemas/{file}"));
    jsonschema::meta::validate(&schema)
        .unwrap_or_else(|e| panic!("{file} is not a valid JSON Schema: {e}"));
    assert_eq!(
        schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
        "{file}"
    );
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap_or_else(|e| panic!("{file}: {e}"))
}

pub(crate) fn errors(validator: &jsonschema::Validator, instance: &Value) -> Vec<String> {
    validator
        .iter_errors(instance)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

/// The example of docs/contract.md section 2, verbatim.
pub(crate) const CONTRACT_EXAMPLE: &str = r#"{
  "command_id": "6f1c1f0e-4c1a-4a51-9d7e-3f5d2b8e9a10",
  "customer_id": "cus_Typ0px2W0aiEtl",
  "product_id": "itm_3kXODDF42QXtnL",
  "credit_count": 32,
  "amount_excluding_tax": 24000,
  "price_id": null,
  "expires_at": null
}"#;

pub(crate) fn example() -> Value {
    serde_json::from_str(CONTRACT_EXAMPLE).expect("json")
}

pub(crate) fn with(key: &str, value: Value) -> Value {
    let mut v = example();
    v[key] = value;
    v
}

pub(crate) fn without(key: &str) -> Value {
    let mut v = example();
    v.as_object_mut().map(|o| o.remove(key));
    v
}

/// A message_id for bodies without a command_id: the contract's fallback.
pub(crate) const MESSAGE_ID: &str = "message-id-0000000000000001";

#[test]
pub(crate) fn the_command_schema_accepts_the_contract_example() {
    let schema = validator("command.schema.json");
    assert_eq!(errors(&schema, &example()), Vec::<String>::new());
    assert!(Command::parse(CONTRACT_EXAMPLE.as_bytes(), None).is_ok());
    let file = json_file("docs/schemas/command.schema.json");
    assert_eq!(file["examples"], json!([example()]));
}

#[test]
pub(crate) fn the_command_schema_rejects_what_the_contract_forbids() {
    let schema = validator("command.schema.json");
    let mut both = with("price_id", json!("price_1"));
    both["amount_excluding_tax"] = json!(100);
    let invalid = [
        ("no customer_id", without("customer_id")),
        ("null product_id", with("product_id", Value::Null)),
        (
            "customer_id with a slash",
            with("customer_id", json!("cus/1")),
        ),
        ("short command_id", with("command_id", json!("too-short"))),
        ("credit_count 0", with("credit_count", json!(0))),
        (
            "credit_count 2^53",
            with("credit_count", json!(MAX_JSON_INTEGER + 1)),
        ),
        ("credit_count as text", with("credit_count", json!("32"))),
        ("both pricings", both),
        ("no pricing", without("amount_excluding_tax")),
        ("negative amount", with("amount_excluding_tax", json!(-1))),
        ("expires_at a date", with("expires_at", json!("2027-01-01"))),
        ("not an object", json!([example()])),
    ];
    for (what, body) in invalid {
        assert!(!schema.is_valid(&body), "the schema accepts {what}: {body}");
        assert!(
            Command::parse(body.to_string().as_bytes(), Some(MESSAGE_ID)).is_err(),
            "the worker accepts {what}"
        );
    }
}

/// The schema and the worker's parser agree, body by body, on a corpus that
/// walks every rule of section 2 and its edges. Where JSON Schema cannot
/// follow (see the next test), the corpus stays out.
#[test]
pub(crate) fn the_command_schema_and_the_parser_agree() {
    let schema = validator("command.schema.json");
    let long = |c: &str, n: usize| json!(c.repeat(n));
    let mut by_price = with("amount_excluding_tax", Value::Null);
    by_price["price_id"] = json!("price_bundle_10");
    let mut price_only = without("amount_excluding_tax");
    price_only["price_id"] = json!("price/ä?");
    let mut corpus = vec![
        example(),
        by_price.clone(),
        price_only,
        without("price_id"),
        without("expires_at"),
        without("command_id"),
        with("command_id", Value::Null),
        with("note", json!({"deep": [1, {"x": null}]})),
        with("amount_excluding_tax", json!(0)),
        with("amount_excluding_tax", json!(MAX_JSON_INTEGER)),
        with("amount_excluding_tax", json!(MAX_JSON_INTEGER + 1)),
        with("amount_excluding_tax", json!(-5)),
        with("amount_excluding_tax", json!(1.5)),
        with("amount_excluding_tax", json!("100")),
        with("amount_excluding_tax", json!(true)),
        with("credit_count", json!(1)),
        with("credit_count", json!(MAX_JSON_INTEGER)),
        with("credit_count", json!(MAX_JSON_INTEGER + 1)),
        with("credit_count", json!(u64::MAX)),
        with("credit_count", json!(0)),
        with("credit_count", json!(-1)),
        with("credit_count", json!(2.5)),
        with("credit_count", json!("32")),
        with("credit_count", Value::Null),
        without("credit_count"),
        with("price_id", json!("price_1")),
        json!({}),
        json!([]),
        json!(42),
        json!("text"),
    ];
    for id in [
        "a".repeat(15),
        "a".repeat(16),
        "a".repeat(255),
        "a".repeat(256),
        "6f1c1f0e-4c1a:4a51.9d7e_3f5d".to_owned(),
        "has/slash-0000000000".to_owned(),
        "has space-0000000000".to_owned(),
        "accentué-00000000000".to_owned(),
    ] {
        corpus.push(with("command_id", json!(id)));
    }
    corpus.push(with("command_id", json!(12345678901234567_u64)));
    for key in ["customer_id", "product_id"] {
        for value in [
            json!("cus_Typ0px2W0aiEtl"),
            json!("itm-3kXODDF42QXtnL"),
            long("c", 1),
            long("c", 128),
            long("c", 129),
            json!(""),
            json!("a/b"),
            json!(".."),
            json!("%2F"),
            json!("a?b"),
            json!("a\r\nb"),
            json!("a.b"),
            json!("a:b"),
            json!("ä"),
            json!(7),
            Value::Null,
        ] {
            corpus.push(with(key, value));
        }
        corpus.push(without(key));
    }
    for value in [
        json!(""),
        json!("p"),
        long("p", 255),
        long("p", 256),
        json!(7),
    ] {
        let mut v = by_price.clone();
        v["price_id"] = value;
        corpus.push(v);
    }
    for value in [
        json!("2027-01-01T00:00:00Z"),
        json!("2027-01-01T00:00:00+01:00"),
        json!("2027-01-01T00:00:00-05:30"),
        json!("2027-01-01T00:00:00.123456Z"),
        json!("2027-12-31T23:59:59Z"),
        json!("2027-01-01T00:00:00"),
        json!("2027-01-01"),
        json!("2027-13-01T00:00:00Z"),
        json!("2027-01-32T00:00:00Z"),
        json!("2027-01-01T24:00:00Z"),
        json!("2027-01-01T00:60:00Z"),
        json!("2027-01-01T00:00:00+24:00"),
        json!("27-01-01T00:00:00Z"),
        json!("2027-01-01t00:00:00z"),
        json!("2027-02-30T00:00:00Z"),
        json!("2028-02-29T00:00:00Z"),
        json!("2027-02-29T00:00:00Z"),
        json!("2027-06-30T23:59:60Z"),
        json!("2027-01-01T00:00:00.Z"),
        json!("2027-01-01T00:00:00+0100"),
        json!("tomorrow"),
        json!(1_700_000_000),
        Value::Null,
    ] {
        corpus.push(with("expires_at", value));
    }

    let mut disagreements = Vec::new();
    for body in &corpus {
        let by_schema = schema.is_valid(body);
        let by_worker = Command::parse(body.to_string().as_bytes(), Some(MESSAGE_ID)).is_ok();
        if by_schema != by_worker {
            disagreements.push(format!(
                "schema {by_schema}, worker {by_worker}: {body} ({:?})",
                errors(&schema, body)
            ));
        }
    }
    assert!(
        disagreements.is_empty(),
        "{} disagreements:\n{}",
        disagreements.len(),
        disagreements.join("\n")
    );
    let accepted = corpus.iter().filter(|b| schema.is_valid(b)).count();
    assert!(accepted > 10 && accepted < corpus.len() - 30, "{accepted}");
}

/// What JSON Schema cannot express, and the schema's description says: the
/// worker is stricter there. Should the worker ever relax one of these, this
/// test tells that the description is out of date.
#[test]
pub(crate) fn where_the_worker_is_stricter_than_the_command_schema() {
    let schema = validator("command.schema.json");
    // A JSON integer is "written without fraction or exponent": 32.0 is the
    // integer 32 to JSON Schema, and not to the worker.
    let body = CONTRACT_EXAMPLE.replace("\"credit_count\": 32", "\"credit_count\": 32.0");
    let value: Value = serde_json::from_str(&body).expect("json");
    assert!(schema.is_valid(&value));
    assert!(Command::parse(body.as_bytes(), None).is_err());
    // Over 64 KiB is invalid whatever the content.
    let mut padded = CONTRACT_EXAMPLE.to_owned();
    padded.push_str(&" ".repeat(credit_purchase_worker::contract::MAX_BODY_BYTES));
    let value: Value = serde_json::from_str(&padded).expect("json");
    assert!(schema.is_valid(&value));
    assert!(Command::parse(padded.as_bytes(), None).is_err());
    // Without command_id the body is valid only with a message_id.
    let body = without("command_id");
    assert!(schema.is_valid(&body));
    assert!(Command::parse(body.to_string().as_bytes(), None).is_err());
    // The other way round: RFC 3339's grammar separates date and time with
    // "T", which the schema requires. (The time crate also takes the space
    // that RFC 3339 allows "by mutual agreement"; publishers should not rely
    // on that, and Hyperline receives the text as written.)
    assert!(!schema.is_valid(&with("expires_at", json!("2027-01-01 00:00:00Z"))));

    let file = json_file("docs/schemas/command.schema.json");
    let description = text(&file, "/description");
    for fact in ["65536 bytes", "without fraction or exponent"] {
        assert!(description.contains(fact), "the description says {fact}");
    }
}

pub(crate) fn event_json(event: &ResultEvent) -> Value {
    serde_json::from_slice(&event.to_json()).expect("an event is JSON")
}

/// Every `InvalidCommand` the parser can make of these messages, for
/// `ResultEvent::invalid`.
pub(crate) fn invalid_commands() -> Vec<InvalidCommand> {
    let long_id = "m".repeat(300);
    let mut bodies: Vec<(Vec<u8>, Option<&str>)> = vec![
        (vec![0xff, 0xfe], None),
        (b"{nope".to_vec(), Some("raw message id with spaces")),
        (b"[]".to_vec(), None),
        (
            vec![b' '; credit_purchase_worker::contract::MAX_BODY_BYTES + 1],
            Some("x"),
        ),
        (without("command_id").to_string().into_bytes(), None),
        (
            without("command_id").to_string().into_bytes(),
            Some("short"),
        ),
        (
            without("command_id").to_string().into_bytes(),
            Some(&long_id),
        ),
    ];
    let mut v = with("credit_count", json!(0));
    v["customer_id"] = json!("c".repeat(300));
    v["product_id"] = json!("p/../q");
    bodies.push((v.to_string().into_bytes(), None));
    let mut v = with("command_id", json!("ünïcödé-but-not-allowed"));
    v["amount_excluding_tax"] = json!(-3);
    bodies.push((v.to_string().into_bytes(), None));
    bodies.push((with("command_id", json!("")).to_string().into_bytes(), None));
    bodies.push((with("command_id", json!(42)).to_string().into_bytes(), None));
    bodies.push((
        with("expires_at", json!("soon")).to_string().into_bytes(),
        None,
    ));
    bodies.push((
        with("price_id", json!("both")).to_string().into_bytes(),
        None,
    ));
    bodies
        .into_iter()
        .map(|(body, message_id)| {
            Command::parse(&body, message_id).expect_err("these bodies are invalid")
        })
        .collect()
}

#[test]
pub(crate) fn the_workers_events_match_the_event_schemas() {
    let succeeded = validator("succeeded.schema.json");
    let failed = validator("failed.schema.json");
    let mut by_price = with("amount_excluding_tax", Value::Null);
    by_price["price_id"] = json!("price_bundle_10");
    let mut biggest = with("credit_count", json!(MAX_JSON_INTEGER));
    biggest["command_id"] = json!("a.b:c_d-e".repeat(28).chars().take(255).collect::<String>());
    biggest["customer_id"] = json!("c".repeat(128));
    let commands = [parsed(&example()), parsed(&by_price), parsed(&biggest)];

    let mut events = Vec::new();
    for c in &commands {
        events.push((
            true,
            ResultEvent::succeeded(c, "inv_8Hk2mQ1x".into(), 2032, 1),
        ));
        events.push((true, ResultEvent::succeeded(c, String::new(), 0, u32::MAX)));
        events.push((
            true,
            ResultEvent::reconciled(c, "inv_1eTaiytf".into(), 2064, 1),
        ));
        let cases = [
            (ErrorCode::Rejected, Some(400)),
            (ErrorCode::Rejected, Some(404)),
            (ErrorCode::Rejected, Some(422)),
            (ErrorCode::IdempotencyConflict, Some(417)),
            (ErrorCode::RetriesExhausted, Some(503)),
            (ErrorCode::RetriesExhausted, Some(429)),
            (ErrorCode::RetriesExhausted, None),
            (ErrorCode::UnexpectedResponse, Some(201)),
            (ErrorCode::UnexpectedResponse, Some(302)),
        ];
        for (code, http_status) in cases {
            let error = EventError {
                code,
                message: "Customer not found".into(),
                http_status,
            };
            events.push((false, ResultEvent::failed(c, 3, error)));
        }
    }
    for invalid in invalid_commands() {
        events.push((false, ResultEvent::invalid(&invalid)));
    }

    let mut codes_seen = BTreeSet::new();
    for (is_success, event) in &events {
        let body = event_json(event);
        let (own, other) = if *is_success {
            (&succeeded, &failed)
        } else {
            codes_seen.insert(text(&body, "/error/code").to_owned());
            (&failed, &succeeded)
        };
        assert_eq!(errors(own, &body), Vec::<String>::new(), "{body}");
        assert!(!other.is_valid(&body), "both schemas accept {body}");
        assert_eq!(body["type"], event.routing_key());
    }
    let all: BTreeSet<String> = all_error_codes()
        .into_iter()
        .map(|c| c.as_str().to_owned())
        .collect();
    assert_eq!(codes_seen, all, "every code is exercised");
}

#[test]
pub(crate) fn the_event_schemas_name_exactly_the_workers_codes_and_types() {
    let failed = json_file("docs/schemas/failed.schema.json");
    let codes: BTreeSet<&str> = at(&failed, "/properties/error/properties/code/enum")
        .as_array()
        .expect("enum")
        .iter()
        .map(|c| c.as_str().expect("string"))
        .collect();
    let expected: BTreeSet<&str> = all_error_codes()
        .into_iter()
        .map(ErrorCode::as_str)
        .collect();
    assert_eq!(codes, expected);
    for kind in all_event_kinds() {
        let file = match kind {
            EventKind::Succeeded => "succeeded",
            EventKind::Failed => "failed",
        };
        let schema = json_file(&format!("docs/schemas/{file}.schema.json"));
        assert_eq!(at(&schema, "/properties/type/const"), kind.as_str());
        assert_eq!(
            at(&schema, "/properties/schema/const"),
            &json!(credit_purchase_worker::contract::SCHEMA_VERSION)
        );
        let validator = validator(&format!("{file}.schema.json"));
        for example in at(&schema, "/examples").as_array().expect("examples") {
            assert_eq!(errors(&validator, example), Vec::<String>::new());
        }
    }
}

#[test]
pub(crate) fn the_event_schemas_reject_what_the_worker_never_sends() {
    let succeeded = validator("succeeded.schema.json");
    let failed = validator("failed.schema.json");
    let good = event_json(&ResultEvent::succeeded(
        &parsed(&example()),
        "inv_1".into(),
        5,
        1,
    ));
    let error = EventError {
        code: ErrorCode::Rejected,
        message: "no".into(),
        http_status: Some(404),
    };
    let bad_failed = event_json(&ResultEvent::failed(&parsed(&example()), 1, error));
    assert!(succeeded.is_valid(&good) && failed.is_valid(&bad_failed));

    let mutate = |base: &Value, pointer: &str, value: Option<Value>| {
        let mut v = base.clone();
        let (parent, key) = pointer.rsplit_once('/').expect("a pointer");
        let target = if parent.is_empty() {
            &mut v
        } else {
            v.pointer_mut(parent).expect("parent")
        };
        let object = target.as_object_mut().expect("object");
        match value {
            Some(value) => object.insert(key.to_owned(), value),
            None => object.remove(key),
        };
        v
    };
    let rejected_by_succeeded = [
        mutate(&good, "/schema", Some(json!(2))),
        mutate(&good, "/type", Some(json!("credit_purchase.failed"))),
        mutate(&good, "/event_id", Some(json!("not-a-uuid"))),
        mutate(&good, "/invoice_id", None),
        mutate(&good, "/attempts", Some(json!(0))),
        mutate(&good, "/credit_count", Some(json!(0))),
        mutate(
            &good,
            "/occurred_at",
            Some(json!("2026-11-23T10:00:00+01:00")),
        ),
        mutate(&good, "/error", Some(Value::Null)),
        mutate(&good, "/command_id", Some(Value::Null)),
    ];
    for body in rejected_by_succeeded {
        assert!(!succeeded.is_valid(&body), "accepted {body}");
    }
    let rejected_by_failed = [
        mutate(&bad_failed, "/error/http_status", Some(json!(500))),
        mutate(&bad_failed, "/error/code", Some(json!("other"))),
        mutate(&bad_failed, "/error/message", None),
        mutate(&bad_failed, "/invoice_id", Some(json!("inv_1"))),
        mutate(&bad_failed, "/command_id", Some(Value::Null)),
        mutate(&bad_failed, "/attempts", Some(json!(-1))),
        mutate(
            &mutate(&bad_failed, "/error/code", Some(json!("invalid_command"))),
            "/error/http_status",
            Some(Value::Null),
        ),
        mutate(
            &bad_failed,
            "/error/code",
            Some(json!("idempotency_conflict")),
        ),
    ];
    for body in rejected_by_failed {
        assert!(!failed.is_valid(&body), "accepted {body}");
    }
}

// The AsyncAPI document.

pub(crate) fn asyncapi() -> Value {
    yaml("docs/asyncapi.yaml")
}

/// Every `$ref` in `value`, with the JSON pointer of the object holding it.
pub(crate) fn refs(value: &Value, here: String, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                if k == "$ref" {
                    out.push((here.clone(), v.as_str().expect("a string $ref").to_owned()));
                } else {
                    refs(
                        v,
                        format!("{here}/{}", k.replace('~', "~0").replace('/', "~1")),
                        out,
                    );
                }
            }
        }
        Value::Array(list) => {
            for (i, v) in list.iter().enumerate() {
                refs(v, format!("{here}/{i}"), out);
            }
        }
        _ => {}
    }
}

#[test]
pub(crate) fn the_asyncapi_document_references_existing_schemas_and_objects() {
    let doc = asyncapi();
    assert!(text(&doc, "/asyncapi").starts_with("3."));
    let mut all = Vec::new();
    refs(&doc, String::new(), &mut all);
    let mut files = BTreeSet::new();
    for (from, reference) in &all {
        if let Some(pointer) = reference.strip_prefix('#') {
            assert!(
                doc.pointer(pointer).is_some(),
                "{from}: {reference} points nowhere"
            );
        } else {
            let (file, pointer) = reference.split_once('#').unwrap_or((reference, ""));
            let path = repo("docs").join(file);
            assert!(path.is_file(), "{from}: {reference}: no file");
            let target: Value =
                serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
            assert!(target.pointer(pointer).is_some(), "{from}: {reference}");
            files.insert(file.trim_start_matches("./").to_owned());
        }
    }
    let expected: BTreeSet<String> = ["command", "succeeded", "failed"]
        .iter()
        .map(|s| format!("schemas/{s}.schema.json"))
        .collect();
    assert_eq!(files, expected);
    let payloads: BTreeMap<&str, &str> = ["command", "succeeded", "failed"]
        .iter()
        .map(|m| {
            (
                *m,
                text(&doc, &format!("/components/messages/{m}/payload/$ref")),
            )
        })
        .collect();
    assert_eq!(payloads["command"], "./schemas/command.schema.json");
    assert_eq!(payloads["succeeded"], "./schemas/succeeded.schema.json");
    assert_eq!(payloads["failed"], "./schemas/failed.schema.json");
}

#[test]
pub(crate) fn the_asyncapi_channels_name_the_workers_topology() {
    let doc = asyncapi();
    let settings = default_settings();
    let topology = Topology::new(&settings.amqp, &settings.retry.redelivery_delays_secs);

    let commands = at(&doc, "/channels/commands");
    assert_eq!(text(commands, "/address"), topology.queue);
    assert_eq!(text(commands, "/bindings/amqp/is"), "queue");
    assert_eq!(text(commands, "/bindings/amqp/queue/name"), topology.queue);
    assert_eq!(at(commands, "/bindings/amqp/queue/durable"), true);

    let exchange = at(&doc, "/channels/commandsExchange");
    assert_eq!(
        text(exchange, "/address"),
        topology.queue,
        "the routing key"
    );
    assert_eq!(
        text(exchange, "/bindings/amqp/exchange/name"),
        topology.queue
    );
    assert_eq!(text(exchange, "/bindings/amqp/exchange/type"), "direct");

    let dead = at(&doc, "/channels/deadLetters");
    assert_eq!(text(dead, "/address"), topology.dead);
    assert_eq!(text(dead, "/bindings/amqp/queue/name"), topology.dead);

    for kind in all_event_kinds() {
        let (channel, message) = match kind {
            EventKind::Succeeded => ("succeeded", "succeeded"),
            EventKind::Failed => ("failed", "failed"),
        };
        let channel = at(&doc, &format!("/channels/{channel}"));
        assert_eq!(text(channel, "/address"), kind.as_str(), "routing key");
        assert_eq!(text(channel, "/bindings/amqp/is"), "routingKey");
        let exchange = at(channel, "/bindings/amqp/exchange");
        assert_eq!(text(exchange, "/name"), topology.results_exchange);
        assert_eq!(text(exchange, "/type"), "topic");
        let message = at(&doc, &format!("/components/messages/{message}"));
        assert_eq!(text(message, "/bindings/amqp/messageType"), kind.as_str());
        assert_eq!(text(message, "/contentType"), "application/json");
    }
    for operation in ["sendSucceeded", "sendFailed"] {
        let bindings = at(&doc, &format!("/operations/{operation}/bindings/amqp"));
        assert_eq!(integer(bindings, "/deliveryMode"), 2, "persistent");
    }
    assert_eq!(text(&doc, "/operations/receiveCommand/action"), "receive");
}

#[test]
pub(crate) fn the_asyncapi_headers_are_those_the_worker_sends_and_reads() {
    let doc = asyncapi();
    let schema = at(&doc, "/components/schemas/eventHeaders");
    let documented: BTreeSet<&str> = at(schema, "/properties")
        .as_object()
        .expect("properties")
        .keys()
        .map(String::as_str)
        .collect();
    let required: BTreeSet<&str> = at(schema, "/required")
        .as_array()
        .expect("required")
        .iter()
        .map(|r| r.as_str().expect("string"))
        .collect();

    let with_everything = ResultEvent::succeeded(&parsed(&example()), "inv_1".into(), 1, 1);
    let props = with_everything.amqp_properties(
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        Some("interactive"),
    );
    let headers = props.headers().as_ref().expect("headers");
    let sent: BTreeMap<String, String> = headers
        .inner()
        .iter()
        .map(|(k, v)| {
            let value = match v {
                lapin::types::AMQPValue::LongString(s) => {
                    String::from_utf8_lossy(s.as_bytes()).into_owned()
                }
                lapin::types::AMQPValue::LongLongInt(n) => {
                    let documented = format!("/properties/{k}/type");
                    assert_eq!(text(schema, &documented), "integer", "{k}");
                    n.to_string()
                }
                other => panic!("{k}: {other:?}"),
            };
            (k.as_str().to_owned(), value)
        })
        .collect();
    let sent_names: BTreeSet<&str> = sent.keys().map(String::as_str).collect();
    assert_eq!(sent_names, documented, "the event headers");

    // The minimal event (no command id, no traceparent, no lanes) still has the required ones.
    let invalid = invalid_commands().into_iter().next().expect("one");
    let minimal = ResultEvent::invalid(&invalid).amqp_properties(None, None);
    let minimal_names: BTreeSet<String> = minimal
        .headers()
        .as_ref()
        .expect("headers")
        .inner()
        .keys()
        .map(|k| k.as_str().to_owned())
        .collect();
    for name in &required {
        assert!(minimal_names.contains(*name), "{name} is not always sent");
    }
    for (name, value) in &sent {
        if let Some(constant) = schema.pointer(&format!("/properties/{name}/const")) {
            assert_eq!(constant, value, "{name}");
        }
        if let Some(allowed) = schema.pointer(&format!("/properties/{name}/enum")) {
            assert!(
                allowed.as_array().expect("enum").contains(&json!(value)),
                "{name}"
            );
        }
    }
    let kinds: BTreeSet<&str> = all_event_kinds()
        .into_iter()
        .map(EventKind::as_str)
        .collect();
    let enumerated: BTreeSet<&str> = at(schema, "/properties/cloudEvents:type/enum")
        .as_array()
        .expect("enum")
        .iter()
        .map(|v| v.as_str().expect("string"))
        .collect();
    assert_eq!(enumerated, kinds);

    let command_headers: BTreeSet<&str> =
        at(&doc, "/components/messages/command/headers/properties")
            .as_object()
            .expect("properties")
            .keys()
            .map(String::as_str)
            .collect();
    let expected: BTreeSet<&str> = [
        "traceparent",
        ATTEMPTS_HEADER,
        STEP_HEADER,
        FIRST_ATTEMPT_HEADER,
    ]
    .into();
    assert_eq!(command_headers, expected, "the command headers");
    for name in [ATTEMPTS_HEADER, STEP_HEADER, FIRST_ATTEMPT_HEADER] {
        assert_eq!(
            text(
                &doc,
                &format!("/components/messages/command/headers/properties/{name}/type")
            ),
            "integer"
        );
    }
}
