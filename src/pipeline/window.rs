//! The worker's check at a command's closed window
//! (`hyperline.reconcile_at_window`): the evidence rules of `dead-letters
//! reconcile` applied to one command, with the results log's claims and
//! commands in flight, so the worker never settles a command with another
//! command's charge.

use super::Pipeline;
use crate::broker::logged::LogEvidence;
use crate::clock::{millis, now_ms};
use crate::contract::Command;
use crate::hyperline::CreditTransaction;
use crate::hyperline::evidence::{Letter, Timing, judge};
use crate::hyperline::matching::{ChargeLookup, TimeSpan, candidates, clock_margin};

impl Pipeline {
    /// The verdict on `command`, whose window opened at `first_ms`, from
    /// its customer's `listing` and the results log. A log that cannot be
    /// read counts as no log: nothing is then settled as charged.
    pub(super) async fn judge_at_window(
        &self,
        command: &Command,
        listing: &[CreditTransaction],
        first_ms: u64,
    ) -> ChargeLookup {
        let margin = clock_margin(self.limits.window);
        let margin_ms = millis(margin);
        let now = now_ms();
        let span = TimeSpan {
            from_ms: first_ms,
            until_ms: now,
        };
        let matches = Ok(candidates(command, listing, span, margin));
        let log = match &self.results_log {
            None => LogEvidence::default(),
            Some(source) => match source.evidence(first_ms.saturating_sub(margin_ms)).await {
                Ok(log) => log,
                Err(e) => {
                    tracing::warn!(error = %e, "the results log could not be read: no charge can be proven");
                    LogEvidence::default()
                }
            },
        };
        let letter = Letter {
            command,
            bounded: true,
            matches: &matches,
        };
        let timing = Timing {
            now_ms: now,
            margin,
            unseen: self.limits.unseen,
            life: self.limits.life,
        };
        judge(&[letter], &log, timing)
            .pop()
            .unwrap_or_else(|| ChargeLookup::Uncertain {
                reason: "no verdict".into(),
                candidates: Vec::new(),
            })
    }
}
