//! `dead-letters list` and `dead-letters replay`: the operator's side of the
//! dead-letter queue (`<queue>.dead`).
//!
//! Invalid commands, exhausted ones and unexpected answers end there "for an
//! operator to look" (docs/contract.md section 3); these are the looking and the
//! putting back, on a [`Reading`] of the queue (see
//! [`dead_letter_queue`](super::dead_letter_queue): how a letter is read and
//! put back without wearing it out).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use lapin::Connection;
use lapin::options::BasicAckOptions;

use super::dead_letter_queue::{Reading, table};
use super::lane::home;
use super::letter::{DeadLetterInfo, Window, inspect_in, replay_properties, window};
use super::output;
use crate::broker::{HistoryKeys, Topology};
use crate::cli::{ListArgs, ReplayArgs};
use crate::configuration::Settings;

pub use super::dead_letter_queue::Error;

/// `dead-letters list`: prints a table (or JSON lines) and puts every message back.
pub async fn list(config: Option<&Path>, args: ListArgs) -> Result<ExitCode, Error> {
    let settings = Settings::load(config)?;
    let keys = HistoryKeys::from_settings(&settings);
    let topology = Topology::new(&settings.amqp, &settings.retry.redelivery_delays_secs);
    let connection = super::connect(&settings.amqp, "dead-letters").await?;
    let result = async {
        let (reading, held) = Reading::start(&connection, &settings, &topology.dead).await?;
        let infos: Vec<DeadLetterInfo> = held
            .iter()
            .map(|d| inspect_in(&topology, d, keys.as_ref()))
            .collect();
        reading.put_back(&held).await?;
        reading.finish("listed").await.map_err(Error::PutBack)?;
        Ok::<_, Error>(infos)
    }
    .await;
    super::close(&connection).await;
    let infos = result?;
    if infos.is_empty() {
        output::line(format_args!("dead-letter queue {} is empty", topology.dead));
    } else if args.json {
        for info in &infos {
            output::line(serde_json::to_string(info).unwrap_or_default());
        }
    } else {
        output::block(table(&infos));
        output::line(format_args!(
            "{} dead letter(s) in {}",
            infos.len(),
            topology.dead
        ));
        let strays = infos.iter().filter(|i| i.lane.is_none()).count();
        if strays > 0 {
            output::line(format_args!(
                "{strays} of them came from no configured lane's queue (LANE -): a replay puts \
                 them in the first lane, `{}`",
                topology.lane(0).name
            ));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `dead-letters replay`: republishes the selected dead letters, each to
/// its own lane's commands queue. Exit status 1 when one was refused or not
/// found.
pub async fn replay(config: Option<&Path>, args: ReplayArgs) -> Result<ExitCode, Error> {
    let settings = Settings::load(config)?;
    let topology = Topology::new(&settings.amqp, &settings.retry.redelivery_delays_secs);
    let connection = super::connect(&settings.amqp, "dead-letters").await?;
    let result = replay_on(&connection, &settings, &topology, &args).await;
    super::close(&connection).await;
    let tally = result?;
    if tally.seen == 0 {
        output::line(format_args!("dead-letter queue {} is empty", topology.dead));
    }
    for id in &tally.not_found {
        output::line(format_args!("no dead letter with command id {id}"));
    }
    output::line(format_args!(
        "replayed {}, skipped {}",
        tally.replayed, tally.skipped
    ));
    if topology.named_lanes && !tally.lanes.is_empty() {
        let lanes: Vec<String> = tally
            .lanes
            .iter()
            .map(|(lane, n)| format!("{lane} {n}"))
            .collect();
        output::line(format_args!("replayed into lanes: {}", lanes.join(", ")));
    }
    if tally.invalid > 0 {
        output::line(format_args!(
            "left {} invalid command(s) in {}: they can never succeed; their publisher must \
             send a corrected command (remove them with `dead-letters purge --code invalid_command`)",
            tally.invalid, topology.dead
        ));
    }
    // Invalid commands left behind by `--all` are not a failure of the
    // replay: nothing could be done with them.
    let clean = tally.skipped == 0 && tally.not_found.is_empty();
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// What a replay did.
#[derive(Default)]
struct Tally {
    seen: usize,
    replayed: usize,
    /// Selected but refused (the window, or an invalid command named by id).
    skipped: usize,
    /// Invalid commands passed over by `--all`.
    invalid: usize,
    not_found: Vec<String>,
    /// How many went back to each lane, by name.
    lanes: BTreeMap<String, usize>,
}

/// Why a selected letter is not replayed, if it is not: an invalid
/// command would only die again; a window that may have closed needs
/// `--force`.
fn not_replayed(
    info: &DeadLetterInfo,
    id: &str,
    force: bool,
    now: u64,
    budget: std::time::Duration,
) -> Option<String> {
    let invalid = info
        .invalid_reason
        .as_ref()
        .map(|reason| format!("not a valid command ({reason}): it would only die again"));
    invalid.or_else(|| match force {
        true => None,
        false => refusal(id, window(info, now, budget)),
    })
}

/// Reads the dead letters, republishes the selected ones (acking each dead
/// letter only once its copy is confirmed), and puts the rest back.
async fn replay_on(
    connection: &Arc<Connection>,
    settings: &Settings,
    topology: &Topology,
    args: &ReplayArgs,
) -> Result<Tally, Error> {
    let keys = &HistoryKeys::require(settings)?;
    let (reading, held) = Reading::start(connection, settings, &topology.dead).await?;
    let mut tally = Tally {
        seen: held.len(),
        ..Tally::default()
    };
    let mut found = Vec::new();
    let mut keep = Vec::new();
    let mut failure = None;
    let now = crate::clock::now_ms();
    let budget = settings.worker.delivery_deadline();
    for delivery in held {
        let info = inspect_in(topology, &delivery, Some(keys));
        let id = info.command_id.clone().unwrap_or_else(|| "-".to_owned());
        let selected = args.all || args.command_id.contains(&id);
        if !selected || failure.is_some() {
            keep.push(delivery);
            continue;
        }
        found.push(id.clone());
        // An invalid command would only be dead-lettered again: it needs a
        // corrected copy from its publisher, not a replay. `--all` passes
        // over it (and says so once at the end); one named by id is refused.
        if info.invalid_reason.is_some() && args.command_id.is_empty() {
            tally.invalid += 1;
            keep.push(delivery);
            continue;
        }
        if let Some(why) = not_replayed(&info, &id, args.force, now, budget) {
            eprintln!("skipped {id}: {why}");
            tally.skipped += 1;
            keep.push(delivery);
            continue;
        }
        let properties = replay_properties(
            &delivery.properties,
            &delivery.data,
            info.first_attempt_ms,
            args.force,
            keys,
        );
        // Back to its own lane, never another's (see `lane`).
        let home = home(topology, info.queue.as_deref());
        match reading
            .publisher()
            .publish_routed("", &home.lane.queue, &delivery.data, properties)
            .await
        {
            // Acked only now: until the copy is confirmed, the dead letter is
            // the only copy there is.
            Ok(()) => match delivery.acker.ack(BasicAckOptions::default()).await {
                Ok(true) => {
                    tally.replayed += 1;
                    *tally.lanes.entry(home.lane.name.clone()).or_default() += 1;
                    if let Some(note) = home.note(&id) {
                        eprintln!("{note}");
                    }
                }
                // The copy is queued and the dead letter will come back: a
                // duplicate, which the Idempotency-Key makes harmless, but
                // the replay is not done as asked.
                Ok(false) => {
                    failure = Some(Error::PutBack("the channel was already closed".into()))
                }
                Err(e) => failure = Some(Error::Broker(e)),
            },
            Err(cause) => {
                failure = Some(Error::Replay { id, cause });
                keep.push(delivery);
            }
        }
    }
    reading.put_back(&keep).await?;
    let finished = reading.finish("replayed").await;
    if let Some(e) = failure {
        return Err(e);
    }
    // A replayed letter's ack not known to be in: the letter may come back
    // beside its replayed copy.
    finished.map_err(Error::PutBack)?;
    tally.not_found = args
        .command_id
        .iter()
        .filter(|id| !found.contains(id))
        .cloned()
        .collect();
    Ok(tally)
}

/// Why a command must not be replayed without `--force`, if it must not.
fn refusal(id: &str, window: Window) -> Option<String> {
    let consequence =
        "a replay could charge the customer twice; check the ledger, then use --force";
    match window {
        Window::Open => None,
        Window::Closed(age) => Some(format!(
            "Hyperline's 24-hour idempotency window has passed for {id} (first attempted {} ago): \
             {consequence}",
            super::human(age)
        )),
        Window::Unknown => Some(format!(
            "the first attempt of {id} is unknown (no cpw-first-attempt-ms, no x-death), so \
             Hyperline's 24-hour idempotency window may have passed: {consequence}"
        )),
        Window::FirstUnknown { before_ms } => Some(format!(
            "{id} may have charged, first request unknown (a delivery may have been cut short \
             mid-request before {}), so Hyperline's 24-hour idempotency window may have \
             passed: run `dead-letters reconcile`, or {consequence}",
            crate::clock::rfc3339_ms(before_ms).unwrap_or_else(|| "-".to_owned())
        )),
    }
}
