//! The gRPC path against a tonic `allam.v1.Generation` server with canned streams.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use allam_bench::{run, BenchConfig, Target, Workload};
use allam_proto::v1::generation_server::{Generation, GenerationServer};
use allam_proto::v1::{
    ChatChunk, ChatRequest, ChatResponse, FinishReason, GenerateChunk, GenerateRequest,
    GenerateResponse, ModelInfoRequest, ModelInfoResponse, SamplingParams, TokenizeRequest,
    TokenizeResponse, Usage,
};
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::{n_words, prompt_file, FIRST_TOKEN_DELAY_MS, TOKEN_GAP_MS};

const API_KEY: &str = "grpc-key";

type ChunkStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Default)]
struct Fake {
    n_chat: AtomicUsize,
    n_generate: AtomicUsize,
    /// Client addresses seen by `ChatStream`: one per pooled connection.
    chat_peers: Mutex<HashSet<SocketAddr>>,
}

/// The tonic service; the test keeps another `Arc` to read the counters.
struct Service(Arc<Fake>);

/// One canned stream item: sent after `delay_ms`.
enum Step {
    Chunk {
        delay_ms: u64,
        token_ids: Vec<u32>,
        text: &'static str,
        finish: Option<FinishReason>,
        usage: Option<Usage>,
    },
    Fail(Status),
}

fn token(delay_ms: u64, token_ids: Vec<u32>, text: &'static str) -> Step {
    Step::Chunk {
        delay_ms,
        token_ids,
        text,
        finish: None,
        usage: None,
    }
}

fn last(finish: FinishReason, usage: Usage) -> Step {
    Step::Chunk {
        delay_ms: 0,
        token_ids: Vec::new(),
        text: "",
        finish: Some(finish),
        usage: Some(usage),
    }
}

/// A normal answer of `n_tokens` tokens in chunks of up to two tokens (the router may batch
/// tokens), the first with empty text as when a multi-byte character is still incomplete.
fn answer(n_tokens: u32, prompt_tokens: u32) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut sent = 0;
    while sent < n_tokens {
        let in_chunk = (n_tokens - sent).min(2);
        let delay = if sent == 0 {
            FIRST_TOKEN_DELAY_MS
        } else {
            TOKEN_GAP_MS
        };
        let text = if sent == 0 { "" } else { "نص" };
        steps.push(token(delay, (sent..sent + in_chunk).collect(), text));
        sent += in_chunk;
    }
    let usage = Usage {
        prompt_tokens,
        completion_tokens: n_tokens,
        cached_tokens: 0,
    };
    steps.push(last(FinishReason::Length, usage));
    steps
}

fn stream<T: Send + 'static>(
    steps: Vec<Step>,
    make: fn(Vec<u32>, &'static str, Option<FinishReason>, Option<Usage>) -> T,
) -> ChunkStream<T> {
    futures::stream::iter(steps)
        .then(move |step| async move {
            match step {
                Step::Chunk {
                    delay_ms,
                    token_ids,
                    text,
                    finish,
                    usage,
                } => {
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                    Ok(make(token_ids, text, finish, usage))
                }
                Step::Fail(status) => Err(status),
            }
        })
        .boxed()
}

fn check<T>(request: &Request<T>, params: Option<&SamplingParams>) -> Result<u32, Status> {
    let expected = format!("Bearer {API_KEY}");
    let auth = request.metadata().get("authorization");
    if auth.and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return Err(Status::unauthenticated("missing API key"));
    }
    let params = params.ok_or_else(|| Status::invalid_argument("no params"))?;
    if params.seed.is_none() {
        return Err(Status::invalid_argument("no per-request seed"));
    }
    params
        .max_new_tokens
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| Status::invalid_argument("no max_new_tokens"))
}

#[tonic::async_trait]
impl Generation for Service {
    type ChatStreamStream = ChunkStream<ChatChunk>;
    type GenerateStreamStream = ChunkStream<GenerateChunk>;

