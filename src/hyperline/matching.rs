//! Which of a customer's credit transactions could be a command's charge.
//!
//! Hyperline's transactions do not carry the Idempotency-Key, so a charge is
//! recognised by what the command asked for, among the transactions of the
//! same customer and product (the listing is already scoped to both)
//! recorded after the command's first request could reach Hyperline and
//! before the command stopped sending, the span widened by the clock margin
//! on both sides. Two tests, on purpose not one:
//!
//! - a **candidate** (a charge that can be attributed) is strict: a `topup`
//!   from the `api`, the same `credit_count`, the same amount (or price id),
//!   with every field the event needs;
//! - a transaction is **another purchase** only when that is provable: a
//!   different credit count, or a different amount or price where both the
//!   command and the transaction carry one. Everything else in the span
//!   (another `type` or `source` spelling, the other pricing field, a field
//!   missing) is a [`Possible`] charge: never attributed, and never ignored,
//!   because a drift in the API's shapes would otherwise turn a charged
//!   command into "not charged" and a replay that charges again.
//!
//! What such transactions mean for the command is decided by
//! [`evidence`](super::evidence), with what else is known.

use std::time::Duration;

use time::OffsetDateTime;

use super::transactions::CreditTransaction;
use crate::contract::{Command, Pricing};

/// Allowed disagreement between the clocks that stamp a command's requests
/// and Hyperline's, which stamps the transaction: 1/96 of the idempotency
/// window (15 minutes of 24 hours), the margin the worker keeps at the
/// window's end (`verdict::window_open`). Smaller, it would miss a charge
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

/// A transaction in the span that is not provably another purchase, yet
/// not a [`Candidate`]: it could be the command's charge, and the rules
/// cannot tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Possible {
    /// The transaction id.
    pub transaction_id: String,
    /// Its invoice, when it has one: a `succeeded` event carrying it
    /// proves whose it is.
    pub invoice_id: Option<String>,
    /// When Hyperline recorded it, Unix ms.
    pub created_ms: u64,
    /// Why it is not a candidate, for the operator.
    pub why: String,
}

/// What a listing offers one command.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Matches {
    /// Transactions that could be its charge, with every field the rules need.
    pub candidates: Vec<Candidate>,
    /// Transactions that could be its charge but are not candidates.
    /// Dropping them would turn a possible charge into "not charged".
    pub possible: Vec<Possible>,
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
    /// A transaction that could be its charge is younger than the longest
    /// another command that could have made it can stay unanswered, or such
    /// a command is still in flight: judging now could give it another
    /// command's charge. Nothing is done; a later run can tell.
    TooYoung {
        /// Unix ms after which a run can judge it, unless another command
        /// of the same purchase comes in flight meanwhile.
        run_again_after_ms: u64,
        /// What it waits for, for the event and the operator.
        reason: String,
        /// The transactions that could be its charge.
        candidates: Vec<Candidate>,
    },
}

fn unix_ms(at: OffsetDateTime) -> i128 {
    at.unix_timestamp_nanos() / 1_000_000
}

/// Whether a transaction's price fits the command: `Some(true)` it does,
/// `Some(false)` it provably does not (both carry the same kind of price and
/// they differ), `None` it cannot tell (the transaction carries only the
/// other field, or none).
fn priced_alike(command: &Command, t: &CreditTransaction) -> Option<bool> {
    let amount = t.amount_excluding_tax.and_then(|a| u64::try_from(a).ok());
    let price = t.price.as_ref().and_then(|p| p.id.as_deref());
    match (&command.pricing, amount, price) {
        (Pricing::Amount(want), Some(amount), _) => Some(amount == *want),
        (Pricing::PriceId(want), _, Some(price)) => Some(price == want.as_str()),
        (Pricing::Amount(_), None, _) | (Pricing::PriceId(_), _, None) => None,
    }
}

/// Why `t`, alike in count and not provably priced otherwise, is not a
/// candidate, in words.
fn why_not(t: &CreditTransaction, priced: Option<bool>) -> String {
    let mut why = Vec::new();
    if t.kind != "topup" || t.source != "api" {
        why.push(format!(
            "type `{}` from `{}`, not `topup` from `api`",
            t.kind, t.source
        ));
    }
    if priced.is_none() {
        why.push("no amount or price to compare with the command's".to_owned());
    }
    if t.invoice_id.as_deref().is_none_or(str::is_empty) {
        why.push("no invoice".to_owned());
    }
    if t.balance_after
        .and_then(|b| u64::try_from(b).ok())
        .is_none()
    {
        why.push("no balance".to_owned());
    }
    why.join(", ")
}

