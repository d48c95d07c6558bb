//! `lanes`: a checkout behind a bulk import (issue 31).
//!
//! The simulator's write limit scaled up to 500 writes per 10 s (a write
//! interval of 20 ms, so the scenario takes minutes, not hours), instant
//! answers. 2,000 bulk commands are queued, then 60 interactive commands
//! are published one a second, each timed from just before its publish to
//! its event. Three cases, each on a fresh simulator and fresh queues:
//! today's single queue (the interactive commands behind the bulk ones),
//! lanes `interactive:4,bulk:1`, and the same lanes on 3 replicas. On the
//! same processes, each case then times 60 more interactive commands with
//! nothing else queued (the idle baseline the goal is stated against), and
//! fills both lanes at once (300 commands each, alternating) to read from
//! the simulator's ledger the share of the writes each lane got while both
//! waited.

mod traffic;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::broker::Broker;
use crate::report;
use crate::run::{Run, prepublish_to};
use crate::sim::Sim;
use traffic::Event;

/// Writes per 10 s: Hyperline's 50, scaled up tenfold.
const LIMIT: u32 = 500;
const BUDGET_PER_SEC: f64 = LIMIT as f64 / 10.0;
/// The goal: interactive p99 within two write intervals of an idle system.
const GOAL_MS: f64 = 2.0 * 1000.0 / BUDGET_PER_SEC;
const BULK: usize = 2_000;
const INTERACTIVE: usize = 60;
/// Commands per lane in the contended phase.
const CONTENDED: usize = 300;
const LANES: &str = "interactive:4,bulk:1";
const PREFETCH: u16 = 64;

struct Case {
    name: &'static str,
    lanes: bool,
    replicas: usize,
}

const CASES: [Case; 3] = [
    Case {
        name: "one queue",
        lanes: false,
        replicas: 1,
    },
    Case {
        name: "lanes 4:1",
        lanes: true,
        replicas: 1,
    },
    Case {
        name: "lanes 4:1, 3 replicas",
        lanes: true,
        replicas: 3,
    },
];

/// Publish → event latencies, sorted.
struct Latencies(Vec<Duration>);

impl Latencies {
    fn of<'a>(events: impl Iterator<Item = &'a Event>) -> Latencies {
        let mut all: Vec<Duration> = events
            .filter_map(|e| e.published.map(|p| e.at.duration_since(p)))
            .collect();
        all.sort_unstable();
        Latencies(all)
    }

    /// The `q` quantile in ms, interpolated between neighbours (with 60
    /// samples the nearest rank of p99 would be the maximum).
    fn ms(&self, q: f64) -> Option<f64> {
        let last = self.0.len().checked_sub(1)?;
        let at = q * last as f64;
        let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
        let ms = |i: usize| self.0[i].as_secs_f64() * 1e3;
        Some(ms(lo) + (ms(hi) - ms(lo)) * (at - lo as f64))
    }

    fn summary(&self) -> String {
        let f = |v: Option<f64>| v.map_or("—".to_owned(), |v| format!("{v:.0}"));
        format!(
            "{} / {} / {}",
            f(self.ms(0.5)),
            f(self.ms(0.99)),
            f(self.ms(1.0))
        )
    }
}

/// What one case measured.
struct Outcome {
    loaded: Latencies,
    /// The interactive commands published before the bulk backlog drained.
    behind: Latencies,
    idle: Latencies,
    /// Bulk events per second from the first interactive publish until the
    /// bulk backlog drained or the last interactive command was published.
    bulk_rate: f64,
    /// Writes made per write allowed, from the first event to the last bulk one.
    budget_used: f64,
    drained_secs: f64,
    /// Bulk writes made while an interactive command waited: mean, max.
    ahead: (f64, usize),
    /// The interactive share of the contended phase's first `CONTENDED`
    /// writes, and the position of the interactive lane's last write.
    share: Option<(f64, usize)>,
    requests: u64,
    rate_limited: u64,
}

