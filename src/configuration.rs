//! Settings, loaded in layers and checked once at start.
//!
//! A wrong value found at start costs an operator one log line; the same value
//! found at 3 a.m. in the middle of a purchase costs a customer. So every rule
//! that can be checked without the network is checked here, and the error names
//! the offending key in one line. Once a [`Settings`] exists it is valid: the
//! rest of the crate never re-checks it.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

/// The documented defaults: `config/default.toml` is compiled in as the first
/// layer, so the file an operator reads and the defaults the code uses can
/// never disagree.
const DEFAULTS_TOML: &str = include_str!("../config/default.toml");

/// Hyperline keeps a successful answer for a key this long; a retry after it
/// could charge again.
pub const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);

/// RabbitMQ closes the channel of a delivery left unacked this long (its
/// default `consumer_timeout`); every delivery must be settled well before.
const CONSUMER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

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

fn unknown_keys_line(keys: &[UnknownKey]) -> String {
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
const WORKING_DIRECTORY_FILE: &str = "config/default.toml";

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

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

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

/// Type of the commands queue.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Replicated, survives a broker node loss; the default.
    Quorum,
    /// Single-node, for brokers without quorum queues.
    Classic,
}

/// Output format of the logs.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line, for log pipelines.
    Json,
    /// Human-readable, for a terminal.
    Pretty,
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

/// `[amqp]`.
#[derive(Clone, Debug, Deserialize)]
pub struct AmqpSettings {
    /// The broker's node URLs (`amqp://` or `amqps://`): one, or every node
    /// of one cluster. They may carry a password, so they are never logged
    /// whole.
    #[serde(deserialize_with = "url_list")]
    pub url: BrokerUrls,
    /// The commands queue; the other names derive from it.
    pub queue: String,
    /// Topic exchange of the result events.
    pub results_exchange: String,
    /// `basic.qos` prefetch: the in-flight commands of a replica.
    pub prefetch: u16,
    /// Quorum or classic commands queue.
    pub queue_type: QueueType,
    /// Declare the topology at start.
    pub declare_topology: bool,
    /// `x-delivery-limit` of a quorum commands queue.
    pub delivery_limit: u32,
    /// Seconds to wait for a publisher confirm.
    pub confirm_timeout_secs: u64,
    /// The connection's name on the broker; empty = derived from the host.
    pub connection_name: String,
    /// Extra CA certificates (PEM) for `amqps://`.
    pub ca_file: Option<PathBuf>,
    /// `x-quorum-initial-group-size` of every quorum queue: how many nodes
    /// hold a replica when the queue is created. RabbitMQ caps it at the
    /// nodes running then, so the default (3) means "every node, up to 3".
    pub quorum_initial_group_size: u32,
    /// How long the results log (`<results_exchange>.log`) keeps events:
    /// `7d`, `12h`, `90m`, `3600s`; `0` declares no log.
    pub results_log_retention: String,
}

/// The node URLs of `amqp.url`, at least one, each `amqp://` or `amqps://`.
/// A replica connects to the first that answers, from a random start (see
/// `pipeline::supervisor`), so one cluster node down costs it one failed
/// connection attempt, not its work.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerUrls(Vec<String>);

impl BrokerUrls {
    /// Checks every URL; the error names `amqp.url` and, in a list, the
    /// position of the bad one (never the URL: it may hold a password).
    fn validate(&self) -> Result<(), ConfigError> {
        let urls = &self.0;
        if urls.is_empty() {
            return Err(invalid("amqp.url", "is empty: name at least one node"));
        }
        let many = urls.len() > 1;
        for (i, url) in urls.iter().enumerate() {
            let scheme = url.split("://").next().unwrap_or_default();
            if !url.contains("://") || !matches!(scheme, "amqp" | "amqps") {
                let which = if many {
                    format!("entry {} of {}", i + 1, urls.len())
                } else {
                    "value".to_owned()
                };
                return Err(invalid(
                    "amqp.url",
                    format!("{which} must start with amqp:// or amqps://"),
                ));
            }
        }
        Ok(())
    }

