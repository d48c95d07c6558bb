//! `dead-letters purge`: removes chosen dead letters and only those.
//!
//! `rabbitmqctl purge_queue` drops every letter, the ones still waiting for
//! a replay too. This selects by command id or by error code, shows what it
//! selected with the same columns as `list`, and removes it only once
//! confirmed (`yes` on stdin, or `--yes`); `--dry-run` stops after showing.
//! The letters are held unacknowledged from the reading to the removal, so
//! what is removed is exactly what was shown; anything not selected, or a
//! removal that was not confirmed, is put back.

use std::io::BufRead;
use std::path::Path;
use std::process::ExitCode;

use lapin::message::Delivery;
use lapin::options::BasicAckOptions;

use super::dead_letter_queue::{Error, Reading, table};
use super::letter::inspect_in;
use super::output;
use crate::broker::{HistoryKeys, Topology};
use crate::cli::PurgeArgs;
use crate::configuration::Settings;

/// `dead-letters purge`. Exit status 0 when the selection was removed (or
/// shown, with `--dry-run`, or empty), 1 when the removal was not confirmed
/// or a named command id has no dead letter.
pub async fn purge(config: Option<&Path>, args: PurgeArgs) -> Result<ExitCode, Error> {
    let settings = Settings::load(config)?;
    let keys = HistoryKeys::from_settings(&settings);
    let topology = Topology::new(&settings.amqp, &settings.retry.redelivery_delays_secs);
    let connection = super::connect(&settings.amqp, "dead-letters").await?;
    let result = purge_on(&connection, &settings, &topology, &args, keys.as_ref()).await;
    super::close(&connection).await;
    let (removed, missing) = result?;
    for id in &missing {
        output::line(format_args!("no dead letter with command id {id}"));
    }
    Ok(match removed {
        Some(_) if missing.is_empty() => ExitCode::SUCCESS,
        None if args.dry_run && missing.is_empty() => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    })
}

/// Reads the queue, shows the selection, asks, removes. `None` when
/// nothing was removed on purpose (a dry run, no confirmation); the ids
/// named but not found.
async fn purge_on(
    connection: &std::sync::Arc<lapin::Connection>,
    settings: &Settings,
    topology: &Topology,
    args: &PurgeArgs,
    keys: Option<&HistoryKeys>,
) -> Result<(Option<usize>, Vec<String>), Error> {
    let (reading, held) = Reading::start(connection, settings, &topology.dead).await?;
    let (selected, kept): (Vec<_>, Vec<_>) = held
        .into_iter()
        .map(|d| {
            let info = inspect_in(topology, &d, keys);
            (d, info)
        })
        .partition(|(_, info)| match &args.code {
            Some(code) => info.error_code == Some(code.as_str()),
            None => info
                .command_id
                .as_ref()
                .is_some_and(|id| args.command_id.contains(id)),
        });
    let missing: Vec<String> = args
        .command_id
        .iter()
        .filter(|id| {
            !selected
                .iter()
                .any(|(_, i)| i.command_id.as_ref() == Some(id))
        })
        .cloned()
        .collect();
    let kept: Vec<Delivery> = kept.into_iter().map(|(d, _)| d).collect();
    reading.put_back(&kept).await?;
    let (letters, infos): (Vec<Delivery>, Vec<_>) = selected.into_iter().unzip();
    if letters.is_empty() {
        output::line(format_args!("no dead letter selected in {}", topology.dead));
        reading
            .finish("nothing to purge")
            .await
            .map_err(Error::PutBack)?;
        return Ok((Some(0), missing));
    }
    output::block(table(&infos));
    let removed = if args.dry_run {
        output::line(format_args!(
            "dry run: {} dead letter(s) would be removed from {}",
            letters.len(),
            topology.dead
        ));
        None
    } else if args.yes || confirmed(letters.len(), &topology.dead).await {
        for letter in &letters {
            if !letter.acker.ack(BasicAckOptions::default()).await? {
                return Err(Error::NotRemoved("the channel was already closed".into()));
            }
        }
        // The close answers after every ack before it: only then are the
        // letters known to be gone.
        reading.finish("purged").await.map_err(Error::NotRemoved)?;
        output::line(format_args!(
            "removed {} dead letter(s) from {}",
            letters.len(),
            topology.dead
        ));
        return Ok((Some(letters.len()), missing));
    } else {
        output::line("not confirmed: nothing removed");
        None
    };
    if removed.is_none() {
        reading.put_back(&letters).await?;
    }
    reading.finish("purged").await.map_err(Error::PutBack)?;
    Ok((removed, missing))
}

/// Asks on stderr, reads one line of stdin: only `yes` confirms. A closed
/// or empty stdin (a script that forgot `--yes`) is a no.
async fn confirmed(count: usize, queue: &str) -> bool {
    eprint!("remove these {count} dead letter(s) from {queue} for good? type yes to confirm: ");
    let answer = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).map(|_| line)
    })
    .await;
    matches!(answer, Ok(Ok(line)) if line.trim() == "yes")
}
