//! `spawn_app()`: a real worker (in-process, or as a child process) against the
//! real broker and an in-process simulator, isolated by unique names; what
//! it declares is removed when the test ends (see [`crate::guard`]).

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Once;
use std::time::Duration;

use crate::broker::{Observer, as_command, worker_env};
use crate::guard::Declared;
use crate::wait_until;
use credit_purchase_worker::broker::history::STEP_HEADER;
use credit_purchase_worker::broker::{Mismatch, Topology, header_u64};
use credit_purchase_worker::configuration::Settings;
use credit_purchase_worker::simulator::{
    Faults, FaultsPatch, Ledger, ScriptedResponse, Simulator, SimulatorSettings,
};
use credit_purchase_worker::startup::Application;
use lapin::options::{BasicGetOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use crate::WAIT;
pub use crate::broker::Event;
pub use crate::commands::{command, command_for, command_id};

pub const SIM_KEY: &str = "sim_test_key";

static TRACING: Once = Once::new();

/// Logs only with TEST_LOG set, as zero-to-production does.
pub fn init_tracing() {
    TRACING.call_once(|| {
        if std::env::var("TEST_LOG").is_ok() {
            credit_purchase_worker::telemetry::init(
                credit_purchase_worker::configuration::LogFormat::Pretty,
                "info",
            );
        }
    });
}

/// A canned answer of the simulator for `customer`'s purchases, `times`
/// times (`None`: for good).
pub fn scripted(
    customer: &str,
    status: u16,
    body: serde_json::Value,
    headers: &[(&str, &str)],
    times: Option<u32>,
) -> ScriptedResponse {
    ScriptedResponse {
        customer_id: Some(customer.into()),
        status,
        body,
        headers: headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        times,
    }
}

/// The simulator in-process on a free port of the loopback interface.
pub async fn start_simulator(settings: SimulatorSettings) -> Simulator {
    Simulator::start("127.0.0.1:0".parse().expect("addr"), settings)
        .await
        .expect("the simulator starts")
}

/// Tunables of a test app.
pub struct Options {
    pub env: Vec<(String, String)>,
    pub faults: Faults,
    /// The key the simulator accepts and the worker is given.
    pub api_key: String,
    /// The broker node of the test's own connection (publishing, observing,
    /// depths), when not the test broker: a cluster test keeps it off the
    /// node it kills.
    pub driver_url: Option<String>,
    /// The start of the queue names, telling one test binary's leftovers
    /// from another's in `rabbitmqctl list_queues`.
    pub prefix: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            env: Vec::new(),
            faults: Faults {
                rate_limit: 0,
                ..Faults::default()
            },
            api_key: SIM_KEY.to_owned(),
            driver_url: None,
            prefix: "cpw-test".to_owned(),
        }
    }
}

impl Options {
    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        self.env.push((key.to_owned(), value.to_string()));
        self
    }
    pub fn faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }
    /// The test's own connection goes to `url`; see [`Options::driver_url`].
    pub fn driver(mut self, url: &str) -> Self {
        self.driver_url = Some(url.to_owned());
        self
    }
    pub fn api_key(mut self, key: &str) -> Self {
        self.api_key = key.to_owned();
        self
    }
    pub fn prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.to_owned();
        self
    }
}

/// What the binary's standard streams do in [`TestApp::cli_with`].
#[derive(Clone, Copy)]
pub enum Io<'a> {
    /// stdin empty, stdout read.
    Nothing,
    /// stdin holds this text.
    Stdin(&'a str),
    /// stdout closed by its reader before the binary writes.
    ClosedStdout,
}

/// One worker with its own queue names, simulator and observers.
pub struct TestApp {
    pub queue: String,
    pub results_exchange: String,
    pub connection_name: String,
    pub sim: Simulator,
    pub env: BTreeMap<String, String>,
    pub topology: Topology,
    pub ops_addr: Option<std::net::SocketAddr>,
    /// In confirm mode: what the tests publish on it is confirmed.
    pub channel: Channel,
    /// Bound to the results exchange before the worker starts.
    pub events: Observer,
    /// The test's own connection (publishing, observing, depths).
    pub connection: Connection,
    worker: Option<(CancellationToken, JoinHandle<Result<(), Mismatch>>)>,
    /// Last, so that it drops after the worker has been told to stop.
    declared: Declared,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(Options::default()).await
}

/// Starts the simulator, the observer and the worker in-process;
/// [`spawn_without_worker`] leaves the worker to the test.
pub async fn spawn_app_with(options: Options) -> TestApp {
    let mut app = spawn_without_worker(options).await;
    app.start_worker().await;
    app
}

