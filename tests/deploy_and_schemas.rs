//! The deployment files (`deploy/`) and the published contract (`docs/`),
//! checked against the code.
//!
//! These files restate facts the code owns: the ops port and probe paths, the
//! configuration keys, the drain period, the queue and exchange names and
//! their arguments, the shapes of the messages. Nothing compiles them, so
//! without these tests they would drift silently, and the drift shows up only
//! in production: a probe on the wrong port restarts every pod, a misspelt
//! `CPW__` variable is ignored by the config crate, a definitions file whose
//! arguments differ from the worker's makes its start fail with
//! PRECONDITION_FAILED, a schema that is looser than the parser lets a
//! publisher ship commands that end up dead-lettered.
//!
//! Expected values are read from the code or from `config/default.toml`, so
//! changing either side alone fails a test. Two exceptions: the queue
//! arguments (private to `Topology`) are derived here from CONTRACT section 5,
//! and one test against the broker (CPW_TEST_AMQP_URL, default
//! guest@127.0.0.1, as CI provides) checks them against the real declaration;
//! the command example is CONTRACT section 2's, verbatim.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cpw_testkit::commands::parsed;
use credit_purchase_worker::broker::Topology;
use credit_purchase_worker::broker::history::{ATTEMPTS_HEADER, FIRST_ATTEMPT_HEADER, STEP_HEADER};
use credit_purchase_worker::configuration::{QueueType, Settings};
use credit_purchase_worker::contract::{
    Command, ErrorCode, EventError, EventKind, InvalidCommand, MAX_JSON_INTEGER, ResultEvent,
};
use serde::Deserialize;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------
// Reading the files
// ---------------------------------------------------------------------------

fn repo(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read(relative: &str) -> String {
    let path = repo(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every document of a YAML file; `---` separates them. Empty documents (a
/// leading `---`) are dropped. Merge keys (`<<: *anchor`, which compose
/// files use) are applied, as Docker Compose applies them.
fn yaml_documents(relative: &str) -> Vec<Value> {
    let text = read(relative);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            let mut yaml = serde_norway::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{relative} is not valid YAML: {e}"));
            yaml.apply_merge()
                .unwrap_or_else(|e| panic!("{relative}: bad merge key: {e}"));
            serde_json::to_value(yaml)
                .unwrap_or_else(|e| panic!("{relative} does not map to JSON: {e}"))
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml(relative: &str) -> Value {
    let mut docs = yaml_documents(relative);
    assert_eq!(docs.len(), 1, "{relative} should hold one YAML document");
    docs.remove(0)
}

fn json_file(relative: &str) -> Value {
    serde_json::from_str(&read(relative))
        .unwrap_or_else(|e| panic!("{relative} is not valid JSON: {e}"))
}

/// Files under `dir` (relative to the repository), recursively, as
/// repository-relative paths with `/` separators, sorted.
fn files_under(dir: &str) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let relative = path.strip_prefix(root).expect("under the root");
                out.push(relative.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    let root = repo("");
    let mut out = Vec::new();
    walk(&root, &root.join(dir), &mut out);
    out.sort();
    out
}

/// `value` at a `/`-separated path of object keys and array indices.
fn at<'a>(value: &'a Value, pointer: &str) -> &'a Value {
    value
        .pointer(pointer)
        .unwrap_or_else(|| panic!("no {pointer} in {value}"))
}

fn text<'a>(value: &'a Value, pointer: &str) -> &'a str {
    at(value, pointer)
        .as_str()
        .unwrap_or_else(|| panic!("{pointer} is not a string in {value}"))
}

fn integer(value: &Value, pointer: &str) -> i64 {
    at(value, pointer)
        .as_i64()
        .unwrap_or_else(|| panic!("{pointer} is not an integer in {value}"))
}

// ---------------------------------------------------------------------------
// The code's side
// ---------------------------------------------------------------------------

/// The settings with nothing but the defaults.
fn default_settings() -> Settings {
    Settings::load_from(None, std::iter::empty()).expect("the defaults are valid")
}

fn default_toml() -> toml::Table {
    read("config/default.toml")
        .parse::<toml::Table>()
        .expect("config/default.toml is valid TOML")
}

/// `server.listen` of `config/default.toml`: the port every probe, container
/// port, scrape annotation and `EXPOSE` must use.
fn ops_port() -> u16 {
    let table = default_toml();
    let listen = table["server"]["listen"]
        .as_str()
        .expect("server.listen is a string");
    let addr: SocketAddr = listen.parse().expect("server.listen is an address");
    assert_eq!(
        addr.port(),
        default_settings().server.listen.port(),
        "the compiled-in defaults are config/default.toml"
    );
    addr.port()
}

/// Every key `config/default.toml` documents, as `section.key`: the keys it
/// sets, and the optional ones it shows commented out (`# api_key_file = ...`).
///
/// The config crate ignores unknown keys, so a misspelt `CPW__` variable
/// would silently do nothing; this set is what a name is checked against.
fn documented_keys() -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for (section, table) in default_toml() {
        let table = table
            .as_table()
            .expect("every top-level entry is a section");
        for key in table.keys() {
            keys.insert(format!("{section}.{key}"));
        }
    }
    let mut section: Option<String> = None;
    for line in read("config/default.toml").lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.to_owned());
        } else if let (Some(section), Some(comment)) = (&section, line.strip_prefix('#'))
            && let Some((key, _)) = comment.split_once('=')
        {
            let key = key.trim();
            if !key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                keys.insert(format!("{section}.{key}"));
            }
        }
    }
    keys
}

