//! Router overhead per streamed token: greedy requests (tiny-allam fixture on the CPU backend,
//! `NEW_TOKENS` tokens, `ignore_eos`) streamed (a) straight from an in-process worker over its
//! internal `allam.worker.v1` gRPC API and (b) through a [`Router`] with a static membership
//! over the public `allam.v1` gRPC API (router + one more gRPC hop), in one process and run.
//!
//! Two measurements, both recording each token's arrival time at the client:
//! - *Sequential*: A/B-alternating runs, one request at a time. Reports inter-token arrival
//!   time (ITL) p50/p90 of each path, p50/p90 of the per-token difference (router ITL −
//!   direct ITL, runs paired in order, token by token), the ITL p50 ratio and time to first
//!   token. Engine step jitter lands in the difference, so it resolves a few hundred µs at best.
//! - *Same step*: a direct request and a routed request with the same prompt decode in the same
//!   engine steps (the routed one starts once the direct one streams, and the direct one runs
//!   `SLACK_TOKENS` longer). A step hands both their token at the same instant, so for each
//!   routed token the arrival gap to the direct token of the same step is the router path's
//!   added latency, free of engine jitter. Steps are matched by the most common offset between
//!   a routed token and the latest direct token before it, which is exact while the overhead
//!   stays below one engine step (the step time is printed alongside).
//!
//! Goal (issue 6): added latency per token, p50 ≤ 50 µs. Prints Markdown table rows.
//!
//! Run: `cargo bench -p allam-router --bench router_overhead` (needs the fixtures, see
//! `ALLAM_FIXTURES`; `ROUTER_OVERHEAD_RUNS` sets the measured runs per mode, default 40).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use allam_backend_cpu::{CpuBackend, CpuBackendConfig};
use allam_engine::{Engine, EngineConfig};
use allam_membership::WorkerGroupInfo;
use allam_model::{LoadOptions, Model, ProgressMode};
use allam_proto::v1 as pb;
use allam_proto::v1::generation_client::GenerationClient;
use allam_proto::worker::v1 as wpb;
use allam_proto::worker::v1::worker_client::WorkerClient;
use allam_request::{Limits, PromptInput, RawRequest, RawSamplingParams};
use allam_router::{Membership, Router, RouterConfig};
use allam_tokenizer::Tokenizer;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const NEW_TOKENS: i64 = 64;
/// Extra tokens of the direct request in same-step runs, so it covers the routed one's steps.
const SLACK_TOKENS: i64 = 64;
const WARMUP_RUNS: usize = 3;
const DEFAULT_RUNS: usize = 40;
const PROMPT: &str =
    "How do I prepare a cup of tea? Explain each step, from boiling the water to serving.";
const MAX_CONTEXT: u32 = 4096;

fn fixtures_dir() -> PathBuf {
    match std::env::var_os("ALLAM_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures"),
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

/// Arrival instant of every generated token of one request, and when it was sent.
struct Run {
    sent: Instant,
    arrivals: Vec<Instant>,
}

impl Run {
    fn ttft(&self) -> Duration {
        self.arrivals[0] - self.sent
    }

    /// Inter-token arrival times, in microseconds (token 1 onwards).
    fn itl_us(&self) -> Vec<f64> {
        self.arrivals
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs_f64() * 1e6)
            .collect()
    }
}

/// A request straight to the worker; `first_token` (if any) is told when the first token came.
async fn direct(
    mut client: WorkerClient<Channel>,
    prompt: Vec<u32>,
    max_new_tokens: i64,
    mut first_token: Option<tokio::sync::oneshot::Sender<()>>,
) -> Run {
    let request = wpb::WorkerGenerateRequest {
        prompt_token_ids: prompt,
        params: Some(greedy(max_new_tokens)),
        request_id: "bench".to_owned(),
    };
    let sent = Instant::now();
    let mut stream = client
        .generate(request)
        .await
        .expect("worker accepts the request")
        .into_inner();
    let mut arrivals = Vec::with_capacity(NEW_TOKENS as usize);
    while let Some(event) = stream.message().await.expect("worker stream") {
        let now = Instant::now();
        match event.event {
            Some(wpb::worker_event::Event::Delta(delta)) => {
                arrivals.extend(delta.token_ids.iter().map(|_| now));
                if let Some(tell) = first_token.take() {
                    let _ = tell.send(());
                }
            }
            Some(wpb::worker_event::Event::Failed(failed)) => {
                panic!("worker failed the request: {failed:?}")
            }
            _ => {}
        }
    }
    Run { sent, arrivals }
}

