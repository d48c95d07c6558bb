//! The result events of section 3, with their AMQP properties and CloudEvents
//! headers.
//!
//! Downstream teams dedupe on `command_id` and route on the `type`; the
//! CloudEvents headers let generic tooling read the events without knowing
//! this contract. All of it is built here so every publish path (results
//! exchange, `reply_to`) sends byte-identical events.

use std::collections::BTreeMap;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use super::command::{Command, InvalidCommand};

mod json;

/// The `schema` of every event; bumped on a breaking change of the contract.
pub const SCHEMA_VERSION: u32 = 1;

/// `cloudEvents:source` of every event.
const SOURCE: &str = "credit-purchase-worker";

/// The header of every event that says when a replica published this copy
/// of it (Unix ms): set as the properties are built, just before the
/// publish, so a stored outcome published again carries the time of the
/// new publish, not its `occurred_at`. The results log's coverage is read
/// from it (`broker::results_log::complete_since_ms`).
pub const PUBLISHED_HEADER: &str = "cpw-published-ms";

/// The header of an event that names its command's lane (`amqp.lanes`),
/// for `events --lane` and for consumers that care. Sent only where lanes
/// are configured: the default configuration's events are as they were.
pub const LANE_HEADER: &str = "cpw-lane";

/// The event `type`, also its routing key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// The purchase was made (or had been made: an idempotent replay).
    #[serde(rename = "credit_purchase.succeeded")]
    Succeeded,
    /// The purchase was not made, or its result is unknown (see the code).
    #[serde(rename = "credit_purchase.failed")]
    Failed,
}

impl EventKind {
    /// The `type` string and routing key.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Succeeded => "credit_purchase.succeeded",
            EventKind::Failed => "credit_purchase.failed",
        }
    }
}

/// `error.code` of a failed event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The message broke a rule of section 2; the API was not called.
    InvalidCommand,
    /// Hyperline answered 400, 404 or 422.
    Rejected,
    /// Hyperline answered 417: the id was reused for another purchase.
    IdempotencyConflict,
    /// Transient failures outlasted the whole retry budget.
    RetriesExhausted,
    /// A 2xx (or other answer) that is not the documented shape: the charge
    /// may have happened, an operator must look.
    UnexpectedResponse,
}

impl ErrorCode {
    /// The code as written in events and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidCommand => "invalid_command",
            ErrorCode::Rejected => "rejected",
            ErrorCode::IdempotencyConflict => "idempotency_conflict",
            ErrorCode::RetriesExhausted => "retries_exhausted",
            ErrorCode::UnexpectedResponse => "unexpected_response",
        }
    }

    /// The code written as [`ErrorCode::as_str`] does, back (a dead letter's
    /// stamp); `None` for anything else.
    pub fn parse(code: &str) -> Option<ErrorCode> {
        [
            ErrorCode::InvalidCommand,
            ErrorCode::Rejected,
            ErrorCode::IdempotencyConflict,
            ErrorCode::RetriesExhausted,
            ErrorCode::UnexpectedResponse,
        ]
        .into_iter()
        .find(|c| c.as_str() == code)
    }

    /// Whether the command of an event with this code goes to the
    /// dead-letter queue (an operator must look) rather than being acked.
    pub fn dead_letters(self) -> bool {
        matches!(
            self,
            ErrorCode::InvalidCommand | ErrorCode::RetriesExhausted | ErrorCode::UnexpectedResponse
        )
    }
}

/// `error` of a failed event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventError {
    /// What kind of failure.
    pub code: ErrorCode,
    /// Human readable; never the API key.
    pub message: String,
    /// Status of the deciding HTTP answer, if there was one.
    pub http_status: Option<u16>,
}

/// One result event, as published.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultEvent {
    /// [`SCHEMA_VERSION`].
    pub schema: u32,
    /// Unique per event; also `message_id` and `cloudEvents:id`.
    pub event_id: Uuid,
    /// Succeeded or failed.
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// The command's id, or null when none could be read.
    pub command_id: Option<String>,
    /// The customer, or null when none could be read.
    pub customer_id: Option<String>,
    /// The product, or null when none could be read.
    pub product_id: Option<String>,
    /// The credits of the command, or null when none could be read.
    pub credit_count: Option<u64>,
    /// The invoice (succeeded only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invoice_id: Option<String>,
    /// The balance after the purchase (succeeded only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_credit_balance: Option<u64>,
    /// HTTP requests made for the command, as far as the worker knows.
    pub attempts: u32,
    /// When the outcome was decided (RFC 3339, UTC).
    #[serde(with = "time::serde::rfc3339")]
    pub occurred_at: OffsetDateTime,
    /// Why it failed (failed only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<EventError>,
    /// Succeeded only: the charge was found in Hyperline's credit
    /// transactions, not in a purchase answer (docs/contract.md sections 3 and 7).
    /// Absent when false, so every other event is byte for byte as before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reconciled: bool,
}

