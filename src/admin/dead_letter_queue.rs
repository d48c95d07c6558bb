//! The dead-letter queue (`<queue>.dead`) as every operator tool reads it:
//! `dead-letters list`, `show`, `replay`, `purge` and `reconcile` share this
//! [`Reading`], its [`Error`], and the [`table`] of `list` and `purge`.
//!
//! AMQP 0-9-1 has no peek, so every tool reads with `basic.get`
//! without auto-ack, holding every message unacknowledged until the queue
//! (as it was when it started) is read, then settles each one: `list` puts
//! all of them back, `replay` acks only what it has republished and had
//! confirmed, and puts the rest back. A crash in between loses nothing: the
//! broker requeues what a closed channel held.
//!
//! Reading never wears a letter out. A letter returned with `nack` (or by a
//! closed channel) counts one more delivery, and a quorum queue drops a
//! message at its delivery limit (`<queue>.dead` has no dead-letter exchange:
//! it would be lost). The worker declares the dead queue with a limit no
//! reading reaches (`broker::topology`), but one an earlier release created
//! has RabbitMQ 4.x's default of 20. So a letter is put back as a fresh copy,
//! confirmed, and only then is the read one acked: the copy carries the same
//! body, properties and headers (but for what would get it refused or lost,
//! see [`fresh_copy`]) and has never been delivered. Only when the copy
//! cannot be made is the letter returned with `nack`, which keeps it at the
//! cost of one delivery.

use std::sync::Arc;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};

use super::ConnectError;
use super::letter::DeadLetterInfo;
use crate::broker::history::{DELIVERED_COUNT_HEADER, DELIVERY_COUNT_HEADER};
use crate::broker::{Publisher, copy_properties, header_u64};
use crate::configuration::{ConfigError, Settings};

/// Why the dead letters could not be read or replayed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The settings could not be loaded.
    #[error("{0}")]
    Config(ConfigError),
    /// The broker could not be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The dead-letter queue does not exist.
    #[error("the dead-letter queue `{0}` does not exist: is the topology declared? (see `check`)")]
    Missing(String),
    /// The dead-letter queue could not be read.
    #[error("cannot read the dead-letter queue `{queue}`: {}", super::broker_says(.cause))]
    Read {
        queue: String,
        /// What the broker said.
        cause: lapin::Error,
    },
    /// A channel operation failed.
    #[error("broker error: {}", super::broker_says(.0))]
    Broker(lapin::Error),
    /// A letter read could not be put back cleanly: it may appear twice.
    #[error(
        "a dead letter read could not be settled after its copy was put back ({0}): it may now \
         appear twice in the queue; run the command again to see the queue as it is"
    )]
    PutBack(String),
    /// A letter chosen for removal could not be removed.
    #[error("a dead letter could not be removed ({0}): it stays in the queue; run again")]
    NotRemoved(String),
    /// A replayed copy was not confirmed (its dead letter stays where it was).
    #[error("could not replay {id}: {cause}; it stays in the dead-letter queue")]
    Replay {
        /// The command id.
        id: String,
        /// What went wrong.
        cause: crate::broker::PublishError,
    },
}

super::wrap_error!(Error::Config(ConfigError));
super::wrap_error!(Error::Broker(lapin::Error));

/// One read of the dead-letter queue, as every tool reads it (see the
/// module): a channel that holds every letter unacknowledged until it is
/// settled, and a publisher for the fresh copies that put letters back.
pub(super) struct Reading {
    channel: Channel,
    publisher: Publisher,
    dead: String,
}

impl Reading {
    /// Opens the channel and the publisher, then takes every letter that is
    /// in `dead` now ([`take_all`]).
    pub(super) async fn start(
        connection: &Arc<Connection>,
        settings: &Settings,
        dead: &str,
    ) -> Result<(Reading, Vec<Delivery>), Error> {
        let channel = connection.create_channel().await?;
        let publisher =
            Publisher::open(Arc::clone(connection), settings.amqp.confirm_timeout()).await?;
        let held = take_all(&channel, dead).await?;
        let reading = Reading {
            channel,
            publisher,
            dead: dead.to_owned(),
        };
        Ok((reading, held))
    }

