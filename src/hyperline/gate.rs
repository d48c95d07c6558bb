//! The replica-wide gate every Hyperline request passes.
//!
//! Hyperline's write limit is per account, not per command nor per replica:
//! 50 writes per 10 s shared by every replica. When one command hears 429,
//! every in-flight command of the replica must hold back, or they would all
//! burn their retries against the same closed window. So the gate holds one
//! "not before" instant that a 429 pushes forward, and spaces requests to
//! honour `hyperline.max_requests_per_second`.
//!
//! It also paces by what the API announces (`X-RateLimit-Remaining` and
//! `X-RateLimit-Reset`), so that replicas sharing the quota do not learn of
//! its end by collecting 429s:
//! - while the current window's quota is unknown (at start, and once the
//!   announced window has reset) one request goes alone, a probe, and the
//!   others wait for its answer instead of rushing the new window together,
//!   but not for longer than the gate's patience: a probe that hangs (an API
//!   that answers nothing, a timeout) would otherwise let one request through
//!   per request timeout, and a replica's whole prefetch would outlast
//!   RabbitMQ's consumer timeout waiting in line;
//! - then each replica spreads its share of what is left over the time left,
//!   counting the requests it sent since the announcement and assuming every
//!   other client sharing the quota sent as many;
//! - the share is estimated from how fast the announced remaining falls
//!   between two of the replica's own answers, compared with how many
//!   requests the replica itself sent meanwhile;
//! - when less than one request per sharing client is left, what is left may
//!   well be another's: the replica waits for the next window.
//!
//! An API that announces nothing (no rate-limit headers) is not paced at all.
//!
//! Every wait the gate keeps comes from the network (`Retry-After`,
//! `X-RateLimit-Reset`) or from configuration, so none is trusted to fit in
//! an [`Instant`]: a pause is capped at the gate's longest pause, and every
//! sum of an instant and a duration is checked ([`later`]). A
//! `Retry-After: 18446744073709551615` once overflowed `Instant + Duration`
//! and panicked the delivery's task, which crash-looped the command into a
//! poison letter; a merely long one paused the replica for years.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::hyperline::Quota;

/// Two announced resets this close describe the same window.
const SAME_WINDOW: Duration = Duration::from_millis(250);
/// Upper bound of the estimated number of clients sharing the quota.
const MAX_SHARE: f64 = 64.0;

/// Shared by all commands of one replica.
#[derive(Debug)]
pub struct Gate {
    /// Minimum spacing between requests (`1 / max_requests_per_second`).
    interval: Option<Duration>,
    /// How long the others wait for a probe's answer.
    patience: Duration,
    /// The longest the replica pauses for one answer, whatever it asks.
    longest_pause: Duration,
    state: Mutex<GateState>,
    /// Woken when a probe ends.
    probe_done: Notify,
}

#[derive(Debug)]
struct GateState {
    /// The next free request slot of the client-side cap.
    next_slot: Instant,
    /// No request before this instant (a 429).
    not_before: Instant,
    /// Requests admitted so far; a permit's number.
    admitted: u64,
    /// When the last request was admitted.
    last_admitted: Option<Instant>,
    /// What the API last said about the write quota.
    quota: QuotaView,
    /// Estimated number of clients sharing the quota, this one included.
    share: f64,
    /// Since when a probe is out: the others wait for its answer.
    probing: Option<Instant>,
}

#[derive(Clone, Copy, Debug)]
enum QuotaView {
    /// Not known yet.
    Unknown,
    /// The API answers without rate-limit headers: nothing to pace on.
    Unannounced,
    /// The window the API announced last.
    Window {
        /// When it resets.
        reset_at: Instant,
        /// Writes left in it, as announced.
        remaining: u64,
        /// The permit whose answer announced it: later permits are not in it.
        seq: u64,
    },
}

/// Why a request may not go yet.
enum Wait {
    Until(Instant),
    /// For the probe's answer, at most until then.
    ForProbe(Instant),
}

/// One admitted request. Report its answer with [`Permit::answered`]; a
/// permit dropped without an answer (a network failure) teaches nothing.
#[derive(Debug)]
pub struct Permit<'a> {
    gate: &'a Gate,
    seq: u64,
    probe: bool,
}

impl Permit<'_> {
    /// The answer arrived; `quota` is what its rate-limit headers announced
    /// (`None`: it had none).
    pub fn answered(self, quota: Option<Quota>) {
        self.gate.take_in(self.seq, self.probe, quota);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe {
            self.gate.lock().probing = None;
            self.gate.probe_done.notify_waiters();
        }
    }
}

