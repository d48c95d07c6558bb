//! Tables and ratios.

use std::time::Duration;

use crate::figures::Figures;

fn ms(d: Option<Duration>) -> String {
    d.map_or("—".into(), |d| format!("{:.1}", d.as_secs_f64() * 1000.0))
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "—".into()
    }
}

pub fn heading(title: &str) {
    println!("\n== {title} ==");
}

/// Worker next to baseline, with the ratio worker / baseline.
pub fn compare(worker: &Figures, baseline: &Figures) {
    println!(
        "| {:<30} | {:>10} | {:>10} | {:>8} |",
        "", "worker", "baseline", "ratio"
    );
    println!("|{:-<32}|{:->12}|{:->12}|{:->10}|", "", "", "", "");
    let row = |name: &str, w: f64, b: f64, fmt: &dyn Fn(f64) -> String| {
        println!(
            "| {:<30} | {:>10} | {:>10} | {:>8} |",
            name,
            fmt(w),
            fmt(b),
            ratio(w, b)
        );
    };
    row("commands/s", worker.rate(), baseline.rate(), &|v| {
        format!("{v:.0}")
    });
    row(
        "CPU-s per 1,000 commands",
        worker.cpu_per_1000(),
        baseline.cpu_per_1000(),
        &|v| format!("{v:.4}"),
    );
    row(
        "broker CPU-s per 1,000",
        worker.per_1000(worker.broker_cpu_secs),
        baseline.per_1000(baseline.broker_cpu_secs),
        &|v| format!("{v:.4}"),
    );
    row(
        "simulator CPU-s per 1,000",
        worker.per_1000(worker.sim_cpu_secs),
        baseline.per_1000(baseline.sim_cpu_secs),
        &|v| format!("{v:.4}"),
    );
    row(
        "peak RSS (MB)",
        worker.rss_kb as f64 / 1024.0,
        baseline.rss_kb as f64 / 1024.0,
        &|v| format!("{v:.1}"),
    );
    let lat = |d: Option<Duration>| d.map_or(0.0, |d| d.as_secs_f64());
    println!(
        "| {:<30} | {:>10} | {:>10} | {:>8} |",
        "first result after (ms)",
        ms(worker.first),
        ms(baseline.first),
        ratio(lat(worker.first), lat(baseline.first))
    );
    if worker.p50.is_some() || baseline.p50.is_some() {
        println!(
            "| {:<30} | {:>10} | {:>10} | {:>8} |",
            "p50 publish→event (ms)",
            ms(worker.p50),
            ms(baseline.p50),
            ratio(lat(worker.p50), lat(baseline.p50))
        );
        println!(
            "| {:<30} | {:>10} | {:>10} | {:>8} |",
            "p99 publish→event (ms)",
            ms(worker.p99),
            ms(baseline.p99),
            ratio(lat(worker.p99), lat(baseline.p99))
        );
        println!("(latencies {})", worker.latency_note);
    }
    if worker.failed + baseline.failed > 0 {
        println!(
            "note: failed events: worker {}, baseline {}",
            worker.failed, baseline.failed
        );
    }
}

pub fn runs(label: &str, runs: &[Figures]) {
    let text: Vec<String> = runs
        .iter()
        .map(|f| {
            let p99 = f
                .p99
                .map(|d| format!(" p99 {:.1} ms", d.as_secs_f64() * 1e3))
                .unwrap_or_default();
            format!("{:.0}/s {:.4} CPU-s{p99}", f.rate(), f.cpu_per_1000())
        })
        .collect();
    println!("  {label} runs: {}", text.join("; "));
}

pub fn verdict(ok: bool) -> &'static str {
    if ok { "MET" } else { "NOT MET" }
}
