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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_block_makes_the_replica_unready_until_it_is_lifted() {
        let (health, metrics) = (Health::default(), Metrics::new());
        let (events, stream) = event_stream();
        let (blocks, mut blocked) = watch::channel(false);
        let following = follow(stream, false, &health, &metrics, blocks);
        tokio::pin!(following);
        let mut step = async |event: Event| {
            events.send(event).expect("listened");
            tokio::select! {
                never = &mut following => match never {},
                changed = blocked.changed() => changed.expect("sender alive"),
            }
            *blocked.borrow_and_update()
        };
        assert!(step(Event::ConnectionBlocked("low on memory".into())).await);
        assert_eq!(health.blocked().as_deref(), Some("low on memory"));
        assert!(health.readiness().blocked);
        assert!(metrics.encode().contains("cpw_broker_blocked 1"));
        assert!(!step(Event::ConnectionUnblocked).await);
        assert_eq!(health.blocked(), None);
        assert!(!health.readiness().blocked);
        assert!(metrics.encode().contains("cpw_broker_blocked 0"));
    }

    #[tokio::test]
    async fn a_connection_blocked_before_it_was_followed_counts() {
        let (health, metrics) = (Health::default(), Metrics::new());
        let (_events, stream) = event_stream();
        let (blocks, blocked) = watch::channel(false);
        let following = follow(stream, true, &health, &metrics, blocks);
        let _ = tokio::time::timeout(std::time::Duration::from_millis(10), following).await;
        assert!(*blocked.borrow());
        assert!(health.readiness().blocked);
        clear(&health, &metrics);
        assert!(!health.readiness().blocked);
    }

    fn event_stream() -> (
        tokio::sync::mpsc::UnboundedSender<Event>,
        impl Stream<Item = Event>,
    ) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        (tx, stream)
    }
}
