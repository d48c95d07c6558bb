//! `rate-limit`: replicas sharing the API's write limit.

use std::time::{Duration, Instant};

use anyhow::Result;

use crate::broker::Broker;
use crate::meter::Meter;
use crate::report;
use crate::run::Run;
use crate::sim::Sim;

/// Three replicas sharing the simulator's real write limit, 50 per 10 s.
pub async fn run(broker: &Broker) -> Result<Vec<String>> {
    const WINDOW: Duration = Duration::from_secs(60);
    const REPLICAS: usize = 3;
    const QUEUED: usize = 400;
    report::heading(
        "rate-limit: 50 writes per 10 s (5/s), 3 replicas, prefetch 64 each, 60 s window",
    );
    let sim = Sim::start(0, 50).await?;
    let mut run = Run::setup(broker, "rate-limit", &sim, 64, true).await?;
    let outcome = async {
        run.prepublish(broker, QUEUED).await?;
        let subjects = run.spawn_workers(REPLICAS, None)?;
        let started = run.consumers_up(broker, 1).await;
        let meter = Meter::new(&subjects, &sim);
        let cpu0 = meter.read();
        let measured = async {
            let started = started?;
            let got = run.collect(QUEUED, WINDOW, 0, &meter).await;
            let ledger = sim.ledger().await?;
            let (cpu, _, _) = meter.read().since(cpu0);
            let late = Instant::now().duration_since(started + WINDOW);
            Ok::<_, anyhow::Error>((got, ledger, cpu, late))
        }
        .await;
        for s in subjects {
            s.stop().await;
        }
        measured
    }
    .await;
    sim.stop().await;
    run.cleanup(broker).await;
    let (got, ledger, cpu, late) = outcome?;
    let rate = got.events as f64 / WINDOW.as_secs_f64();
    let share = if ledger.requests > 0 {
        ledger.rate_limited as f64 / ledger.requests as f64
    } else {
        0.0
    };
    println!("| {:<36} | {:>10} |", "", "3 replicas");
    println!("|{:-<38}|{:->12}|", "", "");
    println!(
        "| {:<36} | {:>10} |",
        "results in the 60 s window", got.events
    );
    println!("| {:<36} | {:>10.2} |", "achieved commands/s", rate);
    println!(
        "| {:<36} | {:>9.1}% |",
        "of the allowed 5/s",
        rate / 5.0 * 100.0
    );
    println!(
        "| {:<36} | {:>10} |",
        "requests to the API", ledger.requests
    );
    println!("| {:<36} | {:>10} |", "answered 429", ledger.rate_limited);
    println!("| {:<36} | {:>9.2}% |", "share answered 429", share * 100.0);
    println!("| {:<36} | {:>10.3} |", "CPU-s of the 3 replicas", cpu);
    if got.failed > 0 {
        println!("note: {} failed events", got.failed);
    }
    if late > Duration::from_millis(500) {
        println!("note: ledger read {late:?} after the window closed");
    }
    Ok(vec![
        format!(
            "rate-limit: {:.2}/s = {:.1} % of the allowed 5/s (target ≥ 95 %): {}",
            rate,
            rate / 5.0 * 100.0,
            report::verdict(rate >= 4.75)
        ),
        format!(
            "rate-limit: {:.2} % of requests answered 429 (target < 1 %): {}",
            share * 100.0,
            report::verdict(share < 0.01)
        ),
    ])
}
