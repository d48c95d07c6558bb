//! Logs and spans. Logs: JSON for pipelines, pretty for people, filtered by
//! `log.level` or `RUST_LOG`, set up once, first thing, so even a
//! configuration error is reported through the same channel as everything
//! else. Spans: exported over OTLP only when OpenTelemetry's own variables
//! name an endpoint ([`export`]); the `traceparent` of a command is
//! continued either way ([`traceparent`]).
//!
//! The spans made for export (consumer, client, producer) have the target
//! [`SPANS`]: the log layer never sees them, so a log line keeps the
//! `command` span (its ids) as its context, and without an exporter no layer
//! wants them, so creating one costs a cached callsite check.

mod batched;
pub mod export;
mod json_lines;
mod traceparent;

use std::io::IsTerminal;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

pub use export::{ExportError, Exporter};
pub use traceparent::{child_traceparent, continue_trace, exported_traceparent, sampled_trace_id};

use crate::configuration::LogFormat;

/// The target of the spans that exist only to be exported.
pub const SPANS: &str = "cpw_otel";

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// Installs the global subscriber, logs only, written to stderr as they
/// come; a second call (tests) is a no-op. For the operator subcommands and
/// the simulator.
pub fn init(format: LogFormat, level: &str) {
    let _ = Registry::default()
        .with(log_layer(format, level, std::io::stderr, stderr_colours()))
        .try_init();
}

/// Installs the global subscriber, logs only, written to `file` without
/// colour codes: for the demo, whose progress bar owns the terminal (log
/// lines written across it would break it).
pub fn init_to_file(format: LogFormat, level: &str, file: std::fs::File) {
    let writer = std::sync::Mutex::new(file);
    let _ = Registry::default()
        .with(log_layer(format, level, writer, false))
        .try_init();
}

/// Colour codes only when stderr is a terminal: a pretty log sent to a file
/// or a pipe stays plain text.
fn stderr_colours() -> bool {
    std::io::stderr().is_terminal()
}

/// What the worker's telemetry holds until the end: the span exporter and
/// the thread that writes the logs.
pub struct Telemetry {
    exporter: Exporter,
    /// `None` when the log thread could not start: lines go to stderr
    /// directly.
    logs: Option<batched::Flush>,
}

impl Telemetry {
    pub fn spans_exported(&self) -> bool {
        self.exporter.enabled()
    }

    /// Sends the last spans, then writes the last lines (the exporter's
    /// own included). Blocks: call it off the runtime's threads.
    pub fn shutdown(self) {
        self.exporter.shutdown();
        drop(self.logs);
    }
}

/// Installs the worker's global subscriber: logs written in batches by a
/// thread of their own ([`batched`]), and span export when the environment
/// asks for it (see [`export`]). The returned [`Telemetry`] must be shut
/// down at the end so the last spans and lines are written.
pub fn init_with_export(format: LogFormat, level: &str) -> Result<Telemetry, ExportError> {
    let exporter = Exporter::from_env()?;
    let (log, logs) = match batched::stderr() {
        Ok((writer, flush)) => (
            log_layer(format, level, writer, stderr_colours()),
            Some(flush),
        ),
        Err(_) => (
            log_layer(format, level, std::io::stderr, stderr_colours()),
            None,
        ),
    };
    let mut layers = vec![log];
    if let Some(tracer) = exporter.tracer() {
        let spans = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_context_activation(false)
            .with_filter(Targets::new().with_target(SPANS, LevelFilter::TRACE));
        layers.push(Box::new(spans));
    }
    let _ = Registry::default().with(layers).try_init();
    Ok(Telemetry { exporter, logs })
}

/// The log layer: everything `level` (or `RUST_LOG`) enables, except the
/// export spans; pretty lines carry colour codes when `ansi` says so.
fn log_layer<W>(format: LogFormat, level: &str, writer: W, ansi: bool) -> BoxedLayer
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    // Static directives only: a filter decided per call (a closure) would
    // make every callsite of every crate, lapin's frame tracing included,
    // ask again on each call instead of being switched off once.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter(level));
    let filter = match format!("{SPANS}=off").parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    match format {
        LogFormat::Json => json_lines::JsonLines::new(writer)
            .with_filter(filter)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
    }
}

/// The filter of `log.level`, with lapin silenced unless the level names
/// it. lapin logs every connection loss itself, at ERROR and two or three
/// times (the close, the channel error, its own recovery giving up); the
/// worker reports the same event once, in its own words, with what it does
/// next. `lapin=debug` in `log.level` (or `RUST_LOG`) brings them back.
fn default_filter(level: &str) -> EnvFilter {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    if level.contains("lapin") {
        return filter;
    }
    match LAPIN_OFF.parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

/// The directive added to `log.level` by default.
const LAPIN_OFF: &str = "lapin=off";
