//! `dead-letters reconcile`: for each dead letter whose charge is uncertain,
//! ask Hyperline's credit transactions whether it was charged (docs/contract.md
//! section 7).
//!
//! Uncertain means: dead-lettered by the worker as `unexpected_response` (a
//! 2xx, or an undocumented status, that did not say what happened), or as
//! `retries_exhausted` with a recorded first request that may have charged
//! (`cpw-first-attempt-ms`: a timeout, a dropped connection or a 5xx, then
//! either the whole budget spent or the 24-hour window refused). A
//! `retries_exhausted` dead letter without it never sent a request that
//! could charge, and an `invalid_command` never reached Hyperline: neither
//! is uncertain, and `dead-letters replay` is their tool.
//!
//! A transaction is a candidate when it is a `topup` from the `api` for the
//! command's customer, product, `credit_count` and amount (or price id),
//! recorded between the command's first request and its dead-lettering
//! (give or take [`CLOCK_SKEW`]). A transaction that is the only candidate of
//! another dead letter of the run is claimed by it and no candidate of the
//! others; one that is the only candidate of two is contested and settles
//! neither. The transactions do not carry the Idempotency-Key, and nothing
//! stores the `succeeded` events already published, so a charge of another
//! command with the same customer, product, count and amount in the same
//! span cannot be excluded: it makes the dead letter ambiguous, never
//! wrongly settled.
//!
//! Then: exactly one candidate → its `succeeded` event (`"reconciled":
//! true`, the transaction's invoice and `balance_after`) is published and
//! confirmed, and only then the dead letter is removed; none → the command
//! is replayed with its history reset (no `cpw-first-attempt-ms`: Hyperline
//! holds no charge under its key, so a new first request is safe even past
//! the 24-hour window); several, or a listing that could not be read → it
//! stays, and the candidates are printed for a person.
//!
//! A dry run by default: it reads and prints what it would do, and puts every
//! dead letter back. The reads are paced within Hyperline's read limit
//! (200 per 10 s) and a listing is read once per customer and product.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use lapin::Connection;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use serde::Serialize;

use super::ConnectError;
use super::dead_letters::{put_back, take_all};
use crate::broker::history::{DEAD_LETTERED_HEADER, ERROR_CODE_HEADER};
use crate::broker::{
    DeliveryHistory, HistoryKeys, Message, Provenance, PublishError, Publisher, Topology,
    copy_properties, header_str, header_u64,
};
use crate::cli::ReconcileArgs;
use crate::configuration::{ConfigError, Settings};
use crate::contract::{Command, ErrorCode, ResultEvent};
use crate::hyperline::gate::Gate;
use crate::hyperline::matching::{CLOCK_SKEW, Candidate, Span, candidates};
use crate::hyperline::{
    ClientError, CreditTransaction, HyperlineClient, MAX_PAGES, READS_PER_SECOND, ReadBounds,
};

/// Why the run could not be done.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The settings could not be loaded, or name no API key.
    #[error("{0}")]
    Config(ConfigError),
    /// The Hyperline client could not be built.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The broker could not be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The dead-letter queue could not be read.
    #[error(transparent)]
    DeadLetters(#[from] super::dead_letters::Error),
    /// A channel operation failed.
    #[error("broker error: {}", super::broker_says(.0))]
    Broker(lapin::Error),
}

super::wrap_error!(Error::Config(ConfigError));
super::wrap_error!(Error::Broker(lapin::Error));

/// What the transactions say about one dead letter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Found {
    /// Exactly one candidate.
    Charged,
    /// None (or only ones claimed by other dead letters).
    NotCharged,
    /// Several, or one contested by another dead letter.
    Ambiguous,
    /// The listing could not be read, or the command's span is unknown.
    Unreadable,
}

impl Found {
    fn label(self) -> &'static str {
        match self {
            Found::Charged => "charged",
            Found::NotCharged => "not charged",
            Found::Ambiguous => "ambiguous",
            Found::Unreadable => "unreadable",
        }
    }
}

/// One uncertain dead letter, as printed (`--json` prints exactly this).
#[derive(Clone, Debug, Serialize)]
struct Row {
    command_id: String,
    customer_id: String,
    product_id: String,
    error_code: &'static str,
    /// The command's first request that may have charged (RFC 3339).
    first_attempt: Option<String>,
    found: Found,
    /// What was done (or, in a dry run, would be).
    action: String,
    /// Whether the action was carried out.
    applied: bool,
    /// The charge, when exactly one was found.
    transaction_id: Option<String>,
    invoice_id: Option<String>,
    new_credit_balance: Option<u64>,
    /// The candidates of an ambiguous dead letter.
    candidates: Vec<Candidate>,
    /// Why it is ambiguous or unreadable.
    reason: Option<String>,
}

