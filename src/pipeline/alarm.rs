//! The broker's resource alarms, as one replica lives them.
//!
//! On a memory or disk alarm RabbitMQ stops reading from every connection
//! that publishes, and says so with `connection.blocked`; lapin then writes
//! nothing at all (no event, no copy, no ack) until `connection.unblocked`.
//! A delivery taken meanwhile would only wait for a publish that cannot go
//! out, so while the connection is blocked the session takes no new
//! deliveries, `/readyz` answers not ready and says why, and
//! `cpw_broker_blocked` is 1. Commands already in flight keep their bounds
//! (every publish and every confirm is bounded): a command whose event
//! cannot go out goes back to RabbitMQ without being acked, and is
//! answered once the alarm clears, without a second charge (the same
//! Idempotency-Key).

use std::convert::Infallible;

use futures_util::{Stream, StreamExt};
use lapin::Event;
use tokio::sync::watch;

use crate::operations::{Health, Metrics};

/// Follows the connection's blocked state for as long as the session runs:
/// `/readyz`, the gauge, one log line per change, and `blocked` for the
/// consumer. `initially` is the connection's state when `events` was taken
/// (a block reported before is not repeated).
pub async fn follow(
    events: impl Stream<Item = Event>,
    initially: bool,
    health: &Health,
    metrics: &Metrics,
    blocked: watch::Sender<bool>,
) -> Infallible {
    let set = |reason: Option<String>| {
        metrics.broker_blocked.set(i64::from(reason.is_some()));
        blocked.send_replace(reason.is_some());
        health.set_blocked(reason);
    };
    if initially {
        tracing::warn!(
            "the broker blocks the connection (resource alarm): taking no new deliveries until it lifts it"
        );
        set(Some("reason not given".to_owned()));
    }
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        match event {
            Event::ConnectionBlocked(reason) => {
                tracing::warn!(
                    %reason,
                    "the broker blocked the connection (resource alarm): taking no new deliveries until it lifts it"
                );
                set(Some(reason));
            }
            Event::ConnectionUnblocked => {
                tracing::info!("the broker unblocked the connection: taking deliveries again");
                set(None);
            }
            _ => {}
        }
    }
    // The connection is gone: the session ends by its other parts.
    std::future::pending().await
}

/// A session that ends leaves no alarm behind: the next connection says
/// for itself whether it is blocked.
pub fn clear(health: &Health, metrics: &Metrics) {
    health.set_blocked(None);
    metrics.broker_blocked.set(0);
}
