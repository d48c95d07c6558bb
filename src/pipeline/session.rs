//! One broker connection's life: declare, consume, run a task per delivery.
//!
//! A session ends with an error whenever its connection or a channel fails;
//! the supervisor then starts a new one. Tasks of a dead session are aborted
//! with it: their deliveries belong to a dead channel, so the broker has
//! already requeued them, and their acks could not land anyway.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::Pipeline;
use super::handler::{Outcome, Settle};
use super::settlement::Settlements;
use crate::broker::{self, Publisher, TopologyError};
use crate::configuration::Settings;
use crate::operations::Health;

/// Why a session ended other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Opening a channel or consuming failed.
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    /// The connection could not be opened.
    #[error("broker: {0}")]
    Connect(#[from] broker::ConnectError),
    /// The topology could not be declared.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// The broker cancelled our consumer (queue deleted, node down...).
    #[error("the broker cancelled the consumer")]
    ConsumerCancelled,
    /// The publishing channel closed (e.g. the results exchange is missing).
    #[error("the publishing channel closed")]
    PublisherClosed,
}

/// What a session needs from the replica.
pub struct SessionContext<'a> {
    /// Settings.
    pub settings: &'a Settings,
    /// Shared pipeline.
    pub pipeline: &'a Arc<Pipeline>,
    /// Probes' view.
    pub health: &'a Health,
    /// Cancelled on SIGTERM/SIGINT.
    pub shutdown: &'a CancellationToken,
    /// This replica's name on the broker.
    pub name: &'a str,
}

/// Runs one session until shutdown (`Ok`) or a failure (`Err`).
pub async fn run(ctx: &SessionContext<'_>) -> Result<(), SessionError> {
    let amqp = &ctx.settings.amqp;
    let connection = broker::connect(&amqp.url, ctx.name, amqp.ca_file.as_deref()).await?;
    if amqp.declare_topology {
        ctx.pipeline.topology.declare(&connection).await?;
    }
    let publisher = Publisher::open(&connection, amqp.confirm_timeout()).await?;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(amqp.prefetch, BasicQosOptions { global: false })
        .await?;
    ctx.health.set_connected(true);
    tracing::info!(queue = %amqp.queue, prefetch = amqp.prefetch, "connected to the broker");

    let mut tasks = JoinSet::new();
    let result = consume(ctx, &channel, &publisher, &mut tasks).await;
    ctx.health.set_connected(false);
    if result.is_ok() {
        drain(ctx, &mut tasks).await;
        close(&connection).await;
    }
    result
}

/// Consumes until shutdown, pausing while the key is refused.
async fn consume(
    ctx: &SessionContext<'_>,
    channel: &Channel,
    publisher: &Publisher,
    tasks: &mut JoinSet<Outcome>,
) -> Result<(), SessionError> {
    let tag = format!("{}-{}", ctx.name, uuid::Uuid::new_v4().simple());
    let settlements = Settlements::new(channel.clone(), ctx.settings.amqp.prefetch);
    loop {
        if ctx.pipeline.credentials.is_faulted() {
            ctx.health.set_credentials_refused(true);
            ctx.pipeline.metrics.credentials_refused.set(1);
            if !ctx
                .pipeline
                .credentials
                .recover(&ctx.pipeline.client, ctx.shutdown)
                .await
            {
                return Ok(());
            }
            ctx.health.set_credentials_refused(false);
            ctx.pipeline.metrics.credentials_refused.set(0);
        }
        let mut consumer = channel
            .basic_consume(
                ctx.settings.amqp.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        ctx.health.set_consuming(true);
        let paused = run_consumer(ctx, &settlements, &mut consumer, publisher, tasks).await?;
        ctx.health.set_consuming(false);
        // Stop the flow, then put back what the broker had already pushed.
        channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await?;
        requeue_buffered(&settlements, &mut consumer).await;
        if !paused {
            return Ok(());
        }
    }
}

/// Feeds deliveries to tasks. `Ok(true)`: paused for a credential fault;
/// `Ok(false)`: shutdown.
async fn run_consumer(
    ctx: &SessionContext<'_>,
    settlements: &Arc<Settlements>,
    consumer: &mut Consumer,
    publisher: &Publisher,
    tasks: &mut JoinSet<Outcome>,
) -> Result<bool, SessionError> {
    // Every second: is the publisher still open, and which tasks finished.
    let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
    // Built once, not on every turn of the loop: each would register a
    // waiter anew for every delivery.
    let shutdown = ctx.shutdown.cancelled();
    let faulted = ctx.pipeline.credentials.faulted();
    tokio::pin!(shutdown, faulted);
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(false),
            () = &mut faulted => return Ok(true),
            _ = housekeeping.tick() => {
                reap(tasks);
                if !publisher.is_open() {
                    return Err(SessionError::PublisherClosed);
                }
            }
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let delivery = settlements.take(delivery);
                    let pipeline = Arc::clone(ctx.pipeline);
                    let publisher = publisher.clone();
                    // Boxed: the task then holds a pointer, and the runtime
                    // moves 16 bytes instead of the whole state machine when it
                    // creates the task, stores its output and hands it over.
                    tasks.spawn(Box::pin(async move { pipeline.handle(&delivery, &publisher).await }));
                    reap(tasks);
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Err(SessionError::ConsumerCancelled),
            },
        }
    }
}

/// Collects the tasks that finished, without waiting. Finished tasks are
/// collected as deliveries come in (and every second), not as each ends:
/// waiting on the set would wake this loop once more per delivery.
fn reap(tasks: &mut JoinSet<Outcome>) {
    while let Some(done) = tasks.try_join_next() {
        record(done);
    }
}

fn record(done: Result<Outcome, tokio::task::JoinError>) {
    match done {
        Ok(outcome) => tracing::debug!(outcome = outcome.label(), "delivery finished"),
        Err(e) if e.is_panic() => {
            tracing::error!(error = %e, "a delivery task panicked; the broker will redeliver its command")
        }
        Err(_) => {}
    }
}

/// After `basic.cancel`, deliveries already pushed to us still arrive; they
/// go back to the queue at once rather than waiting for the channel to close.
async fn requeue_buffered(settlements: &Arc<Settlements>, consumer: &mut Consumer) {
    let bounded = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(delivery)) = consumer.next().await {
            let _ = settlements.take(delivery).settle(Settle::Requeue);
        }
    });
    let _ = bounded.await;
}

/// Lets in-flight commands finish within the grace period, then aborts the
/// rest; closing the connection requeues their deliveries.
async fn drain(ctx: &SessionContext<'_>, tasks: &mut JoinSet<Outcome>) {
    let grace = ctx.settings.worker.shutdown_grace();
    tracing::info!(
        in_flight = tasks.len(),
        ?grace,
        "draining in-flight commands"
    );
    let finished = tokio::time::timeout(grace, async {
        while let Some(done) = tasks.join_next().await {
            record(done);
        }
    })
    .await;
    if finished.is_err() {
        tracing::warn!(
            left = tasks.len(),
            "grace period over: requeueing the commands still in flight"
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

async fn close(connection: &Connection) {
    if let Err(e) = connection.close(200, "shutting down".into()).await {
        tracing::warn!(error = %e, "closing the broker connection");
    }
}