/// What the worker keeps of an outcome decided but not yet confirmed, on
/// the copy that waits for its event: the facts only. The event is rebuilt
/// from the command's own body ([`ResultEvent::restored`]), so no header, not
/// even a verified one, can put another command's ids or another customer
/// into an event. The event id and time are kept so the event published
/// later is the same event (consumers dedupe on it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeFacts {
    /// The event's id.
    pub event_id: Uuid,
    /// When the outcome was decided.
    #[serde(with = "time::serde::rfc3339")]
    pub occurred_at: OffsetDateTime,
    /// Succeeded or failed.
    pub kind: EventKind,
    /// The invoice (succeeded only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invoice_id: Option<String>,
    /// The balance after the purchase (succeeded only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_credit_balance: Option<u64>,
    /// Found in the credit transactions (succeeded only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reconciled: bool,
    /// Why it failed (failed only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<EventError>,
}

#[cfg(test)]
impl OutcomeFacts {
    /// A failed outcome, for tests to adjust.
    pub fn example() -> Self {
        OutcomeFacts {
            event_id: Uuid::nil(),
            occurred_at: OffsetDateTime::UNIX_EPOCH,
            kind: EventKind::Failed,
            invoice_id: None,
            new_credit_balance: None,
            reconciled: false,
            error: Some(EventError {
                code: ErrorCode::UnexpectedResponse,
                message: "m".into(),
                http_status: Some(201),
            }),
        }
    }
}

impl ResultEvent {
    /// The facts of this event's outcome, to keep on a copy.
    pub fn facts(&self) -> OutcomeFacts {
        OutcomeFacts {
            event_id: self.event_id,
            occurred_at: self.occurred_at,
            kind: self.kind,
            invoice_id: self.invoice_id.clone(),
            new_credit_balance: self.new_credit_balance,
            reconciled: self.reconciled,
            error: self.error.clone(),
        }
    }

    /// The event of a stored outcome, on `base`: the event built from the
    /// command's own body (or the invalid message's raw ids).
    pub fn restored(base: ResultEvent, facts: OutcomeFacts) -> Self {
        ResultEvent {
            event_id: facts.event_id,
            occurred_at: facts.occurred_at,
            kind: facts.kind,
            invoice_id: facts.invoice_id,
            new_credit_balance: facts.new_credit_balance,
            reconciled: facts.reconciled,
            error: facts.error,
            ..base
        }
    }

    /// The event of `kind` for a command, before its outcome's facts.
    pub fn base(kind: EventKind, command: &Command, attempts: u32) -> Self {
        Self::for_command(kind, command, attempts)
    }

    fn new(kind: EventKind, attempts: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        ResultEvent {
            schema: SCHEMA_VERSION,
            // A version 4 UUID from the thread's CSPRNG: `Uuid::new_v4` asks
            // the kernel for every one (a `getrandom` system call per event).
            event_id: uuid::Builder::from_random_bytes(rand::random()).into_uuid(),
            kind,
            command_id: None,
            customer_id: None,
            product_id: None,
            credit_count: None,
            invoice_id: None,
            new_credit_balance: None,
            attempts,
            // Whole seconds would lose ordering between quick events; the
            // nanoseconds are noise. Milliseconds are what consumers sort on.
            occurred_at: now
                .replace_nanosecond(now.millisecond() as u32 * 1_000_000)
                .unwrap_or(now),
            error: None,
            reconciled: false,
        }
    }

    fn for_command(kind: EventKind, command: &Command, attempts: u32) -> Self {
        ResultEvent {
            command_id: Some(command.id.as_str().to_owned()),
            customer_id: Some(command.customer_id.as_str().to_owned()),
            product_id: Some(command.product_id.as_str().to_owned()),
            credit_count: Some(command.credit_count.get()),
            ..Self::new(kind, attempts)
        }
    }

