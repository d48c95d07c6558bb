//! The queues and exchanges of docs/contract.md section 5, derived from one queue name.
//!
//! Declarations run on a channel of their own: a refused declaration (an
//! existing queue with other arguments) closes its channel, and it must not
//! take the consuming or publishing channel with it.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ExchangeKind};

use super::mismatch::Mismatch;
use crate::configuration::{AmqpSettings, QueueType};

/// A declaration failed; the message names the object.
#[derive(Debug, thiserror::Error)]
#[error("cannot declare {what} `{name}`: {source}")]
pub struct TopologyError {
    what: &'static str,
    name: String,
    #[source]
    source: lapin::Error,
}

impl TopologyError {
    /// The object exists with other arguments (the broker's
    /// PRECONDITION_FAILED), which no retry can fix.
    pub fn mismatch(&self) -> Option<Mismatch> {
        Mismatch::from_refusal(self.what, &self.name, &self.source)
    }
}

/// Every name of the topology.
#[derive(Clone, Debug)]
pub struct Topology {
    /// `amqp.queue`: the direct exchange publishers may send commands
    /// through, the stem of the dead-letter names, and (with no lanes
    /// configured) the one lane's commands queue.
    pub queue: String,
    /// The lanes, in the configured order; at least one. A delivery knows
    /// its lane by its index here.
    pub lanes: Vec<LaneQueues>,
    /// `amqp.lanes` is set: the lanes are the operator's, and each event
    /// names its command's (`cpw-lane`). False for the one `default` lane
    /// of a configuration without it, whose events stay as they were.
    pub named_lanes: bool,
    /// Topic exchange of the result events.
    pub results_exchange: String,
    /// Dead-letter exchange of every lane's commands queue.
    pub dlx: String,
    /// Queue of dead letters, bound to the DLX: one for every lane, each
    /// letter stamped with its lane's queue.
    pub dead: String,
    /// The results log (`<results_exchange>.log`), a stream bound to the
    /// results exchange with `#`; `None` when `amqp.results_log_retention`
    /// is `0`.
    pub results_log: Option<ResultsLogName>,
    queue_type: QueueType,
    delivery_limit: u32,
    quorum_initial_group_size: u32,
}

/// The queues of one lane: its commands queue and its delay queues, which
/// send a command back to the lane it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaneQueues {
    /// The lane's name (`default` without `amqp.lanes`).
    pub name: String,
    /// Its commands queue, bound to the commands exchange with its own name
    /// as the routing key.
    pub queue: String,
    /// `(delay in seconds, queue name)` per broker-side redelivery step,
    /// indexed by step. Steps with the same delay name the same queue; see
    /// [`LaneQueues::delay_queues`] for each queue once.
    pub retry_queues: Vec<(u64, String)>,
}

impl LaneQueues {
    /// Each delay queue once, in the order of its first step: what exists on
    /// the broker, as opposed to [`LaneQueues::retry_queues`], which is what
    /// each step uses (`[30, 30, 30]` is three steps through one queue).
    pub fn delay_queues(&self) -> impl Iterator<Item = &(u64, String)> {
        self.retry_queues
            .iter()
            .enumerate()
            .filter(|(step, (_, name))| {
                !self.retry_queues[..*step]
                    .iter()
                    .any(|(_, earlier)| earlier == name)
            })
            .map(|(_, queue)| queue)
    }
}

/// The results log's name and retention.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResultsLogName {
    /// `<results_exchange>.log`.
    pub name: String,
    /// How long the stream keeps an event (RabbitMQ truncates whole
    /// segments, so at least this long).
    pub retention: std::time::Duration,
}

impl ResultsLogName {
    /// The retention as RabbitMQ's `x-max-age` takes it, in the largest unit
    /// that divides it: the same text on every declaration, since RabbitMQ
    /// compares the argument as declared.
    pub fn max_age(&self) -> String {
        let s = self.retention.as_secs();
        match s {
            s if s % 86_400 == 0 => format!("{}D", s / 86_400),
            s if s % 3_600 == 0 => format!("{}h", s / 3_600),
            s if s % 60 == 0 => format!("{}m", s / 60),
            s => format!("{s}s"),
        }
    }
}

