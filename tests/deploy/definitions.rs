//! The RabbitMQ definitions (`deploy/rabbitmq-definitions.json`): exactly
//! the worker's topology, and a real redeclaration against the broker.

use std::collections::{BTreeMap, BTreeSet};

use crate::common::*;
use credit_purchase_worker::broker::Topology;
use credit_purchase_worker::configuration::{QueueType, Settings};
use serde_json::{Value, json};

/// The arguments the worker declares on each of its queues, derived from
/// CONTRACT section 5 and the settings (the same rules as
/// `Topology::declare`, whose argument tables are private; the broker test
/// below checks this against the real declaration).
pub(crate) fn expected_queue_arguments(settings: &Settings) -> BTreeMap<String, Value> {
    let topology = Topology::new(&settings.amqp, &settings.retry.redelivery_delays_secs);
    let typed = |extra: Value| {
        let mut args = match settings.amqp.queue_type {
            QueueType::Quorum => json!({
                "x-queue-type": "quorum",
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
                "x-quorum-initial-group-size": settings.amqp.quorum_initial_group_size,
            }),
            QueueType::Classic => json!({ "x-queue-type": "classic" }),
        };
        for (k, v) in extra.as_object().expect("object") {
            args[k] = v.clone();
        }
        args
    };
    let mut commands = json!({ "x-dead-letter-exchange": topology.dlx });
    if settings.amqp.queue_type == QueueType::Quorum {
        commands["x-delivery-limit"] = json!(settings.amqp.delivery_limit);
    }
    let mut queues = BTreeMap::new();
    queues.insert(topology.queue.clone(), typed(commands));
    queues.insert(topology.dead.clone(), typed(json!({})));
    for (secs, name) in topology.delay_queues() {
        queues.insert(
            name.clone(),
            typed(json!({
                "x-message-ttl": secs * 1000,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": topology.queue,
            })),
        );
    }
    queues
}

pub(crate) fn definitions() -> Value {
    json_file("deploy/rabbitmq-definitions.json")
}

pub(crate) fn named<'a>(definitions: &'a Value, kind: &str) -> Vec<&'a Value> {
    at(definitions, &format!("/{kind}"))
        .as_array()
        .unwrap_or_else(|| panic!("{kind} is a list"))
        .iter()
        .collect()
}

#[test]
pub(crate) fn the_definitions_declare_exactly_the_workers_topology() {
    let settings = default_settings();
    let topology = Topology::new(&settings.amqp, &settings.retry.redelivery_delays_secs);
    let definitions = definitions();

    assert_eq!(at(&definitions, "/vhosts"), &json!([{ "name": "/" }]));

    let queues: BTreeMap<String, Value> = named(&definitions, "queues")
        .into_iter()
        .map(|q| {
            assert_eq!(q["vhost"], "/");
            assert_eq!(q["durable"], true, "{}", q["name"]);
            assert_eq!(q["auto_delete"], false, "{}", q["name"]);
            (text(q, "/name").to_owned(), q["arguments"].clone())
        })
        .collect();
    let expected = expected_queue_arguments(&settings);
    assert_eq!(
        queues.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "the queues"
    );
    for (name, arguments) in &expected {
        assert_eq!(&queues[name], arguments, "arguments of {name}");
    }

    let exchanges: BTreeMap<String, String> = named(&definitions, "exchanges")
        .into_iter()
        .map(|e| {
            assert_eq!(e["vhost"], "/");
            assert_eq!(e["durable"], true);
            assert_eq!(e["auto_delete"], false);
            assert_eq!(e["internal"], false);
            assert_eq!(e["arguments"], json!({}));
            (text(e, "/name").to_owned(), text(e, "/type").to_owned())
        })
        .collect();
    let expected_exchanges: BTreeMap<String, String> = [
        (topology.queue.clone(), "direct".to_owned()),
        (topology.results_exchange.clone(), "topic".to_owned()),
        (topology.dlx.clone(), "fanout".to_owned()),
    ]
    .into();
    assert_eq!(exchanges, expected_exchanges);

    let bindings: BTreeSet<(String, String, String)> = named(&definitions, "bindings")
        .into_iter()
        .map(|b| {
            assert_eq!(b["vhost"], "/");
            assert_eq!(b["destination_type"], "queue");
            (
                text(b, "/source").to_owned(),
                text(b, "/destination").to_owned(),
                text(b, "/routing_key").to_owned(),
            )
        })
        .collect();
    let expected_bindings: BTreeSet<(String, String, String)> = [
        (
            topology.queue.clone(),
            topology.queue.clone(),
            topology.queue.clone(),
        ),
        (topology.dlx.clone(), topology.dead.clone(), String::new()),
    ]
    .into();
    assert_eq!(bindings, expected_bindings);
}

