//! The worker's gRPC service over a real engine (tiny-allam fixture on the CPU backend),
//! driven through the generated client as a router would.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use allam_backend_cpu::{CpuBackend, CpuBackendConfig};
use allam_engine::{Engine, EngineConfig, EngineHandle};
use allam_model::{LoadOptions, Model, ProgressMode};
use allam_proto::v1 as pb;
use allam_proto::worker::v1 as wpb;
use allam_proto::worker::v1::worker_client::WorkerClient;
use allam_proto::worker::v1::worker_event::Event;
use allam_request::Limits;
use allam_tokenizer::Tokenizer;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::Code;

fn fixtures() -> PathBuf {
    let dir = std::env::var_os("ALLAM_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures")
        });
    assert!(
        dir.join("tiny-allam/config.json").is_file(),
        "test fixtures not found at {} (set ALLAM_FIXTURES)",
        dir.display()
    );
    dir
}

struct Worker {
    engine: EngineHandle,
    client: WorkerClient<Channel>,
    tokenizer: Tokenizer,
    stop: CancellationToken,
    served: tokio::task::JoinHandle<Result<(), allam_worker::Error>>,
    channel: Channel,
}

async fn start_worker() -> Worker {
    let dir = fixtures().join("tiny-allam");
    let tokenizer = Tokenizer::from_dir(&dir).expect("fixture tokenizer");
    let mut backend = CpuBackend::new(&CpuBackendConfig {
        threads: Some(1),
        kv_cache_budget_bytes: 64 << 20,
    })
    .expect("cpu backend");
    let options = LoadOptions {
        progress: ProgressMode::Never,
        ..LoadOptions::default()
    };
    let model = Model::load(&dir, &mut backend, &options).expect("load tiny-allam");
    let engine = Engine::start(
        model,
        Box::new(backend),
        tokenizer.clone(),
        EngineConfig {
            num_blocks: Some(64),
            max_waiting: 8,
            ..EngineConfig::default()
        },
    )
    .expect("engine");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let service = allam_worker::WorkerService::new(
        engine.clone(),
        tokenizer.clone(),
        Limits::for_context(4096),
    )
    .with_model_name("tiny-allam")
    .with_tp(1);
    let served = tokio::spawn(service.serve(listener, stop.clone()));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    Worker {
        engine,
        client: WorkerClient::new(channel.clone()),
        tokenizer,
        stop,
        served,
        channel,
    }
}

fn request(prompt: Vec<u32>, params: pb::SamplingParams) -> wpb::WorkerGenerateRequest {
    wpb::WorkerGenerateRequest {
        prompt_token_ids: prompt,
        params: Some(params),
        request_id: "test".into(),
    }
}

fn greedy(max_new_tokens: i64) -> pb::SamplingParams {
    pb::SamplingParams {
        do_sample: Some(false),
        max_new_tokens: Some(max_new_tokens),
        ignore_eos: Some(true),
        ..Default::default()
    }
}

async fn collect(stream: &mut tonic::Streaming<wpb::WorkerEvent>) -> Vec<Event> {
    let mut events = Vec::new();
    while let Some(event) = stream.message().await.expect("event") {
        events.push(event.event.expect("payload"));
    }
    events
}

