//! CPU and memory of the measured processes, the simulator and the broker.

use crate::procfs;
use crate::sim::Sim;
use crate::subjects::Subject;

/// CPU ticks so far of the measured processes, the simulator and the broker.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ticks {
    subjects: u64,
    sim: u64,
    broker: u64,
}

impl Ticks {
    /// CPU-seconds spent since `earlier`, per source.
    pub fn since(self, earlier: Ticks) -> (f64, f64, f64) {
        let secs = |now: u64, then: u64| now.saturating_sub(then) as f64 / procfs::clk_tck();
        (
            secs(self.subjects, earlier.subjects),
            secs(self.sim, earlier.sim),
            secs(self.broker, earlier.broker),
        )
    }
}

/// Reads [`Ticks`].
pub struct Meter {
    subjects: Vec<u32>,
    sim: u32,
    broker: Option<u32>,
}

impl Meter {
    pub fn new(subjects: &[Subject], sim: &Sim) -> Meter {
        Meter {
            subjects: subjects.iter().map(|s| s.pid).collect(),
            sim: sim.child.id().unwrap_or(0),
            broker: procfs::broker_pid(),
        }
    }

    pub fn read(&self) -> Ticks {
        Ticks {
            subjects: self.subjects.iter().map(|p| procfs::cpu_ticks(*p)).sum(),
            sim: procfs::cpu_ticks(self.sim),
            broker: self.broker.map_or(0, procfs::cpu_ticks),
        }
    }
}

pub fn rss_of(subjects: &[Subject]) -> u64 {
    subjects
        .iter()
        .map(|s| procfs::vm_hwm_kb(s.pid))
        .max()
        .unwrap_or(0)
}
