//! `dead-letters reconcile` run as the real binary against the real broker,
//! an in-process simulator (whose credit transactions it reads) and, where a
//! dead letter must be made or a replay bought, the worker in-process. Each
//! test has its own queue names and its own simulator.

use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cpw_testkit::app::{Options, TestApp, spawn_app_with};
use cpw_testkit::broker::{connect, sealed};
use cpw_testkit::commands::{command, command_for, command_id};
use cpw_testkit::{WAIT, wait_until};
use credit_purchase_worker::admin::reconcile::act::Acting;
use credit_purchase_worker::admin::reconcile::judge::{Judged, Verdict};
use credit_purchase_worker::admin::reconcile::render::Status;
use credit_purchase_worker::admin::reconcile::select;
use credit_purchase_worker::broker::history::{
    ATTEMPTS_HEADER, DEAD_LETTERED_HEADER, ERROR_CODE_HEADER, FIRST_ATTEMPT_HEADER, QUEUE_HEADER,
};
use credit_purchase_worker::broker::{HistoryKeys, Publisher, header_str};
use credit_purchase_worker::hyperline::matching::ChargeLookup;
use credit_purchase_worker::simulator::{Faults, FaultsPatch, Ledger, ScriptedResponse};
use lapin::BasicProperties;
use lapin::options::BasicGetOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde_json::{Value, json};

const SIM_KEY: &str = "sim_reconcile_key";
const GARBLED: &str = "cus_garbled";
const HOUR_MS: u64 = 3_600_000;

/// One test's world: a [`TestApp`] on reconcile's settings, and the dead
/// letters and purchases these tests make.
struct World(TestApp);

impl Deref for World {
    type Target = TestApp;
    fn deref(&self) -> &TestApp {
        &self.0
    }
}

impl DerefMut for World {
    fn deref_mut(&mut self) -> &mut TestApp {
        &mut self.0
    }
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
    setup_with(faults, &[]).await
}

/// The clock margin of these tests' settings: 1/96 of a 96 s idempotency
/// window, short enough that the results log can be older than a charge by it.
const MARGIN_MS: u64 = 1_000;

/// How long after a transaction every command that could have made it has
/// spoken, with these tests' settings: `Settings::unseen_bound` (2 × the 3 s
/// delivery deadline, 4 × the 2 s confirm timeout) and the clock margin.
/// Until then no letter is settled with it.
const UNSEEN_MS: u64 = 14_000 + MARGIN_MS;

async fn setup_with(faults: Faults, extra: &[(&str, &str)]) -> World {
    let mut options = Options::default()
        .prefix("cpw-reconcile")
        .api_key(SIM_KEY)
        .faults(Faults {
            rate_limit: 0,
            ..faults
        })
        .env("CPW__RETRY__ATTEMPTS", 2)
        .env("CPW__RETRY__REDELIVERY_DELAYS_SECS", 1)
        .env("CPW__WORKER__SHUTDOWN_GRACE_SECS", 5)
        .env("CPW__HYPERLINE__IDEMPOTENCY_WINDOW_SECS", 96)
        .env("CPW__WORKER__DELIVERY_DEADLINE_SECS", 3)
        .env("CPW__AMQP__CONFIRM_TIMEOUT_SECS", 2);
    for (key, value) in extra {
        options = options.env(key, value);
    }
    World(spawn_app_with(options).await)
}

fn now_ms() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock");
    u64::try_from(since.as_millis()).expect("ms")
}

/// The one JSON row a `--json` run about one letter printed.
fn one_row(stdout: &str) -> Value {
    serde_json::from_str(stdout.trim()).expect("one JSON line")
}

/// How long a [`forgetful`] simulator keeps an idempotency key.
const FORGET_MS: u64 = 2_000;

/// `faults` on a simulator that forgets a key after [`FORGET_MS`]: a replay
/// after that is a new charge.
fn forgetful(faults: Faults) -> Faults {
    Faults {
        replay_ttl_secs: FORGET_MS / 1_000,
        ..faults
    }
}

/// Returns once a [`forgetful`] simulator has forgotten the keys used until
/// now.
async fn wait_keys_forgotten() {
    let used_ms = now_ms();
    wait_until(
        "Hyperline to forget the key",
        Duration::from_millis(50),
        async || now_ms() > used_ms + FORGET_MS + 500,
    )
    .await;
}

