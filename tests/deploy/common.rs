//! Shared helpers: reading the repository's files, and the code's side of
//! each comparison (defaults, documented keys, codes and kinds).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use credit_purchase_worker::configuration::Settings;
use credit_purchase_worker::contract::{ErrorCode, EventKind};
use serde::Deserialize;
use serde_json::Value;

pub(crate) fn repo(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

pub(crate) fn read(relative: &str) -> String {
    let path = repo(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every document of a YAML file; `---` separates them. Empty documents (a
/// leading `---`) are dropped. Merge keys (`<<: *anchor`, which compose
/// files use) are applied, as Docker Compose applies them.
pub(crate) fn yaml_documents(relative: &str) -> Vec<Value> {
    let text = read(relative);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            let mut yaml = serde_norway::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{relative} is not valid YAML: {e}"));
            yaml.apply_merge()
                .unwrap_or_else(|e| panic!("{relative}: bad merge key: {e}"));
            serde_json::to_value(yaml)
                .unwrap_or_else(|e| panic!("{relative} does not map to JSON: {e}"))
        })
        .filter(|v| !v.is_null())
        .collect()
}

pub(crate) fn yaml(relative: &str) -> Value {
    let mut docs = yaml_documents(relative);
    assert_eq!(docs.len(), 1, "{relative} should hold one YAML document");
    docs.remove(0)
}

pub(crate) fn json_file(relative: &str) -> Value {
    serde_json::from_str(&read(relative))
        .unwrap_or_else(|e| panic!("{relative} is not valid JSON: {e}"))
}

/// Files under `dir` (relative to the repository), recursively, as
/// repository-relative paths with `/` separators, sorted.
pub(crate) fn files_under(dir: &str) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let relative = path.strip_prefix(root).expect("under the root");
                out.push(relative.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    let root = repo("");
    let mut out = Vec::new();
    walk(&root, &root.join(dir), &mut out);
    out.sort();
    out
}

/// `value` at a `/`-separated path of object keys and array indices.
pub(crate) fn at<'a>(value: &'a Value, pointer: &str) -> &'a Value {
    value
        .pointer(pointer)
        .unwrap_or_else(|| panic!("no {pointer} in {value}"))
}

pub(crate) fn text<'a>(value: &'a Value, pointer: &str) -> &'a str {
    at(value, pointer)
        .as_str()
        .unwrap_or_else(|| panic!("{pointer} is not a string in {value}"))
}

pub(crate) fn integer(value: &Value, pointer: &str) -> i64 {
    at(value, pointer)
        .as_i64()
        .unwrap_or_else(|| panic!("{pointer} is not an integer in {value}"))
}

/// The settings with nothing but the defaults.
pub(crate) fn default_settings() -> Settings {
    Settings::load_from(None, std::iter::empty()).expect("the defaults are valid")
}

pub(crate) fn default_toml() -> toml::Table {
    read("config/default.toml")
        .parse::<toml::Table>()
        .expect("config/default.toml is valid TOML")
}

/// `server.listen` of `config/default.toml`: the port every probe, container
/// port, scrape annotation and `EXPOSE` must use.
pub(crate) fn ops_port() -> u16 {
    let table = default_toml();
    let listen = table["server"]["listen"]
        .as_str()
        .expect("server.listen is a string");
    let addr: SocketAddr = listen.parse().expect("server.listen is an address");
    assert_eq!(
        addr.port(),
        default_settings().server.listen.port(),
        "the compiled-in defaults are config/default.toml"
    );
    addr.port()
}

/// Every key `config/default.toml` documents, as `section.key`: the keys it
/// sets, and the optional ones it shows commented out (`# api_key_file = ...`).
///
/// The config crate ignores unknown keys, so a misspelt `CPW__` variable
/// would silently do nothing; this set is what a name is checked against.
pub(crate) fn documented_keys() -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for (section, table) in default_toml() {
        let table = table
            .as_table()
            .expect("every top-level entry is a section");
        for key in table.keys() {
            keys.insert(format!("{section}.{key}"));
        }
    }
    let mut section: Option<String> = None;
    for line in read("config/default.toml").lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.to_owned());
        } else if let (Some(section), Some(comment)) = (&section, line.strip_prefix('#'))
            && let Some((key, _)) = comment.split_once('=')
        {
            let key = key.trim();
            if !key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                keys.insert(format!("{section}.{key}"));
            }
        }
    }
    keys
}

/// `CPW__HYPERLINE__API_KEY_FILE` → `hyperline.api_key_file`.
pub(crate) fn key_of_variable(name: &str) -> Option<String> {
    let rest = name.strip_prefix("CPW__")?;
    Some(rest.to_ascii_lowercase().replace("__", "."))
}

/// Every `ErrorCode`, with an exhaustive match so a new variant does not
/// compile until it is added here (and so to the checks of failed.schema.json).
pub(crate) fn all_error_codes() -> Vec<ErrorCode> {
    let all = [
        ErrorCode::InvalidCommand,
        ErrorCode::Rejected,
        ErrorCode::IdempotencyConflict,
        ErrorCode::RetriesExhausted,
        ErrorCode::UnexpectedResponse,
    ];
    for code in all {
        match code {
            ErrorCode::InvalidCommand
            | ErrorCode::Rejected
            | ErrorCode::IdempotencyConflict
            | ErrorCode::RetriesExhausted
            | ErrorCode::UnexpectedResponse => {}
        }
    }
    all.to_vec()
}

/// Every `EventKind`, exhaustive for the same reason.
pub(crate) fn all_event_kinds() -> Vec<EventKind> {
    let all = [EventKind::Succeeded, EventKind::Failed];
    for kind in all {
        match kind {
            EventKind::Succeeded | EventKind::Failed => {}
        }
    }
    all.to_vec()
}
