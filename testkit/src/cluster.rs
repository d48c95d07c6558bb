//! A real three-node RabbitMQ cluster on this machine, started by a test.
//!
//! Quorum queues, leader elections and a worker moving to another node only
//! happen on a cluster, so the tests need one; a mock would prove nothing.
//! Each node is the installed `rabbitmq-server` with a node name, AMQP and
//! distribution ports, data, logs and configuration of its own under a
//! temporary folder, and the plugins off (no management or Prometheus
//! listeners to collide with the local broker). Nodes two and three join the
//! first with `rabbitmqctl join_cluster`. The Erlang cookie is shared through
//! `$HOME/.erlang.cookie`, with `HOME` pointing into the temporary folder:
//! the machine's broker at 127.0.0.1:5672, which every other test uses, and
//! the user's own cookie are left alone.
//!
//! Every wait is bounded. [`Cluster`]'s `Drop` kills the nodes and removes
//! the folder, also when a test panics.
//!
//! Blocking: the calls run `rabbitmqctl` and wait for it. From an async test,
//! call them in `tokio::task::block_in_place` (a multi-threaded runtime) so
//! the worker under test keeps running meanwhile.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long a node gets to boot, and a stopped app to start again.
const BOOT: Duration = Duration::from_secs(90);

/// How long one `rabbitmqctl` call may take.
const CTL: Duration = Duration::from_secs(60);

/// Where Debian installs the real scripts. `/usr/sbin/rabbitmq-server` is a
/// wrapper that switches to the `rabbitmq` user, whose home holds the local
/// broker's cookie and who could not write our folder.
const DEBIAN_BIN: &str = "/usr/lib/rabbitmq/bin";

/// Clusters started by this process, for unique node names.
static STARTED: AtomicU32 = AtomicU32::new(0);

/// One node of the cluster.
pub struct Node {
    /// Erlang node name, `name@localhost`.
    pub name: String,
    /// AMQP port on 127.0.0.1.
    pub port: u16,
    /// Erlang distribution port.
    dist: u16,
    /// Its folder: data, logs, configuration, pid file.
    dir: PathBuf,
    /// The `rabbitmq-server` process.
    server: Option<Child>,
}

/// A running cluster; stopped and removed on drop.
pub struct Cluster {
    /// The nodes, the first being the one the others joined.
    pub nodes: Vec<Node>,
    /// The temporary folder of the whole cluster.
    dir: PathBuf,
    /// Directory of `rabbitmq-server` and `rabbitmqctl`.
    bin: PathBuf,
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

/// Names the directory of `rabbitmq-server` and `rabbitmqctl` where they are
/// somewhere else than Debian's place or the `PATH`.
pub const BIN_VAR: &str = "CPW_TEST_RABBITMQ_BIN";

/// The directory of the installed `rabbitmq-server`, if any.
fn server_bin() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(BIN_VAR) {
        let dir = PathBuf::from(dir);
        return dir.join("rabbitmq-server").is_file().then_some(dir);
    }
    let debian = Path::new(DEBIAN_BIN);
    if debian.join("rabbitmq-server").is_file() {
        return Some(debian.to_owned());
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path).find(|dir| dir.join("rabbitmq-server").is_file())
    })
}

/// A port nobody listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
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

impl Cluster {
    /// Starts `size` nodes and joins them into one cluster; `Err(Skip)` when
    /// RabbitMQ is not installed. Panics when an installed RabbitMQ fails to
    /// form the cluster in time: that is a failure, not a reason to skip.
    pub fn start(size: usize) -> Result<Cluster, Skip> {
        let bin = server_bin().ok_or_else(|| {
            Skip(format!(
                "rabbitmq-server is not installed (.ci/run installs it; {BIN_VAR} names its directory)"
            ))
        })?;
        let begun = Instant::now();
        let serial = STARTED.fetch_add(1, Ordering::Relaxed);
        let tag = format!("cpw{}x{serial}", std::process::id());
        let dir = std::env::temp_dir().join(format!("cpw-cluster-{tag}"));
        let home = dir.join("home");
        std::fs::create_dir_all(&home).expect("cluster folder");
        let cookie = home.join(".erlang.cookie");
        std::fs::write(&cookie, format!("CPWTESTCOOKIE{tag}")).expect("cookie");
        set_owner_only(&cookie);
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("plugins file");
        std::fs::write(dir.join("rabbitmq-env.conf"), "").expect("env file");

        let mut cluster = Cluster {
            nodes: Vec::new(),
            dir,
            bin,
            started_in: Duration::ZERO,
        };
        for i in 1..=size {
            let short = format!("{tag}n{i}");
            let dir = cluster.dir.join(&short);
            let mut node = Node {
                name: format!("{short}@localhost"),
                port: free_port(),
                dist: free_port(),
                dir,
                server: None,
            };
            node.server = Some(cluster.spawn_server(&node));
            cluster.nodes.push(node);
        }
        for i in 0..size {
            cluster.await_startup(i);
        }
        let first = cluster.nodes[0].name.clone();
        for i in 1..size {
            cluster.ctl_ok(i, &["stop_app"]);
            cluster.ctl_ok(i, &["join_cluster", &first]);
            cluster.ctl_ok(i, &["start_app"]);
        }
        for i in 0..size {
            cluster.await_startup(i);
        }
        cluster.started_in = begun.elapsed();
        Ok(cluster)
    }