/// The argument that sets how many nodes replicate a new quorum queue. Only
/// creation reads it, yet RabbitMQ compares it on every redeclaration.
const GROUP_SIZE: &str = "x-quorum-initial-group-size";

/// The argument that caps a quorum queue's deliveries of one message.
const DELIVERY_LIMIT: &str = "x-delivery-limit";

/// `x-delivery-limit` of a quorum dead-letter queue. From RabbitMQ 4.0 a
/// quorum queue without one drops a message at its 20th return, and the dead
/// queue has no dead-letter exchange of its own: a letter read by tools that
/// crashed (a closed channel returns what it held) or put back with `nack`
/// twenty times would vanish, and with it the only record of a command that
/// may have charged. A letter leaves the dead queue by an operator's hand
/// only, so the limit is one no such count reaches (a crashed reader every
/// minute for a week), stated on every version, 3.x included.
const DEAD_LETTER_DELIVERY_LIMIT: i64 = 10_000;

/// What the group size was added to: every quorum queue.
const GROUP_SIZE_ONLY: &[&str] = &[GROUP_SIZE];

/// What the dead-letter queue gained in later releases: the group size, then
/// [`DEAD_LETTER_DELIVERY_LIMIT`].
const DEAD_QUEUE_ADDITIONS: &[&str] = &[GROUP_SIZE, DELIVERY_LIMIT];

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

impl Topology {
    /// The names derived from the settings.
    pub fn new(amqp: &AmqpSettings, redelivery_delays_secs: &[u64]) -> Self {
        let queue = amqp.queue.clone();
        let lanes = amqp
            .lanes()
            .into_iter()
            .map(|lane| LaneQueues {
                retry_queues: redelivery_delays_secs
                    .iter()
                    .map(|s| (*s, format!("{}.retry.{s}s", lane.queue)))
                    .collect(),
                name: lane.name,
                queue: lane.queue,
            })
            .collect();
        Topology {
            lanes,
            named_lanes: !amqp.lanes.is_empty(),
            dlx: format!("{queue}.dlx"),
            dead: format!("{queue}.dead"),
            results_log: amqp
                .results_log_retention()
                .map(|retention| ResultsLogName {
                    name: format!("{}.log", amqp.results_exchange),
                    retention,
                }),
            results_exchange: amqp.results_exchange.clone(),
            queue_type: amqp.queue_type,
            delivery_limit: amqp.delivery_limit,
            quorum_initial_group_size: amqp.quorum_initial_group_size,
            queue,
        }
    }

    /// The lane at `index`, the first for an index no lane has (a delivery's
    /// index comes from this topology, so that never happens; and there is
    /// always a first: [`AmqpSettings::lanes`] is never empty).
    pub fn lane(&self, index: usize) -> &LaneQueues {
        &self.lanes[if index < self.lanes.len() { index } else { 0 }]
    }

    /// The lane whose commands queue is `queue`, if one is.
    pub fn lane_of_queue(&self, queue: &str) -> Option<&LaneQueues> {
        self.lanes.iter().find(|lane| lane.queue == queue)
    }

    /// Every queue's name, each once: the dead-letter queue, each lane's
    /// commands and delay queues, the results log. What a tool that removes
    /// the topology (the demo, the tests) deletes.
    pub fn queue_names(&self) -> Vec<String> {
        let mut names = vec![self.dead.clone()];
        for lane in &self.lanes {
            names.push(lane.queue.clone());
            names.extend(lane.delay_queues().map(|(_, q)| q.clone()));
        }
        names.extend(self.results_log.iter().map(|log| log.name.clone()));
        names
    }

    /// The broker-side redelivery steps, the same for every lane.
    pub fn steps(&self) -> usize {
        self.lanes.first().map_or(0, |lane| lane.retry_queues.len())
    }

    /// The broker's `x-delivery-limit` on the commands queue, if it has one.
    pub fn delivery_limit(&self) -> Option<u32> {
        (self.queue_type == QueueType::Quorum).then_some(self.delivery_limit)
    }

