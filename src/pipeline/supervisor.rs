//! Keeps the replica consuming: a lost connection or channel is rebuilt with
//! backoff, topology redeclared and consumption resumed, without a restart.
//!
//! `/healthz` beats from this loop and the session it runs, never from a
//! task of its own: a beat must mean that the loop that consumes is moving.
//!
//! This is our own loop rather than lapin's young auto-recovery: a fresh
//! connection, fresh channels and a fresh consumer are easy to reason about,
//! and a delivery can never be acked on a channel it did not come from.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Pipeline;
use super::session::{self, SessionContext, SessionError, beating};
use crate::broker::{Mismatch, redacted_url};
use crate::configuration::Settings;
use crate::operations::Health;

const RECONNECT_FIRST: Duration = Duration::from_millis(250);
const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// Runs sessions until `shutdown` is cancelled, or until the broker's
/// topology is found to differ from the worker's: reconnecting cannot fix
/// that, an operator must, so the replica stops and says what differs.
pub async fn run(
    settings: &Settings,
    pipeline: Arc<Pipeline>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Result<(), Mismatch> {
    let name = settings.amqp.connection_name();
    let ctx = SessionContext {
        settings,
        pipeline: &pipeline,
        health: &health,
        shutdown: &shutdown,
        name: &name,
    };
    let mut wait = RECONNECT_FIRST;
    // Replicas start at a random node of the list, so they spread over the
    // cluster instead of all landing on its first node.
    let nodes = settings.amqp.url.nodes();
    let mut node = rand::random_range(0..nodes.len());
    loop {
        health.beat();
        let started = tokio::time::Instant::now();
        match session::run(&ctx, &mut node).await {
            Ok(()) => break,
            Err(SessionError::Mismatch(mismatch)) => {
                health.set_connected(false);
                return Err(mismatch);
            }
            Err(e) => {
                health.set_connected(false);
                pipeline.metrics.reconnects.inc();
                if shutdown.is_cancelled() {
                    break;
                }
                // A session that ran a while was healthy: start the backoff over.
                if started.elapsed() > RECONNECT_MAX {
                    wait = RECONNECT_FIRST;
                }
                let retry_in_ms = crate::clock::millis(wait);
                tracing::warn!(error = %e, broker = %redacted_url(&nodes[node]), retry_in_ms, "broker session ended; reconnecting");
                // The node just lost is tried last; the others first.
                node = (node + 1) % nodes.len();
                let backoff = async {
                    tokio::select! {
                        () = shutdown.cancelled() => false,
                        () = tokio::time::sleep(wait) => true,
                    }
                };
                if !beating(&health, backoff).await {
                    break;
                }
                wait = (wait * 2).min(RECONNECT_MAX);
            }
        }
    }
    tracing::info!("worker stopped");
    Ok(())
}
