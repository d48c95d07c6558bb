//! Settings, loaded in layers and checked once at start.
//!
//! A wrong value found at start costs an operator one log line; the same value
//! found at 3 a.m. in the middle of a purchase costs a customer. So every rule
//! that can be checked without the network is checked here, and the error names
//! the offending key in one line. Once a [`Settings`] exists it is valid: the
//! rest of the crate never re-checks it.

mod amqp;
mod hyperline;
mod lanes;
mod pem;
mod retry;
mod secret;
mod unknown_keys;
mod worker;

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

pub use crate::budget::CONFIRM_WAITS_AFTER_DEADLINE;
pub use amqp::{AmqpSettings, BrokerUrls, QueueType};
pub use hyperline::HyperlineSettings;
pub use lanes::{DEFAULT_LANE, Lane};
pub use pem::Pem;
pub use retry::{RetrySettings, after_deadline_secs, budget_line};
pub use secret::{ApiKey, DERIVED_HISTORY_KEY, HistoryKey, MIN_HISTORY_KEY_LEN, Secret};
pub use unknown_keys::UnknownKey;
use unknown_keys::{WORKING_DIRECTORY_FILE, unknown_keys_line};
pub use worker::{LogFormat, LogSettings, ServerSettings, WorkerSettings};

/// The documented defaults: `config/default.toml` is compiled in as the first
/// layer, so the file an operator reads and the defaults the code uses can
/// never disagree.
const DEFAULTS_TOML: &str = include_str!("../../config/default.toml");

/// Hyperline keeps a successful answer for a key this long; a retry after it
/// could charge again.
pub const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);

