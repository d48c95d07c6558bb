//! The evidence rules (docs/contract.md section 7): when Hyperline's credit
//! transactions prove that an uncertain command was charged, or was not.
//!
//! One pure function, shared by `dead-letters reconcile` and the worker's
//! check at the window (`hyperline.reconcile_at_window`), because either one
//! acting on a wrong verdict costs a customer: a command taken as charged by
//! another command's transaction is never bought (its downstream believes it
//! was), and a charged command taken as not charged is replayed and, past
//! Hyperline's 24 hours, charged again.
//!
//! - A transaction claimed by a `succeeded` event of another command in the
//!   results log is that command's charge (Hyperline's invoice is one per
//!   charge): it is not a candidate. This is the only claim that removes a
//!   candidate, because it is the only one that is proof.
//! - **Not charged** only when no candidate is left: a candidate shared with
//!   another uncertain letter is still a candidate (either may own it).
//! - **Charged** only when exactly one candidate is left, it is no other
//!   letter's candidate, and the results log covers it: the log's oldest
//!   kept event is older than the transaction by the clock margin, so a
//!   `succeeded` event claiming it (published after it) would be in the log.
//! - **Otherwise** left for a person, with the candidates.
//! - A listing that could not be read, or a possible charge missing a field
//!   the rules need, is never "not charged".

use std::collections::HashMap;
use std::time::Duration;

use super::matching::{Candidate, ChargeLookup, Matches};

/// One uncertain command, as the rules see it.
#[derive(Clone, Copy, Debug)]
pub struct Letter<'a> {
    /// Its id: its own dead letters (a letter put back twice) and its own
    /// `succeeded` events are not "somebody else".
    pub command_id: &'a str,
    /// What its customer's listing offers it, or why it could not be read.
    pub matches: &'a Result<Matches, String>,
}

/// What the results log says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogEvidence {
    /// The invoice of each `succeeded` event in the log, with its command.
    pub claims: HashMap<String, String>,
    /// When the log's oldest kept event occurred (Unix ms): from then on it
    /// holds every event. `None` without a log, or with an empty one.
    pub complete_since_ms: Option<u64>,
}

impl LogEvidence {
    /// Whether a `succeeded` event claiming `t` would be in the log: such an
    /// event is published after Hyperline recorded `t`, and their clocks
    /// may disagree by `margin`.
    fn covers(&self, t: &Candidate, margin: Duration) -> bool {
        let margin = crate::clock::millis(margin);
        self.complete_since_ms
            .is_some_and(|since| since.saturating_add(margin) <= t.created_ms())
    }

    /// The command whose `succeeded` event claims `t`, when it is not `own`.
    fn claimed_by_other(&self, t: &Candidate, own: &str) -> Option<&str> {
        self.claims
            .get(&t.invoice_id)
            .map(String::as_str)
            .filter(|by| *by != own)
    }
}

