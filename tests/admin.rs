//! The operator subcommands (`publish`, `dead-letters`, `check`, `demo`) run
//! as the real binary against the real broker, each test on its own queue
//! names, with the worker (where one is needed) in-process beside an
//! in-process simulator.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{SystemTime, UNIX_EPOCH};

use cpw_testkit::WAIT;
use cpw_testkit::app::{Io, Options, TestApp, spawn_app_with, spawn_without_worker};
use cpw_testkit::broker::{amqp_url, connect, sealed};
use cpw_testkit::commands::{command_for, command_id};
use cpw_testkit::process::worker_binary;
use credit_purchase_worker::configuration::Settings;
use credit_purchase_worker::simulator::{Faults, FaultsPatch, ScriptedResponse};
use lapin::BasicProperties;
use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde_json::{Value, json};

const SIM_KEY: &str = "sim_admin_key";

#[path = "admin/lanes.rs"]
mod lanes;

/// The options of every test here: fresh names, the simulator's key, no
/// rate limit unless a test sets one.
fn options(faults: Faults) -> Options {
    Options::default()
        .prefix("cpw-admin")
        .api_key(SIM_KEY)
        .faults(Faults {
            rate_limit: 0,
            ..faults
        })
        .env("CPW__RETRY__ATTEMPTS", 2)
        .env("CPW__WORKER__SHUTDOWN_GRACE_SECS", 5)
}

/// A fresh topology with an observer bound to its results, and the worker
/// in-process when `worker` is true.
async fn setup(worker: bool, faults: Faults) -> TestApp {
    start(worker, options(faults)).await
}

/// The app of `options`, with the worker in-process when `worker` is true.
async fn start(worker: bool, options: Options) -> TestApp {
    match worker {
        true => spawn_app_with(options).await,
        false => spawn_without_worker(options).await,
    }
}

fn now_ms() -> i64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock");
    i64::try_from(since.as_millis()).expect("ms")
}

#[tokio::test]
async fn publish_wait_round_trips_through_a_running_worker() {
    let admin = setup(true, Faults::default()).await;
    let (code, stdout, stderr) = admin
        .cli(
            &[
                "publish",
                "--customer-id",
                "cus_admin",
                "--product-id",
                "itm_admin",
                "--credit-count",
                "3",
                "--amount-excluding-tax",
                "300",
                "--wait",
                "--timeout-secs",
                "30",
            ],
            &[],
        )
        .await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    let (id, json) = stdout.split_once('\n').expect("the id, then the event");
    assert!(uuid::Uuid::parse_str(id).is_ok(), "a fresh UUID: {id}");
    let event: Value = serde_json::from_str(json).expect("the event, as JSON");
    assert_eq!(event["type"], "credit_purchase.succeeded");
    assert_eq!(event["command_id"], id);
    assert_eq!(admin.sim.ledger().charges_for(id), 1);
    admin.cleanup().await;
}

#[tokio::test]
async fn publish_refuses_invalid_or_unroutable_commands_and_bounds_its_wait() {
    let admin = setup(false, Faults::default()).await;
    let base = [
        "publish",
        "--product-id",
        "itm_admin",
        "--credit-count",
        "3",
    ];
    let with = |extra: &[&'static str]| -> Vec<&str> { [&base[..], extra].concat() };
    let id = command_id();

    let args = with(&["--customer-id", "cus/../x", "--price-id", "price_1"]);
    let (code, _, stderr) = admin.cli(&args, &[]).await;
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("refusing to publish") && stderr.contains("customer_id"),
        "{stderr}"
    );
    assert_eq!(admin.depth(&admin.queue).await, 0, "nothing was sent");

    let mut args = with(&["--customer-id", "cus_1", "--price-id", "p_1"]);
    args.extend(["--command-id", &id, "--wait", "--timeout-secs", "1"]);
    let (code, stdout, stderr) = admin.cli(&args, &[]).await;
    assert_eq!(code, Some(2), "no worker, no result");
    assert_eq!(stdout.trim(), id, "published, then waited");
    assert!(
        stderr.contains(&format!(
            "no result for {id} within 1 s (is a worker running?)"
        )),
        "{stderr}"
    );

    let args = with(&["--customer-id", "cus_1", "--amount-excluding-tax", "1"]);
    let (code, _, stderr) = admin
        .cli(&args, &[("CPW__AMQP__QUEUE", "cpw-admin-nowhere-0000")])
        .await;
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("unroutable") && stderr.contains("topology"),
        "{stderr}"
    );
    admin.cleanup().await;
}