    /// The publisher, for what a tool sends besides the letters put back.
    pub(super) fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// [`put_back`] into the queue the letters were read from.
    pub(super) async fn put_back(&self, letters: &[Delivery]) -> Result<(), Error> {
        put_back(&self.publisher, &self.dead, letters).await
    }

    /// Ends the read. The broker answers a channel's close only after every
    /// ack sent before it, so only then is a removal (or the ack of a letter
    /// put back) known to be done: the error says why it is not. Bounded by
    /// the confirm timeout, so a blocked connection cannot hold the tool.
    pub(super) async fn finish(self, reason: &str) -> Result<(), String> {
        let limit = self.publisher.confirm_timeout();
        match tokio::time::timeout(limit, self.channel.close(200, reason.into())).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(super::broker_says(&e)),
            Err(_) => Err(format!("the broker did not answer within {limit:?}")),
        }
    }
}

/// Gets, without acking, every message that was in `queue` when the first was
/// got: new arrivals during the read are left for the next run, so a busy
/// queue cannot keep this loop going forever.
async fn take_all(channel: &Channel, queue: &str) -> Result<Vec<Delivery>, Error> {
    let get = |queue: &str| {
        let channel = channel.clone();
        let queue = queue.to_owned();
        async move {
            channel
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
                .await
                .map_err(|cause| match super::is_not_found(&cause) {
                    true => Error::Missing(queue),
                    false => Error::Read { queue, cause },
                })
        }
    };
    let Some(first) = get(queue).await? else {
        return Ok(Vec::new());
    };
    let total = usize::try_from(first.message_count)
        .unwrap_or(usize::MAX)
        .saturating_add(1);
    let mut held = vec![first.delivery];
    while held.len() < total {
        match get(queue).await? {
            Some(message) => held.push(message.delivery),
            None => break,
        }
    }
    Ok(held)
}

/// Puts back what was read, in the order it was read, without wearing it:
/// each letter as a fresh, confirmed copy, then the read one acked (see the
/// module). A letter whose copy failed is returned with `nack`; an ack that
/// failed after its copy was confirmed leaves the letter twice in the queue,
/// which is reported, never hidden.
async fn put_back(publisher: &Publisher, dead: &str, held: &[Delivery]) -> Result<(), Error> {
    let mut failure = None;
    for delivery in held {
        let copy = publisher
            .publish_routed("", dead, &delivery.data, fresh_copy(&delivery.properties))
            .await;
        let settled = match copy {
            Ok(()) => delivery.acker.ack(BasicAckOptions::default()).await,
            Err(e) => {
                tracing::warn!(error = %e, "a dead letter could not be copied back: returned as it was");
                delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        multiple: false,
                    })
                    .await
            }
        };
        match settled {
            Ok(true) => {}
            Ok(false) => failure = Some(Error::PutBack("the channel was already closed".into())),
            Err(e) => failure = Some(Error::PutBack(super::broker_says(&e))),
        }
    }
    failure.map_or(Ok(()), Err)
}

/// A dead letter's properties for its copy ([`copy_properties`], persistent):
/// as they were, without the broker's delivery count (the copy has not been
/// delivered), a `user_id`
/// (RabbitMQ refuses one that is not the publishing user's, and the refusal
/// closes the channel) or an `expiration` (the dead-letter queue has no
/// dead-letter exchange: an expired letter would be lost).
/// A count above zero is kept as [`DELIVERED_COUNT_HEADER`]: the proof that
/// the letter was delivered to a worker, whose first request is then unknown.
pub(super) fn fresh_copy(p: &BasicProperties) -> BasicProperties {
    let mut kept = FieldTable::default();
    for (k, v) in p.headers().iter().flat_map(FieldTable::inner) {
        if k.as_str() != DELIVERY_COUNT_HEADER {
            kept.insert(k.clone(), v.clone());
        }
    }
    let headers = p.headers().as_ref();
    if let Some(count) = header_u64(headers, DELIVERY_COUNT_HEADER).filter(|n| *n > 0)
        && header_u64(headers, DELIVERED_COUNT_HEADER).is_none()
    {
        let count = i64::try_from(count).unwrap_or(i64::MAX);
        kept.insert(DELIVERED_COUNT_HEADER.into(), AMQPValue::LongLongInt(count));
    }
    copy_properties(p, kept)
}

