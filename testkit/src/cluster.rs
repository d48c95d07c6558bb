//! A real RabbitMQ cluster on this machine, started by a test.
//!
//! Quorum queues, leader elections and a worker moving to another node only
//! happen on a cluster, so the tests need one; a mock would prove nothing.
//! The nodes come from `.ci/broker`, the broker matrix CI runs the suite on:
//! RabbitMQ of the Debian suite [`SUITE_VAR`] names (`bookworm`, the
//! machine's 3.10, by default; `trixie` 4.0 or `sid` 4.3 from a root of their
//! own), each node with a name, AMQP and distribution ports, data, logs, an
//! Erlang cookie and configuration of its own under a temporary folder, and
//! the plugins off (no management or Prometheus listeners to collide with
//! the local broker, which is left alone, as is the user's own cookie).
//! Nodes two and more join the first.
//!
//! Every wait is bounded (the script bounds its own). [`Cluster`]'s `Drop`
//! stops the nodes (`.ci/broker down`) and removes the folder, also when a
//! test panics.
//!
//! Blocking: the calls run `rabbitmqctl` or the script and wait for them.
//! From an async test, call them in `tokio::task::block_in_place` (a
//! multi-threaded runtime) so the worker under test keeps running meanwhile.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long a stopped app gets to start again.
const BOOT: Duration = Duration::from_secs(90);

/// How long one `rabbitmqctl` call may take.
const CTL: Duration = Duration::from_secs(60);

/// Names the Debian suite whose RabbitMQ the nodes run: `bookworm` (3.10,
/// the default), `trixie` (4.0) or `sid` (4.3). CI sets it on its 4.x legs,
/// with the test broker of [`crate::broker::AMQP_URL_VAR`] of that suite.
pub const SUITE_VAR: &str = "CPW_TEST_BROKER_SUITE";

/// The suite [`SUITE_VAR`] names, `bookworm` when unset.
pub fn suite() -> String {
    std::env::var(SUITE_VAR).unwrap_or_else(|_| "bookworm".to_owned())
}

/// The broker matrix script of the repository.
fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/broker")
}

/// Where Debian installs the machine's own RabbitMQ (suite `bookworm`).
const DEBIAN_BIN: &str = "/usr/lib/rabbitmq/bin";

/// Clusters started by this process, for unique node names.
static STARTED: AtomicU32 = AtomicU32::new(0);

/// One node of the cluster.
pub struct Node {
    /// Erlang node name, `name@localhost`.
    pub name: String,
    /// AMQP port on 127.0.0.1.
    pub port: u16,
    /// Its `rabbitmqctl`, aimed at it (the suite's, with the cookie).
    ctl: PathBuf,
    /// Whether its VM runs (false after [`Cluster::kill`]).
    running: bool,
}

/// A running cluster; stopped and removed on drop.
pub struct Cluster {
    /// The nodes, the first being the one the others joined.
    pub nodes: Vec<Node>,
    /// The state folder `.ci/broker` keeps the whole cluster in.
    dir: PathBuf,
    /// The Debian suite of its RabbitMQ.
    pub suite: String,
    /// How long starting and joining took.
    pub started_in: Duration,
}