#[tokio::test]
async fn dead_letters_list_shows_a_dead_letter_and_leaves_it_there() {
    let mut admin = setup(true, Faults::default()).await;
    let (code, stdout, _) = admin.cli(&["dead-letters", "list"], &[]).await;
    assert_eq!(code, Some(0));
    assert_eq!(
        stdout.trim(),
        format!("dead-letter queue {} is empty", admin.dead_queue())
    );

    let id = command_id();
    let mut body = command_for(&id, "cus_admin");
    body["credit_count"] = json!(0);
    admin
        .publish_to(
            &admin.queue,
            body.to_string().as_bytes(),
            BasicProperties::default(),
        )
        .await;
    assert_eq!(
        admin.event_for(&id).await["error"]["code"],
        "invalid_command"
    );
    admin.wait_depth(&admin.dead_queue(), 1).await;

    let (code, stdout, stderr) = admin.cli(&["dead-letters", "list"], &[]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let row = stdout
        .lines()
        .find(|l| l.contains(&id))
        .expect("a row for it");
    for cell in ["invalid_command", "credit_count"] {
        assert!(row.contains(cell), "{cell} missing in {row:?}");
    }
    assert!(
        stdout
            .lines()
            .next()
            .is_some_and(|l| l.starts_with("COMMAND ID")),
        "{stdout}"
    );

    let (code, stdout, _) = admin.cli(&["dead-letters", "list", "--json"], &[]).await;
    assert_eq!(code, Some(0));
    let line: Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert_eq!(line["command_id"], id.as_str());
    // One field says why: the worker's code, not also the broker's "rejected".
    assert!(line.get("broker_reason").is_none(), "{line}");
    assert!(
        line["detail"]
            .as_str()
            .is_some_and(|d| d.contains("credit_count")),
        "{line}"
    );
    assert_eq!(line["queue"], admin.queue.as_str());
    assert_eq!(line["error_code"], "invalid_command");
    // One format for every time: milliseconds always with three digits.
    assert!(
        line["died_at"]
            .as_str()
            .is_some_and(|t| t.len() == "2026-01-01T00:00:00.000Z".len() && t.ends_with('Z')),
        "{line}"
    );
    // Listing removes nothing. Polled: the broker puts back what the closed
    // channel held asynchronously, so an immediate count can miss it.
    admin.wait_depth(&admin.dead_queue(), 1).await;

    // `--all` passes over what can never succeed, says so, and that is
    // not a failure; naming it is.
    let (code, stdout, stderr) = admin.cli(&["dead-letters", "replay", "--all"], &[]).await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("replayed 0, skipped 0"), "{stdout}");
    assert!(
        stdout.contains("left 1 invalid command(s)")
            && stdout.contains("dead-letters purge --code invalid_command"),
        "{stdout}"
    );
    let (code, stdout, stderr) = admin
        .cli(&["dead-letters", "replay", "--command-id", &id], &[])
        .await;
    assert_eq!(code, Some(1));
    assert!(stdout.contains("replayed 0, skipped 1"), "{stdout}");
    assert!(stderr.contains("not a valid command"), "{stderr}");
    // An invalid command stays.
    admin.wait_depth(&admin.dead_queue(), 1).await;
    admin.cleanup().await;
}

#[tokio::test]
async fn replay_moves_a_dead_letter_back_and_it_succeeds_once() {
    let garbled = ScriptedResponse {
        customer_id: Some("cus_garbled".into()),
        status: 201,
        body: json!({"status": "ok"}),
        headers: BTreeMap::new(),
        times: None,
    };
    let faults = Faults {
        scripted: vec![garbled],
        ..Faults::default()
    };
    let mut admin = setup(true, faults).await;
    let id = command_id();
    let body = command_for(&id, "cus_garbled").to_string();
    admin
        .publish_to(&admin.queue, body.as_bytes(), BasicProperties::default())
        .await;
    assert_eq!(
        admin.event_for(&id).await["error"]["code"],
        "unexpected_response"
    );
    admin.wait_depth(&admin.dead_queue(), 1).await;

    admin.sim.set_faults(FaultsPatch {
        scripted: Some(Vec::new()),
        ..FaultsPatch::default()
    });
    let (code, stdout, stderr) = admin
        .cli(&["dead-letters", "replay", "--command-id", &id], &[])
        .await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("replayed 1, skipped 0"), "{stdout}");
    let event = admin.event_for(&id).await;
    assert_eq!(event["type"], "credit_purchase.succeeded", "{event}");
    assert_eq!(admin.sim.ledger().charges_for(&id), 1, "charged once");
    admin.wait_depth(&admin.dead_queue(), 0).await;
    admin.cleanup().await;
}

