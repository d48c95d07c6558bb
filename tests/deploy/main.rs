//! The deployment files (`deploy/`) and the published contract (`docs/`),
//! checked against the code.
//!
//! These files restate facts the code owns: the ops port and probe paths, the
//! configuration keys, the drain period, the queue and exchange names and
//! their arguments, the shapes of the messages. Nothing compiles them, so
//! without these tests they would drift silently, and the drift shows up only
//! in production: a probe on the wrong port restarts every pod, a misspelt
//! `CPW__` variable is ignored by the config crate, a definitions file whose
//! arguments differ from the worker's makes its start fail with
//! PRECONDITION_FAILED, a schema that is looser than the parser lets a
//! publisher ship commands that end up dead-lettered.
//!
//! Expected values are read from the code or from `config/default.toml`, so
//! changing either side alone fails a test. Two exceptions: the queue
//! arguments (private to `Topology`) are derived here from docs/contract.md section 5,
//! and one test against the broker (CPW_TEST_AMQP_URL, default
//! guest@127.0.0.1, as CI provides) checks them against the real declaration;
//! the command example is docs/contract.md section 2's, verbatim.
//!
//! One module per subject; `common` holds the helpers they share.

mod common;
mod compose;
mod definitions;
mod docker;
mod k8s;
mod observability;
mod schemas;

use crate::common::*;

#[test]
fn every_yaml_and_json_file_of_deploy_and_docs_parses() {
    let mut parsed = Vec::new();
    for dir in ["deploy", "docs"] {
        for file in files_under(dir) {
            if file.ends_with(".yaml") || file.ends_with(".yml") {
                assert!(!yaml_documents(&file).is_empty(), "{file} is empty");
                parsed.push(file);
            } else if file.ends_with(".json") {
                json_file(&file);
                parsed.push(file);
            }
        }
    }
    for expected in [
        "deploy/compose.yaml",
        "deploy/rabbitmq-definitions.json",
        "deploy/k8s/deployment.yaml",
        "docs/asyncapi.yaml",
        "docs/schemas/command.schema.json",
        "docs/schemas/succeeded.schema.json",
        "docs/schemas/failed.schema.json",
    ] {
        assert!(parsed.iter().any(|p| p == expected), "{expected} missing");
    }
}
