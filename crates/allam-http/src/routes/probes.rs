//! `GET /health` (alive: 200 whenever the process serves HTTP), `GET /ready` (200 when the
//! router has at least one healthy worker group, else 503) and `GET /metrics` (Prometheus
//! text from the process-wide recorder, plus per-worker-group gauges from the router).
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
    record_group_gauges(&state.router().groups());
    (
        [(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)],
        state.metrics().render(),
    )
        .into_response()
}

/// The router's view of each worker group, refreshed at scrape time (the values live in the
/// router; copying them on every load poll would be work nobody reads).
fn record_group_gauges(groups: &[allam_router::GroupStatus]) {
    use allam_telemetry::metric_names as names;
    // Also set by the router when membership changes; repeated here so the gauge exists even
    // if the recorder was installed after the router was built.
    metrics::gauge!(names::WORKER_GROUPS).set(groups.len() as f64);
    for group in groups {
        let label = group.name.clone();
        let healthy = matches!(group.health, allam_router::Health::Healthy);
        metrics::gauge!(names::WORKER_GROUP_HEALTHY, "group" => label.clone()).set(if healthy {
            1.0
        } else {
            0.0
        });
        metrics::gauge!(names::WORKER_GROUP_OUTSTANDING_REQUESTS, "group" => label.clone())
            .set(group.outstanding_requests as f64);
        metrics::gauge!(names::WORKER_GROUP_RUNNING_REQUESTS, "group" => label.clone())
            .set(f64::from(group.running));
        metrics::gauge!(names::WORKER_GROUP_WAITING_REQUESTS, "group" => label.clone())
            .set(f64::from(group.waiting));
        metrics::gauge!(names::WORKER_GROUP_KV_CACHE_USAGE_RATIO, "group" => label)
            .set(group.kv_usage);
    }
}