/// The transactions that could be `command`'s charge within `span` widened
/// by `margin`: the candidates, and the possible charges the rules cannot
/// tell from it. Whatever else the listing holds is provably another
/// purchase.
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
        .filter(|t| Some(t.credit_count) == count)
        .filter(|t| (from..=until).contains(&unix_ms(t.created_at)))
    {
        let priced = priced_alike(command, t);
        if priced == Some(false) {
            continue;
        }
        let strict = t.kind == "topup" && t.source == "api" && priced == Some(true);
        let candidate = || {
            Some(Candidate {
                transaction_id: t.id.clone(),
                invoice_id: t.invoice_id.clone().filter(|i| !i.is_empty())?,
                balance_after: u64::try_from(t.balance_after?).ok()?,
                created_at: t.created_at,
            })
        };
        match strict.then(candidate).flatten() {
            Some(c) => matches.candidates.push(c),
            None => matches.possible.push(Possible {
                transaction_id: t.id.clone(),
                invoice_id: t.invoice_id.clone().filter(|i| !i.is_empty()),
                created_ms: u64::try_from(unix_ms(t.created_at)).unwrap_or(0),
                why: why_not(t, priced),
            }),
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

    /// Each transaction's class: `candidate`, `possible` or `other`.
    fn classes(found: &Matches, listing: &[CreditTransaction]) -> Vec<(String, &'static str)> {
        listing
            .iter()
            .map(|t| {
                let class = match (
                    found.candidates.iter().any(|c| c.transaction_id == t.id),
                    found.possible.iter().any(|p| p.transaction_id == t.id),
                ) {
                    (true, _) => "candidate",
                    (false, true) => "possible",
                    (false, false) => "other",
                };
                (t.id.clone(), class)
            })
            .collect()
    }

    fn with(id: &str, change: impl FnOnce(&mut CreditTransaction)) -> CreditTransaction {
        let mut t = transaction(id, T0 + 1);
        change(&mut t);
        t
    }

    fn priced(id: &str, price: &str, amount: Option<i64>) -> CreditTransaction {
        with(id, |t| {
            t.amount_excluding_tax = amount;
            t.price = Some(TransactionPrice {
                id: Some(price.into()),
            });
        })
    }

    /// A row: the command's pricing, the listing, and each transaction's
    /// class in the span `T0..T0 + 60 s`.
    type Row = (&'static str, Vec<CreditTransaction>, Vec<&'static str>);

    #[test]
    fn only_provably_other_purchases_are_left_out_and_only_exact_ones_are_candidates() {
        let span = TimeSpan {
            from_ms: T0,
            until_ms: T0 + 60_000,
        };
        let by_amount = r#""amount_excluding_tax":24000"#;
        let by_price = r#""price_id":"pri_1""#;
        let rows: Vec<Row> = vec![
            (
                by_amount,
                vec![
                    transaction("before", T0 - SKEW.as_millis() as u64 - 1),
                    transaction("skewed", T0 - 1_000),
                    transaction("inside", T0 + 30_000),
                    transaction("after", T0 + 60_000 + SKEW.as_millis() as u64 + 1),
                ],
                vec!["other", "candidate", "candidate", "other"],
            ),
            (
                by_amount,
                vec![
                    with("count", |t| t.credit_count = 31),
                    with("amount", |t| t.amount_excluding_tax = Some(1)),
                    with("usage", |t| t.credit_count = -32),
                    with("consumption", |t| t.kind = "consumption".into()),
                    with("manual", |t| t.source = "manual".into()),
                    with("spelled", |t| t.kind = "TOPUP".into()),
                    priced("price only", "pri_1", None),
                    priced("price and amount", "pri_9", Some(24_000)),
                    priced("price, other amount", "pri_1", Some(1)),
                ],
                vec![
                    "other",
                    "other",
                    "other",
                    "possible",
                    "possible",
                    "possible",
                    "possible",
                    "candidate",
                    "other",
                ],
            ),
            (
                by_price,
                vec![
                    priced("priced", "pri_1", Some(999)),
                    priced("other price", "pri_2", Some(24_000)),
                    transaction("amount only", T0 + 1),
                    with("nothing", |t| t.amount_excluding_tax = None),
                ],
                vec!["candidate", "other", "possible", "possible"],
            ),
        ];
        for (pricing, listing, want) in rows {
            let found = candidates(&command(pricing), &listing, span, SKEW);
            let got = classes(&found, &listing);
            let want: Vec<(String, &str)> =
                listing.iter().map(|t| t.id.clone()).zip(want).collect();
            assert_eq!(got, want, "{pricing}");
        }
    }

    #[test]
    fn a_possible_charge_missing_a_field_is_possible_not_dropped() {
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
        let ids: Vec<&str> = found
            .candidates
            .iter()
            .map(|c| c.transaction_id.as_str())
            .collect();
        assert_eq!(ids, ["whole"]);
        let why: Vec<(&str, &str)> = found
            .possible
            .iter()
            .map(|p| (p.transaction_id.as_str(), p.why.as_str()))
            .collect();
        assert_eq!(
            why,
            [
                ("no_invoice", "no invoice"),
                ("no_balance", "no balance"),
                (
                    "no_amount",
                    "no amount or price to compare with the command's"
                )
            ]
        );
    }
}
