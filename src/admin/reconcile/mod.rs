//! `dead-letters reconcile`: for each dead letter whose charge is uncertain,
//! decide from evidence whether it was charged, and act only on what the
//! evidence proves (docs/contract.md section 7).
//!
//! A run goes [`select`] (the uncertain letters and their customers'
//! credit transactions) → [`judge`] (the evidence rules, with the results
//! log) → [`act`] (publish, replay or remove, every broker answer checked)
//! → [`render`]. A dry run by default: it reads, prints what it would do,
//! and puts every dead letter back.

pub mod act;
pub mod judge;
pub mod render;
pub mod select;

use std::path::Path;
use std::process::ExitCode;

use lapin::Connection;

use super::ConnectError;
use super::dead_letter_queue::Reading;
use crate::broker::{HistoryKeys, Topology};
use crate::cli::ReconcileArgs;
use crate::configuration::{ConfigError, Settings};
use crate::hyperline::evidence::Timing;
use crate::hyperline::matching::clock_margin;
use crate::hyperline::{ClientError, HyperlineClient};
use act::Acting;
use render::{Report, Status};

/// Why the run could not be done.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The settings could not be loaded, or name no API key.
    #[error("{0}")]
    Config(ConfigError),
    /// The Hyperline client could not be built.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The broker could not be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The dead-letter queue could not be read, or a letter put back.
    #[error(transparent)]
    DeadLetters(#[from] super::dead_letter_queue::Error),
    /// A channel operation failed.
    #[error("broker error: {}", super::broker_says(.0))]
    Broker(lapin::Error),
}

super::wrap_error!(Error::Config(ConfigError));
super::wrap_error!(Error::Broker(lapin::Error));

/// `dead-letters reconcile`. Exit status 0 when nothing is left for a
/// person, 1 when a letter is, 2 when an action was not done (or the run
/// failed).
pub async fn run(config: Option<&Path>, args: ReconcileArgs) -> Result<ExitCode, Error> {
    let settings = Settings::load(config)?;
    let key = settings.require_api_key()?.clone();
    let client = HyperlineClient::new(&settings.hyperline, key)?;
    let topology = Topology::new(&settings.amqp, &settings.retry.redelivery_delays_secs);
    let connection = super::connect(&settings.amqp, "dead-letters reconcile").await?;
    let result = reconcile_on(&connection, &settings, &topology, &client, args.apply).await;
    super::close(&connection).await;
    let report = result?;
    if args.json {
        if let Some(note) = &report.log_note {
            eprintln!("note: {note}");
        }
        for row in &report.rows {
            println!("{}", serde_json::to_string(row).unwrap_or_default());
        }
    } else {
        print!("{}", render::render(&report, &topology.dead, args.apply));
    }
    Ok(ExitCode::from(report.exit_code()))
}

/// Reads the dead letters, judges the uncertain ones, acts (with `apply`)
/// and puts back everything not acted on.
async fn reconcile_on(
    connection: &std::sync::Arc<Connection>,
    settings: &Settings,
    topology: &Topology,
    client: &HyperlineClient,
    apply: bool,
) -> Result<Report, Error> {
    let keys = &HistoryKeys::require(settings)?;
    let (reading, held) = Reading::start(connection, settings, &topology.dead).await?;
    let (letters, mut keep) = select::split(held, keys);
    let listings = select::read_listings(client, settings, &letters).await;
    let margin = clock_margin(settings.idempotency_window());
    let now = crate::clock::now_ms();
    let log = judge::read_log(connection, topology, &letters, margin, now).await;
    let mut report = Report {
        others: keep.len(),
        listings: listings.len(),
        log_note: log.note.clone(),
        margin_secs: margin.as_secs(),
        ..Report::default()
    };
    let acting = Acting {
        publisher: reading.publisher(),
        topology,
        apply,
        keys,
    };
    let timing = Timing {
        now_ms: now,
        margin,
        unseen: settings.unseen_bound(),
        life: settings.life_bound(),
    };
    for judged in judge::judge(letters, &listings, &log.evidence, timing) {
        let (row, stays) = acting.act(judged).await;
        keep.extend(stays);
        report.rows.push(row);
    }
    let put = reading.put_back(&keep).await;
    if let Err(e) = reading.finish("reconciled").await {
        for row in report.rows.iter_mut().filter(|r| r.status == Status::Done) {
            row.status = Status::NotDone;
            row.applied = false;
            row.reason = Some(format!(
                "its removal was not confirmed ({e}): it may come back; a second run is safe"
            ));
        }
    }
    put?;
    Ok(report)
}
