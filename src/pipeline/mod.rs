//! The consuming pipeline: what a replica does with its deliveries.
//!
//! - [`supervisor`] keeps a connection alive and rebuilds everything after a loss;
//! - [`session`] consumes on one connection and runs one task per delivery;
//! - [`handler`] takes one delivery from command to ack;
//! - `settlement` acks on the consuming channel, merging acks where it may;
//! - `redelivery` copies commands into delay queues, or back when worn;
//! - [`retry`] and [`gate`] pace and repeat the Hyperline requests;
//! - [`credentials`] pauses the replica while its key is refused.

pub mod credentials;
pub mod gate;
pub mod handler;
mod redelivery;
pub mod retry;
pub mod session;
mod settlement;
pub mod supervisor;

use crate::broker::Topology;
use crate::configuration::RetrySettings;
use crate::hyperline::HyperlineClient;
use crate::operations::Metrics;

/// Everything a delivery's task needs, shared by all tasks of a replica.
pub struct Pipeline {
    /// The API.
    pub client: HyperlineClient,
    /// Replica-wide request pacing (429 pauses, client-side cap).
    pub gate: gate::Gate,
    /// Replica-wide credential state.
    pub credentials: credentials::Credentials,
    /// The retry budget.
    pub settings: RetrySettings,
    /// Queue and exchange names.
    pub topology: Topology,
    /// Counters and histograms.
    pub metrics: std::sync::Arc<Metrics>,
}
