//! `allam bench`: a load generator for allam-serve's gRPC API (`allam.v1.Generation`) and any
//! OpenAI-compatible HTTP server, in the spirit of `vllm bench serve`.
//!
//! A run builds its requests from a [`Workload`] (random prompts of a set length, the built-in
//! Arabic/English chat set, or a JSONL file), sends them on a Poisson schedule and/or under a
//! concurrency cap, streams every response, and reports TTFT, inter-token latency, time per
//! output token and end-to-end latency (mean, p50, p90, p99), request and token throughput, and
//! failures by kind in a [`BenchReport`]. Metric definitions are in `measure` and `report`.
//!
//! Invariants: a run is reproducible under its seeds (same prompts, same arrival times, same
//! per-request sampling seeds `seed + request index`); a failing request is a measurement,
//! never an [`Error`]; nothing here touches the model or its tokenizer, so the crate builds
//! without the engine.

mod bilingual;
mod client;
mod dataset;
mod error;
mod measure;
mod report;
mod runner;
mod schedule;
mod stats;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use error::Error;
pub use report::BenchReport;
pub use stats::LatencyStats;

use client::Client;

/// Words in the sample that measures the target's tokens per word for random prompts; long
/// enough that the bos token and word-boundary effects average out.
const CALIBRATION_WORDS: usize = 256;

/// Where the load goes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Target {
    /// allam-serve's public gRPC API. `endpoint` is a URI (`http://127.0.0.1:50051`); a bare
    /// `host:port` means plain-text HTTP/2.
    Grpc {
        endpoint: String,
        /// Sent as `authorization: Bearer <key>` metadata.
        api_key: Option<String>,
    },
    /// An OpenAI-compatible server (allam-serve's HTTP front, vLLM, ...). `base_url` is the
    /// server root or its `/v1`, over plain HTTP.
    OpenAiHttp {
        base_url: String,
        /// The `model` field; `None` omits it (the server's default model).
        model: Option<String>,
        /// Sent as `Authorization: Bearer <key>`.
        api_key: Option<String>,
    },
}

/// What the requests ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Workload {
    /// Raw prompts of random Arabic and English words, about `input_len` tokens each (see the
    /// `dataset` module for the approximation), generating exactly `output_len` tokens each
    /// (`ignore_eos` is always set). gRPC `GenerateStream`, HTTP `/v1/completions`.
    Random {
        input_len: usize,
        output_len: usize,
        seed: u64,
    },
    /// The built-in set of ~45 Arabic, English and mixed chat conversations, shuffled under
    /// `seed` and reused in passes, each answer capped at `output_len` tokens. gRPC
    /// `ChatStream`, HTTP `/v1/chat/completions`.
    Bilingual { output_len: usize, seed: u64 },
    /// One request per line, in file order and cycled when `num_requests` exceeds the file:
    /// `{"prompt": "..."}` (raw completion) or `{"messages": [{"role", "content"}, ...]}`
    /// (chat), each with an optional `"max_tokens"` (absent = the server's default).
    Jsonl { path: PathBuf },
}

impl Workload {
    fn name(&self) -> &'static str {
        match self {
            Workload::Random { .. } => "random",
            Workload::Bilingual { .. } => "bilingual",
            Workload::Jsonl { .. } => "jsonl",
        }
    }
}

/// Everything a run needs. [`BenchConfig::new`] fills in defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchConfig {
    pub target: Target,
    pub workload: Workload,
    /// Requests to send (at least 1).
    pub num_requests: usize,
    /// Poisson arrival rate in requests/s; `None` (or infinity) sends all at once.
    pub request_rate: Option<f64>,
    /// At most this many requests in flight; `None` = no cap.
    pub max_concurrency: Option<usize>,
    /// Seeds the arrival schedule; request `i` is sampled with seed `seed + i`.
    pub seed: u64,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// Per-request limit on the whole stream; a request past it counts as `timeout`.
    pub timeout: Duration,
    /// Ask the server to ignore eos (`Bilingual` and `Jsonl`; `Random` always does).
    pub ignore_eos: bool,
}

impl BenchConfig {
    /// 100 requests, all at once, no concurrency cap, seed 0, no progress bar, a 10-minute
    /// per-request timeout, eos honoured.
    pub fn new(target: Target, workload: Workload) -> BenchConfig {
        BenchConfig {
            target,
            workload,
            num_requests: 100,
            request_rate: None,
            max_concurrency: None,
            seed: 0,
            progress: false,
            timeout: Duration::from_secs(600),
            ignore_eos: false,
        }
    }

