//! What can be read off one dead letter: why and when it died, which command
//! it is, and where its 24-hour idempotency window started.
//!
//! RabbitMQ records a dead letter's history in headers (`x-death`, an array of
//! tables, most recent first; `x-first-death-*`), and the worker adds its own
//! (`cpw-*`). Both `list` and `replay` need the same reading, and `replay`
//! needs the opposite too: a copy stripped of that history, so the worker
//! gives it a fresh retry budget and the broker does not take it for a
//! dead-letter cycle.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};
use serde::Serialize;

use crate::broker::history::{
    DEAD_LETTERED_HEADER, DELIVERED_COUNT_HEADER, DELIVERY_COUNT_HEADER, ERROR_CODE_HEADER,
    QUEUE_HEADER, REPLICA_HEADER,
};
use crate::broker::{
    DeliveryHistory, HistoryKeys, Message, Provenance, Topology, copy_properties, header_str,
    header_u64,
};
use crate::configuration::IDEMPOTENCY_WINDOW;
use crate::contract::{Command, ErrorCode};

/// Besides the worker's in-process budget, how much younger than 24 hours a
/// command must be to be replayed without `--force`: the copy may wait in a
/// backlog before a worker takes it.
pub const REPLAY_MARGIN: Duration = Duration::from_secs(60 * 60);

/// One dead letter, as `list` shows it (`--json` prints exactly this).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct DeadLetterInfo {
    /// The body's `command_id`, else the `message_id`.
    pub command_id: Option<String>,
    /// Why the broker dead-lettered it on its own (`expired`,
    /// `delivery_limit`, `maxlen`), from the latest `x-death` entry. Absent
    /// for a letter the worker rejected or dead-lettered: its `error_code`
    /// says why, in one field.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_reason: Option<String>,
    /// The queue it was consumed from (the worker's stamp) or died in.
    pub queue: Option<String>,
    /// The lane whose commands queue that is, where `replay` puts it back;
    /// `None` when it is no configured lane's (`replay` then puts it in the
    /// first lane). Known only to [`inspect_in`], which knows the lanes.
    pub lane: Option<String>,
    /// When it first died (RFC 3339, UTC): the worker's stamp, else the
    /// earliest `x-death` entry.
    pub died_at: Option<String>,
    /// How many times it died there for its latest reason (`x-death` only).
    pub count: Option<u64>,
    /// The worker's error code: its stamp (`cpw-error-code`), else what the
    /// message alone tells (an unparseable body is `invalid_command`; a
    /// command that went through every delay step is `retries_exhausted`).
    pub error_code: Option<&'static str>,
    /// Why the body is not a valid command, when it is not.
    pub invalid_reason: Option<String>,
    /// What the code means for this letter, in words: what went wrong and
    /// which tool settles it.
    pub detail: Option<String>,
    /// The HTTP status of the latest answer (`cpw-last-status`).
    pub last_status: Option<u16>,
    /// HTTP requests made for it, per the worker (`cpw-attempts`).
    pub attempts: Option<u64>,
    /// When its first request that may have charged was made (RFC 3339,
    /// `cpw-first-attempt-ms`); empty when its first request is unknown.
    pub first_attempt: Option<String>,
    /// When its latest request was made (RFC 3339, `cpw-last-attempt-ms`).
    pub last_attempt: Option<String>,
    /// Delivered to a worker at least once with no first request recorded
    /// before its deliveries: a request may have charged before
    /// [`DeadLetterInfo::unrecorded_before`], and its first request (the
    /// start of its window) is unknown. Never "no request could have charged".
    pub first_request_unknown: bool,
    /// When it is: the moment before which a request no history records may
    /// have been made (RFC 3339): the worker's stamp (`cpw-unrecorded-before-ms`),
    /// else its death.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unrecorded_before: Option<String>,
    /// The replica (broker connection name) that dead-lettered it.
    pub replica: Option<String>,
    /// Unix milliseconds of [`DeadLetterInfo::first_attempt`].
    #[serde(skip)]
    pub first_attempt_ms: Option<u64>,
    /// Unix milliseconds of [`DeadLetterInfo::unrecorded_before`].
    #[serde(skip)]
    pub unrecorded_before_ms: Option<u64>,
    /// Unix milliseconds of [`DeadLetterInfo::died_at`].
    #[serde(skip)]
    pub died_ms: Option<u64>,
    /// Dead-lettered by the worker with its history stamped on: without a
    /// first attempt, and unless its first request is unknown, no request
    /// that may have charged was ever made.
    #[serde(skip)]
    pub stamped: bool,
}

