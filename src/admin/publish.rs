//! `publish`: one command from flags, the way a publisher should send it.
//!
//! An operator re-issuing a purchase by hand, or a developer trying the
//! worker, should not have to hand-write JSON and remember the AMQP
//! properties. This builds the body, runs it through the worker's own parser
//! first (a command the worker would dead-letter is refused here, with the
//! reason), then publishes it persistent, mandatory and publisher-confirmed,
//! so "published" means the broker has it in the commands queue of its lane
//! (`--lane`, the first by default). With
//! `--wait` it listens on a private reply queue (`reply_to`, docs/contract.md section
//! 3) and prints the result event.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::{BasicProperties, Channel, Connection, Consumer};
use serde_json::{Value, json};

use super::ConnectError;
use crate::broker::{self, Publisher};
use crate::cli::PublishArgs;
use crate::configuration::{ConfigError, Lane, Settings};
use crate::contract::{Command, EventKind, ResultEvent};

/// Why a command was not published, or its result not seen.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The settings could not be loaded.
    #[error("{0}")]
    Config(ConfigError),
    /// The worker would refuse this command; nothing was sent.
    #[error("refusing to publish an invalid command: {0}")]
    Invalid(String),
    /// `--lane` names no configured lane; nothing was sent.
    #[error("no lane `{name}` is configured (amqp.lanes): the lanes are {known}")]
    UnknownLane {
        /// The name given.
        name: String,
        /// The configured lanes' names, comma-separated.
        known: String,
    },
    /// The broker could not be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// A channel, queue or consumer operation failed.
    #[error("broker error: {}", super::broker_says(.0))]
    Broker(lapin::Error),
    /// Confirmed, but no queue took it.
    #[error(
        "unroutable: no queue `{0}` took the command; is the worker's topology declared? \
         (run the worker once, or `check`)"
    )]
    Unroutable(String),
    /// The broker did not confirm the command.
    #[error("the command was not confirmed: {0}")]
    NotConfirmed(broker::PublishError),
    /// `--wait` ran out.
    #[error("no result for {id} within {secs} s (is a worker running?)")]
    NoResult {
        /// The command id.
        id: String,
        secs: u64,
    },
}

super::wrap_error!(Error::Config(ConfigError));
super::wrap_error!(Error::Broker(lapin::Error));

/// Publishes the command of `args`; prints its id, and with `--wait` its event.
/// Exit status 0, or 1 when the awaited event says it failed.
pub async fn run(config: Option<&Path>, args: PublishArgs) -> Result<ExitCode, Error> {
    let settings = Settings::load(config)?;
    let id = args
        .command_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let body = command_body(&args, &id).to_string().into_bytes();
    Command::parse(&body, Some(&id)).map_err(|e| Error::Invalid(e.reason.to_string()))?;
    let lane = lane(&settings.amqp.lanes(), args.lane.as_deref())?;

    let connection = super::connect(&settings.amqp, "publish").await?;
    let result = publish_and_wait(&connection, &settings, &args, &lane, &id, &body).await;
    super::close(&connection).await;
    result
}

