//! `allam bench`: the load generator (`allam-bench`) against a running server.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};

use allam_bench::{BenchConfig, Target, Workload};

use crate::cli::{BenchArgs, BenchBackend, BenchDataset};

pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let target = match args.backend {
        BenchBackend::Grpc => Target::Grpc {
            endpoint: args.endpoint.clone(),
            api_key: args.api_key.clone(),
        },
        BenchBackend::Openai => Target::OpenAiHttp {
            base_url: args.base_url.clone(),
            model: args.model.clone(),
            api_key: args.api_key.clone(),
        },
    };
    let workload = match args.dataset {
        BenchDataset::Random => Workload::Random {
            input_len: args.random_input_len,
            output_len: args.random_output_len,
            seed: args.seed,
        },
        BenchDataset::Bilingual => Workload::Bilingual {
            output_len: args.bilingual_output_len,
            seed: args.seed,
        },
        BenchDataset::Jsonl => match &args.dataset_path {
            Some(path) => Workload::Jsonl { path: path.clone() },
            None => bail!("--dataset jsonl needs --dataset-path FILE"),
        },
    };
    let mut config = BenchConfig::new(target, workload);
    config.num_requests = args.num_prompts;
    config.request_rate = args.request_rate;
    config.max_concurrency = args.max_concurrency;
    config.seed = args.seed;
    config.progress = !args.no_progress && std::io::stderr().is_terminal();
    config.timeout = Duration::from_secs(args.timeout);
    config.ignore_eos = args.ignore_eos;
    let rt = crate::serve::runtime()?;
    let report = rt
        .block_on(allam_bench::run(config))
        .context("running the benchmark")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", report.to_table());
    }
    Ok(if report.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