pub async fn run(broker: &Broker) -> Result<Vec<String>> {
    report::heading(&format!(
        "lanes: write limit {LIMIT} per 10 s, instant answers, {BULK} bulk queued then {INTERACTIVE} interactive at 1/s, prefetch {PREFETCH}"
    ));
    let mut outcomes = Vec::with_capacity(CASES.len());
    for case in &CASES {
        println!("  {} ...", case.name);
        outcomes.push(run_case(broker, case).await?);
    }
    print_table(&outcomes);
    let mut summary = Vec::new();
    for (case, o) in CASES.iter().zip(&outcomes) {
        let (Some(loaded), Some(idle)) = (o.loaded.ms(0.99), o.idle.ms(0.99)) else {
            continue;
        };
        summary.push(format!(
            "lanes, {}: interactive p99 {loaded:.0} ms, idle {idle:.0} ms (target ≤ idle + {GOAL_MS:.0} ms): {}; budget used {:.1} % (target ≥ 95 %): {}; 429s {} (target 0): {}",
            case.name,
            report::verdict(loaded <= idle + GOAL_MS),
            o.budget_used * 100.0,
            report::verdict(o.budget_used >= 0.95),
            o.rate_limited,
            report::verdict(o.rate_limited == 0),
        ));
    }
    Ok(summary)
}

async fn run_case(broker: &Broker, case: &Case) -> Result<Outcome> {
    let sim = Sim::start(0, LIMIT).await?;
    let lanes = case.lanes.then_some(LANES);
    let run = Run::setup_lanes(broker, "lanes", &sim, PREFETCH, true, lanes).await;
    let mut run = match run {
        Ok(run) => run,
        Err(e) => {
            sim.stop().await;
            return Err(e);
        }
    };
    let outcome = phases(broker, case, &sim, &mut run).await;
    sim.stop().await;
    run.cleanup(broker).await;
    outcome
}

async fn phases(broker: &Broker, case: &Case, sim: &Sim, run: &mut Run) -> Result<Outcome> {
    let (interactive_q, bulk_q) = if case.lanes {
        let lane = |name| run.lane_queue(name).map(str::to_owned);
        (
            lane("interactive").context("no interactive lane")?,
            lane("bulk").context("no bulk lane")?,
        )
    } else {
        (run.queue.clone(), run.queue.clone())
    };
    prepublish_to(broker, &bulk_q, BULK).await?;
    let subjects = run.spawn_workers(case.replicas, None)?;
    let measured = async {
        let replicas = u32::try_from(case.replicas)?;
        run.consumers_on(broker, &interactive_q, replicas).await?;
        run.consumers_on(broker, &bulk_q, replicas).await?;
        let loaded = traffic::paced(run, broker, &interactive_q, INTERACTIVE, BULK).await?;
        let idle = traffic::paced(run, broker, &interactive_q, INTERACTIVE, 0).await?;
        let before = sim.charges().await?.charges.len();
        let ids = traffic::contended(run, broker, &interactive_q, &bulk_q, CONTENDED).await?;
        let ledger = sim.charges().await?;
        let contended: Vec<bool> = ledger.charges[before.min(ledger.charges.len())..]
            .iter()
            .map(|c| c.idempotency_key.as_ref().is_some_and(|k| ids.contains(k)))
            .collect();
        Ok::<_, anyhow::Error>(figures(
            &loaded,
            &idle,
            &contended,
            ledger.requests,
            ledger.rate_limited,
        ))
    }
    .await;
    let mut subjects = subjects;
    for s in &mut subjects {
        if s.exited() {
            eprintln!("  warning: a worker exited during the run");
        }
    }
    for s in subjects {
        s.stop().await;
    }
    measured
}