/// `CPW__HYPERLINE__API_KEY_FILE` → `hyperline.api_key_file`.
fn key_of_variable(name: &str) -> Option<String> {
    let rest = name.strip_prefix("CPW__")?;
    Some(rest.to_ascii_lowercase().replace("__", "."))
}

/// Every `ErrorCode`, with an exhaustive match so a new variant does not
/// compile until it is added here (and so to the checks of failed.schema.json).
fn all_error_codes() -> Vec<ErrorCode> {
    let all = [
        ErrorCode::InvalidCommand,
        ErrorCode::Rejected,
        ErrorCode::IdempotencyConflict,
        ErrorCode::RetriesExhausted,
        ErrorCode::UnexpectedResponse,
    ];
    for code in all {
        match code {
            ErrorCode::InvalidCommand
            | ErrorCode::Rejected
            | ErrorCode::IdempotencyConflict
            | ErrorCode::RetriesExhausted
            | ErrorCode::UnexpectedResponse => {}
        }
    }
    all.to_vec()
}

/// Every `EventKind`, exhaustive for the same reason.
fn all_event_kinds() -> Vec<EventKind> {
    let all = [EventKind::Succeeded, EventKind::Failed];
    for kind in all {
        match kind {
            EventKind::Succeeded | EventKind::Failed => {}
        }
    }
    all.to_vec()
}

// ---------------------------------------------------------------------------
// The Kubernetes manifests
// ---------------------------------------------------------------------------

const K8S: &str = "deploy/k8s";

/// Every resource of `deploy/k8s`, through its kustomization.
fn k8s_resources() -> Vec<Value> {
    let kustomization = yaml(&format!("{K8S}/kustomization.yaml"));
    at(&kustomization, "/resources")
        .as_array()
        .expect("resources is a list")
        .iter()
        .flat_map(|r| yaml_documents(&format!("{K8S}/{}", r.as_str().expect("a file name"))))
        .collect()
}

/// The one resource of `kind` (and `name`, when given).
fn k8s_resource(kind: &str, name: Option<&str>) -> Value {
    let found: Vec<Value> = k8s_resources()
        .into_iter()
        .filter(|r| r["kind"] == kind && name.is_none_or(|n| r["metadata"]["name"] == n))
        .collect();
    assert_eq!(found.len(), 1, "one {kind} {name:?} in {K8S}");
    found.into_iter().next().expect("one")
}

