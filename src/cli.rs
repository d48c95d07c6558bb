//! The command line of docs/contract.md section 7.

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
    /// Run the whole flow on this machine and print a summary.
    ///
    /// Starts an embedded Hyperline simulator (with latency and random 5xx),
    /// runs the worker in-process on throwaway queues of the configured broker
    /// (`cpw-demo-<id>`, removed at the end, also on Ctrl-C), publishes a batch
    /// of sample commands (some deliberately invalid), and checks that the
    /// simulator charged exactly once per succeeded command.
    Demo(DemoArgs),
    /// Publish one credit-purchase command from flags, optionally waiting for its result.
    ///
    /// The command is checked with the worker's own rules first (an invalid
    /// one is refused with the reason), then published persistent and
    /// confirmed by the broker to the commands queue of its lane (`--lane`,
    /// the first by default). Prints the command id; with `--wait`, then the
    /// result event.
    Publish(PublishArgs),
    /// List, show, replay, purge or reconcile the dead letters (`<queue>.dead`).
    ///
    /// Reading them never wears them out: a letter read is put back as a
    /// fresh copy, so no broker delivery limit is ever reached by looking.
    #[command(subcommand)]
    DeadLetters(DeadLetters),
    /// Read the results log: what happened to a command, or every event since a time.
    ///
    /// With `amqp.lanes`, each event names its lane (`lane=…`; `--lane` keeps one).
    ///
    /// The log (`<results_exchange>.log`, a RabbitMQ stream kept for
    /// `amqp.results_log_retention`) holds every event the worker published.
    /// Reading stops by itself once it has caught up, unless `--follow`.
    /// Exit status: 0; 1 when `--command-id` found no event or the start is
    /// older than the log's retention; 2 when the log is missing or cannot be read.
    Events(EventsArgs),
    /// Check the configuration, the lanes, the broker, the topology and the API key.
    ///
    /// One ✓/✗ line each (one per lane, and per queue of every lane); exits 1 when any check fails. Nothing is consumed
    /// or bought, and neither the key nor the broker password is printed.
    Check,
}

impl Command {
    /// The tools an operator runs by hand (not the worker, the simulator or
    /// the demo, which set up their own logs).
    pub fn is_operator_tool(&self) -> bool {
        matches!(
            self,
            Command::Publish(_) | Command::DeadLetters(_) | Command::Events(_) | Command::Check
        )
    }
}

/// `dead-letters` subcommands.
#[derive(Debug, Subcommand)]
pub enum DeadLetters {
    /// List the dead letters with why and when they died, and their lane.
    ///
    /// Nothing is removed: every message read is put back. A letter whose
    /// queue is no configured lane's shows LANE `-` (`null` in `--json`):
    /// a replay puts it in the first lane.
    List(ListArgs),
    /// Show one command's dead letter in full: the worker's reading of it,
    /// its lane, its idempotency window, its properties and headers, and its body.
    ///
    /// Nothing is removed. Exit status 1 when there is no such dead letter.
    Show(ShowArgs),
    /// Remove chosen dead letters (and only those) for good.
    ///
    /// Shows the selection as `list` does, then asks for `yes` on stdin
    /// (or takes `--yes`). Exit status 1 when not confirmed or a command id
    /// has no dead letter.
    Purge(PurgeArgs),
    /// Move dead letters back to their lane's commands queue for another try.
    ///
    /// Each goes back to the lane whose queue it came from (its `cpw-queue`
    /// stamp, else the broker's `x-death`); one whose queue is no
    /// configured lane's goes to the first lane, with a `note:` line.
    /// The copy starts a fresh retry budget. A command first attempted close to
    /// 24 hours ago or more is refused unless `--force`: Hyperline's
    /// idempotency window would no longer protect it from a second charge.
    /// Invalid commands are never replayed (they would only die again):
    /// `--all` leaves them and says how many; naming one is a skip.
    /// Exit status 1 when a selected command was skipped or not found.
    Replay(ReplayArgs),
    /// Settle uncertain dead letters from Hyperline's credit transactions.
    ///
    /// Uncertain: `unexpected_response`, or `retries_exhausted` with a first
    /// request that may have charged. Its window runs from that request to
    /// its dead-lettering, widened by the worker's clock margin (1/96 of the
    /// idempotency window: 15 min). A candidate is a `topup` from `api` of
    /// that customer and product, count and amount (or price), in the window.
    /// A candidate whose invoice a `succeeded` event of another command in
    /// the results log carries is that command's, not a candidate.
    ///
    /// Not charged (no candidate): replay it with its history reset, into
    /// its own lane (as `replay` does).
    /// Charged (exactly one candidate, no other letter's, and the results log
    /// covers it): publish its `succeeded` event ("reconciled": true), then
    /// remove the letter. Its command's `succeeded` event already in the log:
    /// remove the letter. Anything else (several candidates, one shared, a
    /// transaction missing a field, no log, a listing unreadable) is left for
    /// a person, with the candidates.
    ///
    /// A dry run unless `--apply`. Exit status: 0 when nothing is left for a
    /// person, 1 when a letter is left, 2 on an error (an action not done: a
    /// second run is safe).
    Reconcile(ReconcileArgs),
}

