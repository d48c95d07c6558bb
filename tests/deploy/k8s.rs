//! The Kubernetes manifests (`deploy/k8s`): probes, ports, security
//! context, drain period, configuration names, KEDA.

use std::collections::BTreeSet;
use std::path::Path;

use crate::common::*;
use crate::compose::{compose_environment, compose_services};
use credit_purchase_worker::configuration::Settings;
use serde_json::{Value, json};

pub(crate) const K8S: &str = "deploy/k8s";

/// Every resource of `deploy/k8s`, through its kustomization.
pub(crate) fn k8s_resources() -> Vec<Value> {
    let kustomization = yaml(&format!("{K8S}/kustomization.yaml"));
    at(&kustomization, "/resources")
        .as_array()
        .expect("resources is a list")
        .iter()
        .flat_map(|r| yaml_documents(&format!("{K8S}/{}", r.as_str().expect("a file name"))))
        .collect()
}

/// The one resource of `kind` (and `name`, when given).
pub(crate) fn k8s_resource(kind: &str, name: Option<&str>) -> Value {
    let found: Vec<Value> = k8s_resources()
        .into_iter()
        .filter(|r| r["kind"] == kind && name.is_none_or(|n| r["metadata"]["name"] == n))
        .collect();
    assert_eq!(found.len(), 1, "one {kind} {name:?} in {K8S}");
    found.into_iter().next().expect("one")
}

pub(crate) fn deployment() -> Value {
    k8s_resource("Deployment", None)
}

/// The worker container of the Deployment (the one that runs the binary).
pub(crate) fn worker_container() -> Value {
    let deployment = deployment();
    let containers = at(&deployment, "/spec/template/spec/containers")
        .as_array()
        .expect("containers");
    assert_eq!(containers.len(), 1, "one container: the worker");
    containers[0].clone()
}

/// `(name, value)` of the container's environment, with `secretKeyRef`
/// values read from the Secrets of `secret.yaml`.
pub(crate) fn deployment_env() -> Vec<(String, String)> {
    let secrets: Vec<Value> = k8s_resources()
        .into_iter()
        .filter(|r| r["kind"] == "Secret")
        .collect();
    let container = worker_container();
    at(&container, "/env")
        .as_array()
        .expect("env is a list")
        .iter()
        .map(|var| {
            let name = text(var, "/name").to_owned();
            let value = match (var.get("value"), var.pointer("/valueFrom/secretKeyRef")) {
                (Some(v), None) => v.as_str().expect("env values are strings").to_owned(),
                (None, Some(reference)) => {
                    let secret = secrets
                        .iter()
                        .find(|s| s["metadata"]["name"] == reference["name"])
                        .unwrap_or_else(|| panic!("{name}: no Secret {}", reference["name"]));
                    text(secret, &format!("/stringData/{}", text(reference, "/key"))).to_owned()
                }
                _ => panic!("{name}: give a value or a secretKeyRef"),
            };
            (name, value)
        })
        .collect()
}

pub(crate) fn env_value<'a>(env: &'a [(String, String)], name: &str) -> &'a str {
    env.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("{name} is not set"))
}

/// The pod's volume mounted at the directory of `file`, and the file's name.
pub(crate) fn mounted_volume(file: &str) -> (Value, String) {
    let path = Path::new(file);
    let dir = path.parent().expect("a directory").to_string_lossy();
    let name = path
        .file_name()
        .expect("a file")
        .to_string_lossy()
        .into_owned();
    let container = worker_container();
    let mount = at(&container, "/volumeMounts")
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| m["mountPath"] == *dir)
        .unwrap_or_else(|| panic!("nothing is mounted at {dir}"))
        .clone();
    assert_eq!(mount["readOnly"], true, "{dir} is mounted read-only");
    let deployment = deployment();
    let volume = at(&deployment, "/spec/template/spec/volumes")
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap_or_else(|| panic!("no volume {}", mount["name"]))
        .clone();
    (volume, name)
}

