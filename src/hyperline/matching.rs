//! Which of a customer's credit transactions could be a command's charge.
//!
//! Hyperline's transactions do not carry the Idempotency-Key, so a charge is
//! recognised by what the command asked for: a `topup` from the `api` for the
//! same customer and product (the listing is already scoped to both), the same
//! `credit_count`, the same amount (or price id), recorded after the command's
//! first request could reach Hyperline and before the command stopped
//! sending, the span widened by the clock margin on both sides. What such a
//! transaction means for the command is decided by
//! [`evidence`](super::evidence), with what else is known.

use std::time::Duration;

use time::OffsetDateTime;

use super::transactions::CreditTransaction;
use crate::contract::{Command, Pricing};

/// Allowed disagreement between the clocks that stamp a command's requests
/// and Hyperline's, which stamps the transaction: 1/96 of the idempotency
/// window (15 minutes of 24 hours), the margin the worker keeps at the
/// window's end (`retry::window_open`). Smaller, it would miss a charge
/// stamped by a clock that runs ahead; the same margin as the guard, so a
/// charge the guard allowed is always searched.
pub fn clock_margin(window: Duration) -> Duration {
    window / 96
}

/// When the command's charge, if any, was recorded: from its first request
/// that may have charged to the last moment one could still complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeSpan {
    /// Unix ms of the first request that may have charged.
    pub from_ms: u64,
    /// Unix ms after which no request of the command can have charged.
    pub until_ms: u64,
}

/// A transaction that could be the command's charge.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Candidate {
    /// The transaction id (`cdt_…`).
    pub transaction_id: String,
    /// Its invoice.
    pub invoice_id: String,
    /// The balance after it: the event's `new_credit_balance`.
    pub balance_after: u64,
    /// When Hyperline recorded it (RFC 3339, UTC, milliseconds: the one
    /// format every time the tools print is in).
    #[serde(serialize_with = "rfc3339_millis")]
    pub created_at: OffsetDateTime,
}

/// `2026-12-06T02:05:10.567Z`.
fn rfc3339_millis<S: serde::Serializer>(at: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
    let text = at
        .to_offset(time::UtcOffset::UTC)
        .format(crate::contract::RFC3339_MILLIS)
        .map_err(serde::ser::Error::custom)?;
    s.serialize_str(&text)
}

impl Candidate {
    /// [`Candidate::created_at`] in Unix ms (0 before the epoch).
    pub fn created_ms(&self) -> u64 {
        u64::try_from(unix_ms(self.created_at)).unwrap_or(0)
    }
}

/// What a listing offers one command.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Matches {
    /// Transactions that could be its charge, with every field the rules need.
    pub candidates: Vec<Candidate>,
    /// Transactions that could be its charge but lack a field the rules
    /// need (the invoice, the balance, the amount or price): their ids.
    /// Dropping them would turn a possible charge into "not charged".
    pub incomplete: Vec<String>,
}

/// What the evidence says about a command's charge (the verdict of
/// [`evidence::judge`](super::evidence::judge)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChargeLookup {
    /// Hyperline holds no charge that could be the command's.
    NotCharged,
    /// Charged, by this transaction, and it is nobody else's.
    Charged(Candidate),
    /// The evidence does not prove either: left for a person.
    Uncertain {
        /// Why, for the event and the operator.
        reason: String,
        /// The transactions that could be its charge.
        candidates: Vec<Candidate>,
    },
}

fn unix_ms(at: OffsetDateTime) -> i128 {
    at.unix_timestamp_nanos() / 1_000_000
}

/// Whether a transaction's price fits the command: `Some(true)` it does,
/// `Some(false)` it does not, `None` the transaction does not say.
fn priced_alike(command: &Command, t: &CreditTransaction) -> Option<bool> {
    let amount = t.amount_excluding_tax.and_then(|a| u64::try_from(a).ok());
    let price = t.price.as_ref().and_then(|p| p.id.as_deref());
    match (&command.pricing, amount, price) {
        (Pricing::Amount(want), Some(amount), _) => Some(amount == *want),
        (Pricing::PriceId(want), _, Some(price)) => Some(price == want.as_str()),
        // Priced the other way: a purchase of another kind.
        (Pricing::Amount(_), None, Some(_)) | (Pricing::PriceId(_), Some(_), None) => Some(false),
        (_, None, None) => None,
    }
}

