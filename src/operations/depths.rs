//! The depth of the commands queue and of the dead-letter queue, and the
//! events the results log keeps, as this replica sees them, so the dashboard and the alerts ("dead letters
//! growing", "no progress while commands wait") need nothing but the
//! worker's own `/metrics`: no broker exporter, no per-queue metrics to turn
//! on in RabbitMQ.
//!
//! Every replica reports the same queues; aggregate with `max`, not `sum`.

use std::convert::Infallible;
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection};

use super::Metrics;
use super::metrics::QueueLabel;
use crate::broker::{Topology, results_log};

/// How often the depths are read: about one scrape interval.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(15);

/// The longest one passive declaration may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the depths every [`SAMPLE_EVERY`], for as long as the session
/// lives (drop the future to stop). A failed read (a queue that is missing
/// closes the channel) is skipped; the next one opens a new channel.
pub async fn sample(connection: &Connection, topology: &Topology, metrics: &Metrics) -> Infallible {
    let queues = [
        ("commands", &topology.queue),
        ("dead_letters", &topology.dead),
    ];
    let mut channel: Option<Channel> = None;
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tick.tick().await;
        for (role, name) in queues {
            match ready(connection, &mut channel, name).await {
                Some(depth) => {
                    let gauge = metrics
                        .queue_messages
                        .get_or_create(&QueueLabel { queue: role });
                    gauge.set(i64::from(depth));
                }
                None => {
                    tracing::debug!(queue = %name, "cannot read the queue's depth");
                    channel = None;
                }
            }
        }
        if let Some(log) = &topology.results_log {
            let kept = tokio::time::timeout(CALL_TIMEOUT, results_log::kept(connection, &log.name));
            match kept.await {
                Ok(Ok(kept)) => {
                    let gauge = metrics.queue_messages.get_or_create(&QueueLabel {
                        queue: "results_log",
                    });
                    gauge.set(i64::try_from(kept.unwrap_or(0)).unwrap_or(i64::MAX));
                }
                _ => tracing::debug!(log = %log.name, "cannot read the results log's size"),
            }
        }
    }
}

/// Messages ready in `name`, on `channel` (opened when missing).
async fn ready(connection: &Connection, channel: &mut Option<Channel>, name: &str) -> Option<u32> {
    let read = async {
        if channel.is_none() {
            *channel = Some(connection.create_channel().await.ok()?);
        }
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let queue = channel
            .as_ref()?
            .queue_declare(name.into(), options, FieldTable::default())
            .await
            .ok()?;
        Some(queue.message_count())
    };
    tokio::time::timeout(CALL_TIMEOUT, read)
        .await
        .ok()
        .flatten()
}