#[tokio::test]
async fn replay_refuses_a_command_past_the_idempotency_window_unless_forced() {
    let admin = setup(false, Faults::default()).await;
    let (old, other) = (command_id(), command_id());
    let mut headers = FieldTable::default();
    let day_and_an_hour_ago = now_ms() - 25 * 3600 * 1000;
    headers.insert(
        ShortString::from("cpw-first-attempt-ms"),
        AMQPValue::LongLongInt(day_and_an_hour_ago),
    );
    headers.insert(ShortString::from("cpw-attempts"), AMQPValue::LongLongInt(7));
    let dead = admin.dead_queue();
    let body = command_for(&old, "cus_admin").to_string();
    let props = BasicProperties::default().with_headers(headers);
    let props = sealed(props, body.as_bytes(), SIM_KEY);
    admin.publish_to(&dead, body.as_bytes(), props).await;
    let body = command_for(&other, "cus_admin").to_string();
    admin
        .publish_to(&dead, body.as_bytes(), BasicProperties::default())
        .await;

    let (code, stdout, stderr) = admin
        .cli(
            &[
                "dead-letters",
                "replay",
                "--command-id",
                &old,
                "--command-id",
                "cmd-not-there-0000",
            ],
            &[],
        )
        .await;
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("replayed 0, skipped 1"), "{stdout}");
    assert!(
        stdout.contains("no dead letter with command id cmd-not-there-0000"),
        "{stdout}"
    );
    let why = format!("Hyperline's 24-hour idempotency window has passed for {old}");
    assert!(
        stderr.contains(&why) && stderr.contains("--force"),
        "{stderr}"
    );
    // Both are still there.
    admin.wait_depth(&dead, 2).await;

    let (code, stdout, stderr) = admin
        .cli(
            &["dead-letters", "replay", "--command-id", &old, "--force"],
            &[],
        )
        .await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("replayed 1, skipped 0"), "{stdout}");
    // The other one stays.
    admin.wait_depth(&dead, 1).await;
    let copy = admin
        .channel
        .basic_get(
            admin.queue.as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .expect("get")
        .expect("the copy is on the commands queue");
    let body: Value = serde_json::from_slice(&copy.delivery.data).expect("json");
    assert_eq!(body["command_id"], old.as_str());
    let headers = copy
        .delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    assert!(
        !headers
            .inner()
            .keys()
            .any(|k| k.as_str().starts_with("cpw-")),
        "forced: a fresh budget and no window start, or the worker would refuse it: {headers:?}"
    );
    admin.cleanup().await;
}

