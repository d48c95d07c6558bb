//! The evidence rules (docs/contract.md section 7.1): when Hyperline's credit
//! transactions prove that an uncertain command was charged, or was not.
//!
//! One pure function, shared by `dead-letters reconcile` and the worker's
//! check at the window (`hyperline.reconcile_at_window`), because either one
//! acting on a wrong verdict costs a customer: a command taken as charged by
//! another command's transaction is never bought (its downstream believes it
//! was), and a charged command taken as not charged is replayed and, past
//! Hyperline's 24 hours, charged again.
//!
//! - **Not charged** only when every transaction that could be the charge
//!   ([`Matches`]: candidates and possible ones) is claimed by a `succeeded`
//!   event of another command that Hyperline itself answered. A reconciled
//!   event is a judgement, not proof: counted as proof, one wrong
//!   reconciliation would make the true owner of the charge "not charged"
//!   and replay it.
//! - **Too young** when a transaction left could still be claimed by a
//!   command that has said nothing yet: it is younger than the longest a
//!   command whose request may have charged stays with no event, no letter
//!   and no `pending` record ([`Timing::unseen`]), or the results log shows
//!   a command of the same purchase in flight (a `pending` record with no
//!   event after it). A customer's double click makes two such commands,
//!   and the first to be judged would otherwise take the other's charge.
//! - **Charged** only when exactly one transaction is left, it is a
//!   candidate, no `succeeded` event of another command claims it (answered
//!   or reconciled), it is no other letter's, and the results log covers it:
//!   the log is complete from before the transaction by the clock margin,
//!   so a `succeeded` event claiming it (published after it) would be there.
//! - **Otherwise** left for a person, with the candidates.
//! - A letter whose window has no known start, or whose listing could not
//!   be read, is never judged either way.

use std::time::Duration;

use super::matching::{Candidate, ChargeLookup, Matches};
use crate::broker::logged::{InFlight, LogEvidence, Succeeded};
use crate::clock::{millis, rfc3339_ms};
use crate::contract::{Command, Pricing};

/// One uncertain command, as the rules see it.
#[derive(Clone, Copy, Debug)]
pub struct Letter<'a> {
    /// Its command: its own `succeeded` events and `pending` records (same
    /// id, customer and purchase) are not "another command".
    pub command: &'a Command,
    /// Whether its window has a known start (its first request recorded,
    /// or bounded by the command's `timestamp`). Without one, what its
    /// window holds proves nothing: neither verdict is given.
    pub bounded: bool,
    /// What its customer's listing offers it, or why it could not be read.
    pub matches: &'a Result<Matches, String>,
}

// The rules' questions to what the results log says
// (`broker::logged`): kept with the rules, which alone ask them.
impl InFlight {
    /// Whether it could have made a charge of `command`'s purchase: the same
    /// customer, product and count, and not provably priced otherwise.
    fn could_buy(&self, command: &Command) -> bool {
        let priced_otherwise = match &command.pricing {
            Pricing::Amount(want) => self.amount.is_some_and(|a| a != *want),
            Pricing::PriceId(want) => self.price_id.as_deref().is_some_and(|p| p != want.as_str()),
        };
        self.command_id != command.id.as_str()
            && self.customer_id == command.customer_id.as_str()
            && self.product_id == command.product_id.as_str()
            && self.credit_count == command.credit_count.get()
            && !priced_otherwise
    }
}

impl LogEvidence {
    /// Whether a `succeeded` event claiming a transaction created at
    /// `created_ms` would be in the log: such an event is published after
    /// Hyperline recorded it, and their clocks may disagree by `margin`.
    fn covers(&self, created_ms: u64, margin: Duration) -> bool {
        self.complete_since_ms
            .is_some_and(|since| since.saturating_add(millis(margin)) <= created_ms)
    }

