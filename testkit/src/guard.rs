//! The removal of what a test declared on the shared broker, when the test
//! ends, whether it passed or failed.
//!
//! A cleanup a test awaits at its end runs only when it passes: a failed
//! assertion unwinds past it and leaves the test's queues and exchanges on
//! the broker, where they pile up run after run. [`Declared`] deletes them in
//! `Drop`, which unwinding runs too.

use std::time::Duration;

use credit_purchase_worker::broker::Topology;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};

use crate::broker::amqp_url;

/// How long the deletion may take; past it the names are left, so that a
/// broker gone wrong cannot hang a test's end.
const DELETE_WITHIN: Duration = Duration::from_secs(15);

/// The queues and exchanges one test declared: deleted when this is dropped.
///
/// `Drop` cannot await, and the test's runtime may be unwinding, so the
/// deletion runs on a thread of its own, with its own runtime and
/// connection, and `Drop` waits for it (bounded by [`DELETE_WITHIN`]).
pub struct Declared {
    url: String,
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Declared {
    /// Nothing yet, on the broker at `url`.
    pub fn on(url: &str) -> Declared {
        Declared {
            url: url.to_owned(),
            queues: Vec::new(),
            exchanges: Vec::new(),
        }
    }

    /// The queues and exchanges of `topology`, on the test broker.
    pub fn topology(topology: &Topology) -> Declared {
        let mut declared = Declared::on(&amqp_url());
        declared.add_topology(topology);
        declared
    }

    /// Adds the queues and exchanges of `topology`: its commands queue, dead
    /// letters, delay queues and results log; its entry exchange, dead-letter
    /// exchange and results exchange.
    pub fn add_topology(&mut self, topology: &Topology) {
        self.queues.extend(topology.queue_names());
        self.exchanges.extend([
            topology.queue.clone(),
            topology.dlx.clone(),
            topology.results_exchange.clone(),
        ]);
    }

    /// Adds a queue the test declared beside a topology.
    pub fn add_queue(&mut self, name: &str) {
        self.queues.push(name.to_owned());
    }

    /// Deletes everything now (the guard is then empty). Best effort: a test
    /// that failed half-way may have declared only some of the names, and a
    /// name already gone is not an error.
    pub fn delete_now(&mut self) {
        let url = self.url.clone();
        let queues = std::mem::take(&mut self.queues);
        let exchanges = std::mem::take(&mut self.exchanges);
        if queues.is_empty() && exchanges.is_empty() {
            return;
        }
        let deleter = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                let _ =
                    tokio::time::timeout(DELETE_WITHIN, delete(&url, &queues, &exchanges)).await;
            });
        });
        let _ = deleter.join();
    }
}

impl Drop for Declared {
    fn drop(&mut self) {
        self.delete_now();
    }
}

async fn delete(url: &str, queues: &[String], exchanges: &[String]) {
    let Ok(connection) =
        credit_purchase_worker::broker::connect(url, "cpw-test-cleanup", None).await
    else {
        return;
    };
    // A refused delete closes its channel: each name gets a channel of its own.
    for queue in queues {
        if let Ok(channel) = connection.create_channel().await {
            let _ = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
            let _ = channel.close(200, "deleted".into()).await;
        }
    }
    for exchange in exchanges {
        if let Ok(channel) = connection.create_channel().await {
            let _ = channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await;
            let _ = channel.close(200, "deleted".into()).await;
        }
    }
    let _ = connection.close(200, "cleaned up".into()).await;
}