/// The settings a pod of the Deployment starts with: its ConfigMap's
/// worker.toml as the `--config` file, its environment, its secret file.
pub(crate) fn deployment_settings() -> Settings {
    let env = deployment_env();
    let dir = std::env::temp_dir().join(format!("cpw-deploy-test-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("temp dir");

    let config_path = env_value(&env, "CPW_CONFIG");
    let (volume, file) = mounted_volume(config_path);
    let config_map = k8s_resource("ConfigMap", Some(text(&volume, "/configMap/name")));
    let worker_toml = dir.join("worker.toml");
    std::fs::write(&worker_toml, text(&config_map, &format!("/data/{file}"))).expect("write");

    let key_path = env_value(&env, "CPW__HYPERLINE__API_KEY_FILE");
    let (volume, file) = mounted_volume(key_path);
    let secret = k8s_resource("Secret", Some(text(&volume, "/secret/secretName")));
    let item = at(&volume, "/secret/items")
        .as_array()
        .expect("items")
        .iter()
        .find(|i| i["path"] == *file)
        .unwrap_or_else(|| panic!("the secret volume has no item {file}"))
        .clone();
    let key_file = dir.join("api-key");
    let key = text(&secret, &format!("/stringData/{}", text(&item, "/key")));
    std::fs::write(&key_file, key).expect("write");

    let env = env.into_iter().map(|(name, value)| {
        if name == "CPW__HYPERLINE__API_KEY_FILE" {
            (name, key_file.to_string_lossy().into_owned())
        } else {
            (name, value)
        }
    });
    let settings = Settings::load_from(Some(&worker_toml), env);
    let _ = std::fs::remove_dir_all(&dir);
    settings.unwrap_or_else(|e| panic!("a pod of {K8S} would not start: {e}"))
}

#[test]
pub(crate) fn kustomization_lists_every_manifest_and_they_are_namespace_agnostic() {
    let kustomization = yaml(&format!("{K8S}/kustomization.yaml"));
    let listed: BTreeSet<String> = at(&kustomization, "/resources")
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().expect("a file name").to_owned())
        .collect();
    let present: BTreeSet<String> = files_under(K8S)
        .into_iter()
        .filter(|f| f.ends_with(".yaml") && !f.ends_with("/kustomization.yaml"))
        .map(|f| f.trim_start_matches(&format!("{K8S}/")).to_owned())
        .collect();
    assert_eq!(listed, present, "every manifest is applied, nothing else");
    assert!(kustomization.get("namespace").is_none());
    for resource in k8s_resources() {
        for field in ["/apiVersion", "/kind", "/metadata/name"] {
            text(&resource, field);
        }
        assert!(
            resource.pointer("/metadata/namespace").is_none(),
            "{} names a namespace",
            resource["metadata"]["name"]
        );
    }
}

#[test]
pub(crate) fn the_ops_port_and_probe_paths_match_server_listen() {
    let port = ops_port();
    let container = worker_container();
    let ports = at(&container, "/ports").as_array().expect("ports");
    let ops = ports
        .iter()
        .find(|p| p["name"] == "ops")
        .expect("a port named ops");
    assert_eq!(integer(ops, "/containerPort"), i64::from(port));
    assert_eq!(ops["protocol"], "TCP");

    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = at(&container, &format!("/{probe}/httpGet"));
        assert_eq!(text(get, "/path"), path, "{probe}");
        let probe_port = &get["port"];
        assert!(
            *probe_port == "ops" || *probe_port == i64::from(port),
            "{probe} probes port {probe_port}, not {port}"
        );
    }

    let deployment = deployment();
    let annotations = at(&deployment, "/spec/template/metadata/annotations");
    assert_eq!(text(annotations, "/prometheus.io~1scrape"), "true");
    assert_eq!(text(annotations, "/prometheus.io~1port"), port.to_string());
    assert_eq!(text(annotations, "/prometheus.io~1path"), "/metrics");

    // Whatever the ConfigMap or the environment say, the pod listens there.
    assert_eq!(deployment_settings().server.listen.port(), port);
}

#[test]
pub(crate) fn the_pod_runs_as_non_root_on_a_read_only_root_filesystem() {
    let deployment = deployment();
    let pod = at(&deployment, "/spec/template/spec");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert!(integer(pod, "/securityContext/runAsUser") > 0);
    let container = worker_container();
    let security = at(&container, "/securityContext");
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(at(&container, "/args"), &json!(["run"]));
    for kind in ["requests", "limits"] {
        text(&container, &format!("/resources/{kind}/memory"));
    }
}

#[test]
pub(crate) fn the_drain_fits_in_the_termination_grace_period() {
    let deployment = deployment();
    let termination = integer(
        &deployment,
        "/spec/template/spec/terminationGracePeriodSeconds",
    );
    let env = deployment_env();
    let grace: i64 = env_value(&env, "CPW__WORKER__SHUTDOWN_GRACE_SECS")
        .parse()
        .expect("an integer");
    assert!(
        termination > grace,
        "SIGKILL after {termination} s would cut the {grace} s drain"
    );
    let effective = deployment_settings().worker.shutdown_grace_secs;
    assert!(i64::try_from(effective).expect("small") < termination);
}

