//! The evidence rules as a table: each row a situation, its verdict with a
//! results log that covers the transactions and without one.

use std::time::Duration;

use time::OffsetDateTime;

use super::*;
use crate::hyperline::matching::Possible;

/// When the transactions were recorded.
const T0: u64 = 1_790_000_000_000;
const MARGIN: Duration = Duration::from_secs(60);
/// Long after every transaction: nothing is young.
const LATER: u64 = T0 + 3_600_000;
const UNSEEN: Duration = Duration::from_secs(120);
const LIFE: Duration = Duration::from_secs(1_000);

/// The command of letter `name`: the same purchase for every name.
fn command(name: &str) -> Command {
    command_of(name, "cus_1")
}

fn command_of(name: &str, customer: &str) -> Command {
    let body = format!(
        r#"{{"command_id":"cmd-{name}-000000000000","customer_id":"{customer}","product_id":"itm_1","credit_count":32,"amount_excluding_tax":24000}}"#
    );
    Command::parse(body.as_bytes(), None).expect("a valid command")
}

fn id(name: &str) -> String {
    command(name).id.as_str().to_owned()
}

fn t(tx: &str) -> Candidate {
    Candidate {
        transaction_id: tx.into(),
        invoice_id: format!("inv_{tx}"),
        balance_after: 10,
        created_at: OffsetDateTime::from_unix_timestamp_nanos(i128::from(T0) * 1_000_000)
            .expect("a time"),
    }
}

fn possible(tx: &str, invoice: bool) -> Possible {
    Possible {
        transaction_id: tx.into(),
        invoice_id: invoice.then(|| format!("inv_{tx}")),
        created_ms: T0,
        why: "no balance".into(),
    }
}

fn offered(txs: &[&str]) -> Result<Matches, String> {
    Ok(Matches {
        candidates: txs.iter().map(|tx| t(tx)).collect(),
        possible: Vec::new(),
    })
}

/// A `succeeded` event of letter `by` claiming `tx`'s invoice.
fn claim(tx: &str, by: &str, reconciled: bool) -> Succeeded {
    let c = command(by);
    Succeeded {
        command_id: c.id.as_str().into(),
        customer_id: Some(c.customer_id.as_str().into()),
        product_id: Some(c.product_id.as_str().into()),
        credit_count: Some(32),
        invoice_id: format!("inv_{tx}"),
        reconciled,
    }
}

/// Command `name` in flight since `first_ms`.
fn in_flight(name: &str, first_ms: u64, amount: u64) -> InFlight {
    InFlight {
        command_id: id(name),
        customer_id: "cus_1".into(),
        product_id: "itm_1".into(),
        credit_count: 32,
        amount: Some(amount),
        price_id: None,
        first_attempt_ms: first_ms,
    }
}

/// One situation: its letters (the first is judged; `bounded`, command,
/// matches), the log's `succeeded` events and commands in flight, and now.
struct Case {
    letters: Vec<(bool, Command, Result<Matches, String>)>,
    succeeded: Vec<Succeeded>,
    in_flight: Vec<InFlight>,
    now_ms: u64,
}

fn case(letters: Vec<(&str, Result<Matches, String>)>) -> Case {
    Case {
        letters: letters
            .into_iter()
            .map(|(name, m)| (true, command(name), m))
            .collect(),
        succeeded: Vec::new(),
        in_flight: Vec::new(),
        now_ms: LATER,
    }
}

impl Case {
    fn claims(mut self, claims: Vec<Succeeded>) -> Case {
        self.succeeded = claims;
        self
    }

    fn flying(mut self, commands: Vec<InFlight>) -> Case {
        self.in_flight = commands;
        self
    }

    fn at(mut self, now_ms: u64) -> Case {
        self.now_ms = now_ms;
        self
    }

    fn unbounded(mut self) -> Case {
        self.letters[0].0 = false;
        self
    }

    /// The verdict on the first letter, with the log complete since
    /// `since`.
    fn verdict(&self, since: Option<u64>) -> String {
        let letters: Vec<Letter<'_>> = self
            .letters
            .iter()
            .map(|(bounded, command, matches)| Letter {
                command,
                bounded: *bounded,
                matches,
            })
            .collect();
        let log = LogEvidence {
            succeeded: self.succeeded.clone(),
            in_flight: self.in_flight.clone(),
            complete_since_ms: since,
        };
        let timing = Timing {
            now_ms: self.now_ms,
            margin: MARGIN,
            unseen: UNSEEN,
            life: LIFE,
        };
        let ids = |candidates: &[Candidate]| {
            candidates
                .iter()
                .map(|c| c.transaction_id.as_str())
                .collect::<Vec<_>>()
                .join(",")
        };
        match &judge(&letters, &log, timing)[0] {
            ChargeLookup::NotCharged => "not charged".into(),
            ChargeLookup::Charged(c) => format!("charged {}", c.transaction_id),
            ChargeLookup::Uncertain { candidates, .. } => format!("person [{}]", ids(candidates)),
            ChargeLookup::TooYoung {
                candidates,
                run_again_after_ms,
                ..
            } => format!(
                "too young [{}] until +{} s",
                ids(candidates),
                (run_again_after_ms - T0) / 1000
            ),
        }
    }
}

