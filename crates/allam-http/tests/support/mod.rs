//! Test harness for allam-http's crate tests: the real `Router` over the fixtures' tokenizer,
//! with no worker (every front-side check and error path) or with one in-process worker
//! running the tiny fixture model on the CPU backend (generation end to end). Requests go
//! through `app(state).oneshot(...)`, the crate's public boundary.
//!
//! Fixtures come from `ALLAM_FIXTURES` or `<workspace>/../shared/fixtures`; a missing
//! directory fails the test with the path it looked at.

#![allow(dead_code)] // Each test binary uses a different part of the harness.

use std::path::PathBuf;

use allam_http::{app, AppState, HttpConfig};
use allam_router::{Membership, Router, RouterConfig};
use allam_tokenizer::Tokenizer;
use axum::body::{to_bytes, Body, Bytes};
use axum::http::{Request, StatusCode};
use serde_json::Value;
use tower::ServiceExt as _;

pub const MODEL_NAME: &str = "tiny-allam";

pub fn fixtures_dir() -> PathBuf {
    let dir = std::env::var_os("ALLAM_FIXTURES").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures"),
        PathBuf::from,
    );
    assert!(
        dir.join("tiny-allam/config.json").is_file(),
        "test fixtures not found at {} (set ALLAM_FIXTURES)",
        dir.display()
    );
    dir
}

pub fn model_dir() -> PathBuf {
    fixtures_dir().join("tiny-allam")
}

pub fn tokenizer() -> Tokenizer {
    let dir = model_dir();
    Tokenizer::from_dir(&dir).unwrap_or_else(|err| panic!("tokenizer in {}: {err}", dir.display()))
}

/// `tiny-allam/goldens.json` case `id` (see the fixtures README, section 3).
pub fn golden_case(id: &str) -> Value {
    let path = model_dir().join("goldens.json");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    let goldens: Value = serde_json::from_str(&text).expect("goldens.json is JSON");
    goldens["cases"]
        .as_array()
        .and_then(|cases| cases.iter().find(|case| case["id"] == id))
        .cloned()
        .unwrap_or_else(|| panic!("no golden case `{id}`"))
}

pub fn router_config(api_keys: &[&str]) -> RouterConfig {
    let mut config = RouterConfig::new(MODEL_NAME, tokenizer(), allam_request::Limits::default());
    config.api_keys = api_keys.iter().map(|key| (*key).to_owned()).collect();
    config
}

/// The HTTP state over `router`, with the vocabulary lookup logprobs need.
pub fn http_state(router: Router, config: HttpConfig) -> AppState {
    let metrics = allam_telemetry::install_prometheus().expect("prometheus recorder");
    let tokenizer = tokenizer();
    AppState::new(router, metrics, config).with_token_pieces(move |id| tokenizer.id_to_token(id))
}

pub fn http_app(router: Router, config: HttpConfig) -> axum::Router {
    app(http_state(router, config))
}

/// A router that knows no worker group: requests get as far as validation and routing.
pub async fn app_without_workers(config: HttpConfig, api_keys: &[&str]) -> axum::Router {
    let router = Router::new(router_config(api_keys), Membership::Static(Vec::new()))
        .await
        .expect("router without workers");
    http_app(router, config)
}

/// One HTTP exchange's result.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: String,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "body is not JSON ({err}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `data:` payloads of an SSE body, in order (comments and blank lines skipped).
    pub fn sse_data(&self) -> Vec<String> {
        assert!(
            self.content_type.starts_with("text/event-stream"),
            "not an SSE response: {} {}",
            self.content_type,
            self.text()
        );
        self.text()
            .lines()
            .filter_map(|line| {
                line.strip_prefix("data: ")
                    .or_else(|| line.strip_prefix("data:"))
            })
            .map(str::to_owned)
            .collect()
    }

    /// The JSON chunks of an SSE body, checking it ends with exactly one `[DONE]`.
    pub fn sse_chunks(&self) -> Vec<Value> {
        let mut data = self.sse_data();
        assert_eq!(
            data.pop().as_deref(),
            Some("[DONE]"),
            "stream must end with [DONE]"
        );
        data.iter()
            .map(|payload| {
                serde_json::from_str(payload).unwrap_or_else(|err| panic!("{err}: {payload}"))
            })
            .collect()
    }

    /// Asserts OpenAI's error object with this status, `code` and `param`; returns the message.
    pub fn expect_error(&self, status: u16, code: &str, param: Option<&str>) -> String {
        assert_eq!(self.status.as_u16(), status, "{}", self.text());
        let body = self.json();
        let error = &body["error"];
        assert_eq!(error["code"], code, "{body}");
        assert_eq!(error["param"].as_str(), param, "{body}");
        assert!(error["type"].is_string(), "{body}");
        error["message"]
            .as_str()
            .expect("message is a string")
            .to_owned()
    }
}