/// [`inspect`] by a tool that knows the topology: the delay steps from it,
/// and the letter's lane.
pub fn inspect_in(
    topology: &Topology,
    delivery: &Delivery,
    keys: Option<&HistoryKeys>,
) -> DeadLetterInfo {
    let mut info = inspect(&delivery.data, &delivery.properties, topology.steps(), keys);
    info.lane = info
        .queue
        .as_deref()
        .and_then(|queue| topology.lane_of_queue(queue))
        .map(|lane| lane.name.clone());
    info
}

/// Reads a dead letter. `delay_steps` is the number of configured
/// redelivery steps, to recognise a command that used them all.
/// Its memory is believed only when `keys` verify it.
pub fn inspect(
    body: &[u8],
    properties: &BasicProperties,
    delay_steps: usize,
    keys: Option<&HistoryKeys>,
) -> DeadLetterInfo {
    let headers = properties.headers().as_ref();
    let message_id = properties.message_id().as_ref().map(|m| m.as_str());
    let parsed = Command::parse(body, message_id);
    let (command_id, invalid_reason) = match &parsed {
        Ok(command) => (Some(command.id.as_str().to_owned()), None),
        Err(e) => (e.raw.command_id.clone(), Some(e.reason.to_string())),
    };
    let deaths = deaths(headers);
    let latest = deaths.first();
    let (history, provenance) = DeliveryHistory::read(Message::of(properties, body), keys);
    // The stamp is the worker's word only when its MAC verifies.
    let ours = provenance == Provenance::Verified;
    let stamped_code = header_str(headers, ERROR_CODE_HEADER).filter(|_| ours);
    let dead_lettered_ms = header_u64(headers, DEAD_LETTERED_HEADER).filter(|_| ours);
    let guessed_code = match &parsed {
        Err(_) => Some(ErrorCode::InvalidCommand),
        Ok(_) if delay_steps > 0 && history.step as usize >= delay_steps => {
            Some(ErrorCode::RetriesExhausted)
        }
        Ok(_) => None,
    };
    let error_code = stamped_code
        .as_deref()
        .and_then(ErrorCode::parse)
        .or(guessed_code)
        .map(ErrorCode::as_str);
    let earliest_death = deaths.iter().filter_map(|d| d.time_secs).min();
    let stamped = dead_lettered_ms.is_some();
    let died_ms = earliest_death
        .map(|s| s.saturating_mul(1000))
        .into_iter()
        .chain(dead_lettered_ms)
        .min();
    // An invalid body never reaches Hyperline, however often delivered.
    let unrecorded_before_ms = parsed
        .is_ok()
        .then(|| unrecorded_before(&history, headers, &deaths, died_ms))
        .flatten();
    // `rejected` is the worker's own reject, whose why is the code.
    let broker_reason = latest
        .and_then(|d| d.reason.clone())
        .or_else(|| header_str(headers, "x-first-death-reason"))
        .filter(|r| !stamped && r != "rejected");
    // When its first request is unknown, no estimate stands in for it.
    let first_attempt_ms = history
        .first_attempt_ms
        .filter(|_| unrecorded_before_ms.is_none());
    DeadLetterInfo {
        command_id,
        broker_reason: broker_reason.clone(),
        queue: header_str(headers, QUEUE_HEADER)
            .or_else(|| latest.and_then(|d| d.queue.clone()))
            .or_else(|| header_str(headers, "x-first-death-queue")),
        died_at: died_ms.and_then(crate::clock::rfc3339_ms),
        lane: None,
        count: latest.and_then(|d| d.count),
        detail: invalid_reason.clone().or_else(|| {
            let charge = match (unrecorded_before_ms, history.first_attempt_ms) {
                (Some(before), _) => Charge::Unknown(before),
                (None, Some(_)) => Charge::Recorded,
                (None, None) => Charge::NoRequest,
            };
            match error_code {
                Some(code) => explain(code, history.last_status, charge),
                None => unrecorded_before_ms.map(|before| {
                    let why = broker_reason.as_deref().unwrap_or("dead-lettered");
                    let lead = format!(
                        "broker: {why}; it may have been delivered to a worker whose request \
                         was cut short"
                    );
                    unknown_first(before, &lead)
                }),
            }
        }),
        error_code,
        invalid_reason,
        last_status: history.last_status,
        attempts: (history.attempts > 0 || stamped).then_some(u64::from(history.attempts)),
        first_attempt: first_attempt_ms.and_then(crate::clock::rfc3339_ms),
        last_attempt: history.last_attempt_ms.and_then(crate::clock::rfc3339_ms),
        first_request_unknown: unrecorded_before_ms.is_some(),
        unrecorded_before: unrecorded_before_ms.and_then(crate::clock::rfc3339_ms),
        replica: header_str(headers, REPLICA_HEADER),
        first_attempt_ms,
        unrecorded_before_ms,
        died_ms,
        stamped,
    }
}