    /// The node URLs, in the configured order.
    pub fn nodes(&self) -> &[String] {
        &self.0
    }

    /// The first node: where the one-shot tools go first.
    pub fn first(&self) -> &str {
        // `validate` refuses an empty list before any caller gets here.
        self.0.first().map_or("", String::as_str)
    }
}

/// `amqp.url` as one string, a TOML array, or `a,b,c` (the environment);
/// surrounding blanks and empty entries (a trailing comma) are dropped.
fn url_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BrokerUrls, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Urls {
        List(Vec<String>),
        One(String),
    }
    let entries = match Urls::deserialize(d)? {
        Urls::List(list) => list,
        Urls::One(text) => vec![text],
    };
    Ok(BrokerUrls(
        entries
            .iter()
            .flat_map(|entry| entry.split(','))
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(str::to_owned)
            .collect(),
    ))
}

/// `[hyperline]`.
#[derive(Clone, Debug, Deserialize)]
pub struct HyperlineSettings {
    /// API root, without the `/v1/...` path.
    pub base_url: Url,
    /// The key, from `api_key` or read from `api_key_file` at load time.
    pub api_key: Option<ApiKey>,
    /// A file holding the key (Kubernetes secret).
    pub api_key_file: Option<PathBuf>,
    /// Extra CA certificates (PEM) for `https://`.
    pub ca_file: Option<PathBuf>,
    /// Total deadline of one request.
    pub timeout_secs: u64,
    /// Deadline of the connect phase.
    pub connect_timeout_secs: u64,
    /// Client-side cap per replica; 0 = none.
    pub max_requests_per_second: u32,
    /// Accept a non-loopback `http://` base URL.
    pub allow_insecure_http: bool,
    /// Hyperline's idempotency window, in seconds: 24 h as documented. Only
    /// lowered, to watch in a test what happens when it passes.
    pub idempotency_window_secs: u64,
    /// Before failing a command whose idempotency window closed, read the
    /// customer's credit transactions: not charged, it is purchased as new;
    /// charged once, it succeeds (`"reconciled": true`). Off by default.
    pub reconcile_at_window: bool,
}

/// `[retry]`.
#[derive(Clone, Debug, Deserialize)]
pub struct RetrySettings {
    /// HTTP attempts per delivery before a broker-side redelivery.
    pub attempts: u32,
    /// Lower bound of the exponential backoff.
    pub initial_backoff_ms: u64,
    /// Upper bound of the exponential backoff.
    pub max_backoff_ms: u64,
    /// Wait after a 409.
    pub conflict_delay_ms: u64,
    /// Longest 429 wait spent in process.
    pub max_rate_limit_wait_secs: u64,
    /// Broker-side delay steps, in order. A delay may repeat: steps with the
    /// same delay share its queue (docs/contract.md section 5).
    #[serde(deserialize_with = "delay_list")]
    pub redelivery_delays_secs: Vec<u64>,
}

/// `[worker]`.
#[derive(Clone, Debug, Deserialize)]
pub struct WorkerSettings {
    /// Drain period on SIGTERM.
    pub shutdown_grace_secs: u64,
    /// Longest time a delivery stays unacked, whatever Hyperline does.
    pub delivery_deadline_secs: u64,
    /// The keys of the MAC on the worker's copies: the first signs, every
    /// one verifies. Empty: a key derived from the API key.
    #[serde(default, deserialize_with = "secret_list")]
    pub history_keys: Vec<Secret>,
    /// A file of history keys, one a line (a Kubernetes secret).
    #[serde(default)]
    pub history_keys_file: Option<PathBuf>,
}

/// The shortest history key accepted: a MAC key an attacker could guess
/// protects nothing (`openssl rand -hex 32` gives 64 characters).
pub const MIN_HISTORY_KEY_LEN: usize = 32;

