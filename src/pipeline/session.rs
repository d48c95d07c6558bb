//! One broker connection's life: declare, consume, run a task per delivery.
//!
//! A session ends with an error whenever its connection or a channel fails;
//! the supervisor then starts a new one. Tasks of a dead session are aborted
//! with it: their deliveries belong to a dead channel, so the broker has
//! already requeued them, and their acks could not land anyway.

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::decision::Outcome;
use super::{Pipeline, alarm};
use crate::broker::{self, Mismatch, Publisher, Settle, Settlements, TopologyError};
use crate::configuration::Settings;
use crate::operations::metrics::NodeLabel;
use crate::operations::{HEARTBEAT, Health, depths};

/// The longest a broker call of the session's setup may take. lapin's calls
/// have no timeout of their own: a call that never returns would leave the
/// replica alive in name only.
const BROKER_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// After the drain period, how long abandoned commands get to be put back
/// with what was learned about them before their tasks are aborted.
const ABANDON_GRACE: Duration = Duration::from_secs(5);

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
    Topology(TopologyError),
    /// An existing queue or exchange differs from what the worker declares,
    /// or one is missing where the worker declares nothing: no
    /// reconnection can fix it.
    #[error(transparent)]
    Mismatch(#[from] Mismatch),
    /// The broker cancelled our consumer (queue deleted, node down...).
    #[error("the broker cancelled the consumer")]
    ConsumerCancelled,
    /// The publishing channel closed (e.g. the results exchange is missing).
    #[error("the publishing channel closed")]
    PublisherClosed,
    /// A broker call did not return in time.
    #[error("the broker did not answer `{0}` within {BROKER_CALL_TIMEOUT:?}")]
    Unresponsive(&'static str),
}

impl From<TopologyError> for SessionError {
    /// A refusal for other arguments is a mismatch, also when it comes from
    /// the declaration itself (the object changed after the comparison).
    fn from(e: TopologyError) -> Self {
        match e.mismatch() {
            Some(mismatch) => SessionError::Mismatch(mismatch),
            None => SessionError::Topology(e),
        }
    }
}

/// A broker call of the session, bounded, with a heartbeat once it returns.
async fn call<T, E>(
    health: &Health,
    what: &'static str,
    future: impl Future<Output = Result<T, E>>,
) -> Result<T, SessionError>
where
    SessionError: From<E>,
{
    let result = tokio::time::timeout(BROKER_CALL_TIMEOUT, future)
        .await
        .map_err(|_| SessionError::Unresponsive(what))?;
    health.beat();
    Ok(result?)
}

/// Runs a bounded wait (a backoff, a drain, a credential probe) while
/// telling `/healthz` that the loop is alive: the wait is part of the loop.
pub async fn beating<T>(health: &Health, future: impl Future<Output = T>) -> T {
    tokio::pin!(future);
    let mut tick = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            out = &mut future => return out,
            _ = tick.tick() => health.beat(),
        }
    }
}

/// What a session needs from the replica.
pub struct SessionContext<'a> {
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

/// Runs one session until shutdown (`Ok`) or a failure (`Err`), on the
/// first node of `amqp.url` that answers from `*node` on; `*node` is then
/// the index of the node the session ran on.
pub async fn run(ctx: &SessionContext<'_>, node: &mut usize) -> Result<(), SessionError> {
    let amqp = &ctx.settings.amqp;
    let health = ctx.health;
    let urls = amqp.url.nodes();
    let connect = broker::connect_first(
        urls,
        *node,
        ctx.name,
        amqp.ca_file.as_ref(),
        BROKER_CALL_TIMEOUT,
    );
    let (connection, on) = beating(health, connect).await?;
    let connection = std::sync::Arc::new(connection);
    *node = on;
    let label = broker::node_label(&urls[on]);
    // A handle of its own: the family's guard must not be held across awaits.
    let gauge = ctx
        .pipeline
        .metrics
        .broker_node
        .get_or_create(&NodeLabel {
            node: label.clone(),
        })
        .clone();
    gauge.set(1);
    health.set_node(Some(label.clone()));
    let result = run_on(ctx, &connection, &label).await;
    gauge.set(0);
    health.set_node(None);
    result
}

