//! One run's names, topology and observer, and the subjects it starts.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cpw_testkit::broker::{Observer, amqp_url, as_command, delete_topology, send, worker_env};
use cpw_testkit::commands::{command, command_id};
use credit_purchase_worker::broker::Topology;
use credit_purchase_worker::configuration::Settings;
use lapin::BasicProperties;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use tokio::process::Command;
use tokio::sync::mpsc;

use crate::broker::Broker;
use crate::meter::{Meter, Ticks};
use crate::sim::Sim;
use crate::subjects::Subject;
use crate::{BASELINE_CHILD, PREFIX, SIM_KEY, WORKER_BIN};

/// An event as seen by the observer.
pub struct Seen {
    pub at: Instant,
    pub command_id: Option<String>,
    pub succeeded: bool,
}

/// One run's names, topology and observer.
pub struct Run {
    label: String,
    pub queue: String,
    topology: Topology,
    env: BTreeMap<String, String>,
    pub events: mpsc::UnboundedReceiver<Seen>,
    /// Results the observer saw so far.
    pub seen: Arc<std::sync::atomic::AtomicUsize>,
    /// The observer's queue, deleted last: that ends the task reading it.
    observer: String,
}

impl Run {
    /// Declares the worker's topology (through the worker's own code, so the
    /// queue is exactly what the worker expects, the results log included
    /// unless `results_log` is false) and an observer of events. The
    /// baseline runs against the same topology: its events go through the
    /// same exchange into the same stream.
    pub async fn setup(
        broker: &Broker,
        label: &str,
        sim: &Sim,
        prefetch: u16,
        results_log: bool,
    ) -> Result<Run> {
        Run::setup_lanes(broker, label, sim, prefetch, results_log, None).await
    }

