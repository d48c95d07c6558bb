//! Docker compose (`deploy/compose.yaml`): environment, health checks,
//! build and mounts.

use std::net::SocketAddr;

use crate::common::*;
use crate::docker::dockerfile_stages;
use credit_purchase_worker::configuration::Settings;
use serde_json::Value;

pub(crate) fn compose() -> Value {
    yaml("deploy/compose.yaml")
}

pub(crate) fn compose_services() -> Vec<(String, Value)> {
    at(&compose(), "/services")
        .as_object()
        .expect("services")
        .iter()
        .map(|(name, service)| (name.clone(), service.clone()))
        .collect()
}

pub(crate) fn compose_service(name: &str) -> Value {
    compose_services()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, s)| s)
        .unwrap_or_else(|| panic!("no service {name}"))
}

/// A service's environment, in the map or the `KEY=value` list form.
pub(crate) fn compose_environment(service: &Value) -> Vec<(String, String)> {
    match service.get("environment") {
        None => Vec::new(),
        Some(Value::Object(map)) => map
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), v)
            })
            .collect(),
        Some(Value::Array(list)) => list
            .iter()
            .map(|entry| {
                let entry = entry.as_str().expect("KEY=value");
                let (k, v) = entry.split_once('=').unwrap_or((entry, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        Some(other) => panic!("environment: {other}"),
    }
}

/// The port a bash `/dev/tcp` healthcheck connects to, and the path it asks for.
pub(crate) fn healthcheck_target(service: &Value) -> (u16, String) {
    let test = at(service, "/healthcheck/test")
        .as_array()
        .expect("an exec-form healthcheck");
    let script = test.last().and_then(Value::as_str).expect("a script");
    let after = script
        .split("/dev/tcp/127.0.0.1/")
        .nth(1)
        .expect("a /dev/tcp probe");
    let port = after
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port");
    let path = script
        .split("GET ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .expect("a GET request")
        .to_owned();
    (port, path)
}

/// A compose duration such as `40s` or `1m30s`, in seconds.
pub(crate) fn compose_duration_secs(value: &str) -> u64 {
    let mut total = 0;
    let mut number = String::new();
    for c in value.chars() {
        if c.is_ascii_digit() {
            number.push(c);
        } else {
            let n: u64 = number.parse().expect("a number before its unit");
            number.clear();
            total += match c {
                'h' => n * 3600,
                'm' => n * 60,
                's' => n,
                other => panic!("unit {other} in {value}"),
            };
        }
    }
    assert!(number.is_empty(), "{value} lacks a unit");
    total
}

/// The value following `flag` in a command list.
pub(crate) fn flag_value<'a>(command: &'a [Value], flag: &str) -> &'a str {
    command
        .iter()
        .position(|a| a == flag)
        .and_then(|i| command.get(i + 1))
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no {flag}"))
}

#[test]
pub(crate) fn compose_workers_start_with_their_environment_and_probe_the_ops_port() {
    let port = ops_port();
    let worker = compose_service("worker");
    let env = compose_environment(&worker);
    let settings = Settings::load_from(None, env.clone())
        .unwrap_or_else(|e| panic!("a compose worker would not start: {e}"));
    assert_eq!(settings.server.listen.port(), port);
    assert_eq!(healthcheck_target(&worker), (port, "/readyz".to_owned()));
    let published = at(&worker, "/ports").as_array().expect("ports");
    assert!(
        published
            .iter()
            .any(|p| p.as_str().is_some_and(|p| p.ends_with(&format!(":{port}")))),
        "the ops port {port} is published"
    );
    assert_eq!(integer(&worker, "/deploy/replicas"), 2);

    // Docker's stop timeout must outlast the drain, as Kubernetes' does.
    let stop = compose_duration_secs(text(&worker, "/stop_grace_period"));
    assert!(stop > settings.worker.shutdown_grace_secs);

    // The workers reach the simulator where it listens, with its key.
    let simulator = compose_service("simulator");
    let command = at(&simulator, "/command").as_array().expect("command");
    assert_eq!(command[0], "simulator");
    let listen: SocketAddr = flag_value(command, "--listen").parse().expect("address");
    assert_eq!(settings.hyperline.base_url.port(), Some(listen.port()));
    assert_eq!(
        settings.hyperline.base_url.host_str(),
        Some("simulator"),
        "the service name"
    );
    assert_eq!(
        settings.require_api_key().expect("a key").expose(),
        flag_value(command, "--api-key")
    );
    assert_eq!(
        healthcheck_target(&simulator),
        (listen.port(), "/healthz".to_owned())
    );

    // Started only once their dependencies are healthy, which needs a healthcheck.
    let depends = at(&worker, "/depends_on").as_object().expect("long form");
    for (name, condition) in depends {
        assert_eq!(condition["condition"], "service_healthy", "{name}");
        at(&compose_service(name), "/healthcheck/test");
    }
    assert!(depends.contains_key("rabbitmq") && depends.contains_key("simulator"));
    assert_eq!(
        settings.amqp.url.nodes(),
        ["amqp://guest:guest@rabbitmq:5672/%2f"],
        "the broker service, with the user of compose/rabbitmq-local.json"
    );
}

#[test]
pub(crate) fn compose_builds_from_the_dockerfile_and_mounts_existing_files() {
    let image_stages = dockerfile_stages();
    for (name, service) in compose_services() {
        if let Some(build) = service.get("build") {
            let context = repo("deploy").join(text(build, "/context"));
            let dockerfile = context.join(text(build, "/dockerfile"));
            assert!(dockerfile.is_file(), "{name}: {}", dockerfile.display());
            let target = text(build, "/target");
            assert!(
                image_stages
                    .iter()
                    .any(|s| s.name.as_deref() == Some(target)),
                "{name}: no stage {target}"
            );
        }
        for volume in service
            .get("volumes")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let source = volume
                .as_str()
                .expect("short form")
                .split(':')
                .next()
                .expect("source");
            if source.starts_with('.') {
                assert!(repo("deploy").join(source).is_file(), "{name}: {source}");
            }
        }
    }
    let rabbitmq = compose_service("rabbitmq");
    let mounts = at(&rabbitmq, "/volumes").to_string();
    assert!(mounts.contains("./rabbitmq-definitions.json:"), "{mounts}");
    assert!(text(&rabbitmq, "/image").starts_with("rabbitmq:3.13-management"));
}