impl GateState {
    /// Admits now (`Ok(is a probe)`) or says how long to wait.
    fn admission(&self, now: Instant, capped: bool, patience: Duration) -> Result<bool, Wait> {
        let mut at = now.max(self.not_before);
        if capped {
            at = at.max(self.next_slot);
        }
        let mut probe = false;
        match self.quota {
            QuotaView::Unannounced => {}
            QuotaView::Window {
                reset_at,
                remaining,
                seq,
            } if now < reset_at => {
                let unseen = self.share * self.admitted.saturating_sub(seq) as f64;
                let left = remaining as f64 - unseen;
                if left < self.share.round().max(1.0) {
                    // What is left may be another client's.
                    at = at.max(reset_at);
                } else if let Some(last) = self.last_admitted {
                    // Our share of what is left, spread evenly over the time
                    // left (the last request one step before the reset).
                    let step = reset_at
                        .saturating_duration_since(now)
                        .mul_f64(self.share / (left + self.share));
                    at = at.max(later(last, step));
                }
            }
            // Unknown, or the announced window is over: one request learns
            // the new one.
            QuotaView::Unknown | QuotaView::Window { .. } => match self.probing {
                Some(since) if now < later(since, patience) => {
                    return Err(Wait::ForProbe(later(since, patience)));
                }
                // The probe is overdue: its answer may never come, and
                // waiting longer would serialise the replica behind it.
                Some(_) => {}
                None => probe = true,
            },
        }
        if at > now {
            Err(Wait::Until(at))
        } else {
            Ok(probe)
        }
    }
}

/// `at + by`, or as late as an [`Instant`] goes when the sum overflows: a
/// wait read from the network must never panic the task that keeps it.
fn later(at: Instant, by: Duration) -> Instant {
    at.checked_add(by)
        .or_else(|| at.checked_add(FAR_FUTURE))
        .unwrap_or(at)
}

/// Later than any pause the gate keeps (30 years, tokio's own "far future").
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

