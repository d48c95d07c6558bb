//! The test harness of `credit-purchase-worker`, shared by its integration
//! tests (`tests/`), its benchmark (`benches/`) and its fuzz target (`fuzz/`).
//!
//! Each of these is a crate of its own, so a helper module included by all of
//! them would be compiled once per test binary, and each copy would drift; a
//! crate holds each helper once:
//!
//! - [`app`]: one test's world: a worker (in-process or as a child
//!   process) on queue names of its own, its simulator, and its observer;
//! - [`broker`]: where the test broker is, publishing with confirms, the
//!   observer of result events, queue depths, removing a test's topology;
//! - [`cluster`]: a real three-node RabbitMQ cluster started by a test;
//! - [`commands`]: valid command bodies with fresh ids;
//! - [`guard`]: what a test declared on the broker, deleted when the test
//!   ends, passed or failed;
//! - [`pika`]: pika (Python) publishing and reading messages whose
//!   properties are bytes, where lapin's are text;
//! - [`process`]: the worker's binary, and its graceful stop by SIGTERM;
//! - [`proxy`]: a TCP proxy to the broker that slows its answers on cue;
//! - [`strikes`]: when a chaos run strikes, by progress (commands
//!   charged) rather than by the clock, and where it holds its publishing;
//! - [`rules`]: the command rules of docs/contract.md section 2 restated byte by
//!   byte, independently of the parser, and what holds of every verdict of
//!   `Command::parse`;
//! - [`hostile`]: the hostile inputs (strings, ids, numbers, dates, JSON
//!   tokens) from which the property tests and the hostile stream build
//!   their messages.

use std::time::Duration;

pub mod app;
pub mod broker;
pub mod cluster;
pub mod commands;
pub mod guard;
pub mod hostile;
pub mod pika;
pub mod process;
pub mod proxy;
pub mod rules;
pub mod strikes;

/// Every wait of the tests is bounded by this (or a stated shorter bound), so
/// a test that goes wrong fails instead of hanging.
pub const WAIT: Duration = Duration::from_secs(60);

/// Polls `ready` every `every` until it holds; panics naming `what` once
/// [`WAIT`] has passed. For states the tests can only poll: queue depths,
/// readiness, what the simulator has seen.
pub async fn wait_until(what: &str, every: Duration, mut ready: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !ready().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up after {} s waiting for {what}",
            WAIT.as_secs()
        );
        tokio::time::sleep(every).await;
    }
}
