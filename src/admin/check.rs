//! `check`: is this replica's world in order? One ✓/✗ line per fact.
//!
//! A worker that does not start, or starts and buys nothing, has one of four
//! causes: a bad setting, an unreachable broker, missing queues (where the
//! topology is managed outside the worker), or a refused API key. This tells
//! them apart in seconds, before a deploy or during an incident, without
//! consuming or buying anything: each queue and exchange is compared with
//! what `run` declares, every lane's commands and delay queues among them
//! (see `broker::mismatch`: a passive declaration, then
//! the same declaration as `run`'s on a throwaway channel, which the broker
//! refuses when an argument differs), each lane is named with its share,
//! and the key is probed with a request
//! that cannot charge. The history keys are named by where they come from
//! (which signs, which verify), so a move from the derived key to explicit
//! ones can be checked on each replica before a copy depends on it. The
//! keys and the broker password are never printed.

use std::path::Path;
use std::process::ExitCode;

use lapin::Connection;

use crate::broker::{Finding, HistoryKeys, Shape, Topology, redacted_url};
use crate::configuration::Settings;
use crate::hyperline::{HyperlineClient, ProbeResult};

/// Prints the lines and remembers whether any check failed.
#[derive(Default)]
struct Report {
    failed: bool,
}

impl Report {
    fn pass(&mut self, line: impl std::fmt::Display) {
        super::output::line(format_args!("✓ {line}"));
    }

    fn fail(&mut self, line: impl std::fmt::Display) {
        self.failed = true;
        super::output::line(format_args!("✗ {line}"));
    }

    fn exit_code(&self) -> ExitCode {
        if self.failed {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        }
    }
}

/// Runs every check that can run; 0 when all pass, 1 otherwise.
pub async fn run(config: Option<&Path>) -> ExitCode {
    let mut report = Report::default();
    let settings = match Settings::load(config) {
        Ok(settings) => settings,
        Err(e) => {
            report.fail(e);
            return report.exit_code();
        }
    };
    // `run` refuses to start without a key: the configuration is not valid
    // for it, whatever else is right.
    match settings.require_api_key() {
        Ok(_) => report.pass("configuration is valid"),
        Err(e) => report.fail(e),
    }
    report.pass(crate::configuration::budget_line(&settings));
    lanes(&mut report, &settings);
    history_keys(&mut report, &settings);
    // Every node of a cluster, one line each: a node down is a replica's
    // failover waiting to happen. The topology is read on the first that
    // answers (a cluster shares it).
    let nodes = settings.amqp.url.nodes();
    let mut reachable = None;
    for (i, node) in nodes.iter().enumerate() {
        let (which, prefix) = if nodes.len() > 1 {
            let which = format!("broker node {}/{}", i + 1, nodes.len());
            (which.clone(), format!("{which}: "))
        } else {
            ("broker".to_owned(), String::new())
        };
        let single = std::slice::from_ref(node);
        match super::connect_node(&settings.amqp, "check", single).await {
            Ok(connection) => {
                report.pass(format!("{which} reachable at {}", redacted_url(node)));
                match reachable {
                    None => reachable = Some(connection),
                    Some(_) => super::close(&connection).await,
                }
            }
            Err(e) => report.fail(format!("{prefix}{e}")),
        }
    }
    if let Some(connection) = reachable {
        topology(&mut report, &connection, &settings).await;
        super::close(&connection).await;
    }
    api(&mut report, &settings).await;
    report.exit_code()
}

/// The lanes the worker consumes, one line each, as it will run them: the
/// queue, the share of the write budget, the prefetch and the objective.
/// Their queues are among the topology's, compared below.
fn lanes(report: &mut Report, settings: &Settings) {
    let note = match settings.amqp.lanes.is_empty() {
        true => " (no amqp.lanes: one lane on amqp.queue)",
        false => "",
    };
    for lane in settings.amqp.lanes() {
        report.pass(format!(
            "lane `{}`: queue `{}`, share {}, prefetch {}, objective {}{note}",
            lane.name,
            lane.queue,
            lane.share,
            lane.prefetch,
            super::human(lane.objective)
        ));
    }
}

