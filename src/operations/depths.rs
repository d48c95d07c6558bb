//! The depth of each lane's commands queue (and of all of them together, as
//! `commands`) and of the dead-letter queue, and the events the results log
//! keeps, as this replica sees them, so the dashboard
//! and the alerts ("dead letters growing", "no progress while commands
//! wait") need nothing but the worker's own `/metrics`: no broker exporter,
//! no per-queue metrics to turn on in RabbitMQ.
//!
//! All come from a passive `queue.declare`, which for a stream gives
//! the events it keeps (the offsets it holds, not a read of them). The
//! results log was once sized by reading it: a reader at its newest chunk
//! never caught up while events were written, and parsed every event the
//! replica published for ten seconds out of each fifteen: 21,000
//! instructions per command, a tenth of the worker's (BENCHMARKS.md).
//!
//! Every replica reports the same queues; aggregate with `max`, not `sum`.

use std::convert::Infallible;
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection};

use super::Metrics;
use super::metrics::{LaneLabel, QueueLabel};
use crate::broker::{Topology, results_log};

/// How often the depths are read: about one scrape interval.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(15);

/// The longest one passive declaration may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the depths every [`SAMPLE_EVERY`], for as long as the session
/// lives (drop the future to stop). A failed read (a queue that is missing
/// closes the channel) is skipped; the next one opens a new channel.
pub async fn sample(connection: &Connection, topology: &Topology, metrics: &Metrics) -> Infallible {
    let mut channel: Option<Channel> = None;
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tick.tick().await;
        // `commands` is every lane's together, as before lanes existed: the
        // alerts and the autoscaler that read it need not know the lanes.
        let mut commands = Some(0);
        for lane in &topology.lanes {
            let depth = ready(connection, &mut channel, &lane.queue).await;
            if let Some(depth) = depth {
                let label = LaneLabel {
                    lane: lane.name.clone(),
                };
                metrics
                    .lane_messages
                    .get_or_create(&label)
                    .set(i64::from(depth));
            }
            commands = commands.zip(depth).map(|(sum, d)| sum + i64::from(d));
        }
        let dead = ready(connection, &mut channel, &topology.dead).await;
        let depths = [
            ("commands", commands),
            ("dead_letters", dead.map(i64::from)),
        ];
        for (role, depth) in depths {
            if let Some(depth) = depth {
                let gauge = metrics
                    .queue_messages
                    .get_or_create(&QueueLabel { queue: role });
                gauge.set(depth);
            }
        }
        if let Some(log) = &topology.results_log {
            match log_size(connection, &mut channel, &log.name).await {
                Some(kept) => {
                    let gauge = metrics.queue_messages.get_or_create(&QueueLabel {
                        queue: "results_log",
                    });
                    gauge.set(i64::try_from(kept).unwrap_or(i64::MAX));
                }
                None => {
                    tracing::debug!(log = %log.name, "cannot read the results log's size");
                    channel = None;
                }
            }
        }
    }
}

/// The events the results log `name` keeps: the passive declaration's
/// count, or, when a broker reports none, the span of its offsets (one
/// event read at each end, never the events between).
async fn log_size(
    connection: &Connection,
    channel: &mut Option<Channel>,
    name: &str,
) -> Option<u64> {
    match ready(connection, channel, name).await? {
        0 => {
            let kept = tokio::time::timeout(CALL_TIMEOUT, results_log::kept(connection, name));
            Some(kept.await.ok()?.ok()?.unwrap_or(0))
        }
        count => Some(u64::from(count)),
    }
}

/// Messages ready in `name`, on `channel` (opened when missing, and
/// dropped after a failure: a refused passive declaration closes it).
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
    let count = tokio::time::timeout(CALL_TIMEOUT, read)
        .await
        .ok()
        .flatten();
    if count.is_none() {
        tracing::debug!(queue = %name, "cannot read the queue's depth");
        *channel = None;
    }
    count
}
