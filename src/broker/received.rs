//! Deliveries taken from the consuming channel and settled on it: the frames
//! that [`settlement`](super::settlement) decides, put on the wire in the
//! order they were decided, and a timer that sends held acks once the
//! delivery they wait for has grown old.
//!
//! Without the timer, held acks went out only at the next settlement of the
//! channel: behind one slow command, with nothing else finishing, they kept
//! their prefetch slots (and their commands unacked, redelivered if the
//! replica died) for as long as the slow one ran.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use futures_util::FutureExt;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use tokio::sync::Notify;

use super::settlement::{Frame, Runs, Settle};

/// The settlements of one consuming channel. One per channel: delivery tags
/// are the channel's own.
pub struct Settlements {
    channel: Channel,
    runs: Mutex<Runs>,
    /// Wakes the release timer when acks start being held, and when the
    /// settlements go (the timer then ends).
    holding: Arc<Notify>,
}

impl Settlements {
    /// At most a quarter of the prefetch is held back, so a command that
    /// retries for minutes keeps three quarters of the replica working.
    /// Starts the release timer, which ends with the settlements.
    pub fn new(channel: Channel, prefetch: u16) -> Arc<Settlements> {
        let holding = Arc::new(Notify::new());
        let settlements = Arc::new(Settlements {
            channel,
            runs: Mutex::new(Runs::new(usize::from(prefetch / 4))),
            holding: Arc::clone(&holding),
        });
        tokio::spawn(release_held(Arc::downgrade(&settlements), holding));
        settlements
    }

    /// Registers a delivery of the lane at index `lane` of the topology as
    /// open; every delivery of the channel must come through here, in the
    /// order they arrive.
    pub fn take(self: &Arc<Self>, delivery: Delivery, lane: usize) -> Received {
        self.lock().take(delivery.delivery_tag, Instant::now());
        Received {
            delivery,
            lane,
            settlements: Arc::clone(self),
            settled: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Runs> {
        // Each update is complete under the lock, so a panic elsewhere
        // cannot leave the runs inconsistent.
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decides and queues the frames under the lock, so they reach the wire
    /// in the order they were decided.
    fn settle(&self, tag: u64, settle: Settle) -> Result<(), lapin::Error> {
        let mut runs = self.lock();
        let was_holding = runs.holding();
        let (released, frames) = runs.settle(tag, settle, Instant::now());
        if !was_holding && runs.holding() {
            // Only when holding starts: a timer already armed wakes at the
            // oldest delivery's due time, which a settlement only delays.
            self.holding.notify_one();
        }
        let released = released.into_iter().map(single_ack);
        // Every frame is sent, also after one fails.
        let mut result = Ok(());
        for frame in released.chain(frames.into_iter().flatten()) {
            result = result.and(self.send(frame));
        }
        result
    }

    /// Sends the held acks that are due by `now`, each alone; when the next
    /// ones will be.
    fn release(&self, now: Instant) -> Option<Instant> {
        let mut runs = self.lock();
        for tag in runs.release_stale(now) {
            // A channel gone takes the deliveries with it: the broker
            // redelivers them, which is safe.
            let _ = self.send(single_ack(tag));
        }
        runs.next_release()
    }

    fn send(&self, frame: Frame) -> lapin::Result<()> {
        match frame {
            Frame::Ack { tag, multiple } => {
                hand_over(self.channel.basic_ack(tag, BasicAckOptions { multiple }))
            }
            Frame::Reject(tag) => hand_over(
                self.channel
                    .basic_reject(tag, BasicRejectOptions { requeue: false }),
            ),
            Frame::Requeue(tag) => {
                let requeue = BasicNackOptions {
                    requeue: true,
                    multiple: false,
                };
                hand_over(self.channel.basic_nack(tag, requeue))
            }
        }
    }
}

impl Drop for Settlements {
    fn drop(&mut self) {
        self.holding.notify_one();
    }
}

fn single_ack(tag: u64) -> Frame {
    Frame::Ack {
        tag,
        multiple: false,
    }
}

/// The release timer of one channel's settlements: sleeps until held acks
/// are due (or until some are held), sends them, and ends when the
/// settlements are dropped. It holds them only while it sends.
async fn release_held(settlements: Weak<Settlements>, holding: Arc<Notify>) {
    let mut due = None;
    loop {
        match due {
            Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
            None => holding.notified().await,
        }
        let Some(settlements) = settlements.upgrade() else {
            return;
        };
        due = settlements.release(Instant::now());
    }
}

/// Queues a settlement frame without waiting for lapin to write it. AMQP
/// gives a settlement no answer, so the write proves nothing more (a written
/// ack can still die with the connection, and the broker then redelivers,
/// which is safe), and waiting for it cost a cross-thread wake-up per
/// command. lapin checks the channel and queues the frame on the first poll;
/// only the wait for the write is dropped.
fn hand_over(settlement: impl Future<Output = lapin::Result<()>>) -> lapin::Result<()> {
    settlement.now_or_never().unwrap_or(Ok(()))
}

/// A delivery taken from the consuming channel, settled exactly once.
pub struct Received {
    delivery: Delivery,
    /// The index of its lane in the topology: where its copies go back to.
    pub lane: usize,
    settlements: Arc<Settlements>,
    settled: AtomicBool,
}

impl Received {
    /// Settles the delivery. An `Err` means the channel is gone: the broker
    /// will redeliver. An ack may be held back for a moment (see
    /// [`settlement`](super::settlement)).
    pub fn settle(&self, settle: Settle) -> Result<(), lapin::Error> {
        if self.settled.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.settlements.settle(self.delivery.delivery_tag, settle)
    }
}

impl Drop for Received {
    fn drop(&mut self) {
        if !*self.settled.get_mut() {
            let tag = self.delivery.delivery_tag;
            let _ = self.settlements.settle(tag, Settle::Requeue);
        }
    }
}

impl std::ops::Deref for Received {
    type Target = Delivery;

    fn deref(&self) -> &Delivery {
        &self.delivery
    }
}
