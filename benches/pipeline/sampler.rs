//! Requests in flight at the simulator, the figure of the API-latency
//! scenarios.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::sim::ledger_of;

/// The requests in flight at the simulator, sampled every 100 ms during a
/// run: requests it received minus results the observer saw. A slot of the
/// prefetch that holds no request (a command waiting at the gate, an ack
/// held back) shows as a dip.
pub struct InFlightSampler {
    samples: Arc<Mutex<Vec<(Instant, u64)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl InFlightSampler {
    pub fn start(base_url: String, seen: Arc<std::sync::atomic::AtomicUsize>) -> InFlightSampler {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let samples = Arc::clone(&samples);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                loop {
                    tick.tick().await;
                    let Ok(ledger) = ledger_of(&base_url).await else {
                        continue;
                    };
                    let done = seen.load(std::sync::atomic::Ordering::Relaxed) as u64;
                    let in_flight = ledger.requests.saturating_sub(done);
                    samples
                        .lock()
                        .expect("samples")
                        .push((Instant::now(), in_flight));
                }
            })
        };
        InFlightSampler { samples, task }
    }

    /// Mean in flight between `from` and `to`, and the share of samples
    /// with at least 97 % of `prefetch` in flight.
    pub fn finish(self, from: Instant, to: Instant, prefetch: u16) -> Option<(f64, f64)> {
        let samples = self.samples.lock().expect("samples");
        let window: Vec<u64> = samples
            .iter()
            .filter(|(at, _)| *at >= from && *at <= to)
            .map(|(_, n)| *n)
            .collect();
        if window.is_empty() {
            return None;
        }
        let mean = window.iter().sum::<u64>() as f64 / window.len() as f64;
        let full = window
            .iter()
            .filter(|n| **n as f64 >= 0.97 * f64::from(prefetch))
            .count() as f64
            / window.len() as f64;
        Some((mean, full))
    }
}

impl Drop for InFlightSampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}
