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

use lapin::{Connection, ConnectionProperties};

/// Opens a connection named after this process, so an operator can tell the
/// replicas apart in the management UI (and `rabbitmqctl close_connection`
/// can pick one).
pub async fn connect(url: &str, name: &str) -> Result<Connection, lapin::Error> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url, props).await
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
