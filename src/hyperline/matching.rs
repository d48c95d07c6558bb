//! Which of a customer's credit transactions could be a command's charge.
//!
//! Hyperline's transactions do not carry the Idempotency-Key, so a charge is
//! recognised by what the command asked for: a `topup` from the `api` for the
//! same customer and product (the listing is already scoped to both), the same
//! `credit_count`, the same amount (or price id), recorded after the command's
//! first request could reach Hyperline and before the command stopped
//! sending. One such transaction is the charge; none means no charge; more
//! than one cannot be told apart here and is left for a person.

use std::time::Duration;

use time::OffsetDateTime;

use super::transactions::CreditTransaction;
use crate::contract::{Command, Pricing};

/// Allowed disagreement between this host's clock, which stamped the first
/// request, and Hyperline's, which stamped the transaction. Larger, it would
/// take an earlier identical purchase for this command's; smaller, it would
/// miss a charge made by a host whose clock runs ahead.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5);

/// When the command's charge, if any, was recorded: from its first request
/// that may have charged to the last moment one could still complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
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
    /// When Hyperline recorded it (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// What the transactions say about a command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChargeLookup {
    /// No transaction matches: Hyperline holds no charge of the command.
    NotCharged,
    /// Exactly one matches: the command was charged, by that transaction.
    Charged(Candidate),
    /// Several match, or the transactions could not be read.
    Uncertain {
        /// Why, for the event and the operator.
        reason: String,
        /// The matching transactions, when it is for that.
        candidates: Vec<Candidate>,
    },
}

impl ChargeLookup {
    /// The verdict on a command's candidates (those no other command claims).
    pub fn judge(mut candidates: Vec<Candidate>) -> ChargeLookup {
        match candidates.len() {
            0 => ChargeLookup::NotCharged,
            1 => ChargeLookup::Charged(candidates.remove(0)),
            n => ChargeLookup::Uncertain {
                reason: format!("{n} matching transactions: cannot tell which is this command's"),
                candidates,
            },
        }
    }
}

fn unix_ms(at: OffsetDateTime) -> i128 {
    at.unix_timestamp_nanos() / 1_000_000
}

/// The transactions that could be `command`'s charge within `span`.
pub fn candidates(
    command: &Command,
    transactions: &[CreditTransaction],
    span: Span,
) -> Vec<Candidate> {
    let skew = i128::try_from(CLOCK_SKEW.as_millis()).unwrap_or(i128::MAX);
    let from = i128::from(span.from_ms) - skew;
    let until = i128::from(span.until_ms) + skew;
    let count = i64::try_from(command.credit_count.get()).ok();
    transactions
        .iter()
        .filter(|t| t.kind == "topup" && t.source == "api")
        .filter(|t| Some(t.credit_count) == count)
        .filter(|t| match &command.pricing {
            Pricing::Amount(amount) => {
                t.amount_excluding_tax.and_then(|a| u64::try_from(a).ok()) == Some(*amount)
            }
            Pricing::PriceId(price) => t
                .price
                .as_ref()
                .and_then(|p| p.id.as_deref())
                .is_some_and(|id| id == price.as_str()),
        })
        .filter(|t| (from..=until).contains(&unix_ms(t.created_at)))
        .filter_map(|t| {
            Some(Candidate {
                transaction_id: t.id.clone(),
                invoice_id: t.invoice_id.clone().filter(|i| !i.is_empty())?,
                balance_after: u64::try_from(t.balance_after?).ok()?,
                created_at: t.created_at,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hyperline::TransactionPrice;

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

    fn ids(found: &[Candidate]) -> Vec<&str> {
        found.iter().map(|c| c.transaction_id.as_str()).collect()
    }

    #[test]
    fn only_an_api_topup_of_the_same_purchase_inside_the_span_matches() {
        let span = Span {
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
            transaction("before", T0 - CLOCK_SKEW.as_millis() as u64 - 1),
            transaction("skewed", T0 - 1_000),
            transaction("inside", T0 + 30_000),
            transaction("after", T0 + 60_000 + CLOCK_SKEW.as_millis() as u64 + 1),
            other_count,
            other_amount,
            consumption,
            manual,
        ];
        assert_eq!(
            ids(&candidates(&by_amount, &listing, span)),
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
                span
            )),
            ["priced"]
        );
    }

    #[test]
    fn one_candidate_is_a_charge_none_is_none_several_are_for_a_person() {
        let span = Span {
            from_ms: T0,
            until_ms: T0 + 1,
        };
        let c = command(r#""amount_excluding_tax":24000"#);
        let one = candidates(&c, &[transaction("a", T0)], span);
        assert!(
            matches!(ChargeLookup::judge(one), ChargeLookup::Charged(x) if x.invoice_id == "inv_a" && x.balance_after == 64)
        );
        assert_eq!(ChargeLookup::judge(Vec::new()), ChargeLookup::NotCharged);
        let two = candidates(&c, &[transaction("a", T0), transaction("b", T0)], span);
        assert!(matches!(
            ChargeLookup::judge(two),
            ChargeLookup::Uncertain { candidates, .. } if candidates.len() == 2
        ));
    }
}