fn long(n: u64) -> AMQPValue {
    AMQPValue::LongLongInt(i64::try_from(n).expect("fits"))
}

impl World {
    /// Runs `dead-letters reconcile` with `args`, bounded.
    async fn reconcile(&self, args: &[&str]) -> (Option<i32>, String, String) {
        self.reconcile_with(args, &[]).await
    }

    /// [`World::reconcile`] with `extra` settings for the run.
    async fn reconcile_with(
        &self,
        args: &[&str],
        extra: &[(&str, &str)],
    ) -> (Option<i32>, String, String) {
        let args: Vec<&str> = ["dead-letters", "reconcile"]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        self.cli(&args, extra).await
    }

    /// Runs `dead-letters reconcile --apply --json`, asserts it exits with
    /// `code` (`context` leads the message), and returns what it printed.
    async fn apply_json(&self, code: i32, context: &str) -> String {
        let (got, stdout, stderr) = self.reconcile(&["--apply", "--json"]).await;
        assert_eq!(got, Some(code), "{context}{stdout}\n{stderr}");
        stdout
    }

    /// [`World::apply_json`] over one letter: the one row it printed.
    async fn apply_json_row(&self, code: i32, context: &str) -> Value {
        one_row(&self.apply_json(code, context).await)
    }

    /// A dead letter as the worker leaves one for `retries_exhausted`,
    /// placed straight in the dead-letter queue: first request
    /// `first_attempt_ms`, nothing charged.
    async fn exhausted_dead_letter(&self, body: &Value, first_attempt_ms: u64) {
        self.exhausted_between(body, first_attempt_ms, first_attempt_ms + 60_000)
            .await;
    }

    /// A dead letter as the worker leaves one for `retries_exhausted`,
    /// whose window ran from `first_ms` to `died_ms`.
    async fn exhausted_between(&self, body: &Value, first_ms: u64, died_ms: u64) {
        self.exhausted_in(None, body, first_ms, died_ms).await;
    }

    /// [`World::exhausted_between`], stamped as consumed from `queue` (a
    /// lane's commands queue) when one is given.
    async fn exhausted_in(&self, queue: Option<&str>, body: &Value, first_ms: u64, died_ms: u64) {
        let mut headers = FieldTable::default();
        if let Some(queue) = queue {
            headers.insert(
                ShortString::from(QUEUE_HEADER),
                AMQPValue::LongString(LongString::from(queue)),
            );
        }
        headers.insert(
            ShortString::from(ERROR_CODE_HEADER),
            AMQPValue::LongString(LongString::from("retries_exhausted")),
        );
        headers.insert(ShortString::from(FIRST_ATTEMPT_HEADER), long(first_ms));
        headers.insert(ShortString::from(DEAD_LETTERED_HEADER), long(died_ms));
        headers.insert(ShortString::from(ATTEMPTS_HEADER), long(6));
        let dead = self.topology.dead.clone();
        let props = BasicProperties::default().with_headers(headers);
        let props = sealed(props, body.to_string().as_bytes(), SIM_KEY);
        self.publish_to(&dead, body.to_string().as_bytes(), props)
            .await;
    }

    /// Gives the results log an event older than what follows by the clock
    /// margin: from then on it covers every charge (a fresh log covers
    /// nothing before its first event).
    async fn warm_log(&mut self) {
        let id = command_id();
        self.publish(&command_for(&id, "cus_warmup")).await;
        let event = self.event_for(&id).await;
        assert_eq!(event["type"], "credit_purchase.succeeded", "{event}");
        let logged = now_ms();
        wait_until(
            "the clock to pass the log's first event by the margin",
            Duration::from_millis(50),
            async || now_ms() > logged + MARGIN_MS + 200,
        )
        .await;
    }

    /// Returns once every transaction made until now is old enough to be
    /// a letter's ([`UNSEEN_MS`]).
    async fn wait_unseen(&self) {
        let made = now_ms();
        wait_until(
            "the transactions made so far to pass the unseen bound",
            Duration::from_millis(100),
            async || now_ms() > made + UNSEEN_MS + 200,
        )
        .await;
    }

