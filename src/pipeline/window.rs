//! The worker's check at a command's closed window
//! (`hyperline.reconcile_at_window`): the lookup of its customer's credit
//! transactions within the delivery's deadline, then the judge, the
//! evidence rules of `dead-letters reconcile` applied to one command, with the results log's claims and
//! commands in flight, so the worker never settles a command with another
//! command's charge.

use super::Pipeline;
use crate::broker::logged::LogEvidence;
use crate::clock::{millis, now_ms};
use crate::contract::Command;
use crate::hyperline::evidence::{Letter, Timing, judge};
use crate::hyperline::matching::{ChargeLookup, TimeSpan, candidates, clock_margin};
use crate::hyperline::{CreditTransaction, ReadBounds};

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

    /// What Hyperline's credit transactions say about a command whose window
    /// (opened at `first_ms`) closed: read within the delivery's deadline
    /// (at least one request's), through the replica's read gate. A failed
    /// read, or the replica stopping, leaves it uncertain.
    pub(super) async fn look_up(
        &self,
        command: &Command,
        first_ms: u64,
        deadline: tokio::time::Instant,
    ) -> ChargeLookup {
        let bounds = ReadBounds::from_retry(&self.retry);
        let until = deadline.max(tokio::time::Instant::now() + self.limits.request_timeout);
        let read = async {
            let listing = self
                .account
                .client
                .transactions(
                    &command.customer_id,
                    &command.product_id,
                    &self.account.reads,
                    bounds,
                )
                .await?;
            Ok::<_, crate::hyperline::TransactionsError>(
                self.judge_at_window(command, &listing, first_ms).await,
            )
        };
        let uncertain = |reason: String| ChargeLookup::Uncertain {
            reason,
            candidates: Vec::new(),
        };
        let lookup = tokio::select! {
            read = tokio::time::timeout_at(until, read) => match read {
                Ok(Ok(lookup)) => lookup,
                Ok(Err(e)) => uncertain(e.to_string()),
                Err(_) => uncertain("no answer before the delivery's deadline".into()),
            },
            () = self.stop_requests.cancelled() => uncertain("the replica is stopping".into()),
        };
        match &lookup {
            ChargeLookup::NotCharged => tracing::warn!(
                "window closed and no matching credit transaction: purchasing the command as new"
            ),
            ChargeLookup::Charged(found) => tracing::warn!(
                transaction_id = %found.transaction_id,
                invoice_id = %found.invoice_id,
                "window closed and exactly one matching credit transaction: the command was charged"
            ),
            ChargeLookup::Uncertain { reason, candidates }
            | ChargeLookup::TooYoung {
                reason, candidates, ..
            } => tracing::error!(
                %reason,
                transactions = %candidates.iter().map(|c| c.transaction_id.as_str()).collect::<Vec<_>>().join(","),
                "window closed and the credit transactions cannot tell whether the command was charged"
            ),
        }
        lookup
    }
}
