//! The observability files (`deploy/prometheus`, `deploy/grafana`): the
//! rules pass `promtool` and their unit tests, the `PrometheusRule` holds
//! exactly the plain rules, every alert has a runbook in docs/operations.md, and the
//! dashboard is one Grafana can provision, whose queries parse and name
//! metrics the worker registers, with a row per lane. (That every metric
//! they use is exposed by a running worker is checked against a live
//! `/metrics` in tests/worker/operations.rs.)

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
    assert_eq!(alerts.len(), 11, "the alerts of the runbooks");
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

/// Every query of the dashboard's panels, in panel order.
fn dashboard_queries() -> Vec<String> {
    let dashboard = json_file("deploy/grafana/credit-purchase-worker.json");
    at(&dashboard, "/panels")
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| text(&t, "/expr").to_owned())
        .collect()
}

/// The `cpw_*` words of a query.
fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("cpw_"))
        .map(str::to_owned)
        .collect()
}

/// The metric families `src/operations/metrics.rs` registers, as
/// exposed: the `cpw_` prefix, and the unit for those registered with one.
/// Read from the source, because a labelled family without a series yet
/// is left out of the exposition.
fn registered_families() -> Vec<String> {
    let source = read("src/operations/metrics.rs");
    let families: Vec<String> = source
        .split("registry.register")
        .skip(1)
        .filter_map(|call| {
            let name = call.split('"').nth(1)?;
            let arguments = call.split(");").next().unwrap_or_default();
            let unit = if call.starts_with("_with_unit") && arguments.contains("Unit::Seconds") {
                "_seconds"
            } else {
                ""
            };
            Some(format!("cpw_{name}{unit}"))
        })
        .collect();
    assert!(families.len() >= 20, "{families:?}");
    families
}

/// Whether a sample name is of a registered family (`cpw_x_total` is a
/// sample of the counter `cpw_x`, `cpw_x_bucket` of the histogram).
fn registered(families: &[String], name: &str) -> bool {
    ["", "_total", "_bucket", "_count", "_sum"]
        .iter()
        .any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|family| families.iter().any(|f| f == family))
        })
}

/// Every metric a dashboard query or an alert reads is one the worker
/// registers (its registration in src/operations/metrics.rs), and every query parses:
/// promtool checks each as a recording rule, with Grafana's variables
/// replaced by values. A renamed metric or a typo in a query shows here,
/// not as an empty panel or an alert that never fires.
#[test]
fn the_dashboard_queries_parse_and_every_metric_they_and_the_alerts_read_is_registered() {
    let families = registered_families();
    let queries = dashboard_queries();
    let mut exprs = queries.clone();
    exprs.extend(alerts().iter().map(|a| text(a, "/expr").to_owned()));
    let unknown: std::collections::BTreeSet<String> = exprs
        .iter()
        .flat_map(|e| metric_names(e))
        .filter(|name| !registered(&families, name))
        .collect();
    assert!(unknown.is_empty(), "not registered: {unknown:?}");

    let rules: Vec<serde_json::Value> = queries
        .iter()
        .enumerate()
        .map(|(i, expr)| {
            let expr = expr
                .replace("$__rate_interval", "1m")
                .replace("$lane", "default");
            serde_json::json!({ "record": format!("dashboard:query_{i}"), "expr": expr })
        })
        .collect();
    let file = std::env::temp_dir().join(format!("cpw-dashboard-{}.yml", uuid::Uuid::new_v4()));
    let groups = serde_json::json!({ "groups": [{ "name": "dashboard", "rules": rules }] });
    std::fs::write(&file, groups.to_string()).expect("write");
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("promtool runs (apt-get install prometheus)");
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "the dashboard's queries:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The lanes on the dashboard: a `lane` variable listing the lanes the
/// worker reports (`cpw_lane_share` has a series per configured lane from
/// the start), a row repeated over it, each of whose panels reads its own
/// lane, and every lane metric the worker registers on that row.
#[test]
fn the_dashboard_has_a_row_per_lane_showing_every_lane_metric() {
    let dashboard = json_file("deploy/grafana/credit-purchase-worker.json");
    let variable = at(&dashboard, "/templating/list")
        .as_array()
        .expect("variables")
        .iter()
        .find(|v| v["name"] == "lane")
        .expect("a `lane` variable")
        .clone();
    assert_eq!(text(&variable, "/type"), "query");
    assert_eq!(
        text(&variable, "/query/query"),
        "label_values(cpw_lane_share, lane)"
    );
    assert_eq!(variable["includeAll"], true, "every lane by default");
    let panels = at(&dashboard, "/panels").as_array().expect("panels");
    let row = panels
        .iter()
        .position(|p| p["type"] == "row" && p["repeat"] == "lane")
        .expect("a row repeated over `lane`");
    let lane_panels: Vec<&serde_json::Value> = panels[row + 1..]
        .iter()
        .take_while(|p| p["type"] != "row")
        .collect();
    assert!(lane_panels.len() >= 4, "depth, wait, gate wait, writes");
    let mut read = std::collections::BTreeSet::new();
    for panel in lane_panels {
        let targets = at(panel, "/targets").as_array().expect("targets");
        for target in targets {
            let expr = text(target, "/expr");
            assert!(
                expr.contains("{lane=\"$lane\"}"),
                "{}: {expr} reads its own lane",
                text(panel, "/title")
            );
            read.extend(metric_names(expr));
        }
    }
    let lane_families: Vec<String> = registered_families()
        .into_iter()
        .filter(|f| f.starts_with("cpw_lane_"))
        .collect();
    assert!(lane_families.len() >= 6, "{lane_families:?}");
    for family in lane_families {
        assert!(
            read.iter().any(|name| name.starts_with(&family)),
            "{family} is not on the lane row"
        );
    }
}

/// `CpwLaneWaitingTooLong` compares each lane's oldest wait, the fleet's
/// oldest (`min` of the publish times, zeros left out: a replica where none
/// waits), with that lane's objective; the objective a lane states none of
/// is the one docs/configuration.md gives.
#[test]
fn the_lane_alert_compares_each_lanes_oldest_wait_with_its_objective() {
    let alert = alerts()
        .into_iter()
        .find(|a| a["alert"] == "CpwLaneWaitingTooLong")
        .expect("the lane alert");
    let expr: String = text(&alert, "/expr").split_whitespace().collect();
    assert!(
        expr.contains(
            "min by (lane) (cpw_lane_oldest_waiting_since_seconds > 0)"
                .replace(' ', "")
                .as_str()
        ),
        "{expr}"
    );
    assert!(expr.contains("on(lane)"), "{expr}");
    assert!(expr.contains("cpw_lane_objective_seconds"), "{expr}");
    let settings = credit_purchase_worker::configuration::Settings::load_from(
        None,
        [("CPW__AMQP__LANES".to_owned(), "bulk:1".to_owned())],
    )
    .expect("one lane");
    let objective = settings.amqp.lanes()[0].objective.as_secs();
    let page = read("docs/configuration.md");
    assert!(
        page.contains(&format!("`objective_secs` (default {objective}")),
        "docs/configuration.md gives a lane's default objective, {objective} s"
    );
}
