//! Select: which dead letters are uncertain, and what Hyperline's credit
//! transactions hold for their customers.
//!
//! Uncertain means: dead-lettered by the worker as `unexpected_response` (a
//! 2xx, or an undocumented status, that did not say what happened), or as
//! `retries_exhausted` with a recorded first request that may have charged
//! (`cpw-first-attempt-ms`: a timeout, a dropped connection or a 5xx, then
//! either the whole budget spent or the 24-hour window refused); and any
//! letter of a valid command that was delivered to a worker with no first
//! request recorded before (a poison message after crashes, a command that
//! expired or reached the broker's delivery limit after a delivery): a
//! delivery killed mid-request records nothing, so its first request is
//! unknown ([`letter::inspect`](super::super::letter::inspect) says which).
//! A `retries_exhausted` dead letter that was never delivered so and
//! recorded no request never sent one that could charge, and an
//! `invalid_command` never reached Hyperline: neither is uncertain, and
//! `dead-letters replay` is their tool.

use std::collections::BTreeMap;

use lapin::message::Delivery;

use super::super::letter::inspect;
use crate::broker::history::{DEAD_LETTERED_HEADER, ERROR_CODE_HEADER};
use crate::broker::{DeliveryHistory, HistoryKeys, Message, Provenance, header_str, header_u64};
use crate::configuration::Settings;
use crate::contract::{Command, ErrorCode};
use crate::hyperline::gate::Gate;
use crate::hyperline::matching::TimeSpan;
use crate::hyperline::{CreditTransaction, HyperlineClient, READS_PER_SECOND, ReadBounds};

/// One uncertain dead letter, held unacknowledged until it is acted on or
/// put back.
pub struct Letter {
    /// The message, as read.
    pub delivery: Delivery,
    /// Its command.
    pub command: Command,
    /// Why it died: the worker's error code, or the broker's reason
    /// (`expired`, `delivery_limit`).
    pub code: &'static str,
    /// What the worker learned about it.
    pub history: DeliveryHistory,
    /// When it died (Unix ms): the worker's stamp, else the broker's death.
    pub died_ms: Option<u64>,
    /// Delivered to a worker without a first request recorded before: a
    /// request may have charged before this moment (Unix ms), its first
    /// request unknown.
    pub unrecorded_before_ms: Option<u64>,
    /// The publisher's `timestamp` property (Unix ms).
    pub published_ms: Option<u64>,
    /// The queue it was consumed from or died in: its lane's, where a
    /// replay puts it back.
    pub queue: Option<String>,
}

impl Letter {
    /// Its window: from its first request that may have charged to its
    /// death (or `now_ms`, when it has no time of death). When its first
    /// request is unknown, from the command's publication (its `timestamp`
    /// property, the publisher's word: no request precedes it), else from
    /// the beginning of the listing, where nothing can be proved "not
    /// charged" ([`Letter::bounded`]). `None` when it has no window at all.
    pub fn span(&self, now_ms: u64) -> Option<TimeSpan> {
        let first = self.history.first_attempt_ms;
        let from_ms = match self.unrecorded_before_ms {
            None => first?,
            Some(before) => match self.published_ms.filter(|p| *p <= before) {
                Some(published) => first.map_or(published, |f| f.min(published)),
                None => 0,
            },
        };
        Some(TimeSpan {
            from_ms,
            until_ms: self.died_ms.unwrap_or(now_ms),
        })
    }

    /// Whether its window has a known start, so that an empty window
    /// proves "not charged": false for a letter whose first request is
    /// unknown and whose command has no `timestamp` property.
    pub fn bounded(&self) -> bool {
        self.unrecorded_before_ms.is_none()
            || self
                .published_ms
                .zip(self.unrecorded_before_ms)
                .is_some_and(|(p, before)| p <= before)
    }

    /// The customer and product, whose listing it is matched against.
    pub fn pair(&self) -> (String, String) {
        (
            self.command.customer_id.as_str().to_owned(),
            self.command.product_id.as_str().to_owned(),
        )
    }
}

/// What makes a delivery an uncertain letter.
struct Facts {
    command: Command,
    code: &'static str,
    history: DeliveryHistory,
    died_ms: Option<u64>,
    unrecorded_before_ms: Option<u64>,
    queue: Option<String>,
}

