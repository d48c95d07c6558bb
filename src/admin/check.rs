//! `check`: is this replica's world in order? One ✓/✗ line per fact.
//!
//! A worker that does not start, or starts and buys nothing, has one of four
//! causes: a bad setting, an unreachable broker, missing queues (where the
//! topology is managed outside the worker), or a refused API key. This tells
//! them apart in seconds, before a deploy or during an incident, without
//! consuming or buying anything: the queues are probed with passive
//! declarations and the key with a request that cannot charge. The key and
//! the broker password are never printed.

use std::path::Path;
use std::process::ExitCode;

use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ExchangeKind};

use crate::broker::{Topology, redacted_url};
use crate::configuration::Settings;
use crate::hyperline::{HyperlineClient, ProbeResult};

/// Prints the lines and remembers whether any check failed.
#[derive(Default)]
struct Report {
    failed: bool,
}

impl Report {
    fn pass(&mut self, line: impl std::fmt::Display) {
        println!("✓ {line}");
    }

    fn fail(&mut self, line: impl std::fmt::Display) {
        self.failed = true;
        println!("✗ {line}");
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
        Ok(settings) => {
            report.pass("configuration is valid");
            settings
        }
        Err(e) => {
            report.fail(e);
            return report.exit_code();
        }
    };
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

/// Passive declarations of every name the worker uses. Each runs on a fresh
/// channel, because a failed one closes its channel.
async fn topology(report: &mut Report, connection: &Connection, settings: &Settings) {
    let names = Topology::new(&settings.amqp, &settings.retry.redelivery_delays_secs);
    let hint = if settings.amqp.declare_topology {
        " (the worker declares it at start: amqp.declare_topology = true)"
    } else {
        " (amqp.declare_topology = false: whoever manages the topology must declare it)"
    };
    let mut queues = vec![
        ("commands queue", names.queue.clone()),
        ("dead-letter queue", names.dead.clone()),
    ];
    queues.extend(
        names
            .delay_queues()
            .map(|(_, name)| ("delay queue", name.clone())),
    );
    for (what, name) in queues {
        match queue_ready(connection, &name).await {
            Ok(ready) => report.pass(format!("{what} `{name}` present ({ready} ready)")),
            Err(e) => report.fail(missing(what, &name, &e, hint)),
        }
    }
    for (what, name, kind) in [
        ("commands exchange", &names.queue, ExchangeKind::Direct),
        ("dead-letter exchange", &names.dlx, ExchangeKind::Fanout),
        (
            "results exchange",
            &names.results_exchange,
            ExchangeKind::Topic,
        ),
    ] {
        match exchange_exists(connection, name, kind).await {
            Ok(()) => report.pass(format!("{what} `{name}` present")),
            Err(e) => report.fail(missing(what, name, &e, hint)),
        }
    }
}

/// The line for a name whose passive declaration failed.
fn missing(what: &str, name: &str, e: &lapin::Error, hint: &str) -> String {
    if super::is_not_found(e) {
        format!("{what} `{name}` is missing{hint}")
    } else {
        format!(
            "{what} `{name}` cannot be checked: {}",
            super::broker_says(e)
        )
    }
}

/// Messages ready in a queue, if it exists.
async fn queue_ready(connection: &Connection, name: &str) -> Result<u32, lapin::Error> {
    let channel = connection.create_channel().await?;
    let options = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let queue = channel
        .queue_declare(name.into(), options, FieldTable::default())
        .await?;
    let _ = channel.close(200, "checked".into()).await;
    Ok(queue.message_count())
}

/// Whether an exchange exists (a passive declaration ignores the kind).
async fn exchange_exists(
    connection: &Connection,
    name: &str,
    kind: ExchangeKind,
) -> Result<(), lapin::Error> {
    let channel = connection.create_channel().await?;
    let options = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(name.into(), kind, options, FieldTable::default())
        .await?;
    let _ = channel.close(200, "checked".into()).await;
    Ok(())
}

/// Whether Hyperline accepts the key, asked in a way that cannot charge.
async fn api(report: &mut Report, settings: &Settings) {
    let base = settings.hyperline.base_url.as_str().trim_end_matches('/');
    let key = match settings.require_api_key() {
        Ok(key) => key.clone(),
        Err(e) => return report.fail(e),
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
