//! `amqp.lanes`: commands queues that share Hyperline's write budget by
//! weight, so that a checkout never waits behind a bulk import.
//!
//! The budget (50 writes per 10 s per account) is the fleet's bottleneck,
//! and one FIFO queue makes every command wait behind everything published
//! before it. A lane is a queue of its own with a share of that budget; the
//! default is one lane on `amqp.queue`, today's topology, so a deployment
//! that sets nothing changes nothing.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

use super::{ConfigError, invalid};

/// The name of the one lane of a configuration without `amqp.lanes`.
pub const DEFAULT_LANE: &str = "default";

/// The objective of a lane that states none: how long its oldest command may
/// wait before the `CpwLaneWaitingTooLong` alert fires.
pub const DEFAULT_OBJECTIVE: Duration = Duration::from_secs(600);

/// More lanes than this is a configuration error, not a design: each lane
/// holds a consumer and its prefetch on every replica.
const MAX_LANES: usize = 16;

/// The largest share: a ratio beyond 100:1 is a lane that never runs.
const MAX_SHARE: u32 = 100;

/// One entry of `amqp.lanes` as written: a table
/// (`{ name = "bulk", share = 1, queue = "…", prefetch = 16, objective_secs = 3600 }`)
/// or, in the environment, `name:share` or `name:share:queue`
/// (`CPW__AMQP__LANES=interactive:4,bulk:1:credit-purchases`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaneSetting {
    name: String,
    share: u32,
    queue: Option<String>,
    prefetch: Option<u16>,
    objective_secs: Option<u64>,
}

/// The table form; unknown keys are refused like any other.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LaneTable {
    name: String,
    #[serde(default = "one")]
    share: u32,
    queue: Option<String>,
    prefetch: Option<u16>,
    objective_secs: Option<u64>,
}

fn one() -> u32 {
    1
}

impl<'de> Deserialize<'de> for LaneSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entry;
        impl<'de> Visitor<'de> for Entry {
            type Value = LaneSetting;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a lane: a table with `name` and `share`, or `name:share`")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<LaneSetting, E> {
                let mut parts = text.trim().splitn(3, ':');
                let name = parts.next().unwrap_or_default();
                // Not a number: share 0, which `resolve` refuses naming the key.
                let share = parts
                    .next()
                    .map_or(Ok(1), |s| s.trim().parse())
                    .unwrap_or(0);
                Ok(LaneSetting {
                    name: name.trim().to_owned(),
                    share,
                    queue: parts.next().map(|q| q.trim().to_owned()),
                    prefetch: None,
                    objective_secs: None,
                })
            }

            fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<LaneSetting, M::Error> {
                let t = LaneTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(LaneSetting {
                    name: t.name,
                    share: t.share,
                    queue: t.queue,
                    prefetch: t.prefetch,
                    objective_secs: t.objective_secs,
                })
            }
        }
        d.deserialize_any(Entry)
    }
}

/// A lane as the worker runs it: every rule checked, every default applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lane {
    /// Its name: a metric label, a header value on its dead letters, the
    /// `--lane` of the tools.
    pub name: String,
    /// Its commands queue; its delay queues derive from it.
    pub queue: String,
    /// Its weight in the write budget when other lanes wait too.
    pub share: u32,
    /// Its deliveries in flight per replica (a consumer's own prefetch).
    pub prefetch: u16,
    /// How long its oldest command may wait before the alert.
    pub objective: Duration,
}

/// Resolves `amqp.lanes` against `amqp.queue` and `amqp.prefetch`: no lane
/// at all is one lane, [`DEFAULT_LANE`], on `queue` itself.
pub(super) fn resolve(
    settings: &[LaneSetting],
    queue: &str,
    prefetch: u16,
) -> Result<Vec<Lane>, ConfigError> {
    if settings.is_empty() {
        return Ok(vec![single(queue, prefetch)]);
    }
    if settings.len() > MAX_LANES {
        return Err(invalid(
            "amqp.lanes",
            format!("has {} lanes: at most {MAX_LANES}", settings.len()),
        ));
    }
    let mut lanes: Vec<Lane> = Vec::with_capacity(settings.len());
    for s in settings {
        check_name(&s.name)?;
        if s.share == 0 || s.share > MAX_SHARE {
            return Err(invalid(
                "amqp.lanes",
                format!("lane `{}`: share must be 1 to {MAX_SHARE}", s.name),
            ));
        }
        if s.prefetch == Some(0) {
            return Err(invalid(
                "amqp.lanes",
                format!("lane `{}`: prefetch must be at least 1", s.name),
            ));
        }
        if s.objective_secs == Some(0) {
            return Err(invalid(
                "amqp.lanes",
                format!("lane `{}`: objective_secs must be positive", s.name),
            ));
        }
        let lane = Lane {
            queue: s
                .queue
                .clone()
                .unwrap_or_else(|| format!("{queue}.{}", s.name)),
            name: s.name.clone(),
            share: s.share,
            prefetch: s.prefetch.unwrap_or(prefetch),
            objective: s
                .objective_secs
                .map_or(DEFAULT_OBJECTIVE, Duration::from_secs),
        };
        super::amqp::check_amqp_name("amqp.lanes", &lane.queue, 32)?;
        if let Some(twin) = lanes
            .iter()
            .find(|l| l.name == lane.name || l.queue == lane.queue)
        {
            return Err(invalid(
                "amqp.lanes",
                format!(
                    "lanes `{}` and `{}` have the same name or queue",
                    twin.name, lane.name
                ),
            ));
        }
        lanes.push(lane);
    }
    Ok(lanes)
}

