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
//! Scenarios: `instant-64`, `instant-256`, `latency-2s`, `rate-limit`, `rss`.
//! Environment: `BENCH_N` (commands per instant-API run, default 100000),
//! `BENCH_REPEAT` (runs of each instant-API scenario and of `latency-2s`,
//! default 5; the median is reported), `BENCH_LOG` (the worker's
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

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cpw_testkit::broker::{
    AMQP_URL_VAR, Observer, amqp_url, as_command, delete_topology, rabbitmqctl, send, worker_env,
};
use cpw_testkit::commands::{command, command_id};
use credit_purchase_worker::broker::Topology;
use credit_purchase_worker::configuration::Settings;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

const WORKER_BIN: &str = env!("CARGO_BIN_EXE_credit-purchase-worker");
const SIM_KEY: &str = "sim_test_key";
const PREFIX: &str = "cpw-bench-";
const BASELINE_CHILD: &str = "--baseline-child";
const SCENARIOS: [&str; 5] = [
    "instant-64",
    "instant-256",
    "latency-2s",
    "rate-limit",
    "rss",
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
            "instant-64" => scenarios::instant(&broker, 64).await?,
            "instant-256" => scenarios::instant(&broker, 256).await?,
            "latency-2s" => scenarios::slow_api(&broker).await?,
            "rate-limit" => scenarios::rate_limited(&broker).await?,
            "rss" => scenarios::in_flight_rss(&broker).await?,
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

/// The bench's own connection: declarations, publishing, observing, cleanup.
struct Broker {
    connection: Connection,
    channel: Channel,
}

impl Broker {
    async fn connect() -> Result<Broker> {
        let connection = cpw_testkit::broker::connect("cpw-bench-driver")
            .await
            .with_context(|| format!("cannot reach RabbitMQ (set {AMQP_URL_VAR})"))?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Broker {
            connection,
            channel,
        })
    }
}