/// When a letter that was delivered to a worker may have had a request no
/// history records (Unix ms), when it has no recorded first request from
/// before: its first request is then unknown.
///
/// Delivered means: the worker's own stamp says so (it refreshed the command
/// or dead-lettered it as worn, `cpw-unrecorded-before-ms`; or, from a
/// worker before that stamp, `cpw-refreshes`), or the broker's does (a
/// delivery count), or the broker dead-lettered it on its own (`x-death`:
/// expired, at its delivery limit, dropped by a length limit). RabbitMQ
/// 3.10 keeps no delivery count on such a letter, so a command that expired
/// after a delivery cannot be told from one that was never delivered: any
/// of them may have been. A delivery killed mid-request records nothing, so
/// any delivery may have charged.
fn unrecorded_before(
    history: &DeliveryHistory,
    headers: Option<&FieldTable>,
    deaths: &[Death],
    died_ms: Option<u64>,
) -> Option<u64> {
    if let Some(before) = history.unrecorded_before_ms {
        return Some(before);
    }
    let counted = [DELIVERY_COUNT_HEADER, DELIVERED_COUNT_HEADER]
        .iter()
        .any(|name| header_u64(headers, name).is_some_and(|n| n > 0));
    let delivered = counted || !deaths.is_empty() || history.refreshes > 0;
    match (delivered, history.first_attempt_ms) {
        // Its deliveries came after its recorded first request.
        (_, Some(_)) | (false, None) => None,
        (true, None) => died_ms.or(Some(crate::clock::now_ms())),
    }
}

/// What is known of a letter's charge.
#[derive(Clone, Copy)]
enum Charge {
    /// A request that may have charged is recorded.
    Recorded,
    /// A request may have charged before this moment (Unix ms), no first
    /// request known.
    Unknown(u64),
    /// Never delivered with a request that may have charged.
    NoRequest,
}

/// A letter whose first request is unknown, in words, after `lead` (what
/// happened to it).
fn unknown_first(before_ms: u64, lead: &str) -> String {
    let before = crate::clock::rfc3339_ms(before_ms).unwrap_or_else(|| "-".to_owned());
    format!(
        "{lead}: a request may have charged before {before}, first request unknown \
         (dead-letters reconcile; a replay needs --force)"
    )
}

