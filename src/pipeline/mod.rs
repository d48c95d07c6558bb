//! The consuming pipeline: what a replica does with its deliveries.
//!
//! - [`supervisor`] keeps a connection alive and rebuilds everything after a loss;
//! - [`session`] consumes on one connection and runs one task per delivery;
//! - [`alarm`] stops taking deliveries while the broker blocks the connection;
//! - [`handler`] takes one delivery from command to plan: delivery → command
//!   → purchase → outcome;
//! - [`decision`] is the one place that decides what becomes of a delivery;
//! - [`executor`] carries the plan out: event → copy → ack → `reply_to`;
//! - `window.rs` looks up and judges a command whose window closed, and
//!   `spans.rs` holds the spans both carry, apart from their path.

pub mod alarm;
pub mod decision;
pub mod executor;
pub mod handler;
pub mod session;
mod spans;
pub mod supervisor;
mod window;

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::broker::Topology;
use crate::configuration::RetrySettings;
use crate::hyperline::HyperlineClient;
use crate::hyperline::admission::Admission;
use crate::hyperline::credentials::Credentials;
use crate::hyperline::gate::Gate;
use crate::operations::Metrics;

/// Everything a delivery's task needs, shared by all tasks of a replica.
pub struct Pipeline {
    pub client: HyperlineClient,
    /// Replica-wide request pacing (429 pauses, client-side cap).
    pub gate: Gate,
    /// The lanes' lines in front of the gate: whose write goes next.
    pub admission: Admission,
    /// Replica-wide credential state.
    pub credentials: Credentials,
    /// Pacing of the credit-transaction reads, within Hyperline's read limit
    /// (apart from the purchases' write limit).
    pub reads: Gate,
    /// `hyperline.reconcile_at_window`: read the credit transactions before
    /// failing a command for its closed window.
    pub reconcile_at_window: bool,
    /// The results log that check reads for claimed charges, if one is kept.
    pub results_log: Option<crate::broker::results_log::LogSource>,
    /// The retry budget.
    pub retry: RetrySettings,
    /// Queue and exchange names.
    pub topology: Topology,
    /// Counters and histograms.
    pub metrics: std::sync::Arc<Metrics>,
    /// Time limits of a delivery.
    pub limits: Limits,
    /// This replica's name, stamped on its dead letters.
    pub replica: String,
    /// The keys that seal the memory on this replica's copies and verify
    /// it on the deliveries.
    pub history_keys: crate::broker::HistoryKeys,
    /// Cancelled when the drain period is over: requests still out are
    /// abandoned and their commands put back with what was learned.
    pub stop_requests: CancellationToken,
}

/// The time limits every delivery respects.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Longest time a delivery stays unacked, before its event and copy.
    pub deadline: Duration,
    /// The total deadline of one request.
    pub request_timeout: Duration,
    /// Hyperline's idempotency window.
    pub window: Duration,
    /// [`Settings::unseen_bound`](crate::configuration::Settings::unseen_bound):
    /// how long the check at the window waits before a transaction can be
    /// the command's.
    pub unseen: Duration,
    /// [`Settings::life_bound`](crate::configuration::Settings::life_bound).
    pub life: Duration,
}