/// The one lane of a configuration without `amqp.lanes`: today's queue.
pub(super) fn single(queue: &str, prefetch: u16) -> Lane {
    Lane {
        name: DEFAULT_LANE.to_owned(),
        queue: queue.to_owned(),
        share: 1,
        prefetch,
        objective: DEFAULT_OBJECTIVE,
    }
}

/// A lane name is a label, a header value and a queue-name suffix: short,
/// lowercase, and nothing a shell or PromQL would have to quote.
fn check_name(name: &str) -> Result<(), ConfigError> {
    let fits = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    match fits {
        true => Ok(()),
        false => Err(invalid(
            "amqp.lanes",
            format!("lane name `{name}` must be 1 to 32 of a-z, 0-9, `-` and `_`"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::super::Settings;
    use super::super::tests::{load, refused};
    use super::*;

    #[test]
    fn no_lanes_is_one_lane_on_the_commands_queue() {
        let s = load(&[]).expect("the defaults");
        let lanes = s.amqp.lanes();
        assert_eq!(
            lanes,
            [Lane {
                name: "default".into(),
                queue: "credit-purchases".into(),
                share: 1,
                prefetch: 64,
                objective: DEFAULT_OBJECTIVE,
            }]
        );
    }

    #[test]
    fn lanes_come_from_the_environment_as_name_and_share() {
        let s = load(&[("CPW__AMQP__LANES", "interactive:4, bulk:1")]).expect("two lanes");
        let kept = load(&[("CPW__AMQP__LANES", "interactive:4,bulk:1:credit-purchases")])
            .expect("a lane on the existing queue");
        assert_eq!(kept.amqp.lanes()[1].queue, "credit-purchases");
        let lanes = s.amqp.lanes();
        let names: Vec<(&str, &str, u32)> = lanes
            .iter()
            .map(|l| (l.name.as_str(), l.queue.as_str(), l.share))
            .collect();
        assert_eq!(
            names,
            [
                ("interactive", "credit-purchases.interactive", 4),
                ("bulk", "credit-purchases.bulk", 1)
            ]
        );
    }

    #[test]
    fn a_lane_may_keep_the_existing_queue_and_set_its_own_prefetch() {
        let dir = std::env::temp_dir().join(format!("cpw-lanes-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("worker.toml");
        let toml = "[amqp]\nlanes = [\n  { name = \"interactive\", share = 4, objective_secs = 20 },\n  \
                    { name = \"bulk\", queue = \"credit-purchases\", prefetch = 8 },\n]\n";
        std::fs::write(&file, toml).expect("write");
        let s = Settings::load_from(Some(&file), []).expect("a TOML array of tables");
        let lanes = s.amqp.lanes();
        assert_eq!(lanes[0].objective, Duration::from_secs(20));
        assert_eq!(lanes[0].prefetch, 64);
        assert_eq!(lanes[1].queue, "credit-purchases");
        assert_eq!((lanes[1].share, lanes[1].prefetch), (1, 8));
        std::fs::write(&file, "[amqp]\nlanes = [{ name = \"bulk\", shares = 2 }]\n")
            .expect("write");
        let typo = Settings::load_from(Some(&file), []).expect_err("an unknown key");
        assert!(typo.to_string().contains("shares"), "{typo}");
    }

    #[test]
    fn bad_lanes_are_refused() {
        for bad in [
            "Interactive:4",
            "a b:1",
            "bulk:0",
            "bulk:101",
            "bulk:x",
            "bulk:1,bulk:2",
            ":1",
        ] {
            refused(&[("CPW__AMQP__LANES", bad)], "amqp.lanes");
        }
    }
}