/// An uncertain dead letter while the run works on it.
struct Entry {
    delivery: Delivery,
    command: Command,
    code: ErrorCode,
    history: DeliveryHistory,
    matching: Matching,
}

/// What the transactions offer one dead letter.
#[derive(Clone, Debug)]
struct Matching {
    /// Its candidates, or why none could be known.
    candidates: Result<Vec<Candidate>, String>,
    /// The one it claimed.
    claim: Option<Candidate>,
}

impl AsMut<Matching> for Entry {
    fn as_mut(&mut self) -> &mut Matching {
        &mut self.matching
    }
}

impl AsMut<Matching> for Matching {
    fn as_mut(&mut self) -> &mut Matching {
        self
    }
}

/// What the run did, for the summary.
#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    /// Dead letters that are not uncertain, left alone.
    others: usize,
    /// Listings read (one per customer and product).
    listings: usize,
}

/// `dead-letters reconcile`. Exit status 1 when a dead letter was left for
/// a person (ambiguous, unreadable, or an action that failed).
pub async fn run(config: Option<&Path>, args: ReconcileArgs) -> Result<ExitCode, Error> {
    let settings = Settings::load(config)?;
    let key = settings.require_api_key()?.clone();
    let client = HyperlineClient::new(&settings.hyperline, key)?;
    let topology = Topology::new(&settings.amqp, &settings.retry.redelivery_delays_secs);
    let connection = super::connect(&settings.amqp, "dead-letters reconcile").await?;
    let result = reconcile_on(&connection, &settings, &topology, &client, args.apply).await;
    super::close(&connection).await;
    let report = result?;
    if args.json {
        for row in &report.rows {
            println!("{}", serde_json::to_string(row).unwrap_or_default());
        }
    } else {
        print!("{}", render(&report, &topology.dead, args.apply));
    }
    let left = report.rows.iter().any(|r| {
        matches!(r.found, Found::Ambiguous | Found::Unreadable) || (args.apply && !r.applied)
    });
    Ok(if left {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Reads the dead letters, looks the uncertain ones up, acts (with `apply`)
/// and puts back everything not acted on.
async fn reconcile_on(
    connection: &std::sync::Arc<Connection>,
    settings: &Settings,
    topology: &Topology,
    client: &HyperlineClient,
    apply: bool,
) -> Result<Report, Error> {
    let keys = &HistoryKeys::require(settings)?;
    let channel = connection.create_channel().await?;
    let publisher = Publisher::open(
        std::sync::Arc::clone(connection),
        settings.amqp.confirm_timeout(),
    )
    .await?;
    let held = take_all(&channel, &topology.dead).await?;
    let mut report = Report::default();
    let mut keep = Vec::new();
    let mut entries = Vec::new();
    for delivery in held {
        match uncertain(&delivery, keys) {
            Some((command, code, history)) => entries.push(Entry {
                delivery,
                command,
                code,
                history,
                matching: Matching {
                    candidates: Ok(Vec::new()),
                    claim: None,
                },
            }),
            None => {
                report.others += 1;
                keep.push(delivery);
            }
        }
    }
    let listings = read_listings(client, settings, &entries).await;
    report.listings = listings.len();
    let now = super::now_ms();
    for entry in &mut entries {
        entry.matching.candidates = match entry.history.first_attempt_ms {
            None => Err("no cpw-first-attempt-ms: the span to search is unknown".into()),
            Some(from_ms) => {
                let key = pair(&entry.command);
                match listings.get(&key) {
                    Some(Ok(listing)) => {
                        let headers = entry.delivery.properties.headers().as_ref();
                        let until_ms = header_u64(headers, DEAD_LETTERED_HEADER).unwrap_or(now);
                        let span = Span { from_ms, until_ms };
                        Ok(candidates(&entry.command, listing, span))
                    }
                    Some(Err(e)) => Err(e.clone()),
                    None => Err("the listing was not read".into()),
                }
            }
        };
    }
    claim(&mut entries);
    for entry in entries {
        let (row, delivery) = settle_entry(entry, &publisher, topology, keys, apply).await;
        if let Some(delivery) = delivery {
            keep.push(delivery);
        }
        report.rows.push(row);
    }
    put_back(&keep).await?;
    let _ = channel.close(200, "reconciled".into()).await;
    Ok(report)
}

/// The command, code and history of a dead letter whose charge is
/// uncertain; `None` for any other.
/// A letter whose stamp does not verify is not the worker's: left alone.
fn uncertain(
    delivery: &Delivery,
    keys: &HistoryKeys,
) -> Option<(Command, ErrorCode, DeliveryHistory)> {
    let headers = delivery.properties.headers().as_ref();
    let message = Message::of(&delivery.properties, &delivery.data);
    let (history, provenance) = DeliveryHistory::read(message, Some(keys));
    if provenance != Provenance::Verified {
        return None;
    }
    let code = header_str(headers, ERROR_CODE_HEADER)
        .as_deref()
        .and_then(ErrorCode::parse)?;
    let is_uncertain = match code {
        ErrorCode::UnexpectedResponse => true,
        ErrorCode::RetriesExhausted => history.first_attempt_ms.is_some(),
        _ => false,
    };
    let message_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|m| m.as_str());
    let command = Command::parse(&delivery.data, message_id).ok()?;
    is_uncertain.then_some((command, code, history))
}

fn pair(command: &Command) -> (String, String) {
    (
        command.customer_id.as_str().to_owned(),
        command.product_id.as_str().to_owned(),
    )
}

/// The transactions of every customer and product concerned, each read
/// once, one after the other through a gate at Hyperline's read pace.
async fn read_listings(
    client: &HyperlineClient,
    settings: &Settings,
    entries: &[Entry],
) -> BTreeMap<(String, String), Result<Vec<CreditTransaction>, String>> {
    let gate = Gate::new(READS_PER_SECOND, settings.hyperline.timeout());
    let bounds = ReadBounds {
        attempts: settings.retry.attempts.max(1),
        initial_backoff: Duration::from_millis(settings.retry.initial_backoff_ms),
        max_backoff: Duration::from_millis(settings.retry.max_backoff_ms),
        max_pages: MAX_PAGES,
    };
    let mut listings = BTreeMap::new();
    for entry in entries {
        let key = pair(&entry.command);
        if listings.contains_key(&key) || entry.history.first_attempt_ms.is_none() {
            continue;
        }
        let listing = client
            .transactions(
                &entry.command.customer_id,
                &entry.command.product_id,
                &gate,
                bounds,
            )
            .await
            .map_err(|e| format!("cannot read the credit transactions: {e}"));
        listings.insert(key, listing);
    }
    listings
}

/// Gives each dead letter the transaction that can only be its own: one
/// that is its only candidate not claimed yet, and no other dead letter's
/// only one. Repeated until nothing changes, so a claim can settle another.
fn claim<T: AsMut<Matching>>(entries: &mut [T]) {
    let mut claimed: HashSet<String> = HashSet::new();
    loop {
        let only: Vec<Option<String>> = entries
            .iter_mut()
            .map(|e| {
                let m = e.as_mut();
                match (&m.claim, &m.candidates) {
                    (None, Ok(found)) => {
                        let mut open = found
                            .iter()
                            .filter(|c| !claimed.contains(&c.transaction_id));
                        match (open.next(), open.next()) {
                            (Some(one), None) => Some(one.transaction_id.clone()),
                            _ => None,
                        }
                    }
                    _ => None,
                }
            })
            .collect();
        let mut changed = false;
        for (i, id) in only.iter().enumerate() {
            let Some(id) = id else { continue };
            let contested = only
                .iter()
                .enumerate()
                .any(|(j, other)| j != i && other.as_ref() == Some(id));
            if contested || claimed.contains(id) {
                continue;
            }
            let m = entries[i].as_mut();
            if let Ok(found) = &m.candidates {
                m.claim = found.iter().find(|c| &c.transaction_id == id).cloned();
                claimed.insert(id.clone());
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    for entry in entries.iter_mut() {
        let m = entry.as_mut();
        if m.claim.is_none()
            && let Ok(found) = &mut m.candidates
        {
            found.retain(|c| !claimed.contains(&c.transaction_id));
        }
    }
}

/// Acts on one dead letter (with `apply`) and gives back its row, and the
/// delivery when it stays in the queue.
async fn settle_entry(
    entry: Entry,
    publisher: &Publisher,
    topology: &Topology,
    keys: &HistoryKeys,
    apply: bool,
) -> (Row, Option<Delivery>) {
    let Entry {
        delivery,
        command,
        code,
        history,
        matching: Matching { candidates, claim },
    } = entry;
    let id = command.id.as_str().to_owned();
    let mut row = Row {
        command_id: id.clone(),
        customer_id: command.customer_id.as_str().to_owned(),
        product_id: command.product_id.as_str().to_owned(),
        error_code: code.as_str(),
        first_attempt: history.first_attempt_ms.and_then(super::rfc3339_ms),
        found: Found::Unreadable,
        action: "left for a person".into(),
        applied: false,
        transaction_id: None,
        invoice_id: None,
        new_credit_balance: None,
        candidates: Vec::new(),
        reason: None,
    };
    let outcome = match (claim, candidates) {
        (Some(found), _) => {
            row.found = Found::Charged;
            row.transaction_id = Some(found.transaction_id.clone());
            row.invoice_id = Some(found.invoice_id.clone());
            row.new_credit_balance = Some(found.balance_after);
            row.action = "publish succeeded (reconciled), remove the dead letter".into();
            eprintln!(
                "{}: command_id={id} transaction_id={} invoice_id={} charged: publishing its succeeded event (reconciled)",
                mode(apply),
                found.transaction_id,
                found.invoice_id
            );
            match apply {
                false => None,
                true => {
                    let event = ResultEvent::reconciled(
                        &command,
                        found.invoice_id,
                        found.balance_after,
                        history.attempts.max(1),
                    );
                    Some(publish_event(publisher, topology, &delivery, &event).await)
                }
            }
        }
        (None, Ok(found)) if found.is_empty() => {
            row.found = Found::NotCharged;
            row.action = "replay with its history reset".into();
            eprintln!(
                "{}: command_id={id} transaction_id=- no matching charge: replaying it with its history reset",
                mode(apply)
            );
            match apply {
                false => None,
                true => {
                    let message = Message::of(&delivery.properties, &delivery.data);
                    let headers = DeliveryHistory::fresh_start(message, None, keys);
                    let properties = copy_properties(&delivery.properties, headers);
                    Some(
                        publisher
                            .publish_routed("", &topology.queue, &delivery.data, properties)
                            .await,
                    )
                }
            }
        }
        (None, Ok(found)) => {
            row.found = Found::Ambiguous;
            let ids: Vec<&str> = found.iter().map(|c| c.transaction_id.as_str()).collect();
            eprintln!(
                "{}: command_id={id} transaction_id={} ambiguous: left for a person",
                mode(apply),
                ids.join(",")
            );
            row.reason = Some(format!(
                "{} matching transactions: cannot tell which (if any) is this command's",
                found.len()
            ));
            row.candidates = found;
            None
        }
        (None, Err(reason)) => {
            eprintln!(
                "{}: command_id={id} transaction_id=- unreadable: {reason}; left for a person",
                mode(apply)
            );
            row.reason = Some(reason);
            None
        }
    };
    match outcome {
        None => (row, Some(delivery)),
        // Acked only now: until its event or copy is confirmed, the dead
        // letter is the only trace of the command.
        Some(Ok(())) => match delivery.acker.ack(BasicAckOptions::default()).await {
            Ok(_) => {
                row.applied = true;
                row.action = match row.found {
                    Found::Charged => "published succeeded (reconciled), dead letter removed",
                    _ => "replayed with its history reset",
                }
                .into();
                eprintln!("applied: command_id={id} {}", row.action);
                (row, None)
            }
            Err(e) => {
                // The event or copy is out and the dead letter comes back:
                // a duplicate, which consumers and the Idempotency-Key absorb.
                row.action = format!("done, but the dead letter could not be removed: {e}");
                (row, None)
            }
        },
        Some(Err(e)) => {
            row.action = format!("failed ({e}): the dead letter stays");
            eprintln!("failed: command_id={id} {e}");
            (row, Some(delivery))
        }
    }
}

fn mode(apply: bool) -> &'static str {
    match apply {
        true => "apply",
        false => "dry run",
    }
}

/// Publishes the event to the results exchange, and to the command's
/// `reply_to` when it had one, as the worker would, confirmed.
async fn publish_event(
    publisher: &Publisher,
    topology: &Topology,
    delivery: &Delivery,
    event: &ResultEvent,
) -> Result<(), PublishError> {
    let headers = delivery.properties.headers().as_ref();
    let traceparent = header_str(headers, "traceparent");
    let body = event.to_json();
    let props = event.amqp_properties(traceparent.as_deref());
    let exchange = &topology.results_exchange;
    let sent = publisher
        .send(exchange, event.routing_key(), &body, props.clone())
        .await?;
    publisher.confirm(exchange, sent).await?;
    if let Some(queue) = delivery
        .properties
        .reply_to()
        .as_ref()
        .map(|r| r.as_str())
        .filter(|r| !r.is_empty())
    {
        let sent = publisher.send("", queue, &body, props).await?;
        publisher.confirm(queue, sent).await?;
    }
    Ok(())
}

/// The table, the candidates of the ambiguous ones, and the summary.
fn render(report: &Report, dead: &str, apply: bool) -> String {
    let mut out = String::new();
    if report.rows.is_empty() {
        out.push_str(&format!(
            "no uncertain dead letter in {dead} ({} other(s) left alone)\n",
            report.others
        ));
        return out;
    }
    let header = [
        "COMMAND ID",
        "CODE",
        "FIRST ATTEMPT",
        "FOUND",
        "TRANSACTION",
        "INVOICE",
        "ACTION",
    ]
    .map(String::from);
    let dash = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".into());
    let rows: Vec<[String; 7]> = report
        .rows
        .iter()
        .map(|r| {
            let action = match (apply, r.found) {
                (false, Found::Charged | Found::NotCharged) => format!("would {}", r.action),
                _ => r.action.clone(),
            };
            [
                r.command_id.clone(),
                r.error_code.to_owned(),
                dash(&r.first_attempt),
                r.found.label().to_owned(),
                dash(&r.transaction_id),
                dash(&r.invoice_id),
                action,
            ]
        })
        .collect();
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (cell, w) in row.iter().zip(widths) {
            line.push_str(&format!("{cell:<w$}  "));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    for r in report.rows.iter().filter(|r| r.reason.is_some()) {
        out.push_str(&format!(
            "\n{} ({}): {}\n",
            r.command_id,
            r.found.label(),
            dash(&r.reason)
        ));
        for c in &r.candidates {
            let at = c
                .created_at
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            out.push_str(&format!(
                "  candidate {}  invoice {}  balance_after {}  created_at {at}\n",
                c.transaction_id, c.invoice_id, c.balance_after
            ));
        }
    }
    let count = |f: Found| report.rows.iter().filter(|r| r.found == f).count();
    out.push_str(&format!(
        "\n{}: {} uncertain dead letter(s) in {dead}: {} charged, {} not charged, {} ambiguous, \
         {} unreadable; {} other(s) left alone; {} listing(s) read (clock skew allowed: {} s)\n",
        match apply {
            true => "applied",
            false => "dry run",
        },
        report.rows.len(),
        count(Found::Charged),
        count(Found::NotCharged),
        count(Found::Ambiguous),
        count(Found::Unreadable),
        report.others,
        report.listings,
        CLOCK_SKEW.as_secs(),
    ));
    if !apply {
        out.push_str("nothing was changed: run with --apply to act\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(id: &str) -> Candidate {
        Candidate {
            transaction_id: id.into(),
            invoice_id: format!("inv_{id}"),
            balance_after: 1,
            created_at: time::OffsetDateTime::UNIX_EPOCH,
        }
    }

    fn offered(ids: &[&str]) -> Matching {
        Matching {
            candidates: Ok(ids.iter().map(|id| candidate(id)).collect()),
            claim: None,
        }
    }

    fn claims(entries: &[Matching]) -> Vec<Option<&str>> {
        entries
            .iter()
            .map(|m| m.claim.as_ref().map(|c| c.transaction_id.as_str()))
            .collect()
    }

    #[test]
    fn a_claim_settles_the_others_and_a_contested_one_settles_nobody() {
        // a's only candidate is t1; that leaves b with t2; c's t1 is gone.
        let mut run = vec![
            offered(&["t1"]),
            offered(&["t1", "t2"]),
            offered(&["t2", "t3"]),
        ];
        claim(&mut run);
        assert_eq!(claims(&run), [Some("t1"), Some("t2"), Some("t3")]);

        // Both have only t1: either could be its owner.
        let mut contested = vec![offered(&["t1"]), offered(&["t1"])];
        claim(&mut contested);
        assert_eq!(claims(&contested), [None, None]);
        assert!(
            contested
                .iter()
                .all(|m| m.candidates.as_ref().is_ok_and(|c| c.len() == 1))
        );

        // Every candidate of the last is claimed by others: not charged.
        let mut only_others = vec![offered(&["t1"]), offered(&["t2"]), offered(&["t1", "t2"])];
        claim(&mut only_others);
        assert_eq!(claims(&only_others), [Some("t1"), Some("t2"), None]);
        assert_eq!(only_others[2].candidates.as_ref().map(Vec::len), Ok(0));
    }
}
