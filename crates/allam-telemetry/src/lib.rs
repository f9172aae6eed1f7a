//! Observability in one place: every metric name, tracing/OTLP setup, W3C trace-context
//! propagation through gRPC metadata and HTTP headers, the Prometheus recorder, and the rule
//! that keeps prompt text out of logs.
//!
//! Invariants: nothing here runs on a request's hot path except `metrics` macros and the
//! propagation helpers (a few allocations); setup failures are typed [`Error`]s, never panics.

mod error;
pub mod metric_names;
mod prometheus;
mod prompt_text;
mod propagation;
mod subscriber;

pub use error::Error;
pub use metrics_exporter_prometheus::PrometheusHandle;
/// Re-exported so callers can name the extracted context without depending on opentelemetry.
pub use opentelemetry::Context as TraceContext;
pub use prometheus::{install_prometheus, COUNT_BUCKETS, LATENCY_BUCKETS_SECONDS};
pub use prompt_text::PromptText;
pub use propagation::{
    current_trace_headers, extract_context, extract_context_from_headers,
    extract_context_from_pairs, inject_context, inject_context_into_headers,
    inject_pairs_into_metadata, set_span_parent,
};
pub use subscriber::{init_tracing, LogFormat, TracingConfig, TracingGuard};
