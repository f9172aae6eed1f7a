//! `GET /health` (alive: 200 whenever the process serves HTTP), `GET /ready` (200 when the
//! router has at least one healthy worker group, else 503) and `GET /metrics` (Prometheus
//! text from the process-wide recorder).
//!
//! Probes never need the API key; `/metrics` does only with `metrics_require_auth`.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::state::AppState;

pub(crate) async fn health() -> Response {
    Json(serde_json::json!({"status": "ok"})).into_response()
}

pub(crate) async fn ready(State(state): State<AppState>) -> Response {
    if state.router().ready() {
        Json(serde_json::json!({"status": "ready"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "no healthy worker group"})),
        )
            .into_response()
    }
}

/// Prometheus text exposition format, version 0.0.4.
const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub(crate) async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if state.config().metrics_require_auth {
        if let Err(err) = state.authorize(&headers) {
            return err.into_response();
        }
    }
    (
        [(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)],
        state.metrics().render(),
    )
        .into_response()
}
