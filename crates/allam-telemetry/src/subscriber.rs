//! Installs the process-wide `tracing` subscriber: an env-filter, a text or JSON log layer on
//! stderr, and a `tracing-opentelemetry` layer that gives every span an OpenTelemetry span
//! context.
//!
//! Invariants:
//! - The OpenTelemetry layer is installed even without `--otlp-endpoint`. Spans then get real
//!   trace/span ids that are propagated (an incoming `traceparent` reaches the worker through
//!   a router that exports nothing), but no exporter runs and nothing leaves the process.
//! - With an endpoint, spans are batched and exported over OTLP/gRPC (tonic). The batch
//!   processor runs on its own thread; the tonic channel lives on the caller's Tokio runtime,
//!   so [`init_tracing`] must run inside one.
//! - Logs never carry prompt or completion text unless the operator passed `--log-prompts`;
//!   callers wrap such text in [`crate::PromptText`], which prints a length instead.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer};

use crate::Error;

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable, one line per event.
    #[default]
    Text,
    /// One JSON object per line (fields flattened, current span included), for log shippers.
    Json,
}

/// Inputs of [`init_tracing`].
#[derive(Debug, Clone)]
pub struct TracingConfig {
    pub log_format: LogFormat,
    /// `EnvFilter` directives, e.g. `info,allam_engine=debug`.
    pub filter: String,
    /// OTLP/gRPC collector address, e.g. `http://127.0.0.1:4317`. `None`: no exporter.
    pub otlp_endpoint: Option<String>,
    /// `service.name` resource attribute (`allam-router`, `allam-worker`, ...).
    pub service_name: String,
}

/// Keeps the tracer provider alive; dropping it flushes and shuts the exporter down.
///
/// Drop it on a multi-threaded runtime or outside any runtime: the final flush blocks the
/// dropping thread while tonic's channel task needs another thread to make progress.
#[must_use = "dropping the guard shuts tracing export down"]
pub struct TracingGuard {
    provider: SdkTracerProvider,
    exporting: bool,
}

impl TracingGuard {
    /// Whether spans are exported over OTLP.
    pub fn is_exporting(&self) -> bool {
        self.exporting
    }
}

impl std::fmt::Debug for TracingGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TracingGuard")
            .field("exporting", &self.exporting)
            .finish_non_exhaustive()
    }
}

/// How long the final flush may take before spans are dropped; shutdown must not hang on an
/// unreachable collector.
const EXPORT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

impl Drop for TracingGuard {
    fn drop(&mut self) {
        if let Err(err) = self.provider.shutdown_with_timeout(EXPORT_SHUTDOWN_TIMEOUT) {
            // The subscriber may already be gone; stderr is the one place left to say it.
            eprintln!("allam-telemetry: tracer provider shutdown: {err}");
        }
    }
}

/// Installs the global subscriber (see the module doc). Call once, early, inside a Tokio
/// runtime when `otlp_endpoint` is set.
pub fn init_tracing(config: TracingConfig) -> Result<TracingGuard, Error> {
    let filter = EnvFilter::try_new(&config.filter).map_err(|err| Error::InvalidFilter {
        filter: config.filter.clone(),
        message: err.to_string(),
    })?;
    let provider = build_tracer_provider(&config)?;
    let exporting = config.otlp_endpoint.is_some();
    let tracer = provider.tracer(config.service_name.clone());

    let log_layer = match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };

    tracing_subscriber::registry()
        .with(filter)
        .with(log_layer)
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .try_init()
        .map_err(|err| Error::SubscriberAlreadySet(err.to_string()))?;

    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    opentelemetry::global::set_tracer_provider(provider.clone());
    Ok(TracingGuard {
        provider,
        exporting,
    })
}

/// A provider with a batch OTLP exporter when an endpoint is configured, else with no span
/// processor at all (ids are still generated, nothing is recorded).
fn build_tracer_provider(config: &TracingConfig) -> Result<SdkTracerProvider, Error> {
    let resource = Resource::builder()
        .with_service_name(config.service_name.clone())
        .build();
    let builder = SdkTracerProvider::builder().with_resource(resource);
    let Some(endpoint) = &config.otlp_endpoint else {
        return Ok(builder.build());
    };
    // tonic's lazy channel spawns onto the current runtime and panics without one; check
    // first so a misuse is an error, not a panic.
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(Error::NoTokioRuntime {
            endpoint: endpoint.clone(),
        });
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .build()
        .map_err(|err| Error::OtlpExporter {
            endpoint: endpoint.clone(),
            message: err.to_string(),
        })?;
    Ok(builder.with_batch_exporter(exporter).build())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(filter: &str, endpoint: Option<&str>) -> TracingConfig {
        TracingConfig {
            log_format: LogFormat::Json,
            filter: filter.to_owned(),
            otlp_endpoint: endpoint.map(str::to_owned),
            service_name: "allam-test".to_owned(),
        }
    }

    #[test]
    fn bad_filter_is_an_error_naming_it() {
        let err = init_tracing(config("info,[[[", None)).expect_err("filter must not parse");
        assert!(matches!(err, Error::InvalidFilter { ref filter, .. } if filter == "info,[[["));
        assert!(err.to_string().contains("info,[[["));
    }

    #[test]
    fn otlp_endpoint_outside_a_runtime_is_an_error_not_a_panic() {
        let err = build_tracer_provider(&config("info", Some("http://127.0.0.1:4317")))
            .expect_err("no runtime here");
        assert!(matches!(err, Error::NoTokioRuntime { .. }), "{err}");
    }

    // Multi-threaded: dropping the provider flushes, which needs tonic's task to run elsewhere.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn otlp_endpoint_inside_a_runtime_builds_lazily() {
        // Nothing listens on this port: building must not connect, only shutdown would try.
        let provider = build_tracer_provider(&config("info", Some("http://127.0.0.1:9")))
            .expect("lazy exporter builds without a collector");
        drop(provider);
    }
}
