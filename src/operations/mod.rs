//! What operators and Kubernetes see: `/healthz`, `/readyz` and `/metrics`
//! on `server.listen`.

pub mod depths;
mod health;
pub mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use health::{HEARTBEAT, Health, Readiness};
pub use metrics::Metrics;

/// What the handlers read.
#[derive(Clone)]
struct Ops {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

async fn healthz(State(ops): State<Ops>) -> (StatusCode, &'static str) {
    if ops.health.alive() {
        (StatusCode::OK, "alive\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the supervising loop is stuck\n",
        )
    }
}

/// One line of `key=value` fields; while the broker blocks the connection,
/// a second line says why, in the broker's words.
async fn readyz(State(ops): State<Ops>) -> (StatusCode, String) {
    let r = ops.health.readiness();
    let node = ops.health.node().unwrap_or_else(|| "none".to_owned());
    let mut text = format!(
        "connected={} consuming={} credentials_ok={} shutting_down={} blocked={} node={node}\n",
        r.connected, r.consuming, r.credentials_ok, r.shutting_down, r.blocked
    );
    if let Some(reason) = ops.health.blocked() {
        text.push_str(&format!(
            "the broker blocked the connection: resource alarm ({reason})\n"
        ));
    }
    let status = if r.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, text)
}

async fn metrics_text(State(ops): State<Ops>) -> impl IntoResponse {
    let ready = ops.health.readiness().ready();
    ops.metrics.ready.set(i64::from(ready));
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        ops.metrics.encode(),
    )
}

/// Binds the operations server; port 0 picks a free one.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves the probes and metrics until `stop`.
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(Ops { health, metrics });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}