    fn validate(&self) -> Result<(), Error> {
        let invalid = |field, reason: String| Err(Error::InvalidConfig { field, reason });
        if self.num_requests == 0 {
            return invalid("num_requests", "must be at least 1, got 0".into());
        }
        if let Some(rate) = self.request_rate {
            if rate.is_nan() || rate <= 0.0 {
                return invalid("request_rate", format!("must be positive, got {rate}"));
            }
        }
        if self.max_concurrency == Some(0) {
            return invalid("max_concurrency", "must be at least 1, got 0".into());
        }
        if self.timeout.is_zero() {
            return invalid("timeout", "must be positive, got 0".into());
        }
        match &self.workload {
            Workload::Random {
                input_len,
                output_len,
                ..
            } => {
                if *input_len == 0 {
                    return invalid("workload.input_len", "must be at least 1, got 0".into());
                }
                if *output_len == 0 {
                    return invalid("workload.output_len", "must be at least 1, got 0".into());
                }
            }
            Workload::Bilingual { output_len, .. } if *output_len == 0 => {
                return invalid("workload.output_len", "must be at least 1, got 0".into());
            }
            _ => {}
        }
        Ok(())
    }
}

/// Runs the benchmark to the end and reports what it measured.
///
/// Fails only when the run cannot start (see [`Error`]); failing requests are counted in the
/// report. Dropping the returned future cancels every request in flight.
pub async fn run(config: BenchConfig) -> Result<BenchReport, Error> {
    config.validate()?;
    let max_in_flight = config
        .max_concurrency
        .unwrap_or(config.num_requests)
        .min(config.num_requests);
    let client = Arc::new(Client::connect(&config.target, max_in_flight).await?);

    let random_tokens_per_word = match &config.workload {
        Workload::Random { seed, .. } => {
            calibrate_tokens_per_word(&client, *seed, config.timeout).await
        }
        _ => None,
    };
    let specs = dataset::build_requests(
        &config.workload,
        config.num_requests,
        config.ignore_eos,
        random_tokens_per_word.unwrap_or(1.0),
    )?;
    let request_rate = config.request_rate.filter(|rate| rate.is_finite());
    let offsets = schedule::arrival_offsets(specs.len(), request_rate, config.seed);
    let result = runner::run_loop(
        client,
        specs,
        runner::LoopConfig {
            offsets,
            max_concurrency: config.max_concurrency,
            timeout: config.timeout,
            seed: config.seed,
            progress: config.progress,
        },
    )
    .await;

    let (backend, target) = match &config.target {
        Target::Grpc { endpoint, .. } => ("grpc", endpoint.clone()),
        Target::OpenAiHttp { base_url, .. } => ("openai", base_url.clone()),
    };
    let facts = report::RunFacts {
        backend: backend.to_owned(),
        target,
        dataset: config.workload.name().to_owned(),
        request_rate,
        max_concurrency: config.max_concurrency,
        peak_in_flight: result.peak_in_flight,
        random_tokens_per_word,
        duration: result.duration,
    };
    Ok(BenchReport::build(facts, &result.outcomes))
}

/// Tokens per random word on the target's own tokenizer, or `None` when the target cannot
/// tokenize (an OpenAI server without vLLM's `/tokenize`): the prompts then assume one token
/// per word and the report's mean input tokens shows the truth.
async fn calibrate_tokens_per_word(client: &Client, seed: u64, timeout: Duration) -> Option<f64> {
    let text = dataset::calibration_text(seed, CALIBRATION_WORDS);
    let count = tokio::time::timeout(timeout, client.count_tokens(&text))
        .await
        .ok()?
        .ok()?;
    // Both tokenize APIs count the bos token that generation prepends; the prompt text does
    // not produce it.
    let text_tokens = count.checked_sub(1).filter(|n| *n > 0)?;
    Some(text_tokens as f64 / CALIBRATION_WORDS as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BenchConfig {
        BenchConfig::new(
            Target::Grpc {
                endpoint: "http://127.0.0.1:1".into(),
                api_key: None,
            },
            Workload::Bilingual {
                output_len: 8,
                seed: 0,
            },
        )
    }

    #[tokio::test]
    async fn invalid_settings_are_refused_before_connecting() {
        type Edit = fn(&mut BenchConfig);
        let cases: [(Edit, &str); 7] = [
            (|c| c.num_requests = 0, "num_requests"),
            (|c| c.request_rate = Some(0.0), "request_rate"),
            (|c| c.request_rate = Some(f64::NAN), "request_rate"),
            (|c| c.max_concurrency = Some(0), "max_concurrency"),
            (|c| c.timeout = Duration::ZERO, "timeout"),
            (
                |c| {
                    c.workload = Workload::Random {
                        input_len: 0,
                        output_len: 1,
                        seed: 0,
                    }
                },
                "workload.input_len",
            ),
            (
                |c| {
                    c.workload = Workload::Bilingual {
                        output_len: 0,
                        seed: 0,
                    }
                },
                "workload.output_len",
            ),
        ];
        for (edit, field) in cases {
            let mut config = config();
            edit(&mut config);
            let err = run(config).await.expect_err(field);
            assert!(
                matches!(&err, Error::InvalidConfig { field: f, .. } if *f == field),
                "{field}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn unreachable_grpc_endpoint_is_an_error_naming_it() {
        // Bind then drop a listener: its port is free and refuses connections.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        drop(listener);
        let mut config = config();
        config.target = Target::Grpc {
            endpoint: addr.to_string(),
            api_key: None,
        };
        let err = run(config).await.expect_err("nothing listens there");
        assert!(matches!(err, Error::Connect { .. }), "{err}");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }
}