/// An `unexpected_response` (the customer may have been charged) is the
/// letter an operator must understand before touching it: `list` says why,
/// how often and when, `show` gives the whole letter, and `purge` removes
/// only what was chosen, once confirmed.
#[tokio::test]
async fn an_uncertain_charge_is_listed_shown_and_purged_alone() {
    let garbled = ScriptedResponse {
        customer_id: Some("cus_uncertain".into()),
        status: 201,
        body: json!({"status": "ok"}),
        headers: BTreeMap::new(),
        times: None,
    };
    let faults = Faults {
        scripted: vec![garbled],
        ..Faults::default()
    };
    let mut admin = setup(true, faults).await;
    let (uncertain, invalid) = (command_id(), command_id());
    let body = command_for(&uncertain, "cus_uncertain").to_string();
    admin
        .publish_to(&admin.queue, body.as_bytes(), BasicProperties::default())
        .await;
    let mut bad = command_for(&invalid, "cus_admin");
    bad["credit_count"] = json!(0);
    admin
        .publish_to(
            &admin.queue,
            bad.to_string().as_bytes(),
            BasicProperties::default(),
        )
        .await;
    assert_eq!(
        admin.event_for(&uncertain).await["error"]["code"],
        "unexpected_response"
    );
    admin.wait_depth(&admin.dead_queue(), 2).await;
    // The worker runs in this process: its replica name is ours.
    let replica = Settings::load_from(None, admin.env.clone())
        .expect("settings")
        .amqp
        .connection_name();

    let (code, stdout, stderr) = admin.cli(&["dead-letters", "list"], &[]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let header = stdout.lines().next().unwrap_or_default();
    for column in [
        "CODE",
        "HTTP",
        "ATTEMPTS",
        "FIRST ATTEMPT",
        "LAST ATTEMPT",
        "DIED AT",
        "REPLICA",
    ] {
        assert!(header.contains(column), "{column} in {header:?}");
    }
    let row = stdout
        .lines()
        .find(|l| l.contains(&uncertain))
        .expect("a row for it");
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cells[1..4], ["unexpected_response", "201", "1"], "{row}");
    assert!(row.contains(&replica), "{row}");

    let (_, stdout, _) = admin.cli(&["dead-letters", "list", "--json"], &[]).await;
    let line: Value = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["command_id"] == uncertain.as_str())
        .expect("its JSON line");
    assert_eq!(line["error_code"], "unexpected_response");
    assert_eq!(line["last_status"], 201);
    assert_eq!(line["attempts"], 1);
    assert_eq!(line["replica"], replica.as_str());
    for key in ["first_attempt", "last_attempt", "died_at"] {
        assert!(
            line[key].as_str().is_some_and(|t| t.ends_with('Z')),
            "{key}: {line}"
        );
    }

    let (code, stdout, stderr) = admin
        .cli(&["dead-letters", "show", "--command-id", &uncertain], &[])
        .await;
    assert_eq!(code, Some(0), "{stderr}");
    for expected in [
        "code              unexpected_response",
        "last HTTP status  201",
        "idempotency       open",
        "cpw-error-code = \"unexpected_response\"",
        "\"customer_id\": \"cus_uncertain\"",
    ] {
        assert!(stdout.contains(expected), "{expected:?} in\n{stdout}");
    }
    let (code, stdout, _) = admin
        .cli(
            &["dead-letters", "show", "--command-id", "cmd-not-there-0000"],
            &[],
        )
        .await;
    assert_eq!(code, Some(1));
    assert!(
        stdout.contains("no dead letter with command id cmd-not-there-0000"),
        "{stdout}"
    );

    let purge = ["dead-letters", "purge", "--code", "unexpected_response"];
    let (code, stdout, _) = admin.cli(&[&purge[..], &["--dry-run"]].concat(), &[]).await;
    assert_eq!(code, Some(0));
    assert!(
        stdout.contains(&uncertain) && !stdout.contains(&invalid),
        "{stdout}"
    );
    assert!(
        stdout.contains("dry run: 1 dead letter(s) would be removed"),
        "{stdout}"
    );
    let (code, stdout, _) = admin.cli_with(&purge, &[], Io::Stdin("no\n")).await;
    assert_eq!(code, Some(1));
    assert!(
        stdout.contains("not confirmed: nothing removed"),
        "{stdout}"
    );
    admin.wait_depth(&admin.dead_queue(), 2).await;
    let (code, stdout, stderr) = admin.cli_with(&purge, &[], Io::Stdin("yes\n")).await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stderr.contains("type yes to confirm"), "{stderr}");
    assert!(stdout.contains("removed 1 dead letter(s)"), "{stdout}");
    admin.wait_depth(&admin.dead_queue(), 1).await;
    let (_, stdout, _) = admin.cli(&["dead-letters", "list"], &[]).await;
    assert!(
        stdout.contains(&invalid) && !stdout.contains(&uncertain),
        "{stdout}"
    );

    let (code, _, _) = admin
        .cli(
            &["dead-letters", "purge", "--command-id", &invalid, "--yes"],
            &[],
        )
        .await;
    assert_eq!(code, Some(0));
    admin.wait_depth(&admin.dead_queue(), 0).await;
    admin.cleanup().await;
}