/// The session on an open connection to the node `label`.
async fn run_on(
    ctx: &SessionContext<'_>,
    connection: &std::sync::Arc<Connection>,
    label: &str,
) -> Result<(), SessionError> {
    let amqp = &ctx.settings.amqp;
    let health = ctx.health;
    // Taken first: lapin reports blocks only to listeners that exist.
    let events = connection.events_listener();
    let initially_blocked = connection.status().blocked();
    if amqp.declare_topology {
        // Compared before anything is declared, so a mismatch leaves no
        // half-made topology behind.
        let topology = &ctx.pipeline.topology;
        call(
            health,
            "compare the topology",
            topology.first_mismatch(connection),
        )
        .await?;
        call(health, "declare", topology.declare(connection)).await?;
    } else {
        // Declaring nothing, the worker would meet a missing object only
        // through what it does to each publish (a copy to a missing delay
        // queue is unroutable, again and again, until the window closes).
        let topology = &ctx.pipeline.topology;
        call(
            health,
            "look for the topology",
            topology.first_missing(connection),
        )
        .await?;
    }
    let publisher = call(
        health,
        "open the publisher",
        Publisher::open(std::sync::Arc::clone(connection), amqp.confirm_timeout()),
    )
    .await?;
    let lanes = open_lanes(ctx, connection).await?;
    ctx.health.set_connected(true);
    // One string, as the field was before lanes: the one lane's queue.
    let queues: Vec<&str> = lanes.iter().map(|lane| lane.queue.as_str()).collect();
    let queues = queues.join(",");
    let prefetch: u32 = ctx
        .settings
        .amqp
        .lanes()
        .iter()
        .map(|l| u32::from(l.prefetch))
        .sum();
    tracing::info!(queue = %queues, prefetch, node = %label, "connected to the broker");

    ctx.pipeline.metrics.prefetch.set(i64::from(prefetch));
    let mut tasks = JoinSet::new();
    let metrics = &ctx.pipeline.metrics;
    let depths = depths::sample(connection, &ctx.pipeline.topology, metrics);
    let (blocks, mut blocked) = watch::channel(false);
    let alarm = alarm::follow(events, initially_blocked, health, metrics, blocks);
    let result = tokio::select! {
        result = consume(ctx, &lanes, &publisher, &mut tasks, &mut blocked) => result,
        never = depths => match never {},
        never = alarm => match never {},
    };
    alarm::clear(health, metrics);
    ctx.health.set_connected(false);
    let stopping = result?;
    drain(
        ctx,
        &mut tasks,
        stopping + ctx.settings.worker.shutdown_grace(),
    )
    .await;
    for lane in &lanes {
        settle_last(connection, &lane.channel).await;
    }
    broker::close(connection, "shutting down").await;
    Ok(())
}

/// One lane's consuming channel. A channel per lane, not one for all: on a
/// shared channel the delivery tags of every consumer interleave, and an ack
/// with `multiple` (see [`settlement`](crate::broker::settlement)) could
/// settle another lane's delivery still waiting in its consumer's buffer.
struct LaneChannel {
    channel: Channel,
    settlements: Arc<Settlements>,
    /// The lane's commands queue.
    queue: String,
    /// Its consumer tag: the replica's name, the lane's and a unique suffix.
    tag: String,
}

/// A channel per lane, each with the lane's own prefetch: a lane's
/// deliveries waiting at the write gate never take the slots another
/// lane's need.
async fn open_lanes(
    ctx: &SessionContext<'_>,
    connection: &Connection,
) -> Result<Vec<LaneChannel>, SessionError> {
    let health = ctx.health;
    let suffix = uuid::Uuid::new_v4().simple();
    let mut lanes = Vec::new();
    for (lane, queues) in ctx
        .settings
        .amqp
        .lanes()
        .into_iter()
        .zip(&ctx.pipeline.topology.lanes)
    {
        let channel = call(health, "open a channel", connection.create_channel()).await?;
        let qos = BasicQosOptions { global: false };
        call(health, "basic.qos", channel.basic_qos(lane.prefetch, qos)).await?;
        lanes.push(LaneChannel {
            settlements: Settlements::new(channel.clone(), lane.prefetch),
            channel,
            queue: queues.queue.clone(),
            tag: format!("{}-{}-{suffix}", ctx.name, lane.name),
        });
    }
    Ok(lanes)
}

