//! One plan run once on a fresh simulator and fresh queues, and measured.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};

use crate::broker::{Broker, roll_over_quorum_wal};
use crate::env_usize;
use crate::figures::Figures;
use crate::meter::{Meter, rss_of};
use crate::run::Run;
use crate::sampler::InFlightSampler;
use crate::sim::Sim;
use crate::subjects::Who;

/// One complete run: fresh simulator and queues, N commands queued, the
/// subject started, the batch drained and measured, then (optionally) the
/// paced latency phase.
pub struct Plan {
    pub label: &'static str,
    pub prefetch: u16,
    pub latency_ms: u64,
    pub queued: usize,
    /// Stop measuring after this long even if not drained (RSS scenario).
    pub window: Option<Duration>,
    /// `(rate, secs)` of the latency phase.
    pub paced: Option<(u32, u32)>,
    /// The results log (a stream bound to the results exchange) is
    /// declared, as it is by default; without it, the worker runs at
    /// `amqp.results_log_retention = 0`. The baseline publishes to the same
    /// exchange either way.
    pub results_log: bool,
}

pub async fn run_once(broker: &Broker, plan: &Plan, who: Who) -> Result<Figures> {
    roll_over_quorum_wal();
    let sim = Sim::start(plan.latency_ms, 0).await?;
    if plan.latency_ms > 0 {
        sim.set_jitter(env_usize("BENCH_JITTER_MS", 0) as u64)
            .await?;
    }
    let mut run = Run::setup(broker, plan.label, &sim, plan.prefetch, plan.results_log).await?;
    let result = measure(broker, plan, who, &sim, &mut run).await;
    sim.stop().await;
    run.cleanup(broker).await;
    result
}

async fn measure(
    broker: &Broker,
    plan: &Plan,
    who: Who,
    sim: &Sim,
    run: &mut Run,
) -> Result<Figures> {
    run.prepublish(broker, plan.queued).await?;
    let subjects = match who {
        Who::Worker => run.spawn_workers(1, None)?,
        Who::WorkerWarn => run.spawn_workers(1, Some("warn"))?,
        Who::Baseline => vec![run.spawn_baseline(sim, plan.prefetch)?],
    };
    let started = run.consumers_up(broker, 1).await;
    let meter = Meter::new(&subjects, sim);
    let cpu0 = meter.read();
    let sampler = (plan.latency_ms > 0)
        .then(|| InFlightSampler::start(sim.base_url.clone(), Arc::clone(&run.seen)));
    let figures = async {
        let started = started?;
        let limit = plan.window.unwrap_or(Duration::from_secs(600));
        // Drained runs are measured in the steady state: from the arrival of
        // the first prefetch-full of results (every slot has turned over once)
        // to the last result.
        let warmup = if plan.window.is_none() {
            usize::from(plan.prefetch)
        } else {
            0
        };
        let got = run.collect(plan.queued, limit, warmup, &meter).await;
        let cpu1 = meter.read();
        let ((from, cpu_from), commands, to) = match (plan.window, got.warm) {
            (None, Some(warm)) => (warm, got.events - warmup, got.last.unwrap_or(warm.0)),
            (Some(w), _) => ((started, cpu0), got.events, started + w),
            (None, None) => bail!("fewer than {warmup} results arrived"),
        };
        let (cpu_secs, sim_cpu_secs, broker_cpu_secs) = cpu1.since(cpu_from);
        let mut figures = Figures {
            commands,
            failed: got.failed,
            secs: to.duration_since(from).as_secs_f64(),
            cpu_secs,
            sim_cpu_secs,
            broker_cpu_secs,
            rss_kb: rss_of(&subjects),
            first: got.first.map(|f| f.duration_since(started)),
            in_flight: sampler.and_then(|s| s.finish(from, to, plan.prefetch)),
            ..Figures::default()
        };
        if plan.window.is_none() && got.events < plan.queued {
            eprintln!(
                "  warning: only {} of {} events arrived",
                got.events, plan.queued
            );
        }
        if let Some((rate, secs)) = plan.paced {
            let lat = run.paced_latency(broker, rate, secs).await?;
            figures.p50 = lat.p50;
            figures.p99 = lat.p99;
            figures.latency_note = format!("at {} commands/s offered", lat.rate);
            if lat.samples < lat.expected {
                eprintln!(
                    "  warning: latency from {} of {} commands",
                    lat.samples, lat.expected
                );
            }
            figures.rss_kb = rss_of(&subjects);
        }
        Ok::<Figures, anyhow::Error>(figures)
    }
    .await;
    let mut subjects = subjects;
    for s in &mut subjects {
        if s.exited() {
            eprintln!("  warning: a measured process exited during the run");
        }
    }
    for s in subjects {
        s.stop().await;
    }
    figures
}