/// The lane `--lane` names, the first without it; an unknown name is an
/// error that lists the lanes.
fn lane(lanes: &[Lane], name: Option<&str>) -> Result<Lane, Error> {
    let found = match name {
        None => lanes.first(),
        Some(name) => lanes.iter().find(|lane| lane.name == name),
    };
    found.cloned().ok_or_else(|| Error::UnknownLane {
        name: name.unwrap_or_default().to_owned(),
        known: lanes
            .iter()
            .map(|lane| lane.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

async fn publish_and_wait(
    connection: &std::sync::Arc<Connection>,
    settings: &Settings,
    args: &PublishArgs,
    lane: &Lane,
    id: &str,
    body: &[u8],
) -> Result<ExitCode, Error> {
    // The reply queue exists, and is consumed, before the command is sent:
    // a fast worker must not answer into a queue that is not there yet.
    let reply = match args.wait {
        true => Some(ReplyQueue::open(connection).await?),
        false => None,
    };
    let publisher = Publisher::open(
        std::sync::Arc::clone(connection),
        settings.amqp.confirm_timeout(),
    )
    .await?;
    let mut properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(id.into())
        .with_timestamp(crate::clock::now_ms() / 1000);
    if let Some(reply) = &reply {
        properties = properties.with_reply_to(reply.name.as_str().into());
    }
    let queue = &lane.queue;
    match publisher.publish_routed("", queue, body, properties).await {
        Ok(()) => {}
        Err(broker::PublishError::Unroutable(q)) => return Err(Error::Unroutable(q)),
        Err(e) => return Err(Error::NotConfirmed(e)),
    }
    super::output::line(id);
    let Some(mut reply) = reply else {
        return Ok(ExitCode::SUCCESS);
    };
    eprintln!(
        "published to `{queue}` (lane `{}`); waiting for its result...",
        lane.name
    );
    let within = Duration::from_secs(args.timeout_secs);
    let event = reply
        .wait_for(id, within)
        .await
        .ok_or_else(|| Error::NoResult {
            id: id.to_owned(),
            secs: args.timeout_secs,
        })?;
    super::output::line(pretty(&event));
    let succeeded = event["type"].as_str() == Some(EventKind::Succeeded.as_str());
    Ok(if succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The event, indented, its fields in the contract's order where it is an
/// event of this schema (a `Value` would sort them), as received otherwise.
fn pretty(event: &Value) -> String {
    let typed = serde_json::from_value::<ResultEvent>(event.clone()).ok();
    let faithful = typed
        .as_ref()
        .filter(|typed| serde_json::to_value(typed).ok().as_ref() == Some(event));
    let text = match faithful {
        Some(typed) => serde_json::to_string_pretty(typed),
        None => serde_json::to_string_pretty(event),
    };
    text.unwrap_or_else(|_| event.to_string())
}

/// The JSON body of docs/contract.md section 2. The pricing the flags did not give is
/// written as `null`, as the contract's example does.
fn command_body(args: &PublishArgs, id: &str) -> Value {
    json!({
        "command_id": id,
        "customer_id": args.customer_id,
        "product_id": args.product_id,
        "credit_count": args.credit_count,
        "amount_excluding_tax": args.amount_excluding_tax,
        "price_id": args.price_id,
        "expires_at": args.expires_at,
    })
}

/// A server-named, exclusive, auto-deleted queue for this process's answers:
/// it vanishes with the connection, so an abandoned `--wait` leaves nothing
/// behind on the broker.
struct ReplyQueue {
    name: String,
    consumer: Consumer,
    _channel: Channel,
}

impl ReplyQueue {
    async fn open(connection: &Connection) -> Result<Self, lapin::Error> {
        let (channel, name, consumer) = crate::broker::private_queue(connection, "").await?;
        Ok(ReplyQueue {
            name,
            consumer,
            _channel: channel,
        })
    }

    /// The first event for `id` (by `correlation_id`, or the body's
    /// `command_id`), ignoring anything else that lands here.
    async fn wait_for(&mut self, id: &str, within: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let delivery = tokio::time::timeout_at(deadline, self.consumer.next())
                .await
                .ok()??
                .ok()?;
            let correlated = delivery
                .properties
                .correlation_id()
                .as_ref()
                .is_some_and(|c| c.as_str() == id);
            let Ok(event) = serde_json::from_slice::<Value>(&delivery.data) else {
                continue;
            };
            if correlated || event["command_id"].as_str() == Some(id) {
                return Some(event);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> PublishArgs {
        PublishArgs {
            customer_id: "cus_1".into(),
            product_id: "itm_1".into(),
            credit_count: 5,
            amount_excluding_tax: Some(100),
            price_id: None,
            expires_at: None,
            command_id: None,
            lane: None,
            wait: false,
            timeout_secs: 60,
        }
    }

    #[test]
    fn the_body_is_a_valid_command_of_the_contract() {
        let id = "0b0e3a52-9f1e-4c55-8f7e-2a1d5c3b4a69";
        let body = command_body(&args(), id).to_string();
        let command = Command::parse(body.as_bytes(), Some(id)).expect("valid");
        assert_eq!(command.id.as_str(), id);
        assert_eq!(command.credit_count.get(), 5);
    }

    #[test]
    fn an_event_prints_in_the_contract_order() {
        let id = "0b0e3a52-9f1e-4c55-8f7e-2a1d5c3b4a69";
        let body = command_body(&args(), id).to_string();
        let command = Command::parse(body.as_bytes(), None).expect("valid");
        let event = ResultEvent::succeeded(&command, "inv_1".into(), 5, 1);
        let value: Value = serde_json::from_slice(&event.to_json()).expect("json");
        let text = pretty(&value);
        assert!(
            text.starts_with("{\n  \"schema\": 1,\n  \"event_id\""),
            "{text}"
        );
        let mut odd = value.clone();
        odd["extra"] = json!(true);
        assert!(
            pretty(&odd).contains("\"extra\": true"),
            "nothing is dropped"
        );
    }

    #[test]
    fn the_lane_is_the_named_one_or_the_first_and_an_unknown_one_lists_them() {
        let lane = |name: &str| Lane {
            name: name.into(),
            queue: format!("q.{name}"),
            share: 1,
            prefetch: 1,
            objective: Duration::from_secs(1),
        };
        let lanes = [lane("interactive"), lane("bulk")];
        let queue = |name| super::lane(&lanes, name).map(|l| l.queue);
        assert_eq!(queue(None).expect("the first"), "q.interactive");
        assert_eq!(queue(Some("bulk")).expect("named"), "q.bulk");
        let unknown = queue(Some("Bulk")).expect_err("unknown").to_string();
        assert_eq!(
            unknown,
            "no lane `Bulk` is configured (amqp.lanes): the lanes are interactive, bulk"
        );
    }

    #[test]
    fn what_the_worker_would_refuse_is_refused_with_its_reason() {
        let id = "0b0e3a52-9f1e-4c55-8f7e-2a1d5c3b4a69";
        let mut bad = args();
        bad.customer_id = "cus/../admin".into();
        let body = command_body(&bad, id).to_string();
        let reason = Command::parse(body.as_bytes(), Some(id))
            .expect_err("invalid")
            .reason
            .to_string();
        assert!(reason.contains("customer_id"), "{reason}");
    }
}