/// `dead-letters reconcile` flags.
#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// Act: publish the events, replay the commands, remove their dead letters.
    /// Without it nothing is changed.
    #[arg(long)]
    pub apply: bool,
    /// One JSON object per uncertain dead letter and line, for scripts.
    #[arg(long)]
    pub json: bool,
}

/// `events` flags.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("start").multiple(false).args(["since", "from"])))]
pub struct EventsArgs {
    /// Only the events of this command.
    #[arg(long = "command-id", value_name = "ID")]
    pub command_id: Option<String>,
    /// Only the events of this lane (`amqp.lanes`; their `cpw-lane` header).
    /// An event that names no lane is of the lane `default`.
    #[arg(long, value_name = "NAME")]
    pub lane: Option<String>,
    /// Start this long ago: `90s`, `30m`, `2h`, `7d`. Default: the oldest event kept.
    #[arg(long, value_name = "AGO", value_parser = ago)]
    pub since: Option<std::time::Duration>,
    /// Start at this time (RFC 3339, e.g. `2026-12-06T03:00:00Z`).
    #[arg(long, value_name = "TIME", value_parser = rfc3339)]
    pub from: Option<time::OffsetDateTime>,
    /// Keep reading new events as they are published (Ctrl-C to stop).
    #[arg(long)]
    pub follow: bool,
    /// Each event as published, one JSON object a line.
    #[arg(long)]
    pub json: bool,
}

fn ago(s: &str) -> Result<std::time::Duration, String> {
    let split = s.len().saturating_sub(1);
    let unit = match s.get(split..) {
        Some("s") => 1,
        Some("m") => 60,
        Some("h") => 3_600,
        Some("d") => 86_400,
        _ => return Err("write a number and a unit: 90s, 30m, 2h, 7d".into()),
    };
    let n: u64 = s
        .get(..split)
        .unwrap_or_default()
        .parse()
        .map_err(|_| "write a number and a unit: 90s, 30m, 2h, 7d".to_owned())?;
    n.checked_mul(unit)
        .map(std::time::Duration::from_secs)
        .ok_or_else(|| "too long".into())
}

fn rfc3339(s: &str) -> Result<time::OffsetDateTime, String> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("not an RFC 3339 time ({e}), e.g. 2026-12-06T03:00:00Z"))
}

