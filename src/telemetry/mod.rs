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

pub mod export;
mod json_lines;
mod traceparent;

use std::io::IsTerminal;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::fmt::writer::MakeWriterExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

pub use export::{ExportError, Exporter};
pub use traceparent::{child_traceparent, continue_trace, exported_traceparent, sampled_trace_id};

use crate::configuration::LogFormat;

/// The target of the spans that exist only to be exported.
pub const SPANS: &str = "cpw_otel";

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// Installs the global subscriber, logs only; a second call (tests) is a
/// no-op. For the operator subcommands and the simulator.
pub fn init(format: LogFormat, level: &str) {
    let _ = Registry::default()
        .with(log_layer(format, level))
        .try_init();
}

/// Installs the global subscriber with span export when the environment
/// asks for it (see [`export`]). The returned [`Exporter`] must be shut down
/// at the end so the last spans are sent.
pub fn init_with_export(format: LogFormat, level: &str) -> Result<Exporter, ExportError> {
    let exporter = Exporter::from_env()?;
    let mut layers = vec![log_layer(format, level)];
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
    Ok(exporter)
}

/// The log layer: everything `level` (or `RUST_LOG`) enables, except the
/// export spans.
///
/// Colour codes only when stderr is a terminal: a pretty log sent to a file
/// or a pipe stays plain text.
fn log_layer(format: LogFormat, level: &str) -> BoxedLayer {
    // Static directives only: a filter decided per call (a closure) would
    // make every callsite of every crate, lapin's frame tracing included,
    // ask again on each call instead of being switched off once.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter(level));
    let filter = match format!("{SPANS}=off").parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    let writer = std::io::stderr.with_max_level(tracing::Level::TRACE);
    match format {
        LogFormat::Json => json_lines::JsonLines::new(writer)
            .with_filter(filter)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
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