    /// The purchase was made.
    pub fn succeeded(
        command: &Command,
        invoice_id: String,
        new_credit_balance: u64,
        attempts: u32,
    ) -> Self {
        ResultEvent {
            invoice_id: Some(invoice_id),
            new_credit_balance: Some(new_credit_balance),
            ..Self::for_command(EventKind::Succeeded, command, attempts)
        }
    }

    /// The purchase was made, as Hyperline's credit transactions show: its
    /// answer was lost or garbled, and the transaction supplies the invoice
    /// and the balance after it.
    pub fn reconciled(
        command: &Command,
        invoice_id: String,
        balance_after: u64,
        attempts: u32,
    ) -> Self {
        ResultEvent {
            reconciled: true,
            ..Self::succeeded(command, invoice_id, balance_after, attempts)
        }
    }

    /// A valid command failed.
    pub fn failed(command: &Command, attempts: u32, error: EventError) -> Self {
        ResultEvent {
            error: Some(error),
            ..Self::for_command(EventKind::Failed, command, attempts)
        }
    }

    /// A message that is not a command; the API was not called.
    pub fn invalid(invalid: &InvalidCommand) -> Self {
        ResultEvent {
            command_id: invalid.raw.command_id.clone(),
            customer_id: invalid.raw.customer_id.clone(),
            product_id: invalid.raw.product_id.clone(),
            credit_count: invalid.raw.credit_count,
            error: Some(EventError {
                code: ErrorCode::InvalidCommand,
                message: invalid.reason.to_string(),
                http_status: None,
            }),
            ..Self::new(EventKind::Failed, 0)
        }
    }

