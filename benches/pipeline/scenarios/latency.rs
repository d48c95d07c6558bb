//! `latency-2s`: an API that takes 2 s per purchase.

use anyhow::Result;

use super::alternating;
use crate::broker::Broker;
use crate::env_usize;
use crate::figures::median;
use crate::measure::Plan;
use crate::report;
use crate::subjects::Who;

/// Hyperline taking 2 s per purchase, prefetch 256: the ceiling is 128/s.
pub async fn run(broker: &Broker) -> Result<Vec<String>> {
    let plan = Plan {
        label: "latency-2s",
        prefetch: 256,
        latency_ms: 2_000,
        queued: 256 * 15,
        window: None,
        paced: Some((100, 10)),
        results_log: true,
    };
    // With `BENCH_JITTER_MS`, answers take 2 s to 2 s + jitter, and the
    // ceiling is the prefetch over their mean.
    let jitter = env_usize("BENCH_JITTER_MS", 0) as f64;
    let ceiling = 256.0 / ((2_000.0 + jitter / 2.0) / 1_000.0);
    let repeat = env_usize("BENCH_REPEAT", 5);
    report::heading(&format!(
        "latency-2s: API latency 2 s (+ up to {jitter:.0} ms), prefetch 256, 3,840 commands queued, ceiling {ceiling:.1}/s, median of {repeat}"
    ));
    // As many alternating runs as the instant scenarios: with one run
    // each, one slow stretch of the machine decided the figure (95.4 % in
    // a full run, 99.3 % for the same code run alone right after).
    let [workers, baselines] =
        alternating(broker, &plan, [Who::Worker, Who::Baseline], repeat).await?;
    report::runs("worker", &workers);
    report::runs("baseline", &baselines);
    let (w, b) = (median(&workers), median(&baselines));
    report::compare(&w, &b);
    for (who, f) in [("worker", &w), ("baseline", &b)] {
        if let Some((mean, full)) = f.in_flight {
            println!(
                "{who}: {mean:.1} requests in flight on average (of 256), at least 97 % in flight {:.0} % of the time",
                full * 100.0
            );
        }
    }
    let share = w.rate() / ceiling;
    println!(
        "worker: {:.1} commands/s = {:.1} % of the {ceiling:.1}/s ceiling (baseline {:.1} %)",
        w.rate(),
        share * 100.0,
        b.rate() / ceiling * 100.0
    );
    Ok(vec![format!(
        "latency-2s: {:.1} commands/s = {:.1} % of {ceiling:.1}/s (target ≥ 97 %): {}",
        w.rate(),
        share * 100.0,
        report::verdict(share >= 0.97)
    )])
}