    async fn chat(&self, _: Request<ChatRequest>) -> Result<Response<ChatResponse>, Status> {
        Err(Status::unimplemented("the benchmark only streams"))
    }

    async fn chat_stream(
        &self,
        request: Request<ChatRequest>,
    ) -> Result<Response<Self::ChatStreamStream>, Status> {
        self.0.n_chat.fetch_add(1, Ordering::SeqCst);
        if let Some(peer) = request.remote_addr() {
            self.0
                .chat_peers
                .lock()
                .expect("no panics hold it")
                .insert(peer);
        }
        let n_tokens = check(&request, request.get_ref().params.as_ref())?;
        let body = request.into_inner();
        if body.params.as_ref().and_then(|p| p.ignore_eos).is_some() {
            return Err(Status::invalid_argument(
                "chat benchmarks honour eos by default",
            ));
        }
        let prompt_tokens = body.messages.iter().map(|m| n_words(&m.content)).sum();
        let make = |token_ids, text: &str, finish_reason: Option<FinishReason>, usage| ChatChunk {
            index: 0,
            text: text.to_owned(),
            token_ids,
            finish_reason: finish_reason.map(i32::from),
            usage,
            ..Default::default()
        };
        Ok(Response::new(stream(answer(n_tokens, prompt_tokens), make)))
    }

    async fn generate(
        &self,
        _: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        Err(Status::unimplemented("the benchmark only streams"))
    }

    async fn generate_stream(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        self.0.n_generate.fetch_add(1, Ordering::SeqCst);
        let n_tokens = check(&request, request.get_ref().params.as_ref())?;
        let body = request.into_inner();
        let usage = Usage {
            prompt_tokens: 1,
            completion_tokens: 1,
            cached_tokens: 0,
        };
        let steps = match body.prompt.as_str() {
            "unavailable" => return Err(Status::unavailable("no worker group is serving")),
            "midstream" => vec![
                token(0, vec![7], "a"),
                Step::Fail(Status::internal("worker lost")),
            ],
            "no_finish" => vec![token(0, vec![7], "a")],
            "finish_error" => vec![token(0, vec![7], "a"), last(FinishReason::Error, usage)],
            prompt => {
                if body.params.as_ref().and_then(|p| p.ignore_eos) != Some(true) {
                    return Err(Status::invalid_argument("random prompts must ignore eos"));
                }
                // The fake tokenizer: three tokens per word, plus bos.
                answer(n_tokens, 3 * n_words(prompt) + 1)
            }
        };
        let make =
            |token_ids, text: &str, finish_reason: Option<FinishReason>, usage| GenerateChunk {
                index: 0,
                text: text.to_owned(),
                token_ids,
                finish_reason: finish_reason.map(i32::from),
                usage,
                ..Default::default()
            };
        Ok(Response::new(stream(steps, make)))
    }

    async fn tokenize(
        &self,
        request: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        let n_tokens = 3 * n_words(&request.get_ref().text) + 1;
        Ok(Response::new(TokenizeResponse {
            token_ids: (0..n_tokens).collect(),
        }))
    }

    async fn model_info(
        &self,
        _: Request<ModelInfoRequest>,
    ) -> Result<Response<ModelInfoResponse>, Status> {
        Err(Status::unimplemented("not needed by the benchmark"))
    }
}

async fn start(fake: Arc<Fake>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(GenerationServer::new(Service(fake)))
            .serve_with_incoming(incoming),
    );
    // A bare host:port: the client must assume plain-text HTTP/2.
    addr.to_string()
}

fn target(endpoint: String) -> Target {
    Target::Grpc {
        endpoint,
        api_key: Some(API_KEY.to_owned()),
    }
}