fn deployment() -> Value {
    k8s_resource("Deployment", None)
}

/// The worker container of the Deployment (the one that runs the binary).
fn worker_container() -> Value {
    let deployment = deployment();
    let containers = at(&deployment, "/spec/template/spec/containers")
        .as_array()
        .expect("containers");
    assert_eq!(containers.len(), 1, "one container: the worker");
    containers[0].clone()
}

/// `(name, value)` of the container's environment, with `secretKeyRef`
/// values read from the Secrets of `secret.yaml`.
fn deployment_env() -> Vec<(String, String)> {
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

fn env_value<'a>(env: &'a [(String, String)], name: &str) -> &'a str {
    env.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("{name} is not set"))
}

/// The pod's volume mounted at the directory of `file`, and the file's name.
fn mounted_volume(file: &str) -> (Value, String) {
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
fn deployment_settings() -> Settings {
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
fn every_yaml_and_json_file_of_deploy_and_docs_parses() {
    let mut parsed = Vec::new();
    for dir in ["deploy", "docs"] {
        for file in files_under(dir) {
            if file.ends_with(".yaml") || file.ends_with(".yml") {
                assert!(!yaml_documents(&file).is_empty(), "{file} is empty");
                parsed.push(file);
            } else if file.ends_with(".json") {
                json_file(&file);
                parsed.push(file);
            }
        }
    }
    for expected in [
        "deploy/compose.yaml",
        "deploy/rabbitmq-definitions.json",
        "deploy/k8s/deployment.yaml",
        "docs/asyncapi.yaml",
        "docs/schemas/command.schema.json",
        "docs/schemas/succeeded.schema.json",
        "docs/schemas/failed.schema.json",
    ] {
        assert!(parsed.iter().any(|p| p == expected), "{expected} missing");
    }
}

#[test]
fn kustomization_lists_every_manifest_and_they_are_namespace_agnostic() {
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
fn the_ops_port_and_probe_paths_match_server_listen() {
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
fn the_pod_runs_as_non_root_on_a_read_only_root_filesystem() {
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
fn the_drain_fits_in_the_termination_grace_period() {
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
fn every_configuration_name_in_the_manifests_is_a_documented_key() {
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
fn keda_scales_on_the_commands_queue_with_unacked_messages_counted() {
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

/// The labels a selector requires (`matchLabels`) are all on `labels`.
fn selects(selector: &Value, labels: &Value, what: &str) {
    let required = selector.as_object().expect("matchLabels is a map");
    assert!(
        !required.is_empty(),
        "{what}: an empty selector takes everything"
    );
    for (key, value) in required {
        assert_eq!(&labels[key], value, "{what}: label {key}");
    }
}

#[test]
fn the_image_comes_from_a_registry_the_kustomization_sets() {
    let container_image = text(&worker_container(), "/image").to_owned();
    assert!(
        !container_image.contains(['/', ':', '@']),
        "deployment.yaml names the image alone ({container_image}): the \
         kustomization is the one place with its registry and tag"
    );
    let kustomization = yaml(&format!("{K8S}/kustomization.yaml"));
    let images = at(&kustomization, "/images").as_array().expect("images");
    let image = images
        .iter()
        .find(|i| i["name"] == *container_image)
        .unwrap_or_else(|| panic!("no images: entry for {container_image}"));
    let new_name = text(image, "/newName");
    let (registry, path) = new_name
        .split_once('/')
        .unwrap_or_else(|| panic!("{new_name} names no registry"));
    assert!(
        registry.contains(['.', ':']) || registry == "localhost",
        "{registry} is not a registry host: Docker would read it as a Docker Hub user"
    );
    assert!(path.ends_with(&container_image), "{new_name}");
    let tag = text(image, "/newTag");
    assert_ne!(tag, "latest", "a tag that moves cannot be rolled back");
    assert!(
        tag.len() <= 128
            && tag.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
            && tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)),
        "{tag} is not a valid image tag"
    );
    // The README tells how to set both, in the commands kustomize takes: in
    // place, and in an overlay, which sees the name this file produced.
    let readme = read("README.md");
    for name in [container_image.as_str(), new_name] {
        let command = format!("kustomize edit set image {name}=");
        assert!(readme.contains(&command), "README: `{command}…`");
    }
}

#[test]
fn the_service_monitor_scrapes_metrics_on_the_ops_port_of_the_pods() {
    let port = ops_port();
    let deployment = deployment();
    let pod_labels = at(&deployment, "/spec/template/metadata/labels");
    let container = worker_container();
    let service = k8s_resource("Service", None);
    let monitor = k8s_resource("ServiceMonitor", None);

    selects(at(&service, "/spec/selector"), pod_labels, "the Service");
    selects(
        at(&monitor, "/spec/selector/matchLabels"),
        at(&service, "/metadata/labels"),
        "the ServiceMonitor",
    );
    assert!(
        monitor.pointer("/spec/namespaceSelector").is_none(),
        "the ServiceMonitor looks in its own namespace, where the Service is"
    );
    // A replica paused on a refused key is unready; its metrics still count.
    assert_eq!(service["spec"]["publishNotReadyAddresses"], true);

    let endpoints = at(&monitor, "/spec/endpoints")
        .as_array()
        .expect("endpoints");
    assert_eq!(endpoints.len(), 1);
    let endpoint = &endpoints[0];
    assert_eq!(text(endpoint, "/path"), "/metrics");
    let service_port = at(&service, "/spec/ports")
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == endpoint["port"])
        .unwrap_or_else(|| panic!("the Service has no port {}", endpoint["port"]))
        .clone();
    let target = &service_port["targetPort"];
    let container_port = at(&container, "/ports")
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == *target || p["containerPort"] == *target)
        .unwrap_or_else(|| panic!("no container port {target}"))
        .clone();
    assert_eq!(integer(&container_port, "/containerPort"), i64::from(port));
    assert_eq!(service_port["protocol"], "TCP");
}

/// `(port, protocol)` of a NetworkPolicy rule's `ports`; a rule without any
/// allows every port, which no rule here may do.
fn policy_ports(rule: &Value, what: &str) -> BTreeSet<(String, String)> {
    let ports = rule
        .get("ports")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("{what}: a rule without ports allows them all"));
    ports
        .iter()
        .map(|p| {
            assert!(p.get("endPort").is_none(), "{what}: a port range");
            let port = match &p["port"] {
                Value::Number(n) => n.to_string(),
                Value::String(s) => s.clone(),
                other => panic!("{what}: port {other}"),
            };
            (port, text(p, "/protocol").to_owned())
        })
        .collect()
}

#[test]
fn the_network_policy_admits_monitoring_on_the_ops_port_and_egress_to_the_broker_hyperline_and_dns()
{
    let port = ops_port();
    let deployment = deployment();
    let policy = k8s_resource("NetworkPolicy", None);
    selects(
        at(&policy, "/spec/podSelector/matchLabels"),
        at(&deployment, "/spec/template/metadata/labels"),
        "the NetworkPolicy",
    );
    // Both directions listed: a policy without Egress leaves egress open.
    assert_eq!(
        at(&policy, "/spec/policyTypes"),
        &json!(["Ingress", "Egress"])
    );

    let ingress = at(&policy, "/spec/ingress").as_array().expect("ingress");
    assert_eq!(ingress.len(), 1, "one way in");
    let from = at(&ingress[0], "/from").as_array().expect("from");
    assert_eq!(
        from,
        &vec![json!({
            "namespaceSelector": { "matchLabels": { "kubernetes.io/metadata.name": "monitoring" } }
        })],
        "from the monitoring namespace only"
    );
    let ops: BTreeSet<(String, String)> = [(port.to_string(), "TCP".to_owned())].into();
    let named: BTreeSet<(String, String)> = [("ops".to_owned(), "TCP".to_owned())].into();
    let ingress_ports = policy_ports(&ingress[0], "ingress");
    assert!(
        ingress_ports == ops || ingress_ports == named,
        "{ingress_ports:?}"
    );

    let egress = at(&policy, "/spec/egress").as_array().expect("egress");
    let allowed: BTreeSet<(String, String)> = egress
        .iter()
        .flat_map(|rule| policy_ports(rule, "egress"))
        .collect();
    let tcp = |port: u16| (port.to_string(), "TCP".to_owned());
    let expected: BTreeSet<(String, String)> = [
        tcp(5672),
        tcp(5671),
        tcp(443),
        tcp(53),
        ("53".to_owned(), "UDP".to_owned()),
    ]
    .into();
    assert_eq!(allowed, expected);

    // The ports the pod's own settings use are among them.
    let pod = deployment_settings();
    let broker_port = worker_broker_uri().authority.port;
    let hyperline_port = pod
        .hyperline
        .base_url
        .port_or_known_default()
        .expect("a port");
    for needed in [broker_port, hyperline_port] {
        assert!(allowed.contains(&tcp(needed)), "egress to {needed}");
    }

    // Hyperline is on the internet: its rule keeps the cluster's own
    // networks out.
    let https = egress
        .iter()
        .find(|rule| policy_ports(rule, "egress").contains(&tcp(hyperline_port)))
        .expect("a rule for Hyperline");
    let ipv4 = at(https, "/to")
        .as_array()
        .expect("to")
        .iter()
        .find(|peer| peer["ipBlock"]["cidr"] == "0.0.0.0/0")
        .expect("an IPv4 block")
        .clone();
    let except: BTreeSet<&str> = at(&ipv4, "/ipBlock/except")
        .as_array()
        .expect("except")
        .iter()
        .map(|c| c.as_str().expect("a CIDR"))
        .collect();
    for private in [
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",
    ] {
        assert!(except.contains(private), "443 to {private} is allowed");
    }
}

// ---------------------------------------------------------------------------
// Docker compose
// ---------------------------------------------------------------------------

fn compose() -> Value {
    yaml("deploy/compose.yaml")
}

fn compose_services() -> Vec<(String, Value)> {
    at(&compose(), "/services")
        .as_object()
        .expect("services")
        .iter()
        .map(|(name, service)| (name.clone(), service.clone()))
        .collect()
}

fn compose_service(name: &str) -> Value {
    compose_services()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, s)| s)
        .unwrap_or_else(|| panic!("no service {name}"))
}

/// A service's environment, in the map or the `KEY=value` list form.
fn compose_environment(service: &Value) -> Vec<(String, String)> {
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
fn healthcheck_target(service: &Value) -> (u16, String) {
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
fn compose_duration_secs(value: &str) -> u64 {
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
fn flag_value<'a>(command: &'a [Value], flag: &str) -> &'a str {
    command
        .iter()
        .position(|a| a == flag)
        .and_then(|i| command.get(i + 1))
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no {flag}"))
}

#[test]
fn compose_workers_start_with_their_environment_and_probe_the_ops_port() {
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
        settings.amqp.url, "amqp://guest:guest@rabbitmq:5672/%2f",
        "the broker service, with the user of compose/rabbitmq-local.json"
    );
}

#[test]
fn compose_builds_from_the_dockerfile_and_mounts_existing_files() {
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

// ---------------------------------------------------------------------------
// The Dockerfile
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct Stage {
    name: Option<String>,
    /// `(INSTRUCTION, arguments)`, continuation lines joined.
    instructions: Vec<(String, String)>,
}

fn dockerfile_stages() -> Vec<Stage> {
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in read("deploy/Dockerfile").lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
        } else {
            current.push_str(trimmed);
            logical.push(std::mem::take(&mut current));
        }
    }
    let mut stages: Vec<Stage> = Vec::new();
    for line in logical.into_iter().filter(|l| !l.is_empty()) {
        let (instruction, args) = line.split_once(' ').unwrap_or((&line, ""));
        let instruction = instruction.to_ascii_uppercase();
        let args = args.trim().to_owned();
        if instruction == "FROM" {
            let words: Vec<&str> = args.split_whitespace().collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some((*name).to_owned()),
                _ => None,
            };
            stages.push(Stage {
                name,
                instructions: vec![(instruction, args)],
            });
        } else if let Some(stage) = stages.last_mut() {
            stage.instructions.push((instruction, args));
        }
    }
    stages
}

