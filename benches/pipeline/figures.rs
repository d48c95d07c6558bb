//! What a run measured, and the median of several runs.

use std::time::Duration;

/// What one run of one subject measured.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    pub commands: usize,
    pub failed: usize,
    pub secs: f64,
    pub cpu_secs: f64,
    /// The simulator's and the broker's CPU over the same window.
    pub sim_cpu_secs: f64,
    pub broker_cpu_secs: f64,
    pub rss_kb: u64,
    /// From the consumer's registration to the first result.
    pub first: Option<Duration>,
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
    pub latency_note: String,
    /// Mean requests in flight, and the share of the time the prefetch was
    /// nearly all in flight (API-latency scenarios).
    pub in_flight: Option<(f64, f64)>,
}

impl Figures {
    pub fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.commands as f64 / self.secs
        } else {
            0.0
        }
    }
    pub fn cpu_per_1000(&self) -> f64 {
        self.per_1000(self.cpu_secs)
    }
    pub fn per_1000(&self, secs: f64) -> f64 {
        if self.commands > 0 {
            secs * 1000.0 / self.commands as f64
        } else {
            0.0
        }
    }
}

/// The median of each figure over the runs (each figure on its own).
pub fn median(runs: &[Figures]) -> Figures {
    let med = |f: &dyn Fn(&Figures) -> Option<f64>| -> Option<f64> {
        let mut v: Vec<f64> = runs.iter().filter_map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
    // Rebuilt so that the derived rate and CPU per 1,000 are the medians.
    let commands = runs.first().map_or(1, |f| f.commands.max(1));
    let rate = med(&|f| Some(f.rate())).unwrap_or(0.0);
    let cpu = med(&|f| Some(f.cpu_per_1000())).unwrap_or(0.0);
    let sim = med(&|f| Some(f.per_1000(f.sim_cpu_secs))).unwrap_or(0.0);
    let broker = med(&|f| Some(f.per_1000(f.broker_cpu_secs))).unwrap_or(0.0);
    Figures {
        commands,
        failed: runs.iter().map(|f| f.failed).sum(),
        secs: if rate > 0.0 {
            commands as f64 / rate
        } else {
            0.0
        },
        cpu_secs: cpu * commands as f64 / 1000.0,
        sim_cpu_secs: sim * commands as f64 / 1000.0,
        broker_cpu_secs: broker * commands as f64 / 1000.0,
        rss_kb: med(&|f| Some(f.rss_kb as f64)).unwrap_or(0.0) as u64,
        first: med(&|f| secs(f.first)).map(Duration::from_secs_f64),
        p50: med(&|f| secs(f.p50)).map(Duration::from_secs_f64),
        p99: med(&|f| secs(f.p99)).map(Duration::from_secs_f64),
        latency_note: runs
            .first()
            .map(|f| f.latency_note.clone())
            .unwrap_or_default(),
        in_flight: med(&|f| f.in_flight.map(|(mean, _)| mean))
            .zip(med(&|f| f.in_flight.map(|(_, full)| full))),
    }
}