/// What a worker's code means for its letter, with the tool that settles it.
fn explain(code: &str, status: Option<u16>, charge: Charge) -> Option<String> {
    let http = status.map_or_else(|| "no answer".to_owned(), |s| format!("HTTP {s}"));
    let may_have_charged = matches!(charge, Charge::Recorded);
    if let (Charge::Unknown(before), "retries_exhausted") = (charge, code) {
        return Some(unknown_first(
            before,
            &format!(
                "transient failures or crashes outlasted the retry budget (last: {http}); \
                 delivered to workers without an outcome"
            ),
        ));
    }
    match (code, status) {
        ("unexpected_response", Some(200..=299)) => Some(format!(
            "{http} whose body is not the documented one: the charge may have happened \
             (dead-letters reconcile)"
        )),
        ("unexpected_response", _) => Some(format!(
            "{http}, an answer Hyperline does not document: the charge may have happened \
             (dead-letters reconcile)"
        )),
        ("retries_exhausted", _) if may_have_charged => Some(format!(
            "transient failures outlasted the retry budget (last: {http}); a request may have \
             charged (dead-letters reconcile)"
        )),
        ("retries_exhausted", _) => Some(format!(
            "transient failures outlasted the retry budget (last: {http}); no request could have \
             charged (dead-letters replay)"
        )),
        _ => None,
    }
}

/// One entry of `x-death`.
#[derive(Debug, Default)]
struct Death {
    reason: Option<String>,
    queue: Option<String>,
    time_secs: Option<u64>,
    count: Option<u64>,
}

/// The `x-death` entries, most recent first; empty when absent or malformed.
fn deaths(headers: Option<&FieldTable>) -> Vec<Death> {
    let Some(AMQPValue::FieldArray(entries)) = headers.and_then(|h| h.inner().get("x-death"))
    else {
        return Vec::new();
    };
    entries
        .as_slice()
        .iter()
        .filter_map(|entry| match entry {
            AMQPValue::FieldTable(t) => Some(Death {
                reason: header_str(Some(t), "reason"),
                queue: header_str(Some(t), "queue"),
                time_secs: header_u64(Some(t), "time"),
                count: header_u64(Some(t), "count"),
            }),
            _ => None,
        })
        .collect()
}

/// Whether a command may be replayed without `--force`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Window {
    /// Young enough: Hyperline still remembers its Idempotency-Key.
    Open,
    /// First attempted this long ago: too close to (or past) 24 hours.
    Closed(Duration),
    /// No `cpw-first-attempt-ms` and no worker's stamp: its age is unknown.
    Unknown,
    /// Delivered to a worker, and a request may have charged before
    /// `before_ms` that no history records: its first request is unknown.
    FirstUnknown {
        /// Unix ms.
        before_ms: u64,
    },
}

/// Judges the idempotency window at `now_ms`. `in_process_budget` is the
/// worker's own margin: it refuses a delivery whose age plus that budget
/// reaches 24 hours, so a replay it would refuse is refused here first.
pub fn window(info: &DeadLetterInfo, now_ms: u64, in_process_budget: Duration) -> Window {
    if let Some(before_ms) = info.unrecorded_before_ms {
        return Window::FirstUnknown { before_ms };
    }
    let Some(first) = info.first_attempt_ms else {
        return match info.stamped {
            true => Window::Open,
            false => Window::Unknown,
        };
    };
    let age = Duration::from_millis(now_ms.saturating_sub(first));
    let limit = IDEMPOTENCY_WINDOW.saturating_sub(REPLAY_MARGIN + in_process_budget);
    if age >= limit {
        Window::Closed(age)
    } else {
        Window::Open
    }
}

/// The properties of the copy sent back to the commands queue: the broker's
/// dead-letter history and the worker's counters are dropped, so the copy
/// starts a fresh in-process budget and is not taken for a dead-letter cycle.
/// The start of the idempotency window is kept,
/// so the worker's own 24-hour guard still holds, unless `forced`: then it is
/// dropped too, or the worker would refuse what the operator chose to force.
pub fn replay_properties(
    properties: &BasicProperties,
    body: &[u8],
    first_attempt_ms: Option<u64>,
    forced: bool,
    keys: &HistoryKeys,
) -> BasicProperties {
    let kept = first_attempt_ms.filter(|_| !forced);
    let headers = DeliveryHistory::fresh_start(Message::of(properties, body), kept, keys);
    copy_properties(properties, headers)
}

#[cfg(test)]
mod tests;