#[tokio::test]
async fn chat_streams_are_measured_over_a_connection_pool() {
    let fake = Arc::new(Fake::default());
    let endpoint = start(Arc::clone(&fake)).await;
    // All at once, more streams than one pooled connection carries.
    let mut config = BenchConfig::new(
        target(endpoint),
        Workload::Bilingual {
            output_len: 5,
            seed: 0,
        },
    );
    config.num_requests = 150;
    let report = run(config).await.expect("the run starts");

    assert_eq!(fake.n_chat.load(Ordering::SeqCst), 150);
    // 150 streams at 100 per connection: two connections.
    assert_eq!(fake.chat_peers.lock().expect("no panics hold it").len(), 2);
    assert_eq!((report.completed, report.failed), (150, 0), "{report:#?}");
    assert_eq!(report.total_output_tokens, 150 * 5);
    assert_eq!(report.requests_without_usage, 0);
    let ttft = report.ttft_ms.expect("TTFT samples");
    // The first chunk has token ids but no text yet: it still marks the first token.
    assert!(ttft.min >= FIRST_TOKEN_DELAY_MS as f64, "{ttft:?}");
    // Five tokens arrive in chunks of 2, 2 and 1: two gaps per request, per chunk.
    assert_eq!(report.itl_ms.expect("ITL samples").count, 150 * 2);
    let e2e = report.e2e_ms.expect("E2E samples");
    assert!(
        e2e.min >= (FIRST_TOKEN_DELAY_MS + 2 * TOKEN_GAP_MS) as f64,
        "{e2e:?}"
    );
    assert_eq!(report.backend, "grpc");
    assert!(report.peak_in_flight > 1);
}

#[tokio::test]
async fn random_prompts_use_generate_stream_with_calibrated_length() {
    let fake = Arc::new(Fake::default());
    let endpoint = start(Arc::clone(&fake)).await;
    let mut config = BenchConfig::new(
        target(endpoint),
        Workload::Random {
            input_len: 30,
            output_len: 4,
            seed: 5,
        },
    );
    config.num_requests = 6;
    config.request_rate = Some(500.0);
    config.max_concurrency = Some(2);
    let report = run(config).await.expect("the run starts");

    assert_eq!(fake.n_generate.load(Ordering::SeqCst), 6);
    assert_eq!(report.completed, 6, "{report:#?}");
    assert_eq!(report.random_tokens_per_word, Some(3.0));
    // 10 words at three tokens each, plus bos.
    assert_eq!(report.mean_input_tokens, Some(31.0));
    assert_eq!(report.total_output_tokens, 24);
    assert!(report.peak_in_flight <= 2);
}

#[tokio::test]
async fn grpc_failures_are_counted_by_code() {
    let endpoint = start(Arc::new(Fake::default())).await;
    let prompts = [
        "ok",
        "unavailable",
        "midstream",
        "no_finish",
        "finish_error",
    ];
    let file = prompt_file(&prompts);
    let mut config = BenchConfig::new(
        target(endpoint.clone()),
        Workload::Jsonl {
            path: file.path().to_owned(),
        },
    );
    config.num_requests = prompts.len();
    config.ignore_eos = true;
    let report = run(config).await.expect("the run starts");

    assert_eq!(report.completed, 1, "{report:#?}");
    let got: Vec<(&str, usize)> = report
        .errors
        .iter()
        .map(|(kind, count)| (kind.as_str(), *count))
        .collect();
    assert_eq!(
        got,
        vec![
            ("finish_error", 1),
            ("grpc_internal", 1),
            ("grpc_unavailable", 1),
            ("incomplete_stream", 1),
        ]
    );
    assert_eq!(
        report.error_examples["grpc_unavailable"],
        "no worker group is serving"
    );

    let mut unauthenticated = BenchConfig::new(
        Target::Grpc {
            endpoint,
            api_key: None,
        },
        Workload::Bilingual {
            output_len: 2,
            seed: 0,
        },
    );
    unauthenticated.num_requests = 2;
    let report = run(unauthenticated).await.expect("the run starts");
    assert_eq!(report.errors.get("grpc_unauthenticated"), Some(&2));
}