/// Why the settings could not be loaded. `Display` is the one line printed
/// before the binary exits non-zero.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A layer could not be read or a value has the wrong type.
    #[error("invalid configuration: {0}")]
    Load(#[from] config::ConfigError),
    /// A value of the right type breaks a rule.
    #[error("invalid configuration: `{key}` {reason}")]
    Invalid { key: &'static str, reason: String },
    /// A key that no setting reads: a typo would otherwise leave the
    /// default in force while `check` says all is well.
    #[error("invalid configuration: {}", unknown_keys_line(.0))]
    Unknown(Vec<UnknownKey>),
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// Every setting of the worker and its tools.
#[derive(Clone, Debug, Deserialize)]
pub struct Settings {
    /// The broker and the names of the topology.
    pub amqp: AmqpSettings,
    /// The Hyperline API.
    pub hyperline: HyperlineSettings,
    /// In-process and broker-side retries.
    pub retry: RetrySettings,
    /// The consuming loop.
    pub worker: WorkerSettings,
    /// The operations HTTP server.
    pub server: ServerSettings,
    /// Logs and traces.
    pub log: LogSettings,
}

impl Settings {
    /// Loads the layers (defaults, `config/default.toml`, `file`, `CPW__…`
    /// environment) and validates the result.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        let vars: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(file, vars)
    }

    /// [`Settings::load`] with an explicit environment, so tests need not
    /// mutate the process's.
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("CPW__"))
            .collect();
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(
                DEFAULTS_TOML,
                config::FileFormat::Toml,
            ))
            .add_source(config::File::with_name(WORKING_DIRECTORY_FILE).required(false));
        if let Some(file) = file {
            builder = builder.add_source(config::File::from(file).required(true));
        }
        let config = builder
            .add_source(
                config::Environment::with_prefix("CPW")
                    .prefix_separator("__")
                    .separator("__")
                    .list_separator(",")
                    .with_list_parse_key("retry.redelivery_delays_secs")
                    .with_list_parse_key("amqp.url")
                    .with_list_parse_key("amqp.lanes")
                    .with_list_parse_key("worker.history_keys")
                    .try_parsing(true)
                    .source(Some(env.clone())),
            )
            .build()?;
        // Deserialized through serde_ignored: every key the structs do not
        // read is reported instead of silently dropped.
        let mut ignored = Vec::new();
        let settings: Settings = serde_ignored::deserialize(config, |path| {
            ignored.push(path.to_string());
        })?;
        ignored.sort();
        if !ignored.is_empty() {
            return Err(ConfigError::Unknown(unknown_keys::describe(
                ignored, file, &env,
            )));
        }
        settings.validated()
    }

    /// Applies every rule that a type cannot express, and reads the files
    /// the settings name (CA certificates, keys).
    fn validated(mut self) -> Result<Settings, ConfigError> {
        self.amqp.validate()?;
        self.hyperline.validate()?;
        self.retry.validate()?;
        retry::validate_time_budget(&self)?;
        if self.worker.shutdown_grace_secs == 0 {
            return Err(invalid("worker.shutdown_grace_secs", "must be positive"));
        }
        secret::read_history_keys(
            &mut self.worker.history_keys,
            self.worker.history_keys_file.as_deref(),
        )?;
        self.hyperline.read_api_key_file()?;
        Ok(self)
    }

    /// The longest one answer pauses the replica's requests (a 429's
    /// `Retry-After` or `X-RateLimit-Reset`, whatever it says): the
    /// delivery's deadline, or `retry.max_rate_limit_wait_secs` when that is
    /// longer. Hyperline's write window is 10 s, so an honest wait is far
    /// shorter; a longer pause holds no delivery (each leaves at its deadline
    /// and waits in a delay queue), it only keeps the replica from seeing
    /// that the API is open again. If it is not, the next 429 pauses the
    /// replica again, using no attempt and no step. Below RabbitMQ's
    /// consumer timeout, as both settings are.
    pub fn longest_rate_limit_pause(&self) -> Duration {
        self.worker
            .delivery_deadline()
            .max(self.retry.max_rate_limit_wait())
    }

    /// Hyperline's idempotency window.
    pub fn idempotency_window(&self) -> Duration {
        Duration::from_secs(self.hyperline.idempotency_window_secs)
    }

    /// The key, or the error `run` stops with when there is none.
    pub fn require_api_key(&self) -> Result<&ApiKey, ConfigError> {
        self.hyperline.api_key.as_ref().ok_or_else(|| {
            invalid(
                "hyperline.api_key",
                "is not set (set CPW__HYPERLINE__API_KEY or hyperline.api_key_file)",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads the defaults under `pairs`, as `CPW__…` variables.
    pub(super) fn load(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::load_from(
            None,
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    /// The error line, which must name `key`.
    pub(super) fn refused(pairs: &[(&str, &str)], key: &str) {
        let line = load(pairs).expect_err("refused").to_string();
        assert!(line.contains(key), "{line:?} does not name {key}");
        assert!(!line.contains('\n'), "one line: {line:?}");
    }

    #[test]
    fn defaults_match_the_contract() {
        let s = load(&[]).expect("defaults are valid");
        assert_eq!(
            s.amqp.url.nodes(),
            ["amqp://guest:guest@127.0.0.1:5672/%2f"]
        );
        assert_eq!(s.amqp.quorum_initial_group_size, 3);
        assert_eq!(s.amqp.queue, "credit-purchases");
        assert_eq!(s.amqp.results_exchange, "credit-purchase-results");
        assert_eq!(s.amqp.queue_type, QueueType::Quorum);
        assert!(s.amqp.declare_topology);
        assert_eq!(
            s.hyperline.base_url.as_str(),
            "https://sandbox.api.hyperline.co/"
        );
        assert_eq!(s.hyperline.timeout_secs, 30);
        assert_eq!(s.retry.redelivery_delays_secs, vec![30, 300, 1800, 7200]);
        assert_eq!(s.worker.shutdown_grace_secs, 25);
        assert_eq!(s.server.listen.to_string(), "0.0.0.0:9090");
        assert_eq!(s.log.format, LogFormat::Json);
        assert!(s.hyperline.api_key.is_none());
        assert!(s.require_api_key().is_err());
    }

    #[test]
    fn environment_overrides_with_lists() {
        let s = load(&[
            ("CPW__AMQP__PREFETCH", "128"),
            ("CPW__AMQP__QUEUE_TYPE", "classic"),
            ("CPW__RETRY__REDELIVERY_DELAYS_SECS", "5,60"),
            ("CPW__HYPERLINE__API_KEY", "key_123"),
            ("CPW__LOG__FORMAT", "pretty"),
            ("OTHER__AMQP__PREFETCH", "7"),
        ])
        .expect("valid");
        assert_eq!(s.amqp.prefetch, 128);
        assert_eq!(s.amqp.queue_type, QueueType::Classic);
        assert_eq!(s.retry.redelivery_delays_secs, vec![5, 60]);
        let one = load(&[("CPW__RETRY__REDELIVERY_DELAYS_SECS", "45")]).expect("one step");
        assert_eq!(one.retry.redelivery_delays_secs, vec![45]);
        assert_eq!(
            s.require_api_key().map(ApiKey::expose).ok(),
            Some("key_123")
        );
        assert_eq!(s.log.format, LogFormat::Pretty);
    }

    #[test]
    fn a_config_file_is_layered_under_the_environment() {
        let dir = std::env::temp_dir().join(format!("cpw-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("worker.toml");
        std::fs::write(&file, "[amqp]\nprefetch = 9\nqueue = \"from-file\"\n").expect("write");
        let env = [("CPW__AMQP__QUEUE".to_string(), "from-env".to_string())];
        let s = Settings::load_from(Some(&file), env).expect("valid");
        assert_eq!((s.amqp.prefetch, s.amqp.queue.as_str()), (9, "from-env"));
        assert!(Settings::load_from(Some(&dir.join("missing.toml")), []).is_err());
    }

    #[test]
    fn bad_values_name_their_key() {
        refused(&[("CPW__AMQP__PREFETCH", "many")], "prefetch");
        refused(&[("CPW__AMQP__PREFETCH", "0")], "amqp.prefetch");
        refused(&[("CPW__AMQP__PREFETCH", "70000")], "prefetch");
        refused(&[("CPW__AMQP__URL", "http://broker")], "amqp.url");
        refused(&[("CPW__AMQP__QUEUE", "")], "amqp.queue");
        refused(&[("CPW__AMQP__QUEUE", "amq.reserved")], "amqp.queue");
        refused(&[("CPW__AMQP__QUEUE", &"q".repeat(240))], "amqp.queue");
        refused(&[("CPW__AMQP__QUEUE_TYPE", "stream")], "queue_type");
        refused(&[("CPW__AMQP__DELIVERY_LIMIT", "1")], "amqp.delivery_limit");
        refused(
            &[("CPW__AMQP__CONFIRM_TIMEOUT_SECS", "0")],
            "amqp.confirm_timeout_secs",
        );
        refused(
            &[("CPW__HYPERLINE__TIMEOUT_SECS", "0")],
            "hyperline.timeout_secs",
        );
        refused(
            &[("CPW__HYPERLINE__CONNECT_TIMEOUT_SECS", "0")],
            "hyperline.connect_timeout_secs",
        );
        refused(&[("CPW__HYPERLINE__BASE_URL", "not a url")], "base_url");
        refused(
            &[("CPW__HYPERLINE__BASE_URL", "ftp://api.hyperline.co")],
            "hyperline.base_url",
        );
        refused(
            &[("CPW__HYPERLINE__BASE_URL", "https://api.hyperline.co/?x=1")],
            "hyperline.base_url",
        );
        refused(&[("CPW__HYPERLINE__API_KEY", "  ")], "hyperline.api_key");
        refused(&[("CPW__RETRY__ATTEMPTS", "0")], "retry.attempts");
        refused(
            &[("CPW__RETRY__INITIAL_BACKOFF_MS", "0")],
            "retry.initial_backoff_ms",
        );
        refused(
            &[
                ("CPW__RETRY__MAX_BACKOFF_MS", "100"),
                ("CPW__RETRY__INITIAL_BACKOFF_MS", "200"),
            ],
            "retry.max_backoff_ms",
        );
        refused(
            &[("CPW__RETRY__REDELIVERY_DELAYS_SECS", "30,0")],
            "retry.redelivery_delays_secs",
        );
        refused(
            &[("CPW__RETRY__MAX_RATE_LIMIT_WAIT_SECS", "1500")],
            "retry.max_rate_limit_wait_secs",
        );
        refused(
            &[("CPW__WORKER__SHUTDOWN_GRACE_SECS", "0")],
            "worker.shutdown_grace_secs",
        );
        refused(
            &[("CPW__WORKER__DELIVERY_DEADLINE_SECS", "30")],
            "worker.delivery_deadline_secs",
        );
        refused(
            &[("CPW__WORKER__DELIVERY_DEADLINE_SECS", "1500")],
            "worker.delivery_deadline_secs",
        );
        refused(
            &[("CPW__HYPERLINE__IDEMPOTENCY_WINDOW_SECS", "86401")],
            "hyperline.idempotency_window_secs",
        );
        refused(&[("CPW__SERVER__LISTEN", "nowhere")], "listen");
        refused(&[("CPW__LOG__FORMAT", "xml")], "format");
    }
}
