//! The test broker, and a test's traffic through it: commands published with
//! confirms, result events collected by an observer queue, queue depths, and
//! the removal of what a test declared.

use std::collections::BTreeMap;
use std::time::Duration;

use credit_purchase_worker::broker::{ConnectError, HistoryKeys, Topology, private_queue};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicPublishOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, Consumer, PublisherConfirm};
use serde_json::Value;

use crate::WAIT;

/// The environment variable that points the tests and the bench at another
/// broker than the local one.
pub const AMQP_URL_VAR: &str = "CPW_TEST_AMQP_URL";

/// The broker CI brings up, and the developers' guide asks for.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The test broker: [`AMQP_URL_VAR`] if set, else [`DEFAULT_AMQP_URL`].
pub fn amqp_url() -> String {
    std::env::var(AMQP_URL_VAR).unwrap_or_else(|_| DEFAULT_AMQP_URL.to_owned())
}

/// A connection to the test broker, named so that `rabbitmqctl` output tells
/// it from the workers' (whose connections the tests cut by name).
pub async fn connect(name: &str) -> Result<Connection, ConnectError> {
    credit_purchase_worker::broker::connect(&amqp_url(), name, None).await
}

/// `rabbitmqctl -q`, or `$RABBITMQCTL -q` where the broker's is not on the
/// `PATH`: the tests cut connections with it, the bench sweeps leftovers.
pub fn rabbitmqctl() -> std::process::Command {
    let program = std::env::var("RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".to_owned());
    let mut command = std::process::Command::new(program);
    command.arg("-q");
    command
}

/// The settings, as `CPW__` variables, of a worker with a topology of its
/// own: commands on `queue`, results on `{queue}-results`, Hyperline at
/// `hyperline_url` with `api_key`, the ops server on any free port. Callers
/// add their tunables.
pub fn worker_env(queue: &str, hyperline_url: &str, api_key: &str) -> BTreeMap<String, String> {
    [
        ("CPW__AMQP__URL", amqp_url()),
        ("CPW__AMQP__QUEUE", queue.to_owned()),
        ("CPW__AMQP__RESULTS_EXCHANGE", format!("{queue}-results")),
        ("CPW__HYPERLINE__BASE_URL", hyperline_url.to_owned()),
        ("CPW__HYPERLINE__API_KEY", api_key.to_owned()),
        ("CPW__SERVER__LISTEN", "127.0.0.1:0".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// `properties` with their `cpw-*` headers sealed as a replica holding
/// `api_key` seals its copies (the key derived from the API key): for a test
/// that places the worker's memory on a message by hand, as the worker would.
pub fn sealed(properties: BasicProperties, body: &[u8], api_key: &str) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    let message_id = properties
        .message_id()
        .as_ref()
        .map(|m| m.as_str().to_owned());
    HistoryKeys::derived(api_key.as_bytes()).seal(&mut headers, body, message_id.as_deref());
    properties.with_headers(headers)
}

/// `properties` as a producer following the contract sends a command:
/// persistent, `application/json`.
pub fn as_command(properties: BasicProperties) -> BasicProperties {
    properties
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
}

/// Publishes `body` to `queue` through the default exchange with exactly
/// `properties`. The confirm is the caller's to await, so that the bench can
/// keep thousands in flight.
pub async fn send(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    properties: BasicProperties,
) -> lapin::Result<PublisherConfirm> {
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
}

/// [`send`], then waits for the broker's confirm (the channel must be in
/// confirm mode): once this returns, the message is on the queue, so a test
/// can tell a lost command from a slow one. Panics unless the broker acks.
pub async fn publish(channel: &Channel, queue: &str, body: &[u8], properties: BasicProperties) {
    let confirm = send(channel, queue, body, properties)
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(
        confirm.is_ack(),
        "the broker did not confirm a publish to {queue}"
    );
}

/// Messages ready in `queue`, by a passive declare on a channel of its own
/// (a missing queue closes the channel it is asked on). Panics if the queue
/// is missing.
pub async fn depth(connection: &Connection, queue: &str) -> u32 {
    let channel = connection.create_channel().await.expect("channel");
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declared = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .unwrap_or_else(|e| panic!("queue {queue} exists: {e}"));
    let _ = channel.close(200, "ok".into()).await;
    declared.message_count()
}

/// Deletes the queues and exchanges of `topology`. Best effort: a test that
/// failed half-way may have declared only some of them.
pub async fn delete_topology(connection: &Connection, topology: &Topology) {
    let Ok(channel) = connection.create_channel().await else {
        return;
    };
    for queue in &topology.queue_names() {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for exchange in [&topology.queue, &topology.dlx, &topology.results_exchange] {
        let _ = channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = channel.close(200, "cleaned up".into()).await;
}

/// A private queue bound to every routing key of a results exchange: it
/// collects the events of one test's worker. Server-named, exclusive and
/// auto-deleted, so it leaves nothing behind; read without acks, so reading
/// costs the broker (and a benchmark) as little as possible.
pub struct Observer {
    queue: String,
    consumer: Consumer,
    /// The consumer's channel closes when its last handle goes.
    _channel: Channel,
}

impl Observer {
    /// Declares the queue and binds it with `#` to `results_exchange`, which
    /// must exist: events published before this returns are not seen.
    pub async fn bind(connection: &Connection, results_exchange: &str) -> lapin::Result<Observer> {
        let (channel, queue, consumer) = private_queue(connection, "observer").await?;
        channel
            .queue_bind(
                queue.as_str().into(),
                results_exchange.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Observer {
            queue,
            consumer,
            _channel: channel,
        })
    }

    /// The server-given name of the queue.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The next delivery, as it came; `None` once the consumer is gone.
    pub async fn next_delivery(&mut self) -> Option<Delivery> {
        self.consumer.next().await?.ok()
    }

    /// The next event, or `None` if none arrives within `within`.
    pub async fn next_event_within(&mut self, within: Duration) -> Option<Event> {
        let delivery = tokio::time::timeout(within, self.next_delivery())
            .await
            .ok()??;
        Some(Event {
            body: serde_json::from_slice(&delivery.data).expect("events are JSON"),
            properties: delivery.properties,
        })
    }

    /// The next event; panics if none arrives within [`WAIT`].
    pub async fn next_event(&mut self) -> Event {
        self.next_event_within(WAIT)
            .await
            .expect("an event within the bound")
    }

    /// Collects events until `done` says so; panics if `within` passes first.
    pub async fn events_until(
        &mut self,
        within: Duration,
        mut done: impl FnMut(&[Event]) -> bool,
    ) -> Vec<Event> {
        let deadline = tokio::time::Instant::now() + within;
        let mut events = Vec::new();
        while !done(&events) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event_within(left).await {
                Some(e) => events.push(e),
                None => panic!("only {} events before the deadline", events.len()),
            }
        }
        events
    }

    /// True when no further event arrives within `quiet`.
    pub async fn no_event_for(&mut self, quiet: Duration) -> bool {
        self.next_event_within(quiet).await.is_none()
    }
}

/// A result event as received: its JSON body and AMQP properties.
pub struct Event {
    pub body: Value,
    pub properties: BasicProperties,
}

impl Event {
    /// `type`: `credit_purchase.succeeded` or `credit_purchase.failed`.
    pub fn kind(&self) -> &str {
        self.body["type"].as_str().unwrap_or_default()
    }

    pub fn command_id(&self) -> &str {
        self.body["command_id"].as_str().unwrap_or_default()
    }

    /// `error.code` of a failed event; empty for a success.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or_default()
    }
}
