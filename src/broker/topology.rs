//! The queues and exchanges of CONTRACT section 5, derived from one queue name.
//!
//! Declarations run on a channel of their own: a refused declaration (an
//! existing queue with other arguments) closes its channel, and it must not
//! take the consuming or publishing channel with it.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Connection, ExchangeKind};

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

/// Every name of the topology.
#[derive(Clone, Debug)]
pub struct Topology {
    /// The commands queue, and the direct exchange of the same name.
    pub queue: String,
    /// Topic exchange of the result events.
    pub results_exchange: String,
    /// `(delay in seconds, queue name)` per broker-side redelivery step,
    /// indexed by step. Steps with the same delay name the same queue; see
    /// [`Topology::delay_queues`] for each queue once.
    pub retry_queues: Vec<(u64, String)>,
    /// Dead-letter exchange of the commands queue.
    pub dlx: String,
    /// Queue of dead letters, bound to the DLX.
    pub dead: String,
    queue_type: QueueType,
    delivery_limit: u32,
    quorum_initial_group_size: u32,
}

/// The argument that sets how many nodes replicate a new quorum queue. Only
/// creation reads it, yet RabbitMQ compares it on every redeclaration.
const GROUP_SIZE: &str = "x-quorum-initial-group-size";

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
        Topology {
            retry_queues: redelivery_delays_secs
                .iter()
                .map(|s| (*s, format!("{queue}.retry.{s}s")))
                .collect(),
            dlx: format!("{queue}.dlx"),
            dead: format!("{queue}.dead"),
            results_exchange: amqp.results_exchange.clone(),
            queue_type: amqp.queue_type,
            delivery_limit: amqp.delivery_limit,
            quorum_initial_group_size: amqp.quorum_initial_group_size,
            queue,
        }
    }

    /// Each delay queue once, in the order of its first step: what exists on
    /// the broker, as opposed to [`Topology::retry_queues`], which is what
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
                "x-delivery-limit",
                AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
            ));
        }
        self.typed(&extra)
    }

    /// A quorum queue created before `amqp.quorum_initial_group_size`
    /// existed has no group size, and RabbitMQ refuses our declaration as
    /// inequivalent. The size matters only at creation, so the queue is
    /// redeclared without it (on a fresh channel: the refusal closed the
    /// first); any other difference is refused again, and the first refusal
    /// is reported.
    async fn declare_existing(
        &self,
        connection: &Connection,
        name: String,
        args: &FieldTable,
        refusal: lapin::Error,
    ) -> Result<(), TopologyError> {
        let refused = |source| TopologyError {
            what: "queue",
            name: name.clone(),
            source,
        };
        if !args.inner().contains_key(GROUP_SIZE) {
            return Err(refused(refusal));
        }
        let mut without = FieldTable::default();
        for (key, value) in args.inner() {
            if key.as_str() != GROUP_SIZE {
                without.insert(key.clone(), value.clone());
            }
        }
        match declare_on_own_channel(connection, &name, without).await {
            Ok(_) => {
                tracing::info!(queue = %name, "queue created without {GROUP_SIZE}; kept as it is");
                Ok(())
            }
            Err(_) => Err(refused(refusal)),
        }
    }

    /// Declares everything; idempotent against an identical existing topology.
    pub async fn declare(&self, connection: &Connection) -> Result<(), TopologyError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(|source| TopologyError {
                what: "channel for",
                name: "topology".into(),
                source,
            })?;
        let exchange = |kind: ExchangeKind, name: String| {
            let channel = channel.clone();
            async move {
                let opts = ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                };
                channel
                    .exchange_declare(name.as_str().into(), kind, opts, FieldTable::default())
                    .await
                    .map_err(|source| TopologyError {
                        what: "exchange",
                        name,
                        source,
                    })
            }
        };
        exchange(ExchangeKind::Direct, self.queue.clone()).await?;
        exchange(ExchangeKind::Topic, self.results_exchange.clone()).await?;
        exchange(ExchangeKind::Fanout, self.dlx.clone()).await?;

        // Each queue on a channel of its own: a refusal closes its channel,
        // and the fallback of `declare_existing` needs the others intact.
        let declare_queue = |name: String, args: FieldTable| async move {
            match declare_on_own_channel(connection, &name, args.clone()).await {
                Ok(()) => Ok(()),
                Err(source) => self.declare_existing(connection, name, &args, source).await,
            }
        };
        let bind = |queue: String, exchange: String, key: String| {
            let channel = channel.clone();
            async move {
                channel
                    .queue_bind(
                        queue.as_str().into(),
                        exchange.as_str().into(),
                        key.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|source| TopologyError {
                        what: "binding of",
                        name: queue,
                        source,
                    })
            }
        };
        declare_queue(self.dead.clone(), self.typed(&[])).await?;
        bind(self.dead.clone(), self.dlx.clone(), String::new()).await?;
        declare_queue(self.queue.clone(), self.commands_arguments()).await?;
        bind(self.queue.clone(), self.queue.clone(), self.queue.clone()).await?;
        for (secs, name) in self.delay_queues() {
            // Expired messages go back to the commands queue through the
            // default exchange; the TTL is per queue, so one queue per delay
            // keeps a long delay from blocking a short one behind it. Steps
            // with the same delay share the queue: it is declared once.
            let args = self.typed(&[
                (
                    "x-message-ttl",
                    AMQPValue::LongLongInt(
                        i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX),
                    ),
                ),
                ("x-dead-letter-exchange", text("")),
                ("x-dead-letter-routing-key", text(&self.queue)),
            ]);
            declare_queue(name.clone(), args).await?;
        }
        // Best effort: the channel is ours alone and the connection stays.
        let _ = channel.close(200, "topology declared".into()).await;
        Ok(())
    }
}

/// A durable queue declared on a channel opened for it and closed after.
async fn declare_on_own_channel(
    connection: &Connection,
    name: &str,
    args: FieldTable,
) -> Result<(), lapin::Error> {
    let channel = connection.create_channel().await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel.queue_declare(name.into(), durable, args).await?;
    let _ = channel.close(200, "queue declared".into()).await;
    Ok(())
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
        let steps: Vec<&(u64, String)> = t.retry_queues.iter().collect();
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
        let queues: Vec<&(u64, String)> = t.delay_queues().collect();
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
        assert_eq!(t.delay_queues().count(), 4);
        assert!(t.delay_queues().eq(t.retry_queues.iter()));
    }
}
