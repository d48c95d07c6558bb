//! The RabbitMQ side: connecting, the topology of docs/contract.md section 5,
//! publishing with confirms, settling deliveries, and the history a command
//! carries from one delivery to the next.
//!
//! Everything that talks AMQP lives here so the pipeline can read as
//! delivery → command → purchase → outcome → event → ack without protocol
//! noise.

pub mod history;
pub mod logged;
mod mismatch;
mod publish;
mod received;
pub mod results_log;
pub mod seal;
mod settlement;
mod topology;

pub use history::{BROKER_HISTORY_HEADERS, DeliveryHistory, Message, copy_properties};
pub use mismatch::{Finding, Mismatch};
pub use publish::{DroppedReply, PublishError, Publisher, header_str, header_u64, reply_to};
pub use received::{Received, Settlements};
pub use seal::{HistoryKeys, KeyOrigin, Provenance};
pub use settlement::Settle;
pub use topology::{LaneQueues, Object, ResultsLogName, Shape, Topology, TopologyError};

use std::time::Duration;

use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties, Consumer};

use crate::configuration::Pem;

/// The largest frame asked of the broker, unless the URL sets `frame_max`.
/// lapin keeps a send and a receive ring of 32 frames each, written in full
/// when the connection opens: at RabbitMQ's default of 128 KiB that is 8 MiB
/// of memory per connection. Commands are at most 64 KiB and events well
/// under 1 KiB, so 16 KiB frames cost nothing (a 64 KiB command is five
/// frames instead of one) and bring the rings to 1 MiB.
const FRAME_MAX: u32 = 16 * 1024;

/// Opens a connection named after this process, so an operator can tell the
/// replicas apart in the management UI (and `rabbitmqctl close_connection`
/// can pick one).
///
/// `ca_file` adds a private CA for `amqps://` brokers.
pub async fn connect(
    url: &str,
    name: &str,
    ca_file: Option<&Pem>,
) -> Result<Connection, ConnectError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let tls = ca_file.map(|pem| lapin::tcp::OwnedTLSConfig {
        identity: None,
        cert_chain: Some(pem.text().to_owned()),
    });
    let Ok(mut uri) = url.parse::<AMQPUri>() else {
        // lapin reports an unparseable URL the way it always does.
        return Ok(Connection::connect(url, props).await?);
    };
    uri.query.frame_max.get_or_insert(FRAME_MAX);
    Ok(match tls {
        None => Connection::connect_uri(uri, props).await?,
        Some(tls) => {
            let runtime = async_rs::Runtime::tokio_current();
            Connection::connect_uri_with_config(uri, props, tls, runtime).await?
        }
    })
}

/// Connects to the first node of a cluster that answers: `urls[start]`,
/// then the next ones in turn, each attempt bounded by `per_node` (lapin's
/// connect has no deadline of its own, and a firewalled node never answers).
/// Returns the connection and the index of its node; after a failed sweep,
/// the error of the last node tried. Each failure is logged with the node,
/// its password redacted, so an operator sees which node is down.
pub async fn connect_first(
    urls: &[String],
    start: usize,
    name: &str,
    ca_file: Option<&Pem>,
    per_node: Duration,
) -> Result<(Connection, usize), ConnectError> {
    let mut last = ConnectError::NoNode;
    for i in (0..urls.len()).map(|k| (start + k) % urls.len()) {
        let url = &urls[i];
        let attempt = tokio::time::timeout(per_node, connect(url, name, ca_file)).await;
        let error = match attempt {
            Ok(Ok(connection)) => return Ok((connection, i)),
            Ok(Err(e)) => e,
            Err(_) => ConnectError::Timeout(per_node),
        };
        if urls.len() > 1 {
            tracing::warn!(node = %redacted_url(url), error = %error, "broker node unreachable; trying the next");
        }
        last = error;
    }
    Err(last)
}

/// How long a connection's close may take before it is left to the process
/// exit (which the broker sees as the socket closing).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a close looks whether lapin has already given the connection up.
const CLOSE_POLL: Duration = Duration::from_millis(20);

/// Closes a connection, bounded. lapin writes nothing while the broker
/// blocks the connection; and a close that races the close of channels just
/// dropped (a tool's publisher going out of scope) loses its answer: the
/// I/O loop stops on "invalid channel state: Closing" and the close's
/// promise is never resolved (seen as an operator tool that never exited).
/// So the close ends when it is answered, when the connection is seen
/// closed or failed, or after [`CLOSE_TIMEOUT`]. A connection blocked now
/// is left as it is: the broker requeues what it delivered on it when the
/// process exits. A connection or channel already closing or closed is the
/// goal reached, not a fault: only another error is worth an operator's WARN.
pub async fn close(connection: &Connection, reason: &str) {
    use lapin::{ChannelState, ConnectionState, ErrorKind};
    if connection.status().blocked() {
        tracing::info!("the broker blocks the connection: leaving it without a close");
        return;
    }
    let gone = async {
        while !(connection.status().closed() || connection.status().errored()) {
            tokio::time::sleep(CLOSE_POLL).await;
        }
        Ok(())
    };
    let closing = async {
        tokio::select! {
            answered = connection.close(200, reason.into()) => answered,
            given_up = gone => given_up,
        }
    };
    match tokio::time::timeout(CLOSE_TIMEOUT, closing).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => match e.kind() {
            ErrorKind::InvalidChannelState(ChannelState::Closing | ChannelState::Closed, _)
            | ErrorKind::InvalidConnectionState(
                ConnectionState::Closing | ConnectionState::Closed,
            ) => {
                tracing::debug!(error = %e, "the broker connection was already closing");
            }
            _ => tracing::warn!(error = %e, "closing the broker connection"),
        },
        Err(_) => tracing::warn!(
            "the broker connection did not close within {CLOSE_TIMEOUT:?}; leaving it"
        ),
    }
}

/// A node's `host:port` (the scheme's default port when the URL has none):
/// what the logs, `/readyz` and the `cpw_broker_node` metric call a node. No
/// user, no password, no vhost.
pub fn node_label(url: &str) -> String {
    match url.parse::<AMQPUri>() {
        Ok(uri) => format!("{}:{}", uri.authority.host, uri.authority.port),
        Err(_) => "<unparseable amqp url>".to_owned(),
    }
}

/// A server-named, exclusive, auto-deleted queue with a no-ack consumer, on a
/// channel of its own: for replies and observers, which must vanish with
/// their connection and leave nothing behind on the broker. Keep the channel
/// alive as long as the consumer is read.
pub async fn private_queue(
    connection: &Connection,
    tag: &str,
) -> Result<(Channel, String, Consumer), lapin::Error> {
    let channel = connection.create_channel().await?;
    let options = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    let queue = channel
        .queue_declare("".into(), options, FieldTable::default())
        .await?;
    let name = queue.name().as_str().to_owned();
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..BasicConsumeOptions::default()
    };
    let consumer = channel
        .basic_consume(
            name.as_str().into(),
            tag.into(),
            no_ack,
            FieldTable::default(),
        )
        .await?;
    Ok((channel, name, consumer))
}

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The broker refused or could not be reached.
    #[error(transparent)]
    Broker(#[from] lapin::Error),
    /// A node did not answer within the bound of one attempt.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// No node to try (an empty list; settings refuse one).
    #[error("no broker node configured")]
    NoNode,
}

/// The broker URL without its password, for logs and errors.
pub fn redacted_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<unparseable amqp url>".to_owned(),
    }
}
