//! The operator tools with two lanes (`amqp.lanes`, docs/contract.md
//! section 7): a letter is replayed into its own lane, `list` and `show`
//! name it, `publish --lane` picks the queue, events name their lane and
//! `events --lane` filters on it.

use std::collections::BTreeMap;

use cpw_testkit::app::TestApp;
use cpw_testkit::commands::{command_for, command_id};
use credit_purchase_worker::broker::header_str;
use credit_purchase_worker::simulator::{Faults, FaultsPatch, ScriptedResponse};
use lapin::BasicProperties;
use lapin::options::BasicGetOptions;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};

/// Two lanes, the interactive one first.
const LANES: &str = "interactive:4,bulk:1";

async fn with_lanes(worker: bool, faults: Faults) -> TestApp {
    super::start(
        worker,
        super::options(faults).env("CPW__AMQP__LANES", LANES),
    )
    .await
}

/// The `cpw-lane` header of an event's properties.
fn lane_of(properties: &BasicProperties) -> Option<String> {
    header_str(properties.headers().as_ref(), "cpw-lane")
}

/// The command ids of the messages ready in `queue`, taken off it.
async fn take_ids(app: &TestApp, queue: &str) -> Vec<String> {
    let mut ids = Vec::new();
    while let Some(message) = app
        .channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
    {
        let body: Value = serde_json::from_slice(&message.delivery.data).expect("a command");
        ids.push(body["command_id"].as_str().unwrap_or_default().to_owned());
    }
    ids
}

#[tokio::test]
async fn a_letter_of_the_interactive_lane_is_listed_and_replayed_into_it() {
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
    let mut admin = with_lanes(true, faults).await;
    let (interactive, bulk) = (admin.lane_queue("interactive"), admin.lane_queue("bulk"));
    let id = command_id();
    let body = command_for(&id, "cus_garbled").to_string();
    admin
        .publish_to(&interactive, body.as_bytes(), BasicProperties::default())
        .await;
    let died = admin.events_answering(std::slice::from_ref(&id)).await;
    assert_eq!(died[0].code(), "unexpected_response");
    assert_eq!(lane_of(&died[0].properties).as_deref(), Some("interactive"));
    admin.wait_depth(&admin.dead_queue(), 1).await;

    let (code, stdout, stderr) = admin.cli(&["dead-letters", "list"], &[]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let header = stdout.lines().next().unwrap_or_default();
    assert!(header.contains("LANE"), "{stdout}");
    let row = stdout.lines().find(|l| l.contains(&id)).expect("its row");
    assert!(row.contains("interactive"), "{row}");
    let (_, stdout, _) = admin.cli(&["dead-letters", "list", "--json"], &[]).await;
    let line: Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert_eq!(
        (line["lane"].as_str(), line["queue"].as_str()),
        (Some("interactive"), Some(interactive.as_str())),
        "{line}"
    );
    let (code, stdout, _) = admin
        .cli(&["dead-letters", "show", "--command-id", &id], &[])
        .await;
    assert_eq!(code, Some(0));
    assert!(
        stdout
            .lines()
            .any(|l| l.split_whitespace().eq(["lane", "interactive"])),
        "{stdout}"
    );

    // Replayed with no worker to take it: it waits in its own lane.
    admin.stop_worker().await;
    admin.sim.set_faults(FaultsPatch {
        scripted: Some(Vec::new()),
        ..FaultsPatch::default()
    });
    let (code, stdout, stderr) = admin
        .cli(&["dead-letters", "replay", "--command-id", &id], &[])
        .await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("replayed 1, skipped 0"), "{stdout}");
    assert!(
        stdout.contains("replayed into lanes: interactive 1"),
        "{stdout}"
    );
    assert!(!stderr.contains("note:"), "no stray: {stderr}");
    admin.wait_depth(&interactive, 1).await;
    assert_eq!(admin.depth(&bulk).await, 0, "not in the other lane");
    admin.wait_depth(&admin.dead_queue(), 0).await;

    admin.start_worker().await;
    let bought = admin.events_answering(std::slice::from_ref(&id)).await;
    assert_eq!(bought[0].kind(), "credit_purchase.succeeded");
    assert_eq!(
        lane_of(&bought[0].properties).as_deref(),
        Some("interactive")
    );
    assert_eq!(admin.sim.ledger().charges_for(&id), 1, "charged once");
    admin.cleanup().await;
}