    /// The events of other commands that claim `invoice`.
    fn claims<'a>(
        &'a self,
        invoice: &'a str,
        own: &'a Command,
    ) -> impl Iterator<Item = &'a Succeeded> + 'a {
        self.succeeded
            .iter()
            .filter(move |s| s.invoice_id == invoice && !s.is_of(own))
    }

    /// Whether Hyperline answered another command with `invoice`: proof
    /// that the charge is that command's.
    fn answered_to_other(&self, invoice: Option<&str>, own: &Command) -> bool {
        invoice.is_some_and(|i| self.claims(i, own).any(|s| !s.reconciled))
    }
}

/// The clock and the bounds that say when every command that could have
/// made a transaction has spoken.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Now, Unix ms.
    pub now_ms: u64,
    /// The clock margin ([`clock_margin`](super::matching::clock_margin)).
    pub margin: Duration,
    /// The longest a command whose request may have charged stays with no
    /// event, no dead letter and no `pending` record after that request
    /// (from the configuration: `Settings::unseen_bound`).
    pub unseen: Duration,
    /// The longest a command lives after its first request before its event
    /// or its dead letter (`Settings::life_bound`): when a command in flight
    /// has answered at the latest.
    pub life: Duration,
}

/// The verdict on each letter, in order.
pub fn judge(letters: &[Letter<'_>], log: &LogEvidence, timing: Timing) -> Vec<ChargeLookup> {
    letters
        .iter()
        .map(|letter| judge_one(letter, letters, log, timing))
        .collect()
}

fn uncertain(reason: String, candidates: Vec<Candidate>) -> ChargeLookup {
    ChargeLookup::Uncertain { reason, candidates }
}

/// A transaction that could be the letter's charge and is not proven to be
/// another command's.
struct Open<'a> {
    id: &'a str,
    /// Its invoice: without one, no event can ever claim it.
    invoice: Option<&'a str>,
    created_ms: u64,
    /// Set when it is a candidate; otherwise why the rules cannot tell.
    candidate: Result<&'a Candidate, &'a str>,
}

