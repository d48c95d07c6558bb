//! When to settle deliveries on the consuming channel, with acks merged: a
//! pure state machine, with no channel and no clock of its own (the caller
//! passes the time), so every rule can be tested frame by frame.
//! [`Settlements`](super::Settlements) puts its frames on the wire.
//!
//! At instant-API rates the broker is the bottleneck, and every ack is a
//! frame it parses and applies to the queue on its own. Commands finish out
//! of order, so an ack that has an older delivery still open before it is
//! held back (a few at most), and when that older delivery is settled, the
//! held acks go out with it in one `basic.ack` with `multiple` set.
//!
//! The broker acks *every* unacked delivery up to the tag of a multiple ack,
//! and closes the channel when that tag is not one of them. Three rules keep
//! that from ever acking a command that must not be acked:
//! - a multiple ack covers only a run that starts at the oldest open
//!   delivery and in which every delivery is ready to be acked;
//! - frames are queued in the order the decisions are made, under one lock,
//!   so a reject is on the wire before any multiple ack that passes over it;
//! - a delivery dropped without a settlement (its task panicked, or was
//!   aborted at shutdown) is requeued at once: otherwise it would hold back
//!   every later ack, and a later multiple ack must never take it along.
//!
//! A held ack keeps its prefetch slot busy until the older delivery is
//! settled. At instant-API rates that is a few milliseconds; behind a slow
//! one (an API that takes seconds, with answers out of order) it idled up to
//! a quarter of the prefetch. So acks are held only behind a young delivery
//! ([`HOLD_BEHIND`]), and those already held go out on their own once the
//! delivery they wait for has grown old: at the next settlement, or at
//! [`Runs::next_release`], when the caller's timer asks, whichever comes
//! first (with no settlement after them, they would wait for the slow one).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How a delivery leaves the queue once its output is confirmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settle {
    /// Done with: `basic.ack`.
    Ack,
    /// To the dead-letter queue: `basic.reject` without requeue.
    DeadLetter,
    /// Back on the queue: `basic.nack` with requeue.
    Requeue,
}

/// One settlement frame to put on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Frame {
    Ack { tag: u64, multiple: bool },
    Reject(u64),
    Requeue(u64),
}

impl Frame {
    fn single(tag: u64, settle: Settle) -> Frame {
        match settle {
            Settle::Ack => Frame::Ack {
                tag,
                multiple: false,
            },
            Settle::DeadLetter => Frame::Reject(tag),
            Settle::Requeue => Frame::Requeue(tag),
        }
    }
}

/// An ack is held back only behind a delivery taken less than this long
/// ago: far above the life of a command against an instant API (a few
/// milliseconds at prefetch 64 or 256), far below a slow API's answer.
const HOLD_BEHIND: Duration = Duration::from_millis(100);

/// A delivery taken and not yet settled towards the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Open {
    tag: u64,
    /// Its ack is held back.
    held: bool,
    taken: Instant,
}

/// The open deliveries of a channel, in tag order, and the acks held back.
#[derive(Debug)]
pub(super) struct Runs {
    /// Taken and not yet settled towards the broker, oldest first.
    open: VecDeque<Open>,
    /// How many of `open` are acks held back.
    held: usize,
    /// The most acks held back at once. Each keeps a prefetch slot busy
    /// while an older command runs, so the bound keeps a slow command from
    /// starving the consumer.
    max_held: usize,
}

impl Runs {
    pub(super) fn new(max_held: usize) -> Runs {
        Runs {
            open: VecDeque::new(),
            held: 0,
            max_held,
        }
    }

    /// Delivery tags only grow on a channel, so `open` stays sorted.
    pub(super) fn take(&mut self, tag: u64, now: Instant) {
        self.open.push_back(Open {
            tag,
            held: false,
            taken: now,
        });
    }

    /// Whether the oldest open delivery is young enough to hold acks behind.
    fn front_is_young(&self, now: Instant) -> bool {
        self.open
            .front()
            .is_some_and(|o| now.saturating_duration_since(o.taken) < HOLD_BEHIND)
    }

    /// The held acks, taken out of the runs, once the delivery they wait for
    /// has grown old: each goes out alone.
    pub(super) fn release_stale(&mut self, now: Instant) -> Vec<u64> {
        if self.held == 0 || self.front_is_young(now) {
            return Vec::new();
        }
        let released: Vec<u64> = self.open.iter().filter(|o| o.held).map(|o| o.tag).collect();
        self.open.retain(|o| !o.held);
        self.held = 0;
        released
    }

    /// Whether any ack is held back.
    pub(super) fn holding(&self) -> bool {
        self.held > 0
    }