#[tokio::test]
async fn a_letter_the_broker_dead_lettered_goes_back_to_its_lane_and_one_of_no_lane_to_the_first() {
    let admin = with_lanes(false, Faults::default()).await;
    let (interactive, bulk) = (admin.lane_queue("interactive"), admin.lane_queue("bulk"));
    // Expired in the bulk lane: the broker's `x-death` names its queue.
    let expired = command_id();
    let body = command_for(&expired, "cus_admin").to_string();
    let short = BasicProperties::default().with_expiration("1".into());
    admin.publish_to(&bulk, body.as_bytes(), short).await;
    admin.wait_depth(&admin.dead_queue(), 1).await;
    // Dead before the lanes were set: stamped with the old single queue.
    let older = command_id();
    let mut headers = FieldTable::default();
    headers.insert(
        "cpw-queue".into(),
        AMQPValue::LongString(admin.queue.as_str().into()),
    );
    let body = command_for(&older, "cus_admin").to_string();
    let stamped = BasicProperties::default().with_headers(headers);
    admin
        .publish_to(&admin.dead_queue(), body.as_bytes(), stamped)
        .await;
    admin.wait_depth(&admin.dead_queue(), 2).await;

    let (code, stdout, stderr) = admin.cli(&["dead-letters", "list"], &[]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains(
            "1 of them came from no configured lane's queue (LANE -): a replay puts them in \
             the first lane, `interactive`"
        ),
        "{stdout}"
    );
    let (_, stdout, _) = admin.cli(&["dead-letters", "list", "--json"], &[]).await;
    let lanes: BTreeMap<String, Value> = stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("JSON lines"))
        .map(|v| (v["command_id"].as_str().unwrap_or("-").to_owned(), v))
        .map(|(id, v)| (id, v["lane"].clone()))
        .collect();
    assert_eq!(lanes[&expired], json!("bulk"), "{stdout}");
    assert_eq!(lanes[&older], Value::Null, "{stdout}");

    let (code, stdout, stderr) = admin
        .cli(&["dead-letters", "replay", "--all", "--force"], &[])
        .await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("replayed 2, skipped 0"), "{stdout}");
    assert!(
        stdout.contains("replayed into lanes: bulk 1, interactive 1"),
        "{stdout}"
    );
    let note = format!(
        "note: {older} came from `{}`, which is no configured lane's queue: put in the first \
         lane, `interactive` (`{interactive}`)",
        admin.queue
    );
    assert!(stderr.contains(&note), "{stderr}");
    admin.wait_depth(&bulk, 1).await;
    admin.wait_depth(&interactive, 1).await;
    assert_eq!(take_ids(&admin, &bulk).await, [expired]);
    assert_eq!(take_ids(&admin, &interactive).await, [older]);
    admin.wait_depth(&admin.dead_queue(), 0).await;
    admin.cleanup().await;
}

#[tokio::test]
async fn publish_lane_puts_the_command_in_that_lanes_queue() {
    let admin = with_lanes(false, Faults::default()).await;
    let (interactive, bulk) = (admin.lane_queue("interactive"), admin.lane_queue("bulk"));
    let publish = |lane: Option<&'static str>| {
        let mut args = vec![
            "publish",
            "--customer-id",
            "cus_admin",
            "--product-id",
            "itm_admin",
            "--credit-count",
            "3",
            "--amount-excluding-tax",
            "300",
        ];
        args.extend(lane.map(|lane| ["--lane", lane]).into_iter().flatten());
        let admin = &admin;
        async move { admin.cli(&args, &[]).await }
    };
    let (code, to_bulk, stderr) = publish(Some("bulk")).await;
    assert_eq!(code, Some(0), "{stderr}");
    let (code, to_first, stderr) = publish(None).await;
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stdout, stderr) = publish(Some("Bulk")).await;
    assert_eq!((code, stdout.as_str()), (Some(2), ""), "{stderr}");
    assert!(
        stderr
            .contains("no lane `Bulk` is configured (amqp.lanes): the lanes are interactive, bulk"),
        "{stderr}"
    );
    admin.wait_depth(&bulk, 1).await;
    admin.wait_depth(&interactive, 1).await;
    assert_eq!(take_ids(&admin, &bulk).await, [to_bulk.trim()]);
    assert_eq!(take_ids(&admin, &interactive).await, [to_first.trim()]);
    admin.cleanup().await;
}

#[tokio::test]
async fn events_name_their_lane_and_events_lane_keeps_one() {
    let mut admin = with_lanes(true, Faults::default()).await;
    let ids = [command_id(), command_id()];
    for (id, lane) in ids.iter().zip(["interactive", "bulk"]) {
        let body = command_for(id, "cus_admin").to_string();
        let queue = admin.lane_queue(lane);
        admin
            .publish_to(&queue, body.as_bytes(), BasicProperties::default())
            .await;
    }
    let events = admin.events_answering(&ids).await;
    let lanes: BTreeMap<&str, Option<String>> = events
        .iter()
        .map(|e| (e.command_id(), lane_of(&e.properties)))
        .collect();
    assert_eq!(lanes[ids[0].as_str()].as_deref(), Some("interactive"));
    assert_eq!(lanes[ids[1].as_str()].as_deref(), Some("bulk"));

    let (code, stdout, stderr) = admin.cli(&["events", "--lane", "bulk"], &[]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    assert!(
        lines[0].contains(&ids[1]) && lines[0].contains("lane=bulk"),
        "{stdout}"
    );
    let (code, stdout, stderr) = admin
        .cli(&["events", "--lane", "interactive", "--json"], &[])
        .await;
    assert_eq!(code, Some(0), "{stderr}");
    let event: Value = serde_json::from_str(stdout.trim()).expect("one event");
    assert_eq!(event["command_id"], ids[0].as_str());
    let (code, stdout, stderr) = admin.cli(&["events", "--lane", "imports"], &[]).await;
    assert_eq!((code, stdout.as_str()), (Some(0), ""), "{stderr}");
    assert!(
        stderr.contains("no lane `imports` is configured (lanes: interactive, bulk)"),
        "{stderr}"
    );
    admin.cleanup().await;
}

#[tokio::test]
async fn check_names_every_lane_and_compares_its_queues() {
    let admin = with_lanes(false, Faults::default()).await;
    let (code, stdout, stderr) = admin.cli(&["check"], &[]).await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    for (lane, share) in [("interactive", 4), ("bulk", 1)] {
        let queue = admin.lane_queue(lane);
        let line = format!(
            "✓ lane `{lane}`: queue `{queue}`, share {share}, prefetch 32, objective 10m 0s"
        );
        assert!(stdout.lines().any(|l| l == line), "{line} in {stdout}");
        let present = format!("commands queue `{queue}` present as declared");
        assert!(stdout.contains(&present), "{present} in {stdout}");
        let delay = format!("delay queue `{queue}.retry.1s` present as declared");
        assert!(stdout.contains(&delay), "{delay} in {stdout}");
    }
    admin.cleanup().await;
}