    /// A purchase made straight at the simulator under `key`, as another
    /// command's would be.
    async fn buy_directly(&self, key: &str) {
        let answer = reqwest::Client::new()
            .post(format!(
                "{}/v1/customers/cus_Typ0px2W0aiEtl/credits/itm_3kXODDF42QXtnL/purchase",
                self.sim.base_url()
            ))
            .bearer_auth(SIM_KEY)
            .header("Idempotency-Key", key)
            .json(&json!({"credit_count": 32, "amount_excluding_tax": 24000}))
            .send()
            .await
            .expect("an answer");
        assert_eq!(answer.status(), 201);
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

    async fn cleanup(self) {
        self.0.cleanup().await;
    }
}

#[tokio::test]
async fn a_garbled_201_after_a_real_charge_is_reconciled_into_one_succeeded_event() {
    let mut world = setup(garbled_after_charge()).await;
    world.warm_log().await;
    let id = command_id();
    world.garbled_dead_letter(&id).await;
    let dead = world.topology.dead.clone();
    world.wait_depth(&dead, 1).await;
    world.wait_unseen().await;

    // Without a results log nothing is settled as charged, and it says so.
    let no_log = [("CPW__AMQP__RESULTS_LOG_RETENTION", "0")];
    let (code, stdout, stderr) = world.reconcile_with(&["--apply"], &no_log).await;
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("note: no results log"), "{stdout}");
    assert!(stdout.contains("no results log covers"), "{stdout}");
    assert!(world.no_event_for(Duration::from_secs(1)).await);
    world.wait_depth(&dead, 1).await;

    let (code, stdout, stderr) = world.reconcile(&["--apply"]).await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    let event = world.event_for(&id).await;
    let ledger = world.sim.ledger();
    let charge = ledger
        .charges
        .iter()
        .find(|c| c.idempotency_key.as_deref() == Some(id.as_str()))
        .expect("its charge");
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
    let transaction = world
        .sim
        .transactions()
        .into_iter()
        .find(|t| t.invoice_id == charge.invoice_id)
        .expect("its transaction");
    assert!(
        stderr.contains(&format!(
            "command_id={id} transaction_id={}",
            transaction.id
        )),
        "the action is logged with both ids:\n{stderr}"
    );
    world.wait_depth(&dead, 0).await;
    assert!(world.no_event_for(Duration::from_secs(2)).await);
    assert_eq!(
        world.sim.ledger().charges_for(&id),
        1,
        "nothing charged again"
    );
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

    let row = world.apply_json_row(0, "").await;
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
    assert!(world.no_event_for(Duration::from_secs(2)).await);
    assert_eq!(world.sim.ledger().charges_for(&id), 1, "exactly once");
    world.cleanup().await;
}

#[tokio::test]
async fn a_letter_reconcile_replays_goes_back_to_its_own_lane() {
    let lanes = [("CPW__AMQP__LANES", "interactive:4,bulk:1")];
    let mut world = setup_with(Faults::default(), &lanes).await;
    let bulk = world.lane_queue("bulk");
    let id = command_id();
    let first = now_ms() - 25 * HOUR_MS;
    world
        .exhausted_in(Some(&bulk), &command(&id), first, first + 60_000)
        .await;
    let dead = world.topology.dead.clone();
    world.wait_depth(&dead, 1).await;

    let row = world.apply_json_row(0, "").await;
    assert_eq!(
        (&row["found"], &row["applied"]),
        (&json!("not_charged"), &json!(true)),
        "{row}"
    );
    // The worker names the lane it took the replay from.
    let events = world.events_answering(std::slice::from_ref(&id)).await;
    let lane = header_str(events[0].properties.headers().as_ref(), "cpw-lane");
    assert_eq!(events[0].kind(), "credit_purchase.succeeded");
    assert_eq!(lane.as_deref(), Some("bulk"));
    assert_eq!(world.sim.ledger().charges_for(&id), 1);
    world.cleanup().await;
}

