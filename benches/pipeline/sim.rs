//! The Hyperline simulator, as a process of its own, and its ledger.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::{SIM_KEY, WORKER_BIN};

/// The Hyperline simulator, as a process of its own.
pub struct Sim {
    pub child: Child,
    pub base_url: String,
}

#[derive(Deserialize)]
pub struct LedgerCounts {
    pub requests: u64,
    pub rate_limited: u64,
}

/// The ledger with its charges, in the order they were made.
#[derive(Deserialize)]
pub struct Ledger {
    pub charges: Vec<Charge>,
    pub requests: u64,
    pub rate_limited: u64,
}

/// One charge: the worker sends the command's id as its idempotency key.
#[derive(Deserialize)]
pub struct Charge {
    pub idempotency_key: Option<String>,
}

impl Sim {
    pub async fn start(latency_ms: u64, rate_limit: u32) -> Result<Sim> {
        let mut child = Command::new(WORKER_BIN)
            .args(["simulator", "--listen", "127.0.0.1:0", "--api-key", SIM_KEY])
            .args(["--latency-ms", &latency_ms.to_string()])
            .args(["--rate-limit", &rate_limit.to_string()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the simulator")?;
        let stdout = child.stdout.take().context("simulator stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .context("the simulator did not say where it listens")??
            .context("the simulator exited")?;
        let base_url = line
            .rsplit(' ')
            .next()
            .filter(|u| u.starts_with("http://"))
            .with_context(|| format!("unexpected simulator output: {line}"))?
            .to_owned();
        Ok(Sim { child, base_url })
    }

    pub async fn ledger(&self) -> Result<LedgerCounts> {
        ledger_of(&self.base_url).await
    }

    /// The whole ledger, charges included. It grows with every charge, so it
    /// is read when a phase has ended; [`Sim::ledger`] is the one to poll.
    pub async fn charges(&self) -> Result<Ledger> {
        Ok(reqwest::get(format!("{}/_sim/ledger", self.base_url))
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// Spreads the latency uniformly over `latency ..= latency + jitter`, as
    /// a real backend's answers are spread (`BENCH_JITTER_MS`).
    pub async fn set_jitter(&self, jitter_ms: u64) -> Result<()> {
        reqwest::Client::new()
            .post(format!("{}/_sim/faults", self.base_url))
            .json(&serde_json::json!({ "latency_jitter_ms": jitter_ms }))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

pub async fn ledger_of(base_url: &str) -> Result<LedgerCounts> {
    Ok(reqwest::get(format!("{base_url}/_sim/ledger"))
        .await?
        .error_for_status()?
        .json()
        .await?)
}
