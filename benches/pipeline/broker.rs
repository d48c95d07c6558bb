//! The bench's own connection to the broker, and the housekeeping that keeps
//! one run from disturbing the next.

use std::process::Stdio;

use anyhow::{Context, Result};
use cpw_testkit::broker::{AMQP_URL_VAR, rabbitmqctl};
use lapin::options::{ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Channel, Connection};

use crate::PREFIX;

/// The bench's own connection: declarations, publishing, observing, cleanup.
pub struct Broker {
    pub connection: Connection,
    pub channel: Channel,
}

impl Broker {
    pub async fn connect() -> Result<Broker> {
        let connection = cpw_testkit::broker::connect("cpw-bench-driver")
            .await
            .with_context(|| format!("cannot reach RabbitMQ (set {AMQP_URL_VAR})"))?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Broker {
            connection,
            channel,
        })
    }
}

/// Deletes `cpw-bench-*` queues and exchanges an interrupted run left behind
/// (best effort: needs `rabbitmqctl`).
pub async fn sweep_leftovers(broker: &Broker) {
    let list = |what: &str| -> Vec<String> {
        rabbitmqctl()
            .args([what, "name"])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(str::trim)
                    .filter(|l| l.starts_with(PREFIX))
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    let Ok(ch) = broker.connection.create_channel().await else {
        return;
    };
    for q in list("list_queues") {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for x in list("list_exchanges") {
        let _ = ch
            .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = ch.close(200, "swept".into()).await;
}

/// Starts the broker's quorum write-ahead log afresh (best effort: needs
/// `rabbitmqctl`). The WAL is shared by every quorum queue and rolls over at
/// 512 MB, and a run writes about 70 MB to it: the roll-over, with the
/// segment writes it starts for the live queue, would otherwise land inside
/// every seventh run or so, on the worker or the baseline by chance.
pub fn roll_over_quorum_wal() {
    let _ = rabbitmqctl()
        .args(["eval", "ra_log_wal:force_roll_over(ra_log_wal)."])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}