/// Consumes until shutdown, pausing while the key is refused, and taking
/// no deliveries while the broker blocks the connection. `Ok`: the moment
/// the replica was told to stop, from which its drain period counts.
///
/// Once told to stop, nothing the broker answers or fails to answer makes
/// this an error: an error skips the drain and the last settle, and the
/// commands whose events were confirmed but not yet acked would be answered
/// again by the next replica, those cut mid-request put back without their
/// window's start.
async fn consume(
    ctx: &SessionContext<'_>,
    lanes: &[LaneChannel],
    publisher: &Publisher,
    tasks: &mut JoinSet<Outcome>,
    blocked: &mut watch::Receiver<bool>,
) -> Result<Instant, SessionError> {
    loop {
        let account = &ctx.pipeline.account;
        if account.credentials.is_faulted() {
            ctx.health.set_credentials_refused(true);
            ctx.pipeline.metrics.credentials_refused.set(1);
            let recovery = account.credentials.recover(&account.client, ctx.shutdown);
            if !beating(ctx.health, recovery).await {
                return Ok(Instant::now());
            }
            ctx.health.set_credentials_refused(false);
            ctx.pipeline.metrics.credentials_refused.set(0);
        }
        let mut consumers = Vec::with_capacity(lanes.len());
        for lane in lanes {
            let consume = lane.channel.basic_consume(
                lane.queue.as_str().into(),
                lane.tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            );
            consumers.push(call(ctx.health, "basic.consume", consume).await?);
        }
        ctx.health.set_consuming(true);
        let feed = Feed {
            lanes,
            consumers: &mut consumers,
            publisher,
            blocked,
        };
        let paused = run_consumer(ctx, feed, tasks).await?;
        let stopping = Instant::now();
        ctx.health.set_consuming(false);
        if !paused && *blocked.borrow() {
            // Stopping while blocked: a cancel could not be written. What
            // the broker pushed goes back when the connection closes.
            return Ok(stopping);
        }
        // Stop the flow, then put back what the broker had already pushed.
        for (lane, consumer) in lanes.iter().zip(&mut consumers) {
            let cancel = lane
                .channel
                .basic_cancel(lane.tag.as_str().into(), BasicCancelOptions::default());
            let cancelled = call(ctx.health, "basic.cancel", cancel).await;
            if paused {
                cancelled?;
                requeue_buffered(&lane.settlements, consumer).await;
                continue;
            }
            match cancelled {
                Ok(()) => requeue_buffered(&lane.settlements, consumer).await,
                // Not known to be cancelled, the consumer may still be fed:
                // requeueing what comes would send the same commands round in
                // a loop. They go back when the channel closes.
                Err(e) => tracing::warn!(
                    error = %e,
                    queue = %lane.queue,
                    "stopping: the consumer was not cancelled; draining the commands in flight anyway"
                ),
            }
        }
        if !paused {
            return Ok(stopping);
        }
    }
}

/// What [`run_consumer`] feeds tasks from, and with.
struct Feed<'a> {
    lanes: &'a [LaneChannel],
    /// One consumer per lane, in the lanes' order.
    consumers: &'a mut [Consumer],
    publisher: &'a Publisher,
    /// True while the broker blocks the connection: deliveries stay in the
    /// consumer's buffer (lapin cannot even send `basic.cancel` then), and
    /// are taken once the block is lifted.
    blocked: &'a mut watch::Receiver<bool>,
}

/// The next delivery of any lane, with the lane's index; the lanes are
/// asked in turn from the one after the last that gave, so a busy lane's
/// buffer never hides another's. With one lane it is that consumer's
/// `next`, nothing more.
fn next_delivery<'a>(
    consumers: &'a mut [Consumer],
    start: &'a mut usize,
) -> impl Future<Output = Option<(usize, lapin::Result<lapin::message::Delivery>)>> + 'a {
    std::future::poll_fn(move |cx| {
        let n = consumers.len();
        for k in 0..n {
            let lane = (*start + k) % n;
            match consumers[lane].poll_next_unpin(cx) {
                Poll::Ready(Some(next)) => {
                    *start = (lane + 1) % n;
                    return Poll::Ready(Some((lane, next)));
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {}
            }
        }
        Poll::Pending
    })
}

