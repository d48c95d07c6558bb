//! The `pending` record (docs/contract.md section 7.1): what the results
//! log learns when a command whose request may have charged goes back to
//! the broker (a delay step, a park after a 429, a return) with no event.
//!
//! Such a command may hold a charge that no event claims yet. Without a
//! record of it, `dead-letters reconcile` could give that charge to another
//! letter of the same purchase (a customer's double click): the record makes
//! it visible. It goes to the results log only, straight to its stream,
//! never through the results exchange: downstream consumers of results see
//! no new event type, and `events` shows it.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde::Serialize;
use time::OffsetDateTime;
use uuid::Uuid;

use super::command::{Command, Pricing};
use super::event::{LANE_HEADER, SCHEMA_VERSION};

/// The record's `type`.
pub const PENDING_TYPE: &str = "credit_purchase.pending";

/// One `pending` record, as published.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PendingRecord {
    /// [`SCHEMA_VERSION`].
    pub schema: u32,
    /// Unique per record; also `message_id`.
    pub record_id: Uuid,
    /// [`PENDING_TYPE`].
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The command, its customer and its purchase.
    pub command_id: String,
    pub customer_id: String,
    pub product_id: String,
    pub credit_count: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amount_excluding_tax: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price_id: Option<String>,
    /// Its first request that may have charged (RFC 3339, UTC).
    #[serde(with = "time::serde::rfc3339")]
    pub first_attempt_at: OffsetDateTime,
    /// HTTP requests made so far, as far as the worker knows.
    pub attempts: u32,
    /// When it went back to the broker.
    #[serde(with = "time::serde::rfc3339")]
    pub occurred_at: OffsetDateTime,
}

impl PendingRecord {
    /// The record of `command`, whose first request that may have charged
    /// left at `first_attempt_ms`.
    pub fn of(command: &Command, first_attempt_ms: u64, attempts: u32) -> PendingRecord {
        let at = |ms: u64| {
            OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                .unwrap_or(OffsetDateTime::UNIX_EPOCH)
        };
        let (amount_excluding_tax, price_id) = match &command.pricing {
            Pricing::Amount(amount) => (Some(*amount), None),
            Pricing::PriceId(price) => (None, Some(price.as_str().to_owned())),
        };
        PendingRecord {
            schema: SCHEMA_VERSION,
            record_id: uuid::Builder::from_random_bytes(rand::random()).into_uuid(),
            kind: PENDING_TYPE,
            command_id: command.id.as_str().to_owned(),
            customer_id: command.customer_id.as_str().to_owned(),
            product_id: command.product_id.as_str().to_owned(),
            credit_count: command.credit_count.get(),
            amount_excluding_tax,
            price_id,
            first_attempt_at: at(first_attempt_ms),
            attempts,
            occurred_at: at(crate::clock::now_ms()),
        }
    }

    /// The JSON body.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Persistent JSON, identified like an event (`message_id`, `type`,
    /// `correlation_id` = the command id, `timestamp`), with the command's
    /// lane as an event names it ([`LANE_HEADER`]) where lanes are configured.
    pub fn amqp_properties(&self, lane: Option<&str>) -> BasicProperties {
        let mut buffer = Uuid::encode_buffer();
        let id: &str = self.record_id.hyphenated().encode_lower(&mut buffer);
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(id.into())
            .with_type(PENDING_TYPE.into())
            .with_timestamp(self.occurred_at.unix_timestamp().max(0) as u64);
        if let Ok(command) = ShortString::try_new(self.command_id.as_str()) {
            props = props.with_correlation_id(command);
        }
        if let Some(lane) = lane {
            let mut headers = FieldTable::default();
            headers.insert(LANE_HEADER.into(), AMQPValue::LongString(lane.into()));
            props = props.with_headers(headers);
        }
        props
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_says_the_command_its_purchase_and_its_first_request() {
        let body = br#"{"command_id":"cmd-0000000000000001","customer_id":"cus_1","product_id":"itm_1","credit_count":32,"price_id":"pri_1"}"#;
        let command = Command::parse(body, None).expect("a command");
        let record = PendingRecord::of(&command, 1_790_000_000_123, 3);
        let json: serde_json::Value = serde_json::from_slice(&record.to_json()).expect("JSON");
        assert_eq!(json["type"], "credit_purchase.pending");
        assert_eq!(json["command_id"], "cmd-0000000000000001");
        assert_eq!(json["price_id"], "pri_1");
        assert!(json.get("amount_excluding_tax").is_none(), "{json}");
        assert_eq!(json["first_attempt_at"], "2026-09-21T14:13:20.123Z");
        let props = record.amqp_properties(None);
        assert_eq!(
            props.correlation_id().as_ref().map(|c| c.as_str()),
            Some("cmd-0000000000000001")
        );
        assert!(props.headers().is_none(), "no lanes, no headers");
        let laned = record.amqp_properties(Some("bulk"));
        let lane = laned
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(LANE_HEADER));
        assert_eq!(lane, Some(&AMQPValue::LongString("bulk".into())));
    }
}
