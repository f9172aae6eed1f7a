//! Per-request Prometheus accounting for the generation endpoints, and the request span.
//!
//! Who counts what (each request is counted exactly once):
//! - `Router::generate` counts every request it receives in `allam_requests_total{api}` and
//!   its outcome in `allam_request_successes_total{api}` / `allam_request_failures_total{api,
//!   reason}` / `allam_request_duration_seconds{api}`, for gRPC and HTTP alike.
//! - This module counts, under the same names and `api` label, the requests the HTTP front
//!   rejects *before* calling the router (malformed JSON, unsupported parameter, bad key, wrong
//!   model, body too large) — the router never sees those.
//! - On success, this module records the per-request token histograms
//!   `allam_request_prompt_tokens{api}` and `allam_request_generation_tokens{api}`. The engine
//!   owns the `allam_prompt_tokens_total` / `allam_generated_tokens_total` counters.

use std::time::Instant;

use allam_telemetry::metric_names as names;
use allam_types::Usage;
use axum::http::HeaderMap;

/// `api` label values; also `RequestContext::api` (the router's labels for gRPC are
/// `grpc_*`, so the two fronts stay apart on one dashboard).
pub(crate) const API_CHAT: &str = "openai_chat";
pub(crate) const API_COMPLETIONS: &str = "openai_completions";
pub(crate) const API_SCORE: &str = "score";

/// One generation request's accounting on the HTTP side (see module doc).
#[derive(Debug)]
pub(crate) struct RequestTracker {
    api: &'static str,
    started: Instant,
}

impl RequestTracker {
    pub(crate) fn start(api: &'static str) -> Self {
        RequestTracker {
            api,
            started: Instant::now(),
        }
    }

    pub(crate) fn api(&self) -> &'static str {
        self.api
    }

    /// A request the HTTP front refused before routing: counted here, since the router never
    /// saw it.
    pub(crate) fn rejected(self, reason: &'static str) {
        metrics::counter!(names::REQUESTS_TOTAL, "api" => self.api).increment(1);
        metrics::counter!(names::REQUEST_FAILURES_TOTAL, "api" => self.api, "reason" => reason)
            .increment(1);
        metrics::histogram!(names::REQUEST_DURATION_SECONDS, "api" => self.api)
            .record(self.started.elapsed().as_secs_f64());
    }

    /// A request that finished: its token counts (the router counted the success itself).
    pub(crate) fn succeeded(self, usage: Usage) {
        metrics::histogram!(names::REQUEST_PROMPT_TOKENS, "api" => self.api)
            .record(f64::from(usage.prompt_tokens));
        metrics::histogram!(names::REQUEST_GENERATION_TOKENS, "api" => self.api)
            .record(f64::from(usage.completion_tokens));
    }
}

/// The span covering one HTTP request (receive → response end), joined to the client's
/// trace when it sent a `traceparent`; the router's `route` work runs inside it.
pub(crate) fn request_span(api: &'static str, headers: &HeaderMap) -> tracing::Span {
    let span = tracing::info_span!("http_request", api, otel.kind = "server");
    allam_telemetry::set_span_parent(
        &span,
        allam_telemetry::extract_context_from_headers(headers),
    );
    span
}
