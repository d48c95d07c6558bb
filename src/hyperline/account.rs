//! The Hyperline account a replica works for, as one value: its client
//! (which holds the API key), its write and read gates, whether its key is
//! accepted, and the lanes' lines in front of its write gate.
//!
//! Hyperline's limits and its key are the account's, not a command's nor a
//! replica's: everything that paces or pauses requests for them belongs
//! together, and a second account (another key with its own limits) is a
//! second value of this type, not five more fields on the pipeline.

use std::time::Duration;

use super::admission::Admission;
use super::credentials::Credentials;
use super::gate::Gate;
use super::{HyperlineClient, READS_PER_SECOND};
use crate::configuration::Settings;
use crate::operations::Metrics;

/// Shared by every delivery of the replica.
pub struct Account {
    /// Requests to the API, with the key.
    pub client: HyperlineClient,
    /// Purchases: 429 pauses, the announced quota, the client-side cap.
    pub writes: Gate,
    /// Credit-transaction reads, within the read limit (apart from the
    /// writes' limit).
    pub reads: Gate,
    /// Whether the key is accepted: a 401/403 pauses every request.
    pub credentials: Credentials,
    /// Whose write goes to the gate next, by lane.
    pub admission: Admission,
}

impl Account {
    /// The account of `client` under `settings`, metered in `metrics`.
    pub fn new(client: HyperlineClient, settings: &Settings, metrics: &Metrics) -> Self {
        let patience = probe_patience(settings.hyperline.timeout());
        let longest_pause = settings.longest_rate_limit_pause();
        Account {
            client,
            writes: Gate::new(
                settings.hyperline.max_requests_per_second,
                patience,
                longest_pause,
            ),
            reads: Gate::new(READS_PER_SECOND, patience, longest_pause),
            credentials: Credentials::default(),
            admission: Admission::new(&settings.amqp.lanes(), metrics),
        }
    }
}

/// How long requests wait for the answer of the one request that learns a
/// new rate-limit window: a quarter of the request timeout, so that a probe
/// that hangs delays the others by a fraction of it, and an API that answers
/// in seconds still answers first.
fn probe_patience(request_timeout: Duration) -> Duration {
    (request_timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(10))
}