impl WorkerSettings {
    /// Reads the key file and refuses a key list no replica could use.
    fn validate_history_keys(&mut self) -> Result<(), ConfigError> {
        if let Some(path) = self.history_keys_file.clone() {
            if !self.history_keys.is_empty() {
                return Err(invalid(
                    "worker.history_keys_file",
                    "is set together with worker.history_keys: set only one",
                ));
            }
            let text = std::fs::read_to_string(&path).map_err(|e| {
                invalid(
                    "worker.history_keys_file",
                    format!("cannot be read ({}): {e}", path.display()),
                )
            })?;
            self.history_keys = text
                .lines()
                .map(str::trim)
                .filter(|line| !line.is_empty() && !line.starts_with('#'))
                .map(Secret::new)
                .collect();
            if self.history_keys.is_empty() {
                return Err(invalid("worker.history_keys_file", "holds no key"));
            }
        }
        let key = match self.history_keys_file {
            Some(_) => "worker.history_keys_file",
            None => "worker.history_keys",
        };
        for (i, secret) in self.history_keys.iter().enumerate() {
            let len = secret.expose().chars().count();
            if len < MIN_HISTORY_KEY_LEN {
                return Err(invalid(
                    key,
                    format!(
                        "key {} of {} has {len} characters; at least {MIN_HISTORY_KEY_LEN} are \
                         needed (e.g. `openssl rand -hex 32`)",
                        i + 1,
                        self.history_keys.len()
                    ),
                ));
            }
            if self.history_keys[..i].contains(secret) {
                return Err(invalid(
                    key,
                    format!("key {} repeats an earlier key", i + 1),
                ));
            }
        }
        Ok(())
    }
}

/// `worker.history_keys` as a TOML array, or `a,b` from the environment
/// (one key arrives as a scalar); blanks and empty entries dropped.
fn secret_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Secret>, D::Error> {
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
        .map(Secret::new)
        .collect())
}

/// `[server]`.
#[derive(Clone, Debug, Deserialize)]
pub struct ServerSettings {
    /// Address of `/metrics`, `/healthz`, `/readyz`; port 0 picks one.
    pub listen: SocketAddr,
}

/// `[log]`.
#[derive(Clone, Debug, Deserialize)]
pub struct LogSettings {
    /// JSON or pretty.
    pub format: LogFormat,
    /// Default tracing filter.
    pub level: String,
}

