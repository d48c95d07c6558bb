//! The latency phase: commands published at a fixed rate, each timed to its event.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use cpw_testkit::broker::{as_command, send};
use cpw_testkit::commands::{command, command_id};
use lapin::BasicProperties;

use crate::broker::Broker;
use crate::run::Run;

pub struct Latency {
    pub rate: u32,
    pub samples: usize,
    pub expected: usize,
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
}

impl Run {
    /// Publishes at `rate`/s for `secs` and times each command to its event.
    pub async fn paced_latency(
        &mut self,
        broker: &Broker,
        rate: u32,
        secs: u32,
    ) -> Result<Latency> {
        let total = (rate * secs) as usize;
        let sent: Arc<Mutex<HashMap<String, Instant>>> =
            Arc::new(Mutex::new(HashMap::with_capacity(total)));
        let publisher = {
            let sent = Arc::clone(&sent);
            let channel = broker.channel.clone();
            let queue = self.queue.clone();
            tokio::spawn(async move {
                let per_tick = (rate / 100).max(1) as usize;
                let mut tick = tokio::time::interval(Duration::from_millis(
                    (1000 * per_tick as u64) / u64::from(rate),
                ));
                let mut confirms = Vec::with_capacity(total);
                let mut published = 0;
                while published < total {
                    tick.tick().await;
                    for _ in 0..per_tick.min(total - published) {
                        let id = command_id();
                        let body = command(&id).to_string();
                        sent.lock().expect("sent").insert(id, Instant::now());
                        let properties = as_command(BasicProperties::default());
                        confirms.push(send(&channel, &queue, body.as_bytes(), properties).await?);
                        published += 1;
                    }
                }
                for c in confirms {
                    if !c.await?.is_ack() {
                        bail!("a command was not confirmed");
                    }
                }
                Ok::<(), anyhow::Error>(())
            })
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(u64::from(secs) + 60);
        let mut latencies = Vec::with_capacity(total);
        while latencies.len() < total {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(seen)) => {
                    let published = seen
                        .command_id
                        .and_then(|id| sent.lock().expect("sent").remove(&id));
                    if let Some(p) = published {
                        latencies.push(seen.at.duration_since(p));
                    }
                }
                _ => break,
            }
        }
        publisher.await??;
        latencies.sort_unstable();
        let pick = |q: usize| {
            latencies
                .get((latencies.len() * q / 100).min(latencies.len().saturating_sub(1)))
                .copied()
        };
        Ok(Latency {
            rate,
            samples: latencies.len(),
            expected: total,
            p50: pick(50),
            p99: pick(99),
        })
    }
}