impl Stage {
    fn last(&self, instruction: &str) -> Option<&str> {
        self.instructions
            .iter()
            .rev()
            .find(|(i, _)| i == instruction)
            .map(|(_, a)| a.as_str())
    }
}

#[test]
fn the_images_expose_the_ops_port_and_run_the_worker_as_non_root() {
    let port = ops_port();
    let stages = dockerfile_stages();
    let runtimes: Vec<&Stage> = stages
        .iter()
        .filter(|s| s.last("ENTRYPOINT").is_some())
        .collect();
    assert!(!runtimes.is_empty());
    let last = stages.last().expect("stages");
    assert!(
        last.last("ENTRYPOINT").is_some(),
        "the default image runs the worker"
    );
    for stage in runtimes {
        let name = stage.name.as_deref().unwrap_or("unnamed");
        let user = stage
            .last("USER")
            .unwrap_or_else(|| panic!("{name}: no USER, so root"));
        let uid = user.split(':').next().expect("uid");
        assert!(
            uid != "0" && uid != "root" && uid.parse::<u32>().is_ok_and(|u| u > 0),
            "{name}: USER {user} must be numeric and not root (runAsNonRoot checks it)"
        );
        let exposed: Vec<&str> = stage
            .instructions
            .iter()
            .filter(|(i, _)| i == "EXPOSE")
            .flat_map(|(_, a)| a.split_whitespace())
            .collect();
        assert!(
            exposed.contains(&port.to_string().as_str())
                || exposed.contains(&format!("{port}/tcp").as_str()),
            "{name}: EXPOSE {port}"
        );
        let entrypoint: Vec<String> =
            serde_json::from_str(stage.last("ENTRYPOINT").expect("entrypoint")).expect("exec form");
        assert!(
            entrypoint[0].ends_with("/credit-purchase-worker"),
            "{entrypoint:?}"
        );
        let cmd: Vec<String> =
            serde_json::from_str(stage.last("CMD").expect("CMD")).expect("exec form");
        assert_eq!(cmd, ["run"], "{name}");
    }
    let builder = stages.first().expect("a builder");
    assert!(builder.last("FROM").is_some_and(|f| f.starts_with("rust:")));
    assert!(
        builder
            .instructions
            .iter()
            .any(|(i, a)| i == "RUN" && a.contains("cargo build --release --locked"))
    );
}

