//! Span export over OTLP (HTTP/protobuf), configured only by OpenTelemetry's
//! own environment variables, so an operator sets it up the way they set up
//! every other service (docs/contract.md section 6):
//!
//! - `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as is) or
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` (`/v1/traces` appended) turns export on;
//!   without either nothing is exported and no connection is attempted;
//! - `OTEL_SERVICE_NAME` names the service (default `credit-purchase-worker`);
//! - `OTEL_SDK_DISABLED=true` turns export off whatever else is set.
//!
//! The SDK's other variables (`OTEL_EXPORTER_OTLP_HEADERS`, `..._TIMEOUT`,
//! `OTEL_BSP_*`, `OTEL_RESOURCE_ATTRIBUTES`) apply as documented by
//! OpenTelemetry. Spans go through the batch processor: a bounded queue
//! (2,048 spans by default; a full queue drops spans, it never waits) drained
//! by a thread of its own, so a slow or absent collector never holds a
//! command.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracerProvider, Tracer};

/// The service name when `OTEL_SERVICE_NAME` is not set.
pub const DEFAULT_SERVICE_NAME: &str = "credit-purchase-worker";

/// How long the shutdown waits for the last batch to be sent.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why span export could not start: a variable names a bad value.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The exporter refused its configuration (an endpoint that is not a URL...).
    #[error("OTEL_EXPORTER_OTLP_*: cannot set up span export: {0}")]
    Build(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// The span exporter, when one is configured.
pub struct Exporter {
    /// `None`: no endpoint, or export disabled.
    provider: Option<SdkTracerProvider>,
}

impl Exporter {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ExportError> {
        let var = |name: &str| std::env::var(name).ok();
        if !wanted(var) {
            return Ok(Exporter { provider: None });
        }
        let exporter = SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .build()?;
        let resource = Resource::builder()
            .with_service_name(service_name(var))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_resource(resource)
            .with_batch_exporter(exporter)
            .build();
        Ok(Exporter {
            provider: Some(provider),
        })
    }

    /// Whether spans are exported.
    pub fn enabled(&self) -> bool {
        self.provider.is_some()
    }

    /// The tracer of the export layer, when spans are exported.
    pub fn tracer(&self) -> Option<Tracer> {
        let provider = self.provider.as_ref()?;
        Some(provider.tracer(DEFAULT_SERVICE_NAME))
    }

    /// Sends what is queued and stops the export thread, waiting at most a
    /// few seconds for the collector. Blocks: call it off the async runtime's
    /// threads (`spawn_blocking`).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT)
        {
            tracing::warn!(error = %e, "the last spans may not have been exported");
        }
    }
}

/// Whether the environment (`var`) asks for span export.
fn wanted(var: impl Fn(&str) -> Option<String>) -> bool {
    let set = |name: &str| var(name).is_some_and(|v| !v.trim().is_empty());
    let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") || set("OTEL_EXPORTER_OTLP_ENDPOINT"))
}

/// `OTEL_SERVICE_NAME`, or the default.
fn service_name(var: impl Fn(&str) -> Option<String>) -> String {
    var("OTEL_SERVICE_NAME")
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_owned())
}

#[cfg(test)]
mod tests {
    use super::{DEFAULT_SERVICE_NAME, service_name, wanted};

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn an_endpoint_turns_export_on_and_the_sdk_switch_off() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
        let traces = (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://c:4318/v1/traces",
        );
        assert!(!wanted(env(&[])));
        assert!(!wanted(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])));
        assert!(!wanted(env(&[("OTEL_SERVICE_NAME", "x")])));
        assert!(wanted(env(&[endpoint])));
        assert!(wanted(env(&[traces])));
        assert!(wanted(env(&[endpoint, ("OTEL_SDK_DISABLED", "false")])));
        assert!(!wanted(env(&[endpoint, ("OTEL_SDK_DISABLED", "TRUE")])));
        assert!(!wanted(env(&[traces, ("OTEL_SDK_DISABLED", "true")])));
    }

    #[test]
    fn the_service_name_defaults_to_the_worker() {
        assert_eq!(service_name(env(&[])), DEFAULT_SERVICE_NAME);
        assert_eq!(
            service_name(env(&[("OTEL_SERVICE_NAME", "")])),
            DEFAULT_SERVICE_NAME
        );
        assert_eq!(
            service_name(env(&[("OTEL_SERVICE_NAME", "cpw-eu")])),
            "cpw-eu"
        );
    }
}
