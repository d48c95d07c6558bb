//! The observability files (`deploy/prometheus`, `deploy/grafana`): the
//! rules pass `promtool` and their unit tests, the `PrometheusRule` holds
//! exactly the plain rules, every alert has a runbook in docs/operations.md, and the
//! dashboard is one Grafana can provision. (That every metric they use is
//! exposed is checked against a live `/metrics` in tests/worker/operations.rs.)

use std::process::Command;

use crate::common::*;

const RULES: &str = "deploy/prometheus/rules.yml";

/// Runs `promtool` with `args` in `deploy/prometheus`; `promtool` comes with
/// Debian's `prometheus` package (`.ci/run` installs it).
fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(repo("deploy/prometheus"))
        .output()
        .expect("promtool runs (apt-get install prometheus)");
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_rules_pass_promtool_and_their_unit_tests() {
    promtool(&["check", "rules", "rules.yml"]);
    promtool(&["test", "rules", "rules.test.yml"]);
}

fn alerts() -> Vec<serde_json::Value> {
    at(&yaml(RULES), "/groups")
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| at(g, "/rules").as_array().expect("rules").clone())
        .collect()
}

#[test]
fn the_prometheus_rule_holds_exactly_the_plain_rules() {
    let rule = yaml("deploy/prometheus/prometheus-rule.yaml");
    assert_eq!(text(&rule, "/kind"), "PrometheusRule");
    assert_eq!(text(&rule, "/apiVersion"), "monitoring.coreos.com/v1");
    assert_eq!(at(&rule, "/spec/groups"), at(&yaml(RULES), "/groups"));
}

#[test]
fn every_alert_says_what_to_do_and_has_a_runbook_in_the_operations_guide() {
    let guide = read("docs/operations.md");
    let alerts = alerts();
    assert_eq!(alerts.len(), 10, "the alerts of the runbooks");
    for alert in alerts {
        let name = text(&alert, "/alert");
        for field in ["summary", "description"] {
            let said = text(&alert, &format!("/annotations/{field}"));
            assert!(said.len() > 20, "{name}: {field} too short");
        }
        let severity = text(&alert, "/labels/severity");
        assert!(["page", "ticket"].contains(&severity), "{name}: {severity}");
        let runbook = text(&alert, "/annotations/runbook");
        assert_eq!(
            runbook,
            format!("docs/operations.md#{}", name.to_lowercase())
        );
        assert!(
            guide.contains(&format!("\n### {name}\n")),
            "docs/operations.md has no runbook section for {name}"
        );
    }
}

#[test]
fn the_dashboard_is_provisionable_and_its_panels_query_the_worker() {
    let dashboard = json_file("deploy/grafana/credit-purchase-worker.json");
    assert_eq!(text(&dashboard, "/uid"), "credit-purchase-worker");
    let panels = at(&dashboard, "/panels").as_array().expect("panels");
    let mut ids = std::collections::BTreeSet::new();
    let mut exemplars = 0;
    for panel in panels {
        assert!(ids.insert(integer(panel, "/id")), "duplicate panel id");
        if text(panel, "/type") == "row" {
            continue;
        }
        let targets = at(panel, "/targets").as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", text(panel, "/title"));
        for target in targets {
            assert!(text(target, "/expr").contains("cpw_"));
            assert_eq!(text(target, "/datasource/uid"), "${datasource}");
            exemplars += usize::from(target["exemplar"] == true);
        }
    }
    assert!(exemplars >= 2, "latency panels show exemplars");
    let provider = yaml("deploy/grafana/provisioning/dashboards.yaml");
    assert_eq!(integer(&provider, "/apiVersion"), 1);
    assert_eq!(text(&provider, "/providers/0/type"), "file");
    let datasources = yaml("deploy/grafana/provisioning/datasources.yaml");
    assert_eq!(
        text(
            &datasources,
            "/datasources/0/jsonData/exemplarTraceIdDestinations/0/name"
        ),
        "trace_id",
        "exemplars are labelled trace_id (operations/metrics.rs)"
    );
}

/// Every `status` label a Hyperline request can carry is documented in the
/// metrics table of docs/operations.md (`other` was not).
#[test]
fn every_request_status_label_is_documented() {
    use credit_purchase_worker::hyperline::{PurchaseAnswer, PurchaseResponse};
    let guide = read("docs/operations.md");
    let row = guide
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