/// Which history key signs the worker's copies and which verify them,
/// named by where each comes from, never shown.
fn history_keys(report: &mut Report, settings: &Settings) {
    let keys = match HistoryKeys::require(settings) {
        Ok(keys) => keys,
        Err(e) => return report.fail(format!("history keys: {e}")),
    };
    let Some(signer) = keys.signer() else {
        return report.fail("history keys: none");
    };
    let source = match (
        &settings.worker.history_keys_file,
        &settings.worker.history_keys[..],
    ) {
        (_, []) => String::new(),
        (Some(file), _) => format!(" (entries of worker.history_keys_file {})", file.display()),
        (None, _) => " (entries of worker.history_keys)".to_owned(),
    };
    if keys.verifiers().len() == 1 {
        return report.pass(format!(
            "history keys: copies signed and verified with {signer}{source}"
        ));
    }
    let verifiers: Vec<String> = keys.verifiers().iter().map(ToString::to_string).collect();
    report.pass(format!(
        "history keys: copies signed with {signer}; verified with {}{source}",
        verifiers.join(", ")
    ));
}

/// Every queue and exchange the worker declares, compared with what the
/// broker holds: present and identical, missing, or present with other
/// arguments (which `run` would refuse to start with).
async fn topology(report: &mut Report, connection: &Connection, settings: &Settings) {
    let names = Topology::new(&settings.amqp, &settings.retry.redelivery_delays_secs);
    let hint = if settings.amqp.declare_topology {
        " (the worker declares it at start: amqp.declare_topology = true)"
    } else {
        " (amqp.declare_topology = false: whoever manages the topology must declare it)"
    };
    for (object, finding) in names.compare(connection).await {
        let (what, name) = (object.what, &object.name);
        // A stream reports no ready messages: a count would read as "empty".
        let stream = names.results_log.as_ref().is_some_and(|l| &l.name == name);
        match (finding, &object.shape) {
            (Finding::Matches(_), Shape::Queue(_)) if stream => {
                report.pass(format!("{what} `{name}` present as declared"))
            }
            (Finding::Matches(ready), Shape::Queue(_)) => report.pass(format!(
                "{what} `{name}` present as declared ({ready} ready)"
            )),
            (Finding::Matches(_), Shape::Exchange(_)) => {
                report.pass(format!("{what} `{name}` present as declared"))
            }
            (Finding::Missing, _) => report.fail(format!("{what} `{name}` is missing{hint}")),
            (Finding::Differs(mismatch), _) => report.fail(mismatch),
            (Finding::Unknown(e), _) => report.fail(format!(
                "{what} `{name}` cannot be checked: {}",
                super::broker_says(&e)
            )),
        }
    }
}

/// Whether Hyperline accepts the key, asked in a way that cannot charge.
async fn api(report: &mut Report, settings: &Settings) {
    let base = settings.hyperline.base_url.as_str().trim_end_matches('/');
    // Without a key the configuration line already failed.
    let Ok(key) = settings.require_api_key().cloned() else {
        return;
    };
    let client = match HyperlineClient::new(&settings.hyperline, key) {
        Ok(client) => client,
        Err(e) => return report.fail(e),
    };
    match client.probe_credentials().await {
        ProbeResult::Accepted => report.pass(format!("Hyperline API at {base} accepts the key")),
        ProbeResult::Refused(status) => report.fail(format!(
            "Hyperline API at {base} refuses the key (HTTP {status}): check hyperline.api_key"
        )),
        ProbeResult::Unknown(why) => report.fail(format!(
            "Hyperline API at {base} gave no verdict on the key: {why}"
        )),
    }
}