/// `redelivery_delays_secs` as a TOML array, or from the environment as
/// `30,300` — including a single step, which the `config` crate hands over as
/// a scalar rather than a one-element list.
fn delay_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Delays {
        List(Vec<u64>),
        TextList(Vec<String>),
        One(u64),
        Text(String),
    }
    let parse = |text: &str| {
        text.trim().parse::<u64>().map_err(|e| {
            serde::de::Error::custom(format!("`{text}` is not a whole number of seconds: {e}"))
        })
    };
    match Delays::deserialize(d)? {
        Delays::List(list) => Ok(list),
        Delays::TextList(list) => list.iter().map(|t| parse(t)).collect(),
        Delays::One(n) => Ok(vec![n]),
        Delays::Text(text) if text.trim().is_empty() => Ok(Vec::new()),
        Delays::Text(text) => text.split(',').map(parse).collect(),
    }
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
            return Err(ConfigError::Unknown(
                ignored
                    .into_iter()
                    .map(|key| UnknownKey {
                        origin: origin_of(&key, file, &env),
                        closest: closest_key(&key),
                        key,
                    })
                    .collect(),
            ));
        }
        settings.validated()
    }

    /// Applies every rule that a type cannot express, and reads the key file.
    fn validated(mut self) -> Result<Settings, ConfigError> {
        self.amqp.validate()?;
        self.hyperline.validate()?;
        self.retry.validate()?;
        self.validate_time_budget()?;
        if self.worker.shutdown_grace_secs == 0 {
            return Err(invalid("worker.shutdown_grace_secs", "must be positive"));
        }
        self.worker.validate_history_keys()?;
        if let Some(path) = self.hyperline.api_key_file.clone() {
            if self.hyperline.api_key.is_some() {
                return Err(invalid(
                    "hyperline.api_key_file",
                    "is set together with hyperline.api_key: set only one",
                ));
            }
            let key = std::fs::read_to_string(&path).map_err(|e| {
                invalid(
                    "hyperline.api_key_file",
                    format!("cannot be read ({}): {e}", path.display()),
                )
            })?;
            self.hyperline.api_key = Some(ApiKey::new(key));
        }
        if self
            .hyperline
            .api_key
            .as_ref()
            .is_some_and(|k| k.expose().is_empty())
        {
            return Err(invalid("hyperline.api_key", "is empty"));
        }
        Ok(self)
    }

    /// The deadline of a delivery and the life of a command against the
    /// two limits they must respect: RabbitMQ's consumer timeout, and
    /// Hyperline's idempotency window.
    fn validate_time_budget(&self) -> Result<(), ConfigError> {
        let deadline = self.worker.delivery_deadline_secs;
        if deadline <= self.hyperline.timeout_secs {
            return Err(invalid(
                "worker.delivery_deadline_secs",
                format!(
                    "must exceed hyperline.timeout_secs ({} s): no request could start",
                    self.hyperline.timeout_secs
                ),
            ));
        }
        // Everything a delivery may still wait for once its deadline has
        // come, in the worst case (RabbitMQ closes the channel, with every
        // delivery on it, when one outlasts the consumer timeout):
        // - the credit-transaction lookup at the closed window
        //   (`hyperline.reconcile_at_window`), up to one request's deadline;
        // - in `pipeline/executor.rs`, each bounded by the confirm timeout:
        //   the event, written then confirmed (2 waits); its `reply_to`
        //   copy, up to REPLY_TRIES tries each written then confirmed, with
        //   pauses between them; then the command's copy (to a delay queue
        //   or the dead-letter exchange) and, when that is refused, its copy
        //   back to the commands queue, each waiting its turn on the copies
        //   channel, opening it again after a refusal, written, confirmed
        //   (2 × 4 waits);
        // - one in-process hold before the copy back, at most MAX_HOLD.
        use crate::broker::{REPLY_PAUSE, REPLY_TRIES};
        const CONFIRM_WAITS: u64 = 2 + 2 * REPLY_TRIES as u64 + 2 * 4;
        let reply_pauses = (1..REPLY_TRIES).map(|t| REPLY_PAUSE * t).sum::<Duration>();
        let lookup = match self.hyperline.reconcile_at_window {
            true => self.hyperline.timeout_secs,
            false => 0,
        };
        let after = lookup
            .saturating_add(self.amqp.confirm_timeout_secs.saturating_mul(CONFIRM_WAITS))
            .saturating_add(crate::pipeline::decision::MAX_HOLD.as_secs())
            .saturating_add(reply_pauses.as_secs_f64().ceil() as u64);
        let settle = deadline.saturating_add(after);
        if settle >= CONSUMER_TIMEOUT.as_secs() * 5 / 6 {
            return Err(invalid(
                "worker.delivery_deadline_secs",
                format!(
                    "({deadline} s) with the {after} s a delivery may wait after it ({CONFIRM_WAITS} \
                     waits of amqp.confirm_timeout_secs for its event and copies, an in-process \
                     hold, and the lookup of hyperline.reconcile_at_window) must stay well below \
                     RabbitMQ's 30 min consumer timeout"
                ),
            ));
        }
        let window = self.hyperline.idempotency_window_secs;
        if window == 0 || window > IDEMPOTENCY_WINDOW.as_secs() {
            return Err(invalid(
                "hyperline.idempotency_window_secs",
                "must be between 1 and 86400 (Hyperline's documented 24 h)",
            ));
        }
        // The whole life of a command must fit in the idempotency window, or
        // a late retry could charge a second time: the broker-side delays
        // plus one deadline per delivery.
        let broker: u64 = self.retry.redelivery_delays_secs.iter().sum();
        let deliveries = self.retry.redelivery_delays_secs.len() as u64 + 1;
        if broker.saturating_add(deadline.saturating_mul(deliveries)) >= window {
            return Err(invalid(
                "retry.redelivery_delays_secs",
                format!(
                    "sum to {broker} s, which with {deliveries} deliveries of up to \
                     worker.delivery_deadline_secs ({deadline} s) reaches Hyperline's {window} s \
                     idempotency window: a late retry could charge twice"
                ),
            ));
        }
        Ok(())
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

/// Reads a PEM file of CA certificates; a missing, unreadable or empty one
/// stops the start here rather than at the first TLS handshake.
pub fn read_pem(key: &'static str, path: &Path) -> Result<String, ConfigError> {
    let pem = std::fs::read_to_string(path)
        .map_err(|e| invalid(key, format!("cannot be read ({}): {e}", path.display())))?;
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(invalid(
            key,
            format!("({}) holds no PEM certificate", path.display()),
        ));
    }
    Ok(pem)
}