#[test]
pub(crate) fn every_configuration_name_in_the_manifests_is_a_documented_key() {
    let documented = documented_keys();
    // Sanity: the commented-out optional keys are found too.
    assert!(documented.contains("hyperline.api_key_file"));
    assert!(documented.contains("hyperline.api_key"));
    assert!(documented.contains("server.listen"));

    let mut names: Vec<(String, String)> = deployment_env()
        .into_iter()
        .map(|(name, _)| (format!("{K8S}/deployment.yaml"), name))
        .collect();
    names.extend(
        compose_services()
            .iter()
            .flat_map(|(_, service)| compose_environment(service))
            .map(|(name, _)| ("deploy/compose.yaml".to_owned(), name)),
    );
    let mut checked = 0;
    for (file, name) in &names {
        if name == "CPW_CONFIG" {
            continue;
        }
        assert!(
            !name.starts_with("CPW_") || name.starts_with("CPW__"),
            "{file}: {name} is neither CPW_CONFIG nor CPW__SECTION__KEY"
        );
        if let Some(key) = key_of_variable(name) {
            assert!(
                documented.contains(&key),
                "{file}: {name} names `{key}`, which config/default.toml does not have"
            );
            checked += 1;
        }
    }
    assert!(checked >= 5, "the manifests set CPW__ variables");

    // The ConfigMap's worker.toml: every key exists too.
    let env = deployment_env();
    let (volume, file) = mounted_volume(env_value(&env, "CPW_CONFIG"));
    let config_map = k8s_resource("ConfigMap", Some(text(&volume, "/configMap/name")));
    let worker_toml: toml::Table = text(&config_map, &format!("/data/{file}"))
        .parse()
        .expect("worker.toml is valid TOML");
    for (section, table) in worker_toml {
        for key in table.as_table().expect("sections only").keys() {
            let key = format!("{section}.{key}");
            assert!(
                documented.contains(&key),
                "worker.toml: `{key}` is not a key"
            );
        }
    }
}

#[test]
pub(crate) fn keda_scales_on_the_commands_queue_with_unacked_messages_counted() {
    let defaults = default_settings();
    let pod = deployment_settings();
    let scaled = k8s_resource("ScaledObject", None);
    let deployment = deployment();
    assert_eq!(
        at(&scaled, "/spec/scaleTargetRef/name"),
        at(&deployment, "/metadata/name")
    );
    let triggers = at(&scaled, "/spec/triggers").as_array().expect("triggers");
    assert_eq!(triggers.len(), 1);
    let trigger = &triggers[0];
    assert_eq!(trigger["type"], "rabbitmq");
    let metadata = at(trigger, "/metadata").as_object().expect("metadata");
    // The CRD types trigger metadata as a map of strings: `value: 64` is refused.
    for (key, value) in metadata {
        assert!(value.is_string(), "trigger metadata {key} must be a string");
    }
    // http: the management API's count includes the unacked in-flight messages.
    assert_eq!(metadata["protocol"], "http");
    assert_eq!(metadata["mode"], "QueueLength");
    assert_eq!(metadata["queueName"], defaults.amqp.queue.as_str());
    assert_eq!(metadata["queueName"], pod.amqp.queue.as_str());
    assert_eq!(metadata["value"], pod.amqp.prefetch.to_string());

    let min = integer(&scaled, "/spec/minReplicaCount");
    let max = integer(&scaled, "/spec/maxReplicaCount");
    assert!(min >= 1 && max >= min);
    let pdb = k8s_resource("PodDisruptionBudget", None);
    assert!(
        min > integer(&pdb, "/spec/minAvailable"),
        "with as few replicas as the PDB keeps available, a node drain blocks"
    );
    assert_eq!(
        at(&pdb, "/spec/selector/matchLabels"),
        at(&deployment, "/spec/selector/matchLabels")
    );

    let auth = k8s_resource(
        "TriggerAuthentication",
        Some(text(trigger, "/authenticationRef/name")),
    );
    let refs = at(&auth, "/spec/secretTargetRef").as_array().expect("refs");
    let host = refs
        .iter()
        .find(|r| r["parameter"] == "host")
        .expect("the host comes from a secret");
    let secret = k8s_resource("Secret", Some(text(host, "/name")));
    let url = text(&secret, &format!("/stringData/{}", text(host, "/key")));
    assert!(
        url.starts_with("http://") || url.starts_with("https://"),
        "{url}"
    );
}