#[tokio::test]
async fn the_answered_twin_claims_its_charge_and_the_garbled_one_is_settled_with_its_own() {
    let mut faults = garbled_after_charge();
    faults.after_charge[0].times = Some(1);
    let mut world = setup(faults).await;
    world.warm_log().await;
    // The same customer, product, count and amount, bought together: one
    // answer is garbled, the other arrives and its event claims its charge.
    let ids = [command_id(), command_id()];
    for id in &ids {
        world.publish(&command_for(id, GARBLED)).await;
    }
    let events = world
        .events
        .events_until(WAIT, |events| events.len() == 2)
        .await;
    let garbled = events
        .iter()
        .find(|e| e.kind() == "credit_purchase.failed")
        .expect("one failed")
        .command_id()
        .to_owned();
    let answered = events
        .iter()
        .find(|e| e.kind() == "credit_purchase.succeeded")
        .expect("one succeeded")
        .body
        .clone();
    let dead = world.topology.dead.clone();
    world.wait_depth(&dead, 1).await;
    world.wait_unseen().await;

    world.apply_json(0, "").await;
    let event = world.event_for(&garbled).await;
    let own = world
        .sim
        .ledger()
        .charges
        .into_iter()
        .find(|c| c.idempotency_key.as_deref() == Some(garbled.as_str()))
        .expect("its own charge");
    assert_eq!(event["reconciled"], true, "{event}");
    assert_eq!(event["invoice_id"], json!(own.invoice_id), "{event}");
    assert_ne!(event["invoice_id"], answered["invoice_id"]);
    world.wait_depth(&dead, 0).await;
    world.cleanup().await;
}

#[tokio::test]
async fn another_commands_charge_in_the_window_is_never_taken_for_the_letters() {
    const SHARED: &str = "cus_shared";
    let unavailable = || ScriptedResponse {
        customer_id: Some(SHARED.into()),
        status: 503,
        body: json!({"message": "unavailable"}),
        headers: BTreeMap::new(),
        times: None,
    };
    let faults = Faults {
        scripted: vec![unavailable()],
        ..Faults::default()
    };
    let mut world = setup_with(faults, &[("CPW__RETRY__REDELIVERY_DELAYS_SECS", "5")]).await;
    let (wa, wb) = (command_id(), command_id());
    world.publish(&command_for(&wa, SHARED)).await;
    // Wa's first delivery gets two 503s and waits 5 s in the delay queue;
    // meanwhile Wb, the same purchase, goes through.
    wait_until(
        "Wa's first two requests",
        Duration::from_millis(20),
        async || world.sim.ledger().requests >= 2,
    )
    .await;
    world.sim.set_faults(FaultsPatch {
        scripted: Some(Vec::new()),
        ..FaultsPatch::default()
    });
    world.publish(&command_for(&wb, SHARED)).await;
    let b = world.event_for(&wb).await;
    assert_eq!(b["type"], "credit_purchase.succeeded", "{b}");
    world.sim.set_faults(FaultsPatch {
        scripted: Some(vec![unavailable()]),
        ..FaultsPatch::default()
    });
    let a = world.event_for(&wa).await;
    assert_eq!(a["error"]["code"], "retries_exhausted", "{a}");
    let dead = world.topology.dead.clone();
    world.wait_depth(&dead, 1).await;
    assert_eq!(
        world.sim.ledger().charges_for(&wa),
        0,
        "Wa was never bought"
    );

    world.sim.set_faults(FaultsPatch {
        scripted: Some(Vec::new()),
        ..FaultsPatch::default()
    });
    let row = world.apply_json_row(0, "").await;
    assert_eq!(
        (&row["found"], &row["status"]),
        (&json!("not_charged"), &json!("done")),
        "Wb's charge is Wb's (its event is in the results log): {row}"
    );
    let bought = world.event_for(&wa).await;
    assert_eq!(bought["type"], "credit_purchase.succeeded", "{bought}");
    assert!(
        bought.get("reconciled").is_none(),
        "bought, not reconciled: {bought}"
    );
    assert_ne!(bought["invoice_id"], b["invoice_id"], "never Wb's invoice");
    world.wait_depth(&dead, 0).await;
    assert!(world.no_event_for(Duration::from_secs(2)).await);
    let ledger = world.sim.ledger();
    assert_eq!((ledger.charges_for(&wa), ledger.charges_for(&wb)), (1, 1));
    world.cleanup().await;
}

