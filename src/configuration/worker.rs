//! `[worker]`, `[server]` and `[log]`: the consuming loop, the operations
//! server, and the logs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::secret::{HistoryKey, history_key_list};

/// Output format of the logs.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line, for log pipelines.
    Json,
    /// Human-readable, for a terminal.
    Pretty,
}

/// `[worker]`.
#[derive(Clone, Debug, Deserialize)]
pub struct WorkerSettings {
    /// Drain period on SIGTERM.
    pub shutdown_grace_secs: u64,
    /// Longest time a delivery stays unacked, whatever Hyperline does.
    pub delivery_deadline_secs: u64,
    /// The keys of the MAC on the worker's copies: the first signs, every
    /// one verifies. Empty: a key derived from the API key, which the entry
    /// `derived-from-api-key` keeps beside explicit keys.
    #[serde(default, deserialize_with = "history_key_list")]
    pub history_keys: Vec<HistoryKey>,
    /// A file of history keys, one a line (a Kubernetes secret).
    #[serde(default)]
    pub history_keys_file: Option<PathBuf>,
}

/// `[server]`.
#[derive(Clone, Debug, Deserialize)]
pub struct ServerSettings {
    /// Address of `/metrics`, `/healthz`, `/readyz`; port 0 picks one.
    pub listen: SocketAddr,
}

/// `[log]`.
#[derive(Clone, Debug, Deserialize)]
pub struct LogSettings {
    /// JSON or pretty.
    pub format: LogFormat,
    /// Default tracing filter.
    pub level: String,
}

impl WorkerSettings {
    /// Drain period on SIGTERM.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    /// Longest time a delivery stays unacked.
    pub fn delivery_deadline(&self) -> Duration {
        Duration::from_secs(self.delivery_deadline_secs)
    }
}
