//! A faithful stand-in for Hyperline's credit-purchase endpoint (contract,
//! section 8), used by the tests, the demo and the benchmarks. It answers the
//! documented request and response shapes with Bearer auth, validation
//! errors, the idempotency rules (24-hour replay by default, `409` while in
//! progress, `417` on mismatch) and the write rate limit with its headers,
//! and it can inject what the worker must survive: latency, 5xx, hangs past
//! the client timeout and dropped connections after the charge. Its ledger of
//! charges, readable at `GET /_sim/ledger` or through [`Simulator::ledger`],
//! is how a test proves that no command was charged twice. Every charge is
//! also a credit transaction, listed as Hyperline lists them (under the read
//! limit), so reconciliation can be tested against it.

mod faults;
mod idempotency;
mod purchase;
mod reply;
mod routes;
mod server;
mod state;
mod transactions;
mod validation;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use faults::{Faults, FaultsPatch, ScriptedResponse};
pub use state::{Charge, Ledger, RequestRecord, Transaction, TransactionPrice};

use state::Shared;

/// How a simulator starts.
#[derive(Clone, Debug)]
pub struct SimulatorSettings {
    /// The only key accepted as `Authorization: Bearer <api_key>`.
    pub api_key: String,
    pub faults: Faults,
    /// Seeds fault rolls, latency jitter and invoice ids, so a chaos run can
    /// be replayed exactly; `None` draws a seed from the OS.
    pub seed: Option<u64>,
}

impl Default for SimulatorSettings {
    fn default() -> Self {
        SimulatorSettings {
            api_key: "sim_test_key".to_owned(),
            faults: Faults::default(),
            seed: None,
        }
    }
}

/// A running simulator. Dropping it stops the server and aborts every open
/// connection, so a test that forgets [`Simulator::shutdown`] leaks nothing.
pub struct Simulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Simulator {
    /// Binds `listen` (port 0 picks a free port) and serves in the background.
    pub async fn start(
        listen: SocketAddr,
        settings: SimulatorSettings,
    ) -> std::io::Result<Simulator> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(
            settings.api_key,
            settings.faults,
            settings.seed,
        ));
        let stop = CancellationToken::new();
        let task = tokio::spawn(server::serve(
            listener,
            routes::router(Arc::clone(&shared)),
            stop.clone(),
        ));
        tracing::debug!(%addr, "hyperline simulator listening");
        Ok(Simulator {
            addr,
            shared,
            stop,
            task: Some(task),
        })
    }

    /// The address actually bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL to configure the worker with, e.g. `http://127.0.0.1:8089`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A snapshot of the charges and counters.
    pub fn ledger(&self) -> Ledger {
        self.shared.lock().ledger.clone()
    }

    /// Every charge as a credit transaction, in order of `created_at`.
    pub fn transactions(&self) -> Vec<Transaction> {
        self.shared.lock().transactions.clone()
    }

    /// Every request to the purchase route so far, in arrival order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().requests.clone()
    }

    /// Changes the given fault settings; requests already past their fault
    /// roll are not affected. Unlike `POST /_sim/faults` this does not refuse
    /// a rate outside 0..=1: below 0 acts as never, above 1 as always.
    pub fn set_faults(&self, patch: FaultsPatch) {
        self.shared.lock().faults.apply(patch);
    }

    /// The current fault settings.
    pub fn faults(&self) -> Faults {
        self.shared.lock().faults.clone()
    }

    /// Stops accepting, aborts open connections (hung ones included) and
    /// waits until they are gone.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take()
            && let Err(error) = task.await
        {
            tracing::debug!(%error, "simulator server task ended abnormally");
        }
        tracing::debug!(addr = %self.addr, "hyperline simulator stopped");
    }

    /// Serves until `signal` completes, then shuts down (the CLI's mode).
    pub async fn run_until(self, signal: impl Future<Output = ()>) {
        signal.await;
        self.shutdown().await;
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
