//! The replica-wide gate every Hyperline request passes.
//!
//! Hyperline's write limit is per account, not per command: when one command
//! hears 429, every in-flight command of the replica must hold back, or they
//! would all burn their retries against the same closed window. The gate
//! holds one "not before" instant that a 429 (or an exhausted quota) pushes
//! forward, and spaces requests to honour `hyperline.max_requests_per_second`.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Shared by all commands of one replica.
#[derive(Debug)]
pub struct Gate {
    /// Minimum spacing between requests (`1 / max_requests_per_second`).
    interval: Option<Duration>,
    state: Mutex<GateState>,
}

#[derive(Debug)]
struct GateState {
    /// The next free request slot of the client-side cap.
    next_slot: Instant,
    /// No request before this instant (rate limit, exhausted quota).
    not_before: Instant,
}

impl Gate {
    /// A gate with a client-side cap of `per_second` requests (0 = no cap).
    pub fn new(per_second: u32) -> Self {
        let now = Instant::now();
        Gate {
            interval: (per_second > 0).then(|| Duration::from_secs(1) / per_second),
            state: Mutex::new(GateState {
                next_slot: now,
                not_before: now,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        // The state is two instants: a panic elsewhere cannot leave it
        // inconsistent, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until this replica may send its next request, and takes the slot.
    pub async fn admit(&self) {
        loop {
            let slot = {
                let mut s = self.lock();
                let slot = Instant::now().max(s.next_slot).max(s.not_before);
                if let Some(interval) = self.interval {
                    s.next_slot = slot + interval;
                }
                slot
            };
            tokio::time::sleep_until(slot).await;
            // A 429 that arrived while we slept pushes us further out.
            if self.lock().not_before <= slot {
                return;
            }
        }
    }

    /// Holds every request of the replica for `wait` from now.
    pub fn pause_for(&self, wait: Duration) {
        let until = Instant::now() + wait;
        let mut s = self.lock();
        s.not_before = s.not_before.max(until);
    }

    /// Time left until requests may flow again (for metrics and tests).
    pub fn paused_for(&self) -> Duration {
        self.lock()
            .not_before
            .saturating_duration_since(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn no_cap_admits_at_once() {
        let gate = Gate::new(0);
        let start = Instant::now();
        for _ in 0..100 {
            gate.admit().await;
        }
        assert_eq!(Instant::now(), start);
    }

    #[tokio::test(start_paused = true)]
    async fn the_cap_spaces_requests() {
        let gate = Gate::new(10);
        let start = Instant::now();
        for _ in 0..11 {
            gate.admit().await;
        }
        assert_eq!(Instant::now() - start, Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_every_caller() {
        let gate = std::sync::Arc::new(Gate::new(0));
        gate.pause_for(Duration::from_secs(7));
        let start = Instant::now();
        let waiters: Vec<_> = (0..5)
            .map(|_| {
                let gate = gate.clone();
                tokio::spawn(async move {
                    gate.admit().await;
                    Instant::now()
                })
            })
            .collect();
        for w in waiters {
            assert_eq!(w.await.expect("join") - start, Duration::from_secs(7));
        }
        assert_eq!(gate.paused_for(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_during_the_wait_extends_it() {
        let gate = std::sync::Arc::new(Gate::new(0));
        gate.pause_for(Duration::from_secs(2));
        let start = Instant::now();
        let waiter = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.admit().await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        gate.pause_for(Duration::from_secs(5));
        waiter.await.expect("join");
        assert_eq!(Instant::now() - start, Duration::from_secs(6));
    }

    #[tokio::test(start_paused = true)]
    async fn a_shorter_pause_never_shortens_a_longer_one() {
        let gate = Gate::new(0);
        gate.pause_for(Duration::from_secs(9));
        gate.pause_for(Duration::from_secs(1));
        assert_eq!(gate.paused_for(), Duration::from_secs(9));
    }
}
