//! The lanes scenario's traffic: interactive commands published one a
//! second, or both lanes filled at once, and every event as it arrives.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use cpw_testkit::broker::{as_command, send};
use cpw_testkit::commands::{command, command_id};
use lapin::BasicProperties;

use crate::broker::Broker;
use crate::run::Run;

/// An event the observer saw during a phase.
pub struct Event {
    pub at: Instant,
    /// When its command was published, for an interactive command (the
    /// phase's bulk commands are not timed).
    pub published: Option<Instant>,
}

/// Publishes `interactive` commands to `queue`, one a second, timing each
/// from just before its `basic.publish`, and collects events until every
/// one of them and `bulk` other events have arrived (or the phase's
/// deadline has passed).
pub async fn paced(
    run: &mut Run,
    broker: &Broker,
    queue: &str,
    interactive: usize,
    bulk: usize,
) -> Result<Vec<Event>> {
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let publisher = {
        let sent = Arc::clone(&sent);
        let channel = broker.channel.clone();
        let queue = queue.to_owned();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut confirms = Vec::with_capacity(interactive);
            for _ in 0..interactive {
                tick.tick().await;
                let id = command_id();
                let body = command(&id).to_string();
                lock(&sent).insert(id, Instant::now());
                let properties = as_command(BasicProperties::default());
                confirms.push(send(&channel, &queue, body.as_bytes(), properties).await?);
            }
            for c in confirms {
                if !c.await?.is_ack() {
                    bail!("a command was not confirmed");
                }
            }
            Ok::<(), anyhow::Error>(())
        })
    };
    // Slack for a single queue, where the interactive commands wait behind
    // the whole bulk backlog: far more than it takes at the scaled limit.
    let limit = Duration::from_secs(interactive as u64 + bulk as u64 / 10 + 60);
    let events = collect(run, interactive, bulk, limit, |id| lock(&sent).remove(id)).await;
    publisher.await??;
    Ok(events)
}

/// Publishes `n` interactive and `n` bulk commands, alternating, and waits
/// for their events. Returns the interactive commands' ids, by which the
/// ledger's charges tell the lanes apart.
pub async fn contended(
    run: &mut Run,
    broker: &Broker,
    interactive_queue: &str,
    bulk_queue: &str,
    n: usize,
) -> Result<HashSet<String>> {
    let mut interactive = HashSet::with_capacity(n);
    let mut confirms = Vec::with_capacity(2 * n);
    for _ in 0..n {
        for (queue, is_interactive) in [(interactive_queue, true), (bulk_queue, false)] {
            let id = command_id();
            let body = command(&id).to_string();
            if is_interactive {
                interactive.insert(id);
            }
            let properties = as_command(BasicProperties::default());
            confirms.push(send(&broker.channel, queue, body.as_bytes(), properties).await?);
        }
    }
    for c in confirms {
        if !c.await?.is_ack() {
            bail!("a command was not confirmed");
        }
    }
    let limit = Duration::from_secs(2 * n as u64 / 10 + 60);
    let published = Instant::now();
    collect(run, n, n, limit, |id| {
        interactive.contains(id).then_some(published)
    })
    .await;
    Ok(interactive)
}

/// Events until `interactive` of them are timed by `timed` (it gives their
/// publish instant) and `bulk` others have arrived, or `limit` has passed.
async fn collect(
    run: &mut Run,
    interactive: usize,
    bulk: usize,
    limit: Duration,
    mut timed: impl FnMut(&str) -> Option<Instant>,
) -> Vec<Event> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut events = Vec::with_capacity(interactive + bulk);
    let (mut timed_seen, mut others) = (0, 0);
    while timed_seen < interactive || others < bulk {
        let Ok(Some(seen)) = tokio::time::timeout_at(deadline, run.events.recv()).await else {
            eprintln!(
                "  warning: {timed_seen} of {interactive} interactive and {others} of {bulk} bulk events arrived"
            );
            break;
        };
        if !seen.succeeded {
            eprintln!("  warning: a failed event");
        }
        let published = seen.command_id.as_deref().and_then(&mut timed);
        match published {
            Some(_) => timed_seen += 1,
            None => others += 1,
        }
        events.push(Event {
            at: seen.at,
            published,
        });
    }
    events
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