#[tokio::test]
async fn a_transaction_that_could_be_two_letters_charge_settles_neither() {
    let mut world = setup(Faults::default()).await;
    world.warm_log().await;
    // t1, then t2 well apart (further than the 5 s clock skew the old
    // rules allowed): a's window holds t1, b's t2, c's both.
    let t1_at = now_ms();
    world.buy_directly(&command_id()).await;
    wait_until(
        "t2 to be apart from t1",
        Duration::from_millis(50),
        async || now_ms() > t1_at + 12_000,
    )
    .await;
    let t2_at = now_ms();
    world.buy_directly(&command_id()).await;
    let (a, b, c) = (command_id(), command_id(), command_id());
    world
        .exhausted_between(&command(&a), t1_at - 500, t1_at + 500)
        .await;
    world
        .exhausted_between(&command(&b), t2_at - 500, t2_at + 500)
        .await;
    world
        .exhausted_between(&command(&c), t1_at - 500, t2_at + 500)
        .await;
    let dead = world.topology.dead.clone();
    world.wait_depth(&dead, 3).await;
    world.wait_unseen().await;
    let before = world.state().await;

    // What a person reads: every transaction that could be a charge.
    let (code, table, stderr) = world.reconcile(&[]).await;
    assert_eq!(code, Some(1), "left for a person:\n{table}\n{stderr}");
    for t in world
        .sim
        .transactions()
        .iter()
        .filter(|t| t.customer_id != "cus_warmup")
    {
        assert!(table.contains(&format!("candidate {}", t.id)), "{table}");
    }
    println!("{table}");
    let stdout = world.apply_json(1, "left for a person:\n").await;
    let rows: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(rows.len(), 3, "{stdout}");
    for row in &rows {
        assert_eq!(
            (&row["found"], &row["status"]),
            (&json!("uncertain"), &json!("left")),
            "{row}"
        );
    }
    assert!(world.no_event_for(Duration::from_secs(2)).await);
    assert_eq!(
        world.state().await,
        before,
        "c never replayed, nothing settled"
    );
    world.cleanup().await;
}

#[tokio::test]
async fn a_possible_charge_without_an_invoice_is_uncertain_never_not_charged() {
    let mut faults = garbled_after_charge();
    faults.listing_omits_invoices = true;
    let mut world = setup(faults).await;
    world.warm_log().await;
    let id = command_id();
    world.garbled_dead_letter(&id).await;
    let dead = world.topology.dead.clone();
    world.wait_depth(&dead, 1).await;
    let before = world.state().await;

    let row = world.apply_json_row(1, "").await;
    assert_eq!(row["found"], "uncertain", "{row}");
    assert!(
        row["reason"]
            .as_str()
            .is_some_and(|r| r.contains("rules cannot tell (no invoice)")),
        "{row}"
    );
    assert!(world.no_event_for(Duration::from_secs(1)).await);
    assert_eq!(world.state().await, before, "not replayed");
    world.cleanup().await;
}

#[tokio::test]
async fn a_removal_that_fails_mid_run_is_not_done_and_a_second_run_buys_nothing_again() {
    // Hyperline forgets a key after 2 s here: a second replay would be a
    // second charge.
    let mut world = setup(forgetful(Faults::default())).await;
    let id = command_id();
    world
        .exhausted_dead_letter(&command(&id), now_ms() - 25 * HOUR_MS)
        .await;
    let dead = world.topology.dead.clone();
    world.wait_depth(&dead, 1).await;

    // The run's channel is lost between the replay's confirm and the ack.
    let channel = world.connection.create_channel().await.expect("channel");
    let got = channel
        .basic_get(dead.as_str().into(), BasicGetOptions { no_ack: false })
        .await
        .expect("basic.get")
        .expect("the letter");
    channel.close(200, "lost".into()).await.expect("closed");
    let keys = HistoryKeys::derived(SIM_KEY.as_bytes());
    let letter = select::uncertain(got.delivery, &keys).expect("an uncertain letter");
    let publishing = connect("cpw-reconcile-publisher")
        .await
        .expect("broker reachable");
    let publisher = Publisher::open(std::sync::Arc::new(publishing), Duration::from_secs(5))
        .await
        .expect("publisher");
    let acting = Acting {
        publisher: &publisher,
        topology: &world.topology,
        apply: true,
        keys: &keys,
    };
    let judged = Judged {
        letter,
        verdict: Verdict::Lookup(ChargeLookup::NotCharged),
    };
    let (row, stays) = acting.act(judged).await;
    assert_eq!(row.status, Status::NotDone, "{row:?}");
    assert!(!row.applied && stays.is_none(), "{row:?}");
    let bought = world.event_for(&id).await;
    assert_eq!(bought["type"], "credit_purchase.succeeded", "{bought}");
    world.wait_depth(&dead, 1).await;
    wait_keys_forgotten().await;

    let row = world.apply_json_row(0, "").await;
    assert_eq!(
        (&row["found"], &row["status"]),
        (&json!("already_succeeded"), &json!("done")),
        "{row}"
    );
    world.wait_depth(&dead, 0).await;
    assert!(world.no_event_for(Duration::from_secs(2)).await);
    assert_eq!(world.sim.ledger().charges_for(&id), 1, "replayed once");
    assert_eq!(world.depth(&world.queue).await, 0);
    world.cleanup().await;
}