/// Deletes `cpw-bench-*` queues and exchanges an interrupted run left behind
/// (best effort: needs `rabbitmqctl`).
async fn sweep_leftovers(broker: &Broker) {
    let list = |what: &str| -> Vec<String> {
        rabbitmqctl()
            .args([what, "name"])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(str::trim)
                    .filter(|l| l.starts_with(PREFIX))
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    let Ok(ch) = broker.connection.create_channel().await else {
        return;
    };
    for q in list("list_queues") {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for x in list("list_exchanges") {
        let _ = ch
            .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = ch.close(200, "swept".into()).await;
}

mod machine {
    pub fn print() {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let rabbit = cpw_testkit::broker::rabbitmqctl()
            .arg("version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "unknown".into());
        println!("machine: {cores} cores, {cpu}; RabbitMQ {rabbit}");
        println!(
            "worker: {} (separate process); simulator: separate process",
            super::WORKER_BIN
        );
    }
}

/// `/proc` readings of a child process.
mod procfs {
    use std::sync::OnceLock;

    /// Clock ticks per second of `utime`/`stime`.
    pub fn clk_tck() -> f64 {
        static TCK: OnceLock<f64> = OnceLock::new();
        *TCK.get_or_init(|| {
            std::process::Command::new("getconf")
                .arg("CLK_TCK")
                .output()
                .ok()
                .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
                .unwrap_or(100.0)
        })
    }

    /// utime + stime of the whole process (all threads, dead ones included).
    pub fn cpu_ticks(pid: u32) -> u64 {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return 0;
        };
        // The command name may contain spaces: fields count from after `)`.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            return 0;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // fields[0] is `state` (field 3): utime is field 14, stime 15.
        let get = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        get(11).unwrap_or(0) + get(12).unwrap_or(0)
    }

    /// The RabbitMQ node on this machine, if there is one to watch.
    pub fn broker_pid() -> Option<u32> {
        let out = std::process::Command::new("pgrep")
            .args(["-o", "-x", "beam.smp"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }

    /// Peak resident set size, in kB.
    pub fn vm_hwm_kb(pid: u32) -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|n| n.parse().ok())
            })
            .unwrap_or(0)
    }
}

async fn ledger_of(base_url: &str) -> Result<LedgerCounts> {
    Ok(reqwest::get(format!("{base_url}/_sim/ledger"))
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// The requests in flight at the simulator, sampled every 100 ms during a
/// run: requests it received minus results the observer saw. A slot of the
/// prefetch that holds no request (a command waiting at the gate, an ack
/// held back) shows as a dip.
struct InFlightSampler {
    samples: Arc<Mutex<Vec<(Instant, u64)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl InFlightSampler {
    fn start(base_url: String, seen: Arc<std::sync::atomic::AtomicUsize>) -> InFlightSampler {
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
    fn finish(self, from: Instant, to: Instant, prefetch: u16) -> Option<(f64, f64)> {
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

/// The Hyperline simulator, as a process of its own.
struct Sim {
    child: Child,
    base_url: String,
}

#[derive(Deserialize)]
struct LedgerCounts {
    requests: u64,
    rate_limited: u64,
}

impl Sim {
    async fn start(latency_ms: u64, rate_limit: u32) -> Result<Sim> {
        let mut child = Command::new(WORKER_BIN)
            .args(["simulator", "--listen", "127.0.0.1:0", "--api-key", SIM_KEY])
            .args(["--latency-ms", &latency_ms.to_string()])
            .args(["--rate-limit", &rate_limit.to_string()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the simulator")?;
        let stdout = child.stdout.take().context("simulator stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .context("the simulator did not say where it listens")??
            .context("the simulator exited")?;
        let base_url = line
            .rsplit(' ')
            .next()
            .filter(|u| u.starts_with("http://"))
            .with_context(|| format!("unexpected simulator output: {line}"))?
            .to_owned();
        Ok(Sim { child, base_url })
    }

    async fn ledger(&self) -> Result<LedgerCounts> {
        ledger_of(&self.base_url).await
    }

    /// Spreads the latency uniformly over `latency ..= latency + jitter`, as
    /// a real backend's answers are spread (`BENCH_JITTER_MS`).
    async fn set_jitter(&self, jitter_ms: u64) -> Result<()> {
        reqwest::Client::new()
            .post(format!("{}/_sim/faults", self.base_url))
            .json(&serde_json::json!({ "latency_jitter_ms": jitter_ms }))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// An event as seen by the observer.
struct Seen {
    at: Instant,
    command_id: Option<String>,
    succeeded: bool,
}

/// One run's names, topology and observer.
struct Run {
    label: String,
    queue: String,
    topology: Topology,
    env: BTreeMap<String, String>,
    events: mpsc::UnboundedReceiver<Seen>,
    /// Results the observer saw so far.
    seen: Arc<std::sync::atomic::AtomicUsize>,
    /// The observer's queue, deleted last: that ends the task reading it.
    observer: String,
}

impl Run {
    /// Declares the worker's topology (through the worker's own code, so the
    /// queue is exactly what the worker expects) and an observer of events.
    async fn setup(broker: &Broker, label: &str, sim: &Sim, prefetch: u16) -> Result<Run> {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let queue = format!("{PREFIX}{label}-{}", &tag[..12]);
        let mut env = worker_env(&queue, &sim.base_url, SIM_KEY);
        env.insert("CPW__AMQP__PREFETCH".to_owned(), prefetch.to_string());
        env.insert("CPW__LOG__FORMAT".to_owned(), "json".to_owned());
        let settings =
            Settings::load_from(None, env.clone()).context("the bench's worker settings")?;
        let topology = Topology::new(&settings.amqp, &settings.retry.redelivery_delays_secs);
        topology.declare(&broker.connection).await?;

        let mut observer = Observer::bind(&broker.connection, &topology.results_exchange).await?;
        let observer_queue = observer.queue().to_owned();
        let (tx, events) = mpsc::unbounded_channel();
        let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Some(delivery) = observer.next_delivery().await {
                let at = Instant::now();
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let props = &delivery.properties;
                let seen = Seen {
                    at,
                    command_id: props.correlation_id().as_ref().map(|c| c.to_string()),
                    succeeded: props
                        .kind()
                        .as_ref()
                        .is_none_or(|k| k.as_str() == "credit_purchase.succeeded"),
                };
                if tx.send(seen).is_err() {
                    break;
                }
            }
        });
        Ok(Run {
            label: label.to_owned(),
            queue,
            topology,
            env,
            events,
            seen,
            observer: observer_queue,
        })
    }

    /// Publishes `n` commands and waits for every confirm.
    async fn prepublish(&self, broker: &Broker, n: usize) -> Result<()> {
        const CHUNK: usize = 5_000;
        let mut left = n;
        while left > 0 {
            let chunk = left.min(CHUNK);
            let mut confirms = Vec::with_capacity(chunk);
            for _ in 0..chunk {
                let body = command(&command_id()).to_string();
                let properties = as_command(BasicProperties::default());
                let confirm = send(&broker.channel, &self.queue, body.as_bytes(), properties);
                confirms.push(confirm.await?);
            }
            for c in confirms {
                if !c.await?.is_ack() {
                    bail!("a command was not confirmed");
                }
            }
            left -= chunk;
        }
        Ok(())
    }

    /// Starts `replicas` workers, logging as operators run them (the
    /// configuration's `log.level`, info) unless `log` names a filter.
    fn spawn_workers(&self, replicas: usize, log: Option<&str>) -> Result<Vec<Subject>> {
        (0..replicas)
            .map(|i| {
                // `BENCH_WRAP="heaptrack -o /tmp/worker"` (or a profiler)
                // runs the worker under it; its figures are then the wrapper's.
                let wrap = std::env::var("BENCH_WRAP").unwrap_or_default();
                let mut words = wrap.split_whitespace();
                let mut cmd = match words.next() {
                    Some(program) => {
                        let mut cmd = Command::new(program);
                        cmd.args(words).arg(WORKER_BIN);
                        cmd
                    }
                    None => Command::new(WORKER_BIN),
                };
                cmd.arg("run")
                    .envs(&self.env)
                    .env(
                        "CPW__AMQP__CONNECTION_NAME",
                        format!("{}-worker-{i}", self.queue),
                    )
                    .env_remove("RUST_LOG");
                if let Some(filter) = log
                    .map(str::to_owned)
                    .or_else(|| std::env::var("BENCH_LOG").ok())
                {
                    cmd.env("RUST_LOG", filter);
                }
                Subject::spawn(cmd, &format!("{}-worker-{i}", self.label))
            })
            .collect()
    }

    fn spawn_baseline(&self, sim: &Sim, prefetch: u16) -> Result<Subject> {
        let exe = std::env::current_exe().context("the bench's own path")?;
        let mut cmd = Command::new(exe);
        cmd.arg(BASELINE_CHILD)
            .env("BASELINE_AMQP_URL", amqp_url())
            .env("BASELINE_QUEUE", &self.queue)
            .env("BASELINE_RESULTS", &self.topology.results_exchange)
            .env("BASELINE_SIM", &sim.base_url)
            .env("BASELINE_PREFETCH", prefetch.to_string());
        Subject::spawn(cmd, &format!("{}-baseline", self.label))
    }

    /// The instant the broker reports `n` consumers on the commands queue.
    async fn consumers_up(&self, broker: &Broker, n: u32) -> Result<Instant> {
        let ch = broker.connection.create_channel().await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let q = ch
                .queue_declare(
                    self.queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            if q.consumer_count() >= n {
                let at = Instant::now();
                let _ = ch.close(200, "ok".into()).await;
                return Ok(at);
            }
            if Instant::now() > deadline {
                bail!("no consumer on {} after 30 s", self.queue);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Waits for `n` events (or `limit`). When the `warmup`-th event
    /// arrives, the CPU times are read: the steady state starts.
    async fn collect(
        &mut self,
        n: usize,
        limit: Duration,
        warmup: usize,
        meter: &Meter,
    ) -> Collected {
        let deadline = tokio::time::Instant::now() + limit;
        let mut got = Collected::default();
        while got.events < n {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(seen)) => {
                    got.events += 1;
                    got.failed += usize::from(!seen.succeeded);
                    got.first.get_or_insert(seen.at);
                    got.last = Some(seen.at);
                    if got.events == warmup {
                        got.warm = Some((seen.at, meter.read()));
                    }
                }
                _ => break,
            }
        }
        got
    }

    /// Publishes at `rate`/s for `secs` and times each command to its event.
    async fn paced_latency(&mut self, broker: &Broker, rate: u32, secs: u32) -> Result<Latency> {
        let total = (rate * secs) as usize;
        let sent: Arc<Mutex<HashMap<String, Instant>>> =
            Arc::new(Mutex::new(HashMap::with_capacity(total)));
        let publisher = {
            let sent = Arc::clone(&sent);
            let channel = broker.channel.clone();
            let queue = self.queue.clone();
            tokio::spawn(async move {
                let per_tick = (rate / 100).max(1) as usize;
                let mut tick = tokio::time::interval(Duration::from_millis(
                    (1000 * per_tick as u64) / u64::from(rate),
                ));
                let mut confirms = Vec::with_capacity(total);
                let mut published = 0;
                while published < total {
                    tick.tick().await;
                    for _ in 0..per_tick.min(total - published) {
                        let id = command_id();
                        let body = command(&id).to_string();
                        sent.lock().expect("sent").insert(id, Instant::now());
                        let properties = as_command(BasicProperties::default());
                        confirms.push(send(&channel, &queue, body.as_bytes(), properties).await?);
                        published += 1;
                    }
                }
                for c in confirms {
                    if !c.await?.is_ack() {
                        bail!("a command was not confirmed");
                    }
                }
                Ok::<(), anyhow::Error>(())
            })
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(u64::from(secs) + 60);
        let mut latencies = Vec::with_capacity(total);
        while latencies.len() < total {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(seen)) => {
                    let published = seen
                        .command_id
                        .and_then(|id| sent.lock().expect("sent").remove(&id));
                    if let Some(p) = published {
                        latencies.push(seen.at.duration_since(p));
                    }
                }
                _ => break,
            }
        }
        publisher.await??;
        latencies.sort_unstable();
        let pick = |q: usize| {
            latencies
                .get((latencies.len() * q / 100).min(latencies.len().saturating_sub(1)))
                .copied()
        };
        Ok(Latency {
            rate,
            samples: latencies.len(),
            expected: total,
            p50: pick(50),
            p99: pick(99),
        })
    }

    async fn cleanup(self, broker: &Broker) {
        delete_topology(&broker.connection, &self.topology).await;
        if let Ok(ch) = broker.connection.create_channel().await {
            let _ = ch
                .queue_delete(self.observer.as_str().into(), QueueDeleteOptions::default())
                .await;
            let _ = ch.close(200, "cleaned".into()).await;
        }
    }
}

#[derive(Default)]
struct Collected {
    events: usize,
    failed: usize,
    first: Option<Instant>,
    /// Arrival of the warm-up's last event, and the CPU ticks then.
    warm: Option<(Instant, Ticks)>,
    last: Option<Instant>,
}

struct Latency {
    rate: u32,
    samples: usize,
    expected: usize,
    p50: Option<Duration>,
    p99: Option<Duration>,
}

/// A measured process: a worker replica or the baseline loop.
struct Subject {
    child: Child,
    pid: u32,
}

impl Subject {
    fn spawn(mut cmd: Command, log_name: &str) -> Result<Subject> {
        // `BENCH_LOGS` moves the subjects' logs off the broker's disk (e.g. to
        // a tmpfs).
        let dir = std::env::var_os("BENCH_LOGS").map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/cpw-bench"),
            std::path::PathBuf::from,
        );
        std::fs::create_dir_all(&dir)?;
        let log = std::fs::File::create(dir.join(format!("{log_name}.log")))?;
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("CPW__") || k == "CPW_CONFIG")
        {
            cmd.env_remove(k);
        }
        // A process group of its own, so that stopping it also stops what a
        // `BENCH_WRAP` wrapper started.
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {log_name}"))?;
        let pid = child.id().context("no pid")?;
        Ok(Subject { child, pid })
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    async fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.pid)])
            .status();
        let _ = self.child.kill().await;
    }
}

/// What one run of one subject measured.
#[derive(Clone, Debug, Default)]
struct Figures {
    commands: usize,
    failed: usize,
    secs: f64,
    cpu_secs: f64,
    /// The simulator's and the broker's CPU over the same window.
    sim_cpu_secs: f64,
    broker_cpu_secs: f64,
    rss_kb: u64,
    /// From the consumer's registration to the first result.
    first: Option<Duration>,
    p50: Option<Duration>,
    p99: Option<Duration>,
    latency_note: String,
    /// Mean requests in flight, and the share of the time the prefetch was
    /// nearly all in flight (API-latency scenarios).
    in_flight: Option<(f64, f64)>,
}

impl Figures {
    fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.commands as f64 / self.secs
        } else {
            0.0
        }
    }
    fn cpu_per_1000(&self) -> f64 {
        self.per_1000(self.cpu_secs)
    }
    fn per_1000(&self, secs: f64) -> f64 {
        if self.commands > 0 {
            secs * 1000.0 / self.commands as f64
        } else {
            0.0
        }
    }
}

/// CPU ticks so far of the measured processes, the simulator and the broker.
#[derive(Clone, Copy, Debug, Default)]
struct Ticks {
    subjects: u64,
    sim: u64,
    broker: u64,
}

impl Ticks {
    /// CPU-seconds spent since `earlier`, per source.
    fn since(self, earlier: Ticks) -> (f64, f64, f64) {
        let secs = |now: u64, then: u64| now.saturating_sub(then) as f64 / procfs::clk_tck();
        (
            secs(self.subjects, earlier.subjects),
            secs(self.sim, earlier.sim),
            secs(self.broker, earlier.broker),
        )
    }
}

/// Reads [`Ticks`].
struct Meter {
    subjects: Vec<u32>,
    sim: u32,
    broker: Option<u32>,
}

impl Meter {
    fn new(subjects: &[Subject], sim: &Sim) -> Meter {
        Meter {
            subjects: subjects.iter().map(|s| s.pid).collect(),
            sim: sim.child.id().unwrap_or(0),
            broker: procfs::broker_pid(),
        }
    }

    fn read(&self) -> Ticks {
        Ticks {
            subjects: self.subjects.iter().map(|p| procfs::cpu_ticks(*p)).sum(),
            sim: procfs::cpu_ticks(self.sim),
            broker: self.broker.map_or(0, procfs::cpu_ticks),
        }
    }
}

fn rss_of(subjects: &[Subject]) -> u64 {
    subjects
        .iter()
        .map(|s| procfs::vm_hwm_kb(s.pid))
        .max()
        .unwrap_or(0)
}

/// Who is measured in a run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Who {
    /// The worker with its default configuration (logs at info).
    Worker,
    /// The worker with `log.level` warn: what the logs cost.
    WorkerWarn,
    Baseline,
}

/// One complete run: fresh simulator and queues, N commands queued, the
/// subject started, the batch drained and measured, then (optionally) the
/// paced latency phase.
struct Plan {
    label: &'static str,
    prefetch: u16,
    latency_ms: u64,
    queued: usize,
    /// Stop measuring after this long even if not drained (RSS scenario).
    window: Option<Duration>,
    /// `(rate, secs)` of the latency phase.
    paced: Option<(u32, u32)>,
}

/// Starts the broker's quorum write-ahead log afresh (best effort: needs
/// `rabbitmqctl`). The WAL is shared by every quorum queue and rolls over at
/// 512 MB, and a run writes about 70 MB to it: the roll-over, with the
/// segment writes it starts for the live queue, would otherwise land inside
/// every seventh run or so, on the worker or the baseline by chance.
fn roll_over_quorum_wal() {
    let _ = rabbitmqctl()
        .args(["eval", "ra_log_wal:force_roll_over(ra_log_wal)."])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

async fn run_once(broker: &Broker, plan: &Plan, who: Who) -> Result<Figures> {
    roll_over_quorum_wal();
    let sim = Sim::start(plan.latency_ms, 0).await?;
    if plan.latency_ms > 0 {
        sim.set_jitter(env_usize("BENCH_JITTER_MS", 0) as u64)
            .await?;
    }
    let mut run = Run::setup(broker, plan.label, &sim, plan.prefetch).await?;
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

/// The median of each figure over the runs (each figure on its own).
fn median(runs: &[Figures]) -> Figures {
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

/// Tables and ratios.
mod report {
    use super::Figures;
    use std::time::Duration;

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
}

mod scenarios {
    use super::*;

    /// `repeat` runs of each subject, the runs of each in the order given;
    /// who goes first rotates, so a drifting machine favours none.
    async fn alternating<const N: usize>(
        broker: &Broker,
        plan: &Plan,
        subjects: [Who; N],
        repeat: usize,
    ) -> Result<[Vec<Figures>; N]> {
        let mut runs: [Vec<Figures>; N] = std::array::from_fn(|_| Vec::new());
        for i in 0..repeat {
            for k in 0..N {
                let at = (i + k) % N;
                runs[at].push(run_once(broker, plan, subjects[at]).await?);
            }
        }
        Ok(runs)
    }

    /// Instant API: worker and baseline, interleaved, `BENCH_REPEAT` times.
    pub async fn instant(broker: &Broker, prefetch: u16) -> Result<Vec<String>> {
        let n = env_usize("BENCH_N", 100_000);
        let repeat = env_usize("BENCH_REPEAT", 5);
        let label = if prefetch == 64 {
            "instant-64"
        } else {
            "instant-256"
        };
        let plan = Plan {
            label,
            prefetch,
            latency_ms: 0,
            queued: n,
            window: None,
            paced: Some((2_000, 5)),
        };
        report::heading(&format!(
            "{label}: instant API, prefetch {prefetch}, {n} commands queued, median of {repeat}"
        ));
        let [baselines, workers, warns] = alternating(
            broker,
            &plan,
            [Who::Baseline, Who::Worker, Who::WorkerWarn],
            repeat,
        )
        .await?;
        report::runs("worker", &workers);
        report::runs("worker, log.level warn", &warns);
        report::runs("baseline", &baselines);
        let (w, quiet, b) = (median(&workers), median(&warns), median(&baselines));
        report::compare(&w, &b);
        let (rate, cpu) = (w.rate() / b.rate(), w.cpu_per_1000() / b.cpu_per_1000());
        println!(
            "worker at log.level warn: {:.0} commands/s ({:.2}× the baseline), {:.4} CPU-s per 1,000 ({:.2}×)",
            quiet.rate(),
            quiet.rate() / b.rate(),
            quiet.cpu_per_1000(),
            quiet.cpu_per_1000() / b.cpu_per_1000()
        );
        let (min_rate, max_cpu) = if prefetch == 64 {
            (0.95, Some(1.2))
        } else {
            (0.9, None)
        };
        let mut lines = vec![format!(
            "{label}: {:.2}× the baseline's commands/s at the default configuration (target ≥ {min_rate:.2}×): {}; at warn {:.2}×",
            rate,
            report::verdict(rate >= min_rate),
            quiet.rate() / b.rate()
        )];
        if let Some(max_cpu) = max_cpu {
            lines.push(format!(
                "{label}: {:.2}× the baseline's CPU-s per 1,000 commands at the default configuration (target ≤ {max_cpu:.2}×): {}; at warn {:.2}×",
                cpu,
                report::verdict(cpu <= max_cpu),
                quiet.cpu_per_1000() / b.cpu_per_1000()
            ));
            // The issue's latency target, judged where the table has long
            // claimed it: the median of the runs' p99 at 2,000/s offered.
            if let (Some(wp), Some(bp)) = (w.p99, b.p99) {
                let ratio = wp.as_secs_f64() / bp.as_secs_f64().max(1e-9);
                lines.push(format!(
                    "{label}: p99 publish → event at 2,000/s {:.1} ms, {ratio:.2}× the baseline's {:.1} ms (target ≤ 1.20×): {}",
                    wp.as_secs_f64() * 1e3,
                    bp.as_secs_f64() * 1e3,
                    report::verdict(ratio <= 1.2)
                ));
            }
        }
        Ok(lines)
    }

    /// Hyperline taking 2 s per purchase, prefetch 256: the ceiling is 128/s.
    pub async fn slow_api(broker: &Broker) -> Result<Vec<String>> {
        let plan = Plan {
            label: "latency-2s",
            prefetch: 256,
            latency_ms: 2_000,
            queued: 256 * 15,
            window: None,
            paced: Some((100, 10)),
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

    /// Three replicas sharing the simulator's real write limit, 50 per 10 s.
    pub async fn rate_limited(broker: &Broker) -> Result<Vec<String>> {
        const WINDOW: Duration = Duration::from_secs(60);
        const REPLICAS: usize = 3;
        const QUEUED: usize = 400;
        report::heading(
            "rate-limit: 50 writes per 10 s (5/s), 3 replicas, prefetch 64 each, 60 s window",
        );
        let sim = Sim::start(0, 50).await?;
        let mut run = Run::setup(broker, "rate-limit", &sim, 64).await?;
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

    /// 100,000 commands queued, 1,000 in flight (prefetch 1000, 2 s API).
    pub async fn in_flight_rss(broker: &Broker) -> Result<Vec<String>> {
        let plan = Plan {
            label: "rss",
            prefetch: 1000,
            latency_ms: 2_000,
            queued: 100_000,
            window: Some(Duration::from_secs(env_usize("BENCH_RSS_SECS", 20) as u64)),
            paced: None,
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
}

/// The minimal honest loop: consume → one POST → publish the result with a
/// confirm → ack, one task per delivery. Runs as a child of the bench so its
/// CPU and memory are measured exactly like the worker's.
mod baseline {
    use super::*;

    #[derive(Deserialize)]
    struct Cmd<'a> {
        command_id: &'a str,
        customer_id: &'a str,
        product_id: &'a str,
        credit_count: u64,
        amount_excluding_tax: Option<u64>,
    }

    #[derive(Deserialize)]
    struct Receipt {
        invoice_id: String,
        new_credit_balance: u64,
    }

    struct Ctx {
        http: reqwest::Client,
        publisher: Channel,
        sim: String,
        results: String,
    }

    fn var(name: &str) -> Result<String> {
        std::env::var(name).with_context(|| format!("{name} is not set"))
    }

    pub async fn run() -> Result<()> {
        let prefetch: u16 = var("BASELINE_PREFETCH")?.parse()?;
        let queue = var("BASELINE_QUEUE")?;
        let connection =
            Connection::connect(&var("BASELINE_AMQP_URL")?, ConnectionProperties::default())
                .await?;
        let consuming = connection.create_channel().await?;
        consuming
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let publisher = connection.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let ctx = Arc::new(Ctx {
            http: reqwest::Client::new(),
            publisher,
            sim: var("BASELINE_SIM")?,
            results: var("BASELINE_RESULTS")?,
        });
        let mut consumer = consuming
            .basic_consume(
                queue.as_str().into(),
                "baseline".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        while let Some(delivery) = consumer.next().await {
            let delivery = delivery?;
            let ctx = Arc::clone(&ctx);
            tokio::spawn(async move {
                if let Err(e) = handle(&ctx, &delivery).await {
                    eprintln!("baseline: {e:#}");
                    let requeue = BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    };
                    let _ = delivery.acker.nack(requeue).await;
                }
            });
        }
        Ok(())
    }

    async fn handle(ctx: &Ctx, delivery: &lapin::message::Delivery) -> Result<()> {
        let cmd: Cmd = serde_json::from_slice(&delivery.data)?;
        let url = format!(
            "{}/v1/customers/{}/credits/{}/purchase",
            ctx.sim, cmd.customer_id, cmd.product_id
        );
        let response = ctx
            .http
            .post(url)
            .bearer_auth(SIM_KEY)
            .header("Idempotency-Key", cmd.command_id)
            .json(&serde_json::json!({
                "credit_count": cmd.credit_count,
                "amount_excluding_tax": cmd.amount_excluding_tax,
            }))
            .send()
            .await?;
        if response.status().as_u16() != 201 {
            bail!("HTTP {}", response.status());
        }
        let receipt: Receipt = response.json().await?;
        let event = serde_json::json!({
            "type": "credit_purchase.succeeded",
            "command_id": cmd.command_id,
            "customer_id": cmd.customer_id,
            "product_id": cmd.product_id,
            "credit_count": cmd.credit_count,
            "invoice_id": receipt.invoice_id,
            "new_credit_balance": receipt.new_credit_balance,
        });
        let confirm = ctx
            .publisher
            .basic_publish(
                ctx.results.as_str().into(),
                "credit_purchase.succeeded".into(),
                BasicPublishOptions::default(),
                &serde_json::to_vec(&event)?,
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2)
                    .with_type("credit_purchase.succeeded".into())
                    .with_correlation_id(cmd.command_id.into()),
            )
            .await?
            .await?;
        if !confirm.is_ack() {
            bail!("event nacked");
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
        Ok(())
    }
}
