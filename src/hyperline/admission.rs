//! Which lane's command goes to the write gate next.
//!
//! The write budget is the fleet's bottleneck, and in front of it the gate
//! let whichever task asked first go first: 10,000 queued bulk top-ups
//! made a checkout published after them wait half an hour. Here each lane
//! has a line, and the one turn at the gate goes by stride scheduling (a
//! deficit round-robin with unit costs): while several lanes wait, each gets
//! turns in proportion to its share; a lane alone gets every turn; a lane
//! that was idle joins at the current virtual time, so it cannot save up
//! turns while nobody waited. Within a lane the line is first come, first
//! served.
//!
//! One turn is out at a time, held until the gate admits the request (or
//! the wait is given up): the gate then sees one caller, and its order is
//! the one decided here. The wait for a turn is cancel-safe: a command that
//! gives up (its deadline) leaves the line, and a turn handed to it at that
//! very moment is passed on, never lost.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::oneshot;

use super::gate::Gate;
use crate::configuration::Lane;
use crate::operations::Metrics;
use crate::operations::metrics::{LaneLabel, LatencyHistogram};

/// The virtual time one turn costs a lane of share 1.
const STRIDE: u64 = 1 << 32;

/// The replica's lines in front of the write gate, one per lane.
#[derive(Debug)]
pub struct Admission {
    state: Mutex<State>,
    /// Each lane's meters, in the lanes' order.
    meters: Vec<LaneMeters>,
}

#[derive(Debug)]
struct State {
    /// A turn is out.
    busy: bool,
    /// The start of the last turn given: an idle lane joins here.
    now: u64,
    lines: Vec<Line>,
}

#[derive(Debug)]
struct Line {
    /// Virtual time per turn: [`STRIDE`] / share.
    stride: u64,
    /// When the lane's next turn starts, in virtual time.
    pass: u64,
    waiting: VecDeque<Waiter>,
}

#[derive(Debug)]
struct Waiter {
    granted: oneshot::Sender<Charge>,
    /// Unix seconds since the command waits (its publish time).
    since_secs: i64,
}

/// What a turn cost its lane: the lane's pass and the virtual time before
/// the charge, to refund it when the turn is reconsidered.
#[derive(Clone, Copy, Debug)]
struct Charge {
    pass: u64,
    now: u64,
}

#[derive(Debug)]
struct LaneMeters {
    writes: Counter,
    wait: LatencyHistogram,
    oldest_since: Gauge,
}

impl State {
    /// The waiting lane whose turn comes first; ties to the earlier lane.
    fn next_lane(&self) -> Option<usize> {
        self.lines
            .iter()
            .enumerate()
            .filter(|(_, line)| !line.waiting.is_empty())
            .min_by_key(|(_, line)| line.pass.max(self.now))
            .map(|(lane, _)| lane)
    }

    /// Charges `lane` one turn; what it cost.
    fn charge(&mut self, lane: usize) -> Charge {
        let line = &mut self.lines[lane];
        let before = Charge {
            pass: line.pass,
            now: self.now,
        };
        let start = line.pass.max(self.now);
        self.now = start;
        line.pass = start.saturating_add(line.stride);
        before
    }

    /// Takes back the charge of the turn out (no other was given since:
    /// one turn is out at a time).
    fn refund(&mut self, lane: usize, charge: Charge) {
        self.lines[lane].pass = charge.pass;
        self.now = charge.now;
    }
}

