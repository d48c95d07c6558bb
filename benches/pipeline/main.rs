//! End to end: commands through the real worker (the release binary, as a
//! process) against the local RabbitMQ and the Hyperline simulator (also a
//! process), next to a baseline, the minimal honest loop written here with
//! lapin and reqwest (consume → one POST → publish with a confirm → ack),
//! run as a child process of this bench under the same conditions.
//!
//! ```text
//! cargo bench --bench pipeline                      # every scenario
//! cargo bench --bench pipeline -- instant-64 rss    # some of them
//! BENCH_N=20000 BENCH_REPEAT=3 cargo bench --bench pipeline -- instant-64
//! ```
//!
//! Scenarios: `instant-64`, `instant-256`, `latency-2s`, `rate-limit`, `rss`,
//! `lanes` (issue 31: interactive commands published behind a bulk backlog
//! under a write limit scaled up to 500 per 10 s, on one queue, on lanes
//! `interactive:4,bulk:1`, and on lanes with 3 replicas; about 7 min).
//! Environment: `BENCH_N` (commands per instant-API run, default 100000),
//! `BENCH_REPEAT` (runs of each instant-API scenario and of `latency-2s`,
//! default 5; the median is reported), `BENCH_REPEAT_NO_LOG` (runs of
//! `instant-64` without the results log, for the worker and the baseline
//! alike, default 3), `BENCH_LOG` (the worker's
//! `RUST_LOG`; by default none, so the worker logs at its configured
//! `log.level`, info, as operators run it; the instant scenarios also run it
//! at warn, to show what logs cost),
//! `BENCH_JITTER_MS` (latency scenarios: answers take the latency plus up to
//! this much, uniformly; default 0),
//! `BENCH_RSS_SECS` (length of the `rss` run, default 20), `BENCH_LOGS`
//! (the folder of the subjects' log files, default `target/cpw-bench`),
//! `CPW_TEST_AMQP_URL` (the broker, as for the tests), `BENCH_WRAP` (a
//! command the worker runs under, e.g. `heaptrack` or `perf record -g --`:
//! for profiling, not for figures).
//!
//! What is measured, for the worker and the baseline alike:
//! - commands/s: N pre-published commands, timed in the steady state, from
//!   the arrival of the first prefetch-full of result events at an observer
//!   queue bound to the results exchange to the arrival of the last one
//!   (windowed scenarios count the events in the window instead);
//! - CPU-seconds per 1,000 commands: the process's utime + stime
//!   (`/proc/<pid>/stat`) over that same window;
//! - peak RSS: `VmHWM` of `/proc/<pid>/status` at the end of the run;
//! - p50/p99 publish → event: in a second phase on the same processes,
//!   commands published at a fixed rate, each timed from just before its
//!   `basic.publish` to its event's arrival at the observer (matched by
//!   `correlation_id` = `command_id`).
//!
//! Figures are printed, never asserted: the process exits non-zero only when
//! the setup fails (no broker, a process that does not start...). Every queue
//! and exchange it creates is named `cpw-bench-*` and deleted afterwards.
//!
//! One module per scenario under `scenarios/`; what they share: `run` (one
//! run's topology, observer and subjects), `measure` (a plan run once and
//! measured), `meter` and `sampler` (CPU, memory, requests in flight),
//! `figures` (what a run measured, and the median of runs), `report` (the
//! tables), `baseline` (the loop the worker is compared with).

mod baseline;
mod broker;
mod figures;
mod machine;
mod measure;
mod meter;
mod paced;
mod procfs;
mod report;
mod run;
mod sampler;
mod scenarios;
mod sim;
mod subjects;

use std::process::ExitCode;

use anyhow::{Result, bail};

use broker::{Broker, sweep_leftovers};

const WORKER_BIN: &str = env!("CARGO_BIN_EXE_credit-purchase-worker");
const SIM_KEY: &str = "sim_test_key";
const PREFIX: &str = "cpw-bench-";
const BASELINE_CHILD: &str = "--baseline-child";
const SCENARIOS: [&str; 6] = [
    "instant-64",
    "instant-256",
    "latency-2s",
    "rate-limit",
    "rss",
    "lanes",
];

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = if args.first().map(String::as_str) == Some(BASELINE_CHILD) {
        runtime.block_on(baseline::run())
    } else {
        runtime.block_on(bench(args))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("benchmark setup failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn bench(args: Vec<String>) -> Result<()> {
    // `cargo bench` passes `--bench`; anything else is a scenario name.
    let wanted: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with('-'))
        .collect();
    for w in &wanted {
        if !SCENARIOS.contains(w) {
            bail!("unknown scenario `{w}`; known: {}", SCENARIOS.join(", "));
        }
    }
    let selected: Vec<&str> = SCENARIOS
        .into_iter()
        .filter(|s| wanted.is_empty() || wanted.contains(s))
        .collect();

    let broker = Broker::connect().await?;
    sweep_leftovers(&broker).await;
    machine::print();
    let mut summary = Vec::new();
    for scenario in selected {
        let lines = match scenario {
            "instant-64" => scenarios::instant::run(&broker, 64).await?,
            "instant-256" => scenarios::instant::run(&broker, 256).await?,
            "latency-2s" => scenarios::latency::run(&broker).await?,
            "rate-limit" => scenarios::rate_limit::run(&broker).await?,
            "rss" => scenarios::rss::run(&broker).await?,
            "lanes" => scenarios::lanes::run(&broker).await?,
            _ => unreachable!("checked above"),
        };
        summary.extend(lines);
    }
    println!("\n== Summary (targets of the performance issue) ==");
    for line in summary {
        println!("{line}");
    }
    Ok(())
}
