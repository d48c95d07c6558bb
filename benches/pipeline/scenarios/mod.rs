//! The scenarios, one module each, and how the repeated ones interleave
//! their subjects.

pub mod instant;
pub mod lanes;
pub mod latency;
pub mod rate_limit;
pub mod rss;

use anyhow::Result;

use crate::broker::Broker;
use crate::figures::Figures;
use crate::measure::{Plan, run_once};
use crate::subjects::Who;

/// `repeat` runs of each subject, the runs of each in the order given;
/// who goes first rotates, so a drifting machine favours none.
async fn alternating<const N: usize>(
    broker: &Broker,
    plan: &Plan,
    subjects: [Who; N],
    repeat: usize,
) -> Result<[Vec<Figures>; N]> {
    let mut runs: [Vec<Figures>; N] = std::array::from_fn(|_| Vec::new());
    for i in 0..repeat {
        for k in 0..N {
            let at = (i + k) % N;
            runs[at].push(run_once(broker, plan, subjects[at]).await?);
        }
    }
    Ok(runs)
}
