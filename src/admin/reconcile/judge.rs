//! Judge: the verdict on each uncertain letter, by the evidence rules
//! ([`evidence::judge`]) the worker's check at the window uses too, from the
//! letters' candidates and the results log.
//!
//! One rule is the run's own: a letter whose command has a `succeeded`
//! event in the results log is done already (a second run after a removal
//! that failed, or a command bought on another delivery). It is removed
//! and nothing is published or replayed: replaying it would buy it again,
//! outside any window its letter knows of. "Its command" means the same
//! id for the same customer and purchase: an id another customer's
//! publisher reused says nothing of this letter, and taking its event for
//! this one's would remove the letter with nothing published.

use std::time::Duration;

use lapin::Connection;

use super::select::{Letter, Listings};
use crate::broker::Topology;
use crate::broker::logged::LogEvidence;
use crate::broker::results_log;
use crate::hyperline::evidence::{self, Timing};
use crate::hyperline::matching::{ChargeLookup, Matches, candidates};

/// What to do with a letter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Its command's `succeeded` event is in the results log.
    AlreadySucceeded,
    /// What the evidence rules say.
    Lookup(ChargeLookup),
}

/// A letter and its verdict.
pub struct Judged {
    pub letter: Letter,
    /// What to do with it.
    pub verdict: Verdict,
}

/// The results log as read for a run, and what an operator must know when
/// it could not vouch for anything.
#[derive(Default)]
pub struct LogRead {
    /// Its claims and reach.
    pub evidence: LogEvidence,
    /// Why it proves nothing, when it does not.
    pub note: Option<String>,
}

/// Reads the results log from the earliest window (widened by `margin`) on.
pub async fn read_log(
    connection: &Connection,
    topology: &Topology,
    letters: &[Letter],
    margin: Duration,
    now_ms: u64,
) -> LogRead {
    let Some(log) = &topology.results_log else {
        return LogRead {
            evidence: LogEvidence::default(),
            note: Some(
                "no results log (amqp.results_log_retention = 0): no dead letter is settled as \
                 charged"
                    .into(),
            ),
        };
    };
    let Some(from_ms) = letters
        .iter()
        .filter_map(|l| l.span(now_ms))
        .map(|s| s.from_ms)
        .min()
    else {
        return LogRead::default();
    };
    let margin_ms = u64::try_from(margin.as_millis()).unwrap_or(u64::MAX);
    match results_log::evidence(connection, &log.name, from_ms.saturating_sub(margin_ms)).await {
        Ok(evidence) => LogRead {
            evidence,
            note: None,
        },
        Err(e) => LogRead {
            evidence: LogEvidence::default(),
            note: Some(format!("{e}: no dead letter is settled as charged")),
        },
    }
}

/// The verdict on each letter, at `timing` (its margin widens the windows).
pub fn judge(
    letters: Vec<Letter>,
    listings: &Listings,
    log: &LogEvidence,
    timing: Timing,
) -> Vec<Judged> {
    let matches: Vec<Result<Matches, String>> = letters
        .iter()
        .map(|letter| {
            let span = letter
                .span(timing.now_ms)
                .ok_or("no cpw-first-attempt-ms: the window to search is unknown")?;
            match listings.get(&letter.pair()) {
                Some(Ok(listing)) => Ok(candidates(&letter.command, listing, span, timing.margin)),
                Some(Err(e)) => Err(e.clone()),
                None => Err("the listing was not read".into()),
            }
        })
        .collect();
    let evidence_of: Vec<evidence::Letter<'_>> = letters
        .iter()
        .zip(&matches)
        .map(|(letter, matches)| evidence::Letter {
            command: &letter.command,
            bounded: letter.bounded(),
            matches,
        })
        .collect();
    let lookups = evidence::judge(&evidence_of, log, timing);
    letters
        .into_iter()
        .zip(lookups)
        .map(|(letter, lookup)| {
            let verdict = match log.succeeded.iter().any(|s| s.is_of(&letter.command)) {
                true => Verdict::AlreadySucceeded,
                false => Verdict::Lookup(lookup),
            };
            Judged { letter, verdict }
        })
        .collect()
}
