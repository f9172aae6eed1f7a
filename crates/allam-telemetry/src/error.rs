//! The one error type of allam-telemetry. Every variant names what failed to set up, so the
//! binary can print it once and exit.

/// Telemetry setup failures. All of them happen at startup, never on a request path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The `--log-filter` / `RUST_LOG` directive string did not parse.
    #[error("invalid log filter `{filter}`: {message}")]
    InvalidFilter { filter: String, message: String },
    /// A global `tracing` subscriber was already installed in this process.
    #[error("a global tracing subscriber is already installed: {0}")]
    SubscriberAlreadySet(String),
    /// The OTLP exporter needs a running Tokio runtime (tonic's channel is spawned on it).
    #[error("`--otlp-endpoint {endpoint}` needs init_tracing to be called inside a Tokio runtime")]
    NoTokioRuntime { endpoint: String },
    /// The OTLP span exporter could not be built for this endpoint.
    #[error("cannot build the OTLP exporter for `{endpoint}`: {message}")]
    OtlpExporter { endpoint: String, message: String },
    /// The Prometheus recorder could not be built or installed.
    #[error("cannot install the Prometheus recorder: {0}")]
    Prometheus(String),
}