/// Why there is no cluster: the test says so and passes.
#[derive(Debug)]
pub struct Skip(pub String);

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Waits for `child` at most `within`; kills it after that.
fn wait_bounded(child: &mut Child, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// Runs `.ci/broker args…` (which bounds its own waits); its standard
/// output, or a panic with what it printed.
fn broker(args: &[&str]) -> String {
    let out = Command::new(script())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!(".ci/broker {args:?} runs: {e}"));
    assert!(
        out.status.success(),
        ".ci/broker {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Cluster {
    /// Starts `size` nodes of [`suite`] and joins them into one cluster;
    /// `Err(Skip)` when the machine's RabbitMQ is not installed and no other
    /// suite is asked for. Panics when RabbitMQ fails to form the cluster in
    /// time: that is a failure, not a reason to skip.
    pub fn start(size: usize) -> Result<Cluster, Skip> {
        Cluster::start_with(size, &[])
    }

    /// [`Cluster::start`], with `config` lines (`consumer_timeout = 5000`)
    /// added to every node's `rabbitmq.conf`: for a test that needs a
    /// broker setting the machine's broker, shared by every test, must not
    /// get.
    pub fn start_with(size: usize, config: &[&str]) -> Result<Cluster, Skip> {
        let suite = suite();
        if suite == "bookworm" && !Path::new(DEBIAN_BIN).join("rabbitmq-server").is_file() {
            return Err(Skip(format!(
                "rabbitmq-server is not installed in {DEBIAN_BIN} (.ci/run installs it)"
            )));
        }
        let begun = Instant::now();
        let serial = STARTED.fetch_add(1, Ordering::Relaxed);
        let tag = format!("cpw{}x{serial}", std::process::id());
        let dir = std::env::temp_dir().join(format!("cpw-cluster-{tag}"));
        let dir_arg = dir.to_string_lossy().into_owned();
        let nodes = size.to_string();
        let mut args = vec![
            "up", &suite, "--nodes", &nodes, "--name", &tag, "--dir", &dir_arg,
        ];
        for line in config {
            args.extend(["--config", line]);
        }
        let out = broker(&args);
        let vars: HashMap<&str, &str> = out
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (k, v.trim_matches('\'')))
            .collect();
        let var = |key: String| {
            vars.get(key.as_str())
                .map(|v| (*v).to_owned())
                .unwrap_or_else(|| panic!(".ci/broker up printed no {key}:\n{out}"))
        };
        let nodes = (1..=size)
            .map(|i| Node {
                name: var(format!("CPW_BROKER_NODE_{i}")),
                port: var(format!("CPW_BROKER_PORT_{i}"))
                    .parse()
                    .expect("a port number"),
                ctl: PathBuf::from(var(format!("CPW_BROKER_CTL_{i}"))),
                running: true,
            })
            .collect();
        Ok(Cluster {
            nodes,
            dir,
            suite,
            started_in: begun.elapsed(),
        })
    }

    /// `rabbitmqctl` of node `i`, quiet, with `args`.
    fn command(&self, i: usize, args: &[&str]) -> Command {
        let mut command = Command::new(&self.nodes[i].ctl);
        command.arg("-q").args(args).stdin(Stdio::null());
        command
    }

    /// `rabbitmqctl -q -n <node i> args…`, bounded; whether it succeeded.
    pub fn ctl(&self, i: usize, args: &[&str]) -> bool {
        let child = self
            .command(i, args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match child {
            Ok(mut child) => wait_bounded(&mut child, CTL),
            Err(_) => false,
        }
    }

    /// What `rabbitmqctl -q -n <node i> args…` printed, if it succeeded.
    pub fn ctl_output(&self, i: usize, args: &[&str]) -> Option<String> {
        let child = self
            .command(i, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        // Output small enough for the pipe; the wait is bounded by `CTL`.
        let deadline = Instant::now() + CTL;
        let mut child = child;
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return None;
                }
            }
        }
        let mut out = String::new();
        std::io::Read::read_to_string(&mut child.stdout.take()?, &mut out).ok()?;
        Some(out)
    }

    /// The index of the node holding the leader of quorum queue `queue`, as
    /// node `asked` sees it.
    pub fn leader_of(&self, asked: usize, queue: &str) -> Option<usize> {
        let out = self.ctl_output(asked, &["list_queues", "name", "leader"])?;
        let leader = out
            .lines()
            .filter_map(|line| line.split_once('\t'))
            .find(|(name, _)| *name == queue)
            .map(|(_, leader)| leader.trim().to_owned())?;
        self.nodes.iter().position(|n| n.name == leader)
    }

    fn ctl_ok(&self, i: usize, args: &[&str]) {
        assert!(
            self.ctl(i, args),
            "rabbitmqctl {args:?} on {} failed; see {}",
            self.nodes[i].name,
            self.node_dir(i).display()
        );
    }

    /// Waits until node `i` runs RabbitMQ, bounded by [`BOOT`].
    pub fn await_startup(&self, i: usize) {
        let deadline = Instant::now() + BOOT;
        // `await_startup` returns at once while the node has not yet
        // registered with epmd, so it is asked again until it says yes.
        while !self.ctl(i, &["await_startup", "--timeout", "30"]) {
            assert!(
                Instant::now() < deadline,
                "node {} did not start within {BOOT:?}; see {}",
                self.nodes[i].name,
                self.node_dir(i).display()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f` of node `i`.
    pub fn url(&self, i: usize) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.nodes[i].port)
    }

    /// Every node's URL, in order.
    pub fn urls(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.url(i)).collect()
    }

    /// Which node has this AMQP port.
    pub fn node_with_port(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.port == port)
    }

    /// Stops node `i` hard: SIGKILL to its Erlang VM, as a crashed machine
    /// (`.ci/broker kill`). A node already killed is left alone.
    pub fn kill(&mut self, i: usize) {
        if !self.nodes[i].running {
            return;
        }
        broker(&["kill", &self.dir.to_string_lossy(), &(i + 1).to_string()]);
        self.nodes[i].running = false;
    }

    /// Stops node `i` gracefully, keeping its VM: `rabbitmqctl stop_app`.
    pub fn stop_app(&self, i: usize) {
        self.ctl_ok(i, &["stop_app"]);
    }

    /// Brings node `i` back after [`Cluster::kill`] or [`Cluster::stop_app`],
    /// and waits until it runs, bounded.
    pub fn bring_back(&mut self, i: usize) {
        if self.nodes[i].running {
            self.ctl_ok(i, &["start_app"]);
        } else {
            // On its data: it rejoins its cluster by itself.
            broker(&["start", &self.dir.to_string_lossy(), &(i + 1).to_string()]);
            self.nodes[i].running = true;
        }
        self.await_startup(i);
    }

    /// Node `i`'s folder (data, logs, configuration): where to look when it
    /// misbehaves.
    fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("n{}", i + 1))
    }
}

impl Drop for Cluster {
    /// Hard stops (`.ci/broker down` kills every node and removes the
    /// folder): the data goes with the folder, so a graceful stop (seconds
    /// per node) would buy nothing. Never a panic here: a test that already
    /// failed should say why, not this.
    fn drop(&mut self) {
        let stopped = Command::new(script())
            .args(["down", &self.dir.to_string_lossy()])
            .stdin(Stdio::null())
            .output();
        match stopped {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                ".ci/broker down {} failed ({}):\n{}",
                self.dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!(".ci/broker down {} did not run: {e}", self.dir.display()),
        }
    }
}
