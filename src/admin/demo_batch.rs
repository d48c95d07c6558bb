//! The demo's workload and its scorecard.
//!
//! A demo that only shows successes proves little; this one mixes in what
//! production sends too (malformed commands, an unknown customer, an answer
//! that is not the documented shape) on top of the simulator's random 5xx,
//! and then checks the one promise that matters: the simulator's ledger holds
//! exactly one charge per succeeded command, however many retries it took.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::contract::EventKind;
use crate::simulator::{Ledger, RequestRecord, ScriptedResponse};

/// The customer the simulator answers `404` for, as Hyperline does for a
/// customer that does not exist.
pub const UNKNOWN_CUSTOMER: &str = "cus_demo_unknown";
/// The customer the simulator answers a `201` of the wrong shape for: the
/// worker cannot know whether it was charged, so it dead-letters the command.
pub const GARBLED_CUSTOMER: &str = "cus_demo_garbled";

/// The simulator's canned answers for the two customers above.
pub fn scripted() -> Vec<ScriptedResponse> {
    vec![
        ScriptedResponse {
            customer_id: Some(UNKNOWN_CUSTOMER.to_owned()),
            status: 404,
            body: json!({"message": "Customer not found"}),
            headers: BTreeMap::new(),
            times: None,
        },
        ScriptedResponse {
            customer_id: Some(GARBLED_CUSTOMER.to_owned()),
            status: 201,
            body: json!({"status": "ok"}),
            headers: BTreeMap::new(),
            times: None,
        },
    ]
}

/// One command of the batch: the id its event will carry, and its body.
pub struct Sample {
    /// `command_id` as written (an invalid one for some invalid commands).
    pub id: String,
    /// The AMQP body.
    pub body: Vec<u8>,
}

/// `n` commands: one in 20 invalid (five different ways), one in 25 for the
/// unknown customer, one in 50 with a garbled answer, the rest valid, priced
/// by amount or by bundle price.
pub fn batch(n: u32) -> Vec<Sample> {
    (0..n).map(sample).collect()
}

fn sample(i: u32) -> Sample {
    let mut id = uuid::Uuid::new_v4().to_string();
    let credits = 10 + u64::from(i % 9) * 5;
    let mut body = json!({
        "command_id": id,
        "customer_id": format!("cus_demo_{:03}", i % 40),
        "product_id": "itm_demo_credits",
        "credit_count": credits,
        "amount_excluding_tax": credits * 75,
        "price_id": null,
        "expires_at": null,
    });
    if i % 5 == 4 {
        body["amount_excluding_tax"] = Value::Null;
        body["price_id"] = json!("price_demo_pack");
    }
    // The residues mod 5 (2, 3, 1) keep the three kinds apart.
    if i % 20 == 7 {
        match (i / 20) % 5 {
            0 => {
                id = format!("demo bad id {i}");
                body["command_id"] = json!(id);
            }
            1 => body["credit_count"] = json!(0),
            2 => body["price_id"] = json!("price_demo_pack"),
            3 => body["customer_id"] = json!("cus_demo/../admin"),
            _ => body["expires_at"] = json!("next tuesday"),
        }
    } else if i % 25 == 3 {
        body["customer_id"] = json!(UNKNOWN_CUSTOMER);
    } else if i % 50 == 11 {
        body["customer_id"] = json!(GARBLED_CUSTOMER);
    }
    Sample {
        id,
        body: body.to_string().into_bytes(),
    }
}

/// What came back, per command id.
pub struct Scorecard {
    published: usize,
    started: Instant,
    sent: HashMap<String, Instant>,
    /// `succeeded` or the error code, and publish → event latency.
    results: HashMap<String, (String, Duration)>,
    last_result: Option<Instant>,
}

impl Scorecard {
    /// A card for a batch about to be published.
    pub fn new(published: usize) -> Self {
        Scorecard {
            published,
            started: Instant::now(),
            sent: HashMap::new(),
            results: HashMap::new(),
            last_result: None,
        }
    }

