//! The RabbitMQ definitions (`deploy/rabbitmq-definitions.json`): exactly
//! the worker's topology, and a real redeclaration against the broker.

use std::collections::{BTreeMap, BTreeSet};

use crate::common::*;
use crate::k8s::{deployment_env, deployment_settings, env_value, k8s_resource};
use credit_purchase_worker::broker::Topology;
use credit_purchase_worker::configuration::{QueueType, Settings};
use serde_json::{Value, json};

/// The arguments the worker declares on each of its queues, derived from
/// docs/contract.md section 5 and the settings (the same rules as
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
    // The dead queue states the limit RabbitMQ 4.x would otherwise default
    // to 20, dropping a letter (it has no dead-letter exchange).
    let dead = match settings.amqp.queue_type {
        QueueType::Quorum => json!({ "x-delivery-limit": 10_000 }),
        QueueType::Classic => json!({}),
    };
    queues.insert(topology.dead.clone(), typed(dead));
    for (secs, name) in topology.lanes[0].delay_queues() {
        queues.insert(
            name.clone(),
            typed(json!({
                "x-message-ttl": secs * 1000,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": topology.queue,
            })),
        );
    }
    // The results log: a stream, whatever the commands queue's type.
    if let Some(log) = &topology.results_log {
        queues.insert(
            log.name.clone(),
            json!({ "x-queue-type": "stream", "x-max-age": log.max_age() }),
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
        (
            topology.results_exchange.clone(),
            topology
                .results_log
                .as_ref()
                .expect("a results log by default")
                .name
                .clone(),
            "#".to_owned(),
        ),
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
    leftovers.extend(
        topology.lanes[0]
            .delay_queues()
            .map(|(_, name)| name.clone()),
    );
    leftovers.extend(topology.results_log.iter().map(|log| log.name.clone()));
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
    assert_eq!(queues.len(), 3 + topology.lanes[0].delay_queues().count());
}
// ---------------------------------------------------------------------------
// The broker users of the definitions
// ---------------------------------------------------------------------------

/// A permission, as RabbitMQ names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Access {
    Configure,
    Write,
    Read,
}

impl Access {
    const ALL: [Access; 3] = [Access::Configure, Access::Write, Access::Read];

    fn key(self) -> &'static str {
        match self {
            Access::Configure => "configure",
            Access::Write => "write",
            Access::Read => "read",
        }
    }
}

/// A queue the broker names (`broker::private_queue`, for `publish --wait`'s
/// replies), as RabbitMQ 3.x names them.
const SERVER_NAMED_QUEUE: &str = "amq.gen-JzTY20BRgKO-HjmUJj0wLg";
/// The default exchange, as permissions name it.
const DEFAULT_EXCHANGE: &str = "amq.default";

/// Whether a permission regex allows `name`, as RabbitMQ matches it: the
/// empty string allows nothing, anything else is searched for anywhere in
/// the name (unanchored, which is why the file anchors every regex).
fn permits(regex: &str, name: &str) -> bool {
    !regex.is_empty()
        && regex::Regex::new(regex)
            .unwrap_or_else(|e| panic!("{regex}: {e}"))
            .is_match(name)
}

