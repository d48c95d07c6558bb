//! pika, the Python client of `examples/python`, as a publisher and reader
//! the worker does not control. Its short strings (`message_id`, `type`,
//! `reply_to`, header names, ...) are whatever bytes it is given, where
//! lapin's are text: a test that needs a property that is not UTF-8, or to
//! see one as the broker keeps it, goes through here (`pika.py`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::{Value, json};
use tokio::process::Command;

use crate::WAIT;

/// The Python that has pika: the venv `.ci/run` makes from
/// `examples/python/requirements.txt` (`CPW_EXAMPLES_PYTHON` names another).
/// Panics, naming the install step, when pika is not there, so a test that
/// needs it cannot pass without it.
pub fn python() -> PathBuf {
    let python = std::env::var_os("CPW_EXAMPLES_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/examples-venv/bin/python3")
        });
    let has_pika = std::process::Command::new(&python)
        .args(["-c", "import pika"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_pika,
        "{} cannot import pika: install the examples' dependencies as .ci/run does:\n  \
         python3 -m venv target/examples-venv && target/examples-venv/bin/pip install \
         --require-hashes -r examples/python/requirements.txt",
        python.display()
    );
    python
}

/// A message as pika sends and reads it, every string as bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Message {
    pub body: Vec<u8>,
    /// The short-string properties, by pika's names (`message_id`, `type`,
    /// `correlation_id`, `reply_to`, `content_type`, ...).
    pub properties: BTreeMap<String, Vec<u8>>,
    /// The headers whose value is a string (a byte array on publishing).
    pub headers: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Message {
    pub fn new(body: impl Into<Vec<u8>>) -> Message {
        Message {
            body: body.into(),
            ..Message::default()
        }
    }

    pub fn property(mut self, name: &str, value: impl Into<Vec<u8>>) -> Message {
        self.properties.insert(name.to_owned(), value.into());
        self
    }

    pub fn header(mut self, name: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Message {
        self.headers.insert(name.into(), value.into());
        self
    }

    fn to_json(&self, queue: &str) -> Value {
        json!({
            "queue": queue,
            "body": self.body,
            "properties": self.properties,
            "headers": self.headers.iter().collect::<Vec<_>>(),
        })
    }

    fn from_json(line: &str) -> Message {
        let v: Value = serde_json::from_str(line).expect("pika.py prints JSON");
        let bytes = |v: &Value| -> Vec<u8> {
            serde_json::from_value(v.clone()).expect("bytes as a list of integers")
        };
        let pairs = v["headers"].as_array().into_iter().flatten();
        Message {
            body: bytes(&v["body"]),
            properties: v["properties"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(name, value)| (name.clone(), bytes(value)))
                .collect(),
            headers: pairs.map(|kv| (bytes(&kv[0]), bytes(&kv[1]))).collect(),
        }
    }
}

/// Publishes `messages` to `queue` (the default exchange), each confirmed.
pub async fn publish(queue: &str, messages: &[Message]) {
    let publish: Vec<Value> = messages.iter().map(|m| m.to_json(queue)).collect();
    run(json!({ "publish": publish, "take": null })).await;
}

/// Takes every message of `queue`, as the broker keeps it.
pub async fn take(queue: &str) -> Vec<Message> {
    let out = run(json!({ "publish": [], "take": queue })).await;
    out.lines().map(Message::from_json).collect()
}

/// Runs `pika.py` on `spec` (bounded by [`WAIT`]); its standard output.
async fn run(mut spec: Value) -> String {
    spec["url"] = json!(crate::broker::amqp_url());
    let output = Command::new(python())
        .arg("-c")
        .arg(include_str!("pika.py"))
        .arg(spec.to_string())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(WAIT, output)
        .await
        .expect("pika.py ends within the bound")
        .expect("pika.py runs");
    assert!(
        output.status.success(),
        "pika.py failed ({:?}): {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("JSON is UTF-8")
}