/// AMQP object names are short strings (at most 255 bytes); a longer one
/// would make lapin panic when the name is sent.
fn check_amqp_name(key: &'static str, name: &str, suffix_room: usize) -> Result<(), ConfigError> {
    if name.is_empty() {
        return Err(invalid(key, "is empty"));
    }
    if name.len() + suffix_room > 255 {
        return Err(invalid(
            key,
            format!("is too long: at most {} bytes", 255 - suffix_room),
        ));
    }
    if name.starts_with("amq.") {
        return Err(invalid(key, "must not start with `amq.` (reserved)"));
    }
    Ok(())
}

/// `7d`, `12h`, `90m`, `3600s` or `0`: a whole number and one unit, as
/// RabbitMQ's `x-max-age` takes it (which is why months and years, whose
/// length RabbitMQ fixes its own way, are not accepted).
fn parse_retention(text: &str) -> Result<Option<Duration>, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(None);
    }
    let split = text.len().saturating_sub(1);
    let (number, unit) = (
        text.get(..split).unwrap_or(""),
        text.get(split..).unwrap_or(""),
    );
    let seconds = match unit {
        "d" | "D" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => {
            return Err(format!(
                "`{text}` is not a duration: write e.g. 7d, 12h, 90m, 3600s, or 0 for no log"
            ));
        }
    };
    match number.parse::<u64>() {
        Ok(0) => Ok(None),
        Ok(n) => n
            .checked_mul(seconds)
            .map(|s| Some(Duration::from_secs(s)))
            .ok_or_else(|| format!("`{text}` is too long")),
        Err(_) => Err(format!(
            "`{text}` is not a duration: write e.g. 7d, 12h, 90m, 3600s, or 0 for no log"
        )),
    }
}

impl AmqpSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        self.url.validate()?;
        if self.quorum_initial_group_size == 0 {
            return Err(invalid(
                "amqp.quorum_initial_group_size",
                "must be at least 1",
            ));
        }
        // Room for ".retry.<seconds>s".
        check_amqp_name("amqp.queue", &self.queue, 32)?;
        // Room for ".log", the results log.
        check_amqp_name("amqp.results_exchange", &self.results_exchange, 4)?;
        if self.prefetch == 0 {
            return Err(invalid(
                "amqp.prefetch",
                "must be at least 1 (0 would mean unbounded)",
            ));
        }
        if self.delivery_limit < 2 {
            return Err(invalid("amqp.delivery_limit", "must be at least 2"));
        }
        if self.confirm_timeout_secs == 0 {
            return Err(invalid("amqp.confirm_timeout_secs", "must be positive"));
        }
        if let Some(path) = &self.ca_file {
            read_pem("amqp.ca_file", path)?;
        }
        parse_retention(&self.results_log_retention)
            .map_err(|reason| invalid("amqp.results_log_retention", reason))?;
        Ok(())
    }

    /// The results log's retention; `None` when no log is kept (`0`).
    pub fn results_log_retention(&self) -> Option<Duration> {
        parse_retention(&self.results_log_retention).ok().flatten()
    }

    /// The connection's name on the broker, so an operator can tell the
    /// replicas apart (and `rabbitmqctl close_connection` pick one).
    pub fn connection_name(&self) -> String {
        if !self.connection_name.is_empty() {
            return self.connection_name.clone();
        }
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|h| h.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        format!("credit-purchase-worker@{host}")
    }

    /// How long a publisher confirm may take.
    pub fn confirm_timeout(&self) -> Duration {
        Duration::from_secs(self.confirm_timeout_secs)
    }
}