#[test]
pub(crate) fn the_cluster_profile_runs_the_workers_on_three_nodes_of_one_cluster() {
    let nodes = ["rabbitmq-1", "rabbitmq-2", "rabbitmq-3"];
    let conf = read("deploy/compose/rabbitmq-cluster.conf");
    let mut cookies = Vec::new();
    for (i, name) in nodes.iter().enumerate() {
        let node = compose_service(name);
        assert_eq!(at(&node, "/profiles"), &serde_json::json!(["cluster"]));
        assert_eq!(
            text(&node, "/hostname"),
            *name,
            "the node name derives from it"
        );
        assert!(
            conf.contains(&format!(
                "cluster_formation.classic_config.nodes.{} = rabbit@{name}",
                i + 1
            )),
            "{name} is in the peer list"
        );
        assert!(
            at(&node, "/volumes")
                .to_string()
                .contains("./compose/rabbitmq-cluster.conf:"),
            "{name} reads the cluster configuration"
        );
        cookies.push(
            compose_environment(&node)
                .into_iter()
                .find(|(k, _)| k == "RABBITMQ_ERLANG_COOKIE")
                .map(|(_, v)| v)
                .expect("a cookie"),
        );
        at(&node, "/healthcheck/test");
    }
    assert!(cookies.windows(2).all(|w| w[0] == w[1]), "one cookie");

    let worker = compose_service("worker-cluster");
    assert_eq!(at(&worker, "/profiles"), &serde_json::json!(["cluster"]));
    let settings = Settings::load_from(None, compose_environment(&worker))
        .unwrap_or_else(|e| panic!("a cluster worker would not start: {e}"));
    let urls: Vec<String> = nodes
        .iter()
        .map(|n| format!("amqp://guest:guest@{n}:5672/%2f"))
        .collect();
    assert_eq!(
        settings.amqp.url.nodes(),
        urls,
        "every node, in CPW__AMQP__URL"
    );
    assert!(
        settings.amqp.declare_topology,
        "no definitions on the nodes"
    );
    assert_eq!(settings.amqp.quorum_initial_group_size, 3);
    let depends = at(&worker, "/depends_on").as_object().expect("long form");
    for name in nodes.iter().chain(&["simulator"]) {
        assert_eq!(depends[*name]["condition"], "service_healthy", "{name}");
    }
    // Everything else as the single-node workers: probes, drain, replicas.
    let single = compose_service("worker");
    for field in ["/healthcheck", "/stop_grace_period", "/deploy", "/command"] {
        assert_eq!(at(&worker, field), at(&single, field), "{field}");
    }
}