/// Feeds deliveries to tasks. `Ok(true)`: paused for a credential fault;
/// `Ok(false)`: shutdown.
async fn run_consumer(
    ctx: &SessionContext<'_>,
    feed: Feed<'_>,
    tasks: &mut JoinSet<Outcome>,
) -> Result<bool, SessionError> {
    let Feed {
        lanes,
        consumers,
        publisher,
        blocked,
    } = feed;
    // Every second: is the publisher still open, and which tasks finished.
    let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
    // Built once, not on every turn of the loop: each would register a
    // waiter anew for every delivery.
    let shutdown = ctx.shutdown.cancelled();
    let faulted = ctx.pipeline.account.credentials.faulted();
    tokio::pin!(shutdown, faulted);
    let mut start = 0;
    loop {
        let taking = !*blocked.borrow_and_update();
        tokio::select! {
            () = &mut shutdown => return Ok(false),
            () = &mut faulted => return Ok(true),
            // Only marks the change: `taking` is read again at the top.
            Ok(()) = blocked.changed() => {}
            _ = housekeeping.tick() => {
                ctx.health.beat();
                reap(tasks);
                if !publisher.is_open() {
                    return Err(SessionError::PublisherClosed);
                }
            }
            next = next_delivery(consumers, &mut start), if taking => match next {
                Some((lane, Ok(delivery))) => {
                    let delivery = lanes[lane].settlements.take(delivery, lane);
                    let pipeline = Arc::clone(ctx.pipeline);
                    let publisher = publisher.clone();
                    // Boxed: the task then holds a pointer, and the runtime
                    // moves 16 bytes instead of the whole state machine when it
                    // creates the task, stores its output and hands it over.
                    tasks.spawn(Box::pin(async move { pipeline.handle(&delivery, &publisher).await }));
                    reap(tasks);
                }
                Some((_, Err(e))) => return Err(e.into()),
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
            // Requeued as it came: its lane is not read.
            let _ = settlements.take(delivery, 0).settle(Settle::Requeue);
        }
    });
    let _ = bounded.await;
}

/// Lets in-flight commands finish within the grace period; then abandons
/// their requests, so each puts its command back with what was learned (the
/// start of its idempotency window above all), and aborts what is left after
/// that; closing the connection requeues their deliveries.
/// Closes the consuming channel before the connection: the broker answers
/// the close only after every ack sent before it, so the drained commands'
/// acks are known to be in. A connection close alone can lose them: when it
/// races the close of channels just dropped (the depth sampler's), lapin's
/// I/O loop may stop before the queued acks are written, and the commands
/// come back to the next replica, which answers them a second time.
/// Bounded; skipped while the broker blocks the connection (nothing is
/// written then, and the broker requeues what is unacked when we go).
async fn settle_last(connection: &Connection, channel: &Channel) {
    if connection.status().blocked() || !channel.status().connected() {
        return;
    }
    let closing = channel.close(200, "drained".into());
    match tokio::time::timeout(BROKER_CALL_TIMEOUT, closing).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "the consuming channel was already closing"),
        Err(_) => tracing::warn!(
            "the consuming channel did not close within {BROKER_CALL_TIMEOUT:?}: \
             the broker requeues what it did not see acked"
        ),
    }
}

/// The grace period ends at `until`, counted from the moment the replica
/// was told to stop: the cancel of the consumer, however long the broker
/// takes to answer it, comes out of it, not on top of it.
async fn drain(ctx: &SessionContext<'_>, tasks: &mut JoinSet<Outcome>, until: Instant) {
    let grace = until.saturating_duration_since(Instant::now());
    tracing::info!(
        in_flight = tasks.len(),
        ?grace,
        "draining in-flight commands"
    );
    let join_all = async |tasks: &mut JoinSet<Outcome>, within: Duration| {
        let all = async {
            while let Some(done) = tasks.join_next().await {
                record(done);
            }
        };
        beating(ctx.health, tokio::time::timeout(within, all))
            .await
            .is_ok()
    };
    if join_all(tasks, grace).await {
        return;
    }
    tracing::warn!(
        left = tasks.len(),
        "grace period over: putting the commands still in flight back on the queue"
    );
    ctx.pipeline.stop_requests.cancel();
    if !join_all(tasks, ABANDON_GRACE).await {
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}
