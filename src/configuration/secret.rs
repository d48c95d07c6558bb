//! Secrets: the Hyperline API key and the history keys, which must never
//! reach a log line, an error or an event.

use std::fmt;
use std::path::Path;

use serde::Deserialize;

use super::{ConfigError, invalid};

/// A secret (the Hyperline API key, a history key). Its `Debug` and
/// `Display` print `[REDACTED]`, so a `{:?}` of any struct holding it cannot
/// leak it into logs or errors.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(from = "String")]
pub struct Secret(String);

/// The Hyperline API key.
pub type ApiKey = Secret;

impl From<String> for Secret {
    fn from(key: String) -> Self {
        Secret::new(key)
    }
}

impl Secret {
    /// Wraps a secret; surrounding whitespace (a trailing newline in a
    /// secret file) is not part of it.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into().trim().to_owned())
    }

    /// The secret itself, for the `Authorization` header or a MAC only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

/// The shortest history key accepted: a MAC key an attacker could guess
/// protects nothing (`openssl rand -hex 32` gives 64 characters).
pub const MIN_HISTORY_KEY_LEN: usize = 32;

/// The entry of `worker.history_keys` that stands for the key derived from
/// the API key (the one used when no key is configured). That key is 32 raw
/// bytes, which no configured string can spell: without this entry, a move
/// to explicit keys dropped it, and every copy waiting in a delay queue and
/// every dead letter signed with it stopped verifying (windows and stored
/// outcomes lost, `reconcile` leaving every letter, `replay` needing
/// `--force`).
pub const DERIVED_HISTORY_KEY: &str = "derived-from-api-key";

/// One entry of `worker.history_keys`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HistoryKey {
    /// A key given as it is.
    Explicit(Secret),
    /// [`DERIVED_HISTORY_KEY`]: the key derived from `hyperline.api_key`.
    DerivedFromApiKey,
}

impl HistoryKey {
    /// An entry as written; surrounding whitespace is not part of it.
    pub fn parse(text: &str) -> HistoryKey {
        match text.trim() {
            DERIVED_HISTORY_KEY => HistoryKey::DerivedFromApiKey,
            key => HistoryKey::Explicit(Secret::new(key)),
        }
    }
}

/// Reads the key file (when `file` is set) into `keys`, and refuses a key
/// list no replica could use: a short key an attacker could guess, or a key
/// given twice.
pub(super) fn read_history_keys(
    keys: &mut Vec<HistoryKey>,
    file: Option<&Path>,
) -> Result<(), ConfigError> {
    if let Some(path) = file {
        if !keys.is_empty() {
            return Err(invalid(
                "worker.history_keys_file",
                "is set together with worker.history_keys: set only one",
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| {
            invalid(
                "worker.history_keys_file",
                format!("cannot be read ({}): {e}", path.display()),
            )
        })?;
        *keys = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(HistoryKey::parse)
            .collect();
        if keys.is_empty() {
            return Err(invalid("worker.history_keys_file", "holds no key"));
        }
    }
    let key = match file {
        Some(_) => "worker.history_keys_file",
        None => "worker.history_keys",
    };
    for (i, entry) in keys.iter().enumerate() {
        if keys[..i].contains(entry) {
            return Err(invalid(
                key,
                format!("key {} repeats an earlier key", i + 1),
            ));
        }
        let HistoryKey::Explicit(secret) = entry else {
            continue;
        };
        let len = secret.expose().chars().count();
        if len < MIN_HISTORY_KEY_LEN {
            return Err(invalid(
                key,
                format!(
                    "key {} of {} has {len} characters; at least {MIN_HISTORY_KEY_LEN} are \
                     needed (e.g. `openssl rand -hex 32`)",
                    i + 1,
                    keys.len()
                ),
            ));
        }
    }
    Ok(())
}

/// `worker.history_keys` as a TOML array, or `a,b` from the environment
/// (one key arrives as a scalar); blanks and empty entries dropped.
pub(super) fn history_key_list<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<HistoryKey>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Keys {
        List(Vec<String>),
        One(String),
    }
    let entries = match Keys::deserialize(d)? {
        Keys::List(list) => list,
        Keys::One(text) => vec![text],
    };
    Ok(entries
        .iter()
        .flat_map(|entry| entry.split(','))
        .map(str::trim)
        .filter(|key| !key.is_empty())
        .map(HistoryKey::parse)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::super::tests::{load, refused};
    use super::*;

    #[test]
    fn history_keys_are_secrets_refused_when_unusable() {
        let long = "k".repeat(MIN_HISTORY_KEY_LEN);
        let other = "o".repeat(MIN_HISTORY_KEY_LEN + 8);
        let both = format!("{other},{long}");
        let s = load(&[("CPW__WORKER__HISTORY_KEYS", both.as_str())]).expect("two keys");
        let explicit = |k: &str| HistoryKey::Explicit(Secret::new(k));
        assert_eq!(
            s.worker.history_keys,
            [explicit(&other), explicit(&long)],
            "the first signs"
        );
        assert!(!format!("{s:?}").contains(&long), "redacted in Debug");
        refused(
            &[("CPW__WORKER__HISTORY_KEYS", "short")],
            "worker.history_keys",
        );
        let twice = format!("{long},{long}");
        refused(
            &[("CPW__WORKER__HISTORY_KEYS", twice.as_str())],
            "worker.history_keys",
        );

        // The derived key kept beside an explicit one, in either place.
        let beside = format!("{long}, {DERIVED_HISTORY_KEY}");
        let s = load(&[("CPW__WORKER__HISTORY_KEYS", beside.as_str())]).expect("kept");
        assert_eq!(
            s.worker.history_keys,
            [explicit(&long), HistoryKey::DerivedFromApiKey]
        );
        let twice = format!("{DERIVED_HISTORY_KEY},{DERIVED_HISTORY_KEY}");
        refused(
            &[("CPW__WORKER__HISTORY_KEYS", twice.as_str())],
            "worker.history_keys",
        );

        let dir = std::env::temp_dir().join(format!("cpw-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("keys");
        std::fs::write(
            &file,
            format!("# rotated 2026-12-01\n{other}\n\n{long}\n{DERIVED_HISTORY_KEY}\n"),
        )
        .expect("write");
        let path = file.to_string_lossy().into_owned();
        let s = load(&[("CPW__WORKER__HISTORY_KEYS_FILE", path.as_str())]).expect("a key file");
        assert_eq!(s.worker.history_keys.len(), 3);
        assert_eq!(s.worker.history_keys[2], HistoryKey::DerivedFromApiKey);
        refused(
            &[
                ("CPW__WORKER__HISTORY_KEYS_FILE", path.as_str()),
                ("CPW__WORKER__HISTORY_KEYS", long.as_str()),
            ],
            "worker.history_keys_file",
        );
        std::fs::write(&file, "# nothing yet\n").expect("write");
        refused(
            &[("CPW__WORKER__HISTORY_KEYS_FILE", path.as_str())],
            "worker.history_keys_file",
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_key_never_shows_in_debug_output() {
        let s = load(&[("CPW__HYPERLINE__API_KEY", "sk_live_secret_value")]).expect("valid");
        let debug = format!("{s:?} {}", ApiKey::new("sk_live_secret_value"));
        assert!(!debug.contains("sk_live_secret_value"), "{debug}");
        assert!(debug.contains("[REDACTED]"));
    }
}
