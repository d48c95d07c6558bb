//! Publishing with publisher confirms, and reading headers back.
//!
//! A command is acked only after what it produced (its event, or its copy in
//! a delay queue, the commands queue or the dead-letter exchange) is
//! confirmed by the broker. lapin's confirm has no timeout and reports an
//! unroutable mandatory message as an `Ack` carrying the returned message;
//! both traps are handled here, once.
//!
//! lapin attaches a `basic.return` to the next confirm it resolves, and
//! resolves a multiple ack in map order, so on a channel with several
//! publishes in flight a return can be read against the wrong message. For
//! an event that costs a wrong log line; for a copy it costs a command (an
//! unroutable copy taken for a routed one gets its original acked). So events
//! and copies have a channel each, and copies go one at a time: the only
//! publish in flight on the copies channel is the one a return belongs to.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};

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

impl PublishError {
    /// A short class of the failure, for a span's `error.type`.
    pub fn kind(&self) -> &'static str {
        match self {
            PublishError::Channel(_) => "channel",
            PublishError::Nacked(_) => "nacked",
            PublishError::Unroutable(_) => "unroutable",
            PublishError::Timeout(..) => "confirm_timeout",
        }
    }
}

/// Confirm-mode channels for events and copies. Clone it freely: publishes
/// from concurrent commands share the channels, and a clone is one reference
/// count (a lapin `Channel` clone is more than a dozen).
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    events: Channel,
    copies: Channel,
    /// Held from a copy's publish to its confirm.
    one_copy: tokio::sync::Mutex<()>,
    confirm_timeout: Duration,
}

async fn confirm_channel(connection: &Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

async fn send(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<PublisherConfirm, PublishError> {
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    Ok(channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            options,
            body,
            properties,
        )
        .await?)
}

impl Publisher {
    /// Opens the two channels in confirm mode.
    pub async fn open(
        connection: &Connection,
        confirm_timeout: Duration,
    ) -> Result<Self, lapin::Error> {
        Ok(Publisher {
            inner: Arc::new(Inner {
                events: confirm_channel(connection).await?,
                copies: confirm_channel(connection).await?,
                one_copy: tokio::sync::Mutex::new(()),
                confirm_timeout,
            }),
        })
    }

    /// Whether both channels can still publish.
    pub fn is_open(&self) -> bool {
        self.inner.events.status().connected() && self.inner.copies.status().connected()
    }

    /// Sends a persistent, mandatory event; confirm it with [`Publisher::confirm`].
    pub async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<PublisherConfirm, PublishError> {
        send(&self.inner.events, exchange, routing_key, body, properties).await
    }

    /// Waits, bounded, for the broker's confirm of one sent event. A return
    /// that comes with it is logged by what it says of itself (its own
    /// exchange and routing key), since it may belong to another event.
    pub async fn confirm(
        &self,
        target: &str,
        confirm: PublisherConfirm,
    ) -> Result<(), PublishError> {
        if let Some(returned) = self.wait(target, confirm).await? {
            let d = &returned.delivery;
            tracing::warn!(
                exchange = %d.exchange,
                routing_key = %d.routing_key,
                "an event reached no queue (nothing bound to that routing key, or the reply_to queue is gone)"
            );
        }
        Ok(())
    }

    async fn wait(
        &self,
        target: &str,
        confirm: PublisherConfirm,
    ) -> Result<Option<lapin::message::BasicReturnMessage>, PublishError> {
        let limit = self.inner.confirm_timeout;
        match tokio::time::timeout(limit, confirm).await {
            Err(_) => Err(PublishError::Timeout(target.to_owned(), limit)),
            Ok(Err(e)) => Err(PublishError::Channel(e)),
            Ok(Ok(Confirmation::Ack(returned))) => Ok(returned),
            Ok(Ok(Confirmation::Nack(_))) => Err(PublishError::Nacked(target.to_owned())),
            // Only without confirm_select, which `open` always does.
            Ok(Ok(Confirmation::NotRequested)) => Err(PublishError::Nacked(target.to_owned())),
        }
    }

    /// Publishes an event to the results exchange and, when its command
    /// named one, to the `reply_to` queue, and waits for both confirms: the
    /// one way every event goes out (the worker's and `dead-letters
    /// reconcile`'s alike).
    pub async fn publish_event(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        reply_to: Option<&str>,
    ) -> Result<(), PublishError> {
        // The properties (a dozen headers) are copied only when a second
        // publish needs them.
        match reply_to {
            None => {
                let sent = self.send(exchange, routing_key, body, properties).await?;
                self.confirm(exchange, sent).await
            }
            Some(queue) => {
                let sent = self
                    .send(exchange, routing_key, body, properties.clone())
                    .await?;
                let replied = self.send("", queue, body, properties).await?;
                self.confirm(exchange, sent).await?;
                self.confirm(queue, replied).await
            }
        }
    }

    /// Publishes one message that must land in a queue (a copy of a
    /// command), and waits for its confirm before the next one may go.
    pub async fn publish_routed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let target = if exchange.is_empty() {
            routing_key
        } else {
            exchange
        };
        let limit = self.inner.confirm_timeout;
        let Ok(_alone) = tokio::time::timeout(limit, self.inner.one_copy.lock()).await else {
            // The copies before it are not confirmed either: the broker is
            // in trouble, and waiting in line would outlast any deadline.
            return Err(PublishError::Timeout(target.to_owned(), limit));
        };
        let confirm = send(&self.inner.copies, exchange, routing_key, body, properties).await?;
        match self.wait(target, confirm).await? {
            None => Ok(()),
            Some(_) => Err(PublishError::Unroutable(target.to_owned())),
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