/// Every `(permission, resource)` the worker (`run`, with or without
/// `amqp.declare_topology`) and its operator subcommands need on `topology`,
/// and why. Queues and exchanges share names, so a resource is a name.
///
/// - configure: declaring each object (`run` with declaration on, and
///   `check`, which redeclares each existing object to compare it), and the
///   server-named reply queue.
/// - write: publishing events (results exchange), dead letters (the DLX),
///   copies to the delay and commands queues, `reply_to` answers and
///   replays (all through the default exchange); binding the commands and
///   dead-letter queues; and creating a queue with a dead-letter exchange,
///   which needs write on it (the DLX, or the default exchange for a delay
///   queue).
/// - read: consuming the commands queue and the reply queue, reading the
///   dead letters and the results log (`events`, `dead-letters reconcile`,
///   the check at the window, the log's size); the sources of the three
///   bindings (the commands exchange, named like its queue, the DLX and the
///   results exchange); and creating a queue with a dead-letter exchange,
///   which needs read on the queue itself (the commands queue and each
///   delay queue).
/// - write, also: binding the results log to the results exchange.
///
/// Checked against RabbitMQ 3.10 with the user the definitions create: a
/// delay queue the worker declares is refused without read on it, and
/// without write on `amq.default`.
fn worker_needs(topology: &Topology) -> BTreeSet<(Access, String)> {
    let mut needs = BTreeSet::new();
    for object in topology.objects() {
        needs.insert((Access::Configure, object.name));
    }
    needs.insert((Access::Configure, SERVER_NAMED_QUEUE.to_owned()));
    for name in [
        &topology.results_exchange,
        &topology.dlx,
        &topology.queue,
        &topology.dead,
    ] {
        needs.insert((Access::Write, name.clone()));
    }
    needs.insert((Access::Write, DEFAULT_EXCHANGE.to_owned()));
    for name in [&topology.queue, &topology.dead, &topology.dlx] {
        needs.insert((Access::Read, name.clone()));
    }
    if let Some(log) = &topology.results_log {
        needs.insert((Access::Write, log.name.clone()));
        needs.insert((Access::Read, log.name.clone()));
        needs.insert((Access::Read, topology.results_exchange.clone()));
    }
    for (_, name) in topology.lanes[0].delay_queues() {
        needs.insert((Access::Read, name.clone()));
    }
    needs.insert((Access::Read, SERVER_NAMED_QUEUE.to_owned()));
    needs
}

/// Names a permission must be tested against: the topology's, the
/// broker's own, and others' that resemble ours.
fn candidate_names(topology: &Topology) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = worker_needs(topology)
        .into_iter()
        .map(|(_, name)| name)
        .collect();
    let queue = &topology.queue;
    let results = &topology.results_exchange;
    names.extend([
        "payments".to_owned(),
        format!("{queue}-archive"),
        format!("other.{queue}"),
        format!("{queue}.dead.old"),
        format!("{queue}.retry.30s.parked"),
        format!("{queue}.retry.s"),
        format!("{queue}.dlx2"),
        format!("{results}.local"),
        format!("{results}.log.old"),
        format!("{results}.logs"),
        format!("x{results}"),
        "amq.direct".to_owned(),
        "amq.topic".to_owned(),
        "amq.rabbitmq.trace".to_owned(),
    ]);
    names
}

/// The broker URL of the worker's pods (its Secret, through the
/// Deployment's environment).
pub(crate) fn worker_broker_uri() -> lapin::uri::AMQPUri {
    let env = deployment_env();
    env_value(&env, "CPW__AMQP__URL")
        .parse()
        .unwrap_or_else(|e| panic!("CPW__AMQP__URL: {e}"))
}

/// KEDA's management URL (its Secret, through the TriggerAuthentication),
/// and the vhost of its trigger.
fn keda_user_and_vhost() -> (url::Url, String) {
    let scaled = k8s_resource("ScaledObject", None);
    let trigger = at(&scaled, "/spec/triggers/0");
    let auth = k8s_resource(
        "TriggerAuthentication",
        Some(text(trigger, "/authenticationRef/name")),
    );
    let host = at(&auth, "/spec/secretTargetRef")
        .as_array()
        .expect("refs")
        .iter()
        .find(|r| r["parameter"] == "host")
        .expect("the host comes from a secret")
        .clone();
    let secret = k8s_resource("Secret", Some(text(&host, "/name")));
    let url = text(&secret, &format!("/stringData/{}", text(&host, "/key")));
    let url = url::Url::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
    (url, text(trigger, "/metadata/vhostName").to_owned())
}

fn definition_user<'a>(definitions: &'a Value, name: &str) -> &'a Value {
    named(definitions, "users")
        .into_iter()
        .find(|u| u["name"] == name)
        .unwrap_or_else(|| panic!("the definitions create no user {name}"))
}

/// The one permission entry of `user` on `vhost`, as `access → regex`.
fn definition_permissions(
    definitions: &Value,
    user: &str,
    vhost: &str,
) -> BTreeMap<Access, String> {
    let entries: Vec<&Value> = named(definitions, "permissions")
        .into_iter()
        .filter(|p| p["user"] == user && p["vhost"] == vhost)
        .collect();
    assert_eq!(
        entries.len(),
        1,
        "one permission entry for {user} on {vhost}"
    );
    Access::ALL
        .into_iter()
        .map(|access| {
            (
                access,
                text(entries[0], &format!("/{}", access.key())).to_owned(),
            )
        })
        .collect()
}