    /// Arguments shared by our queues of the configured type. Quorum queues
    /// dead-letter at most once unless told otherwise; `at-least-once` (which
    /// requires `reject-publish` overflow) keeps a dead letter from vanishing
    /// on its way to the DLX or back from a delay queue. On a cluster every
    /// quorum queue (commands, delay, dead letters) is replicated on
    /// `amqp.quorum_initial_group_size` nodes, so no part of the topology
    /// lives on one node only.
    fn typed(&self, extra: &[(&str, AMQPValue)]) -> FieldTable {
        let mut args = match self.queue_type {
            QueueType::Quorum => table(&[
                ("x-queue-type", text("quorum")),
                ("x-dead-letter-strategy", text("at-least-once")),
                ("x-overflow", text("reject-publish")),
                (
                    GROUP_SIZE,
                    AMQPValue::LongLongInt(i64::from(self.quorum_initial_group_size)),
                ),
            ]),
            QueueType::Classic => table(&[("x-queue-type", text("classic"))]),
        };
        for (k, v) in extra {
            args.insert(ShortString::from(*k), v.clone());
        }
        args
    }

    /// Arguments of the commands queue.
    fn commands_arguments(&self) -> FieldTable {
        let mut extra = vec![("x-dead-letter-exchange", text(&self.dlx))];
        if self.queue_type == QueueType::Quorum {
            // A backstop against a message that crashes every worker that
            // takes it; far above what our own nacks can reach.
            extra.push((
                DELIVERY_LIMIT,
                AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
            ));
        }
        self.typed(&extra)
    }

    /// Arguments of the dead-letter queue: see [`DEAD_LETTER_DELIVERY_LIMIT`].
    fn dead_arguments(&self) -> FieldTable {
        match self.queue_type {
            QueueType::Quorum => self.typed(&[(
                DELIVERY_LIMIT,
                AMQPValue::LongLongInt(DEAD_LETTER_DELIVERY_LIMIT),
            )]),
            QueueType::Classic => self.typed(&[]),
        }
    }

    /// Arguments of a delay queue. Expired messages go back to their lane's
    /// commands queue through the default exchange; the TTL is per queue, so one
    /// queue per delay keeps a long delay from blocking a short one behind it.
    fn delay_arguments(&self, secs: u64, lane_queue: &str) -> FieldTable {
        self.typed(&[
            (
                "x-message-ttl",
                AMQPValue::LongLongInt(
                    i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX),
                ),
            ),
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text(lane_queue)),
        ])
    }

    /// Every exchange and queue `run` declares, exactly as it declares them
    /// (all durable), exchanges first: what [`Topology::declare`] sends and
    /// what `check` compares an existing topology with.
    pub fn objects(&self) -> Vec<Object> {
        let exchange = |what, name: &str, kind| Object {
            what,
            name: name.to_owned(),
            shape: Shape::Exchange(kind),
            added_later: &[],
        };
        let queue = |what, name: &str, arguments| Object {
            what,
            name: name.to_owned(),
            shape: Shape::Queue(arguments),
            added_later: GROUP_SIZE_ONLY,
        };
        let mut objects = vec![
            exchange("commands exchange", &self.queue, ExchangeKind::Direct),
            exchange(
                "results exchange",
                &self.results_exchange,
                ExchangeKind::Topic,
            ),
            exchange("dead-letter exchange", &self.dlx, ExchangeKind::Fanout),
            Object {
                added_later: DEAD_QUEUE_ADDITIONS,
                ..queue("dead-letter queue", &self.dead, self.dead_arguments())
            },
        ];
        for lane in &self.lanes {
            objects.push(queue(
                "commands queue",
                &lane.queue,
                self.commands_arguments(),
            ));
            // Steps with the same delay share a queue: it is declared once.
            for (secs, name) in lane.delay_queues() {
                let arguments = self.delay_arguments(*secs, &lane.queue);
                objects.push(queue("delay queue", name, arguments));
            }
        }
        if let Some(log) = &self.results_log {
            let arguments = table(&[
                ("x-queue-type", text("stream")),
                ("x-max-age", text(&log.max_age())),
            ]);
            objects.push(queue("results log", &log.name, arguments));
        }
        objects
    }

    /// Declares everything; idempotent against an identical existing
    /// topology. An existing object with other arguments is refused by the
    /// broker (PRECONDITION_FAILED): see [`TopologyError::mismatch`].
    pub async fn declare(&self, connection: &Connection) -> Result<(), TopologyError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(|source| TopologyError {
                what: "channel for",
                name: "topology".into(),
                source,
            })?;
        for object in self.objects() {
            declare_object(connection, &channel, &object)
                .await
                .map_err(|source| TopologyError {
                    what: object.what,
                    name: object.name.clone(),
                    source,
                })?;
        }
        let mut bindings = vec![(&self.dead, &self.dlx, "")];
        for lane in &self.lanes {
            bindings.push((&lane.queue, &self.queue, lane.queue.as_str()));
        }
        // Every event lands in the log by this binding: no second publish.
        if let Some(log) = &self.results_log {
            bindings.push((&log.name, &self.results_exchange, "#"));
        }
        for (queue, exchange, key) in bindings {
            channel
                .queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    key.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|source| TopologyError {
                    what: "binding of",
                    name: queue.clone(),
                    source,
                })?;
        }
        // Best effort: the channel is ours alone and the connection stays.
        let _ = channel.close(200, "topology declared".into()).await;
        Ok(())
    }
}