/// The dependency layer builds the manifest against stub `src/lib.rs` and
/// `src/main.rs` only; another explicit target (a `[[bench]]` with its own
/// file, say) would make that step fail to load the manifest.
#[test]
fn the_manifest_has_no_target_the_dockerfile_stub_build_would_miss() {
    let manifest: toml::Table = read("Cargo.toml").parse().expect("Cargo.toml");
    assert_eq!(manifest["lib"]["path"].as_str(), Some("src/lib.rs"));
    let bins = manifest["bin"].as_array().expect("[[bin]]");
    assert_eq!(bins.len(), 1);
    assert_eq!(bins[0]["name"].as_str(), Some("credit-purchase-worker"));
    assert_eq!(bins[0]["path"].as_str(), Some("src/main.rs"));
    // Every [[bench]] needs a stub in the dependency layer and its sources
    // copied before the real build, or the manifest does not load.
    let dockerfile = read("deploy/Dockerfile");
    for bench in manifest
        .get("bench")
        .and_then(|b| b.as_array())
        .into_iter()
        .flatten()
    {
        let name = bench["name"].as_str().expect("bench name");
        assert!(
            dockerfile.contains(&format!("> benches/{name}.rs")),
            "deploy/Dockerfile's dependency layer lacks a stub for bench `{name}`"
        );
        assert!(
            dockerfile.contains("COPY benches ./benches"),
            "deploy/Dockerfile does not copy benches/"
        );
    }
    for section in ["example", "test"] {
        assert!(
            !manifest.contains_key(section),
            "[[{section}]] in Cargo.toml: give it a stub in deploy/Dockerfile's dependency layer"
        );
    }
    assert!(
        !manifest.contains_key("build"),
        "build.rs: copy it in deploy/Dockerfile"
    );
    assert!(
        manifest["package"].get("build").is_none(),
        "build.rs: copy it in deploy/Dockerfile"
    );
}