/// Polls `cond` against a deadline (readiness polling, not a sleep as synchronization).
async fn eventually(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_generation_matches_the_transformers_golden() {
    let mut worker = start_worker().await;
    let goldens: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tiny-allam/goldens.json")).expect("goldens"),
    )
    .expect("goldens json");
    let case = &goldens["cases"][0];
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| u32::try_from(x.as_u64().expect("id")).expect("u32"))
            .collect()
    };
    let prompt = ids(&case["input_ids"]);
    let expected = ids(&case["greedy"]["ids"]);

    let mut stream = worker
        .client
        .generate(request(prompt.clone(), greedy(expected.len() as i64)))
        .await
        .expect("accepted")
        .into_inner();
    let events = collect(&mut stream).await;
    assert!(
        matches!(&events[0], Event::Started(s) if s.prompt_token_ids == prompt),
        "{:?}",
        events[0]
    );
    let streamed: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            Event::Delta(d) => Some(d.token_ids.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(streamed, expected, "case {}", case["id"]);
    let Some(Event::SequenceEnd(end)) = events.iter().rev().nth(1) else {
        panic!("no sequence end before the last event: {events:?}");
    };
    assert_eq!(end.token_ids, expected);
    assert_eq!(end.finish_reason, pb::FinishReason::Length as i32);
    let Some(Event::Finished(finished)) = events.last() else {
        panic!("last event is not Finished: {events:?}");
    };
    let usage = finished.usage.expect("usage");
    assert_eq!(usage.completion_tokens as usize, expected.len());
    assert_eq!(usage.prompt_tokens as usize, prompt.len());
    worker.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_are_rejected_naming_the_field() {
    let mut worker = start_worker().await;
    let prompt = worker.tokenizer.encode("مرحبا", true).expect("encode");
    let params = pb::SamplingParams {
        top_p: Some(1.5),
        ..Default::default()
    };
    let status = worker
        .client
        .generate(request(prompt, params))
        .await
        .expect_err("top_p 1.5");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("`top_p`"), "{}", status.message());

    let status = worker
        .client
        .generate(request(vec![1, 5000], greedy(4)))
        .await
        .expect_err("id outside the vocabulary");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("`prompt[1]`"),
        "{}",
        status.message()
    );

    // Fits the context but not this engine's 64-block KV cache.
    let status = worker
        .client
        .generate(request(vec![1, 300, 301], greedy(2000)))
        .await
        .expect_err("needs more KV than the cache has");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("`max_new_tokens`"),
        "{}",
        status.message()
    );
    worker.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_call_cancels_in_the_engine() {
    let mut worker = start_worker().await;
    let prompt = worker
        .tokenizer
        .encode("Tell me a long story", true)
        .expect("encode");
    let mut stream = worker
        .client
        .generate(request(prompt, greedy(900)))
        .await
        .expect("accepted")
        .into_inner();
    loop {
        match stream.message().await.expect("event").and_then(|e| e.event) {
            Some(Event::Delta(_)) => break,
            Some(Event::Started(_)) => continue,
            other => panic!("expected a delta, got {other:?}"),
        }
    }
    assert_eq!(worker.engine.stats().running, 1);
    drop(stream);
    let engine = worker.engine.clone();
    eventually(
        "the engine frees the cancelled sequence",
        Duration::from_secs(10),
        || {
            let stats = engine.stats();
            stats.running == 0 && stats.waiting == 0 && stats.kv_blocks_used == 0
        },
    )
    .await;
    worker.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_ends_the_stream_and_frees_the_engine() {
    let mut worker = start_worker().await;
    let prompt = worker.tokenizer.encode("Hello", true).expect("encode");
    let mut call = tonic::Request::new(request(prompt, greedy(1000)));
    call.set_timeout(Duration::from_millis(50));
    let status = match worker.client.generate(call).await {
        Err(status) => status,
        Ok(response) => {
            let mut stream = response.into_inner();
            loop {
                match stream.message().await {
                    Ok(Some(wpb::WorkerEvent {
                        event: Some(Event::Finished(_)),
                    })) => panic!("1000 tokens finished within 50 ms"),
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("stream ended without a status"),
                    Err(status) => break status,
                }
            }
        }
    };
    // tonic's own server timeout may answer first (CANCELLED) if it fires before our stream
    // starts; once streaming, the worker answers DEADLINE_EXCEEDED itself.
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    let engine = worker.engine.clone();
    eventually(
        "the engine frees the timed-out sequence",
        Duration::from_secs(10),
        || {
            let stats = engine.stats();
            stats.running == 0 && stats.waiting == 0
        },
    )
    .await;
    worker.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_reports_the_prefix_cache_with_the_routers_hashes() {
    let mut worker = start_worker().await;
    let prompt: Vec<u32> = std::iter::once(1).chain(300..340).collect(); // 41 tokens: 2 full blocks
    let mut stream = worker
        .client
        .generate(request(prompt.clone(), greedy(4)))
        .await
        .expect("accepted")
        .into_inner();
    collect(&mut stream).await;

    let expected = allam_types::prefix_hash::prefix_block_hashes(&prompt, 16);
    assert_eq!(expected.len(), 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    let report = loop {
        let report = worker
            .client
            .load(wpb::LoadRequest {
                max_cached_hashes: 1024,
            })
            .await
            .expect("load")
            .into_inner();
        if expected
            .iter()
            .all(|h| report.cached_block_hashes.contains(h))
        {
            break report;
        }
        assert!(
            Instant::now() < deadline,
            "prompt blocks never reported as cached: {report:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(report.kv_blocks_total, 64);
    assert_eq!(report.block_size, 16);
    assert_eq!(report.vocab_size, 4000);
    assert_eq!(report.max_context, 4096);
    assert_eq!(report.model_name, "tiny-allam");
    assert_eq!(report.running, 0);

    let none = worker
        .client
        .load(wpb::LoadRequest {
            max_cached_hashes: 0,
        })
        .await
        .expect("load")
        .into_inner();
    assert!(none.cached_block_hashes.is_empty());
    worker.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_running_requests_finish_then_returns() {
    let mut worker = start_worker().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(worker.channel.clone());
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: allam_proto::WORKER_SERVICE_NAME.into(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        serving.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let prompt = worker
        .tokenizer
        .encode("Hello there", true)
        .expect("encode");
    let mut stream = worker
        .client
        .generate(request(prompt, greedy(64)))
        .await
        .expect("accepted")
        .into_inner();
    match stream.message().await.expect("event").and_then(|e| e.event) {
        Some(Event::Started(_)) => {}
        other => panic!("expected Started, got {other:?}"),
    }
    // `Started` means admitted, not scheduled: a drain fails still-waiting requests as
    // retryable by design. Wait for the first token, so the request is surely running.
    let first = stream.message().await.expect("event").and_then(|e| e.event);
    assert!(
        !matches!(
            first,
            Some(Event::Finished(_)) | Some(Event::Failed(_)) | None
        ),
        "expected a token, got {first:?}"
    );
    worker.stop.cancel();
    let events = collect(&mut stream).await;
    assert!(
        matches!(events.last(), Some(Event::Finished(_))),
        "the running request was cut short: {:?}",
        events.last()
    );
    let served = tokio::time::timeout(Duration::from_secs(10), worker.served)
        .await
        .expect("serve_worker returns after its streams end")
        .expect("task");
    assert!(served.is_ok(), "{served:?}");
    // Admission is closed: the engine was drained.
    let prompt = worker.tokenizer.encode("again", true).expect("encode");
    let refused = allam_request::validate(
        allam_request::RawRequest {
            input: allam_request::PromptInput::TokenIds(prompt),
            params: allam_request::RawSamplingParams::default(),
            model: None,
        },
        &Limits::default(),
        &worker.tokenizer,
    )
    .map(|valid| worker.engine.submit(valid));
    assert!(
        matches!(refused, Ok(Err(allam_engine::Error::Stopped))),
        "{refused:?}"
    );
}