#[tokio::test]
async fn a_dry_run_changes_nothing() {
    let mut world = setup(garbled_after_charge()).await;
    world.warm_log().await;
    let charged = command_id();
    world.garbled_dead_letter(&charged).await;
    let never = command_id();
    world
        .exhausted_dead_letter(&command(&never), now_ms() - HOUR_MS)
        .await;
    let dead = world.topology.dead.clone();
    world.wait_depth(&dead, 2).await;
    world.wait_unseen().await;
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
    assert!(world.no_event_for(Duration::from_secs(2)).await);
    assert_eq!(
        world.state().await,
        before,
        "queues and ledger as they were"
    );
    assert_eq!(world.sim.ledger().reads, 2, "one listing per customer");
    assert!(
        stderr.contains("dry run: ") && stderr.contains(": would publish succeeded"),
        "the dry run says what it would do, not what it did:\n{stderr}"
    );
    world.cleanup().await;
}

#[tokio::test]
async fn a_double_click_never_settles_one_command_with_the_charge_of_the_other_in_flight() {
    const CLICKED: &str = "cus_double_click";
    let once = |status: u16, body: Value| ScriptedResponse {
        customer_id: Some(CLICKED.into()),
        status,
        body,
        headers: BTreeMap::new(),
        times: Some(1),
    };
    // The same purchase twice, at once: the first request to arrive is
    // answered with a garbled 201 and charges nothing; the second charges,
    // and its answer is lost (a 503 after the charge), so that command
    // waits 20 s in its delay step with no event.
    let faults = Faults {
        scripted: vec![once(201, json!({"status": "ok"}))],
        after_charge: vec![once(503, json!({"message": "connection dropped"}))],
        ..Faults::default()
    };
    let settings = [
        ("CPW__RETRY__ATTEMPTS", "1"),
        ("CPW__RETRY__REDELIVERY_DELAYS_SECS", "20"),
    ];
    let mut world = setup_with(faults, &settings).await;
    world.warm_log().await;
    let ids = [command_id(), command_id()];
    for id in &ids {
        world.publish(&command_for(id, CLICKED)).await;
    }
    let events = world
        .events
        .events_until(WAIT, |events| !events.is_empty())
        .await;
    assert_eq!(events.len(), 1, "only the garbled one answers at once");
    assert_eq!(
        events[0].code(),
        "unexpected_response",
        "{}",
        events[0].body
    );
    let a = events[0].command_id().to_owned();
    let b = ids.iter().find(|id| **id != a).expect("the other").clone();
    let dead = world.topology.dead.clone();
    world.wait_depth(&dead, 1).await;
    wait_until("B's charge", Duration::from_millis(20), async || {
        world.sim.ledger().charges_for(&b) == 1
    })
    .await;
    assert_eq!(world.sim.ledger().charges_for(&a), 0, "A charged nothing");
    let b_invoice = world
        .sim
        .ledger()
        .charges
        .into_iter()
        .find(|c| c.idempotency_key.as_deref() == Some(b.as_str()))
        .expect("B's charge")
        .invoice_id;

    // While B waits in its delay step: A's only candidate is B's charge.
    let (code, table, stderr) = world.reconcile(&[]).await;
    assert_eq!(code, Some(1), "{table}\n{stderr}");
    println!("{table}");
    let row = world.apply_json_row(1, "too young to judge:\n").await;
    assert_eq!(
        (&row["command_id"], &row["found"], &row["status"]),
        (&json!(a), &json!("too_young"), &json!("left")),
        "{row}"
    );
    assert!(
        row["reason"]
            .as_str()
            .is_some_and(|r| r.contains(&format!("pending: {b}"))),
        "B is seen in flight: {row}"
    );
    assert!(row["run_again_after"].is_string(), "{row}");
    assert!(
        world.no_event_for(Duration::from_secs(1)).await,
        "nothing published for A, and B's pending record never reaches the results exchange"
    );
    world.wait_depth(&dead, 1).await;
    let (code, stdout, stderr) = world.cli(&["events", "--command-id", &b], &[]).await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("pending") && stdout.contains("in flight"),
        "`events` shows B in flight:\n{stdout}"
    );
    println!("$ events --command-id {b}\n{stdout}");

    // B comes back, is answered with its own charge, and its event claims it.
    let b_event = world.event_for(&b).await;
    assert_eq!(b_event["type"], "credit_purchase.succeeded", "{b_event}");
    assert_eq!(b_event["invoice_id"], json!(b_invoice));
    let row = world.apply_json_row(0, "").await;
    assert_eq!(
        (&row["found"], &row["status"]),
        (&json!("not_charged"), &json!("done")),
        "{row}"
    );
    let a_event = world.event_for(&a).await;
    assert_eq!(a_event["type"], "credit_purchase.succeeded", "{a_event}");
    assert!(a_event.get("reconciled").is_none(), "bought: {a_event}");
    assert_ne!(a_event["invoice_id"], json!(b_invoice), "never B's invoice");
    world.wait_depth(&dead, 0).await;
    assert!(world.no_event_for(Duration::from_secs(2)).await);
    let ledger = world.sim.ledger();
    assert_eq!(
        (ledger.charges_for(&a), ledger.charges_for(&b)),
        (1, 1),
        "each charged once, with its own invoice"
    );
    world.cleanup().await;
}