impl Admission {
    /// A line per lane of `lanes`, metered in `metrics`.
    pub fn new(lanes: &[Lane], metrics: &Metrics) -> Self {
        let lines = lanes
            .iter()
            .map(|lane| Line {
                stride: STRIDE / u64::from(lane.share.max(1)),
                pass: 0,
                waiting: VecDeque::new(),
            })
            .collect();
        let meters = lanes
            .iter()
            .map(|lane| {
                let label = LaneLabel {
                    lane: lane.name.clone(),
                };
                LaneMeters {
                    writes: metrics.lane_writes.get_or_create(&label).clone(),
                    wait: metrics.lane_gate_wait.get_or_create(&label).clone(),
                    oldest_since: metrics.lane_oldest_since.get_or_create(&label).clone(),
                }
            })
            .collect();
        Admission {
            state: Mutex::new(State {
                busy: false,
                now: 0,
                lines,
            }),
            meters,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Each update is complete under the lock, so a panic elsewhere
        // cannot leave the lines inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for the turn of a command of `lane` (an index of the lanes
    /// given to [`Admission::new`]) that waits since `since_secs` (Unix
    /// seconds). Hold the turn until the gate is ready, then
    /// [`Turn::reconsider`] it, and once the gate admits, [`Turn::admitted`].
    pub async fn turn(&self, lane: usize, since_secs: i64) -> Turn<'_> {
        let lane = lane.min(self.meters.len().saturating_sub(1));
        let asked = Instant::now();
        loop {
            let granted = {
                let mut s = self.lock();
                if !s.busy {
                    // Nobody waits while no turn is out.
                    s.busy = true;
                    let charge = s.charge(lane);
                    return self.turn_of(lane, since_secs, asked, charge);
                }
                let (granted, wait) = oneshot::channel();
                let line = &mut s.lines[lane].waiting;
                line.push_back(Waiter {
                    granted,
                    since_secs,
                });
                if line.len() == 1 {
                    self.meters[lane].oldest_since.set(since_secs);
                }
                wait
            };
            if let Some(charge) = self.wait_for(granted).await {
                return self.turn_of(lane, since_secs, asked, charge);
            }
        }
    }

    /// The turn given through `granted`; `None` if it never comes.
    async fn wait_for(&self, granted: oneshot::Receiver<Charge>) -> Option<Charge> {
        let mut waiting = Waiting {
            admission: self,
            granted,
            received: false,
        };
        let charge = (&mut waiting.granted).await.ok();
        waiting.received = charge.is_some();
        charge
    }

    fn turn_of(&self, lane: usize, since_secs: i64, asked: Instant, charge: Charge) -> Turn<'_> {
        Turn {
            admission: self,
            lane,
            since_secs,
            asked,
            charge,
            out: true,
        }
    }

    /// The turn is back: it goes to the next waiting lane's first command
    /// still waiting, or nobody holds it.
    fn pass_on(&self) {
        let mut s = self.lock();
        if !self.give(&mut s) {
            s.busy = false;
        }
    }

    /// Gives the turn to the first command still waiting in the lane whose
    /// turn comes first; false when nobody waits.
    fn give(&self, s: &mut State) -> bool {
        while let Some(lane) = s.next_lane() {
            let Some(waiter) = s.lines[lane].waiting.pop_front() else {
                break;
            };
            let head = s.lines[lane].waiting.front().map_or(0, |w| w.since_secs);
            self.meters[lane].oldest_since.set(head);
            let before = s.charge(lane);
            if waiter.granted.send(before).is_ok() {
                return true;
            }
            // That command gave up waiting: the charge back, the next one.
            s.refund(lane, before);
        }
        false
    }
}

/// Where a command waits for its turn: its lane in the replica's lines,
/// and since when it waits (its publish time, Unix seconds).
#[derive(Clone, Copy, Debug)]
pub struct Place<'a> {
    pub admission: &'a Admission,
    pub lane: usize,
    pub since_secs: i64,
}

impl Place<'_> {
    /// [`Admission::turn`] for this command.
    pub async fn turn(&self) -> Turn<'_> {
        self.admission.turn(self.lane, self.since_secs).await
    }
}

/// A command's wait for its turn; dropped unanswered, it leaves the line,
/// and a turn given to it meanwhile is passed on.
struct Waiting<'a> {
    admission: &'a Admission,
    granted: oneshot::Receiver<Charge>,
    /// The turn came and was taken: it is the command's, not to pass on.
    received: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.received {
            return;
        }
        // Closed first, so that no turn can be given to it after the check.
        self.granted.close();
        if self.granted.try_recv().is_ok() {
            self.admission.pass_on();
        }
    }
}

