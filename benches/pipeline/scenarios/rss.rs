//! `rss`: the memory of 1,000 commands in flight.

use std::time::Duration;

use anyhow::Result;

use crate::broker::Broker;
use crate::env_usize;
use crate::measure::{Plan, run_once};
use crate::report;
use crate::subjects::Who;

/// 100,000 commands queued, 1,000 in flight (prefetch 1000, 2 s API).
pub async fn run(broker: &Broker) -> Result<Vec<String>> {
    let plan = Plan {
        label: "rss",
        prefetch: 1000,
        latency_ms: 2_000,
        queued: 100_000,
        window: Some(Duration::from_secs(env_usize("BENCH_RSS_SECS", 20) as u64)),
        paced: None,
        results_log: true,
    };
    report::heading(&format!(
        "rss: 100,000 commands queued, prefetch 1000 (1,000 in flight), API latency 2 s, {} s",
        plan.window.unwrap_or_default().as_secs()
    ));
    let w = run_once(broker, &plan, Who::Worker).await?;
    let b = run_once(broker, &plan, Who::Baseline).await?;
    report::compare(&w, &b);
    let mb = w.rss_kb as f64 / 1024.0;
    Ok(vec![format!(
        "rss: peak RSS {mb:.1} MB with 1,000 in flight (target < 50 MB): {}",
        report::verdict(mb < 50.0)
    )])
}