    /// Starts `rabbitmq-server` for `node`, whose folder keeps its data
    /// across restarts (a restarted node rejoins its cluster by itself).
    fn spawn_server(&self, node: &Node) -> Child {
        let dir = &node.dir;
        std::fs::create_dir_all(dir).expect("node folder");
        let conf = dir.join("rabbitmq.conf");
        std::fs::write(
            &conf,
            format!(
                "listeners.tcp.default = 127.0.0.1:{}\nloopback_users = none\n",
                node.port
            ),
        )
        .expect("node configuration");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("stdout.log"))
            .expect("node log");
        self.command("rabbitmq-server")
            .env("RABBITMQ_NODENAME", &node.name)
            .env("RABBITMQ_NODE_PORT", node.port.to_string())
            .env("RABBITMQ_DIST_PORT", node.dist.to_string())
            .env("RABBITMQ_CONFIG_FILE", &conf)
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .stdout(log.try_clone().map_or_else(|_| Stdio::null(), Stdio::from))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("rabbitmq-server starts")
    }

    /// A command of the installed RabbitMQ, with this cluster's cookie and
    /// none of the machine's `rabbitmq-env.conf` (which names the local node).
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        command
            .env("HOME", self.dir.join("home"))
            .env("RABBITMQ_CONF_ENV_FILE", self.dir.join("rabbitmq-env.conf"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir.join("enabled_plugins"),
            )
            .stdin(Stdio::null());
        command
    }

    /// `rabbitmqctl -q -n <node i> args…`, bounded; whether it succeeded.
    pub fn ctl(&self, i: usize, args: &[&str]) -> bool {
        let child = self
            .command("rabbitmqctl")
            .args(["-q", "-n", &self.nodes[i].name])
            .args(args)
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
            .command("rabbitmqctl")
            .args(["-q", "-n", &self.nodes[i].name])
            .args(args)
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
            self.nodes[i].dir.display()
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
                self.nodes[i].dir.display()
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

    /// Stops node `i` hard: SIGKILL to its Erlang VM, as a crashed machine.
    /// A node already killed is left alone: its pid file goes with it, so a
    /// pid the system has since given to another process is never signalled.
    pub fn kill(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let Some(mut server) = node.server.take() else {
            return;
        };
        let pid_file = node.dir.join("pid");
        if let Ok(pid) = std::fs::read_to_string(&pid_file) {
            let _ = Command::new("kill")
                .args(["-9", pid.trim()])
                .stderr(Stdio::null())
                .status();
            let _ = std::fs::remove_file(&pid_file);
        }
        let _ = server.kill();
        let _ = wait_bounded(&mut server, CTL);
    }

    /// Stops node `i` gracefully, keeping its VM: `rabbitmqctl stop_app`.
    pub fn stop_app(&self, i: usize) {
        self.ctl_ok(i, &["stop_app"]);
    }

    /// Brings node `i` back after [`Cluster::kill`] or [`Cluster::stop_app`],
    /// and waits until it runs, bounded.
    pub fn bring_back(&mut self, i: usize) {
        if self.nodes[i].server.is_some() {
            self.ctl_ok(i, &["start_app"]);
        } else {
            let server = self.spawn_server(&self.nodes[i]);
            self.nodes[i].server = Some(server);
        }
        self.await_startup(i);
    }
}

#[cfg(unix)]
fn set_owner_only(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o400));
}

#[cfg(not(unix))]
fn set_owner_only(_: &Path) {}

impl Drop for Cluster {
    /// Hard stops: the data goes with the folder, so a graceful stop (seconds
    /// per node) would buy nothing.
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