    /// When the held acks are due to go out on their own, if any is held:
    /// once the oldest open delivery, which they wait for, has grown old.
    /// The oldest is never held itself (a held ack at the front would have
    /// gone out with the one before it), and a later settlement can only
    /// make the oldest younger, so this is the earliest release.
    pub(super) fn next_release(&self) -> Option<Instant> {
        match self.held {
            0 => None,
            _ => self.open.front().map(|o| o.taken + HOLD_BEHIND),
        }
    }

    /// The frames that settle `tag` (none while its ack is held back), after
    /// the single acks of held ones released because they waited too long.
    pub(super) fn settle(
        &mut self,
        tag: u64,
        settle: Settle,
        now: Instant,
    ) -> (Vec<u64>, [Option<Frame>; 2]) {
        let released = self.release_stale(now);
        (released, self.settle_one(tag, settle, now))
    }

    fn settle_one(&mut self, tag: u64, settle: Settle, now: Instant) -> [Option<Frame>; 2] {
        let Ok(at) = self.open.binary_search_by_key(&tag, |o| o.tag) else {
            // Never taken (or settled twice): only what was asked, alone.
            return [Some(Frame::single(tag, settle)), None];
        };
        match settle {
            Settle::Ack if at > 0 && self.held < self.max_held && self.front_is_young(now) => {
                self.open[at].held = true;
                self.held += 1;
                [None, None]
            }
            Settle::Ack if at > 0 => {
                self.open.remove(at);
                [Some(Frame::single(tag, settle)), None]
            }
            Settle::Ack => {
                self.open.pop_front();
                let last = self.pop_held_run().unwrap_or(tag);
                let multiple = last != tag;
                [
                    Some(Frame::Ack {
                        tag: last,
                        multiple,
                    }),
                    None,
                ]
            }
            Settle::DeadLetter | Settle::Requeue => {
                self.open.remove(at);
                let released = if at == 0 {
                    self.pop_held_run().map(|last| Frame::Ack {
                        tag: last,
                        multiple: true,
                    })
                } else {
                    None
                };
                [Some(Frame::single(tag, settle)), released]
            }
        }
    }

