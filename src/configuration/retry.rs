//! `[retry]`, and the checks of the settings against the time budget
//! ([`crate::budget`]) every retry must fit in.

use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, IDEMPOTENCY_WINDOW, Settings, invalid};
use crate::budget::{BUDGET_LIMIT_SECS, CONFIRM_WAITS_AFTER_DEADLINE, TimeBudget};

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

impl RetrySettings {
    /// Applies the rules of `[retry]`.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
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

    /// Lower bound of the exponential backoff.
    pub fn initial_backoff(&self) -> Duration {
        Duration::from_millis(self.initial_backoff_ms)
    }

    /// Upper bound of the exponential backoff.
    pub fn max_backoff(&self) -> Duration {
        Duration::from_millis(self.max_backoff_ms)
    }

    /// Wait after a 409.
    pub fn conflict_delay(&self) -> Duration {
        Duration::from_millis(self.conflict_delay_ms)
    }

    /// Longest 429 wait spent in process.
    pub fn max_rate_limit_wait(&self) -> Duration {
        Duration::from_secs(self.max_rate_limit_wait_secs)
    }
}

impl Settings {
    /// The longest a command whose request may have charged stays with no
    /// event, no dead letter and no `pending` record after that request,
    /// while workers consume and the broker takes publishes: the delivery
    /// that sent it, cut before it could say anything (a crash, a lost
    /// connection), then its redelivery, each up to its deadline; the lookup
    /// at the window; then its event, and when that is refused its `pending`
    /// record, each written and confirmed within the confirm timeout. The
    /// delay steps and the parks after a 429 do not count: a command goes
    /// into them only after its `pending` record (docs/contract.md section
    /// 7.1). The evidence rules wait this long before a transaction can be
    /// any letter's.
    pub fn unseen_bound(&self) -> Duration {
        let deadline = Duration::from_secs(self.worker.delivery_deadline_secs);
        let lookup = match self.hyperline.reconcile_at_window {
            true => self.hyperline.timeout(),
            false => Duration::ZERO,
        };
        deadline
            .saturating_mul(2)
            .saturating_add(lookup)
            .saturating_add(self.amqp.confirm_timeout().saturating_mul(4))
    }

    /// The longest a command lives after its first request that may have
    /// charged, before its event or its dead letter: no request leaves once
    /// its idempotency window has closed, it may then wait out the longest
    /// delay step (a park too uses the delay queues), and the delivery that
    /// finds its window closed says so within [`Settings::unseen_bound`].
    /// A command the results log shows in flight has answered by then.
    pub fn life_bound(&self) -> Duration {
        let longest = self.retry.redelivery_delays_secs.iter().max().copied();
        self.idempotency_window()
            .saturating_add(Duration::from_secs(longest.unwrap_or(0)))
            .saturating_add(self.unseen_bound())
    }

    /// The figures of the consumer-timeout budget ([`TimeBudget`]).
    pub fn time_budget(&self) -> TimeBudget {
        TimeBudget {
            deadline_secs: self.worker.delivery_deadline_secs,
            confirm_timeout_secs: self.amqp.confirm_timeout_secs,
            lookup_secs: self
                .hyperline
                .reconcile_at_window
                .then_some(self.hyperline.timeout_secs),
        }
    }
}

/// [`TimeBudget::after_deadline_secs`] of `settings`.
pub fn after_deadline_secs(settings: &Settings) -> u64 {
    settings.time_budget().after_deadline_secs()
}

/// [`TimeBudget::line`] of `settings`, as `check` prints it.
pub fn budget_line(settings: &Settings) -> String {
    settings.time_budget().line()
}

