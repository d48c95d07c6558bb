//! The replica's view of its API key.
//!
//! A 401 or 403 is the key's fault, not the command's: failing the command
//! would tell a downstream team that a customer's purchase was refused when
//! nothing is wrong with it. So the replica stops consuming, puts its commands
//! back, reports not ready, and probes the key until Hyperline accepts it.
//!
//! The probe is not a purchase, and a key can pass it yet be refused on
//! purchases (a 403 for a missing scope). Two rules keep such a key from
//! flapping the replica between paused and a prefetch of refused requests:
//! after a recovery the first purchase goes alone (a trial) and the others
//! wait for its answer; and the probe interval keeps growing across
//! recoveries until a purchase answer proves the key.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{HyperlineClient, ProbeResult, PurchaseResponse};

/// First and longest wait between probes of a refused key (docs/contract.md section 4).
const PROBE_FIRST: Duration = Duration::from_secs(1);
const PROBE_MAX: Duration = Duration::from_secs(60);

/// Whether the key is known to be refused, shared by the whole replica.
#[derive(Debug)]
pub struct Credentials {
    faulted: watch::Sender<bool>,
    /// Recovered by a probe, not yet proven by a purchase answer.
    on_trial: AtomicBool,
    /// Held by the one request of a trial.
    trial: tokio::sync::Mutex<()>,
    /// The wait before the next probe.
    next_probe: Mutex<Duration>,
}

impl Default for Credentials {
    fn default() -> Self {
        Credentials {
            faulted: watch::Sender::new(false),
            on_trial: AtomicBool::new(false),
            trial: tokio::sync::Mutex::new(()),
            next_probe: Mutex::new(PROBE_FIRST),
        }
    }
}

impl Credentials {
    fn next_probe(&self) -> std::sync::MutexGuard<'_, Duration> {
        // One value, written whole: a poisoned lock is still usable.
        self.next_probe.lock().unwrap_or_else(|p| p.into_inner())
    }

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

    /// While the key is on trial, waits for the trial's turn and holds it
    /// for one request; `None` when the key is proven.
    pub async fn trial(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        if !self.on_trial.load(Ordering::Acquire) {
            return None;
        }
        let turn = self.trial.lock().await;
        self.on_trial.load(Ordering::Acquire).then_some(turn)
    }

    /// Takes in a purchase answer: anything but an authentication or
    /// rate-limit refusal proves the key.
    pub fn heard(&self, response: &PurchaseResponse) {
        if response.proves_key() && self.on_trial.swap(false, Ordering::AcqRel) {
            *self.next_probe() = PROBE_FIRST;
        }
    }

    /// Probes the key at growing intervals (1 s doubling to 60 s, continued
    /// from the last recovery while the key is on trial) until it is
    /// accepted, then clears the fault and puts the key on trial. Returns
    /// false if cancelled first.
    pub async fn recover(&self, client: &HyperlineClient, cancel: &CancellationToken) -> bool {
        loop {
            let wait = *self.next_probe();
            tokio::select! {
                () = cancel.cancelled() => return false,
                () = tokio::time::sleep(wait) => {}
            }
            *self.next_probe() = (wait * 2).min(PROBE_MAX);
            match client.probe_credentials().await {
                ProbeResult::Accepted => {
                    tracing::info!(
                        "the Hyperline API key is accepted again; resuming with one trial purchase"
                    );
                    self.on_trial.store(true, Ordering::Release);
                    self.faulted.send_replace(false);
                    return true;
                }
                ProbeResult::Refused(status) => {
                    let next_probe_in_ms = crate::clock::millis(*self.next_probe());
                    tracing::warn!(
                        status,
                        next_probe_in_ms,
                        "the Hyperline API key is still refused"
                    );
                }
                ProbeResult::Unknown(why) => {
                    tracing::warn!(%why, "credential probe inconclusive");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A purchase answer of `status`, as the client reads it.
    fn answer(status: u16) -> PurchaseResponse {
        let headers = reqwest::header::HeaderMap::new();
        let (answer, quota) =
            super::super::classify(status, &headers, b"", time::OffsetDateTime::now_utc());
        PurchaseResponse {
            answer,
            status: Some(status),
            quota,
        }
    }

    #[tokio::test]
    async fn a_proven_key_has_no_trial() {
        let c = Credentials::default();
        assert!(c.trial().await.is_none());
    }

    #[tokio::test]
    async fn a_trial_lets_one_request_go_until_an_answer_proves_the_key() {
        let c = Credentials::default();
        c.on_trial.store(true, Ordering::Release);
        *c.next_probe() = Duration::from_secs(8);
        let first = c.trial().await;
        assert!(first.is_some());
        assert!(c.trial.try_lock().is_err(), "the others wait");
        c.heard(&answer(403));
        assert!(
            c.on_trial.load(Ordering::Acquire),
            "a refusal proves nothing"
        );
        c.heard(&answer(201));
        drop(first);
        assert!(c.trial().await.is_none());
        assert_eq!(
            *c.next_probe(),
            PROBE_FIRST,
            "the probe interval starts over"
        );
    }
}
