//! `allam demo`: the README's first command. Starts the whole cluster in this process
//! (router + worker group over loopback gRPC, HTTP front), sends the model card's two sample
//! requests to `/score` exactly as the card writes them, and prints the answers.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;

use crate::cli::{DemoArgs, EngineArgs, FrontArgs, TelemetryArgs};
use crate::serve::{self, LocalCluster};

/// The model card's sample questions (English, then Arabic).
const CARD_QUESTIONS: [&str; 2] = ["How do I prepare a cup of tea?", "كيف أجهز كوب شاهي؟"];

fn card_request(question: &str) -> serde_json::Value {
    json!({
        "input_data": {
            "input_string": [{"role": "user", "content": question}],
            "parameters": {"temperature": 0.6, "top_p": 0.9, "do_sample": true, "max_new_tokens": 200}
        }
    })
}

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let rt = serve::runtime()?;
    rt.block_on(async {
        let telemetry = TelemetryArgs {
            log_format: crate::cli::LogFormat::Text,
            otlp_endpoint: None,
            log_prompts: false,
        };
        if std::env::var_os("RUST_LOG").is_none() {
            // The demo's output is the answers; keep routine logs out of the way.
            std::env::set_var("RUST_LOG", "warn");
        }
        let _tracing = serve::init_tracing(&telemetry, "allam-demo")?;
        let front = FrontArgs {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            api_key: Vec::new(),
            api_key_file: None,
            metrics_require_auth: false,
            max_body_bytes: 4 << 20,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            max_outstanding_per_group: 1024,
        };
        let engine = EngineArgs {
            block_size: 16,
            kv_cache_memory: 64 << 20,
            max_num_batched_tokens: 2048,
            max_num_seqs: 64,
            max_waiting: 256,
            no_prefix_caching: false,
            max_prefill_tokens_with_decodes: 512,
            stream_buffer_events: 256,
            stream_write_timeout: Duration::from_secs(30),
        };
        let (grpc_addr, http_addr) = if args.keep_serving {
            (
                SocketAddr::from(([0, 0, 0, 0], 50051)),
                SocketAddr::from(([0, 0, 0, 0], 8000)),
            )
        } else {
            (front.grpc_addr, front.http_addr)
        };
        let cluster =
            LocalCluster::start(&args.model, &engine, &front, false, grpc_addr, http_addr).await?;
        println!(
            "allam demo: router on gRPC {} and HTTP {}, one worker group (CPU) behind it",
            cluster.grpc_addr, cluster.http_addr
        );
        println!(
            "note: the built-in demo model has random weights, so its answers are noise; \
             use --model DIR with the real ALLaM weights for real answers.\n"
        );
        let client = reqwest::Client::new();
        let url = format!("http://{}/score", cluster.http_addr);
        for question in CARD_QUESTIONS {
            let body = card_request(question);
            println!("POST /score {}", serde_json::to_string(&body)?);
            let response = client
                .post(&url)
                .json(&body)
                .send()
                .await
                .context("sending the sample request")?;
            let status = response.status();
            let answer: serde_json::Value = response.json().await.context("reading the answer")?;
            println!("{status} {}\n", serde_json::to_string_pretty(&answer)?);
            if !status.is_success() {
                anyhow::bail!("the sample request failed with {status}");
            }
        }
        if args.keep_serving {
            println!("serving; Ctrl-C to stop");
            serve::termination_signal().await;
        }
        let drained = cluster.stop(Duration::from_secs(10)).await;
        Ok(if drained {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(serve::EXIT_DRAIN_TIMEOUT)
        })
    })
}
