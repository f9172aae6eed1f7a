//! Observability in one place: every metric name, tracing/OTLP setup, and W3C trace-context
//! propagation through gRPC metadata.

pub mod metric_names;