/// The turn at the write gate; dropped, it goes to the next command.
#[derive(Debug)]
pub struct Turn<'a> {
    admission: &'a Admission,
    lane: usize,
    since_secs: i64,
    asked: Instant,
    charge: Charge,
    /// Still this command's to pass on when it drops.
    out: bool,
}

impl<'a> Turn<'a> {
    /// Holds the turn until `gate` is ready, and [`Turn::reconsider`]s it
    /// then, until it is kept. With one lane there is nobody to give it to:
    /// the gate's own wait in `admit` is the only one.
    pub async fn at_open_slot(self, gate: &Gate) -> Turn<'a> {
        if self.admission.meters.len() < 2 {
            return self;
        }
        let mut turn = self;
        loop {
            gate.ready().await;
            let (reconsidered, kept) = turn.reconsider().await;
            if kept {
                return reconsidered;
            }
            turn = reconsidered;
        }
    }

    /// The gate is ready: the slot goes to the command whose turn comes
    /// first now, which is not this one when a command of a lane with an
    /// earlier turn came meanwhile (a checkout that arrived while a bulk
    /// command waited for the slot would otherwise wait for that slot and
    /// then its own). Then this command goes back to the front of its line,
    /// its turn's charge refunded, and waits for its turn again. With one
    /// lane, or nobody waiting in another, it keeps the turn at once.
    /// `(turn, kept)`: `kept` when the turn was not given away.
    pub async fn reconsider(mut self) -> (Turn<'a>, bool) {
        let admission = self.admission;
        let granted = {
            let mut s = admission.lock();
            let lane = self.lane;
            let others = s
                .lines
                .iter()
                .enumerate()
                .any(|(i, line)| i != lane && !line.waiting.is_empty());
            if !others {
                drop(s);
                return (self, true);
            }
            s.refund(lane, self.charge);
            let (granted, mut wait) = oneshot::channel();
            s.lines[lane].waiting.push_front(Waiter {
                granted,
                since_secs: self.since_secs,
            });
            admission.meters[lane].oldest_since.set(self.since_secs);
            // Someone waits: the turn is given, if only back to this command.
            admission.give(&mut s);
            match wait.try_recv() {
                Ok(charge) => {
                    self.charge = charge;
                    drop(s);
                    return (self, true);
                }
                Err(_) => {
                    self.out = false;
                    wait
                }
            }
        };
        let (lane, since_secs, asked) = (self.lane, self.since_secs, self.asked);
        drop(self);
        match admission.wait_for(granted).await {
            Some(charge) => (admission.turn_of(lane, since_secs, asked, charge), false),
            // Never given (cannot happen while the admission lives): in
            // line again.
            None => (admission.turn(lane, since_secs).await, false),
        }
    }

    /// The gate admitted the request: one write of the lane, after the wait
    /// since the turn was asked for.
    pub fn admitted(self) {
        let meters = &self.admission.meters[self.lane];
        meters.writes.inc();
        meters
            .wait
            .observe(self.asked.elapsed().as_secs_f64(), None, None);
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if self.out {
            self.admission.pass_on();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::configuration::DEFAULT_LANE;

    fn lanes(shares: &[u32]) -> Vec<Lane> {
        shares
            .iter()
            .enumerate()
            .map(|(i, share)| Lane {
                name: format!("lane{i}"),
                queue: format!("q{i}"),
                share: *share,
                prefetch: 8,
                objective: Duration::from_secs(60),
            })
            .collect()
    }

    /// Every lane keeps `depth` commands waiting; the lanes of the first
    /// `turns` turns given.
    async fn turns_given(shares: &[u32], depth: usize, turns: usize) -> Vec<usize> {
        let metrics = Metrics::new();
        let admission = Arc::new(Admission::new(&lanes(shares), &metrics));
        // The turn is out while the others queue, so the first pick is fair.
        let holder = admission.turn(0, 0).await;
        let (given, mut order) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = tokio::task::JoinSet::new();
        for lane in 0..shares.len() {
            for _ in 0..depth {
                let admission = Arc::clone(&admission);
                let given = given.clone();
                tasks.spawn(async move {
                    let turn = admission.turn(lane, 0).await;
                    let _ = given.send(lane);
                    turn.admitted();
                });
            }
        }
        // Every command in its line before the turn comes back.
        while waiting(&admission) < shares.len() * depth {
            tokio::task::yield_now().await;
        }
        drop(holder);
        let mut lanes = Vec::new();
        while lanes.len() < turns {
            match order.recv().await {
                Some(lane) => lanes.push(lane),
                None => break,
            }
        }
        tasks.abort_all();
        lanes
    }

    /// Commands waiting in every line.
    fn waiting(admission: &Admission) -> usize {
        admission.lock().lines.iter().map(|l| l.waiting.len()).sum()
    }

    fn count(order: &[usize], lane: usize) -> usize {
        order.iter().filter(|l| **l == lane).count()
    }

    #[tokio::test]
    async fn waiting_lanes_get_turns_in_proportion_to_their_shares() {
        let order = turns_given(&[4, 1], 300, 250).await;
        assert_eq!((count(&order, 0), count(&order, 1)), (200, 50));
        // Spread out, not in bursts: every five turns hold one of the bulk.
        for five in order.chunks(5) {
            assert_eq!(count(five, 1), 1, "{order:?}");
        }
        let three = turns_given(&[3, 2, 1], 120, 120).await;
        let counts = [count(&three, 0), count(&three, 1), count(&three, 2)];
        for (got, share) in counts.into_iter().zip([60, 40, 20]) {
            assert!(got.abs_diff(share) <= 1, "{counts:?}");
        }
    }

    #[tokio::test]
    async fn a_lane_alone_gets_every_turn() {
        let metrics = Metrics::new();
        let admission = Arc::new(Admission::new(&lanes(&[4, 1]), &metrics));
        let holder = admission.turn(1, 0).await;
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..10 {
            let admission = Arc::clone(&admission);
            tasks.spawn(async move { admission.turn(1, 0).await.admitted() });
        }
        drop(holder);
        let all = tokio::time::timeout(Duration::from_secs(5), async {
            while tasks.join_next().await.is_some() {}
        });
        assert!(all.await.is_ok(), "the bulk lane alone took every turn");
        let text = metrics.encode();
        assert!(
            text.contains("cpw_lane_writes_total{lane=\"lane1\"} 10"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn an_idle_lane_saves_up_no_turns() {
        let metrics = Metrics::new();
        let admission = Arc::new(Admission::new(&lanes(&[1, 1]), &metrics));
        // Lane 0 alone takes 100 turns; then both wait: they alternate,
        // lane 1 does not get 100 in a row for the time it was idle.
        for _ in 0..100 {
            admission.turn(0, 0).await.admitted();
        }
        assert_eq!(admission.lock().now, 99 * STRIDE);
        let order = {
            let holder = admission.turn(0, 0).await;
            let (given, mut order) = tokio::sync::mpsc::unbounded_channel();
            for lane in [1, 1, 1, 0, 0, 0] {
                let admission = Arc::clone(&admission);
                let given = given.clone();
                tokio::spawn(async move {
                    let turn = admission.turn(lane, 0).await;
                    let _ = given.send(lane);
                    drop(turn);
                });
            }
            while waiting(&admission) < 6 {
                tokio::task::yield_now().await;
            }
            drop(holder);
            let mut lanes = Vec::new();
            while let Some(lane) = order.recv().await {
                lanes.push(lane);
                if lanes.len() == 6 {
                    break;
                }
            }
            lanes
        };
        assert_eq!(order, [1, 0, 1, 0, 1, 0]);
    }

    #[tokio::test]
    async fn a_command_that_gives_up_passes_its_turn_on() {
        let metrics = Metrics::new();
        let admission = Arc::new(Admission::new(&lanes(&[1]), &metrics));
        let holder = admission.turn(0, 0).await;
        // Gives up while waiting.
        let gave_up =
            tokio::time::timeout(Duration::from_millis(20), admission.turn(0, 1_000)).await;
        assert!(gave_up.is_err());
        assert!(
            metrics
                .encode()
                .contains("cpw_lane_oldest_waiting_since_seconds{lane=\"lane0\"} 1000"),
            "the line's head waits since its publish time"
        );
        let next = {
            let admission = Arc::clone(&admission);
            tokio::spawn(async move { admission.turn(0, 2_000).await.admitted() })
        };
        while admission.lock().lines[0].waiting.len() < 2 {
            tokio::task::yield_now().await;
        }
        drop(holder);
        let passed = tokio::time::timeout(Duration::from_secs(5), next).await;
        assert!(
            matches!(passed, Ok(Ok(()))),
            "the turn skipped the one that left"
        );
        assert!(!admission.lock().busy, "and came back to nobody");
        assert!(
            metrics
                .encode()
                .contains("cpw_lane_oldest_waiting_since_seconds{lane=\"lane0\"} 0"),
            "nobody waits"
        );
    }

    #[tokio::test]
    async fn an_open_slot_goes_to_the_checkout_that_came_while_bulk_waited_for_it() {
        let metrics = Metrics::new();
        let admission = Arc::new(Admission::new(&lanes(&[4, 1]), &metrics));
        // A bulk command holds the turn, waiting for the gate's slot.
        let bulk = admission.turn(1, 0).await;
        let checkout = {
            let admission = Arc::clone(&admission);
            tokio::spawn(async move {
                let turn = admission.turn(0, 0).await;
                let (turn, kept) = turn.reconsider().await;
                assert!(kept, "nobody else waits: the checkout keeps it");
                turn.admitted();
            })
        };
        while admission.lock().lines[0].waiting.is_empty() {
            tokio::task::yield_now().await;
        }
        // The slot opens: it is the checkout's; the bulk command waits at the
        // front of its line and gets the next.
        let (bulk, kept) = bulk.reconsider().await;
        assert!(!kept, "given to the checkout first");
        assert!(checkout.await.is_ok());
        let (bulk, kept) = bulk.reconsider().await;
        assert!(kept);
        bulk.admitted();
        let text = metrics.encode();
        assert!(
            text.contains("cpw_lane_writes_total{lane=\"lane0\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("cpw_lane_writes_total{lane=\"lane1\"} 1"),
            "{text}"
        );
        assert!(!admission.lock().busy);
    }

    #[tokio::test]
    async fn a_turn_that_still_comes_first_is_kept_when_reconsidered() {
        let metrics = Metrics::new();
        let admission = Arc::new(Admission::new(&lanes(&[1, 1]), &metrics));
        // Lane 1 has had a turn: lane 0's next comes first.
        admission.turn(1, 0).await.admitted();
        let first = admission.turn(0, 0).await;
        let other = {
            let admission = Arc::clone(&admission);
            tokio::spawn(async move { admission.turn(1, 0).await.admitted() })
        };
        while admission.lock().lines[1].waiting.is_empty() {
            tokio::task::yield_now().await;
        }
        let (first, kept) = first.reconsider().await;
        assert!(kept, "lane 0's turn comes before lane 1's second");
        first.admitted();
        assert!(other.await.is_ok());
    }

    #[tokio::test]
    async fn the_one_lane_of_the_default_configuration_takes_its_turn_at_once() {
        let metrics = Metrics::new();
        let one = [Lane {
            name: DEFAULT_LANE.into(),
            queue: "credit-purchases".into(),
            share: 1,
            prefetch: 64,
            objective: Duration::from_secs(600),
        }];
        let admission = Admission::new(&one, &metrics);
        for _ in 0..3 {
            admission.turn(0, 0).await.admitted();
        }
        assert!(
            metrics
                .encode()
                .contains("cpw_lane_writes_total{lane=\"default\"} 3")
        );
    }
}
