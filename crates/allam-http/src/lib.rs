//! The HTTP front of the router: the OpenAI-compatible API (`/v1/chat/completions`,
//! `/v1/completions`, `/v1/models`), vLLM's `/tokenize`, the model card's `/score`, probes
//! (`/health`, `/ready`) and Prometheus `/metrics`.
//!
//! Invariants:
//! - Every generation request becomes an `allam_request::RawRequest` and goes through
//!   `Router::generate`, which validates before anything is streamed: a bad request is a 400
//!   with OpenAI's error object whether or not `stream` is set.
//! - Every error leaves through `Error`'s `IntoResponse` (one status mapping, one body shape).
//! - No prompt or completion text in logs unless `HttpConfig::log_prompts`.
//! - Handlers never block: tokenizer work happens in the router, off the async workers.

// Half the traffic is Arabic: a byte-offset slice of a `str` is a panic waiting for a
// multi-byte character (tgi #1795).
#![warn(clippy::string_slice)]

mod error;
mod extract;
mod openai;
mod request_metrics;
mod routes;
mod state;
mod tls;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use error::Error;
pub use state::{AppState, HttpConfig, DEFAULT_MAX_BODY_BYTES};
pub use tls::{HttpTlsConfig, HANDSHAKE_TIMEOUT};

/// All routes, with the body limit from the state's config.
pub fn app(state: AppState) -> axum::Router {
    let max_body_bytes = state.config().max_body_bytes;
    axum::Router::new()
        .route(
            "/v1/chat/completions",
            post(routes::generation::chat_completions),
        )
        .route("/v1/completions", post(routes::generation::completions))
        .route("/v1/models", get(routes::models::list))
        .route("/v1/models/{model}", get(routes::models::retrieve))
        .route("/tokenize", post(routes::tokenize::tokenize))
        .route("/score", post(routes::score::score))
        .route("/health", get(routes::probes::health))
        .route("/ready", get(routes::probes::ready))
        .route("/metrics", get(routes::probes::metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// Parses a `/v1/chat/completions` body exactly as the handler does (JSON with the failing
/// field's path, then the wire-shape mapping), without validation. Public for the fuzz targets.
pub fn parse_chat_request(body: &[u8]) -> Result<allam_request::RawRequest, Error> {
    let request: openai::request::ChatCompletionRequest = extract::parse_json(body)?;
    request.into_raw().map(|(raw, _options)| raw)
}

/// Parses a `/v1/completions` body exactly as the handler does, without validation. Public for
/// the fuzz targets.
pub fn parse_completion_request(body: &[u8]) -> Result<allam_request::RawRequest, Error> {
    let request: openai::request::CompletionRequest = extract::parse_json(body)?;
    request.into_raw().map(|(raw, _options)| raw)
}

/// Parses a model-card `/score` body exactly as the handler does, without validation. Public
/// for the fuzz targets.
pub fn parse_score_request(body: &[u8]) -> Result<allam_request::RawRequest, Error> {
    let request: routes::score::ScoreRequest = extract::parse_json(body)?;
    request.into_raw()
}

async fn not_found(uri: axum::http::Uri) -> Error {
    Error::RouteNotFound {
        path: uri.path().to_owned(),
    }
}

/// Serves [`app`] on `listener` until `shutdown` is cancelled, then stops accepting and waits
/// for in-flight requests (streams included) to end; bound that wait with the caller's
/// shutdown timeout.
pub async fn serve(
    state: AppState,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let addr = listener
        .local_addr()
        .map_or_else(|_| "<unknown address>".to_owned(), |addr| addr.to_string());
    tracing::info!(%addr, "HTTP API listening");
    // Streamed SSE chunks are small writes: without TCP_NODELAY, Nagle's algorithm holds
    // them back (the same stall the gRPC servers had, measured by the router_overhead bench).
    use axum::serve::ListenerExt as _;
    let listener = listener.tap_io(|tcp| {
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(error = %err, "could not set TCP_NODELAY");
        }
    });
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(|source| Error::Serve { addr, source })
}

/// [`serve`] over HTTPS: the same app, connections accepted through TLS.
pub async fn serve_tls(
    state: AppState,
    listener: TcpListener,
    tls: HttpTlsConfig,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let acceptor = tls.acceptor()?;
    let addr = listener
        .local_addr()
        .map_or_else(|_| "<unknown address>".to_owned(), |addr| addr.to_string());
    let listener = tls::TlsListener::new(listener, acceptor).map_err(|source| Error::Serve {
        addr: addr.clone(),
        source,
    })?;
    tracing::info!(%addr, "HTTPS API listening");
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(|source| Error::Serve { addr, source })
}