/// The deadline of a delivery and the life of a command against the
/// two limits they must respect: RabbitMQ's consumer timeout, and
/// Hyperline's idempotency window.
pub(super) fn validate_time_budget(settings: &Settings) -> Result<(), ConfigError> {
    let deadline = settings.worker.delivery_deadline_secs;
    if deadline <= settings.hyperline.timeout_secs {
        return Err(invalid(
            "worker.delivery_deadline_secs",
            format!(
                "must exceed hyperline.timeout_secs ({} s): no request could start",
                settings.hyperline.timeout_secs
            ),
        ));
    }
    let after = after_deadline_secs(settings);
    let settle = deadline.saturating_add(after);
    if settle >= BUDGET_LIMIT_SECS {
        return Err(invalid(
            "worker.delivery_deadline_secs",
            format!(
                "({deadline} s) with the {after} s a delivery may wait after it \
                 ({CONFIRM_WAITS_AFTER_DEADLINE} \
                 waits of amqp.confirm_timeout_secs for its event and copies, an in-process \
                 hold, and the lookup of hyperline.reconcile_at_window) must stay well below \
                 RabbitMQ's 30 min consumer timeout"
            ),
        ));
    }
    let window = settings.hyperline.idempotency_window_secs;
    if window == 0 || window > IDEMPOTENCY_WINDOW.as_secs() {
        return Err(invalid(
            "hyperline.idempotency_window_secs",
            "must be between 1 and 86400 (Hyperline's documented 24 h)",
        ));
    }
    // The whole life of a command must fit in the idempotency window, or
    // a late retry could charge a second time: the broker-side delays
    // plus one deadline per delivery.
    let broker: u64 = settings.retry.redelivery_delays_secs.iter().sum();
    let deliveries = settings.retry.redelivery_delays_secs.len() as u64 + 1;
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

#[cfg(test)]
mod tests {
    use super::super::tests::{load, refused};

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
        // 1169 + 10 × 30 + 30 = 1499: just inside 1500 (5/6 of 30 min).
        with(&deadline("1169")).expect("the worst case fits");
        let line = with(&deadline("1170")).expect_err("refused").to_string();
        assert!(line.contains("worker.delivery_deadline_secs"), "{line}");
        assert!(line.contains("330 s"), "says what it counted: {line}");
        with(&deadline("1400")).expect_err("two confirm timeouts fit, ten do not");
        let confirms = [
            ("CPW__WORKER__DELIVERY_DEADLINE_SECS", "900".to_owned()),
            ("CPW__AMQP__CONFIRM_TIMEOUT_SECS", "60".to_owned()),
        ];
        with(&confirms).expect_err("900 + 10 × 60 + 30");
        // The lookup at the window counts only when it is on.
        let lookup = |on: &str| {
            [
                ("CPW__WORKER__DELIVERY_DEADLINE_SECS", "1110".to_owned()),
                ("CPW__HYPERLINE__TIMEOUT_SECS", "60".to_owned()),
                ("CPW__HYPERLINE__RECONCILE_AT_WINDOW", on.to_owned()),
            ]
        };
        with(&lookup("false")).expect("1110 + 330");
        with(&lookup("true")).expect_err("1110 + 60 + 330");
    }

    #[test]
    fn the_in_flight_bounds_come_from_the_deadline_the_lookup_the_confirms_and_the_delays() {
        let defaults = load(&[]).expect("the defaults");
        // 2 × 300 s + 4 × 30 s; a day, the longest step (2 h), and that.
        assert_eq!(defaults.unseen_bound().as_secs(), 720);
        assert_eq!(defaults.life_bound().as_secs(), 86_400 + 7_200 + 720);
        let set = load(&[
            ("CPW__WORKER__DELIVERY_DEADLINE_SECS", "20"),
            ("CPW__HYPERLINE__TIMEOUT_SECS", "5"),
            ("CPW__HYPERLINE__RECONCILE_AT_WINDOW", "true"),
            ("CPW__AMQP__CONFIRM_TIMEOUT_SECS", "2"),
            ("CPW__RETRY__REDELIVERY_DELAYS_SECS", "7,3"),
        ])
        .expect("valid");
        assert_eq!(set.unseen_bound().as_secs(), 40 + 5 + 8);
        assert_eq!(set.life_bound().as_secs(), 86_400 + 7 + 53);
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
}