/// One exchange or queue of the topology.
#[derive(Clone, Debug)]
pub struct Object {
    /// What it is for, as an operator names it (`commands queue`).
    pub what: &'static str,
    /// Its name.
    pub name: String,
    /// An exchange of a kind, or a queue with its arguments.
    pub shape: Shape,
    /// Arguments that a release added after earlier ones had created this
    /// object without them (see [`Object::earlier_forms`]).
    pub added_later: &'static [&'static str],
}

/// How an [`Object`] is declared.
#[derive(Clone, Debug)]
pub enum Shape {
    /// An exchange of this kind.
    Exchange(ExchangeKind),
    /// A queue with these arguments.
    Queue(FieldTable),
}

/// Declares `object`: an exchange on `channel`, a queue on a channel of its
/// own. A queue an earlier release created lacks the arguments added since
/// (a quorum queue created before `amqp.quorum_initial_group_size` existed
/// has no group size; a dead-letter queue created by an earlier release no
/// delivery limit), and RabbitMQ refuses the declaration as inequivalent: a worker
/// upgraded over it would never start. The group size matters only at
/// creation, and the dead queue had no limit before either, so the queue is
/// declared again in each earlier form (on a fresh channel: a refusal closes
/// the channel) and kept in the first the broker accepts; any other
/// difference is refused again, with the first refusal reported.
async fn declare_object(
    connection: &Connection,
    channel: &Channel,
    object: &Object,
) -> Result<(), lapin::Error> {
    if let Shape::Exchange(_) = object.shape {
        return object.declare(channel, false).await.map(|_| ());
    }
    let refusal = match on_own_channel(connection, object).await {
        Ok(()) => return Ok(()),
        Err(refusal) => refusal,
    };
    for (older, missing) in object.earlier_forms() {
        if on_own_channel(connection, &older).await.is_ok() {
            let unlimited = missing.contains(&DELIVERY_LIMIT);
            let missing = missing.join(", ");
            match unlimited {
                true => tracing::warn!(
                    queue = %object.name,
                    "queue created by an earlier release without {missing}; kept as it is: from \
                     RabbitMQ 4.0 it drops a letter returned 20 times (recreate it empty to get \
                     the explicit limit)"
                ),
                false => tracing::info!(
                    queue = %object.name,
                    "queue created by an earlier release without {missing}; kept as it is"
                ),
            }
            return Ok(());
        }
    }
    Err(refusal)
}

/// Declares `object` on a channel opened for it and closed after.
async fn on_own_channel(connection: &Connection, object: &Object) -> Result<(), lapin::Error> {
    let channel = connection.create_channel().await?;
    object.declare(&channel, false).await?;
    let _ = channel.close(200, "declared".into()).await;
    Ok(())
}