fn judge_one(
    letter: &Letter<'_>,
    all: &[Letter<'_>],
    log: &LogEvidence,
    timing: Timing,
) -> ChargeLookup {
    let own = letter.command;
    let matches = match letter.matches {
        Ok(matches) => matches,
        Err(reason) => return uncertain(reason.clone(), Vec::new()),
    };
    if !letter.bounded {
        return uncertain(
            "its first request is unknown and nothing bounds its window: it can be proved \
             neither charged nor not charged"
                .into(),
            matches.candidates.clone(),
        );
    }
    let open: Vec<Open<'_>> = matches
        .candidates
        .iter()
        .filter(|t| !log.answered_to_other(Some(&t.invoice_id), own))
        .map(|t| Open {
            id: &t.transaction_id,
            invoice: Some(&t.invoice_id),
            created_ms: t.created_ms(),
            candidate: Ok(t),
        })
        .chain(
            matches
                .possible
                .iter()
                .filter(|p| !log.answered_to_other(p.invoice_id.as_deref(), own))
                .map(|p| Open {
                    id: &p.transaction_id,
                    invoice: p.invoice_id.as_deref(),
                    created_ms: p.created_ms,
                    candidate: Err(&p.why),
                }),
        )
        .collect();
    if open.is_empty() {
        return ChargeLookup::NotCharged;
    }
    let shown: Vec<Candidate> = open
        .iter()
        .filter_map(|o| o.candidate.ok().cloned())
        .collect();
    if let Some(waiting) = unheard(own, &open, log, timing, &shown) {
        return waiting;
    }
    let t = match open.as_slice() {
        [one] => one,
        several => {
            return uncertain(
                format!(
                    "{} transactions could be its charge: cannot tell which",
                    several.len()
                ),
                shown,
            );
        }
    };
    let t = match t.candidate {
        Ok(t) => t,
        Err(why) => {
            return uncertain(
                format!(
                    "transaction {} could be its charge, but the rules cannot tell ({why})",
                    t.id
                ),
                shown,
            );
        }
    };
    let reconciled: Vec<&str> = log
        .claims(&t.invoice_id, own)
        .map(|s| s.command_id.as_str())
        .collect();
    if !reconciled.is_empty() {
        return uncertain(
            format!(
                "{} is claimed by the reconciled succeeded event of {}: a person must tell \
                 whose charge it is",
                t.transaction_id,
                reconciled.join(", ")
            ),
            shown,
        );
    }
    let shared: Vec<&str> = all
        .iter()
        .filter(|other| other.command.id != own.id)
        .filter(|other| {
            other.matches.as_ref().is_ok_and(|m| {
                m.possible
                    .iter()
                    .any(|p| p.transaction_id == t.transaction_id)
                    || m.candidates
                        .iter()
                        .any(|c| c.transaction_id == t.transaction_id)
            })
        })
        .map(|other| other.command.id.as_str())
        .collect();
    if !shared.is_empty() {
        return uncertain(
            format!(
                "{} could also be the charge of {}",
                t.transaction_id,
                shared.join(", ")
            ),
            shown,
        );
    }
    if !log.covers(t.created_ms(), timing.margin) {
        return uncertain(
            format!(
                "no results log covers {} (created {}): another command's succeeded event \
                 could claim it",
                t.transaction_id,
                rfc3339_ms(t.created_ms()).unwrap_or_default()
            ),
            shown,
        );
    }
    ChargeLookup::Charged(t.clone())
}

/// [`ChargeLookup::TooYoung`] when a command that could claim one of the
/// `open` transactions may not have spoken yet; uncertain when the log shows
/// one in flight past the longest it can live (lost: its dead letter has no
/// event, or its record outlived it), which no later run would change.
fn unheard(
    own: &Command,
    open: &[Open<'_>],
    log: &LogEvidence,
    timing: Timing,
    shown: &[Candidate],
) -> Option<ChargeLookup> {
    // A transaction no event can claim keeps the letter uncertain, however
    // long a run waits.
    if open.iter().any(|o| o.invoice.is_none()) {
        return None;
    }
    let margin = millis(timing.margin);
    let youngest = open.iter().map(|o| o.created_ms).max()?;
    let spoken_ms = youngest
        .saturating_add(millis(timing.unseen))
        .saturating_add(margin);
    // A command whose first request came after a transaction (by more than
    // the clocks' disagreement) cannot have made it.
    let in_flight: Vec<(&InFlight, u64)> = log
        .in_flight
        .iter()
        .filter(|c| c.could_buy(own))
        .filter(|c| {
            open.iter()
                .any(|o| c.first_attempt_ms <= o.created_ms.saturating_add(margin))
        })
        .map(|c| {
            let answered_ms = c
                .first_attempt_ms
                .saturating_add(millis(timing.life))
                .saturating_add(margin);
            (c, answered_ms)
        })
        .collect();
    let ids = |list: &[(&InFlight, u64)]| {
        list.iter()
            .map(|(c, _)| c.command_id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (lost, flying): (Vec<_>, Vec<_>) = in_flight
        .into_iter()
        .partition(|(_, answered_ms)| *answered_ms <= timing.now_ms);
    if !lost.is_empty() {
        return Some(uncertain(
            format!(
                "the results log shows {} of the same purchase pending with no event past the                  longest a command lives: a person must find what became of it",
                ids(&lost)
            ),
            shown.to_vec(),
        ));
    }
    if spoken_ms <= timing.now_ms && flying.is_empty() {
        return None;
    }
    let after = flying
        .iter()
        .map(|(_, answered_ms)| *answered_ms)
        .fold(spoken_ms, u64::max);
    let mut why = Vec::new();
    if spoken_ms > timing.now_ms {
        why.push(format!(
            "a transaction that could be its charge is younger than the {} s another command \
             that made it could stay unanswered",
            (spoken_ms - youngest) / 1000
        ));
    }
    if !flying.is_empty() {
        why.push(format!(
            "the same purchase is still in flight (pending: {})",
            ids(&flying)
        ));
    }
    Some(ChargeLookup::TooYoung {
        run_again_after_ms: after,
        reason: format!(
            "{}; run again after {}",
            why.join("; "),
            rfc3339_ms(after).unwrap_or_default()
        ),
        candidates: shown.to_vec(),
    })
}

#[cfg(test)]
mod tests;