#[test]
fn every_user_a_secret_names_exists_without_a_password_in_the_repository() {
    let definitions = definitions();
    let worker = worker_broker_uri();
    let (keda, keda_vhost) = keda_user_and_vhost();
    let secret_users = [
        (
            worker.authority.userinfo.username.clone(),
            worker.authority.userinfo.password.clone(),
            worker.vhost.clone(),
        ),
        (
            keda.username().to_owned(),
            keda.password().expect("a password").to_owned(),
            keda_vhost,
        ),
    ];
    let defined: BTreeSet<&str> = named(&definitions, "users")
        .into_iter()
        .map(|u| text(u, "/name"))
        .collect();
    let named_by_secrets: BTreeSet<&str> =
        secret_users.iter().map(|(u, _, _)| u.as_str()).collect();
    assert_eq!(defined, named_by_secrets, "the users are the secrets' own");
    let vhosts: BTreeSet<&str> = named(&definitions, "vhosts")
        .into_iter()
        .map(|v| text(v, "/name"))
        .collect();
    for (name, password, vhost) in &secret_users {
        let user = definition_user(&definitions, name);
        // No password: the user cannot log in until an operator sets the
        // one its Secret holds. A hash here would be a credential in git.
        assert_eq!(user["password_hash"], "", "{name}");
        assert_eq!(user["hashing_algorithm"], "rabbit_password_hashing_sha256");
        assert!(
            password.starts_with("REPLACE_WITH_THE_"),
            "{name}: the Secret holds a placeholder, not {password}"
        );
        assert!(vhosts.contains(vhost.as_str()), "{name}: vhost {vhost}");
        definition_permissions(&definitions, name, vhost);
    }
    assert_ne!(
        secret_users[0].1, secret_users[1].1,
        "one placeholder per user"
    );
    assert_eq!(
        named(&definitions, "permissions").len(),
        secret_users.len(),
        "no permissions for anyone else"
    );
}

#[test]
fn the_worker_user_may_use_its_own_objects_and_nothing_else() {
    let definitions = definitions();
    let uri = worker_broker_uri();
    let user = &uri.authority.userinfo.username;
    assert_eq!(definition_user(&definitions, user)["tags"], "", "no tags");
    let regexes = definition_permissions(&definitions, user, &uri.vhost);

    let other_delays = Settings::load_from(
        None,
        [(
            "CPW__RETRY__REDELIVERY_DELAYS_SECS".to_owned(),
            "5,60,5".to_owned(),
        )],
    )
    .expect("valid settings");
    let mut wrong = BTreeSet::new();
    for settings in [default_settings(), deployment_settings(), other_delays] {
        let topology = Topology::new(&settings.amqp, &settings.retry.redelivery_delays_secs);
        let needs = worker_needs(&topology);
        for name in candidate_names(&topology) {
            for access in Access::ALL {
                let needed = needs.contains(&(access, name.clone()));
                if permits(&regexes[&access], &name) != needed {
                    let verb = if needed { "refuses" } else { "allows" };
                    wrong.insert(format!("{} {verb} {name}", access.key()));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{user}: {wrong:#?}");
}

#[test]
fn the_keda_user_sees_queue_lengths_and_can_touch_no_message() {
    let definitions = definitions();
    let (url, vhost) = keda_user_and_vhost();
    let user = url.username();
    // `monitoring` opens the management API; a permission entry on the vhost,
    // even an empty one, lets it read a queue's counts there (RabbitMQ 3.10:
    // without one, 401 "User not authorised to access virtual host"). Any
    // read would let whoever holds KEDA's secret take commands off the queue.
    assert_eq!(definition_user(&definitions, user)["tags"], "monitoring");
    let regexes = definition_permissions(&definitions, user, &vhost);
    let settings = default_settings();
    let topology = Topology::new(&settings.amqp, &settings.retry.redelivery_delays_secs);
    for access in Access::ALL {
        for name in candidate_names(&topology) {
            assert!(
                !permits(&regexes[&access], &name),
                "{user}: {} allows {name}",
                access.key()
            );
        }
    }
}
