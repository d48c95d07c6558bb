//! Keys no setting reads: refused, with the known key they most resemble.
//!
//! A typo (`amqp.prefecth`) would otherwise leave the default in force while
//! `check` says all is well.

use std::path::Path;

use super::DEFAULTS_TOML;

/// A key no setting reads, where it came from, and the known key it most
/// resembles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownKey {
    /// The dotted key, as the `config` crate sees it (`amqp.prefecth`).
    pub key: String,
    /// The file or the environment variable that set it.
    pub origin: String,
    /// The closest known key, when one is close.
    pub closest: Option<String>,
}

pub(super) fn unknown_keys_line(keys: &[UnknownKey]) -> String {
    keys.iter()
        .map(|u| {
            let hint = u
                .closest
                .as_ref()
                .map(|k| format!(": did you mean `{k}`?"))
                .unwrap_or_else(|| " (no setting has a similar name)".to_owned());
            format!("unknown key `{}` in {}{hint}", u.key, u.origin)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The keys that are valid without appearing in `config/default.toml`,
/// where they are commented out because they have no default.
const OPTIONAL_KEYS: [&str; 6] = [
    "amqp.ca_file",
    "hyperline.api_key",
    "hyperline.api_key_file",
    "hyperline.ca_file",
    "worker.history_keys",
    "worker.history_keys_file",
];

/// The layer an operator may drop in the working directory.
pub(super) const WORKING_DIRECTORY_FILE: &str = "config/default.toml";

/// `[section] key = value`, as the defaults are written.
type Sections = config::Map<String, config::Map<String, config::Value>>;

/// Every key a setting reads (those of the compiled-in defaults and the
/// optional ones) and the sections, to suggest from.
fn known_keys() -> Vec<String> {
    let mut keys: Vec<String> = OPTIONAL_KEYS.iter().map(|k| (*k).to_owned()).collect();
    let defaults = config::Config::builder()
        .add_source(config::File::from_str(
            DEFAULTS_TOML,
            config::FileFormat::Toml,
        ))
        .build()
        .and_then(config::Config::try_deserialize::<Sections>);
    for (section, inner) in defaults.into_iter().flatten() {
        keys.push(section.clone());
        keys.extend(inner.into_keys().map(|k| format!("{section}.{k}")));
    }
    keys
}

/// The known key closest to `key` in spelling, when one is close enough to
/// be a plausible typo.
fn closest_key(key: &str) -> Option<String> {
    known_keys()
        .into_iter()
        .map(|k| (strsim::normalized_damerau_levenshtein(key, &k), k))
        .filter(|(score, _)| *score >= 0.6)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
}

/// Where an unknown key came from: the `CPW__` variable that spells it, else
/// the first file layer, from the last, that holds it (the `config` crate
/// keeps no origin once values are merged).
fn origin_of(key: &str, file: Option<&Path>, env: &config::Map<String, String>) -> String {
    let variable = env.keys().find(|name| {
        name.strip_prefix("CPW__")
            .is_some_and(|rest| rest.to_lowercase().replace("__", ".") == key)
    });
    if let Some(name) = variable {
        return format!("environment variable {name}");
    }
    let holds = |path: &Path| {
        config::Config::builder()
            .add_source(config::File::from(path).required(false))
            .build()
            .is_ok_and(|layer| layer.get::<config::Value>(key).is_ok())
    };
    file.into_iter()
        .chain([Path::new(WORKING_DIRECTORY_FILE)])
        .find(|path| holds(path))
        .map_or_else(
            || "the configuration".to_owned(),
            |path| format!("file {}", path.display()),
        )
}

/// The keys `serde_ignored` reported, each with its origin and the known key
/// it most resembles.
pub(super) fn describe(
    ignored: Vec<String>,
    file: Option<&Path>,
    env: &config::Map<String, String>,
) -> Vec<UnknownKey> {
    ignored
        .into_iter()
        .map(|key| UnknownKey {
            origin: origin_of(&key, file, env),
            closest: closest_key(&key),
            key,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::tests::load;
    use super::super::{ConfigError, Settings};
    use super::*;

    #[test]
    fn unknown_keys_are_refused_naming_the_closest_known_one() {
        let line = load(&[("CPW__AMQP__PREFECTH", "0")])
            .expect_err("a typo in a variable")
            .to_string();
        assert_eq!(
            line,
            "invalid configuration: unknown key `amqp.prefecth` in environment variable \
             CPW__AMQP__PREFECTH: did you mean `amqp.prefetch`?"
        );
        let dir = std::env::temp_dir().join(format!("cpw-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("worker.toml");
        std::fs::write(
            &file,
            "[amqp]\nprefecth = 5\n[hyperline]\napi_key_fiel = \"/k\"\n[retyr]\nattempts = 2\n",
        )
        .expect("write");
        let line = Settings::load_from(Some(&file), [])
            .expect_err("typos in a file")
            .to_string();
        let origin = format!("in file {}", file.display());
        for expected in [
            format!("`amqp.prefecth` {origin}: did you mean `amqp.prefetch`?"),
            format!("`hyperline.api_key_fiel` {origin}: did you mean `hyperline.api_key_file`?"),
            format!("`retyr` {origin}: did you mean `retry`?"),
        ] {
            assert!(line.contains(&expected), "{line:?} lacks {expected:?}");
        }
        assert!(!line.contains('\n'), "one line: {line:?}");
    }

    #[test]
    fn every_optional_key_is_known() {
        for key in OPTIONAL_KEYS {
            let (section, name) = key.split_once('.').expect("dotted");
            let variable = format!("CPW__{}__{}", section, name).to_uppercase();
            let outcome = load(&[(&variable, "/nonexistent/file")]);
            assert!(
                !matches!(outcome, Err(ConfigError::Unknown(_))),
                "{key}: {outcome:?}"
            );
        }
    }
}
