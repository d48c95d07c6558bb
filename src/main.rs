//! The binary: parse the command line, load the settings, dispatch. Anything
//! that can fail at start ends here as one line on stderr and a non-zero exit.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use credit_purchase_worker::admin;
use credit_purchase_worker::cli::{Cli, Command, DeadLetters, SimulatorArgs};
use credit_purchase_worker::configuration::Settings;
use credit_purchase_worker::simulator::{Faults, Simulator, SimulatorSettings};
use credit_purchase_worker::startup::Application;
use credit_purchase_worker::telemetry;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    one_malloc_arena();
    let cli = Cli::parse();
    let outcome = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|runtime| runtime.block_on(dispatch(cli)));
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// glibc gives each thread that allocates its own arena, up to eight per
/// core, and a request's memory is often allocated on one runtime thread and
/// freed on another. With 1,000 commands in flight that scatters their
/// buffers over many half-empty arenas: one arena held the worker's peak RSS
/// at 45 MB where the default reached 51 MB (BENCHMARKS.md), and most small
/// allocations never take its lock (glibc's per-thread cache serves them).
/// `MALLOC_ARENA_MAX` in the environment still wins. Must run before the
/// first thread starts: arenas are assigned as threads first allocate.
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a tunable of the allocator; it is called
        // before any other thread exists, so nothing allocates concurrently.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

/// What an operator tool logs unless `RUST_LOG` says otherwise: what went
/// wrong on the way, not the steps of a run that went well.
const OPERATOR_LOG_LEVEL: &str = "warn";

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = cli.config.as_deref();
    let command = cli.command.unwrap_or(Command::Run);
    if command.is_operator_tool() {
        // An operator tool's warnings (a letter returned with `nack`, a
        // copy refused) are what the operator must read: without a
        // subscriber they went nowhere. Stderr, so stdout stays the tool's
        // output (JSON lines included).
        telemetry::init(
            credit_purchase_worker::configuration::LogFormat::Pretty,
            OPERATOR_LOG_LEVEL,
        );
    }
    Ok(match command {
        Command::Run => run(config).await?,
        Command::Simulator(args) => simulator(args).await?,
        Command::Demo(args) => admin::demo::run(config, args).await?,
        Command::Publish(args) => admin::publish::run(config, args).await?,
        Command::DeadLetters(DeadLetters::List(args)) => {
            admin::dead_letters::list(config, args).await?
        }
        Command::DeadLetters(DeadLetters::Show(args)) => admin::show::show(config, args).await?,
        Command::DeadLetters(DeadLetters::Purge(args)) => admin::purge::purge(config, args).await?,
        Command::DeadLetters(DeadLetters::Replay(args)) => {
            admin::dead_letters::replay(config, args).await?
        }
        Command::DeadLetters(DeadLetters::Reconcile(args)) => {
            admin::reconcile::run(config, args).await?
        }
        Command::Check => admin::check::run(config).await,
        Command::Events(args) => admin::events::run(config, args).await?,
    })
}

async fn run(config: Option<&std::path::Path>) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(config)?;
    let telemetry = telemetry::init_with_export(settings.log.format, &settings.log.level)?;
    let app = Application::build(settings).await?;
    tracing::info!(ops = %app.ops_addr(), spans_exported = telemetry.spans_exported(), "starting");
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    // A topology that differs ends the process with its one line (exit 2),
    // not a reconnection loop; the last spans (the drain's) go out first.
    let stopped = app.run_until_stopped(shutdown).await;
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    stopped?;
    Ok(ExitCode::SUCCESS)
}

async fn simulator(args: SimulatorArgs) -> anyhow::Result<ExitCode> {
    telemetry::init(
        credit_purchase_worker::configuration::LogFormat::Pretty,
        "info",
    );
    let settings = SimulatorSettings {
        api_key: args.api_key,
        faults: Faults {
            latency_ms: args.latency_ms,
            fail_rate: args.fail_rate,
            hang_rate: args.hang_rate,
            drop_rate: args.drop_rate,
            rate_limit: args.rate_limit,
            ..Faults::default()
        },
        seed: args.seed,
    };
    let sim = Simulator::start(args.listen, settings)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    admin::output::line(format_args!(
        "Hyperline simulator listening on {}",
        sim.base_url()
    ));
    let stop = CancellationToken::new();
    tokio::spawn(stop_on_signal(stop.clone()));
    sim.run_until(async move { stop.cancelled().await }).await;
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM (Kubernetes) or SIGINT (Ctrl-C) starts a graceful shutdown.
async fn stop_on_signal(token: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        () = terminate => tracing::info!("SIGTERM: shutting down"),
    }
    token.cancel();
}