/// Every rule: (row, case, the verdict with a log covering the
/// transactions, without one).
fn rows() -> Vec<(&'static str, Case, &'static str, &'static str)> {
    let with_possible = |invoice| {
        Ok(Matches {
            candidates: vec![t("t1")],
            possible: vec![possible("t2", invoice)],
        })
    };
    let only_possible = |invoice| {
        Ok(Matches {
            candidates: Vec::new(),
            possible: vec![possible("t2", invoice)],
        })
    };
    vec![
        (
            "no transaction",
            case(vec![("a", offered(&[]))]),
            "not charged",
            "not charged",
        ),
        (
            "one, nobody else's",
            case(vec![("a", offered(&["t1"]))]),
            "charged t1",
            "person [t1]",
        ),
        (
            "one, answered to another command",
            case(vec![("a", offered(&["t1"]))]).claims(vec![claim("t1", "b", false)]),
            "not charged",
            "not charged",
        ),
        (
            "one, reconciled to another command: no proof either way",
            case(vec![("a", offered(&["t1"]))]).claims(vec![claim("t1", "b", true)]),
            "person [t1]",
            "person [t1]",
        ),
        (
            "one, claimed by its own succeeded event",
            case(vec![("a", offered(&["t1"]))]).claims(vec![claim("t1", "a", false)]),
            "charged t1",
            "person [t1]",
        ),
        (
            "one, claimed by its id for another customer",
            case(vec![("a", offered(&["t1"]))]).claims(vec![Succeeded {
                customer_id: Some("cus_2".into()),
                ..claim("t1", "a", true)
            }]),
            "person [t1]",
            "person [t1]",
        ),
        (
            "one, also another letter's candidate",
            case(vec![("a", offered(&["t1"])), ("b", offered(&["t1", "t2"]))]),
            "person [t1]",
            "person [t1]",
        ),
        (
            "one, also another letter's possible charge",
            case(vec![("a", offered(&["t1"])), ("b", only_possible(true))]),
            "charged t1",
            "person [t1]",
        ),
        (
            "one, also a candidate of its own other letter",
            case(vec![("a", offered(&["t1"])), ("a", offered(&["t1"]))]),
            "charged t1",
            "person [t1]",
        ),
        (
            "several",
            case(vec![("a", offered(&["t1", "t2"]))]),
            "person [t1,t2]",
            "person [t1,t2]",
        ),
        (
            "several, all but one answered to others",
            case(vec![("a", offered(&["t1", "t2"]))]).claims(vec![claim("t2", "b", false)]),
            "charged t1",
            "person [t1]",
        ),
        (
            "several, all but one reconciled to others",
            case(vec![("a", offered(&["t1", "t2"]))]).claims(vec![claim("t2", "b", true)]),
            "person [t1,t2]",
            "person [t1,t2]",
        ),
        (
            "a candidate and a possible charge",
            case(vec![("a", with_possible(true))]),
            "person [t1]",
            "person [t1]",
        ),
        (
            "a candidate and a possible charge answered to another",
            case(vec![("a", with_possible(true))]).claims(vec![claim("t2", "b", false)]),
            "charged t1",
            "person [t1]",
        ),
        (
            "only a possible charge",
            case(vec![("a", only_possible(true))]),
            "person []",
            "person []",
        ),
        (
            "only a possible charge, answered to another",
            case(vec![("a", only_possible(true))]).claims(vec![claim("t2", "b", false)]),
            "not charged",
            "not charged",
        ),
        (
            "only a possible charge without an invoice: nothing can claim it",
            case(vec![("a", only_possible(false))]).claims(vec![claim("t2", "b", false)]),
            "person []",
            "person []",
        ),
        (
            "the listing unreadable",
            case(vec![("a", Err("HTTP 500".into()))]),
            "person []",
            "person []",
        ),
        (
            "a window with no known start, nothing in it",
            case(vec![("a", offered(&[]))]).unbounded(),
            "person []",
            "person []",
        ),
        (
            "a window with no known start, one candidate",
            case(vec![("a", offered(&["t1"]))]).unbounded(),
            "person [t1]",
            "person [t1]",
        ),
        (
            "one, younger than the unseen bound (with the clock margin)",
            case(vec![("a", offered(&["t1"]))]).at(T0 + 179_999),
            "too young [t1] until +180 s",
            "too young [t1] until +180 s",
        ),
        (
            "one, just old enough",
            case(vec![("a", offered(&["t1"]))]).at(T0 + 180_000),
            "charged t1",
            "person [t1]",
        ),
        (
            "one young, answered to another",
            case(vec![("a", offered(&["t1"]))])
                .at(T0 + 1)
                .claims(vec![claim("t1", "b", false)]),
            "not charged",
            "not charged",
        ),
        (
            "young, with a possible charge no event can claim",
            case(vec![("a", with_possible(false))]).at(T0 + 1),
            "person [t1]",
            "person [t1]",
        ),
        (
            "several, one young",
            case(vec![("a", offered(&["t1", "t2"]))]).at(T0 + 1),
            "too young [t1,t2] until +180 s",
            "too young [t1,t2] until +180 s",
        ),
        (
            "the same purchase in flight since before it",
            case(vec![("a", offered(&["t1"]))])
                .at(T0 + 200_000)
                .flying(vec![in_flight("b", T0 - 5_000, 24_000)]),
            "too young [t1] until +1055 s",
            "too young [t1] until +1055 s",
        ),
        (
            "the same purchase in flight past its life: lost, a person must look",
            case(vec![("a", offered(&["t1"]))]).flying(vec![in_flight("b", T0 - 5_000, 24_000)]),
            "person [t1]",
            "person [t1]",
        ),
        (
            "in flight since after it, beyond the clock margin",
            case(vec![("a", offered(&["t1"]))])
                .at(T0 + 200_000)
                .flying(vec![in_flight("b", T0 + 60_001, 24_000)]),
            "charged t1",
            "person [t1]",
        ),
        (
            "another purchase in flight",
            case(vec![("a", offered(&["t1"]))])
                .at(T0 + 200_000)
                .flying(vec![in_flight("b", T0 - 5_000, 1)]),
            "charged t1",
            "person [t1]",
        ),
        (
            "its own command in flight",
            case(vec![("a", offered(&["t1"]))])
                .at(T0 + 200_000)
                .flying(vec![in_flight("a", T0 - 5_000, 24_000)]),
            "charged t1",
            "person [t1]",
        ),
        (
            "nothing left: whatever is in flight",
            case(vec![("a", offered(&[]))]).flying(vec![in_flight("b", T0 - 5_000, 24_000)]),
            "not charged",
            "not charged",
        ),
    ]
}

