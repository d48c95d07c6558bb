//! `[amqp]`: the broker's nodes and the names of the topology.

use std::time::Duration;

use serde::Deserialize;

use super::lanes::{self, Lane, LaneSetting};
use super::pem::Pem;
use super::{ConfigError, invalid};

/// Type of the commands queue.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Replicated, survives a broker node loss; the default.
    Quorum,
    /// Single-node, for brokers without quorum queues.
    Classic,
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
    /// Extra CA certificates (PEM) for `amqps://`, read at load.
    pub ca_file: Option<Pem>,
    /// `x-quorum-initial-group-size` of every quorum queue: how many nodes
    /// hold a replica when the queue is created. RabbitMQ caps it at the
    /// nodes running then, so the default (3) means "every node, up to 3".
    pub quorum_initial_group_size: u32,
    /// How long the results log (`<results_exchange>.log`) keeps events:
    /// `7d`, `12h`, `90m`, `3600s`; `0` declares no log.
    pub results_log_retention: String,
    /// The lanes: commands queues sharing the write budget by weight (see
    /// [`AmqpSettings::lanes`]); none is one lane on `queue`.
    pub lanes: Vec<LaneSetting>,
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

/// AMQP object names are short strings (at most 255 bytes); a longer one
/// would make lapin panic when the name is sent.
pub(super) fn check_amqp_name(
    key: &'static str,
    name: &str,
    suffix_room: usize,
) -> Result<(), ConfigError> {
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
    /// Applies the rules of `[amqp]` and reads `ca_file`.
    pub(super) fn validate(&mut self) -> Result<(), ConfigError> {
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
        Pem::load(&mut self.ca_file, "amqp.ca_file")?;
        parse_retention(&self.results_log_retention)
            .map_err(|reason| invalid("amqp.results_log_retention", reason))?;
        lanes::resolve(&self.lanes, &self.queue, self.prefetch)?;
        Ok(())
    }

    /// The lanes the worker consumes, in the configured order, never none:
    /// one lane named `default` on `queue` when `amqp.lanes` is empty.
    pub fn lanes(&self) -> Vec<Lane> {
        // `validate` refused every error before any caller gets here.
        lanes::resolve(&self.lanes, &self.queue, self.prefetch)
            .unwrap_or_else(|_| vec![lanes::single(&self.queue, self.prefetch)])
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

#[cfg(test)]
mod tests {
    use super::super::Settings;
    use super::super::tests::{load, refused};
    use super::*;

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
