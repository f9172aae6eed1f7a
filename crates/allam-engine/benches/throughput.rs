//! End-to-end CPU throughput of the engine with the tiny fixture model (`tiny-allam`) at
//! concurrency 1, 8 and 32: each request has a distinct 64-token prompt and generates 64
//! tokens greedily. Reports generated tokens per second and mean time to first token.
//! Run: `cargo bench -p allam-engine --bench throughput` (needs the fixtures, see
//! `ALLAM_FIXTURES`).

use std::path::PathBuf;
use std::time::Instant;

use allam_backend_cpu::{CpuBackend, CpuBackendConfig};
use allam_engine::{Engine, EngineConfig};
use allam_model::{LoadOptions, Model};
use allam_request::{validate, Limits, PromptInput, RawRequest, RawSamplingParams};
use allam_tokenizer::Tokenizer;
use allam_types::EngineEvent;

const PROMPT_TOKENS: u32 = 64;
const NEW_TOKENS: i64 = 64;

fn fixtures_dir() -> PathBuf {
    match std::env::var_os("ALLAM_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures"),
    }
}

fn main() {
    let dir = fixtures_dir().join("tiny-allam");
    let tokenizer = Tokenizer::from_dir(&dir).expect("fixture tokenizer (set ALLAM_FIXTURES)");
    for concurrency in [1usize, 8, 32] {
        let mut backend = CpuBackend::new(&CpuBackendConfig::default()).expect("cpu backend");
        let model = Model::load(&dir, &mut backend, &LoadOptions::default()).expect("model");
        let handle = Engine::start(
            model,
            Box::new(backend),
            tokenizer.clone(),
            EngineConfig::default(),
        )
        .expect("engine");
        let requests: Vec<_> = (0..concurrency as u32)
            .map(|r| {
                let mut ids = vec![1];
                ids.extend((1..PROMPT_TOKENS).map(|i| 3 + (r * 997 + i * 31) % 3990));
                let raw = RawRequest {
                    input: PromptInput::TokenIds(ids),
                    params: RawSamplingParams {
                        do_sample: Some(false),
                        max_new_tokens: Some(NEW_TOKENS),
                        ignore_eos: Some(true),
                        ..RawSamplingParams::default()
                    },
                    model: None,
                };
                validate(raw, &Limits::default(), &tokenizer).expect("valid")
            })
            .collect();
        let started = Instant::now();
        let mut streams: Vec<_> = requests
            .into_iter()
            .map(|r| handle.submit(r).expect("submit"))
            .collect();
        let mut generated = 0usize;
        let mut ttft_ms = 0.0;
        for stream in &mut streams {
            while let Some(event) = stream.blocking_next() {
                match event {
                    EngineEvent::Delta(d) => generated += d.token_ids.len(),
                    EngineEvent::Finished { timings, .. } => ttft_ms += timings.ttft_ms,
                    EngineEvent::Failed { message, .. } => panic!("request failed: {message}"),
                    _ => {}
                }
            }
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "concurrency {concurrency:>2}: {generated} tokens in {secs:.3} s = {:.0} tok/s, \
             mean ttft {:.1} ms, {} steps",
            generated as f64 / secs,
            ttft_ms / concurrency as f64,
            handle.stats().steps
        );
        handle.shutdown();
    }
}
