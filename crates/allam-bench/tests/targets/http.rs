//! The OpenAI HTTP path against an axum server that streams canned SSE chunks.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use allam_bench::{run, BenchConfig, Target, Workload};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::{json, Value};

use crate::{n_words, prompt_file, FIRST_TOKEN_DELAY_MS, TOKEN_GAP_MS};

const API_KEY: &str = "test-key";

#[derive(Default)]
struct Fake {
    n_chat: AtomicUsize,
    n_completions: AtomicUsize,
    /// Every fourth chat request is refused with 429 when set.
    refuse_every_fourth_chat: bool,
}

fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "type": "test"}})),
    )
        .into_response()
}

/// SSE body: each `(delay_ms, data)` is sent after sleeping `delay_ms`.
fn sse(events: Vec<(u64, String)>) -> Response {
    let stream = futures::stream::iter(events).then(|(delay_ms, data)| async move {
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        Ok::<_, Infallible>(Bytes::from(format!("data: {data}\n\n")))
    });
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// Refuses requests that lack what every benchmark request must carry.
fn check_request(headers: &HeaderMap, body: &Value) -> Result<u64, (StatusCode, &'static str)> {
    let expected_auth = format!("Bearer {API_KEY}");
    if headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        != Some(&expected_auth)
    {
        return Err((StatusCode::UNAUTHORIZED, "missing API key"));
    }
    if body["stream"] != json!(true) || body["stream_options"]["include_usage"] != json!(true) {
        return Err((
            StatusCode::BAD_REQUEST,
            "not a streaming request with usage",
        ));
    }
    if !body["seed"].is_u64() {
        return Err((StatusCode::BAD_REQUEST, "no per-request seed"));
    }
    body["max_tokens"]
        .as_u64()
        .ok_or((StatusCode::BAD_REQUEST, "no max_tokens"))
}

/// A normal answer of `n_tokens` single-token chunks, then finish, usage and `[DONE]`.
fn answer(chat: bool, n_tokens: u64, prompt_tokens: u32) -> Vec<(u64, String)> {
    let token = |text: &str, finish: Value| {
        if chat {
            json!({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}], "usage": null})
        } else {
            json!({"choices": [{"index": 0, "text": text, "finish_reason": finish}], "usage": null})
        }
    };
    let mut events = Vec::new();
    if chat {
        // A role-only delta carries no token and must not count as the first token.
        let role = json!({"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": null}], "usage": null});
        events.push((0, role.to_string()));
    }
    for idx in 0..n_tokens {
        let delay = if idx == 0 {
            FIRST_TOKEN_DELAY_MS
        } else {
            TOKEN_GAP_MS
        };
        events.push((delay, token("كلمة ", Value::Null).to_string()));
    }
    events.push((0, token("", json!("length")).to_string()));
    let usage = json!({"choices": [], "usage": {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": n_tokens,
        "total_tokens": u64::from(prompt_tokens) + n_tokens,
    }});
    events.push((0, usage.to_string()));
    events.push((0, "[DONE]".to_owned()));
    events
}