/// `dead-letters list | head -1`: a reader that goes away is a normal end
/// for every subcommand that prints, not a panic (exit 101).
#[tokio::test]
async fn a_closed_stdout_is_a_normal_end() {
    let admin = setup(false, Faults::default()).await;
    let id = command_id();
    let body = command_for(&id, "cus_admin").to_string();
    admin
        .publish_to(
            &admin.dead_queue(),
            body.as_bytes(),
            BasicProperties::default(),
        )
        .await;
    admin.wait_depth(&admin.dead_queue(), 1).await;
    for (args, expected) in [
        (vec!["dead-letters", "list"], 0),
        (vec!["dead-letters", "list", "--json"], 0),
        (vec!["dead-letters", "show", "--command-id", &id], 0),
        (
            vec!["dead-letters", "purge", "--command-id", &id, "--dry-run"],
            0,
        ),
        (vec!["check"], 0),
    ] {
        let (code, _, stderr) = admin.cli_with(&args, &[], Io::ClosedStdout).await;
        assert_eq!(code, Some(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    admin.wait_depth(&admin.dead_queue(), 1).await;
    admin.cleanup().await;
}

/// A commands queue that exists as a classic queue where the worker
/// declares a quorum one: `check` says what differs and how to fix it, and
/// `run` stops with that same line (exit 2) before declaring anything,
/// instead of reconnecting forever on PRECONDITION_FAILED.
#[tokio::test]
async fn a_queue_with_other_arguments_is_named_by_check_and_stops_run() {
    let admin = setup(false, Faults::default()).await;
    let name = format!("cpw-admin-mm-{}", uuid::Uuid::new_v4().simple());
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    admin
        .channel
        .queue_declare(name.as_str().into(), durable, FieldTable::default())
        .await
        .expect("a classic queue");
    let env = [("CPW__AMQP__QUEUE", name.as_str())];
    let (code, stdout, _) = admin.cli(&["check"], &env).await;
    assert_eq!(code, Some(1), "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.contains(&format!("commands queue `{name}` exists with")))
        .unwrap_or_else(|| panic!("a line for the commands queue in\n{stdout}"));
    assert!(
        line.starts_with('✗') && line.contains("delete_queue"),
        "{line}"
    );

    let (code, _, stderr) = admin.cli(&["run"], &env).await;
    assert_eq!(code, Some(2), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert_eq!(
        last,
        format!("error: {}", line.trim_start_matches("✗ ")),
        "{stderr}"
    );
    // Nothing was half-made: the commands exchange was never declared.
    let probe = admin.connection.create_channel().await.expect("channel");
    let passive = lapin::options::ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let exchange = probe
        .exchange_declare(
            name.as_str().into(),
            lapin::ExchangeKind::Direct,
            passive,
            FieldTable::default(),
        )
        .await;
    assert!(exchange.is_err(), "the commands exchange was declared");
    let _ = admin
        .channel
        .queue_delete(name.as_str().into(), Default::default())
        .await;
    admin.cleanup().await;
}

/// With `amqp.declare_topology = false` a delay queue that does not exist
/// stops `run` at start with one line naming it (exit 2), as a queue with
/// other arguments does, and `check` names the same queue. Before, the
/// worker started, and every copy to that queue came back unroutable until
/// the command's window closed.
#[tokio::test]
async fn a_missing_delay_queue_stops_run_when_the_worker_declares_nothing() {
    let admin = setup(false, Faults::default()).await;
    let (_, missing) = admin.topology.lanes[0].retry_queues[1].clone();
    admin
        .channel
        .queue_delete(missing.as_str().into(), Default::default())
        .await
        .expect("the 2 s delay queue deleted");
    let env = [("CPW__AMQP__DECLARE_TOPOLOGY", "false")];
    let (code, stdout, _) = admin.cli(&["check"], &env).await;
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!("✗ delay queue `{missing}` is missing")),
        "{stdout}"
    );

    let (code, _, stderr) = admin.cli(&["run"], &env).await;
    assert_eq!(code, Some(2), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert_eq!(
        last,
        format!(
            "error: delay queue `{missing}` is missing and amqp.declare_topology = false, so the \
             worker declares nothing: declare the queue where the topology is managed (`check` \
             lists what is missing), or set amqp.declare_topology = true"
        ),
        "{stderr}"
    );
    // It declared nothing either.
    let probe = admin.connection.create_channel().await.expect("channel");
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declared = probe
        .queue_declare(missing.as_str().into(), passive, FieldTable::default())
        .await;
    assert!(declared.is_err(), "the missing queue was declared");
    admin.cleanup().await;
}

/// A wrong broker password in `demo` is one line of ours, not lapin's
/// three ERROR lines first; and a pretty log written to a pipe has no
/// colour codes.
#[tokio::test]
async fn a_refused_broker_login_is_one_plain_line() {
    let admin = setup(false, Faults::default()).await;
    let url = cpw_testkit::broker::amqp_url();
    let wrong = url::Url::parse(&url)
        .map(|mut u| {
            let _ = u.set_password(Some("wrong-password"));
            u.to_string()
        })
        .expect("the test broker URL parses");
    let (code, stdout, stderr) = admin
        .cli(
            &["demo", "--commands", "1"],
            &[("CPW__AMQP__URL", &wrong), ("CPW__LOG__FORMAT", "pretty")],
        )
        .await;
    assert_eq!(code, Some(2), "{stdout}\n{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("error: cannot reach the broker"),
        "{stderr}"
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "no colour codes off a terminal: {stderr:?}"
    );
    admin.cleanup().await;
}

#[tokio::test]
async fn check_passes_with_everything_in_place_and_names_a_refused_key() {
    let admin = setup(false, Faults::default()).await;
    let (code, stdout, stderr) = admin.cli(&["check"], &[]).await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.lines().count() >= 8, "{stdout}");
    assert!(stdout.lines().all(|l| l.starts_with('✓')), "{stdout}");
    assert!(
        stdout.contains("guest:***@127.0.0.1"),
        "redacted URL: {stdout}"
    );
    assert!(stdout.contains("accepts the key"), "{stdout}");

    let secret = "sk_wrong_secret_value_42";
    let (code, stdout, _) = admin
        .cli(&["check"], &[("CPW__HYPERLINE__API_KEY", secret)])
        .await;
    assert_eq!(code, Some(1));
    let refused = stdout
        .lines()
        .find(|l| l.starts_with('✗'))
        .expect("a ✗ line");
    assert!(refused.contains("refuses the key (HTTP 401)"), "{refused}");
    assert!(!stdout.contains(secret), "the key is never printed");

    let (code, stdout, _) = admin
        .cli(
            &["check"],
            &[("CPW__AMQP__QUEUE", "cpw-admin-nowhere-0000")],
        )
        .await;
    assert_eq!(code, Some(1));
    assert!(
        stdout.contains("✗ commands queue `cpw-admin-nowhere-0000` is missing"),
        "{stdout}"
    );
    admin.cleanup().await;
}

#[tokio::test]
async fn check_tries_every_node_of_a_cluster_and_prints_a_line_each() {
    let admin = setup(false, Faults::default()).await;
    // The test broker, and a node that is down (a port nobody listens on).
    let down = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let nodes = format!(
        "{},amqp://guest:pw-of-node-2@127.0.0.1:{down}/%2f",
        amqp_url()
    );
    let (code, stdout, stderr) = admin.cli(&["check"], &[("CPW__AMQP__URL", &nodes)]).await;
    assert_eq!(
        code,
        Some(1),
        "a node down fails the check: {stdout}\n{stderr}"
    );
    let line = |prefix: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting {prefix:?} in {stdout}"))
            .to_owned()
    };
    assert!(line("✓ broker node 1/2 reachable at").contains("guest:***@127.0.0.1"));
    let failed = line("✗ broker node 2/2: cannot reach the broker at");
    assert!(failed.contains(&format!("127.0.0.1:{down}")), "{failed}");
    assert!(!stdout.contains("pw-of-node-2"), "no password: {stdout}");
    // The topology is still read, on the node that answered.
    assert!(stdout.contains("✓ commands queue"), "{stdout}");
    admin.cleanup().await;
}

#[tokio::test]
async fn demo_runs_to_completion_with_one_charge_per_success() {
    let out = tokio::process::Command::new(worker_binary())
        .args([
            "demo",
            "--commands",
            "60",
            "--timeout-secs",
            "40",
            "--seed",
            "7",
        ])
        .env_clear()
        .env("CPW__AMQP__URL", amqp_url())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(WAIT, out)
        .await
        .expect("the demo ends in time")
        .expect("runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let number = |label: &str| -> u64 {
        let line = stdout
            .lines()
            .map(str::trim_start)
            .find(|l| l.starts_with(label))
            .expect(label);
        let value = line[label.len()..].split_whitespace().next();
        value.and_then(|n| n.parse().ok()).expect(label)
    };
    assert_eq!(number("commands published"), 60);
    assert_eq!(
        number("charges in the ledger"),
        number("succeeded"),
        "{stdout}"
    );
    assert!(stdout.contains("✓ one per succeeded command"), "{stdout}");
    assert_eq!(number("invalid_command"), 3, "{stdout}");
    // The worker's lines, its ERROR for the garbled answer included, are in
    // the file named at the end, not on stderr across the progress bar.
    assert!(!stderr.contains("ERROR"), "{stderr}");
    let log = stdout
        .lines()
        .find_map(|l| l.strip_prefix("worker log: "))
        .expect("the summary names the worker's log");
    let lines = std::fs::read_to_string(log).expect("the worker's log");
    assert!(
        lines.contains("failed: dead-lettering for an operator"),
        "{lines}"
    );
    let _ = std::fs::remove_file(log);

    // Its throwaway queue is gone.
    let queue = stderr
        .split("(queue ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .expect("the demo names its queue");
    let connection = connect("cpw-admin-test").await.expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let gone = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await;
    assert!(gone.is_err(), "{queue} was removed");
}

/// Whether a line of `show`'s output is the letter's delivery count: the
/// broker's `x-delivery-count`, or the `x-cpw-delivery-count` a letter put
/// back keeps it as. From RabbitMQ 4.0 a letter the broker dead-lettered out
/// of a quorum queue carries that queue's count (1 for a command rejected
/// once); the first read puts it back as a fresh copy, moving the count to
/// the worker's header. The count itself must never grow.
fn is_count_line(line: &str) -> bool {
    let line = line.trim_start();
    line.starts_with("x-delivery-count =") || line.starts_with("x-cpw-delivery-count =")
}

/// The value of `show`'s delivery count line, under either header, if any.
fn delivery_count(shown: &str) -> Option<String> {
    shown
        .lines()
        .find(|l| is_count_line(l))
        .and_then(|l| l.split_once('='))
        .map(|(_, count)| count.trim().to_owned())
}

/// `show`'s output but for its delivery count line.
fn without_count(shown: &str) -> Vec<&str> {
    shown.lines().filter(|l| !is_count_line(l)).collect()
}

/// Everything `show` prints for `id`, and every letter as `list --json` has it.
async fn read_letters(admin: &TestApp, id: &str) -> (String, Vec<Value>) {
    let (code, shown, stderr) = admin
        .cli(&["dead-letters", "show", "--command-id", id], &[])
        .await;
    assert_eq!(code, Some(0), "{stderr}");
    let (code, listed, stderr) = admin.cli(&["dead-letters", "list", "--json"], &[]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let mut rows: Vec<Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    rows.sort_by_key(|r| r["command_id"].to_string());
    (shown, rows)
}

#[tokio::test]
async fn reading_the_dead_letters_thirty_times_wears_none_of_them() {
    let mut admin = setup(true, Faults::default()).await;
    let ids: Vec<String> = (0..3).map(|_| command_id()).collect();
    for id in &ids {
        let mut body = command_for(id, "cus_admin");
        body["credit_count"] = json!(0);
        admin
            .publish_to(
                &admin.queue,
                body.to_string().as_bytes(),
                BasicProperties::default(),
            )
            .await;
        admin.event_for(id).await;
    }
    admin.wait_depth(&admin.dead_queue(), 3).await;

    let first = read_letters(&admin, &ids[0]).await;
    assert_eq!(first.1.len(), 3, "{:?}", first.1);
    for round in 1..30 {
        let again = read_letters(&admin, &ids[round % 3]).await;
        assert_eq!(again.1, first.1, "round {round}: the letters as listed");
        if round % 3 == 0 {
            assert_eq!(
                without_count(&again.0),
                without_count(&first.0),
                "round {round}: the letter as shown"
            );
        }
        assert_eq!(
            delivery_count(&again.0),
            delivery_count(&first.0),
            "round {round}: a delivery was counted:\n{}",
            again.0
        );
    }
    let counted = delivery_count(&first.0);
    println!("x-delivery-count after 30 lists and shows: {counted:?}");
    admin.wait_depth(&admin.dead_queue(), 3).await;
    // The letters themselves, as the broker gives them next: never
    // redelivered, so no quorum queue limit comes any closer.
    let channel = admin.connection.create_channel().await.expect("channel");
    for _ in 0..3 {
        let got = channel
            .basic_get(
                admin.dead_queue().as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .expect("basic.get")
            .expect("a letter");
        let headers = got
            .delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default();
        let count = headers
            .inner()
            .get("x-delivery-count")
            .map(|v| format!("{v:?}"));
        assert!(
            matches!(
                count.as_deref(),
                None | Some("LongLongInt(0)" | "LongInt(0)")
            ),
            "{headers:?}"
        );
        assert!(!got.delivery.redelivered, "never returned");
    }
    let _ = channel.close(200, "read".into()).await;
    admin.cleanup().await;
}

#[tokio::test]
async fn events_tells_what_happened_to_a_command_after_a_restart_and_stops_by_itself() {
    let garbled = Faults {
        after_charge: vec![ScriptedResponse {
            customer_id: Some("cus_garbled".into()),
            status: 201,
            body: json!({"status": "ok"}),
            headers: BTreeMap::new(),
            times: None,
        }],
        ..Faults::default()
    };
    let mut admin = setup(true, garbled).await;
    let (lost, bought) = (command_id(), command_id());
    for (id, customer) in [(&lost, "cus_garbled"), (&bought, "cus_admin")] {
        let body = command_for(id, customer).to_string();
        admin
            .publish_to(&admin.queue, body.as_bytes(), BasicProperties::default())
            .await;
        admin.event_for(id).await;
    }
    admin.restart_worker().await;
    let after = command_id();
    let body = command_for(&after, "cus_admin").to_string();
    admin
        .publish_to(&admin.queue, body.as_bytes(), BasicProperties::default())
        .await;
    admin.event_for(&after).await;

    // 3 a.m.: what happened to it? The worker that handled it is gone.
    let started = std::time::Instant::now();
    let (code, stdout, stderr) = admin.cli(&["events", "--command-id", &lost], &[]).await;
    let took = started.elapsed();
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    for part in [lost.as_str(), "failed", "unexpected_response", "HTTP 201"] {
        assert!(lines[0].contains(part), "{part} in {stdout}");
    }
    // Without `amqp.lanes` an event names no lane.
    assert!(!lines[0].contains("lane="), "{stdout}");
    println!("events --command-id ended by itself after {took:?}:\n{stdout}{stderr}");

    // After an outage: everything since a time, as published, in order.
    let (code, stdout, stderr) = admin.cli(&["events", "--since", "1h", "--json"], &[]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let ids: Vec<String> = stdout
        .lines()
        .map(|l| {
            let event: Value = serde_json::from_str(l).expect("one event a line");
            event["command_id"].as_str().expect("an id").to_owned()
        })
        .collect();
    assert_eq!(ids, [lost.clone(), bought.clone(), after.clone()]);
    println!("events --since 1h --json:\n{stdout}");

    let (code, stdout, stderr) = admin.cli(&["events", "--since", "2h"], &[]).await;
    assert_eq!((code, stdout.lines().count()), (Some(0), 3), "{stderr}");
    println!("events --since 2h:\n{stdout}{stderr}");
    let (code, _, stderr) = admin
        .cli(&["events", "--command-id", &command_id()], &[])
        .await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("no event of command"), "{stderr}");
    // A start after every event: nothing, at once, not a wait for more.
    let (code, stdout, stderr) = admin
        .cli(&["events", "--from", "2099-01-01T00:00:00Z"], &[])
        .await;
    assert_eq!((code, stdout.as_str()), (Some(0), ""), "{stderr}");
    let (code, stdout, stderr) = admin.cli(&["events", "--since", "30d"], &[]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("keeps 7d of events"), "{stderr}");
    assert_eq!(
        stdout.lines().count(),
        3,
        "what it holds is printed: {stdout}"
    );
    let (code, _, stderr) = admin
        .cli(
            &["events"],
            &[("CPW__AMQP__RESULTS_EXCHANGE", "cpw-admin-no-such-exchange")],
        )
        .await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("the results log `cpw-admin-no-such-exchange.log` does not exist"),
        "{stderr}"
    );
    admin.cleanup().await;
}