    /// The routing key on the results exchange: the event type.
    pub fn routing_key(&self) -> &'static str {
        self.kind.as_str()
    }

    /// The JSON body: the bytes the derived `Serialize` gives, written
    /// without `serde`'s machinery (`json.rs`).
    pub fn to_json(&self) -> Vec<u8> {
        json::encode(self)
    }

    /// AMQP properties and CloudEvents headers of section 3; `traceparent`
    /// continues the command's trace; `lane`, when lanes are configured, is
    /// the [`LANE_HEADER`]. Built for each publish: the
    /// [`PUBLISHED_HEADER`] is the time of this call.
    pub fn amqp_properties(
        &self,
        traceparent: Option<&str>,
        lane: Option<&str>,
    ) -> BasicProperties {
        let time = self.occurred_at.format(&Rfc3339).unwrap_or_default();
        let mut buffer = Uuid::encode_buffer();
        let event_id: &str = self.event_id.hyphenated().encode_lower(&mut buffer);
        let text = |key: &str, value: &str| {
            (
                ShortString::from(key),
                AMQPValue::LongString(LongString::from(value)),
            )
        };
        // The raw id of an invalid command may hold control characters. A
        // bridge to the CloudEvents HTTP binding copies the subject into an
        // HTTP header (`ce-subject`), where CR/LF would inject another one,
        // so the subject is left out for such an id (docs/contract.md section 3).
        let subject = self
            .command_id
            .as_deref()
            .filter(|id| !id.chars().any(char::is_control));
        let published = i64::try_from(crate::clock::now_ms()).unwrap_or(i64::MAX);
        // No `cloudEvents:datacontenttype`: the AMQP binding maps that
        // attribute to the `content_type` property, never to a header.
        // In the table's (byte) order: the map is then built in one pass,
        // where inserting each header searched the table and compared its
        // name with the others' (BENCHMARKS.md, issue 30).
        let mut entries = Vec::with_capacity(9);
        entries.push(text("cloudEvents:id", event_id));
        entries.push(text("cloudEvents:source", SOURCE));
        entries.push(text("cloudEvents:specversion", "1.0"));
        if let Some(id) = subject {
            entries.push(text("cloudEvents:subject", id));
        }
        entries.push(text("cloudEvents:time", &time));
        entries.push(text("cloudEvents:type", self.kind.as_str()));
        if let Some(lane) = lane {
            entries.push(text(LANE_HEADER, lane));
        }
        entries.push((
            ShortString::from(PUBLISHED_HEADER),
            AMQPValue::LongLongInt(published),
        ));
        if let Some(tp) = traceparent {
            entries.push(text("traceparent", tp));
        }
        let headers = FieldTable::from(entries.into_iter().collect::<BTreeMap<_, _>>());
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(event_id.into())
            .with_type(self.kind.as_str().into())
            .with_app_id(SOURCE.into())
            .with_timestamp(self.occurred_at.unix_timestamp().max(0) as u64)
            .with_headers(headers);
        // `correlation_id` is the id byte for byte, control characters
        // included: an AMQP short string is length-prefixed, so nothing in it
        // is interpreted, and consumers match events to commands on it. The
        // event never holds an id over 255 bytes (the contract echoes only
        // shorter ones); `try_new` keeps a longer one from being a panic.
        if let Some(id) = self
            .command_id
            .as_deref()
            .and_then(|id| ShortString::try_new(id).ok())
        {
            props = props.with_correlation_id(id);
        }
        props
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{ErrorCode, InvalidReason, RawIds};

    fn command() -> Command {
        let body = br#"{"command_id":"6f1c1f0e-4c1a-4a51-9d7e-3f5d2b8e9a10","customer_id":"cus_1","product_id":"itm_1","credit_count":32,"amount_excluding_tax":24000}"#;
        Command::parse(body, None).expect("valid")
    }

    fn header<'a>(props: &'a BasicProperties, key: &str) -> Option<&'a AMQPValue> {
        props.headers().as_ref().and_then(|h| h.inner().get(key))
    }

    fn header_str(props: &BasicProperties, key: &str) -> Option<String> {
        match header(props, key) {
            Some(AMQPValue::LongString(s)) => {
                Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
            }
            _ => None,
        }
    }

    #[test]
    fn succeeded_event_has_the_documented_shape() {
        let e = ResultEvent::succeeded(&command(), "inv_1".into(), 2032, 1);
        let v: serde_json::Value = serde_json::from_slice(&e.to_json()).expect("json");
        assert_eq!(v["schema"], 1);
        assert_eq!(v["type"], "credit_purchase.succeeded");
        assert_eq!(v["command_id"], "6f1c1f0e-4c1a-4a51-9d7e-3f5d2b8e9a10");
        assert_eq!(v["customer_id"], "cus_1");
        assert_eq!(v["product_id"], "itm_1");
        assert_eq!(v["credit_count"], 32);
        assert_eq!(v["invoice_id"], "inv_1");
        assert_eq!(v["new_credit_balance"], 2032);
        assert_eq!(v["attempts"], 1);
        assert!(v.get("error").is_none());
        let at = v["occurred_at"].as_str().expect("string");
        assert!(OffsetDateTime::parse(at, &Rfc3339).is_ok(), "{at}");
        assert_eq!(e.routing_key(), "credit_purchase.succeeded");
        assert_eq!(e.event_id.get_version_num(), 4, "a random (v4) UUID");
        assert!(v.get("reconciled").is_none(), "absent unless true");
    }

    #[test]
    fn a_reconciled_success_says_so_and_reads_back() {
        let e = ResultEvent::reconciled(&command(), "inv_9".into(), 64, 1);
        let v: serde_json::Value = serde_json::from_slice(&e.to_json()).expect("json");
        assert_eq!(
            (&v["type"], &v["invoice_id"], &v["reconciled"]),
            (
                &serde_json::json!("credit_purchase.succeeded"),
                &serde_json::json!("inv_9"),
                &serde_json::json!(true)
            )
        );
        let back: ResultEvent = serde_json::from_slice(&e.to_json()).expect("reads back");
        assert_eq!(back, e);
    }

    #[test]
    fn failed_event_carries_the_error() {
        let error = EventError {
            code: ErrorCode::Rejected,
            message: "no such customer".into(),
            http_status: Some(404),
        };
        let e = ResultEvent::failed(&command(), 2, error);
        let v: serde_json::Value = serde_json::from_slice(&e.to_json()).expect("json");
        assert_eq!(v["type"], "credit_purchase.failed");
        assert_eq!(v["error"]["code"], "rejected");
        assert_eq!(v["error"]["http_status"], 404);
        assert_eq!(v["attempts"], 2);
        assert!(v.get("invoice_id").is_none());
        assert_eq!(e.routing_key(), "credit_purchase.failed");
    }

    #[test]
    fn invalid_event_echoes_what_could_be_read() {
        let invalid = InvalidCommand {
            reason: InvalidReason::NoPricing,
            raw: Box::new(RawIds {
                command_id: Some("abc".into()),
                customer_id: None,
                product_id: Some("p".into()),
                credit_count: Some(3),
            }),
        };
        let v: serde_json::Value =
            serde_json::from_slice(&ResultEvent::invalid(&invalid).to_json()).expect("json");
        assert_eq!(v["command_id"], "abc");
        assert_eq!(v["customer_id"], serde_json::Value::Null);
        assert_eq!(v["credit_count"], 3);
        assert_eq!(v["attempts"], 0);
        assert_eq!(v["error"]["code"], "invalid_command");
        assert_eq!(v["error"]["http_status"], serde_json::Value::Null);
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("amount_excluding_tax"))
        );
    }

    fn invalid_with_id(id: &str) -> ResultEvent {
        ResultEvent::invalid(&InvalidCommand {
            reason: InvalidReason::NoPricing,
            raw: Box::new(RawIds {
                command_id: Some(id.into()),
                ..RawIds::default()
            }),
        })
    }

    #[test]
    fn control_characters_reach_the_correlation_id_but_not_the_subject() {
        // The longest id an event echoes: 255 bytes, a control character last.
        let longest = format!("{}\u{1}", "é".repeat(127));
        for id in ["id\r\nX-Injected: 1", "bad\u{1}id\nx", "\u{0}", &longest] {
            let event = invalid_with_id(id);
            let p = event.amqp_properties(None, None);
            assert_eq!(
                p.correlation_id().as_ref().map(|s| s.as_str().as_bytes()),
                Some(id.as_bytes()),
                "byte for byte: {id:?}"
            );
            assert!(header_str(&p, "cloudEvents:subject").is_none(), "{id:?}");
            assert_eq!(event.command_id.as_deref(), Some(id), "the body keeps it");
        }
    }

    #[test]
    fn an_id_without_control_characters_is_also_the_subject() {
        let id = "abc é\u{202E}";
        let p = invalid_with_id(id).amqp_properties(None, None);
        assert_eq!(p.correlation_id().as_ref().map(|s| s.as_str()), Some(id));
        assert_eq!(header_str(&p, "cloudEvents:subject").as_deref(), Some(id));
    }

    #[test]
    fn an_id_too_long_for_a_short_string_is_left_out_not_a_panic() {
        let mut event = invalid_with_id("x");
        event.command_id = Some("x".repeat(256));
        let p = event.amqp_properties(None, None);
        assert!(p.correlation_id().is_none());
        assert_eq!(
            header_str(&p, "cloudEvents:subject").map(|s| s.len()),
            Some(256),
            "a header is a long string"
        );
    }

    #[test]
    fn no_id_no_identity_properties() {
        let mut event = invalid_with_id("x");
        event.command_id = None;
        let p = event.amqp_properties(None, None);
        assert!(p.correlation_id().is_none());
        assert!(header_str(&p, "cloudEvents:subject").is_none());
    }

    #[test]
    fn properties_and_cloudevents_headers() {
        let e = ResultEvent::succeeded(&command(), "inv_1".into(), 1, 1);
        let p = e.amqp_properties(
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            None,
        );
        let id = e.event_id.to_string();
        assert_eq!(
            p.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(*p.delivery_mode(), Some(2));
        assert_eq!(
            p.message_id().as_ref().map(|s| s.as_str()),
            Some(id.as_str())
        );
        assert_eq!(
            p.correlation_id().as_ref().map(|s| s.as_str()),
            Some("6f1c1f0e-4c1a-4a51-9d7e-3f5d2b8e9a10")
        );
        assert_eq!(
            p.kind().as_ref().map(|s| s.as_str()),
            Some("credit_purchase.succeeded")
        );
        assert!(p.timestamp().is_some());
        assert_eq!(
            header_str(&p, "cloudEvents:specversion").as_deref(),
            Some("1.0")
        );
        assert_eq!(header_str(&p, "cloudEvents:id"), Some(id));
        assert_eq!(
            header_str(&p, "cloudEvents:type").as_deref(),
            Some("credit_purchase.succeeded")
        );
        assert_eq!(
            header_str(&p, "cloudEvents:source").as_deref(),
            Some("credit-purchase-worker")
        );
        assert_eq!(
            header_str(&p, "cloudEvents:subject").as_deref(),
            Some("6f1c1f0e-4c1a-4a51-9d7e-3f5d2b8e9a10")
        );
        assert!(header_str(&p, "cloudEvents:time").is_some());
        assert!(header_str(&p, "traceparent").is_some());
        assert!(header(&p, LANE_HEADER).is_none(), "no lanes, no lane");
    }

    #[test]
    fn an_event_of_a_configured_lane_names_it() {
        let e = ResultEvent::succeeded(&command(), "inv_1".into(), 1, 1);
        let p = e.amqp_properties(None, Some("interactive"));
        assert_eq!(header_str(&p, LANE_HEADER).as_deref(), Some("interactive"));
    }
}