/// The facts of a dead letter whose charge is uncertain; `None` for any other.
///
/// A letter whose stamp does not verify is not the worker's: its code, its
/// window and its dead-lettering time are the publisher's word, so it is
/// left alone, unless the broker's own marks say it was delivered (a
/// delivery count, a death at the delivery limit): its first request is then
/// unknown whatever its headers claim.
fn facts(delivery: &Delivery, keys: &HistoryKeys) -> Option<Facts> {
    let headers = delivery.properties.headers().as_ref();
    let message = Message::of(&delivery.properties, &delivery.data);
    let (history, provenance) = DeliveryHistory::read(message, Some(keys));
    let info = inspect(&delivery.data, &delivery.properties, 0, Some(keys));
    let stamped = header_str(headers, ERROR_CODE_HEADER)
        .as_deref()
        .and_then(ErrorCode::parse)
        .filter(|_| provenance == Provenance::Verified);
    let first_unknown = info.unrecorded_before_ms.is_some();
    let code = match stamped {
        Some(code @ ErrorCode::UnexpectedResponse) => code.as_str(),
        Some(code @ ErrorCode::RetriesExhausted)
            if history.first_attempt_ms.is_some() || first_unknown =>
        {
            code.as_str()
        }
        Some(_) => return None,
        None if first_unknown => broker_reason(info.broker_reason.as_deref()),
        None => return None,
    };
    let message_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|m| m.as_str());
    let command = Command::parse(&delivery.data, message_id).ok()?;
    let died_ms = match stamped {
        Some(_) => header_u64(headers, DEAD_LETTERED_HEADER),
        None => info.died_ms,
    };
    Some(Facts {
        command,
        code,
        history,
        died_ms,
        unrecorded_before_ms: info.unrecorded_before_ms,
        queue: info.queue,
    })
}

/// The broker's reason for a letter it dead-lettered on its own, as a label.
fn broker_reason(reason: Option<&str>) -> &'static str {
    match reason {
        Some("expired") => "expired",
        Some("delivery_limit") => "delivery_limit",
        Some("maxlen") => "maxlen",
        _ => "dead-lettered",
    }
}

impl Letter {
    fn new(delivery: Delivery, facts: Facts) -> Letter {
        let Facts {
            command,
            code,
            history,
            died_ms,
            unrecorded_before_ms,
            queue,
        } = facts;
        let published_ms = delivery
            .properties
            .timestamp()
            .map(|s| s.saturating_mul(1000));
        Letter {
            delivery,
            command,
            code,
            history,
            died_ms,
            unrecorded_before_ms,
            published_ms,
            queue,
        }
    }
}

/// The letter, when its charge is uncertain.
pub fn uncertain(delivery: Delivery, keys: &HistoryKeys) -> Option<Letter> {
    let facts = facts(&delivery, keys)?;
    Some(Letter::new(delivery, facts))
}

/// The uncertain letters, and the other deliveries (to put back).
pub fn split(held: Vec<Delivery>, keys: &HistoryKeys) -> (Vec<Letter>, Vec<Delivery>) {
    let mut letters = Vec::new();
    let mut others = Vec::new();
    for delivery in held {
        match facts(&delivery, keys) {
            Some(facts) => letters.push(Letter::new(delivery, facts)),
            None => others.push(delivery),
        }
    }
    (letters, others)
}

/// Each customer and product's transactions, or why they could not be read.
pub type Listings = BTreeMap<(String, String), Result<Vec<CreditTransaction>, String>>;

/// The transactions of every customer and product concerned, each read
/// once, one after the other through a gate at Hyperline's read pace (200
/// per 10 s).
pub async fn read_listings(
    client: &HyperlineClient,
    settings: &Settings,
    letters: &[Letter],
) -> Listings {
    let gate = Gate::new(
        READS_PER_SECOND,
        settings.hyperline.timeout(),
        settings.longest_rate_limit_pause(),
    );
    let bounds = ReadBounds::from_retry(&settings.retry);
    let mut listings = Listings::new();
    for letter in letters {
        let key = letter.pair();
        if listings.contains_key(&key) || letter.span(0).is_none() {
            continue;
        }
        let listing = client
            .transactions(
                &letter.command.customer_id,
                &letter.command.product_id,
                &gate,
                bounds,
            )
            .await
            .map_err(|e| format!("cannot read the credit transactions: {e}"));
        listings.insert(key, listing);
    }
    listings
}
