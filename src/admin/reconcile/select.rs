//! Select: which dead letters are uncertain, and what Hyperline's credit
//! transactions hold for their customers.
//!
//! Uncertain means: dead-lettered by the worker as `unexpected_response` (a
//! 2xx, or an undocumented status, that did not say what happened), or as
//! `retries_exhausted` with a recorded first request that may have charged
//! (`cpw-first-attempt-ms`: a timeout, a dropped connection or a 5xx, then
//! either the whole budget spent or the 24-hour window refused). A
//! `retries_exhausted` dead letter without it never sent a request that
//! could charge, and an `invalid_command` never reached Hyperline: neither
//! is uncertain, and `dead-letters replay` is their tool.

use std::collections::BTreeMap;

use lapin::message::Delivery;

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
    /// Why the worker dead-lettered it.
    pub code: ErrorCode,
    /// What the worker learned about it.
    pub history: DeliveryHistory,
    /// When the worker dead-lettered it (Unix ms).
    pub died_ms: Option<u64>,
}

impl Letter {
    /// Its window: from its first request that may have charged to its
    /// dead-lettering (or `now_ms`, when unstamped); `None` when its first
    /// request is unknown.
    pub fn span(&self, now_ms: u64) -> Option<TimeSpan> {
        Some(TimeSpan {
            from_ms: self.history.first_attempt_ms?,
            until_ms: self.died_ms.unwrap_or(now_ms),
        })
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
    code: ErrorCode,
    history: DeliveryHistory,
    died_ms: Option<u64>,
}

/// The facts of a dead letter whose charge is uncertain; `None` for any other.
///
/// A letter whose stamp does not verify is not the worker's: its code, its
/// window and its dead-lettering time are the publisher's word, so it is
/// left alone.
fn facts(delivery: &Delivery, keys: &HistoryKeys) -> Option<Facts> {
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
    is_uncertain.then(|| Facts {
        command,
        code,
        history,
        died_ms: header_u64(headers, DEAD_LETTERED_HEADER),
    })
}

impl Letter {
    fn new(delivery: Delivery, facts: Facts) -> Letter {
        let Facts {
            command,
            code,
            history,
            died_ms,
        } = facts;
        Letter {
            delivery,
            command,
            code,
            history,
            died_ms,
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
        if listings.contains_key(&key) || letter.history.first_attempt_ms.is_none() {
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
