//! `demo`: the whole job on one machine, in well under a minute.
//!
//! Someone evaluating the worker should see it do its job, failures included,
//! without an API key or a staging account: this starts the embedded
//! Hyperline simulator (with latency and random 5xx), runs the real worker
//! in-process against the configured broker on throwaway names
//! (`cpw-demo-<id>`), publishes a batch of sample commands, waits for every
//! result event, and prints a summary that checks the exactly-once promise
//! against the simulator's ledger. The throwaway queues and exchanges are
//! removed at the end, on failure and on Ctrl-C alike.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use lapin::{BasicProperties, Connection};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::ConnectError;
use super::demo_batch::{self, Scorecard};
use super::demo_queues::{observe, remove};
use crate::broker::{self, Publisher, Topology, TopologyError, redacted_url};
use crate::cli::DemoArgs;
use crate::configuration::{ApiKey, ConfigError, LogFormat, Settings};
use crate::simulator::{Faults, Simulator, SimulatorSettings};
use crate::startup::{Application, StartupError};

/// The key the embedded simulator accepts; it guards nothing.
const DEMO_KEY: &str = "sim_demo_key";

/// The level of the worker's log file: the whole story of every command.
const DEMO_LOG_LEVEL: &str = "info";

/// The demo's log filter when no log file can be made: broker and startup
/// errors only, on stderr.
const DEMO_LOG_FILTER: &str = "error,credit_purchase_worker::pipeline::handler=off";

/// How long the worker may take to stop once the results are in.
const WORKER_STOP: Duration = Duration::from_secs(10);

/// Why the demo could not run to its summary.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The settings could not be loaded.
    #[error("{0}")]
    Config(ConfigError),
    /// The simulator could not bind a port.
    #[error("cannot start the embedded simulator: {0}")]
    Simulator(std::io::Error),
    /// The broker could not be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The demo's topology could not be declared.
    #[error("{0}")]
    Topology(TopologyError),
    /// The worker could not be built.
    #[error("cannot start the worker: {0}")]
    Startup(StartupError),
    /// A channel operation failed.
    #[error("broker error: {}", super::broker_says(.0))]
    Broker(lapin::Error),
    /// A sample command was not confirmed or not routed.
    #[error("publishing the sample commands failed: {0}")]
    Publish(broker::PublishError),
    /// Ctrl-C.
    #[error("interrupted")]
    Interrupted,
}

super::wrap_error!(Error::Config(ConfigError));
super::wrap_error!(Error::Topology(TopologyError));
super::wrap_error!(Error::Startup(StartupError));
super::wrap_error!(Error::Broker(lapin::Error));
super::wrap_error!(Error::Publish(broker::PublishError));

/// The running worker: its stop token and task.
type Worker = (
    CancellationToken,
    JoinHandle<Result<(), crate::broker::Mismatch>>,
);