    /// [`Run::setup`] with `amqp.lanes` set to `lanes` (as in
    /// `CPW__AMQP__LANES`, e.g. `interactive:4,bulk:1`): each lane's queue is
    /// declared and the workers consume them all.
    pub async fn setup_lanes(
        broker: &Broker,
        label: &str,
        sim: &Sim,
        prefetch: u16,
        results_log: bool,
        lanes: Option<&str>,
    ) -> Result<Run> {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let queue = format!("{PREFIX}{label}-{}", &tag[..12]);
        let mut env = worker_env(&queue, &sim.base_url, SIM_KEY);
        env.insert("CPW__AMQP__PREFETCH".to_owned(), prefetch.to_string());
        env.insert("CPW__LOG__FORMAT".to_owned(), "json".to_owned());
        if let Some(lanes) = lanes {
            env.insert("CPW__AMQP__LANES".to_owned(), lanes.to_owned());
        }
        if !results_log {
            env.insert(
                "CPW__AMQP__RESULTS_LOG_RETENTION".to_owned(),
                "0".to_owned(),
            );
        }
        let settings =
            Settings::load_from(None, env.clone()).context("the bench's worker settings")?;
        let topology = Topology::new(&settings.amqp, &settings.retry.redelivery_delays_secs);
        topology.declare(&broker.connection).await?;

        let mut observer = Observer::bind(&broker.connection, &topology.results_exchange).await?;
        let observer_queue = observer.queue().to_owned();
        let (tx, events) = mpsc::unbounded_channel();
        let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Some(delivery) = observer.next_delivery().await {
                let at = Instant::now();
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let props = &delivery.properties;
                let seen = Seen {
                    at,
                    command_id: props.correlation_id().as_ref().map(|c| c.to_string()),
                    succeeded: props
                        .kind()
                        .as_ref()
                        .is_none_or(|k| k.as_str() == "credit_purchase.succeeded"),
                };
                if tx.send(seen).is_err() {
                    break;
                }
            }
        });
        Ok(Run {
            label: label.to_owned(),
            queue,
            topology,
            env,
            events,
            seen,
            observer: observer_queue,
        })
    }

    /// The commands queue of the lane named `name`, if the run has it.
    pub fn lane_queue(&self, name: &str) -> Option<&str> {
        self.topology
            .lanes
            .iter()
            .find(|lane| lane.name == name)
            .map(|lane| lane.queue.as_str())
    }

    /// Publishes `n` commands and waits for every confirm.
    pub async fn prepublish(&self, broker: &Broker, n: usize) -> Result<()> {
        prepublish_to(broker, &self.queue, n).await
    }

    /// Starts `replicas` workers, logging as operators run them (the
    /// configuration's `log.level`, info) unless `log` names a filter.
    pub fn spawn_workers(&self, replicas: usize, log: Option<&str>) -> Result<Vec<Subject>> {
        (0..replicas)
            .map(|i| {
                // `BENCH_WRAP="heaptrack -o /tmp/worker"` (or a profiler)
                // runs the worker under it; its figures are then the wrapper's.
                let wrap = std::env::var("BENCH_WRAP").unwrap_or_default();
                let mut words = wrap.split_whitespace();
                let mut cmd = match words.next() {
                    Some(program) => {
                        let mut cmd = Command::new(program);
                        cmd.args(words).arg(WORKER_BIN);
                        cmd
                    }
                    None => Command::new(WORKER_BIN),
                };
                cmd.arg("run")
                    .envs(&self.env)
                    .env(
                        "CPW__AMQP__CONNECTION_NAME",
                        format!("{}-worker-{i}", self.queue),
                    )
                    .env_remove("RUST_LOG");
                if let Some(filter) = log
                    .map(str::to_owned)
                    .or_else(|| std::env::var("BENCH_LOG").ok())
                {
                    cmd.env("RUST_LOG", filter);
                }
                Subject::spawn(cmd, &format!("{}-worker-{i}", self.label))
            })
            .collect()
    }

    pub fn spawn_baseline(&self, sim: &Sim, prefetch: u16) -> Result<Subject> {
        let exe = std::env::current_exe().context("the bench's own path")?;
        let mut cmd = Command::new(exe);
        cmd.arg(BASELINE_CHILD)
            .env("BASELINE_AMQP_URL", amqp_url())
            .env("BASELINE_QUEUE", &self.queue)
            .env("BASELINE_RESULTS", &self.topology.results_exchange)
            .env("BASELINE_SIM", &sim.base_url)
            .env("BASELINE_PREFETCH", prefetch.to_string());
        Subject::spawn(cmd, &format!("{}-baseline", self.label))
    }

    /// The instant the broker reports `n` consumers on the commands queue.
    pub async fn consumers_up(&self, broker: &Broker, n: u32) -> Result<Instant> {
        self.consumers_on(broker, &self.queue, n).await
    }

    /// The instant the broker reports `n` consumers on `queue` (a lane's).
    pub async fn consumers_on(&self, broker: &Broker, queue: &str, n: u32) -> Result<Instant> {
        let ch = broker.connection.create_channel().await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let q = ch
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            if q.consumer_count() >= n {
                let at = Instant::now();
                let _ = ch.close(200, "ok".into()).await;
                return Ok(at);
            }
            if Instant::now() > deadline {
                bail!("no consumer on {queue} after 30 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Waits for `n` events (or `limit`). When the `warmup`-th event
    /// arrives, the CPU times are read: the steady state starts.
    pub async fn collect(
        &mut self,
        n: usize,
        limit: Duration,
        warmup: usize,
        meter: &Meter,
    ) -> Collected {
        let deadline = tokio::time::Instant::now() + limit;
        let mut got = Collected::default();
        while got.events < n {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(seen)) => {
                    got.events += 1;
                    got.failed += usize::from(!seen.succeeded);
                    got.first.get_or_insert(seen.at);
                    got.last = Some(seen.at);
                    if got.events == warmup {
                        got.warm = Some((seen.at, meter.read()));
                    }
                }
                _ => break,
            }
        }
        got
    }

    pub async fn cleanup(self, broker: &Broker) {
        delete_topology(&broker.connection, &self.topology).await;
        if let Ok(ch) = broker.connection.create_channel().await {
            let _ = ch
                .queue_delete(self.observer.as_str().into(), QueueDeleteOptions::default())
                .await;
            let _ = ch.close(200, "cleaned".into()).await;
        }
    }
}

/// Publishes `n` commands to `queue` and waits for every confirm.
pub async fn prepublish_to(broker: &Broker, queue: &str, n: usize) -> Result<()> {
    const CHUNK: usize = 5_000;
    let mut left = n;
    while left > 0 {
        let chunk = left.min(CHUNK);
        let mut confirms = Vec::with_capacity(chunk);
        for _ in 0..chunk {
            let body = command(&command_id()).to_string();
            let properties = as_command(BasicProperties::default());
            let confirm = send(&broker.channel, queue, body.as_bytes(), properties);
            confirms.push(confirm.await?);
        }
        for c in confirms {
            if !c.await?.is_ack() {
                bail!("a command was not confirmed");
            }
        }
        left -= chunk;
    }
    Ok(())
}

#[derive(Default)]
pub struct Collected {
    pub events: usize,
    pub failed: usize,
    pub first: Option<Instant>,
    /// Arrival of the warm-up's last event, and the CPU ticks then.
    pub warm: Option<(Instant, Ticks)>,
    pub last: Option<Instant>,
}