/// `publish` flags: the fields of a command (docs/contract.md section 2).
#[derive(Debug, Args)]
#[command(group(
    clap::ArgGroup::new("pricing")
        .required(true)
        .multiple(false)
        .args(["amount_excluding_tax", "price_id"])
))]
pub struct PublishArgs {
    /// Hyperline customer to credit, e.g. `cus_Typ0px2W0aiEtl`.
    #[arg(long, value_name = "ID")]
    pub customer_id: String,
    /// Hyperline product the credits are for, e.g. `itm_3kXODDF42QXtnL`.
    #[arg(long, value_name = "ID")]
    pub product_id: String,
    /// How many credits to buy (a whole pack when priced with `--price-id`).
    #[arg(long, value_name = "N")]
    pub credit_count: u64,
    /// Price of the purchase, in the currency's smallest unit (cents).
    /// Give this or `--price-id`, not both.
    #[arg(long, value_name = "AMOUNT")]
    pub amount_excluding_tax: Option<u64>,
    /// A bundle price of the product. Give this or `--amount-excluding-tax`.
    #[arg(long, value_name = "ID")]
    pub price_id: Option<String>,
    /// When the credits expire (RFC 3339, e.g. `2027-01-31T23:59:59Z`).
    #[arg(long, value_name = "DATE-TIME")]
    pub expires_at: Option<String>,
    /// The command id, which is also Hyperline's Idempotency-Key: publishing
    /// twice with the same id charges once. A fresh UUID when omitted.
    #[arg(long, value_name = "ID")]
    pub command_id: Option<String>,
    /// The lane (`amqp.lanes`) whose commands queue takes it; the first lane
    /// when omitted (the commands queue itself without lanes).
    #[arg(long, value_name = "NAME")]
    pub lane: Option<String>,
    /// Wait for the command's result event and print it. Exit status: 0 when
    /// it succeeded, 1 when it failed, 2 when none came in time.
    #[arg(long)]
    pub wait: bool,
    /// With `--wait`: how long to wait for the result, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60, requires = "wait")]
    pub timeout_secs: u64,
}

/// `dead-letters list` flags.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// One JSON object per dead letter and line, for scripts, instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `dead-letters show` flags.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The command whose dead letter to show.
    #[arg(long = "command-id", value_name = "ID")]
    pub command_id: String,
}

/// `dead-letters purge` flags: which dead letters to remove.
#[derive(Debug, Args)]
#[command(group(
    clap::ArgGroup::new("selection")
        .required(true)
        .multiple(false)
        .args(["command_id", "code"])
))]
pub struct PurgeArgs {
    /// Remove the dead letter of this command (repeat the flag for several).
    #[arg(long = "command-id", value_name = "ID")]
    pub command_id: Vec<String>,
    /// Remove every dead letter with this error code (the codes a command
    /// is dead-lettered with).
    #[arg(long, value_name = "CODE",
          value_parser = ["invalid_command", "retries_exhausted", "unexpected_response"])]
    pub code: Option<String>,
    /// Show what would be removed, and remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove without asking (for scripts).
    #[arg(long, conflicts_with = "dry_run")]
    pub yes: bool,
}

/// `dead-letters replay` flags: which dead letters to move back.
#[derive(Debug, Args)]
#[command(group(
    clap::ArgGroup::new("selection")
        .required(true)
        .args(["command_id", "all"])
))]
pub struct ReplayArgs {
    /// Replay the dead letter of this command (repeat the flag for several).
    #[arg(long = "command-id", value_name = "ID")]
    pub command_id: Vec<String>,
    /// Replay every dead letter.
    #[arg(long)]
    pub all: bool,
    /// Replay even a command first attempted nearly 24 hours ago or more:
    /// Hyperline has then forgotten its Idempotency-Key and may charge the
    /// customer a second time. Check the ledger first.
    #[arg(long)]
    pub force: bool,
}

/// `demo` flags.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How many sample commands to publish (about 5% of them deliberately invalid).
    #[arg(long, value_name = "N", default_value_t = 300,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub commands: u32,
    /// Give up after this many seconds from the first publish, and list the
    /// commands still without a result.
    #[arg(long, value_name = "SECS", default_value_t = 50)]
    pub timeout_secs: u64,
    /// Seed of the simulator's fault dice, for a reproducible run.
    #[arg(long)]
    pub seed: Option<u64>,
}

/// `simulator` flags (docs/contract.md section 8).
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
