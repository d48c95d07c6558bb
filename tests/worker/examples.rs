//! The client examples of `examples/` (Python with pika, Node.js with
//! amqplib) run against a real worker and the simulator, as a publisher or a
//! downstream team would run them. Their dependencies come from their lock
//! files and are installed by `.ci/run`; a test finding them missing fails
//! and says how to install them, so it cannot pass without running them.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

use credit_purchase_worker::simulator::{Faults, ScriptedResponse};
use lapin::options::{
    BasicPublishOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use cpw_testkit::app::{Options, TestApp, WAIT, command_id, spawn_app_with};
use cpw_testkit::process::terminate;

/// The customer whose purchases the simulator refuses with a 422: a
/// `rejected` outcome, final, so the publisher's exit 1.
const REFUSED: &str = "cus_refused";

#[derive(Clone, Copy, Debug)]
enum Language {
    Python,
    Node,
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

impl Language {
    /// The interpreter and the directory of the example scripts. Panics,
    /// naming the install step, when the locked dependencies are not there.
    fn interpreter(self) -> (PathBuf, PathBuf) {
        match self {
            Language::Python => (cpw_testkit::pika::python(), examples_dir().join("python")),
            Language::Node => {
                let has_node = std::process::Command::new("node")
                    .arg("--version")
                    .stdout(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                assert!(
                    has_node,
                    "no `node` on the PATH: install Node.js as .ci/run does"
                );
                let dir = examples_dir().join("node");
                assert!(
                    dir.join("node_modules/amqplib/package.json").exists(),
                    "examples/node/node_modules has no amqplib: install the examples' dependencies \
                     as .ci/run does:\n  npm ci --prefix examples/node"
                );
                (PathBuf::from("node"), dir)
            }
        }
    }

    fn script(self, name: &str) -> Command {
        let (interpreter, dir) = self.interpreter();
        let file = match self {
            Language::Python => format!("{name}.py"),
            Language::Node => format!("{name}.js"),
        };
        let mut command = Command::new(interpreter);
        command
            .arg(dir.join(file))
            .env("AMQP_URL", cpw_testkit::broker::amqp_url())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }
}

/// What one run of the publisher gave.
struct Published {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Published {
    /// The one event the publisher printed.
    fn event(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("the publisher printed no event ({e}): {self:?}"))
    }
}

impl std::fmt::Debug for Published {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\nstdout: {}\nstderr: {}",
            self.status.code(),
            self.stdout,
            self.stderr
        )
    }
}

async fn publish(
    language: Language,
    app: &TestApp,
    id: &str,
    customer: &str,
    timeout: u32,
) -> Published {
    let output = language
        .script("publish")
        .args([
            "--queue",
            &app.queue,
            "--command-id",
            id,
            "--customer",
            customer,
        ])
        .args([
            "--product",
            "itm_3kXODDF42QXtnL",
            "--credits",
            "32",
            "--amount",
            "24000",
        ])
        .args(["--timeout", &timeout.to_string()])
        .output();
    let output = tokio::time::timeout(WAIT, output)
        .await
        .expect("the publisher exits within the bound")
        .expect("the publisher runs");
    Published {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A running consumer example, read line by line.
struct Consumer {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr_file: PathBuf,
    /// Every line read so far.
    lines: Vec<String>,
}

impl Consumer {
    /// Starts the consumer on its own `queue`, with its seen file in `dir`.
    fn start(
        language: Language,
        app: &TestApp,
        dir: &Path,
        queue: &str,
        from_log: bool,
    ) -> Consumer {
        let stderr_file = dir.join(format!("{queue}.stderr"));
        let stderr = std::fs::File::create(&stderr_file).expect("stderr file");
        let mut command = language.script("consume");
        command
            .args(["--exchange", &app.results_exchange, "--queue", queue])
            .arg("--seen")
            .arg(dir.join(format!("{queue}.seen")))
            .stdout(Stdio::piped())
            .stderr(stderr);
        if from_log {
            command.args(["--from-log", "first", "--log-idle", "1"]);
        }
        let mut child = command.spawn().expect("the consumer starts");
        let stdout = BufReader::new(child.stdout.take().expect("piped")).lines();
        Consumer {
            child,
            stdout,
            stderr_file,
            lines: Vec::new(),
        }
    }

    /// Reads lines until one starts with `prefix`; panics, showing what it
    /// printed, if none comes within [`WAIT`].
    async fn expect(&mut self, prefix: &str) -> String {
        let found = tokio::time::timeout(WAIT, async {
            while let Ok(Some(line)) = self.stdout.next_line().await {
                self.lines.push(line.clone());
                if line.starts_with(prefix) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            _ => panic!(
                "the consumer printed no line `{prefix}…`; {}",
                self.transcript()
            ),
        }
    }

    /// SIGTERM, then the rest of its output; asserts a clean exit.
    async fn stop(&mut self) {
        let status = terminate(&mut self.child, WAIT).await;
        while let Ok(Some(line)) = self.stdout.next_line().await {
            self.lines.push(line);
        }
        assert!(
            status.success(),
            "the consumer exits 0 on SIGTERM; {}",
            self.transcript()
        );
    }

    /// The lines that handled `id` (an effect taken), whatever their path.
    fn handled(&self, id: &str) -> Vec<&String> {
        let marker = format!("command_id={id} ");
        self.lines
            .iter()
            .filter(|l| l.starts_with("handled ") && l.contains(&marker))
            .collect()
    }

    fn transcript(&self) -> String {
        let stderr = std::fs::read_to_string(&self.stderr_file).unwrap_or_default();
        format!("stdout:\n{}\nstderr:\n{stderr}", self.lines.join("\n"))
    }
}

/// Publishes a second event for the command of `event`, with a new
/// `event_id`, to the results exchange: what a worker that crashed between
/// the broker's confirm and its ack publishes when the command comes round again.
async fn publish_duplicate(app: &TestApp, event: &Value) -> String {
    let mut duplicate = event.clone();
    duplicate["event_id"] = json!(uuid::Uuid::new_v4().to_string());
    publish_event(app, &duplicate).await
}

/// The `succeeded` event `dead-letters reconcile` publishes for the command
/// of the `failed` event `failed` once it finds its charge in Hyperline's
/// credit transactions: a new `event_id`, `"reconciled": true`. Checked
/// against the published schema, so the consumers are shown the real shape.
fn reconciled_success(failed: &Value) -> Value {
    let mut event = failed.clone();
    let object = event.as_object_mut().expect("an event object");
    object.remove("error");
    object.insert("event_id".into(), json!(uuid::Uuid::new_v4().to_string()));
    object.insert("type".into(), json!("credit_purchase.succeeded"));
    object.insert("invoice_id".into(), json!("inv_reconciled_example"));
    object.insert("new_credit_balance".into(), json!(32));
    object.insert("reconciled".into(), json!(true));
    let path = examples_dir().join("../docs/schemas/succeeded.schema.json");
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("the schema")).expect("JSON");
    let validator = jsonschema::validator_for(&schema).expect("a valid schema");
    let errors: Vec<String> = validator
        .iter_errors(&event)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{errors:?}: {event}");
    event
}

/// Publishes `event` as it is to the results exchange, with the worker's
/// properties; returns its `event_id`.
async fn publish_event(app: &TestApp, event: &Value) -> String {
    let event_id = event["event_id"].as_str().expect("an event id").to_owned();
    let kind = event["type"].as_str().expect("an event type");
    let command_id = event["command_id"].as_str().expect("a command id");
    let confirm = app
        .channel
        .basic_publish(
            app.results_exchange.as_str().into(),
            kind.into(),
            BasicPublishOptions::default(),
            event.to_string().as_bytes(),
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_message_id(event_id.as_str().into())
                .with_correlation_id(command_id.into())
                .with_type(kind.into()),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack(), "the broker took the event");
    event_id
}

/// The results log of the contract: a stream bound to the results exchange
/// with `#`. Declared here only where the worker has not declared it, with
/// the same kind and binding.
async fn ensure_results_log(connection: &Connection, log: &str, exchange: &str) {
    if stream_exists(connection, log).await {
        return;
    }
    let channel = connection.create_channel().await.expect("channel");
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    channel
        .queue_declare(
            log.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .expect("the results log is declared");
    channel
        .queue_bind(
            log.into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("the results log is bound");
    let _ = channel.close(200, "ok".into()).await;
}

/// A passive declare on a channel of its own (a missing queue closes it).
async fn stream_exists(connection: &Connection, name: &str) -> bool {
    let Ok(probe) = connection.create_channel().await else {
        return false;
    };
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let exists = probe
        .queue_declare(name.into(), passive, FieldTable::default())
        .await
        .is_ok();
    let _ = probe.close(200, "ok".into()).await;
    exists
}

/// Deletes `queue`, on a channel of its own (best effort: a failed test may
/// not have declared it).
async fn delete_queue(connection: &Connection, queue: &str) {
    let Ok(channel) = connection.create_channel().await else {
        return;
    };
    let _ = channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
    let _ = channel.close(200, "ok".into()).await;
}

/// The whole story of one language's examples: the publisher's three exits,
/// a consumer that handles each outcome once (live, from its queue after a
/// restart, and from the results log), keeps a later correction (a
/// reconciled `succeeded` after a `failed`), and acks what it handled.
async fn examples_run_against_a_real_worker(language: Language) {
    // Before anything is declared: a missing dependency fails here, clearly.
    language.interpreter();
    let faults = Faults {
        rate_limit: 0,
        scripted: vec![ScriptedResponse {
            customer_id: Some(REFUSED.into()),
            status: 422,
            body: json!({"message": "credit_count exceeds the product's limit"}),
            headers: Default::default(),
            times: None,
        }],
        ..Faults::default()
    };
    // A worker that declares no results log, so the test can show the
    // consumer's fallback first and then add the log itself (deleted below).
    let options = Options::default()
        .faults(faults)
        .env("CPW__AMQP__RESULTS_LOG_RETENTION", 0);
    let mut app = spawn_app_with(options).await;
    let admin = cpw_testkit::broker::connect("cpw-test-examples-admin")
        .await
        .expect("broker reachable");
    let dir = std::env::temp_dir().join(format!("cpw-examples-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let log = format!("{}.log", app.results_exchange);
    let first_queue = format!("{}.example-billing", app.queue);
    let second_queue = format!("{}.example-ledger", app.queue);
    for queue in [&first_queue, &second_queue, &log] {
        app.guard_queue(queue);
    }
    // The fallback first: a broker without the results log.
    assert!(!stream_exists(&admin, &log).await, "no results log yet");

    let mut billing = Consumer::start(language, &app, &dir, &first_queue, true);
    billing.expect("no results log ").await;
    billing.expect("consuming ").await;

    let succeeded_id = command_id();
    let succeeded = publish(language, &app, &succeeded_id, "cus_Typ0px2W0aiEtl", 30).await;
    assert_eq!(succeeded.status.code(), Some(0), "{succeeded:?}");
    let succeeded_event = succeeded.event();
    assert_eq!(
        succeeded_event["type"], "credit_purchase.succeeded",
        "{succeeded:?}"
    );
    assert_eq!(succeeded_event["command_id"], succeeded_id.as_str());

    let failed_id = command_id();
    let failed = publish(language, &app, &failed_id, REFUSED, 30).await;
    assert_eq!(failed.status.code(), Some(1), "{failed:?}");
    let failed_event = failed.event();
    assert_eq!(failed_event["type"], "credit_purchase.failed", "{failed:?}");
    assert_eq!(failed_event["error"]["code"], "rejected", "{failed:?}");
    assert_eq!(failed_event["command_id"], failed_id.as_str());

    billing
        .expect(&format!(
            "handled command_id={succeeded_id} type=credit_purchase.succeeded"
        ))
        .await;
    billing
        .expect(&format!(
            "handled command_id={failed_id} type=credit_purchase.failed code=rejected"
        ))
        .await;
    let duplicate = publish_duplicate(&app, &succeeded_event).await;
    let line = billing
        .expect(&format!("duplicate command_id={succeeded_id} "))
        .await;
    assert!(line.contains(&duplicate), "{line}");

    // A correction (docs/events.md, rule 2): the failed command's charge is
    // found later, and its reconciled `succeeded` supersedes the `failed`.
    // The same event again, and a late copy of the failure, are duplicates.
    let correction = reconciled_success(&failed_event);
    let correction_id = publish_event(&app, &correction).await;
    let line = billing
        .expect(&format!(
            "handled command_id={failed_id} type=credit_purchase.succeeded"
        ))
        .await;
    assert!(
        line.contains(&format!(
            "event_id={correction_id} reconciled supersedes=credit_purchase.failed"
        )),
        "{line}"
    );
    publish_event(&app, &correction).await;
    let line = billing
        .expect(&format!("duplicate command_id={failed_id} "))
        .await;
    assert!(line.contains(&correction_id), "{line}");
    let late_failure = publish_duplicate(&app, &failed_event).await;
    let line = billing
        .expect(&format!("duplicate command_id={failed_id} "))
        .await;
    assert!(line.contains(&late_failure), "{line}");
    billing.stop().await;
    assert_eq!(
        billing.handled(&succeeded_id).len(),
        1,
        "{}",
        billing.transcript()
    );
    assert_eq!(
        billing.handled(&failed_id).len(),
        2,
        "the failure, then its correction; {}",
        billing.transcript()
    );
    assert_eq!(app.depth(&first_queue).await, 0, "every event acked");

    // The results log, as the contract has it.
    ensure_results_log(&admin, &log, &app.results_exchange).await;
    let logged_id = command_id();
    let logged = publish(language, &app, &logged_id, "cus_Typ0px2W0aiEtl", 30).await;
    assert_eq!(logged.status.code(), Some(0), "{logged:?}");
    let logged_duplicate = publish_duplicate(&app, &logged.event()).await;
    // Seen while the billing consumer is down: its queue keeps them.
    publish_duplicate(&app, &succeeded_event).await;

    // A new consumer replays the log, duplicate included, then goes live.
    let mut ledger = Consumer::start(language, &app, &dir, &second_queue, true);
    ledger.expect("replaying the results log ").await;
    let line = ledger
        .expect(&format!("handled command_id={logged_id} "))
        .await;
    assert!(line.ends_with("via=log"), "{line}");
    let line = ledger
        .expect(&format!("duplicate command_id={logged_id} "))
        .await;
    assert!(line.contains(&logged_duplicate), "{line}");
    ledger.expect("consuming ").await;
    let live_id = command_id();
    let live = publish(language, &app, &live_id, "cus_Typ0px2W0aiEtl", 30).await;
    assert_eq!(live.status.code(), Some(0), "{live:?}");
    let line = ledger
        .expect(&format!("handled command_id={live_id} "))
        .await;
    assert!(line.ends_with("via=queue"), "{line}");
    ledger.stop().await;
    assert_eq!(
        ledger.handled(&logged_id).len(),
        1,
        "{}",
        ledger.transcript()
    );
    assert_eq!(ledger.handled(&live_id).len(), 1, "{}", ledger.transcript());
    assert_eq!(app.depth(&second_queue).await, 0, "every event acked");

    // The billing consumer comes back: what it missed waited in its queue,
    // and its seen file still knows the command it handled before.
    let mut billing = Consumer::start(language, &app, &dir, &first_queue, false);
    billing
        .expect(&format!("handled command_id={logged_id} "))
        .await;
    billing
        .expect(&format!("duplicate command_id={logged_id} "))
        .await;
    billing
        .expect(&format!("duplicate command_id={succeeded_id} "))
        .await;
    billing
        .expect(&format!("handled command_id={live_id} "))
        .await;
    billing.stop().await;
    assert!(
        billing.handled(&succeeded_id).is_empty(),
        "{}",
        billing.transcript()
    );
    assert_eq!(
        billing.handled(&logged_id).len(),
        1,
        "{}",
        billing.transcript()
    );
    assert_eq!(app.depth(&first_queue).await, 0, "every event acked");
    let seen = std::fs::read_to_string(dir.join(format!("{first_queue}.seen"))).expect("seen file");
    let recorded = |id: &str| -> Vec<&str> {
        seen.lines()
            .filter_map(|l| l.strip_prefix(id)?.strip_prefix(' '))
            .collect()
    };
    for id in [&succeeded_id, &logged_id, &live_id] {
        assert_eq!(
            recorded(id),
            ["credit_purchase.succeeded"],
            "{id} recorded once in the seen file:\n{seen}"
        );
    }
    assert_eq!(
        recorded(&failed_id),
        ["credit_purchase.failed", "credit_purchase.succeeded"],
        "the failure, then its correction, in the seen file:\n{seen}"
    );

    // No worker: no event comes, and the publisher says so with exit 2.
    app.stop_worker().await;
    let unanswered = publish(language, &app, &command_id(), "cus_Typ0px2W0aiEtl", 2).await;
    assert_eq!(unanswered.status.code(), Some(2), "{unanswered:?}");
    assert!(unanswered.stdout.trim().is_empty(), "{unanswered:?}");

    app.assert_charged_once(&[succeeded_id, logged_id, live_id]);
    for queue in [&first_queue, &second_queue, &log] {
        delete_queue(&admin, queue).await;
    }
    let _ = admin.close(200, "done".into()).await;
    app.cleanup().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_python_examples_publish_and_consume_against_a_real_worker() {
    examples_run_against_a_real_worker(Language::Python).await;
}

#[tokio::test]
async fn the_node_examples_publish_and_consume_against_a_real_worker() {
    examples_run_against_a_real_worker(Language::Node).await;
}
