//! `events`: read the results log (docs/contract.md section 7).
//!
//! Two people need it. An operator at 3 a.m. asks what happened to one
//! command (`--command-id`), after the worker that handled it restarted and
//! its logs scrolled away; a downstream team replays the results it missed
//! during an outage (`--since 2h`, `--from <time>`, `--json`). Both want the
//! command to end by itself once it has read everything there is, and not
//! before, which a stream never says: see
//! [`results_log`](crate::broker::results_log).

use std::path::Path;
use std::process::ExitCode;

use serde_json::Value;

use super::{ConnectError, output};
use crate::broker::results_log::{Entry, LogError, Reader, Start, read_to_end};
use crate::cli::EventsArgs;
use crate::clock::{millis, now_ms, rfc3339_ms};
use crate::configuration::{ConfigError, DEFAULT_LANE, Settings};

/// Why the log could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The settings could not be loaded.
    #[error("{0}")]
    Config(ConfigError),
    /// The broker could not be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// No log is kept (`amqp.results_log_retention = 0`).
    #[error("no results log is kept (amqp.results_log_retention = 0): there is nothing to read")]
    NoLog,
    /// The log is missing, or the read failed.
    #[error(transparent)]
    Log(#[from] LogError),
}

super::wrap_error!(Error::Config(ConfigError));

/// `events`. Exit status 0; 1 when `--command-id` found nothing, or the
/// start lies before what the log keeps.
pub async fn run(config: Option<&Path>, args: EventsArgs) -> Result<ExitCode, Error> {
    let settings = Settings::load(config)?;
    let retention = settings.amqp.results_log_retention().ok_or(Error::NoLog)?;
    let kept = settings.amqp.results_log_retention.trim().to_owned();
    let log = format!("{}.log", settings.amqp.results_exchange);
    let now = now_ms();
    let from_ms = match (args.since, args.from) {
        (Some(ago), _) => Some(now.saturating_sub(millis(ago))),
        (None, Some(at)) => Some(u64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)),
        (None, None) => None,
    };
    let mut incomplete = false;
    if let Some(from) = from_ms
        && from < now.saturating_sub(millis(retention))
    {
        incomplete = true;
        eprintln!(
            "the results log keeps {kept} of events (amqp.results_log_retention): what was \
             published before {} is gone; printing what it still holds",
            rfc3339_ms(now.saturating_sub(millis(retention))).unwrap_or_default()
        );
    }
    if let Some(lane) = &args.lane {
        let lanes = settings.amqp.lanes();
        if !lanes.iter().any(|l| &l.name == lane) {
            let names: Vec<&str> = lanes.iter().map(|l| l.name.as_str()).collect();
            eprintln!(
                "note: no lane `{lane}` is configured (lanes: {}); printing the events the log \
                 holds of it, if any",
                names.join(", ")
            );
        }
    }
    let connection = super::connect(&settings.amqp, "events").await?;
    let read = read(&connection, &log, from_ms, &args).await;
    super::close(&connection).await;
    let printed = read?;
    let missing = args.command_id.as_ref().filter(|_| printed == 0);
    if let Some(id) = missing {
        eprintln!(
            "no event of command {id} in {log} (it keeps {kept}): not published yet, or not a \
             command this worker saw"
        );
    }
    Ok(match incomplete || missing.is_some() {
        true => ExitCode::from(1),
        false => ExitCode::SUCCESS,
    })
}

/// Prints the selected entries to the end of the log, then (following)
/// every new one; gives how many were printed.
async fn read(
    connection: &lapin::Connection,
    log: &str,
    from_ms: Option<u64>,
    args: &EventsArgs,
) -> Result<usize, Error> {
    let start = from_ms.map_or(Start::First, |ms| Start::At(ms / 1000));
    let entries = read_to_end(connection, log, start).await?;
    let next = entries
        .last()
        .and_then(|e| e.offset)
        .map_or(Start::Next, |o| Start::Offset(o.saturating_add(1)));
    let mut printed = 0;
    for entry in &entries {
        printed += usize::from(print(entry, from_ms, args));
    }
    if !args.json {
        eprintln!("{printed} event(s); caught up with {log}");
    }
    if args.follow {
        let mut reader = Reader::open(connection, log, next).await?;
        while let Some(entry) = reader.next(None).await? {
            printed += usize::from(print(&entry, from_ms, args));
        }
    }
    Ok(printed)
}

/// Prints `entry` when it is selected; whether it was.
fn print(entry: &Entry, from_ms: Option<u64>, args: &EventsArgs) -> bool {
    // A timestamp starts at the chunk that holds it, which may begin a
    // little earlier.
    if from_ms.is_some_and(|from| entry.at_ms.is_some_and(|at| at < from)) {
        return false;
    }
    let wanted = match &args.command_id {
        None => true,
        Some(id) => entry
            .event
            .as_ref()
            .and_then(|e| e.command_id.as_deref())
            .is_some_and(|c| c == id),
    };
    let wanted = wanted
        && args
            .lane
            .as_deref()
            .is_none_or(|lane| lane_of(entry) == lane);
    if wanted {
        match args.json {
            true => output::line(String::from_utf8_lossy(&entry.body)),
            false => output::line(describe(&entry.body, entry.at_ms, entry.lane.as_deref())),
        }
    }
    wanted
}

/// The lane of an entry's command: its `cpw-lane`, or, for an event that
/// names none (published without `amqp.lanes`), the one lane such a
/// configuration has.
fn lane_of(entry: &Entry) -> &str {
    entry.lane.as_deref().unwrap_or(DEFAULT_LANE)
}

/// One event (or `pending` record) on one line: when, what, which
/// command (and its lane, when the event names one), and the outcome.
fn describe(body: &[u8], at_ms: Option<u64>, lane: Option<&str>) -> String {
    let at = at_ms.and_then(rfc3339_ms).unwrap_or_else(|| "-".into());
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return format!("{at}  (not an event: {} bytes)", body.len());
    };
    let text = |key: &str| v[key].as_str().unwrap_or("-").to_owned();
    let kind = text("type");
    let kind = kind.strip_prefix("credit_purchase.").unwrap_or(&kind);
    let mut line = format!(
        "{at}  {kind:<9}  command_id={}  customer_id={}  attempts={}",
        text("command_id"),
        text("customer_id"),
        v["attempts"]
    );
    if let Some(lane) = lane {
        line.push_str(&format!("  lane={lane}"));
    }
    if let Some(invoice) = v["invoice_id"].as_str() {
        line.push_str(&format!(
            "  invoice_id={invoice}  new_credit_balance={}",
            v["new_credit_balance"]
        ));
    }
    if v["reconciled"] == Value::Bool(true) {
        line.push_str("  reconciled");
    }
    if let Some(first) = v["first_attempt_at"].as_str() {
        line.push_str(&format!(
            "  first_attempt_at={first}: in flight, a request may have charged"
        ));
    }
    if let Some(error) = v["error"].as_object() {
        let status = error
            .get("http_status")
            .filter(|s| !s.is_null())
            .map(|s| format!(" (HTTP {s})"))
            .unwrap_or_default();
        line.push_str(&format!(
            "  {}{status}: {}",
            error.get("code").and_then(Value::as_str).unwrap_or("-"),
            error.get("message").and_then(Value::as_str).unwrap_or("-"),
        ));
    }
    line
}
