//! What a results log entry says: the fields of an event (or `pending`
//! record) that readers select on, and what a run of entries tells the
//! evidence rules (every `succeeded` claim, the commands in flight).

use serde::Deserialize;
use time::OffsetDateTime;

use crate::contract::{Command, EventKind, PENDING_TYPE};

/// The fields of a logged event (or `pending` record) that readers select
/// on. Lenient: the log holds whatever reached the results exchange.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct Logged {
    /// `credit_purchase.succeeded`, `credit_purchase.failed` or
    /// `credit_purchase.pending`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The command, or null.
    #[serde(default)]
    pub command_id: Option<String>,
    /// Its customer, product and count.
    #[serde(default)]
    pub customer_id: Option<String>,
    #[serde(default)]
    pub product_id: Option<String>,
    #[serde(default)]
    pub credit_count: Option<u64>,
    /// The price of a `pending` record's purchase.
    #[serde(default)]
    pub amount_excluding_tax: Option<u64>,
    #[serde(default)]
    pub price_id: Option<String>,
    /// A `pending` record's first request that may have charged.
    #[serde(default)]
    pub first_attempt_at: Option<String>,
    /// The invoice of a succeeded event: the charge it claims.
    #[serde(default)]
    pub invoice_id: Option<String>,
    /// A succeeded event found by reconciling, not answered by Hyperline.
    #[serde(default)]
    pub reconciled: bool,
    /// When the outcome was decided.
    #[serde(default)]
    pub occurred_at: Option<String>,
}

/// Unix ms of an RFC 3339 time.
fn unix_ms(text: &str) -> Option<u64> {
    let at = OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    u64::try_from(at.unix_timestamp_nanos() / 1_000_000).ok()
}

impl Logged {
    /// The claim of a `succeeded` event.
    fn succeeded(&self) -> Option<Succeeded> {
        (self.kind == EventKind::Succeeded.as_str()).then_some(())?;
        Some(Succeeded {
            command_id: self.command_id.clone()?,
            customer_id: self.customer_id.clone(),
            product_id: self.product_id.clone(),
            credit_count: self.credit_count,
            invoice_id: self.invoice_id.clone()?,
            reconciled: self.reconciled,
        })
    }

    /// The command of a `pending` record (a record missing a field is
    /// nobody's).
    fn pending(&self) -> Option<InFlight> {
        (self.kind == PENDING_TYPE).then_some(())?;
        Some(InFlight {
            command_id: self.command_id.clone()?,
            customer_id: self.customer_id.clone()?,
            product_id: self.product_id.clone()?,
            credit_count: self.credit_count?,
            amount: self.amount_excluding_tax,
            price_id: self.price_id.clone(),
            first_attempt_ms: unix_ms(self.first_attempt_at.as_deref()?)?,
        })
    }
}

/// What entries read in the log's order say: every `succeeded` event, and
/// the commands whose last word is a `pending` record (any event of the
/// same command and customer after it ends it).
pub fn claims_and_in_flight(
    entries: impl IntoIterator<Item = Logged>,
) -> (Vec<Succeeded>, Vec<InFlight>) {
    let mut succeeded = Vec::new();
    let mut in_flight: Vec<InFlight> = Vec::new();
    for logged in entries {
        if let Some(pending) = logged.pending() {
            in_flight.retain(|c| c.command_id != pending.command_id);
            in_flight.push(pending);
            continue;
        }
        in_flight.retain(|c| {
            Some(&c.command_id) != logged.command_id.as_ref()
                || Some(&c.customer_id) != logged.customer_id.as_ref()
        });
        succeeded.extend(logged.succeeded());
    }
    (succeeded, in_flight)
}

/// A `succeeded` event in the results log: the charge it claims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Succeeded {
    pub command_id: String,
    /// Its customer, product and count, as the event says.
    pub customer_id: Option<String>,
    pub product_id: Option<String>,
    pub credit_count: Option<u64>,
    /// The invoice of the charge: one per charge.
    pub invoice_id: String,
    /// `"reconciled": true`: found by the evidence rules, not answered by
    /// Hyperline.
    pub reconciled: bool,
}

impl Succeeded {
    /// Whether it is `command`'s own event: the same id for the same
    /// customer and purchase (an id reused by another customer is not).
    pub fn is_of(&self, command: &Command) -> bool {
        self.command_id == command.id.as_str()
            && self.customer_id.as_deref() == Some(command.customer_id.as_str())
            && self.product_id.as_deref() == Some(command.product_id.as_str())
            && self.credit_count == Some(command.credit_count.get())
    }
}

/// A command the results log shows in flight: a `pending` record (a request
/// that may have charged, then a delay, a park or a return) and no event
/// after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InFlight {
    pub command_id: String,
    pub customer_id: String,
    pub product_id: String,
    pub credit_count: u64,
    /// `amount_excluding_tax`, when priced so.
    pub amount: Option<u64>,
    /// `price_id`, when priced so.
    pub price_id: Option<String>,
    /// Its first request that may have charged (Unix ms).
    pub first_attempt_ms: u64,
}

/// What the results log says, as the evidence rules
/// (`hyperline/evidence.rs`) read it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogEvidence {
    /// Every `succeeded` event read.
    pub succeeded: Vec<Succeeded>,
    /// The commands it shows in flight.
    pub in_flight: Vec<InFlight>,
    /// When the log's oldest kept entry was published (its
    /// `cpw-published-ms`, Unix ms): from then on it holds every event. Not
    /// an event's `occurred_at`, which a republished stored outcome backdates.
    /// `None` without a log, or with an empty one.
    pub complete_since_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logged(json: &str) -> Logged {
        serde_json::from_str(json).expect("a logged entry")
    }

    #[test]
    fn a_command_is_in_flight_from_its_pending_record_to_its_next_event() {
        let pending = |id: &str, customer: &str| {
            logged(&format!(
                r#"{{"type":"credit_purchase.pending","command_id":"{id}","customer_id":"{customer}","product_id":"itm_1","credit_count":32,"amount_excluding_tax":24000,"first_attempt_at":"2026-12-07T18:00:00.5Z"}}"#
            ))
        };
        let event = |kind: &str, id: &str, customer: &str, extra: &str| {
            logged(&format!(
                r#"{{"type":"credit_purchase.{kind}","command_id":"{id}","customer_id":"{customer}","product_id":"itm_1","credit_count":32{extra}}}"#
            ))
        };
        let (succeeded, in_flight) = claims_and_in_flight([
            pending("a", "cus_1"),
            pending("b", "cus_1"),
            pending("c", "cus_1"),
            event("succeeded", "a", "cus_1", r#","invoice_id":"inv_a""#),
            event("failed", "b", "cus_1", ""),
            // The same id for another customer ends nothing of c's.
            event("failed", "c", "cus_2", ""),
            event(
                "succeeded",
                "d",
                "cus_1",
                r#","invoice_id":"inv_d","reconciled":true"#,
            ),
            pending("e", "cus_1"),
            logged(r#"{"type":"credit_purchase.pending","command_id":"f"}"#),
        ]);
        let flying: Vec<(&str, u64)> = in_flight
            .iter()
            .map(|c| (c.command_id.as_str(), c.first_attempt_ms))
            .collect();
        assert_eq!(flying, [("c", 1_796_666_400_500), ("e", 1_796_666_400_500)]);
        let claims: Vec<(&str, &str, bool)> = succeeded
            .iter()
            .map(|s| (s.command_id.as_str(), s.invoice_id.as_str(), s.reconciled))
            .collect();
        assert_eq!(claims, [("a", "inv_a", false), ("d", "inv_d", true)]);
    }
}