async fn routed(mut client: GenerationClient<Channel>) -> Run {
    let request = pb::GenerateRequest {
        prompt: PROMPT.to_owned(),
        params: Some(greedy(NEW_TOKENS)),
        model: None,
    };
    let sent = Instant::now();
    let mut stream = client
        .generate_stream(request)
        .await
        .expect("router accepts the request")
        .into_inner();
    let mut arrivals = Vec::with_capacity(NEW_TOKENS as usize);
    while let Some(chunk) = stream.message().await.expect("router stream") {
        let now = Instant::now();
        arrivals.extend(chunk.token_ids.iter().map(|_| now));
    }
    Run { sent, arrivals }
}

/// Added latency (µs) of each routed token over the direct token of the same engine step
/// (see the module doc); `None` when no step offset can be found.
fn same_step_delays(direct: &Run, routed: &Run) -> Option<Vec<f64>> {
    // For each routed token: offset from its index to the latest direct token before it.
    let mut offsets: Vec<isize> = routed
        .arrivals
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let before = direct.arrivals.partition_point(|d| d <= r);
            (before > 0).then(|| (before - 1) as isize - i as isize)
        })
        .collect();
    offsets.sort_unstable();
    let offset = offsets
        .chunk_by(|a, b| a == b)
        .max_by_key(|run| run.len())
        .map(|run| run[0])?;
    let delays = routed
        .arrivals
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let d = direct
                .arrivals
                .get(usize::try_from(i as isize + offset).ok()?)?;
            Some(if r >= d {
                (*r - *d).as_secs_f64() * 1e6
            } else {
                -((*d - *r).as_secs_f64() * 1e6)
            })
        })
        .collect();
    Some(delays)
}

/// Nearest-rank percentile of `values` (sorted in place); NaN when empty.
fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