impl HyperlineSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        match self.base_url.scheme() {
            "https" => {}
            "http" => {
                let loopback = match self.base_url.host() {
                    Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                    Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                    Some(url::Host::Domain(d)) => d == "localhost",
                    None => false,
                };
                if !loopback && !self.allow_insecure_http {
                    return Err(invalid(
                        "hyperline.base_url",
                        "uses http:// on a non-loopback host: the API key would travel in clear \
                         (use https://, or set hyperline.allow_insecure_http)",
                    ));
                }
            }
            other => {
                return Err(invalid(
                    "hyperline.base_url",
                    format!("has scheme `{other}`: use https://"),
                ));
            }
        }
        if self.base_url.query().is_some() || self.base_url.fragment().is_some() {
            return Err(invalid(
                "hyperline.base_url",
                "must not carry a query or fragment",
            ));
        }
        if self.timeout_secs == 0 {
            return Err(invalid("hyperline.timeout_secs", "must be positive"));
        }
        if self.connect_timeout_secs == 0 {
            return Err(invalid(
                "hyperline.connect_timeout_secs",
                "must be positive",
            ));
        }
        if let Some(path) = &self.ca_file {
            read_pem("hyperline.ca_file", path)?;
        }
        Ok(())
    }

    /// Total deadline of one request.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }

    /// Deadline of the connect phase.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }
}

impl RetrySettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.attempts == 0 {
            return Err(invalid("retry.attempts", "must be at least 1"));
        }
        if self.initial_backoff_ms == 0 {
            return Err(invalid("retry.initial_backoff_ms", "must be positive"));
        }
        if self.max_backoff_ms < self.initial_backoff_ms {
            return Err(invalid(
                "retry.max_backoff_ms",
                "must not be below retry.initial_backoff_ms",
            ));
        }
        if self.redelivery_delays_secs.contains(&0) {
            return Err(invalid(
                "retry.redelivery_delays_secs",
                "has a step of 0 s: every step needs a delay",
            ));
        }
        if self.max_rate_limit_wait_secs >= 25 * 60 {
            return Err(invalid(
                "retry.max_rate_limit_wait_secs",
                "must stay well below RabbitMQ's 30 min consumer timeout",
            ));
        }
        Ok(())
    }
}