impl Object {
    /// The same queue as earlier releases declared it: without each
    /// non-empty set of the [`Object::added_later`] arguments it carries,
    /// fewest left out first, each with the names it leaves out. Empty for an
    /// exchange or a queue declared without any of them.
    pub fn earlier_forms(&self) -> Vec<(Object, Vec<&'static str>)> {
        let Shape::Queue(arguments) = &self.shape else {
            return Vec::new();
        };
        let present: Vec<&'static str> = self
            .added_later
            .iter()
            .copied()
            .filter(|name| arguments.inner().contains_key(*name))
            .collect();
        let mut sets: Vec<Vec<&'static str>> = (1..1u32 << present.len())
            .map(|mask| {
                (0..present.len())
                    .filter(|bit| mask & (1 << bit) != 0)
                    .map(|bit| present[bit])
                    .collect()
            })
            .collect();
        sets.sort_by_key(Vec::len);
        sets.into_iter()
            .map(|left_out| {
                let mut older = FieldTable::default();
                for (key, value) in arguments.inner() {
                    if !left_out.contains(&key.as_str()) {
                        older.insert(key.clone(), value.clone());
                    }
                }
                let form = Object {
                    shape: Shape::Queue(older),
                    added_later: &[],
                    ..self.clone()
                };
                (form, left_out)
            })
            .collect()
    }

    /// Declares it durable on `channel`, or only asks whether it exists
    /// (`passive`). A queue's answer gives its ready messages.
    pub async fn declare(&self, channel: &Channel, passive: bool) -> Result<u32, lapin::Error> {
        let name = self.name.as_str().into();
        match &self.shape {
            Shape::Exchange(kind) => {
                let options = ExchangeDeclareOptions {
                    durable: true,
                    passive,
                    ..ExchangeDeclareOptions::default()
                };
                channel
                    .exchange_declare(name, kind.clone(), options, FieldTable::default())
                    .await
                    .map(|()| 0)
            }
            Shape::Queue(arguments) => {
                let options = QueueDeclareOptions {
                    durable: true,
                    passive,
                    ..QueueDeclareOptions::default()
                };
                let arguments = match passive {
                    true => FieldTable::default(),
                    false => arguments.clone(),
                };
                channel
                    .queue_declare(name, options, arguments)
                    .await
                    .map(|q| q.message_count())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configuration::Settings;

    fn topology(delays: &str) -> Topology {
        let env = [(
            "CPW__RETRY__REDELIVERY_DELAYS_SECS".to_owned(),
            delays.to_owned(),
        )];
        let settings = Settings::load_from(None, env).expect("valid settings");
        Topology::new(&settings.amqp, &settings.retry.redelivery_delays_secs)
    }

    fn names(queues: &[&(u64, String)]) -> Vec<String> {
        queues.iter().map(|(_, name)| name.clone()).collect()
    }

    #[test]
    fn steps_with_the_same_delay_share_one_queue() {
        let t = topology("30,300,30,30");
        let lane = &t.lanes[0];
        let steps: Vec<&(u64, String)> = lane.retry_queues.iter().collect();
        assert_eq!(
            names(&steps),
            [
                "credit-purchases.retry.30s",
                "credit-purchases.retry.300s",
                "credit-purchases.retry.30s",
                "credit-purchases.retry.30s",
            ],
            "one entry per step"
        );
        let queues: Vec<&(u64, String)> = lane.delay_queues().collect();
        assert_eq!(
            names(&queues),
            ["credit-purchases.retry.30s", "credit-purchases.retry.300s"],
            "each queue once"
        );
        assert_eq!(queues[1].0, 300);
    }

    #[test]
    fn distinct_delays_have_a_queue_each() {
        let t = topology("30,300,1800,7200");
        let lane = &t.lanes[0];
        assert_eq!(lane.delay_queues().count(), 4);
        assert!(lane.delay_queues().eq(lane.retry_queues.iter()));
    }
}
