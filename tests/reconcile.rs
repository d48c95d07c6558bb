//! `dead-letters reconcile` run as the real binary against the real broker,
//! an in-process simulator (whose credit transactions it reads) and, where a
//! dead letter must be made or a replay bought, the worker in-process. Each
//! test has its own queue names and its own simulator.

use std::collections::BTreeMap;
use std::process::{Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cpw_testkit::broker::{
    Observer, as_command, connect, delete_topology, depth, sealed, worker_env,
};
use cpw_testkit::commands::{command, command_for, command_id};
use cpw_testkit::{WAIT, wait_until};
use credit_purchase_worker::broker::history::{
    ATTEMPTS_HEADER, DEAD_LETTERED_HEADER, ERROR_CODE_HEADER, FIRST_ATTEMPT_HEADER,
};
use credit_purchase_worker::broker::{Mismatch, Topology};
use credit_purchase_worker::configuration::Settings;
use credit_purchase_worker::simulator::{
    Faults, Ledger, ScriptedResponse, Simulator, SimulatorSettings,
};
use credit_purchase_worker::startup::Application;
use lapin::options::ConfirmSelectOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_credit-purchase-worker");
const SIM_KEY: &str = "sim_reconcile_key";
const GARBLED: &str = "cus_garbled";
const HOUR_MS: u64 = 3_600_000;

/// One test's world.
struct World {
    queue: String,
    env: BTreeMap<String, String>,
    sim: Simulator,
    topology: Topology,
    connection: Connection,
    channel: Channel,
    events: Observer,
    worker: Option<(CancellationToken, JoinHandle<Result<(), Mismatch>>)>,
}

/// A 201 whose body is not the documented one, given after the charge of
/// every purchase for [`GARBLED`].
fn garbled_after_charge() -> Faults {
    Faults {
        after_charge: vec![ScriptedResponse {
            customer_id: Some(GARBLED.into()),
            status: 201,
            body: json!({"status": "ok"}),
            headers: BTreeMap::new(),
            times: None,
        }],
        ..Faults::default()
    }
}

async fn setup(faults: Faults) -> World {
    let queue = format!("cpw-reconcile-{}", uuid::Uuid::new_v4().simple());
    let sim = Simulator::start(
        "127.0.0.1:0".parse().expect("addr"),
        SimulatorSettings {
            api_key: SIM_KEY.into(),
            faults: Faults {
                rate_limit: 0,
                ..faults
            },
            seed: None,
        },
    )
    .await
    .expect("simulator starts");
    let mut env = worker_env(&queue, &sim.base_url(), SIM_KEY);
    env.extend(
        [
            ("CPW__HYPERLINE__TIMEOUT_SECS", "2"),
            ("CPW__RETRY__ATTEMPTS", "2"),
            ("CPW__RETRY__INITIAL_BACKOFF_MS", "10"),
            ("CPW__RETRY__MAX_BACKOFF_MS", "50"),
            ("CPW__RETRY__REDELIVERY_DELAYS_SECS", "1"),
            ("CPW__WORKER__SHUTDOWN_GRACE_SECS", "5"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let settings = Settings::load_from(None, env.clone()).expect("valid settings");
    let connection = connect("cpw-reconcile-test")
        .await
        .expect("broker reachable");
    let topology = Topology::new(&settings.amqp, &settings.retry.redelivery_delays_secs);
    topology.declare(&connection).await.expect("topology");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let events = Observer::bind(&connection, &topology.results_exchange)
        .await
        .expect("observer");
    let app = Application::build(settings).await.expect("worker builds");
    let token = CancellationToken::new();
    let worker = Some((token.clone(), tokio::spawn(app.run_until_stopped(token))));
    World {
        queue,
        env,
        sim,
        topology,
        connection,
        channel,
        events,
        worker,
    }
}

fn now_ms() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock");
    u64::try_from(since.as_millis()).expect("ms")
}

fn long(n: u64) -> AMQPValue {
    AMQPValue::LongLongInt(i64::try_from(n).expect("fits"))
}

impl World {
    /// Runs `dead-letters reconcile` with `args`, bounded.
    async fn reconcile(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let child = tokio::process::Command::new(BIN)
            .args(["dead-letters", "reconcile"])
            .args(args)
            .env_clear()
            .envs(&self.env)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out: Output = tokio::time::timeout(WAIT, child)
            .await
            .expect("the command ends in time")
            .expect("the binary runs");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    }

    async fn publish(&self, body: &Value) {
        let queue = self.queue.clone();
        self.publish_to(&queue, body, BasicProperties::default())
            .await;
    }

    async fn publish_to(&self, queue: &str, body: &Value, properties: BasicProperties) {
        let bytes = body.to_string();
        cpw_testkit::broker::publish(
            &self.channel,
            queue,
            bytes.as_bytes(),
            as_command(properties),
        )
        .await;
    }

    /// A dead letter as the worker leaves one for `retries_exhausted`,
    /// placed straight in the dead-letter queue: first request
    /// `first_attempt_ms`, nothing charged.
    async fn exhausted_dead_letter(&self, body: &Value, first_attempt_ms: u64) {
        let mut headers = FieldTable::default();
        let mut put = |k: &str, v: AMQPValue| {
            headers.insert(ShortString::from(k), v);
        };
        put(
            ERROR_CODE_HEADER,
            AMQPValue::LongString(LongString::from("retries_exhausted")),
        );
        put(FIRST_ATTEMPT_HEADER, long(first_attempt_ms));
        put(DEAD_LETTERED_HEADER, long(first_attempt_ms + 60_000));
        put(ATTEMPTS_HEADER, long(6));
        let dead = self.topology.dead.clone();
        let props = BasicProperties::default().with_headers(headers);
        let props = sealed(props, body.to_string().as_bytes(), SIM_KEY);
        self.publish_to(&dead, body, props).await;
    }

    /// The next event about `id`, bounded.
    async fn event_for(&mut self, id: &str) -> Value {
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

    async fn depth(&self, queue: &str) -> u32 {
        depth(&self.connection, queue).await
    }

    async fn wait_depth(&self, queue: &str, n: u32) {
        wait_until(
            &format!("{queue} to hold {n}"),
            Duration::from_millis(20),
            async || self.depth(queue).await == n,
        )
        .await;
    }

    /// A garbled purchase of `id`: charged, answered with a broken 201,
    /// `unexpected_response`, dead-lettered.
    async fn garbled_dead_letter(&mut self, id: &str) {
        self.publish(&command_for(id, GARBLED)).await;
        let event = self.event_for(id).await;
        assert_eq!(event["error"]["code"], "unexpected_response", "{event}");
        assert_eq!(self.sim.ledger().charges_for(id), 1, "charged");
    }

    /// What a dry run must leave as it was: queues and the ledger.
    async fn state(&self) -> (u32, u32, Vec<String>, u64) {
        let Ledger {
            charges, requests, ..
        } = self.sim.ledger();
        let invoices = charges.into_iter().map(|c| c.invoice_id).collect();
        (
            self.depth(&self.topology.dead).await,
            self.depth(&self.queue).await,
            invoices,
            requests,
        )
    }

    async fn cleanup(mut self) {
        if let Some((token, task)) = self.worker.take() {
            token.cancel();
            let _ = tokio::time::timeout(WAIT, task).await;
        }
        delete_topology(&self.connection, &self.topology).await;
    }
}

#[tokio::test]
async fn a_garbled_201_after_a_real_charge_is_reconciled_into_one_succeeded_event() {
    let mut world = setup(garbled_after_charge()).await;
    let id = command_id();
    world.garbled_dead_letter(&id).await;
    let dead = world.topology.dead.clone();
    world.wait_depth(&dead, 1).await;

    let (code, stdout, stderr) = world.reconcile(&["--apply"]).await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    let event = world.event_for(&id).await;
    let ledger = world.sim.ledger();
    let charge = &ledger.charges[0];
    assert_eq!(event["type"], "credit_purchase.succeeded", "{event}");
    assert_eq!(event["reconciled"], true, "{event}");
    assert_eq!(
        event["invoice_id"],
        json!(charge.invoice_id),
        "the ledger's invoice"
    );
    assert_eq!(
        event["new_credit_balance"],
        json!(charge.new_credit_balance)
    );
    assert_eq!(event["attempts"], 1);
    let transaction = &world.sim.transactions()[0];
    assert!(
        stderr.contains(&format!(
            "command_id={id} transaction_id={}",
            transaction.id
        )),
        "the action is logged with both ids:\n{stderr}"
    );
    world.wait_depth(&dead, 0).await;
    assert!(world.events.no_event_for(Duration::from_secs(2)).await);
    assert_eq!(world.sim.ledger().charges.len(), 1, "nothing charged again");
    assert_eq!(world.depth(&world.queue).await, 0);
    world.cleanup().await;
}

#[tokio::test]
async fn a_never_charged_exhausted_dead_letter_is_replayed_and_charged_exactly_once() {
    let mut world = setup(Faults::default()).await;
    let id = command_id();
    // Its first request left 25 hours ago and charged nothing: a plain
    // replay would be refused at the window.
    world
        .exhausted_dead_letter(&command(&id), now_ms() - 25 * HOUR_MS)
        .await;
    let dead = world.topology.dead.clone();
    world.wait_depth(&dead, 1).await;

    let (code, stdout, stderr) = world.reconcile(&["--apply", "--json"]).await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    let row: Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert_eq!(
        (&row["found"], &row["applied"]),
        (&json!("not_charged"), &json!(true)),
        "{row}"
    );
    let event = world.event_for(&id).await;
    assert_eq!(event["type"], "credit_purchase.succeeded", "{event}");
    assert!(
        event.get("reconciled").is_none(),
        "bought, not reconciled: {event}"
    );
    assert_eq!(world.sim.ledger().charges_for(&id), 1);
    world.wait_depth(&dead, 0).await;
    assert!(world.events.no_event_for(Duration::from_secs(2)).await);
    assert_eq!(world.sim.ledger().charges_for(&id), 1, "exactly once");
    world.cleanup().await;
}

#[tokio::test]
async fn two_identical_purchases_in_the_span_are_ambiguous_and_left_alone() {
    let mut faults = garbled_after_charge();
    faults.after_charge[0].times = Some(1);
    let mut world = setup(faults).await;
    // The same customer, product, count and amount, bought together: one
    // answer is garbled, the other arrives.
    let ids = [command_id(), command_id()];
    for id in &ids {
        world.publish(&command_for(id, GARBLED)).await;
    }
    let events = world
        .events
        .events_until(WAIT, |events| events.len() == 2)
        .await;
    let mut kinds: Vec<&str> = events.iter().map(|e| e.kind()).collect();
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        ["credit_purchase.failed", "credit_purchase.succeeded"]
    );
    assert_eq!(world.sim.ledger().charges.len(), 2);
    let dead = world.topology.dead.clone();
    world.wait_depth(&dead, 1).await;
    let before = world.state().await;

    let (code, stdout, stderr) = world.reconcile(&["--apply"]).await;
    assert_eq!(code, Some(1), "left for a person:\n{stdout}\n{stderr}");
    for t in world.sim.transactions() {
        assert!(stdout.contains(&format!("candidate {}", t.id)), "{stdout}");
    }
    assert!(stdout.contains("1 ambiguous"), "{stdout}");
    assert_eq!(world.state().await, before, "nothing changed");
    assert!(world.events.no_event_for(Duration::from_secs(1)).await);
    world.cleanup().await;
}

#[tokio::test]
async fn a_dry_run_changes_nothing() {
    let mut world = setup(garbled_after_charge()).await;
    let charged = command_id();
    world.garbled_dead_letter(&charged).await;
    let never = command_id();
    world
        .exhausted_dead_letter(&command(&never), now_ms() - HOUR_MS)
        .await;
    let dead = world.topology.dead.clone();
    world.wait_depth(&dead, 2).await;
    let before = world.state().await;

    let (code, stdout, stderr) = world.reconcile(&[]).await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("would publish succeeded (reconciled)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("would replay with its history reset"),
        "{stdout}"
    );
    assert!(stdout.contains("nothing was changed"), "{stdout}");
    println!("{stdout}");
    assert!(world.events.no_event_for(Duration::from_secs(2)).await);
    assert_eq!(
        world.state().await,
        before,
        "queues and ledger as they were"
    );
    assert_eq!(world.sim.ledger().reads, 2, "one listing per customer");
    world.cleanup().await;
}