    /// Notes when a command was handed to the broker.
    pub fn sent(&mut self, id: &str, at: Instant) {
        self.sent.insert(id.to_owned(), at);
    }

    /// Records an event received at `at`; true when it is the first result
    /// of one of our commands (at-least-once delivery may repeat it).
    pub fn record(&mut self, event: &Value, at: Instant) -> bool {
        let Some(id) = event["command_id"].as_str() else {
            return false;
        };
        let Some(sent) = self.sent.get(id) else {
            return false;
        };
        if self.results.contains_key(id) {
            return false;
        }
        let outcome = if event["type"].as_str() == Some(EventKind::Succeeded.as_str()) {
            "succeeded".to_owned()
        } else {
            event["error"]["code"]
                .as_str()
                .unwrap_or("failed")
                .to_owned()
        };
        self.results.insert(
            id.to_owned(),
            (outcome, at.saturating_duration_since(*sent)),
        );
        self.last_result = Some(at);
        true
    }

    /// Every command has its result.
    pub fn complete(&self) -> bool {
        self.results.len() >= self.published
    }

    /// The commands still without a result.
    pub fn missing(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self
            .sent
            .keys()
            .filter(|id| !self.results.contains_key(*id))
            .map(String::as_str)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// The summary, with the ledger as the simulator saw it at the end.
    pub fn summary(&self, ledger: &Ledger, requests: &[RequestRecord]) -> Summary {
        let succeeded: HashSet<&str> = self
            .results
            .iter()
            .filter(|(_, (outcome, _))| outcome == "succeeded")
            .map(|(id, _)| id.as_str())
            .collect();
        let mut failed = BTreeMap::new();
        for (outcome, _) in self.results.values().filter(|(o, _)| o != "succeeded") {
            *failed.entry(outcome.clone()).or_insert(0) += 1;
        }
        let keys: HashSet<&str> = requests
            .iter()
            .filter_map(|r| r.idempotency_key.as_deref())
            .collect();
        let once_each = succeeded.iter().all(|id| ledger.charges_for(id) == 1);
        let mut latencies: Vec<Duration> = self.results.values().map(|(_, l)| *l).collect();
        latencies.sort_unstable();
        let span = self.last_result.map_or(Duration::ZERO, |l| {
            l.saturating_duration_since(self.started)
        });
        Summary {
            published: self.published,
            succeeded: succeeded.len(),
            failed,
            missing: self.published.saturating_sub(self.results.len()),
            requests: requests.len(),
            faults: ledger.faults,
            retried: requests.len().saturating_sub(keys.len()),
            charges: ledger.charges.len(),
            charges_match: once_each && ledger.charges.len() == succeeded.len(),
            throughput: self.results.len() as f64 / span.as_secs_f64().max(0.001),
            p50: percentile(&latencies, 50),
            p99: percentile(&latencies, 99),
        }
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

/// Why the batch holds commands that fail, by error code: the demo's own
/// doing, so the summary says so instead of leaving them to read as faults
/// of the worker.
fn on_purpose(code: &str) -> Option<&'static str> {
    match code {
        "invalid_command" => Some("malformed samples"),
        "rejected" => Some("an unknown customer (404)"),
        "unexpected_response" => Some("a garbled 201, kept for an operator"),
        _ => None,
    }
}

/// The demo's result, printed as an aligned table.
pub struct Summary {
    published: usize,
    succeeded: usize,
    failed: BTreeMap<String, usize>,
    missing: usize,
    requests: usize,
    /// The simulator's injected 5xx answers (its `fail_rate`).
    faults: u64,
    retried: usize,
    charges: usize,
    charges_match: bool,
    throughput: f64,
    p50: Duration,
    p99: Duration,
}

impl Summary {
    /// Every command answered and charged exactly once per success.
    pub fn ok(&self) -> bool {
        self.charges_match && self.missing == 0
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Duration| format!("{} ms", d.as_millis());
        let row = |f: &mut fmt::Formatter<'_>, label: &str, value: String, note: &str| {
            let line = format!("  {label:<26}{value:>16}  {note}");
            writeln!(f, "{}", line.trim_end())
        };
        writeln!(f, "demo summary")?;
        row(f, "commands published", self.published.to_string(), "")?;
        row(f, "succeeded", self.succeeded.to_string(), "")?;
        let failed: usize = self.failed.values().sum();
        let all_on_purpose = self.failed.keys().all(|code| on_purpose(code).is_some());
        let note = if failed > 0 && all_on_purpose {
            "all on purpose:"
        } else {
            ""
        };
        row(f, "failed", failed.to_string(), note)?;
        for (code, n) in &self.failed {
            let why = on_purpose(code).map(|why| format!("  {why}"));
            row(
                f,
                &format!("  {code}"),
                n.to_string(),
                &why.unwrap_or_default(),
            )?;
        }
        let faults = "5xx answers from the simulator, retried";
        row(f, "injected faults", self.faults.to_string(), faults)?;
        if self.missing > 0 {
            row(f, "no result", self.missing.to_string(), "✗")?;
        }
        let retried = format!("of {} requests to the simulator", self.requests);
        row(f, "retried requests", self.retried.to_string(), &retried)?;
        let (mark, note) = match self.charges_match {
            true => ("✓", "one per succeeded command"),
            false => ("✗", "NOT one per succeeded command"),
        };
        let note = format!("{mark} {note} ({})", self.succeeded);
        row(f, "charges in the ledger", self.charges.to_string(), &note)?;
        row(
            f,
            "throughput",
            format!("{:.1}", self.throughput),
            "commands/s",
        )?;
        row(
            f,
            "latency p50 / p99",
            format!("{} / {}", ms(self.p50), ms(self.p99)),
            "publish → event",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::Command;

    #[test]
    fn the_batch_mixes_valid_and_invalid_commands() {
        let batch = batch(300);
        let invalid = batch
            .iter()
            .filter(|s| Command::parse(&s.body, None).is_err())
            .count();
        assert_eq!(invalid, 15);
        let ids: HashSet<&str> = batch.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids.len(), 300, "ids are unique");
    }

    /// The summary's lines with the alignment folded to one space.
    fn summary(failed: &[(&str, usize)]) -> Vec<String> {
        let text = Summary {
            published: 10,
            succeeded: 7,
            failed: failed.iter().map(|(c, n)| ((*c).to_owned(), *n)).collect(),
            missing: 0,
            requests: 12,
            faults: 2,
            retried: 2,
            charges: 7,
            charges_match: true,
            throughput: 1.0,
            p50: Duration::ZERO,
            p99: Duration::ZERO,
        }
        .to_string();
        text.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    }

    #[test]
    fn the_summary_counts_the_demos_own_failures_as_such() {
        let designed = summary(&[("invalid_command", 2), ("unexpected_response", 1)]);
        for line in [
            "failed 3 all on purpose:",
            "invalid_command 2 malformed samples",
            "unexpected_response 1 a garbled 201, kept for an operator",
            "injected faults 2 5xx answers from the simulator, retried",
        ] {
            assert!(designed.iter().any(|l| l == line), "{line}: {designed:#?}");
        }
        // A failure the batch does not make is not passed off as one.
        let real = summary(&[("invalid_command", 2), ("retries_exhausted", 1)]);
        assert!(real.iter().any(|l| l == "failed 3"), "{real:#?}");
        assert!(real.iter().any(|l| l == "retries_exhausted 1"), "{real:#?}");
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&values, 50), Duration::from_millis(50));
        assert_eq!(percentile(&values, 99), Duration::from_millis(99));
        assert_eq!(percentile(&values[..1], 99), Duration::from_millis(1));
        assert_eq!(percentile(&[], 50), Duration::ZERO);
    }
}