/// The verdict on each letter, in order. `margin` is the clock margin
/// ([`clock_margin`](super::matching::clock_margin)).
pub fn judge(letters: &[Letter<'_>], log: &LogEvidence, margin: Duration) -> Vec<ChargeLookup> {
    letters
        .iter()
        .map(|letter| judge_one(letter, letters, log, margin))
        .collect()
}

fn uncertain(reason: String, candidates: Vec<Candidate>) -> ChargeLookup {
    ChargeLookup::Uncertain { reason, candidates }
}

fn judge_one(
    letter: &Letter<'_>,
    all: &[Letter<'_>],
    log: &LogEvidence,
    margin: Duration,
) -> ChargeLookup {
    let matches = match letter.matches {
        Ok(matches) => matches,
        Err(reason) => return uncertain(reason.clone(), Vec::new()),
    };
    if !matches.incomplete.is_empty() {
        return uncertain(
            format!(
                "transaction(s) {} could be its charge but lack a field the rules need \
                 (invoice, balance, amount or price)",
                matches.incomplete.join(", ")
            ),
            matches.candidates.clone(),
        );
    }
    let open: Vec<&Candidate> = matches
        .candidates
        .iter()
        .filter(|t| log.claimed_by_other(t, letter.command_id).is_none())
        .collect();
    let t = match open.as_slice() {
        [] => return ChargeLookup::NotCharged,
        [one] => *one,
        several => {
            return uncertain(
                format!(
                    "{} transactions could be its charge: cannot tell which",
                    several.len()
                ),
                several.iter().map(|c| (*c).clone()).collect(),
            );
        }
    };
    let shared: Vec<&str> = all
        .iter()
        .filter(|other| other.command_id != letter.command_id)
        .filter(|other| {
            other.matches.as_ref().is_ok_and(|m| {
                m.incomplete.contains(&t.transaction_id)
                    || m.candidates
                        .iter()
                        .any(|c| c.transaction_id == t.transaction_id)
            })
        })
        .map(|other| other.command_id)
        .collect();
    if !shared.is_empty() {
        return uncertain(
            format!(
                "{} could also be the charge of {}",
                t.transaction_id,
                shared.join(", ")
            ),
            vec![t.clone()],
        );
    }
    if !log.covers(t, margin) {
        return uncertain(
            format!(
                "no results log covers {} (created {}): another command's succeeded event \
                 could claim it",
                t.transaction_id,
                t.created_at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default()
            ),
            vec![t.clone()],
        );
    }
    ChargeLookup::Charged(t.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::OffsetDateTime;

    const T0: u64 = 1_790_000_000_000;
    const MARGIN: Duration = Duration::from_secs(60);

    fn t(id: &str) -> Candidate {
        Candidate {
            transaction_id: id.into(),
            invoice_id: format!("inv_{id}"),
            balance_after: 10,
            created_at: OffsetDateTime::from_unix_timestamp_nanos(i128::from(T0) * 1_000_000)
                .expect("a time"),
        }
    }

    fn offered(ids: &[&str]) -> Result<Matches, String> {
        Ok(Matches {
            candidates: ids.iter().map(|id| t(id)).collect(),
            incomplete: Vec::new(),
        })
    }

    /// The results log: covering every candidate (its oldest event well
    /// before them) or not, with `claims` as `(invoice's transaction, command)`.
    fn log(covers: bool, claims: &[(&str, &str)]) -> LogEvidence {
        LogEvidence {
            claims: claims
                .iter()
                .map(|(tx, by)| (format!("inv_{tx}"), (*by).to_owned()))
                .collect(),
            complete_since_ms: match covers {
                true => Some(T0 - 60_000),
                false => Some(T0 - 59_999),
            },
        }
    }

    /// The verdict on the first of `letters` (`(command, matches)`).
    fn verdict(letters: &[(&str, Result<Matches, String>)], log: &LogEvidence) -> String {
        let letters: Vec<Letter<'_>> = letters
            .iter()
            .map(|(id, matches)| Letter {
                command_id: id,
                matches,
            })
            .collect();
        match &judge(&letters, log, MARGIN)[0] {
            ChargeLookup::NotCharged => "not charged".into(),
            ChargeLookup::Charged(c) => format!("charged {}", c.transaction_id),
            ChargeLookup::Uncertain { candidates, .. } => {
                let ids: Vec<&str> = candidates
                    .iter()
                    .map(|c| c.transaction_id.as_str())
                    .collect();
                format!("person [{}]", ids.join(","))
            }
        }
    }

    /// The letters of a row (the first is judged).
    type Letters<'a> = Vec<(&'a str, Result<Matches, String>)>;
    /// A row: its name, letters, log claims, verdict with a covering log, without.
    type Row<'a> = (
        &'a str,
        Letters<'a>,
        Vec<(&'a str, &'a str)>,
        &'a str,
        &'a str,
    );

    #[test]
    fn every_rule_with_and_without_a_results_log_covering_the_window() {
        for (row, letters, claims, with_log, without) in rows() {
            assert_eq!(
                verdict(&letters, &log(true, &claims)),
                with_log,
                "{row}, log covers"
            );
            assert_eq!(
                verdict(&letters, &log(false, &claims)),
                without,
                "{row}, log too young"
            );
            let none = LogEvidence {
                complete_since_ms: None,
                ..log(false, &claims)
            };
            assert_eq!(verdict(&letters, &none), without, "{row}, no log");
        }
    }

    /// Every rule: (row, letters (the first is judged), log claims, the
    /// verdict with a log covering the window, without one).
    fn rows() -> Vec<Row<'static>> {
        let incomplete = Ok(Matches {
            candidates: vec![t("t1")],
            incomplete: vec!["t2".into()],
        });
        vec![
            (
                "no candidate",
                vec![("a", offered(&[]))],
                vec![],
                "not charged",
                "not charged",
            ),
            (
                "one, nobody else's",
                vec![("a", offered(&["t1"]))],
                vec![],
                "charged t1",
                "person [t1]",
            ),
            (
                "one, claimed by another command's succeeded event",
                vec![("a", offered(&["t1"]))],
                vec![("t1", "b")],
                "not charged",
                "not charged",
            ),
            (
                "one, claimed by its own succeeded event",
                vec![("a", offered(&["t1"]))],
                vec![("t1", "a")],
                "charged t1",
                "person [t1]",
            ),
            (
                "one, also another letter's candidate",
                vec![("a", offered(&["t1"])), ("b", offered(&["t1", "t2"]))],
                vec![],
                "person [t1]",
                "person [t1]",
            ),
            (
                "one, also a candidate of its own other letter",
                vec![("a", offered(&["t1"])), ("a", offered(&["t1"]))],
                vec![],
                "charged t1",
                "person [t1]",
            ),
            (
                "several",
                vec![("a", offered(&["t1", "t2"]))],
                vec![],
                "person [t1,t2]",
                "person [t1,t2]",
            ),
            (
                "several, all but one claimed by others' events",
                vec![("a", offered(&["t1", "t2"]))],
                vec![("t2", "b")],
                "charged t1",
                "person [t1]",
            ),
            (
                "a possible charge missing a field",
                vec![("a", incomplete.clone())],
                vec![],
                "person [t1]",
                "person [t1]",
            ),
            (
                "only a possible charge missing a field",
                vec![(
                    "a",
                    Ok(Matches {
                        candidates: vec![],
                        incomplete: vec!["t2".into()],
                    }),
                )],
                vec![],
                "person []",
                "person []",
            ),
            (
                "another letter's possible charge missing a field",
                vec![("a", offered(&["t2"])), ("b", incomplete)],
                vec![],
                "person [t2]",
                "person [t2]",
            ),
            (
                "the listing unreadable",
                vec![("a", Err("HTTP 500".into()))],
                vec![],
                "person []",
                "person []",
            ),
        ]
    }

    #[test]
    fn the_chain_a_b_c_settles_nobody() {
        // a:[t1], b:[t2], c:[t1, t2]: t1 could be a's or c's, t2 b's or c's.
        let letters = [
            ("a", offered(&["t1"])),
            ("b", offered(&["t2"])),
            ("c", offered(&["t1", "t2"])),
        ];
        let letters: Vec<Letter<'_>> = letters
            .iter()
            .map(|(id, matches)| Letter {
                command_id: id,
                matches,
            })
            .collect();
        let verdicts = judge(&letters, &log(true, &[]), MARGIN);
        assert!(
            verdicts
                .iter()
                .all(|v| matches!(v, ChargeLookup::Uncertain { .. })),
            "{verdicts:?}"
        );
    }
}