fn main() {
    let runs: usize = std::env::var("ROUTER_OVERHEAD_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_RUNS)
        .max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(bench(runs));
}

async fn bench(runs: usize) {
    let dir = fixtures_dir().join("tiny-allam");
    let tokenizer = Tokenizer::from_dir(&dir).expect("fixture tokenizer (set ALLAM_FIXTURES)");
    let limits = Limits::for_context(MAX_CONTEXT);

    // The worker: engine thread + internal gRPC service on loopback.
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
            num_blocks: Some(256),
            ..EngineConfig::default()
        },
    )
    .expect("engine");
    let stop = CancellationToken::new();
    let worker_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind worker");
    let worker_addr = worker_listener.local_addr().expect("worker addr");
    let worker_task = tokio::spawn(allam_worker::serve_worker(
        engine.clone(),
        tokenizer.clone(),
        limits.clone(),
        worker_listener,
        stop.clone(),
    ));

    // The router in front of it, serving the public gRPC API.
    let router = Router::new(
        RouterConfig::new("tiny-allam", tokenizer.clone(), limits.clone()),
        Membership::Static(vec![WorkerGroupInfo {
            group: "bench".to_owned(),
            grpc_addr: format!("http://{worker_addr}"),
            tp: 1,
            model: "tiny-allam".to_owned(),
            started_at_ms: 0,
        }]),
    )
    .await
    .expect("router");
    let mut ready = router.ready_watch();
    tokio::time::timeout(Duration::from_secs(30), ready.wait_for(|r| *r))
        .await
        .expect("router ready within 30 s")
        .expect("router alive");
    let router_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind router");
    let router_addr = router_listener.local_addr().expect("router addr");
    let router_task = tokio::spawn(allam_router::serve_grpc(
        router,
        router_listener,
        stop.clone(),
        None,
    ));

    let connect = |addr: std::net::SocketAddr| async move {
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint url")
            .tcp_nodelay(true)
            .connect()
            .await
            .expect("connect")
    };
    let worker_client = WorkerClient::new(connect(worker_addr).await);
    let router_client = GenerationClient::new(connect(router_addr).await);

    // The exact token ids the router sends for PROMPT (same validation, same tokenizer).
    let raw = RawRequest {
        input: PromptInput::Text(PROMPT.to_owned()),
        params: RawSamplingParams::default(),
        model: None,
    };
    let prompt = allam_request::validate(raw, &limits, &tokenizer)
        .expect("valid prompt")
        .prompt_token_ids()
        .to_vec();

    let worker = || worker_client.clone();
    let router = || router_client.clone();
    for _ in 0..WARMUP_RUNS {
        direct(worker(), prompt.clone(), NEW_TOKENS, None).await;
        routed(router()).await;
    }

    // Sequential: one request at a time, alternating A-B / B-A so neither path always runs
    // right after the other.
    let mut direct_runs = Vec::with_capacity(runs);
    let mut routed_runs = Vec::with_capacity(runs);
    for i in 0..runs {
        if i % 2 == 0 {
            direct_runs.push(direct(worker(), prompt.clone(), NEW_TOKENS, None).await);
            routed_runs.push(routed(router()).await);
        } else {
            routed_runs.push(routed(router()).await);
            direct_runs.push(direct(worker(), prompt.clone(), NEW_TOKENS, None).await);
        }
    }

    // Same step: the routed request joins the steps of a streaming direct one.
    let mut same_step = Vec::with_capacity(runs * NEW_TOKENS as usize);
    let mut step_us = Vec::new();
    let mut unmatched = 0usize;
    for _ in 0..runs {
        let (tell, streaming) = tokio::sync::oneshot::channel();
        let long = tokio::spawn(direct(
            worker(),
            prompt.clone(),
            NEW_TOKENS + SLACK_TOKENS,
            Some(tell),
        ));
        streaming.await.expect("the direct request streams");
        let short = routed(router()).await;
        let long = long.await.expect("direct run task");
        step_us.extend(long.itl_us());
        match same_step_delays(&long, &short) {
            Some(delays) => {
                unmatched += short.arrivals.len() - delays.len();
                same_step.extend(delays);
            }
            None => unmatched += short.arrivals.len(),
        }
    }

    stop.cancel();
    let _ = router_task.await;
    let _ = worker_task.await;
    tokio::task::spawn_blocking(move || engine.shutdown())
        .await
        .expect("engine shutdown");

    for run in direct_runs.iter().chain(&routed_runs) {
        assert_eq!(
            run.arrivals.len(),
            NEW_TOKENS as usize,
            "every run streams all tokens"
        );
    }
    let mut direct_itl: Vec<f64> = direct_runs.iter().flat_map(Run::itl_us).collect();
    let mut routed_itl: Vec<f64> = routed_runs.iter().flat_map(Run::itl_us).collect();
    let mut delta: Vec<f64> = direct_runs
        .iter()
        .zip(&routed_runs)
        .flat_map(|(d, r)| {
            d.itl_us()
                .into_iter()
                .zip(r.itl_us())
                .map(|(d, r)| r - d)
                .collect::<Vec<_>>()
        })
        .collect();
    let ttft_ms = |runs: &[Run]| {
        let mut v: Vec<f64> = runs.iter().map(|r| r.ttft().as_secs_f64() * 1e3).collect();
        percentile(&mut v, 50.0)
    };
    let (direct_p50, direct_p90) = (
        percentile(&mut direct_itl, 50.0),
        percentile(&mut direct_itl, 90.0),
    );
    let (routed_p50, routed_p90) = (
        percentile(&mut routed_itl, 50.0),
        percentile(&mut routed_itl, 90.0),
    );
    let (delta_p50, delta_p90) = (percentile(&mut delta, 50.0), percentile(&mut delta, 90.0));
    let ratio = routed_p50 / direct_p50;
    let (step_p50, step_p90) = (
        percentile(&mut step_us, 50.0),
        percentile(&mut step_us, 90.0),
    );
    let (added_p50, added_p90) = (
        percentile(&mut same_step, 50.0),
        percentile(&mut same_step, 90.0),
    );
    let goal = if added_p50 <= 50.0 { "met" } else { "missed" };

    println!("Sequential runs (one request at a time):\n");
    println!(
        "| tokens/run | runs/path | direct ITL p50 / p90 (µs) | router ITL p50 / p90 (µs) \
         | Δ ITL per token p50 / p90 (µs) | ITL ratio p50 | TTFT p50 direct / router (ms) |"
    );
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {NEW_TOKENS} | {runs} | {direct_p50:.0} / {direct_p90:.0} | {routed_p50:.0} / {routed_p90:.0} \
         | {delta_p50:.1} / {delta_p90:.1} | {ratio:.3} | {:.2} / {:.2} |",
        ttft_ms(&direct_runs),
        ttft_ms(&routed_runs),
    );
    println!("\nSame engine step (router path vs direct, token by token):\n");
    println!(
        "| tokens/run | runs | engine step p50 / p90 (µs) | added latency per token p50 / p90 (µs) \
         | unmatched tokens | goal p50 ≤ 50 µs |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| {NEW_TOKENS} | {runs} | {step_p50:.0} / {step_p90:.0} | {added_p50:.1} / {added_p90:.1} \
         | {unmatched} | {goal} |"
    );
}