fn figures(
    loaded: &[Event],
    idle: &[Event],
    contended: &[bool],
    requests: u64,
    rate_limited: u64,
) -> Outcome {
    let bulk = || loaded.iter().filter(|e| e.published.is_none());
    let first = loaded.iter().map(|e| e.at).min();
    let drained = bulk().map(|e| e.at).max();
    let publishes: Vec<Instant> = loaded.iter().filter_map(|e| e.published).collect();
    let (mut bulk_rate, mut budget_used, mut drained_secs) = (0.0, 0.0, 0.0);
    if let (Some(first), Some(drained)) = (first, drained) {
        let secs = drained.duration_since(first).as_secs_f64();
        let writes = loaded.iter().filter(|e| e.at <= drained).count();
        if secs > 0.0 {
            budget_used = (writes - 1) as f64 / (BUDGET_PER_SEC * secs);
        }
        drained_secs = secs;
        if let (Some(from), Some(last)) = (publishes.iter().min(), publishes.iter().max()) {
            let to = drained.min(*last);
            let both = to.saturating_duration_since(*from).as_secs_f64();
            let n = bulk().filter(|e| e.at >= *from && e.at <= to).count();
            if both > 0.0 {
                bulk_rate = n as f64 / both;
            }
        }
    }
    let ahead: Vec<usize> = loaded
        .iter()
        .filter_map(|e| e.published.map(|p| (p, e.at)))
        .map(|(p, done)| bulk().filter(|b| b.at > p && b.at < done).count())
        .collect();
    let mean_ahead = ahead.iter().sum::<usize>() as f64 / ahead.len().max(1) as f64;
    let window = contended.len().min(CONTENDED);
    let share = (window > 0).then(|| {
        let interactive = contended[..window].iter().filter(|i| **i).count();
        let last = contended.iter().rposition(|i| *i).map_or(0, |p| p + 1);
        (interactive as f64 / window as f64, last)
    });
    Outcome {
        loaded: Latencies::of(loaded.iter()),
        behind: Latencies::of(
            loaded
                .iter()
                .filter(|e| drained.zip(e.published).is_some_and(|(d, p)| p < d)),
        ),
        idle: Latencies::of(idle.iter()),
        bulk_rate,
        budget_used,
        drained_secs,
        ahead: (mean_ahead, ahead.iter().copied().max().unwrap_or(0)),
        share,
        requests,
        rate_limited,
    }
}

fn print_table(outcomes: &[Outcome]) {
    let line = |name: &str, cells: Vec<String>| {
        let cells: Vec<String> = cells.iter().map(|c| format!("{c:>24}")).collect();
        println!("| {name:<52} | {} |", cells.join(" | "));
    };
    line("", CASES.iter().map(|c| c.name.to_owned()).collect());
    println!(
        "|{:-<54}|{}",
        "",
        "-------------------------:|".repeat(CASES.len())
    );
    let row = |name: &str, cell: &dyn Fn(&Outcome) -> String| {
        line(name, outcomes.iter().map(cell).collect());
    };
    row("interactive p50 / p99 / max, ms (60, behind bulk)", &|o| {
        o.loaded.summary()
    });
    row("  of them published before the bulk drained", &|o| {
        format!("{}: {}", o.behind.0.len(), o.behind.summary())
    });
    row("idle baseline p50 / p99 / max, ms (60)", &|o| {
        o.idle.summary()
    });
    row("bulk writes made while one waited (mean / max)", &|o| {
        format!("{:.1} / {}", o.ahead.0, o.ahead.1)
    });
    row("bulk events/s while both ran", &|o| {
        format!("{:.1}", o.bulk_rate)
    });
    row("bulk backlog drained after (s)", &|o| {
        format!("{:.1}", o.drained_secs)
    });
    row("budget used until then (of 50/s)", &|o| {
        format!("{:.1} %", o.budget_used * 100.0)
    });
    row("429s / requests (all phases)", &|o| {
        format!("{} / {}", o.rate_limited, o.requests)
    });
    row(
        "contended: interactive share of the first 300 writes",
        &|o| {
            o.share.map_or("—".to_owned(), |(s, last)| {
                format!("{:.1} % (last at {last})", s * 100.0)
            })
        },
    );
}
