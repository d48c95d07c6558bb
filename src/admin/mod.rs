//! The operator subcommands of docs/contract.md section 7: `publish`, `dead-letters
//! list` / `show` / `purge` / `replay` / `reconcile`, `events`, `check` and
//! `demo`.
//!
//! The worker is the product; these are the tools a person on call reaches for
//! when it misbehaves: send one command by hand and see its answer, look at
//! what was dead-lettered and why, put it back without risking a double
//! charge, and tell a broken configuration from a broken broker or a revoked
//! key in one command. They live in the library, next to the contract types
//! they reuse, so a test can drive them through the real binary and nothing
//! here re-implements a rule the worker already owns.

pub mod check;
mod dead_letter_queue;
pub mod dead_letters;
pub mod demo;
mod demo_batch;
mod demo_queues;
pub mod events;
mod lane;
mod letter;
pub mod output;
pub mod publish;
pub mod purge;
pub mod reconcile;
pub mod show;

use std::sync::Arc;
use std::time::Duration;

use lapin::Connection;

use crate::broker::{self, redacted_url};
use crate::configuration::AmqpSettings;

/// How long a subcommand waits for the broker to accept its connection. A
/// firewalled host never answers; an operator should hear so, not wait forever.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The broker could not be reached. The URL is always shown without its
/// password.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The connection was refused or failed.
    #[error("cannot reach the broker at {url}: {cause}")]
    Failed {
        /// The broker URL, redacted.
        url: String,
        /// What went wrong.
        cause: broker::ConnectError,
    },
    /// No answer within [`CONNECT_TIMEOUT`].
    #[error("cannot reach the broker at {url}: no answer within {secs} s")]
    Timeout {
        /// The broker URL, redacted.
        url: String,
        secs: u64,
    },
}

/// Connects to the configured broker (the first node of `amqp.url` that
/// answers, in order) under a name that says which tool it is
/// (`credit-purchase-worker@host (publish)`), so an operator reading the
/// management UI can tell a stray admin connection from a replica.
/// Shared, so a [`crate::broker::Publisher`] can open a channel again.
pub async fn connect(amqp: &AmqpSettings, tool: &str) -> Result<Arc<Connection>, ConnectError> {
    connect_node(amqp, tool, amqp.url.nodes()).await
}

/// [`connect`] to the first of `urls` that answers.
pub async fn connect_node(
    amqp: &AmqpSettings,
    tool: &str,
    urls: &[String],
) -> Result<Arc<Connection>, ConnectError> {
    let url = urls
        .iter()
        .map(|u| redacted_url(u))
        .collect::<Vec<_>>()
        .join(", ");
    let name = format!("{} ({tool})", amqp.connection_name());
    let ca_file = amqp.ca_file.as_ref();
    match broker::connect_first(urls, 0, &name, ca_file, CONNECT_TIMEOUT).await {
        Ok((connection, _)) => Ok(Arc::new(connection)),
        Err(broker::ConnectError::Timeout(_)) => Err(ConnectError::Timeout {
            url,
            secs: CONNECT_TIMEOUT.as_secs(),
        }),
        Err(cause) => Err(ConnectError::Failed { url, cause }),
    }
}

/// The broker's own words for a refused operation (`NOT_FOUND - no queue
/// 'x' in vhost '/'`), without lapin's layers around them; anything else as
/// lapin says it.
pub fn broker_says(e: &lapin::Error) -> String {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => amqp.get_message().as_str().to_owned(),
        _ => e.to_string(),
    }
}

/// Whether the broker answered 404: the queue or exchange does not exist.
pub fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404)
}

/// `From` for an error wrapped without becoming its `source()`: lapin's and
/// the configuration's errors already print their causes in their `Display`,
/// and the binary's `{:#}` would print them a second time.
macro_rules! wrap_error {
    ($outer:ident :: $variant:ident ($inner:ty)) => {
        impl From<$inner> for $outer {
            fn from(e: $inner) -> Self {
                $outer::$variant(e)
            }
        }
    };
}
pub(crate) use wrap_error;

/// Closes a tool's connection at its end: bounded, so a close that loses its
/// answer cannot keep the tool from exiting (see [`broker::close`]).
pub async fn close(connection: &Connection) {
    broker::close(connection, "done").await;
}

/// A duration as people say it: `25h 3m`, `4m 10s`, `12s`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m {s}s"),
        (h, m, _) => format!("{h}h {m}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(human(Duration::from_secs(12)), "12s");
        assert_eq!(human(Duration::from_secs(250)), "4m 10s");
        assert_eq!(human(Duration::from_secs(25 * 3600 + 180)), "25h 3m");
    }
}
