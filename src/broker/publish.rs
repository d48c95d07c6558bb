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

use crate::budget::{REPLY_PAUSE, REPLY_TRIES};

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
    /// The message could not even be written in time: the broker blocks the
    /// connection (a resource alarm), or the socket does not drain. lapin
    /// keeps it queued and writes it when it can, so it may still arrive.
    #[error(
        "the message to `{0}` could not be written within {1:?} (the broker blocks the connection?)"
    )]
    Unwritten(String, Duration),
}

impl PublishError {
    /// A short class of the failure, for a span's `error.type`.
    pub fn kind(&self) -> &'static str {
        match self {
            PublishError::Channel(_) => "channel",
            PublishError::Nacked(_) => "nacked",
            PublishError::Unroutable(_) => "unroutable",
            PublishError::Timeout(..) => "confirm_timeout",
            PublishError::Unwritten(..) => "publish_timeout",
        }
    }
}

/// A `reply_to` copy of an event given up on: the event itself is on the
/// results exchange.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DroppedReply {
    /// The `reply_to` it was sent to.
    pub queue: String,
    /// Why, for a metric label: `unroutable` (no such queue), `nacked`,
    /// `confirm_timeout`, `channel`, ...
    pub reason: &'static str,
    /// What happened, for the log.
    pub detail: String,
}

/// Confirm-mode channels for events and copies. Clone it freely: publishes
/// from concurrent commands share the channels, and a clone is one reference
/// count (a lapin `Channel` clone is more than a dozen).
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    /// Where a closed copies channel is opened again.
    connection: Arc<Connection>,
    events: Channel,
    /// Held from a copy's publish to its confirm. A copy carries the
    /// publisher's properties; should the broker refuse one and close the
    /// channel, the next copy opens a new one: a refused copy is that
    /// delivery's problem, never the session's. `None` after a copy timed
    /// out: its late return or ack could be credited to the next copy on
    /// the same channel (lapin attaches a return to the next confirm it
    /// resolves, and resolves a multiple ack in map order), so an
    /// unroutable copy could read as routed and its original be acked.
    copies: tokio::sync::Mutex<Option<Channel>>,
    confirm_timeout: Duration,
}