    /// Removes the held acks now at the front; the tag of the last one.
    fn pop_held_run(&mut self) -> Option<u64> {
        let mut last = None;
        while let Some(&Open {
            tag, held: true, ..
        }) = self.open.front()
        {
            self.open.pop_front();
            self.held -= 1;
            last = Some(tag);
        }
        last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(tag: u64, multiple: bool) -> Option<Frame> {
        Some(Frame::Ack { tag, multiple })
    }

    fn runs(max_held: usize, tags: std::ops::RangeInclusive<u64>) -> Runs {
        let mut runs = Runs::new(max_held);
        let now = Instant::now();
        tags.for_each(|t| runs.take(t, now));
        runs
    }

    impl Runs {
        /// Settles right away, while every open delivery is young.
        fn young(&mut self, tag: u64, settle: Settle) -> [Option<Frame>; 2] {
            let now = self.open.front().map_or_else(Instant::now, |o| o.taken);
            let (released, frames) = self.settle(tag, settle, now);
            assert!(released.is_empty(), "nothing waited too long");
            frames
        }

        fn tags(&self) -> Vec<(u64, bool)> {
            self.open.iter().map(|o| (o.tag, o.held)).collect()
        }
    }

    #[test]
    fn in_order_acks_go_out_one_by_one() {
        let mut r = runs(4, 1..=3);
        for tag in 1..=3 {
            assert_eq!(r.young(tag, Settle::Ack), [ack(tag, false), None]);
        }
        assert!(r.open.is_empty());
    }

    #[test]
    fn acks_behind_an_open_delivery_go_out_with_it() {
        let mut r = runs(4, 1..=4);
        assert_eq!(r.young(3, Settle::Ack), [None, None]);
        assert_eq!(r.young(2, Settle::Ack), [None, None]);
        assert_eq!(r.young(1, Settle::Ack), [ack(3, true), None]);
        // 4 is still open: nothing past it was taken along.
        assert_eq!(r.tags(), [(4, false)]);
        assert_eq!(r.held, 0);
    }

    #[test]
    fn a_multiple_ack_never_passes_an_open_delivery() {
        let mut r = runs(4, 1..=5);
        assert_eq!(r.young(2, Settle::Ack), [None, None]);
        assert_eq!(r.young(4, Settle::Ack), [None, None]);
        assert_eq!(r.young(1, Settle::Ack), [ack(2, true), None]);
        assert_eq!(r.young(3, Settle::Ack), [ack(4, true), None]);
        assert_eq!(r.young(5, Settle::Ack), [ack(5, false), None]);
    }

    #[test]
    fn a_dead_letter_goes_out_at_once_and_before_the_acks_it_releases() {
        let mut r = runs(4, 1..=3);
        assert_eq!(r.young(2, Settle::Ack), [None, None]);
        assert_eq!(
            r.young(3, Settle::DeadLetter),
            [Some(Frame::Reject(3)), None]
        );
        assert_eq!(
            r.young(1, Settle::DeadLetter),
            [Some(Frame::Reject(1)), ack(2, true)]
        );
        assert!(r.open.is_empty());
    }

    #[test]
    fn a_requeue_at_the_front_releases_the_held_acks() {
        let mut r = runs(4, 1..=3);
        assert_eq!(r.young(3, Settle::Ack), [None, None]);
        assert_eq!(r.young(1, Settle::Requeue), [Some(Frame::Requeue(1)), None]);
        assert_eq!(r.young(2, Settle::Ack), [ack(3, true), None]);
    }

    #[test]
    fn past_the_bound_acks_go_out_alone() {
        let mut r = runs(1, 1..=3);
        assert_eq!(r.young(2, Settle::Ack), [None, None]);
        assert_eq!(r.young(3, Settle::Ack), [ack(3, false), None]);
        assert_eq!(r.young(1, Settle::Ack), [ack(2, true), None]);
        assert!(r.open.is_empty());
    }

    #[test]
    fn no_bound_means_no_holding_back() {
        let mut r = runs(0, 1..=2);
        assert_eq!(r.young(2, Settle::Ack), [ack(2, false), None]);
        assert_eq!(r.young(1, Settle::Ack), [ack(1, false), None]);
    }

    #[test]
    fn a_tag_never_taken_is_settled_alone() {
        let mut r = runs(4, 1..=2);
        assert_eq!(r.young(9, Settle::Ack), [ack(9, false), None]);
        assert_eq!(r.open.len(), 2);
    }

    #[test]
    fn acks_are_not_held_behind_an_old_delivery() {
        let mut r = runs(4, 1..=3);
        let later = r.open[0].taken + HOLD_BEHIND;
        let (released, frames) = r.settle(2, Settle::Ack, later);
        assert!(released.is_empty());
        assert_eq!(frames, [ack(2, false), None], "sent alone, the slot freed");
        assert_eq!(r.tags(), [(1, false), (3, false)]);
    }

    #[test]
    fn held_acks_go_out_alone_once_the_delivery_they_wait_for_grows_old() {
        let mut r = runs(4, 1..=5);
        assert_eq!(r.young(3, Settle::Ack), [None, None]);
        assert_eq!(r.young(4, Settle::Ack), [None, None]);
        let later = r.open[0].taken + HOLD_BEHIND;
        let (released, frames) = r.settle(5, Settle::Ack, later);
        assert_eq!(released, [3, 4]);
        assert_eq!(frames, [ack(5, false), None]);
        assert_eq!((r.tags(), r.held), (vec![(1, false), (2, false)], 0));
        // The oldest ones still go out as they finish, nothing taken along.
        let (released, frames) = r.settle(1, Settle::Ack, later);
        assert!(released.is_empty());
        assert_eq!(frames, [ack(1, false), None]);
    }

    #[test]
    fn held_acks_are_due_when_the_delivery_they_wait_for_grows_old_without_a_settlement() {
        let mut r = runs(4, 1..=3);
        assert_eq!(r.next_release(), None, "nothing held, no timer");
        assert_eq!(r.young(2, Settle::Ack), [None, None]);
        assert_eq!(r.young(3, Settle::Ack), [None, None]);
        let due = r.open[0].taken + HOLD_BEHIND;
        assert_eq!(r.next_release(), Some(due));
        // The timer wakes early (another delivery's due time): nothing yet.
        let early = due - Duration::from_millis(1);
        assert!(r.release_stale(early).is_empty());
        assert_eq!(r.next_release(), Some(due));
        // Due, with delivery 1 still open and nothing else settled: the
        // held acks go out alone, and no timer is left.
        assert_eq!(r.release_stale(due), [2, 3]);
        assert_eq!((r.tags(), r.held), (vec![(1, false)], 0));
        assert_eq!(r.next_release(), None);
    }

    #[test]
    fn the_next_release_follows_the_oldest_open_delivery() {
        let t0 = Instant::now();
        let mut r = Runs::new(4);
        r.take(1, t0);
        r.take(2, t0 + Duration::from_millis(40));
        r.take(3, t0 + Duration::from_millis(60));
        let (_, frames) = r.settle(3, Settle::Ack, t0 + Duration::from_millis(70));
        assert_eq!(frames, [None, None], "held behind 1");
        assert_eq!(r.next_release(), Some(t0 + HOLD_BEHIND));
        // 1 is requeued: 3 now waits behind 2, which is younger.
        let (_, frames) = r.settle(1, Settle::Requeue, t0 + Duration::from_millis(80));
        assert_eq!(frames, [Some(Frame::Requeue(1)), None]);
        let later = t0 + Duration::from_millis(40) + HOLD_BEHIND;
        assert_eq!(r.next_release(), Some(later));
    }
}
