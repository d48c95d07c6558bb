//! Liveness and readiness state.
//!
//! Liveness and readiness answer different questions. `/healthz` fails only
//! when the supervising loop itself is stuck (restart the pod); `/readyz`
//! fails while the replica cannot do useful work (broker down, consumer
//! paused, key refused, connection blocked by a resource alarm), which a
//! restart would not fix.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::{millis, now_ms};

/// The supervising loop beats at least this often while alive.
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// Readiness and liveness, written by the pipeline, read by the probes.
#[derive(Debug, Default)]
pub struct Health {
    connected: AtomicBool,
    consuming: AtomicBool,
    credentials_refused: AtomicBool,
    shutting_down: AtomicBool,
    /// Why the broker blocks the connection (its words), while it does.
    blocked: Mutex<Option<String>>,
    last_beat_ms: AtomicU64,
    /// `host:port` of the broker node of the open connection.
    node: Mutex<Option<String>>,
}

/// The state behind `/readyz`, for tests and the summary line of the probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Readiness {
    /// A broker connection is open.
    pub connected: bool,
    /// A consumer is registered.
    pub consuming: bool,
    /// Hyperline accepts the key.
    pub credentials_ok: bool,
    /// SIGTERM received.
    pub shutting_down: bool,
    /// The broker blocks the connection (a resource alarm): no event can be
    /// published, so no new delivery is taken.
    pub blocked: bool,
}

impl Readiness {
    /// Whether the replica should receive work.
    pub fn ready(&self) -> bool {
        self.connected
            && self.consuming
            && self.credentials_ok
            && !self.shutting_down
            && !self.blocked
    }
}

impl Health {
    /// The supervising loop is alive.
    pub fn beat(&self) {
        self.last_beat_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Broker connection up or down.
    pub fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
        if !up {
            self.consuming.store(false, Ordering::Relaxed);
        }
    }

    /// The broker node (`host:port`) this replica's connection is on, or
    /// none between sessions.
    pub fn set_node(&self, node: Option<String>) {
        if let Ok(mut current) = self.node.lock() {
            *current = node;
        }
    }

    /// The broker node of the open connection, for `/readyz`.
    pub fn node(&self) -> Option<String> {
        self.node.lock().ok().and_then(|node| node.clone())
    }

    /// Consumer registered or cancelled.
    pub fn set_consuming(&self, on: bool) {
        self.consuming.store(on, Ordering::Relaxed);
    }

    /// Key refused (true) or accepted (false).
    pub fn set_credentials_refused(&self, refused: bool) {
        self.credentials_refused.store(refused, Ordering::Relaxed);
    }

    /// The broker blocks the connection, for this reason (its words), or
    /// no longer does (`None`).
    pub fn set_blocked(&self, reason: Option<String>) {
        if let Ok(mut current) = self.blocked.lock() {
            *current = reason;
        }
    }

    /// Why the broker blocks the connection, while it does.
    pub fn blocked(&self) -> Option<String> {
        self.blocked.lock().ok().and_then(|reason| reason.clone())
    }

    /// From SIGTERM on, the replica takes no new work.
    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }

    /// The current readiness.
    pub fn readiness(&self) -> Readiness {
        Readiness {
            connected: self.connected.load(Ordering::Relaxed),
            consuming: self.consuming.load(Ordering::Relaxed),
            credentials_ok: !self.credentials_refused.load(Ordering::Relaxed),
            shutting_down: self.shutting_down.load(Ordering::Relaxed),
            blocked: self.blocked.lock().is_ok_and(|reason| reason.is_some()),
        }
    }

    /// Alive when the loop beat within a few heartbeats.
    pub fn alive(&self) -> bool {
        let last = self.last_beat_ms.load(Ordering::Relaxed);
        now_ms().saturating_sub(last) < 3 * millis(HEARTBEAT)
    }
}