/// JSON argument → AMQP field value, as RabbitMQ's definitions import reads
/// it (a JSON integer becomes a long).
pub(crate) fn amqp_value(value: &Value) -> lapin::types::AMQPValue {
    use lapin::types::{AMQPValue, LongString};
    match value {
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => AMQPValue::LongLongInt(n.as_i64().expect("an integer argument")),
        other => panic!("argument {other}"),
    }
}

/// The worker redeclares its topology over one loaded from the definitions
/// file without PRECONDITION_FAILED: the broker's own equivalence check,
/// against `Topology::declare` itself. Runs on the test broker
/// (CPW_TEST_AMQP_URL, default guest@127.0.0.1), under names of its own.
#[tokio::test]
pub(crate) async fn the_worker_redeclares_the_definitions_topology_without_conflict() {
    use lapin::ExchangeKind;
    use lapin::options::{
        ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    };
    use lapin::types::FieldTable;

    let url = cpw_testkit::broker::amqp_url();
    let settings = default_settings();
    let unique = uuid::Uuid::new_v4().simple().to_string();
    let mut amqp = settings.amqp.clone();
    amqp.queue = format!("cpw-defs-{unique}");
    amqp.results_exchange = format!("cpw-defs-results-{unique}");
    let rename = |name: &str| {
        if name == settings.amqp.results_exchange {
            amqp.results_exchange.clone()
        } else if let Some(rest) = name.strip_prefix(settings.amqp.queue.as_str()) {
            format!("{}{rest}", amqp.queue)
        } else {
            name.to_owned()
        }
    };

    let connection = credit_purchase_worker::broker::connect(&url, "deploy_and_schemas test", None)
        .await
        .unwrap_or_else(|e| panic!("the test broker at {url} is needed: {e}"));
    let channel = connection.create_channel().await.expect("channel");
    let definitions = definitions();
    let mut exchanges = Vec::new();
    for e in named(&definitions, "exchanges") {
        let name = rename(text(e, "/name"));
        let kind = match text(e, "/type") {
            "direct" => ExchangeKind::Direct,
            "topic" => ExchangeKind::Topic,
            "fanout" => ExchangeKind::Fanout,
            other => panic!("exchange type {other}"),
        };
        let options = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(name.as_str().into(), kind, options, FieldTable::default())
            .await
            .expect("exchange from the definitions");
        exchanges.push(name);
    }
    let mut queues = Vec::new();
    for q in named(&definitions, "queues") {
        let name = rename(text(q, "/name"));
        let mut arguments = FieldTable::default();
        for (k, v) in at(q, "/arguments").as_object().expect("arguments") {
            let v = match v.as_str() {
                Some(s) => Value::String(rename(s)),
                None => v.clone(),
            };
            arguments.insert(k.as_str().into(), amqp_value(&v));
        }
        let options = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .queue_declare(name.as_str().into(), options, arguments)
            .await
            .expect("queue from the definitions");
        queues.push(name);
    }
    for b in named(&definitions, "bindings") {
        channel
            .queue_bind(
                rename(text(b, "/destination")).as_str().into(),
                rename(text(b, "/source")).as_str().into(),
                rename(text(b, "/routing_key")).as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("binding from the definitions");
    }

    let topology = Topology::new(&amqp, &settings.retry.redelivery_delays_secs);
    let redeclared = topology.declare(&connection).await;

    // Clean up on a fresh channel whatever happened, including what the
    // worker declared that the definitions lack.
    let cleanup = connection.create_channel().await.expect("channel");
    let mut leftovers: BTreeSet<String> = queues.iter().cloned().collect();
    leftovers.extend([topology.queue.clone(), topology.dead.clone()]);
    leftovers.extend(topology.delay_queues().map(|(_, name)| name.clone()));
    let mut exchanges: BTreeSet<String> = exchanges.into_iter().collect();
    exchanges.extend([
        topology.queue.clone(),
        topology.results_exchange.clone(),
        topology.dlx.clone(),
    ]);
    for queue in &leftovers {
        let _ = cleanup
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for exchange in &exchanges {
        let _ = cleanup
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = connection.close(200, "done".into()).await;

    redeclared.expect("the worker's declaration agrees with deploy/rabbitmq-definitions.json");
    assert_eq!(queues.len(), 2 + topology.delay_queues().count());
}
