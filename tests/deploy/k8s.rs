//! The Kubernetes manifests (`deploy/k8s`): probes, ports, security
//! context, drain period, configuration names, KEDA.

use std::collections::BTreeSet;
use std::path::Path;

use crate::common::*;
use crate::compose::{compose_environment, compose_services};
use crate::definitions::worker_broker_uri;
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
    let (volume, file) = mounted_volume(env_value(&env, "CPW_CONFIG"));
    let config_map = k8s_resource("ConfigMap", Some(text(&volume, "/configMap/name")));
    settings_with_worker_toml(text(&config_map, &format!("/data/{file}")))
}

/// The settings of a pod of the Deployment whose ConfigMap holds
/// `worker_toml` (an overlay's).
pub(crate) fn settings_with_worker_toml(worker_toml_text: &str) -> Settings {
    let env = deployment_env();
    let dir = std::env::temp_dir().join(format!("cpw-deploy-test-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let worker_toml = dir.join("worker.toml");
    std::fs::write(&worker_toml, worker_toml_text).expect("write");

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
/// `lanes/`, the example overlay with two lanes: its worker.toml starts a
/// pod, and KEDA has exactly one trigger per lane queue, with the lane's
/// prefetch as its value and the base trigger's other settings.
#[test]
fn the_lanes_overlay_scales_on_every_lane_queue() {
    let overlay = yaml(&format!("{K8S}/lanes/kustomization.yaml"));
    assert_eq!(at(&overlay, "/resources"), &json!([".."]));
    let patches = at(&overlay, "/patches").as_array().expect("patches");
    let patch = |kind: &str| -> Value {
        let found = patches
            .iter()
            .find(|p| p["target"]["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} patch"));
        let base = k8s_resource(kind, Some(text(found, "/target/name")));
        let patched: Value = serde_norway::from_str(text(found, "/patch")).expect("YAML");
        assert_eq!(patched["metadata"]["name"], base["metadata"]["name"]);
        patched
    };
    let config_map = patch("ConfigMap");
    let settings = settings_with_worker_toml(text(&config_map, "/data/worker.toml"));
    let lanes = settings.amqp.lanes();
    assert!(lanes.len() >= 2, "{lanes:?}");
    assert!(
        lanes.iter().any(|l| l.queue == settings.amqp.queue),
        "one lane keeps the existing queue"
    );
    let scaled = patch("ScaledObject");
    let base = k8s_resource("ScaledObject", None);
    let base_trigger = at(&base, "/spec/triggers/0");
    let triggers = at(&scaled, "/spec/triggers").as_array().expect("triggers");
    let by_queue: BTreeSet<(String, String)> = triggers
        .iter()
        .map(|t| {
            for key in ["type", "authenticationRef"] {
                assert_eq!(t[key], base_trigger[key], "{key}");
            }
            for key in ["protocol", "mode", "vhostName"] {
                assert_eq!(t["metadata"][key], base_trigger["metadata"][key], "{key}");
            }
            (
                text(t, "/metadata/queueName").to_owned(),
                text(t, "/metadata/value").to_owned(),
            )
        })
        .collect();
    let expected: BTreeSet<(String, String)> = lanes
        .iter()
        .map(|l| (l.queue.clone(), l.prefetch.to_string()))
        .collect();
    assert_eq!(by_queue, expected);
    assert_eq!(triggers.len(), lanes.len());
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
    // docs/deploying.md tells how to set both, in the commands kustomize takes: in
    // place, and in an overlay, which sees the name this file produced.
    let guide = read("docs/deploying.md");
    for name in [container_image.as_str(), new_name] {
        let command = format!("kustomize edit set image {name}=");
        assert!(guide.contains(&command), "docs/deploying.md: `{command}…`");
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