/// The transactions that could be `command`'s charge within `span` widened
/// by `margin`.
pub fn candidates(
    command: &Command,
    transactions: &[CreditTransaction],
    span: TimeSpan,
    margin: Duration,
) -> Matches {
    let skew = i128::try_from(margin.as_millis()).unwrap_or(i128::MAX);
    let from = i128::from(span.from_ms) - skew;
    let until = i128::from(span.until_ms) + skew;
    let count = i64::try_from(command.credit_count.get()).ok();
    let mut matches = Matches::default();
    for t in transactions
        .iter()
        .filter(|t| t.kind == "topup" && t.source == "api")
        .filter(|t| Some(t.credit_count) == count)
        .filter(|t| (from..=until).contains(&unix_ms(t.created_at)))
    {
        let candidate = || {
            Some(Candidate {
                transaction_id: t.id.clone(),
                invoice_id: t.invoice_id.clone().filter(|i| !i.is_empty())?,
                balance_after: u64::try_from(t.balance_after?).ok()?,
                created_at: t.created_at,
            })
        };
        match (priced_alike(command, t), candidate()) {
            (Some(false), _) => {}
            (Some(true), Some(c)) => matches.candidates.push(c),
            _ => matches.incomplete.push(t.id.clone()),
        }
    }
    matches
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hyperline::TransactionPrice;

    const SKEW: Duration = Duration::from_secs(5);

    const T0: u64 = 1_790_000_000_000;

    fn command(pricing: &str) -> Command {
        let body = format!(
            r#"{{"command_id":"cmd-000000000000001","customer_id":"cus_1","product_id":"itm_1","credit_count":32,{pricing}}}"#
        );
        Command::parse(body.as_bytes(), None).expect("a valid command")
    }

    fn transaction(id: &str, at_ms: u64) -> CreditTransaction {
        CreditTransaction {
            id: id.into(),
            invoice_id: Some(format!("inv_{id}")),
            credit_count: 32,
            amount_excluding_tax: Some(24_000),
            price: None,
            kind: "topup".into(),
            source: "api".into(),
            balance_after: Some(64),
            created_at: OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000)
                .expect("a time"),
        }
    }

    fn ids(found: &Matches) -> Vec<&str> {
        found
            .candidates
            .iter()
            .map(|c| c.transaction_id.as_str())
            .collect()
    }

    #[test]
    fn only_an_api_topup_of_the_same_purchase_inside_the_span_matches() {
        let span = TimeSpan {
            from_ms: T0,
            until_ms: T0 + 60_000,
        };
        let by_amount = command(r#""amount_excluding_tax":24000"#);
        let mut other_count = transaction("count", T0 + 1);
        other_count.credit_count = 31;
        let mut other_amount = transaction("amount", T0 + 1);
        other_amount.amount_excluding_tax = Some(1);
        let mut consumption = transaction("usage", T0 + 1);
        consumption.kind = "consumption".into();
        let mut manual = transaction("manual", T0 + 1);
        manual.source = "manual".into();
        let listing = [
            transaction("before", T0 - SKEW.as_millis() as u64 - 1),
            transaction("skewed", T0 - 1_000),
            transaction("inside", T0 + 30_000),
            transaction("after", T0 + 60_000 + SKEW.as_millis() as u64 + 1),
            other_count,
            other_amount,
            consumption,
            manual,
        ];
        assert_eq!(
            ids(&candidates(&by_amount, &listing, span, SKEW)),
            ["skewed", "inside"]
        );

        let by_price = command(r#""price_id":"pri_1""#);
        let mut priced = transaction("priced", T0 + 1);
        priced.amount_excluding_tax = Some(999);
        priced.price = Some(TransactionPrice {
            id: Some("pri_1".into()),
        });
        assert_eq!(
            ids(&candidates(
                &by_price,
                &[priced, transaction("unpriced", T0 + 1)],
                span,
                SKEW
            )),
            ["priced"]
        );
    }

    #[test]
    fn a_possible_charge_missing_a_field_is_incomplete_not_dropped() {
        let span = TimeSpan {
            from_ms: T0,
            until_ms: T0 + 1,
        };
        let c = command(r#""amount_excluding_tax":24000"#);
        let mut no_invoice = transaction("no_invoice", T0);
        no_invoice.invoice_id = None;
        let mut no_balance = transaction("no_balance", T0);
        no_balance.balance_after = None;
        let mut no_amount = transaction("no_amount", T0);
        no_amount.amount_excluding_tax = None;
        let found = candidates(
            &c,
            &[no_invoice, no_balance, no_amount, transaction("whole", T0)],
            span,
            SKEW,
        );
        assert_eq!(ids(&found), ["whole"]);
        assert_eq!(found.incomplete, ["no_invoice", "no_balance", "no_amount"]);
    }
}
