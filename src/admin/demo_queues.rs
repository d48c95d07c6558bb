//! The demo's broker plumbing: the observer of its result events, and the
//! removal of its throwaway queues and exchanges.
//!
//! Kept apart from the orchestration in `demo` because both are about leaving
//! the broker as the demo found it: the observer queue is exclusive and
//! vanishes with the connection, and everything else is deleted by name, on
//! every way out.

use std::time::Instant;

use futures_util::StreamExt;
use lapin::Connection;
use lapin::options::{ExchangeDeleteOptions, QueueBindOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::broker::Topology;

/// Binds a private queue to every result event and timestamps each on
/// arrival, in a task of its own so the latency is not inflated while the
/// batch is still being published.
pub async fn observe(
    connection: &Connection,
    exchange: &str,
) -> Result<mpsc::UnboundedReceiver<(Instant, Value)>, lapin::Error> {
    let (channel, name, mut consumer) =
        crate::broker::private_queue(connection, "demo-observer").await?;
    channel
        .queue_bind(
            name.as_str().into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            let at = Instant::now();
            if let Ok(event) = serde_json::from_slice::<Value>(&delivery.data)
                && tx.send((at, event)).is_err()
            {
                break;
            }
        }
    });
    Ok(rx)
}

/// Deletes the demo's queues and exchanges, each on a fresh channel so one
/// failure does not stop the rest; what cannot be removed is named.
pub async fn remove(connection: &Connection, topology: &Topology) {
    let queues = topology.queue_names();
    let exchanges = [
        topology.queue.clone(),
        topology.dlx.clone(),
        topology.results_exchange.clone(),
    ];
    for queue in &queues {
        let deleted = async {
            let channel = connection.create_channel().await?;
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await?;
            channel.close(200, "demo over".into()).await
        };
        if let Err(e) = deleted.await {
            eprintln!("demo: could not delete queue {queue}: {e}");
        }
    }
    for exchange in &exchanges {
        let deleted = async {
            let channel = connection.create_channel().await?;
            channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await?;
            channel.close(200, "demo over".into()).await
        };
        if let Err(e) = deleted.await {
            eprintln!("demo: could not delete exchange {exchange}: {e}");
        }
    }
}