// ---------------------------------------------------------------------------
// The RabbitMQ definitions
// ---------------------------------------------------------------------------

/// The arguments the worker declares on each of its queues, derived from
/// CONTRACT section 5 and the settings (the same rules as
/// `Topology::declare`, whose argument tables are private; the broker test
/// below checks this against the real declaration).
fn expected_queue_arguments(settings: &Settings) -> BTreeMap<String, Value> {
    let topology = Topology::new(&settings.amqp, &settings.retry.redelivery_delays_secs);
    let typed = |extra: Value| {
        let mut args = match settings.amqp.queue_type {
            QueueType::Quorum => json!({
                "x-queue-type": "quorum",
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
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

fn definitions() -> Value {
    json_file("deploy/rabbitmq-definitions.json")
}

fn named<'a>(definitions: &'a Value, kind: &str) -> Vec<&'a Value> {
    at(definitions, &format!("/{kind}"))
        .as_array()
        .unwrap_or_else(|| panic!("{kind} is a list"))
        .iter()
        .collect()
}

#[test]
fn the_definitions_declare_exactly_the_workers_topology() {
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
fn amqp_value(value: &Value) -> lapin::types::AMQPValue {
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
async fn the_worker_redeclares_the_definitions_topology_without_conflict() {
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
///   dead letters; the sources of the two bindings (the commands exchange,
///   named like its queue, and the DLX); and creating a queue with a
///   dead-letter exchange, which needs read on the queue itself (the
///   commands queue and each delay queue).
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
    for (_, name) in topology.delay_queues() {
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
        format!("x{results}"),
        "amq.direct".to_owned(),
        "amq.topic".to_owned(),
        "amq.rabbitmq.trace".to_owned(),
    ]);
    names
}

/// The broker URL of the worker's pods (its Secret, through the
/// Deployment's environment).
fn worker_broker_uri() -> lapin::uri::AMQPUri {
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

// ---------------------------------------------------------------------------
// The JSON Schemas
// ---------------------------------------------------------------------------

/// A validator that asserts `format` too (date-time, uuid), as a strict
/// consumer would.
fn validator(file: &str) -> jsonschema::Validator {
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

fn errors(validator: &jsonschema::Validator, instance: &Value) -> Vec<String> {
    validator
        .iter_errors(instance)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

/// The example of CONTRACT section 2, verbatim.
const CONTRACT_EXAMPLE: &str = r#"{
  "command_id": "6f1c1f0e-4c1a-4a51-9d7e-3f5d2b8e9a10",
  "customer_id": "cus_Typ0px2W0aiEtl",
  "product_id": "itm_3kXODDF42QXtnL",
  "credit_count": 32,
  "amount_excluding_tax": 24000,
  "price_id": null,
  "expires_at": null
}"#;

fn example() -> Value {
    serde_json::from_str(CONTRACT_EXAMPLE).expect("json")
}

fn with(key: &str, value: Value) -> Value {
    let mut v = example();
    v[key] = value;
    v
}

fn without(key: &str) -> Value {
    let mut v = example();
    v.as_object_mut().map(|o| o.remove(key));
    v
}

/// A message_id for bodies without a command_id: the contract's fallback.
const MESSAGE_ID: &str = "message-id-0000000000000001";

#[test]
fn the_command_schema_accepts_the_contract_example() {
    let schema = validator("command.schema.json");
    assert_eq!(errors(&schema, &example()), Vec::<String>::new());
    assert!(Command::parse(CONTRACT_EXAMPLE.as_bytes(), None).is_ok());
    let file = json_file("docs/schemas/command.schema.json");
    assert_eq!(file["examples"], json!([example()]));
}

#[test]
fn the_command_schema_rejects_what_the_contract_forbids() {
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
fn the_command_schema_and_the_parser_agree() {
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
fn where_the_worker_is_stricter_than_the_command_schema() {
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

fn event_json(event: &ResultEvent) -> Value {
    serde_json::from_slice(&event.to_json()).expect("an event is JSON")
}

/// Every `InvalidCommand` the parser can make of these messages, for
/// `ResultEvent::invalid`.
fn invalid_commands() -> Vec<InvalidCommand> {
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
fn the_workers_events_match_the_event_schemas() {
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
fn the_event_schemas_name_exactly_the_workers_codes_and_types() {
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
fn the_event_schemas_reject_what_the_worker_never_sends() {
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

// ---------------------------------------------------------------------------
// The AsyncAPI document
// ---------------------------------------------------------------------------

fn asyncapi() -> Value {
    yaml("docs/asyncapi.yaml")
}

/// Every `$ref` in `value`, with the JSON pointer of the object holding it.
fn refs(value: &Value, here: String, out: &mut Vec<(String, String)>) {
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
fn the_asyncapi_document_references_existing_schemas_and_objects() {
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
fn the_asyncapi_channels_name_the_workers_topology() {
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
fn the_asyncapi_headers_are_those_the_worker_sends_and_reads() {
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
    let props = with_everything.amqp_properties(Some(
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    ));
    let headers = props.headers().as_ref().expect("headers");
    let sent: BTreeMap<String, String> = headers
        .inner()
        .iter()
        .map(|(k, v)| {
            let value = match v {
                lapin::types::AMQPValue::LongString(s) => {
                    String::from_utf8_lossy(s.as_bytes()).into_owned()
                }
                other => panic!("{k}: {other:?}"),
            };
            (k.as_str().to_owned(), value)
        })
        .collect();
    let sent_names: BTreeSet<&str> = sent.keys().map(String::as_str).collect();
    assert_eq!(sent_names, documented, "the event headers");

    // The minimal event (no command id, no traceparent) still has the required ones.
    let invalid = invalid_commands().into_iter().next().expect("one");
    let minimal = ResultEvent::invalid(&invalid).amqp_properties(None);
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

/// Every `status` label a Hyperline request can carry is documented in the
/// README's metrics table (`other` was not).
#[test]
fn every_request_status_label_is_documented() {
    use credit_purchase_worker::hyperline::{PurchaseAnswer, PurchaseResponse};
    let readme = read("README.md");
    let row = readme
        .lines()
        .find(|l| l.starts_with("| `cpw_hyperline_requests_total{status}`"))
        .expect("the metrics row");
    for status in (100..600).step_by(7).chain([429]) {
        let label = PurchaseResponse {
            answer: PurchaseAnswer::InProgress,
            status: Some(status),
            quota: None,
        }
        .status_class();
        assert!(
            row.contains(&format!("`{label}`")),
            "{label} (HTTP {status}) in {row}"
        );
    }
}
