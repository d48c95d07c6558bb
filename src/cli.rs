//! The command line of CONTRACT section 7.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Buys Hyperline credits for the credit-purchase commands on a RabbitMQ
/// queue, exactly once per command, and publishes the outcome of each.
#[derive(Debug, Parser)]
#[command(name = "credit-purchase-worker", version, propagate_version = true)]
pub struct Cli {
    /// A TOML file layered over the defaults (environment variables CPW__… still win).
    #[arg(long, global = true, env = "CPW_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// What to do; `run` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the worker: consume commands, purchase, publish results (the default).
    Run,
    /// Serve the Hyperline simulator (a faithful stand-in for tests and demos).
    Simulator(SimulatorArgs),
    /// Run the whole flow on this machine with the embedded simulator (not built yet).
    Demo,
    /// Publish one command from flags, optionally waiting for its result (not built yet).
    Publish,
    /// Inspect or replay the dead-letter queue (not built yet).
    #[command(subcommand)]
    DeadLetters(DeadLetters),
    /// Check the configuration, the broker, the topology and the API key (not built yet).
    Check,
}

/// `dead-letters` subcommands.
#[derive(Debug, Subcommand)]
pub enum DeadLetters {
    /// List dead letters with their reason (not built yet).
    List,
    /// Put dead letters back on the commands queue (not built yet).
    Replay,
}

/// `simulator` flags (CONTRACT section 8).
#[derive(Debug, Args)]
pub struct SimulatorArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8089")]
    pub listen: SocketAddr,
    /// The only API key it accepts (as `Authorization: Bearer <key>`).
    #[arg(long, default_value = "sim_test_key")]
    pub api_key: String,
    /// Added to every purchase before it completes, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Share of purchases answered with a 5xx (0 to 1).
    #[arg(long, default_value_t = 0.0, value_parser = fraction)]
    pub fail_rate: f64,
    /// Share of purchases that are charged but never answered (0 to 1).
    #[arg(long, default_value_t = 0.0, value_parser = fraction)]
    pub hang_rate: f64,
    /// Share of purchases that are charged, then the connection dropped (0 to 1).
    #[arg(long, default_value_t = 0.0, value_parser = fraction)]
    pub drop_rate: f64,
    /// Writes allowed per 10 s (Hyperline: 50); 0 turns the limit off.
    #[arg(long, default_value_t = 50)]
    pub rate_limit: u32,
    /// Seed of the fault dice, for a reproducible run.
    #[arg(long)]
    pub seed: Option<u64>,
}

fn fraction(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err("must be between 0 and 1".into())
    }
}