async fn chat(
    State(fake): State<Arc<Fake>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let idx = fake.n_chat.fetch_add(1, Ordering::SeqCst);
    let n_tokens = match check_request(&headers, &body) {
        Ok(n_tokens) => n_tokens,
        Err((status, message)) => return error(status, message),
    };
    if body.get("ignore_eos").is_some() {
        return error(
            StatusCode::BAD_REQUEST,
            "chat benchmarks honour eos by default",
        );
    }
    if fake.refuse_every_fourth_chat && idx % 4 == 3 {
        return error(StatusCode::TOO_MANY_REQUESTS, "server busy");
    }
    let prompt_tokens: u32 = body["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| n_words(m["content"].as_str().unwrap_or("")))
        .sum();
    sse(answer(true, n_tokens, prompt_tokens))
}

async fn completions(
    State(fake): State<Arc<Fake>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    fake.n_completions.fetch_add(1, Ordering::SeqCst);
    let n_tokens = match check_request(&headers, &body) {
        Ok(n_tokens) => n_tokens,
        Err((status, message)) => return error(status, message),
    };
    let prompt = body["prompt"].as_str().unwrap_or("").to_owned();
    let one_token =
        json!({"choices": [{"index": 0, "text": "x", "finish_reason": null}]}).to_string();
    match prompt.as_str() {
        "status_429" => error(StatusCode::TOO_MANY_REQUESTS, "server busy"),
        // One token, then the connection ends without `[DONE]`.
        "truncate" => sse(vec![(0, one_token)]),
        "error_event" => sse(vec![
            (0, one_token),
            (
                0,
                json!({"error": {"message": "engine failed"}}).to_string(),
            ),
        ]),
        "bad_json" => sse(vec![(0, "{not json".to_owned())]),
        "slow" => sse(vec![(30_000, one_token)]),
        _ => {
            if body["ignore_eos"] != json!(true) {
                return error(StatusCode::BAD_REQUEST, "random prompts must ignore eos");
            }
            // The fake tokenizer: two tokens per word, plus bos.
            sse(answer(false, n_tokens, 2 * n_words(&prompt) + 1))
        }
    }
}

async fn tokenize(Json(body): Json<Value>) -> Json<Value> {
    let words = n_words(body["prompt"].as_str().unwrap_or(""));
    Json(json!({"count": 2 * words + 1, "tokens": [], "max_model_len": 4096}))
}

async fn start(fake: Arc<Fake>) -> String {
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/tokenize", post(tokenize))
        .with_state(fake);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

fn target(base_url: String) -> Target {
    Target::OpenAiHttp {
        base_url,
        model: None,
        api_key: Some(API_KEY.to_owned()),
    }
}

#[tokio::test]
async fn bilingual_chat_streams_are_measured() {
    let fake = Arc::new(Fake {
        refuse_every_fourth_chat: true,
        ..Fake::default()
    });
    let base_url = start(Arc::clone(&fake)).await;
    let mut config = BenchConfig::new(
        target(format!("{base_url}/v1")),
        Workload::Bilingual {
            output_len: 5,
            seed: 3,
        },
    );
    config.num_requests = 12;
    config.max_concurrency = Some(4);
    config.request_rate = Some(200.0);
    let report = run(config).await.expect("the run starts");

    assert_eq!(fake.n_chat.load(Ordering::SeqCst), 12);
    assert_eq!((report.completed, report.failed), (9, 3), "{report:#?}");
    assert_eq!(report.errors.get("http_429"), Some(&3));
    assert_eq!(report.error_examples["http_429"], "server busy");
    assert_eq!(report.total_output_tokens, 9 * 5);
    assert_eq!(report.requests_without_usage, 0);
    assert!(report.peak_in_flight >= 1 && report.peak_in_flight <= 4);
    let ttft = report.ttft_ms.expect("TTFT samples");
    assert_eq!(ttft.count, 9);
    assert!(ttft.min >= FIRST_TOKEN_DELAY_MS as f64, "{ttft:?}");
    // Five single-token chunks give four gaps per request.
    assert_eq!(report.itl_ms.expect("ITL samples").count, 9 * 4);
    assert_eq!(report.tpot_ms.expect("TPOT samples").count, 9);
    let e2e = report.e2e_ms.expect("E2E samples");
    assert!(
        e2e.min >= (FIRST_TOKEN_DELAY_MS + 4 * TOKEN_GAP_MS) as f64,
        "{e2e:?}"
    );
    assert!(report.duration_s > 0.0);
    let expected_rate = report.total_output_tokens as f64 / report.duration_s;
    assert!((report.output_token_throughput - expected_rate).abs() < 1e-9);
    assert_eq!(report.backend, "openai");
    assert_eq!(report.dataset, "bilingual");
}

#[tokio::test]
async fn random_prompts_are_calibrated_on_the_servers_tokenizer() {
    let fake = Arc::new(Fake::default());
    let base_url = start(Arc::clone(&fake)).await;
    let mut config = BenchConfig::new(
        target(base_url),
        Workload::Random {
            input_len: 32,
            output_len: 3,
            seed: 1,
        },
    );
    config.num_requests = 4;
    let report = run(config).await.expect("the run starts");

    assert_eq!(fake.n_completions.load(Ordering::SeqCst), 4);
    assert_eq!(report.completed, 4, "{report:#?}");
    assert_eq!(report.random_tokens_per_word, Some(2.0));
    // 16 words at two tokens each, plus bos, as the fake server counts them.
    assert_eq!(report.mean_input_tokens, Some(33.0));
    assert_eq!(report.total_output_tokens, 12);
    assert_eq!(report.dataset, "random");
}

#[tokio::test]
async fn failures_are_counted_by_kind() {
    let fake = Arc::new(Fake::default());
    let base_url = start(fake).await;
    let prompts = [
        "ok words here",
        "status_429",
        "truncate",
        "error_event",
        "bad_json",
        "slow",
    ];
    let file = prompt_file(&prompts);
    let mut config = BenchConfig::new(
        target(base_url),
        Workload::Jsonl {
            path: file.path().to_owned(),
        },
    );
    config.num_requests = prompts.len();
    config.ignore_eos = true;
    config.timeout = Duration::from_millis(500);
    let report = run(config).await.expect("the run starts");

    assert_eq!(report.completed, 1, "{report:#?}");
    let expected = [
        ("http_429", 1),
        ("incomplete_stream", 1),
        ("stream_error", 1),
        ("protocol", 1),
        ("timeout", 1),
    ];
    let got: Vec<(&str, usize)> = report
        .errors
        .iter()
        .map(|(kind, count)| (kind.as_str(), *count))
        .collect();
    let mut expected = expected.to_vec();
    expected.sort();
    assert_eq!(got, expected);
    assert_eq!(report.error_examples["stream_error"], "engine failed");
    let table = report.to_table();
    assert!(table.contains("Errors timeout:"), "{table}");
}

#[tokio::test]
async fn wrong_api_key_fails_every_request_with_401() {
    let base_url = start(Arc::new(Fake::default())).await;
    let mut config = BenchConfig::new(
        Target::OpenAiHttp {
            base_url,
            model: Some("allam".into()),
            api_key: Some("wrong".into()),
        },
        Workload::Bilingual {
            output_len: 2,
            seed: 0,
        },
    );
    config.num_requests = 3;
    let report = run(config).await.expect("the run starts");
    assert_eq!(report.errors.get("http_401"), Some(&3), "{report:#?}");
    assert!(report.ttft_ms.is_none());
}