/// The aligned table of `list` (and of `purge`): why (the code and the last HTTP status),
/// how hard the worker tried, when, which replica gave up, and the lane a
/// replay puts it back in (`-`: no configured lane's, the first then).
pub(super) fn table(infos: &[DeadLetterInfo]) -> String {
    let dash = |s: Option<&str>| s.unwrap_or("-").to_owned();
    let number = |n: Option<u64>| n.map_or_else(|| "-".to_owned(), |n| n.to_string());
    let header = [
        "COMMAND ID",
        "CODE",
        "HTTP",
        "ATTEMPTS",
        "FIRST ATTEMPT",
        "LAST ATTEMPT",
        "DIED AT",
        "REPLICA",
        "LANE",
        "DETAIL",
    ]
    .map(String::from);
    let rows: Vec<[String; 10]> = infos
        .iter()
        .map(|i| {
            let detail = match (&i.detail, i.broker_reason.as_deref()) {
                (Some(detail), _) => detail.clone(),
                // Dead-lettered by the broker itself, not by the worker.
                (None, Some(reason)) => format!("broker: {reason}"),
                (None, None) => "-".to_owned(),
            };
            [
                dash(i.command_id.as_deref()),
                dash(i.error_code),
                number(i.last_status.map(u64::from)),
                number(i.attempts),
                dash(i.first_attempt.as_deref()),
                dash(i.last_attempt.as_deref()),
                dash(i.died_at.as_deref()),
                dash(i.replica.as_deref()),
                dash(i.lane.as_deref()),
                detail,
            ]
        })
        .collect();
    aligned(&header, &rows)
}

/// Rows as columns padded to their widest cell; the last column is not padded.
fn aligned<const N: usize>(header: &[String; N], rows: &[[String; N]]) -> String {
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(header).chain(rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_put_back_keeps_everything_but_what_would_lose_or_refuse_it() {
        let mut headers = FieldTable::default();
        headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(4));
        headers.insert("cpw-error-code".into(), AMQPValue::LongLongInt(1));
        let letter = BasicProperties::default()
            .with_headers(headers)
            .with_message_id("m".into())
            .with_correlation_id("c".into())
            .with_reply_to("r".into())
            .with_delivery_mode(2)
            .with_timestamp(7)
            .with_user_id("publisher".into())
            .with_expiration("60000".into());
        let copy = fresh_copy(&letter);
        let kept = copy.headers().clone().unwrap_or_default();
        // The broker's count is kept under a name of its own: the proof
        // that the letter was delivered to a worker.
        assert_eq!(
            kept.inner().keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            ["cpw-error-code", DELIVERED_COUNT_HEADER]
        );
        assert_eq!(header_u64(Some(&kept), DELIVERED_COUNT_HEADER), Some(4));
        let again = fresh_copy(&copy);
        assert_eq!(
            again.headers(),
            copy.headers(),
            "kept through every put-back"
        );
        assert_eq!(
            (copy.user_id(), copy.expiration()),
            (&None, &None),
            "refused or lost otherwise"
        );
        let without = |p: &BasicProperties| {
            p.clone()
                .with_headers(FieldTable::default())
                .with_user_id("-".into())
                .with_expiration("-".into())
        };
        assert_eq!(
            without(&copy),
            without(&letter),
            "everything else as it was"
        );
    }
}
