//! Building the worker from its settings, and running it until told to stop.
//!
//! Split in two so tests can drive the real thing: [`Application::build`]
//! binds the operations port (port 0 allowed) and checks everything that can
//! fail at start; [`Application::run_until_stopped`] runs until a token says stop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::broker::results_log::LogSource;
use crate::broker::{HistoryKeys, Mismatch, Topology};
use crate::configuration::{ConfigError, Settings};
use crate::hyperline::admission::Admission;
use crate::hyperline::credentials::Credentials;
use crate::hyperline::gate::Gate;
use crate::hyperline::{ClientError, HyperlineClient, READS_PER_SECOND};
use crate::operations::metrics::LaneLabel;
use crate::operations::{self, Health, Metrics};
use crate::pipeline::{Limits, Pipeline, supervisor};

/// How long requests wait for the answer of the one request that learns a
/// new rate-limit window: a quarter of the request timeout, so that a probe
/// that hangs delays the others by a fraction of it, and an API that answers
/// in seconds still answers first.
fn probe_patience(request_timeout: Duration) -> Duration {
    (request_timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(10))
}

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// A setting is missing or wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The HTTP client could not be built.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The operations port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A worker ready to run.
pub struct Application {
    settings: Settings,
    listener: TcpListener,
    ops_addr: SocketAddr,
    pipeline: Arc<Pipeline>,
    health: Arc<Health>,
}

impl Application {
    /// Checks the key, builds the client and binds the operations port.
    pub async fn build(settings: Settings) -> Result<Application, StartupError> {
        let key = settings.require_api_key()?.clone();
        let client = HyperlineClient::new(&settings.hyperline, key.clone())?;
        // The API key is there (just required), so keys always exist.
        let history_keys = HistoryKeys::from_settings(&settings)
            .unwrap_or_else(|| HistoryKeys::derived(key.expose().as_bytes()));
        let addr = settings.server.listen;
        let listener = operations::bind(addr)
            .await
            .map_err(|source| StartupError::Listen { addr, source })?;
        let ops_addr = listener
            .local_addr()
            .map_err(|source| StartupError::Listen { addr, source })?;
        let request_timeout = settings.hyperline.timeout();
        let topology = Topology::new(&settings.amqp, &settings.retry.redelivery_delays_secs);
        let metrics = Arc::new(Metrics::new());
        for lane in settings.amqp.lanes() {
            let label = LaneLabel { lane: lane.name };
            metrics
                .lane_share
                .get_or_create(&label)
                .set(i64::from(lane.share));
            let objective = i64::try_from(lane.objective.as_secs()).unwrap_or(i64::MAX);
            metrics.lane_objective.get_or_create(&label).set(objective);
        }
        let pipeline = Arc::new(Pipeline {
            client,
            gate: Gate::new(
                settings.hyperline.max_requests_per_second,
                probe_patience(request_timeout),
                settings.longest_rate_limit_pause(),
            ),
            admission: Admission::new(&settings.amqp.lanes(), &metrics),
            credentials: Credentials::default(),
            reads: Gate::new(
                READS_PER_SECOND,
                probe_patience(request_timeout),
                settings.longest_rate_limit_pause(),
            ),
            reconcile_at_window: settings.hyperline.reconcile_at_window,
            results_log: LogSource::new(
                &settings.amqp,
                topology.results_log.as_ref().map(|l| l.name.as_str()),
            ),
            retry: settings.retry.clone(),
            topology,
            metrics: Arc::clone(&metrics),
            limits: Limits {
                deadline: settings.worker.delivery_deadline(),
                request_timeout,
                window: settings.idempotency_window(),
                unseen: settings.unseen_bound(),
                life: settings.life_bound(),
            },
            replica: settings.amqp.connection_name(),
            history_keys,
            stop_requests: CancellationToken::new(),
        });
        Ok(Application {
            settings,
            listener,
            ops_addr,
            pipeline,
            health: Arc::new(Health::default()),
        })
    }

    /// Where `/healthz`, `/readyz` (and `/metrics`) are served.
    pub fn ops_addr(&self) -> SocketAddr {
        self.ops_addr
    }

    /// The probes' view, for tests.
    pub fn health(&self) -> Arc<Health> {
        Arc::clone(&self.health)
    }

    /// Runs until `shutdown` is cancelled and in-flight commands are drained
    /// (or the grace period is over); or stops at once, with the line that
    /// says what differs, when an existing queue or exchange does not match
    /// what the worker declares (or, with `amqp.declare_topology = false`,
    /// when one is missing).
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), Mismatch> {
        let stop_ops = CancellationToken::new();
        let ops = tokio::spawn(operations::serve(
            self.listener,
            Arc::clone(&self.health),
            Arc::clone(&self.pipeline.metrics),
            stop_ops.clone(),
        ));
        let health = Arc::clone(&self.health);
        let mark = shutdown.clone();
        let marker = tokio::spawn(async move {
            mark.cancelled().await;
            health.set_shutting_down();
        });
        let ended = supervisor::run(
            &self.settings,
            self.pipeline,
            Arc::clone(&self.health),
            shutdown,
        )
        .await;
        marker.abort();
        stop_ops.cancel();
        match ops.await {
            Ok(Err(e)) => tracing::error!(error = %e, "operations server failed"),
            Err(e) => tracing::error!(error = %e, "operations server task failed"),
            Ok(Ok(())) => {}
        }
        ended
    }
}
