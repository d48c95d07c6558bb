//! The replica's view of its API key.
//!
//! A 401 or 403 is the key's fault, not the command's: failing the command
//! would tell a downstream team that a customer's purchase was refused when
//! nothing is wrong with it. So the replica stops consuming, puts its commands
//! back, reports not ready, and probes the key until Hyperline accepts it.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::hyperline::{HyperlineClient, ProbeResult};

/// First and longest wait between probes of a refused key (CONTRACT section 4).
const PROBE_FIRST: Duration = Duration::from_secs(1);
const PROBE_MAX: Duration = Duration::from_secs(60);

/// Whether the key is known to be refused, shared by the whole replica.
#[derive(Debug)]
pub struct Credentials {
    faulted: watch::Sender<bool>,
}

impl Default for Credentials {
    fn default() -> Self {
        Credentials {
            faulted: watch::Sender::new(false),
        }
    }
}

impl Credentials {
    /// True from a 401/403 until a probe is accepted.
    pub fn is_faulted(&self) -> bool {
        *self.faulted.borrow()
    }

    /// Records a 401/403; returns true for the first report of a fault.
    pub fn report_fault(&self) -> bool {
        !self.faulted.send_replace(true)
    }

    /// Resolves when a fault is reported (at once if one is).
    pub async fn faulted(&self) {
        let mut rx = self.faulted.subscribe();
        // The sender lives as long as `self`, so this cannot fail while we wait.
        let _ = rx.wait_for(|f| *f).await;
    }

    /// Probes the key at growing intervals (1 s doubling to 60 s) until it is
    /// accepted, then clears the fault. Returns false if cancelled first.
    pub async fn recover(&self, client: &HyperlineClient, cancel: &CancellationToken) -> bool {
        let mut wait = PROBE_FIRST;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return false,
                () = tokio::time::sleep(wait) => {}
            }
            match client.probe_credentials().await {
                ProbeResult::Accepted => {
                    tracing::info!("the Hyperline API key is accepted again; resuming");
                    self.faulted.send_replace(false);
                    return true;
                }
                ProbeResult::Refused(status) => {
                    tracing::warn!(status, next_probe_in = ?(wait * 2).min(PROBE_MAX), "the Hyperline API key is still refused");
                }
                ProbeResult::Unknown(why) => {
                    tracing::warn!(%why, "credential probe inconclusive");
                }
            }
            wait = (wait * 2).min(PROBE_MAX);
        }
    }
}