/// Runs the demo; 0 when every command got its result and the ledger holds
/// one charge per success, 1 otherwise, 130 on Ctrl-C.
pub async fn run(config: Option<&Path>, args: DemoArgs) -> Result<ExitCode, Error> {
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let simulator = Simulator::start(
        ([127, 0, 0, 1], 0).into(),
        SimulatorSettings {
            api_key: DEMO_KEY.to_owned(),
            faults: Faults {
                latency_ms: 20,
                latency_jitter_ms: 80,
                fail_rate: 0.05,
                rate_limit: 0,
                scripted: demo_batch::scripted(),
                ..Faults::default()
            },
            seed: args.seed,
        },
    )
    .await
    .map_err(Error::Simulator)?;
    let settings = demo_settings(Settings::load(config)?, &tag, &simulator.base_url())?;
    let topology = Topology::new(&settings.amqp, &settings.retry.redelivery_delays_secs);
    let connection = super::connect(&settings.amqp, "demo").await?;
    let log = log_to_file(&tag);
    eprintln!(
        "demo: simulator at {}, worker on {} (queue {}), {} commands",
        simulator.base_url(),
        redacted_url(settings.amqp.url.first()),
        topology.queue,
        args.commands
    );

    let mut worker = None;
    let result = tokio::select! {
        result = drive(&connection, &settings, &topology, &args, &mut worker) => result,
        _ = tokio::signal::ctrl_c() => Err(Error::Interrupted),
    };
    if let Some((stop, task)) = worker {
        stop.cancel();
        if tokio::time::timeout(WORKER_STOP, task).await.is_err() {
            eprintln!("demo: the worker did not stop within {WORKER_STOP:?}");
        }
    }
    remove(&connection, &topology).await;
    super::close(&connection).await;
    let (ledger, requests) = (simulator.ledger(), simulator.requests());
    simulator.shutdown().await;

    let card = match result {
        Ok(card) => card,
        Err(Error::Interrupted) => {
            eprintln!("demo: interrupted; its queues and exchanges are removed");
            return Ok(ExitCode::from(130));
        }
        Err(e) => return Err(e),
    };
    let missing = card.missing();
    if !missing.is_empty() {
        let shown: Vec<&str> = missing.iter().take(10).copied().collect();
        eprintln!(
            "demo: no result within {} s for {} command(s): {}{}",
            args.timeout_secs,
            missing.len(),
            shown.join(", "),
            if missing.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        );
    }
    let summary = card.summary(&ledger, &requests);
    super::output::block(&summary);
    if let Some(path) = log {
        super::output::block(format_args!("worker log: {}\n", path.display()));
    }
    Ok(if summary.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Sends the worker's log lines to a file, named with the summary. The
/// demo's failures (invalid commands, 404s, garbled answers, 5xx) are
/// deliberate and its summary counts them; on a terminal their ERROR lines
/// would cut across the progress bar and read as the demo breaking. Without
/// a file, only errors reach stderr, as before. RUST_LOG still wins.
fn log_to_file(tag: &str) -> Option<PathBuf> {
    let path = std::env::temp_dir().join(format!("cpw-demo-{tag}.log"));
    match std::fs::File::create(&path) {
        Ok(file) => {
            crate::telemetry::init_to_file(LogFormat::Pretty, DEMO_LOG_LEVEL, file);
            Some(path)
        }
        Err(e) => {
            eprintln!(
                "demo: cannot write {}: {e}; errors only, here",
                path.display()
            );
            crate::telemetry::init(LogFormat::Pretty, DEMO_LOG_FILTER);
            None
        }
    }
}

/// The user's settings (broker URL, queue type, prefetch) with everything
/// else pointed at the demo: throwaway names, the simulator, and retry steps
/// short enough to watch.
fn demo_settings(mut s: Settings, tag: &str, base_url: &str) -> Result<Settings, ConfigError> {
    let queue = format!("cpw-demo-{tag}");
    s.amqp.results_exchange = format!("{queue}-results");
    s.amqp.connection_name = format!("credit-purchase-worker demo {tag}");
    s.amqp.queue = queue;
    // One lane, on the throwaway queue: a configured lane may name a real
    // queue (`queue = "credit-purchases"`), which the demo would consume
    // from and delete at the end.
    s.amqp.lanes = Vec::new();
    s.amqp.declare_topology = true;
    s.hyperline.base_url = base_url
        .parse()
        .map_err(|e: url::ParseError| ConfigError::Invalid {
            key: "hyperline.base_url",
            reason: e.to_string(),
        })?;
    s.hyperline.api_key = Some(ApiKey::new(DEMO_KEY));
    s.hyperline.api_key_file = None;
    s.hyperline.timeout_secs = 5;
    s.hyperline.max_requests_per_second = 0;
    s.retry.attempts = 3;
    s.retry.initial_backoff_ms = 20;
    s.retry.max_backoff_ms = 200;
    s.retry.conflict_delay_ms = 100;
    s.retry.max_rate_limit_wait_secs = 5;
    s.retry.redelivery_delays_secs = vec![1, 2];
    s.worker.shutdown_grace_secs = 5;
    s.server.listen = ([127, 0, 0, 1], 0).into();
    Ok(s)
}

/// Declares, observes, starts the worker, publishes, and collects results
/// until every command has one or the time is up.
async fn drive(
    connection: &std::sync::Arc<Connection>,
    settings: &Settings,
    topology: &Topology,
    args: &DemoArgs,
    worker: &mut Option<Worker>,
) -> Result<Scorecard, Error> {
    topology.declare(connection).await?;
    let mut events = observe(connection, &topology.results_exchange).await?;
    let app = Application::build(settings.clone()).await?;
    let stop = CancellationToken::new();
    *worker = Some((stop.clone(), tokio::spawn(app.run_until_stopped(stop))));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    let batch = demo_batch::batch(args.commands);
    let publisher = Publisher::open(
        std::sync::Arc::clone(connection),
        settings.amqp.confirm_timeout(),
    )
    .await?;
    let mut card = Scorecard::new(batch.len());
    for sample in &batch {
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        card.sent(&sample.id, Instant::now());
        publisher
            .publish_routed("", &topology.queue, &sample.body, properties)
            .await?;
    }

    let bar = ProgressBar::new(batch.len() as u64).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} results  {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    while !card.complete() {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some((at, event))) => {
                if card.record(&event, at) {
                    bar.inc(1);
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    bar.finish_and_clear();
    Ok(card)
}
