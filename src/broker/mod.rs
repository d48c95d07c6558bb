//! The RabbitMQ side: connecting, the topology of CONTRACT section 5, and
//! publishing with confirms.
//!
//! Everything that talks AMQP lives here so the pipeline can read as
//! delivery → command → purchase → outcome → event → ack without protocol
//! noise.

mod publish;
mod topology;

pub use publish::{PublishError, Publisher, REDELIVERY_HEADERS, Routed, header_str, header_u64};
pub use topology::{Topology, TopologyError};

use std::path::Path;

use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Consumer};

use crate::configuration::{ConfigError, read_pem};

/// Opens a connection named after this process, so an operator can tell the
/// replicas apart in the management UI (and `rabbitmqctl close_connection`
/// can pick one).
///
/// `ca_file` adds a private CA for `amqps://` brokers.
pub async fn connect(
    url: &str,
    name: &str,
    ca_file: Option<&Path>,
) -> Result<Connection, ConnectError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let Some(path) = ca_file else {
        return Ok(Connection::connect(url, props).await?);
    };
    let tls = lapin::tcp::OwnedTLSConfig {
        identity: None,
        cert_chain: Some(read_pem("amqp.ca_file", path)?),
    };
    Ok(
        Connection::connect_with_config(url, props, tls, async_rs::Runtime::tokio_current())
            .await?,
    )
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
    /// `amqp.ca_file` is not usable.
    #[error(transparent)]
    CaFile(#[from] ConfigError),
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