/// Everything but the worker: for tests that run the binary as a process.
pub async fn spawn_without_worker(options: Options) -> TestApp {
    init_tracing();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let queue = format!("{}-{tag}", options.prefix);
    let connection_name = format!("{}-worker-{tag}", options.prefix);
    let sim = start_simulator(SimulatorSettings {
        api_key: options.api_key.clone(),
        faults: options.faults,
        seed: None,
    })
    .await;
    let mut env = worker_env(&queue, &sim.base_url(), &options.api_key);
    env.extend(
        [
            ("CPW__AMQP__CONNECTION_NAME", connection_name.as_str()),
            ("CPW__AMQP__PREFETCH", "32"),
            ("CPW__HYPERLINE__TIMEOUT_SECS", "2"),
            ("CPW__RETRY__ATTEMPTS", "4"),
            ("CPW__RETRY__INITIAL_BACKOFF_MS", "10"),
            ("CPW__RETRY__MAX_BACKOFF_MS", "50"),
            ("CPW__RETRY__CONFLICT_DELAY_MS", "100"),
            ("CPW__RETRY__REDELIVERY_DELAYS_SECS", "1,2"),
            ("CPW__WORKER__SHUTDOWN_GRACE_SECS", "10"),
            ("CPW__LOG__FORMAT", "json"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    env.extend(options.env);

    let driver = options.driver_url.unwrap_or_else(crate::broker::amqp_url);
    let mut declared = Declared::on(&driver);
    let connection = credit_purchase_worker::broker::connect(&driver, "cpw-test-driver", None)
        .await
        .expect("broker reachable");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    // Declare the topology up front so publishes made before the worker is
    // up are not lost; the worker's own declaration must agree with it.
    let settings = Settings::load_from(None, env.clone()).expect("test settings are valid");
    let results_exchange = settings.amqp.results_exchange.clone();
    let topology = Topology::new(&settings.amqp, &settings.retry.redelivery_delays_secs);
    declared.add_topology(&topology);
    topology.declare(&connection).await.expect("topology");
    let events = Observer::bind(&connection, &results_exchange)
        .await
        .expect("observer queue");
    TestApp {
        queue,
        results_exchange,
        connection_name,
        sim,
        env,
        topology,
        ops_addr: None,
        channel,
        events,
        connection,
        worker: None,
        declared,
    }
}

impl TestApp {
    pub fn settings(&self) -> Settings {
        Settings::load_from(None, self.env.clone()).expect("test settings are valid")
    }

    /// Starts the worker in-process (again, after [`TestApp::stop_worker`]).
    pub async fn start_worker(&mut self) {
        let app = Application::build(self.settings())
            .await
            .expect("worker builds");
        self.ops_addr = Some(app.ops_addr());
        let token = CancellationToken::new();
        let handle = tokio::spawn(app.run_until_stopped(token.clone()));
        self.worker = Some((token, handle));
    }

    /// Graceful stop of the in-process worker, bounded.
    pub async fn stop_worker(&mut self) {
        if let Some((token, handle)) = self.worker.take() {
            token.cancel();
            tokio::time::timeout(WAIT, handle)
                .await
                .expect("worker stops in time")
                .expect("worker task")
                .expect("the test topology matches the worker's");
        }
    }

    /// Stops the worker and starts a new one on the same settings: what the
    /// first one knew in memory is gone.
    pub async fn restart_worker(&mut self) {
        self.stop_worker().await;
        self.start_worker().await;
    }

    /// Runs the binary with `args`, this app's settings (and nothing else of
    /// the test's environment) and `extra` variables; bounded by [`WAIT`].
    /// The exit code, stdout and stderr.
    pub async fn cli(
        &self,
        args: &[&str],
        extra: &[(&str, &str)],
    ) -> (Option<i32>, String, String) {
        self.cli_with(args, extra, Io::Nothing).await
    }

    /// [`TestApp::cli`] with stdin fed or stdout closed by its reader. A
    /// command that outlasts [`WAIT`] is killed and the test fails with what
    /// it had written, so a hang names where it stopped (`TEST_LOG` set
    /// passes `RUST_LOG` through for more).
    pub async fn cli_with(
        &self,
        args: &[&str],
        extra: &[(&str, &str)],
        io: Io<'_>,
    ) -> (Option<i32>, String, String) {
        let mut command = tokio::process::Command::new(crate::process::worker_binary());
        command
            .args(args)
            .env_clear()
            .envs(&self.env)
            .envs(extra.iter().copied());
        if let (Ok(_), Ok(level)) = (std::env::var("TEST_LOG"), std::env::var("RUST_LOG")) {
            command.env("RUST_LOG", level);
        }
        let mut child = command
            .stdin(match io {
                Io::Stdin(_) => Stdio::piped(),
                _ => Stdio::null(),
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the binary runs");
        match io {
            Io::Stdin(text) => {
                let mut stdin = child.stdin.take().expect("stdin");
                stdin.write_all(text.as_bytes()).await.expect("write stdin");
            }
            // The reader goes away before anything is written, as `| head
            // -1` does once it has its line.
            Io::ClosedStdout => drop(child.stdout.take()),
            Io::Nothing => {}
        }
        let stdout = read_to_end(child.stdout.take());
        let stderr = read_to_end(child.stderr.take());
        let status = tokio::time::timeout(WAIT, child.wait()).await;
        if status.is_err() {
            let _ = child.kill().await;
        }
        let (stdout, stderr) = (collect(stdout).await, collect(stderr).await);
        let Ok(status) = status else {
            panic!(
                "`{}` did not end within {WAIT:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
                args.join(" ")
            );
        };
        let status = status.expect("the binary runs");
        (status.code(), stdout, stderr)
    }

    /// Starts the binary as a child process with this app's configuration.
    pub fn spawn_process(&self) -> tokio::process::Child {
        self.spawn_process_with(&[])
    }

    /// [`TestApp::spawn_process`] with `extra` variables over the app's (a
    /// broker URL through a [`crate::proxy::Proxy`], say).
    pub fn spawn_process_with(&self, extra: &[(&str, &str)]) -> tokio::process::Child {
        tokio::process::Command::new(crate::process::worker_binary())
            .arg("run")
            .envs(self.env.iter())
            .envs(extra.iter().copied())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(if std::env::var("TEST_LOG").is_ok() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .kill_on_drop(true)
            .spawn()
            .expect("binary starts")
    }

    /// Publishes `n` valid commands and returns their ids.
    pub async fn publish_commands(&self, n: usize) -> Vec<String> {
        let ids: Vec<String> = (0..n).map(|_| command_id()).collect();
        for id in &ids {
            self.publish(&command(id)).await;
        }
        ids
    }

    /// The ledger holds exactly one charge for each id.
    pub fn assert_charged_once(&self, ids: &[String]) {
        let ledger = self.ledger();
        for id in ids {
            assert_eq!(ledger.charges_for(id), 1, "{id} charged exactly once");
        }
    }

    pub async fn publish(&self, body: &serde_json::Value) {
        self.publish_raw(body.to_string().as_bytes(), BasicProperties::default())
            .await;
    }

    /// Publishes `body` as a command (persistent, `application/json` over
    /// whatever `properties` say) and waits for the broker's confirm.
    pub async fn publish_raw(&self, body: &[u8], properties: BasicProperties) {
        crate::broker::publish(&self.channel, &self.queue, body, as_command(properties)).await;
    }

    /// Publishes `body` to `queue` as a command (persistent,
    /// `application/json` over `properties`), confirmed.
    pub async fn publish_to(&self, queue: &str, body: &[u8], properties: BasicProperties) {
        crate::broker::publish(&self.channel, queue, body, as_command(properties)).await;
    }

    /// The next event about `id` (skipping others'), bounded by [`WAIT`].
    pub async fn event_for(&mut self, id: &str) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let event = self.events.next_event_within(left).await;
            let event = event.expect("an event in time");
            if event.command_id() == id {
                return event.body;
            }
        }
    }

    /// Polls, bounded, until `queue` holds `n` ready messages: the worker
    /// rejects a command only after its event is confirmed, so the event
    /// can arrive first.
    pub async fn wait_depth(&self, queue: &str, n: u32) {
        wait_until(
            &format!("{queue} to hold {n}"),
            Duration::from_millis(20),
            async || self.depth(queue).await == n,
        )
        .await;
    }

    /// The next result event, bounded by `within`.
    pub async fn next_event_within(&mut self, within: Duration) -> Option<Event> {
        self.events.next_event_within(within).await
    }

    pub async fn next_event(&mut self) -> Event {
        self.events.next_event().await
    }

    /// Collects events until `done` says so, bounded by `within`.
    pub async fn events_until(
        &mut self,
        within: Duration,
        done: impl FnMut(&[Event]) -> bool,
    ) -> Vec<Event> {
        self.events.events_until(within, done).await
    }

    /// Every event until each of `ids` has one (duplicates included),
    /// bounded by [`WAIT`]; fails the test when one is still unanswered.
    pub async fn events_answering(&mut self, ids: &[String]) -> Vec<Event> {
        let answered_all = |events: &[Event]| {
            let answered: std::collections::HashSet<&str> =
                events.iter().map(|e| e.command_id()).collect();
            ids.iter().all(|id| answered.contains(id.as_str()))
        };
        let events = self.events.events_until(WAIT, answered_all).await;
        assert!(
            answered_all(&events),
            "every command answered within {WAIT:?}"
        );
        events
    }

    /// True when no further event arrives within `quiet`.
    pub async fn no_event_for(&mut self, quiet: Duration) -> bool {
        self.events.no_event_for(quiet).await
    }

    /// Messages ready in a queue (passive declare).
    pub async fn depth(&self, queue: &str) -> u32 {
        crate::broker::depth(&self.connection, queue).await
    }

    /// The commands queue of the lane `name` (`CPW__AMQP__LANES`).
    pub fn lane_queue(&self, name: &str) -> String {
        let lane = self.topology.lanes.iter().find(|lane| lane.name == name);
        lane.map(|lane| lane.queue.clone())
            .unwrap_or_else(|| panic!("no lane {name} in the test's settings"))
    }

    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.queue)
    }

    /// Waits until the commands queue has nothing ready or unacked.
    pub async fn wait_until_drained(&self) {
        // Ready messages via passive declare; unacked ones show as the
        // worker still holding them, which the caller checks via events.
        wait_until(
            "the commands queue to drain",
            Duration::from_millis(50),
            async || self.depth(&self.queue).await == 0,
        )
        .await;
    }

    /// Waits for the one `retries_exhausted` event of `id`, reached after
    /// `requests` requests, all with its key, through `steps` delay steps;
    /// checks that nothing was charged and that its one dead letter carries
    /// the steps it used.
    pub async fn expect_exhausted(&mut self, id: &str, requests: usize, steps: u64) -> Event {
        let event = self.next_event().await;
        assert_eq!(
            (event.kind(), event.code()),
            ("credit_purchase.failed", "retries_exhausted"),
            "{}",
            event.body
        );
        assert_eq!(event.body["attempts"], requests);
        assert!(
            self.no_event_for(Duration::from_secs(1)).await,
            "exactly one event"
        );
        let sent = self.sim.requests();
        assert_eq!(sent.len(), requests);
        assert!(
            sent.iter()
                .all(|r| r.idempotency_key.as_deref() == Some(id)),
            "one key throughout"
        );
        assert_eq!(self.ledger().charges_for(id), 0);
        let dead = self.wait_dead_letters(1).await;
        assert_eq!(dead.len(), 1);
        assert_eq!(
            header_u64(dead[0].1.headers().as_ref(), STEP_HEADER),
            Some(steps),
            "the dead letter carries the steps it used"
        );
        event
    }

    /// Waits (bounded) until `n` dead letters are there, then takes them all.
    /// The worker publishes a command's event before it rejects the command,
    /// so the dead letter can trail the event by a moment.
    pub async fn wait_dead_letters(&self, n: u32) -> Vec<(Vec<u8>, BasicProperties)> {
        let dead = self.dead_queue();
        wait_until(
            &format!("{n} dead letters"),
            Duration::from_millis(20),
            async || self.depth(&dead).await >= n,
        )
        .await;
        self.take_dead_letters().await
    }

    /// Takes the dead letters (body, headers).
    pub async fn take_dead_letters(&self) -> Vec<(Vec<u8>, BasicProperties)> {
        let ch = self.connection.create_channel().await.expect("channel");
        let mut out = Vec::new();
        while let Some(m) = ch
            .basic_get(
                self.dead_queue().as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .expect("get")
        {
            out.push((m.delivery.data.clone(), m.delivery.properties.clone()));
        }
        out
    }

    /// Another client of the same Hyperline account spends the shared write
    /// quota, window after window, until `done` holds (bounded by [`WAIT`]).
    /// The worker paces itself by the quota it is told about, so a test that
    /// needs it to meet a 429 must have someone else spend the window; kept
    /// up until the worker has met one, this does not depend on how soon
    /// after a first spending the worker's request comes (on a loaded machine,
    /// a one-off spending can be a window behind it). The other client meets
    /// 429s too, and waits a moment after each.
    pub async fn spend_quota_until(&self, mut done: impl FnMut() -> bool) {
        let http = reqwest::Client::new();
        let key = self.env["CPW__HYPERLINE__API_KEY"].clone();
        let url = format!(
            "{}/v1/customers/cus_other/credits/itm_other/purchase",
            self.sim.base_url()
        );
        let deadline = tokio::time::Instant::now() + WAIT;
        while !done() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the other client spent the quota for {} s",
                WAIT.as_secs()
            );
            let status = http
                .post(&url)
                .bearer_auth(&key)
                .header("Idempotency-Key", command_id())
                .json(&json!({"credit_count": 1, "amount_excluding_tax": 100}))
                .send()
                .await
                .expect("the simulator answers")
                .status()
                .as_u16();
            match status {
                201 => {}
                429 => tokio::time::sleep(Duration::from_millis(20)).await,
                other => panic!("the other client's purchase: {other}"),
            }
        }
    }

    pub fn ledger(&self) -> Ledger {
        self.sim.ledger()
    }

    pub fn set_faults(&self, patch: FaultsPatch) {
        self.sim.set_faults(patch);
    }

    /// `/readyz` status code.
    pub async fn readyz(&self) -> u16 {
        let addr = self.ops_addr.expect("worker started");
        reqwest::get(format!("http://{addr}/readyz"))
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    /// `/readyz`'s body (`connected=… node=host:port`), empty if unreachable.
    pub async fn readyz_body(&self) -> String {
        let addr = self.ops_addr.expect("worker started");
        match reqwest::get(format!("http://{addr}/readyz")).await {
            Ok(answer) => answer.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Polls `/readyz` until it answers `status`, bounded.
    pub async fn wait_readyz(&self, status: u16) {
        wait_until(
            &format!("/readyz to answer {status}"),
            Duration::from_millis(50),
            async || self.readyz().await == status,
        )
        .await;
    }

    /// The worker's `/metrics` text.
    pub async fn metrics(&self) -> String {
        let addr = self.ops_addr.expect("worker started");
        reqwest::get(format!("http://{addr}/metrics"))
            .await
            .expect("/metrics answers")
            .text()
            .await
            .expect("a body")
    }

    /// The value of one sample of `/metrics` (`name{labels}` as printed), 0
    /// when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
            .and_then(|value| value.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits until the simulator saw at least `n` purchase requests.
    pub async fn wait_requests(&self, n: usize) {
        wait_until(
            &format!("{n} requests to reach the simulator"),
            Duration::from_millis(20),
            async || self.sim.requests().len() >= n,
        )
        .await;
    }

    /// Closes this app's worker connections from the broker side.
    pub fn cut_connections(&self) -> usize {
        cut_connections_named(&self.connection_name)
    }

    /// `queue`, declared by the test beside the topology, is deleted with it
    /// when the test ends.
    pub fn guard_queue(&mut self, queue: &str) {
        self.declared.add_queue(queue);
    }

    /// Stops the worker gracefully (checking that it stops in time) and
    /// deletes this test's queues and exchanges; a test that fails before
    /// this leaves them to `Drop`.
    pub async fn cleanup(mut self) {
        self.stop_worker().await;
        self.declared.delete_now();
    }
}

impl Drop for TestApp {
    /// A test that failed leaves its worker running: it is stopped before
    /// the guard deletes the names, so that it does not declare them again.
    fn drop(&mut self) {
        if let Some((token, handle)) = self.worker.take() {
            token.cancel();
            handle.abort();
        }
    }
}

/// `rabbitmqctl close_connection` on every connection with that name.
pub fn cut_connections_named(name: &str) -> usize {
    let out = crate::broker::rabbitmqctl()
        .args(["list_connections", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut cut = 0;
    for line in text.lines().filter(|l| l.contains(&format!("\"{name}\""))) {
        let Some(pid) = line.split_whitespace().next() else {
            continue;
        };
        let status = crate::broker::rabbitmqctl()
            .args(["close_connection", pid, "test: cutting the connection"])
            .status()
            .expect("rabbitmqctl runs");
        if status.success() {
            cut += 1;
        }
    }
    cut
}

/// Reads a child's pipe to its end in the background, so a child that
/// fills the pipe never blocks on a reader that waits for it to exit.
fn read_to_end<R>(pipe: Option<R>) -> JoinHandle<Vec<u8>>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut pipe, &mut bytes).await;
        }
        bytes
    })
}

/// What [`read_to_end`] read, as text.
async fn collect(reader: JoinHandle<Vec<u8>>) -> String {
    String::from_utf8_lossy(&reader.await.unwrap_or_default()).into_owned()
}
