//! `AppState`: what every handler shares (router, config, metrics handle, vocabulary lookup),
//! and the checks that need it (API key, model name).
//!
//! Invariant: cheap to clone (one `Arc`); nothing in it is mutated after construction.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use allam_router::Router;
use allam_telemetry::PrometheusHandle;
use allam_types::TokenId;
use axum::http::HeaderMap;

use crate::extract::BodyLimit;
use crate::openai::logprobs::TokenPieces;
use crate::Error;

/// Default `max_body_bytes`: a full 4096-token context is ~20 KiB of text even in Arabic,
/// so 4 MiB leaves room for long multi-turn histories while bounding memory per request.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Construction inputs of the HTTP front.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Larger bodies get 413 (`--max-request-body-bytes`).
    pub max_body_bytes: usize,
    /// `--log-prompts`: allow prompt text in debug logs. Off by default.
    pub log_prompts: bool,
    /// Require the API key on `/metrics` too (`/health` and `/ready` stay open for probes).
    pub metrics_require_auth: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            log_prompts: false,
            metrics_require_auth: false,
        }
    }
}

/// Shared state of every handler; build with [`AppState::new`], pass to [`crate::app`].
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

#[derive(Clone)]
struct Inner {
    router: Router,
    metrics: PrometheusHandle,
    config: HttpConfig,
    model_name: String,
    max_context: u32,
    /// Unix seconds at construction: the `created` of `/v1/models`.
    started_unix: u64,
    pieces: Arc<dyn TokenPieces>,
}

/// Used until [`AppState::with_token_pieces`] supplies the vocabulary: logprobs then show
/// tokens as `token_id:N`.
struct NoPieces;

impl TokenPieces for NoPieces {
    fn piece(&self, _id: TokenId) -> Option<String> {
        None
    }
}

struct FnPieces<F>(F);

impl<F> TokenPieces for FnPieces<F>
where
    F: Fn(TokenId) -> Option<String> + Send + Sync,
{
    fn piece(&self, id: TokenId) -> Option<String> {
        (self.0)(id)
    }
}

impl AppState {
    /// `metrics` renders `/metrics` (from `allam_telemetry::install_prometheus`).
    pub fn new(router: Router, metrics: PrometheusHandle, config: HttpConfig) -> AppState {
        let info = router.model_info();
        AppState {
            inner: Arc::new(Inner {
                router,
                metrics,
                config,
                model_name: info.name,
                max_context: info.max_context,
                started_unix: unix_now(),
                pieces: Arc::new(NoPieces),
            }),
        }
    }

    /// Supplies the vocabulary lookup (token id → piece such as `▁Hello` or `<0xD8>`) that
    /// logprobs need to show token text, e.g. `move |id| tokenizer.id_to_token(id)`.
    /// Call before cloning the state.
    pub fn with_token_pieces<F>(self, pieces: F) -> AppState
    where
        F: Fn(TokenId) -> Option<String> + Send + Sync + 'static,
    {
        let mut inner = Arc::unwrap_or_clone(self.inner);
        inner.pieces = Arc::new(FnPieces(pieces));
        AppState {
            inner: Arc::new(inner),
        }
    }

    pub(crate) fn router(&self) -> &Router {
        &self.inner.router
    }

    pub(crate) fn config(&self) -> &HttpConfig {
        &self.inner.config
    }

    pub(crate) fn metrics(&self) -> &PrometheusHandle {
        &self.inner.metrics
    }

    pub(crate) fn model_name(&self) -> &str {
        &self.inner.model_name
    }

    pub(crate) fn max_context(&self) -> u32 {
        self.inner.max_context
    }

    pub(crate) fn started_unix(&self) -> u64 {
        self.inner.started_unix
    }

    pub(crate) fn pieces(&self) -> &dyn TokenPieces {
        self.inner.pieces.as_ref()
    }

    /// Checks `Authorization: Bearer <key>` against the router's keys (none = open).
    pub(crate) fn authorize(&self, headers: &HeaderMap) -> Result<(), Error> {
        let key = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim);
        self.inner.router.check_api_key(key).map_err(Error::from)
    }

    /// A request naming another model is 404 `model_not_found`; no model means ours.
    pub(crate) fn check_model(&self, requested: Option<&str>) -> Result<(), Error> {
        match requested {
            Some(requested) if requested != self.inner.model_name => Err(Error::ModelNotFound {
                requested: requested.to_owned(),
                served: self.inner.model_name.clone(),
            }),
            _ => Ok(()),
        }
    }
}

impl BodyLimit for AppState {
    fn max_body_bytes(&self) -> usize {
        self.inner.config.max_body_bytes
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}