impl Gate {
    /// A gate with a client-side cap of `per_second` requests (0 = no cap),
    /// whose requests wait at most `patience` for a probe's answer, and
    /// whose pauses last at most `longest_pause` whatever an answer asks
    /// (see [`Settings::longest_rate_limit_pause`](crate::configuration::Settings::longest_rate_limit_pause)).
    pub fn new(per_second: u32, patience: Duration, longest_pause: Duration) -> Self {
        let now = Instant::now();
        Gate {
            interval: (per_second > 0).then(|| Duration::from_secs(1) / per_second),
            patience,
            longest_pause,
            state: Mutex::new(GateState {
                next_slot: now,
                not_before: now,
                admitted: 0,
                last_admitted: None,
                quota: QuotaView::Unknown,
                share: 1.0,
                probing: None,
            }),
            probe_done: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        // The state is a few numbers, each update complete under the lock:
        // a panic elsewhere cannot leave it inconsistent, so a poisoned lock
        // is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until this replica may send its next request, and takes the slot.
    pub async fn admit(&self) -> Permit<'_> {
        loop {
            let wait = {
                let now = Instant::now();
                let mut s = self.lock();
                match s.admission(now, self.interval.is_some(), self.patience) {
                    Ok(probe) => {
                        s.admitted += 1;
                        s.last_admitted = Some(now);
                        if let Some(interval) = self.interval {
                            s.next_slot = later(now, interval);
                        }
                        if probe {
                            s.probing = Some(now);
                        }
                        return Permit {
                            gate: self,
                            seq: s.admitted,
                            probe,
                        };
                    }
                    Err(wait) => wait,
                }
            };
            // Whatever changes meanwhile (a 429, an announcement) is taken
            // into account when the loop asks again.
            self.sit_out(wait).await;
        }
    }

    /// Waits until [`Gate::admit`] would admit at once, without taking the
    /// slot: the lanes give a slot that has opened to the command whose
    /// turn comes first then, not to the one that started waiting for it
    /// (see `admission`).
    pub async fn ready(&self) {
        loop {
            let wait = {
                let s = self.lock();
                match s.admission(Instant::now(), self.interval.is_some(), self.patience) {
                    Ok(_) => return,
                    Err(wait) => wait,
                }
            };
            self.sit_out(wait).await;
        }
    }

    async fn sit_out(&self, wait: Wait) {
        match wait {
            Wait::Until(at) => tokio::time::sleep_until(at).await,
            Wait::ForProbe(until) => {
                let done = self.probe_done.notified();
                tokio::pin!(done);
                done.as_mut().enable();
                if self.lock().probing.is_some() {
                    let _ = tokio::time::timeout_at(until, done).await;
                }
            }
        }
    }

    /// Takes in what the answer to permit `seq` announced.
    fn take_in(&self, seq: u64, probe: bool, quota: Option<Quota>) {
        let now = Instant::now();
        let mut s = self.lock();
        let Some(quota) = quota else {
            if probe {
                s.quota = QuotaView::Unannounced;
            }
            return;
        };
        let reset_at = later(now, quota.reset_after.min(self.longest_pause));
        let fresh = QuotaView::Window {
            reset_at,
            remaining: quota.remaining,
            seq,
        };
        match s.quota {
            QuotaView::Window {
                reset_at: known,
                remaining,
                seq: known_seq,
            } if reset_at < later(known, SAME_WINDOW) && known < later(reset_at, SAME_WINDOW) => {
                // The same window: a later request's answer says more.
                if seq <= known_seq {
                    return;
                }
                if let Some(spent) = remaining.checked_sub(quota.remaining) {
                    let per_own_request = spent as f64 / (seq - known_seq) as f64;
                    s.share = (s.share + per_own_request.clamp(1.0, MAX_SHARE)) / 2.0;
                }
                s.quota = fresh;
            }
            // An answer about a window already over.
            QuotaView::Window {
                reset_at: known, ..
            } if reset_at < known => {}
            _ => s.quota = fresh,
        }
    }

    /// Holds every request of the replica for `wait` from now, or for the
    /// gate's longest pause when `wait` is longer; the pause it made.
    pub fn pause_for(&self, wait: Duration) -> Duration {
        let paused = wait.min(self.longest_pause);
        if paused < wait {
            tracing::warn!(
                asked_secs = wait.as_secs(),
                paused_secs = paused.as_secs(),
                "Hyperline asked for a rate-limit wait longer than the longest pause: the \
                 replica pauses for the longest pause, then tries again"
            );
        }
        let until = later(Instant::now(), paused);
        let mut s = self.lock();
        s.not_before = s.not_before.max(until);
        paused
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
    use std::sync::Arc;

    use super::*;

    /// An announcement of `remaining` writes until `reset`.
    fn quota(remaining: u64, reset: Instant) -> Option<Quota> {
        Some(Quota {
            remaining,
            reset_after: reset - Instant::now(),
        })
    }

    const PATIENCE: Duration = Duration::from_secs(5);
    const LONGEST: Duration = Duration::from_secs(300);

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// A gate past its first probe, on an API that announces nothing.
    async fn unannounced(per_second: u32) -> Gate {
        let gate = Gate::new(per_second, PATIENCE, LONGEST);
        gate.admit().await.answered(None);
        gate
    }

    #[tokio::test(start_paused = true)]
    async fn no_cap_admits_at_once() {
        let gate = unannounced(0).await;
        let start = Instant::now();
        for _ in 0..100 {
            gate.admit().await;
        }
        assert_eq!(Instant::now(), start);
    }

    #[tokio::test(start_paused = true)]
    async fn the_cap_spaces_requests() {
        let gate = Gate::new(10, PATIENCE, LONGEST);
        let start = Instant::now();
        gate.admit().await.answered(None);
        for _ in 0..10 {
            gate.admit().await;
        }
        assert_eq!(Instant::now() - start, secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_every_caller() {
        let gate = Arc::new(unannounced(0).await);
        gate.pause_for(secs(7));
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
            assert_eq!(w.await.expect("join") - start, secs(7));
        }
        assert_eq!(gate.paused_for(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_during_the_wait_extends_it() {
        let gate = Arc::new(unannounced(0).await);
        gate.pause_for(secs(2));
        let start = Instant::now();
        let waiter = {
            let gate = gate.clone();
            tokio::spawn(async move {
                gate.admit().await;
            })
        };
        tokio::time::sleep(secs(1)).await;
        gate.pause_for(secs(5));
        waiter.await.expect("join");
        assert_eq!(Instant::now() - start, secs(6));
    }

    #[tokio::test(start_paused = true)]
    async fn a_shorter_pause_never_shortens_a_longer_one() {
        let gate = Gate::new(0, PATIENCE, LONGEST);
        gate.pause_for(secs(9));
        gate.pause_for(secs(1));
        assert_eq!(gate.paused_for(), secs(9));
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_request_goes_alone_until_its_answer() {
        let gate = Arc::new(Gate::new(0, PATIENCE, LONGEST));
        let probe = gate.admit().await;
        let second = {
            let gate = gate.clone();
            tokio::spawn(async move {
                gate.admit().await;
                Instant::now()
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !second.is_finished(),
            "the second request waits for the probe"
        );
        let answered = Instant::now();
        probe.answered(None);
        assert_eq!(second.await.expect("join"), answered);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_without_an_answer_lets_the_next_request_probe() {
        let gate = Arc::new(Gate::new(0, PATIENCE, LONGEST));
        let probe = gate.admit().await;
        let second = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.admit().await.probe })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(probe);
        assert!(second.await.expect("join"), "the next request is the probe");
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_without_an_answer_holds_the_others_only_for_the_patience() {
        let gate = Arc::new(Gate::new(0, PATIENCE, LONGEST));
        let start = Instant::now();
        let _hanging = gate.admit().await;
        let others: Vec<_> = (0..7)
            .map(|_| {
                let gate = gate.clone();
                tokio::spawn(async move {
                    let permit = gate.admit().await;
                    (Instant::now(), permit.probe)
                })
            })
            .collect();
        for other in others {
            let (at, probe) = other.await.expect("join");
            assert_eq!(at - start, PATIENCE);
            assert!(!probe, "the overdue probe's place is not taken");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn what_is_left_is_spread_over_the_window() {
        let gate = Gate::new(0, PATIENCE, LONGEST);
        let start = Instant::now();
        let reset = start + secs(2);
        gate.admit().await.answered(quota(4, reset));
        let mut at = Vec::new();
        for left in (0..4).rev() {
            gate.admit().await.answered(quota(left, reset));
            at.push(Instant::now() - start);
        }
        // 4 left for 2 s: one every 0.4 s, the last a step before the reset.
        let ms = |n| Duration::from_millis(n);
        assert_eq!(at, [ms(400), ms(800), ms(1200), ms(1600)]);
        // The window is spent: the next request is the probe of the next one.
        let next = gate.admit().await;
        assert!(next.probe);
        assert_eq!(Instant::now(), reset);
    }

    #[tokio::test(start_paused = true)]
    async fn other_clients_spending_the_quota_slow_the_replica() {
        let gate = Gate::new(0, PATIENCE, LONGEST);
        let reset = Instant::now() + secs(10);
        gate.admit().await.answered(quota(40, reset));
        // Each of our requests sees the remaining fall by 3: two other
        // clients share the quota.
        let mut remaining = 40;
        for _ in 0..8 {
            remaining -= 3;
            gate.admit().await.answered(quota(remaining, reset));
        }
        let share = gate.lock().share;
        assert!((2.9..=3.0).contains(&share), "share {share}");
        // Less than one each is left, and it may be theirs: wait for the reset.
        gate.admit().await.answered(quota(2, reset));
        let next = gate.admit().await;
        assert!(next.probe);
        assert_eq!(Instant::now(), reset);
    }

    #[tokio::test(start_paused = true)]
    async fn an_exhausted_quota_waits_for_the_reset() {
        let gate = Gate::new(0, PATIENCE, LONGEST);
        let reset = Instant::now() + secs(3);
        gate.admit().await.answered(quota(0, reset));
        let next = gate.admit().await;
        assert!(next.probe);
        assert_eq!(Instant::now(), reset);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_older_than_the_known_one_is_ignored() {
        let gate = Gate::new(0, PATIENCE, LONGEST);
        let reset = Instant::now() + secs(20);
        gate.admit().await.answered(quota(10, reset));
        let first = gate.admit().await;
        let second = gate.admit().await;
        second.answered(quota(8, reset));
        first.answered(quota(9, reset));
        let QuotaView::Window { remaining, .. } = gate.lock().quota else {
            panic!("a window is known")
        };
        assert_eq!(remaining, 8);
    }

    #[tokio::test(start_paused = true)]
    async fn an_absurd_wait_is_capped_and_overflows_nothing() {
        let gate = unannounced(0).await;
        for absurd in [
            Duration::MAX,
            Duration::from_secs(u64::MAX),
            Duration::from_secs(10u64.pow(12)),
        ] {
            assert_eq!(gate.pause_for(absurd), LONGEST);
            assert_eq!(gate.paused_for(), LONGEST);
            // An announced reset as absurd: taken in, capped, no panic.
            gate.take_in(
                u64::MAX,
                false,
                Some(Quota {
                    remaining: 0,
                    reset_after: absurd,
                }),
            );
            let start = Instant::now();
            let next = gate.admit().await;
            assert_eq!(Instant::now() - start, LONGEST, "the replica serves again");
            next.answered(None);
        }
        assert_eq!(
            gate.pause_for(secs(2)),
            secs(2),
            "a sane wait is kept whole"
        );
    }
}