pub async fn send(app: &axum::Router, request: Request<Body>) -> Reply {
    let response = app
        .clone()
        .oneshot(request)
        .await
        .expect("the router is infallible");
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    Reply {
        status,
        content_type,
        body,
    }
}

pub async fn post(app: &axum::Router, uri: &str, body: impl Into<Body>) -> Reply {
    post_with(app, uri, body, &[]).await
}

pub async fn post_with(
    app: &axum::Router,
    uri: &str,
    body: impl Into<Body>,
    headers: &[(&str, &str)],
) -> Reply {
    let mut request = Request::post(uri).header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    send(app, request.body(body.into()).expect("request")).await
}

pub async fn get(app: &axum::Router, uri: &str) -> Reply {
    send(app, Request::get(uri).body(Body::empty()).expect("request")).await
}

/// A router over one in-process worker group serving the tiny fixture model on the CPU
/// backend. Dropping it stops the worker's gRPC server and joins the engine thread.
pub struct WorkerApp {
    pub app: axum::Router,
    pub router: Router,
    engine: allam_engine::EngineHandle,
    shutdown: tokio_util::sync::CancellationToken,
}

impl WorkerApp {
    pub fn engine_stats(&self) -> allam_engine::EngineStats {
        self.engine.stats()
    }
}

impl Drop for WorkerApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        // Joins the engine thread after at most one step (a few ms on the tiny model).
        self.engine.shutdown();
    }
}

/// KV cache of the test engine: 64 MiB is thousands of blocks of the tiny model.
const TEST_KV_CACHE_BYTES: usize = 64 << 20;

pub async fn app_with_worker(config: HttpConfig) -> WorkerApp {
    use allam_backend_cpu::{CpuBackend, CpuBackendConfig};
    use allam_model::{LoadOptions, Model, ProgressMode};

    let tokenizer = tokenizer();
    let mut backend: Box<dyn allam_backend::Backend> = Box::new(
        CpuBackend::new(&CpuBackendConfig {
            threads: Some(2),
            kv_cache_budget_bytes: TEST_KV_CACHE_BYTES as u64,
        })
        .expect("CPU backend"),
    );
    let options = LoadOptions {
        progress: ProgressMode::Never,
        ..LoadOptions::default()
    };
    let model = Model::load(&model_dir(), backend.as_mut(), &options).expect("tiny-allam loads");
    let engine_config = allam_engine::EngineConfig {
        kv_cache_bytes: Some(TEST_KV_CACHE_BYTES),
        ..allam_engine::EngineConfig::default()
    };
    let engine = allam_engine::Engine::start(model, backend, tokenizer.clone(), engine_config)
        .expect("engine starts");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("bound address");
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(allam_worker::serve_worker(
        engine.clone(),
        tokenizer,
        allam_request::Limits::default(),
        listener,
        shutdown.clone(),
    ));
    let group = allam_membership::WorkerGroupInfo {
        group: "test-group".to_owned(),
        grpc_addr: format!("http://{addr}"),
        tp: 1,
        model: MODEL_NAME.to_owned(),
        started_at_ms: 1,
    };
    let router = Router::new(router_config(&[]), Membership::Static(vec![group]))
        .await
        .expect("router");
    let mut ready = router.ready_watch();
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        ready.wait_for(|ready| *ready),
    )
    .await
    .expect("the worker group became ready within 30 s")
    .expect("router alive");
    WorkerApp {
        app: http_app(router.clone(), config),
        router,
        engine,
        shutdown,
    }
}

/// Sum of the samples of `name` in Prometheus text whose labels include all of `labels`
/// (0 when there is none, as for a counter never incremented).
pub fn prometheus_sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((series_name, rest)) => (series_name, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if series_name != name {
                return None;
            }
            let all_match = labels.iter().all(|(key, value)| {
                series_labels
                    .split(',')
                    .any(|pair| pair == format!("{key}=\"{value}\""))
            });
            all_match.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}