#[tokio::test]
async fn a_charge_listed_in_a_drifted_shape_is_never_not_charged() {
    // The charge is certain (a garbled 201 after it), and Hyperline forgets
    // its key after 2 s: a replay would charge the customer again.
    let mut world = setup(forgetful(garbled_after_charge())).await;
    world.warm_log().await;
    let id = command_id();
    world.garbled_dead_letter(&id).await;
    let dead = world.topology.dead.clone();
    world.wait_depth(&dead, 1).await;
    world.wait_unseen().await;
    let before = world.state().await;

    // Another spelling of the source, then the other pricing field: neither
    // is provably another purchase.
    let drifts = [
        json!({"source": "API"}),
        json!({"amount_excluding_tax": null, "price": {"id": "pri_drifted"}}),
    ];
    for drift in drifts {
        let Value::Object(patch) = drift.clone() else {
            unreachable!("an object")
        };
        world.sim.set_faults(FaultsPatch {
            listing_patch: Some(patch),
            ..FaultsPatch::default()
        });
        let stdout = world.apply_json(1, &format!("{drift}: ")).await;
        let row = one_row(&stdout);
        println!("{stdout}");
        assert_eq!(
            (&row["found"], &row["status"]),
            (&json!("uncertain"), &json!("left")),
            "{drift}: {row}"
        );
        assert!(
            row["reason"]
                .as_str()
                .is_some_and(|r| r.contains("could be its charge, but the rules cannot tell")),
            "{drift}: {row}"
        );
    }
    assert!(world.no_event_for(Duration::from_secs(1)).await);
    assert_eq!(world.state().await, before, "never replayed");
    assert_eq!(world.sim.ledger().charges_for(&id), 1, "charged once");
    world.cleanup().await;
}

#[tokio::test]
async fn a_succeeded_event_of_the_same_id_for_another_customer_is_not_the_letters() {
    // Hyperline forgets a key after 2 s: the letter's replay can be bought.
    let mut world = setup(forgetful(Faults::default())).await;
    let id = command_id();
    // Another customer's publisher reused the id, and was served.
    world.publish(&command_for(&id, "cus_other")).await;
    let other = world.event_for(&id).await;
    assert_eq!(other["type"], "credit_purchase.succeeded", "{other}");
    // This customer's command of that id died an hour ago, never charged.
    world
        .exhausted_dead_letter(&command(&id), now_ms() - HOUR_MS)
        .await;
    let dead = world.topology.dead.clone();
    world.wait_depth(&dead, 1).await;
    wait_keys_forgotten().await;

    let row = world.apply_json_row(0, "").await;
    assert_eq!(
        (&row["found"], &row["status"]),
        (&json!("not_charged"), &json!("done")),
        "not 'already succeeded' by another customer's event: {row}"
    );
    let bought = world.event_for(&id).await;
    assert_eq!(bought["type"], "credit_purchase.succeeded", "{bought}");
    assert_eq!(bought["customer_id"], command(&id)["customer_id"]);
    assert_ne!(bought["invoice_id"], other["invoice_id"]);
    world.wait_depth(&dead, 0).await;
    assert_eq!(world.sim.ledger().charges_for(&id), 2, "one per customer");
    world.cleanup().await;
}