#[test]
fn every_rule_with_and_without_a_results_log_covering_the_transactions() {
    for (row, case, with_log, without) in rows() {
        let covering = Some(T0 - 60_000);
        assert_eq!(case.verdict(covering), with_log, "{row}, log covers");
        let young = Some(T0 - 59_999);
        assert_eq!(case.verdict(young), without, "{row}, log too young");
        assert_eq!(case.verdict(None), without, "{row}, no log");
    }
}

#[test]
fn the_chain_a_b_c_settles_nobody() {
    // a:[t1], b:[t2], c:[t1, t2]: t1 could be a's or c's, t2 b's or c's.
    for by in 0..3 {
        let mut letters = vec![
            (true, command("a"), offered(&["t1"])),
            (true, command("b"), offered(&["t2"])),
            (true, command("c"), offered(&["t1", "t2"])),
        ];
        letters.rotate_left(by);
        let case = Case {
            letters,
            ..case(Vec::new())
        };
        assert!(
            case.verdict(Some(T0 - 60_000)).starts_with("person"),
            "{by}"
        );
    }
}

#[test]
fn a_succeeded_event_is_a_commands_own_only_for_its_customer_and_purchase() {
    let a = command("a");
    let own = claim("t1", "a", false);
    assert!(own.is_of(&a));
    let other_customer = Succeeded {
        customer_id: Some("cus_2".into()),
        ..own.clone()
    };
    assert!(!other_customer.is_of(&a));
    assert!(!other_customer.is_of(&command_of("a", "cus_3")));
    assert!(other_customer.is_of(&command_of("a", "cus_2")));
    let other_count = Succeeded {
        credit_count: Some(31),
        ..own.clone()
    };
    assert!(!other_count.is_of(&a));
    let unsaid = Succeeded {
        product_id: None,
        ..own
    };
    assert!(!unsaid.is_of(&a));
}