async fn confirm_channel(connection: &Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Publishes one message, bounded by `limit`. lapin's `basic_publish`
/// returns only once the message is written, and lapin writes nothing while
/// the broker blocks the connection (`connection.blocked`, a resource
/// alarm): unbounded, a publish would wait as long as the alarm lasts, and
/// its command with it.
async fn send(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
    limit: Duration,
) -> Result<PublisherConfirm, PublishError> {
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let publish = channel.basic_publish(
        exchange.into(),
        routing_key.into(),
        options,
        body,
        properties,
    );
    match tokio::time::timeout(limit, publish).await {
        Ok(sent) => Ok(sent?),
        Err(_) => {
            let target = if exchange.is_empty() {
                routing_key
            } else {
                exchange
            };
            Err(PublishError::Unwritten(target.to_owned(), limit))
        }
    }
}

impl Publisher {
    /// Opens the two channels in confirm mode.
    pub async fn open(
        connection: Arc<Connection>,
        confirm_timeout: Duration,
    ) -> Result<Self, lapin::Error> {
        let events = confirm_channel(&connection).await?;
        let copies = tokio::sync::Mutex::new(Some(confirm_channel(&connection).await?));
        Ok(Publisher {
            inner: Arc::new(Inner {
                connection,
                events,
                copies,
                confirm_timeout,
            }),
        })
    }

    /// How long one publish may wait for its confirm: also the bound of
    /// what a caller does around its publishes (closing a channel).
    pub fn confirm_timeout(&self) -> Duration {
        self.inner.confirm_timeout
    }

    /// Whether events can still be published (a closed copies channel is
    /// opened again by the next copy).
    pub fn is_open(&self) -> bool {
        self.inner.events.status().connected() && self.inner.connection.status().connected()
    }

    /// Sends a persistent, mandatory event, bounded by the confirm timeout;
    /// confirm it with [`Publisher::confirm`].
    pub async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<PublisherConfirm, PublishError> {
        let limit = self.inner.confirm_timeout;
        send(
            &self.inner.events,
            exchange,
            routing_key,
            body,
            properties,
            limit,
        )
        .await
    }

    /// Waits, bounded, for the broker's confirm of one sent event. A return
    /// that comes with it may belong to another event (lapin attaches it
    /// to the next confirm it resolves), so it is reported by what it says
    /// of itself: a return from the default exchange is a `reply_to` copy
    /// whose queue does not exist, handed back to the caller to count;
    /// any other is an event no queue took, logged here.
    pub async fn confirm(
        &self,
        target: &str,
        confirm: PublisherConfirm,
    ) -> Result<Option<DroppedReply>, PublishError> {
        let Some(returned) = self.wait(target, confirm).await? else {
            return Ok(None);
        };
        let d = &returned.delivery;
        if d.exchange.as_str().is_empty() {
            return Ok(Some(DroppedReply {
                queue: d.routing_key.as_str().to_owned(),
                reason: "unroutable",
                detail: "no queue by that name".to_owned(),
            }));
        }
        tracing::warn!(
            exchange = %d.exchange,
            routing_key = %d.routing_key,
            "an event reached no queue (nothing is bound to that routing key)"
        );
        Ok(None)
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

    /// Publishes an event to the results exchange, confirmed: the one way
    /// every event goes out (the worker's and `dead-letters reconcile`'s
    /// alike). A `reply_to` copy a command asked for is sent apart, with
    /// [`Publisher::publish_reply`], once the command is settled.
    ///
    /// `Ok(Some(_))`: a `reply_to` copy sent earlier on the channel came
    /// back unroutable with this confirm (lapin attaches a return to the
    /// next confirm it resolves), given back for the caller to count.
    pub async fn publish_event(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<Option<DroppedReply>, PublishError> {
        let sent = self.send(exchange, routing_key, body, properties).await?;
        self.confirm(exchange, sent).await
    }

    /// The `reply_to` copy of an event already confirmed on the results
    /// exchange: a courtesy to the requester, never a condition of the
    /// command's ack (docs/contract.md section 3). A queue that does not
    /// exist, or refuses the copy (full, `reject-publish`), gets
    /// [`REPLY_TRIES`] tries and is then reported as dropped, never as an
    /// error (an unconfirmed reply once kept a charged command circling for
    /// good). What is dropped, if anything; several when a return of
    /// another reply came back with this one's confirm.
    pub async fn publish_reply(
        &self,
        queue: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Vec<DroppedReply> {
        let mut tries = 1;
        loop {
            let result = match self.send("", queue, body, props.clone()).await {
                Ok(confirm) => self.confirm(queue, confirm).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(returned) => return returned.into_iter().collect(),
                Err(e) if tries >= REPLY_TRIES => {
                    return vec![DroppedReply {
                        queue: queue.to_owned(),
                        reason: e.kind(),
                        detail: format!("{e} (after {tries} tries)"),
                    }];
                }
                Err(_) => {}
            }
            tokio::time::sleep(REPLY_PAUSE * tries).await;
            tries += 1;
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
        let Ok(mut slot) = tokio::time::timeout(limit, self.inner.copies.lock()).await else {
            // The copies before it are not confirmed either: the broker is
            // in trouble, and waiting in line would outlast any deadline.
            return Err(PublishError::Timeout(target.to_owned(), limit));
        };
        let channel = match slot.take() {
            Some(open) if open.status().connected() => open,
            closed => {
                let reopened = tokio::time::timeout(limit, confirm_channel(&self.inner.connection));
                let Ok(reopened) = reopened.await else {
                    return Err(PublishError::Timeout(target.to_owned(), limit));
                };
                let reason = match closed {
                    Some(_) => "the broker closed it (a refused copy)",
                    None => "a copy on it timed out",
                };
                tracing::info!(reason, "opened a new copies channel");
                reopened?
            }
        };
        let confirmed = match send(&channel, exchange, routing_key, body, properties, limit).await {
            Ok(confirm) => self.wait(target, confirm).await,
            Err(e) => Err(e),
        };
        match confirmed {
            // Not put back: dropped here, and lapin closes a channel once
            // its last handle goes; the next copy opens a fresh one.
            Err(PublishError::Timeout(..) | PublishError::Unwritten(..)) => {}
            _ => *slot = Some(channel),
        }
        match confirmed? {
            None => Ok(()),
            Some(_) => Err(PublishError::Unroutable(target.to_owned())),
        }
    }
}

/// The command's `reply_to`, when it names a queue (an empty one names none).
pub fn reply_to(properties: &BasicProperties) -> Option<&str> {
    properties
        .reply_to()
        .as_ref()
        .map(|r| r.as_str())
        .filter(|r| !r.is_empty())
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
