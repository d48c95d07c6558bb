//! Publishing with publisher confirms, and reading our headers back.
//!
//! A command is acked only after what it produced (its event, or its copy in
//! a delay queue) is confirmed by the broker. lapin's confirm has no timeout
//! and reports an unroutable mandatory message as an `Ack` carrying the
//! returned message; both traps are handled here, once.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};

/// Headers the broker adds when it dead-letters a message. A copy we
/// republish must not carry them: brokers before 4.0.1 silently drop a
/// message that comes back to a queue it was dead-lettered from, with no
/// rejection in between (the cycle detection that lost Celery's retries).
pub const REDELIVERY_HEADERS: [&str; 8] = [
    "x-death",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-first-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-last-death-exchange",
    "x-delivery-count",
];

/// Why a message is not known to be safely with the broker.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The channel or connection failed.
    #[error("publish failed: {0}")]
    Channel(#[from] lapin::Error),
    /// The broker refused it.
    #[error("the broker nacked the message to `{0}`")]
    Nacked(String),
    /// No queue took it, where one had to.
    #[error("the message to `{0}` was unroutable")]
    Unroutable(String),
    /// No confirm arrived in time.
    #[error("no confirm for the message to `{0}` within {1:?}")]
    Timeout(String, Duration),
}

/// A confirm-mode channel for events and delay-queue copies. Clone it freely:
/// publishes from concurrent commands share the channel, and a clone is one
/// reference count (a lapin `Channel` clone is more than a dozen).
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    channel: Channel,
    confirm_timeout: Duration,
}

/// Whether a confirmed message reached at least one queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routed {
    /// At least one queue has it.
    Yes,
    /// The broker confirmed it but no queue was bound to take it.
    No,
}

impl Publisher {
    /// Opens a channel of its own in confirm mode.
    pub async fn open(
        connection: &Connection,
        confirm_timeout: Duration,
    ) -> Result<Self, lapin::Error> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Publisher {
            inner: Arc::new(Inner {
                channel,
                confirm_timeout,
            }),
        })
    }

    /// Whether the channel can still publish.
    pub fn is_open(&self) -> bool {
        self.inner.channel.status().connected()
    }

    /// Sends a persistent, mandatory message; confirm it with [`Publisher::confirm`].
    pub async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<PublisherConfirm, PublishError> {
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        Ok(self
            .inner
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                options,
                body,
                properties,
            )
            .await?)
    }

    /// Waits, bounded, for the broker's confirm of one sent message.
    pub async fn confirm(
        &self,
        target: &str,
        confirm: PublisherConfirm,
    ) -> Result<Routed, PublishError> {
        let limit = self.inner.confirm_timeout;
        match tokio::time::timeout(limit, confirm).await {
            Err(_) => Err(PublishError::Timeout(target.to_owned(), limit)),
            Ok(Err(e)) => Err(PublishError::Channel(e)),
            Ok(Ok(Confirmation::Ack(None))) => Ok(Routed::Yes),
            Ok(Ok(Confirmation::Ack(Some(_)))) => Ok(Routed::No),
            Ok(Ok(Confirmation::Nack(_))) => Err(PublishError::Nacked(target.to_owned())),
            // Only without confirm_select, which `open` always does.
            Ok(Ok(Confirmation::NotRequested)) => Err(PublishError::Nacked(target.to_owned())),
        }
    }

    /// Publishes one message that must land in a queue (a delay-queue copy).
    pub async fn publish_routed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let confirm = self.send(exchange, routing_key, body, properties).await?;
        match self.confirm(routing_key, confirm).await? {
            Routed::Yes => Ok(()),
            Routed::No => Err(PublishError::Unroutable(routing_key.to_owned())),
        }
    }
}

/// A string header (long or short string), as published by any client.
pub fn header_str(headers: Option<&FieldTable>, key: &str) -> Option<String> {
    match headers?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// An unsigned integer header, whatever integer width the publisher chose.
pub fn header_u64(headers: Option<&FieldTable>, key: &str) -> Option<u64> {
    match headers?.inner().get(key)? {
        AMQPValue::ShortShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::Timestamp(n) => Some(*n),
        _ => None,
    }
}