impl WorkerSettings {
    /// Drain period on SIGTERM.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    /// Longest time a delivery stays unacked.
    pub fn delivery_deadline(&self) -> Duration {
        Duration::from_secs(self.delivery_deadline_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::load_from(
            None,
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    /// The error line, which must name `key`.
    fn refused(pairs: &[(&str, &str)], key: &str) {
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

    /// Each of these passed when only two confirm timeouts were counted
    /// after the deadline; the executor can wait for sixteen, and a hold, and
    /// the lookup at the window.
    #[test]
    fn the_consumer_timeout_budget_counts_everything_after_the_deadline() {
        let deadline = |secs: &str| [("CPW__WORKER__DELIVERY_DEADLINE_SECS", secs.to_owned())];
        let with = |pairs: &[(&str, String)]| {
            load(
                &pairs
                    .iter()
                    .map(|(k, v)| (*k, v.as_str()))
                    .collect::<Vec<_>>(),
            )
        };
        // 988 + 16 × 30 + 30 + 1 = 1499: just inside 1500 (5/6 of 30 min).
        with(&deadline("988")).expect("the worst case fits");
        let line = with(&deadline("989")).expect_err("refused").to_string();
        assert!(line.contains("worker.delivery_deadline_secs"), "{line}");
        assert!(line.contains("511 s"), "says what it counted: {line}");
        with(&deadline("1400")).expect_err("two confirm timeouts fit, sixteen do not");
        let confirms = [
            ("CPW__WORKER__DELIVERY_DEADLINE_SECS", "600".to_owned()),
            ("CPW__AMQP__CONFIRM_TIMEOUT_SECS", "60".to_owned()),
        ];
        with(&confirms).expect_err("600 + 16 × 60 + 31");
        // The lookup at the window counts only when it is on.
        let lookup = |on: &str| {
            [
                ("CPW__WORKER__DELIVERY_DEADLINE_SECS", "950".to_owned()),
                ("CPW__HYPERLINE__TIMEOUT_SECS", "60".to_owned()),
                ("CPW__HYPERLINE__RECONCILE_AT_WINDOW", on.to_owned()),
            ]
        };
        with(&lookup("false")).expect("950 + 511");
        with(&lookup("true")).expect_err("950 + 60 + 511");
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

    #[test]
    fn the_broker_url_may_list_the_nodes_of_a_cluster() {
        let nodes = [
            "amqp://u:p@rabbit-0:5672/%2f",
            "amqps://u:p@rabbit-1:5671/%2f",
            "amqp://u:p@rabbit-2/%2f",
        ];
        let s = load(&[("CPW__AMQP__URL", &nodes.join(","))]).expect("a list from the env");
        assert_eq!(s.amqp.url.nodes(), nodes);
        assert_eq!(s.amqp.url.first(), nodes[0]);
        let spaced = load(&[("CPW__AMQP__URL", &format!(" {} , {} ,", nodes[0], nodes[1]))])
            .expect("blanks and a trailing comma");
        assert_eq!(spaced.amqp.url.nodes(), &nodes[..2]);

        let dir = std::env::temp_dir().join(format!("cpw-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("worker.toml");
        let array = format!(
            "[amqp]\nurl = [\"{}\", \"{}\", \"{}\"]\n",
            nodes[0], nodes[1], nodes[2]
        );
        std::fs::write(&file, array).expect("write");
        let s = Settings::load_from(Some(&file), []).expect("a TOML array");
        assert_eq!(s.amqp.url.nodes(), nodes);
        std::fs::write(&file, "[amqp]\nurl = []\n").expect("write");
        let empty = Settings::load_from(Some(&file), []).expect_err("an empty list");
        assert!(empty.to_string().contains("amqp.url"), "{empty}");

        let bad = format!("{},http://u:secret-pw@rabbit-1,{}", nodes[0], nodes[2]);
        let line = load(&[("CPW__AMQP__URL", &bad)])
            .expect_err("refused")
            .to_string();
        assert!(line.contains("`amqp.url` entry 2 of 3"), "{line}");
        assert!(!line.contains("secret-pw"), "no password in {line}");
        refused(&[("CPW__AMQP__URL", ",")], "amqp.url");
        refused(
            &[("CPW__AMQP__QUORUM_INITIAL_GROUP_SIZE", "0")],
            "amqp.quorum_initial_group_size",
        );
    }

    #[test]
    fn repeated_delays_are_separate_steps() {
        for (text, steps) in [("30,30,30", vec![30, 30, 30]), ("1,1", vec![1, 1])] {
            let s = load(&[("CPW__RETRY__REDELIVERY_DELAYS_SECS", text)]).expect(text);
            assert_eq!(s.retry.redelivery_delays_secs, steps);
        }
        let s = load(&[("CPW__RETRY__REDELIVERY_DELAYS_SECS", "30,300,30")]).expect("valid");
        assert_eq!(s.retry.redelivery_delays_secs, vec![30, 300, 30]);
    }

    #[test]
    fn a_redelivery_budget_of_24_hours_or_more_is_refused() {
        refused(
            &[("CPW__RETRY__REDELIVERY_DELAYS_SECS", "86400")],
            "retry.redelivery_delays_secs",
        );
        refused(
            &[("CPW__RETRY__REDELIVERY_DELAYS_SECS", "43200,43200")],
            "retry.redelivery_delays_secs",
        );
        // Just under, once the in-process time of each delivery is counted.
        assert!(load(&[("CPW__RETRY__REDELIVERY_DELAYS_SECS", "3600,36000,43200")]).is_ok());
    }

    #[test]
    fn history_keys_are_secrets_refused_when_unusable() {
        let long = "k".repeat(MIN_HISTORY_KEY_LEN);
        let other = "o".repeat(MIN_HISTORY_KEY_LEN + 8);
        let both = format!("{other},{long}");
        let s = load(&[("CPW__WORKER__HISTORY_KEYS", both.as_str())]).expect("two keys");
        let keys: Vec<&str> = s.worker.history_keys.iter().map(Secret::expose).collect();
        assert_eq!(keys, [other.as_str(), long.as_str()], "the first signs");
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

        let dir = std::env::temp_dir().join(format!("cpw-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("keys");
        std::fs::write(&file, format!("# rotated 2026-12-01\n{other}\n\n{long}\n")).expect("write");
        let path = file.to_string_lossy().into_owned();
        let s = load(&[("CPW__WORKER__HISTORY_KEYS_FILE", path.as_str())]).expect("a key file");
        assert_eq!(s.worker.history_keys.len(), 2);
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
    fn plain_http_only_on_loopback_unless_allowed() {
        for url in [
            "http://127.0.0.1:8089",
            "http://localhost:8089",
            "http://[::1]:8089",
        ] {
            assert!(load(&[("CPW__HYPERLINE__BASE_URL", url)]).is_ok(), "{url}");
        }
        refused(
            &[("CPW__HYPERLINE__BASE_URL", "http://api.hyperline.co")],
            "hyperline.base_url",
        );
        let allowed = load(&[
            ("CPW__HYPERLINE__BASE_URL", "http://sim.internal:8089"),
            ("CPW__HYPERLINE__ALLOW_INSECURE_HTTP", "true"),
        ]);
        assert!(allowed.is_ok());
    }

    #[test]
    fn the_key_can_come_from_a_file_but_not_from_both() {
        let path = std::env::temp_dir().join(format!("cpw-key-{}", uuid::Uuid::new_v4()));
        std::fs::write(&path, "file_key_456\n").expect("write");
        let p = path.to_string_lossy().to_string();
        let s = load(&[("CPW__HYPERLINE__API_KEY_FILE", &p)]).expect("valid");
        assert_eq!(
            s.require_api_key().map(ApiKey::expose).ok(),
            Some("file_key_456")
        );
        refused(
            &[
                ("CPW__HYPERLINE__API_KEY_FILE", &p),
                ("CPW__HYPERLINE__API_KEY", "k"),
            ],
            "hyperline.api_key_file",
        );
        refused(
            &[("CPW__HYPERLINE__API_KEY_FILE", "/nonexistent/key")],
            "hyperline.api_key_file",
        );
    }

    #[test]
    fn the_key_never_shows_in_debug_output() {
        let s = load(&[("CPW__HYPERLINE__API_KEY", "sk_live_secret_value")]).expect("valid");
        let debug = format!("{s:?} {}", ApiKey::new("sk_live_secret_value"));
        assert!(!debug.contains("sk_live_secret_value"), "{debug}");
        assert!(debug.contains("[REDACTED]"));
    }

    #[test]
    fn the_results_log_retention_is_a_duration_or_zero() {
        let week = load(&[]).expect("valid");
        assert_eq!(
            week.amqp.results_log_retention(),
            Some(Duration::from_secs(7 * 86_400))
        );
        let hours = load(&[("CPW__AMQP__RESULTS_LOG_RETENTION", "12h")]).expect("valid");
        assert_eq!(
            hours.amqp.results_log_retention(),
            Some(Duration::from_secs(12 * 3_600))
        );
        let none = load(&[("CPW__AMQP__RESULTS_LOG_RETENTION", "0")]).expect("valid");
        assert_eq!(none.amqp.results_log_retention(), None);
        for bad in ["7w", "d", "-1d", "seven days"] {
            refused(
                &[("CPW__AMQP__RESULTS_LOG_RETENTION", bad)],
                "amqp.results_log_retention",
            );
        }
    }
}
