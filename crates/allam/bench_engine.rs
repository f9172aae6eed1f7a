//! `allam bench-engine`: offline engine benchmark in one process (no servers): time to first
//! token per prompt length, batch-1 decode speed, and output throughput at several
//! concurrencies. `scripts/gpu-check.sh` runs it on the `allam-7b` dummy preset on a GPU; on
//! the CPU it gives the numbers in BENCHMARKS.md.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use serde_json::{json, Value};

use allam_engine::EngineHandle;
use allam_request::{Limits, PromptInput, RawRequest, RawSamplingParams};
use allam_types::EngineEvent;

use crate::cli::BenchEngineArgs;
use crate::model_source;

/// Deterministic pseudo-random prompt ids in `[3, vocab)` (ids 0–2 are specials): a
/// different `salt` per request, so no two prompts share a prefix-cache block.
fn prompt_ids(len: usize, vocab: usize, salt: u64) -> Vec<u32> {
    let span = (vocab.max(4) - 3) as u64;
    let mut state = salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (3 + state % span) as u32
        })
        .collect()
}

struct Bench {
    engine: EngineHandle,
    tokenizer: allam_tokenizer::Tokenizer,
    limits: Limits,
    vocab: usize,
    salt: u64,
}

/// Per-request measurements.
struct Run {
    first_token: Option<Instant>,
    end: Instant,
    output_tokens: usize,
}

impl Bench {
    fn submit(
        &mut self,
        input_len: usize,
        output_len: usize,
    ) -> anyhow::Result<allam_engine::EventStream> {
        self.salt += 1;
        let raw = RawRequest {
            input: PromptInput::TokenIds(prompt_ids(input_len, self.vocab, self.salt)),
            params: RawSamplingParams {
                do_sample: Some(false),
                max_new_tokens: Some(output_len as i64),
                ignore_eos: Some(true),
                ..RawSamplingParams::default()
            },
            model: None,
        };
        let valid = allam_request::validate(raw, &self.limits, &self.tokenizer)?;
        Ok(self.engine.submit(valid)?)
    }

    fn drain(stream: &mut allam_engine::EventStream) -> anyhow::Result<Run> {
        let mut run = Run {
            first_token: None,
            end: Instant::now(),
            output_tokens: 0,
        };
        while let Some(event) = stream.blocking_next() {
            match event {
                EngineEvent::Delta(delta) => {
                    if run.first_token.is_none() && !delta.token_ids.is_empty() {
                        run.first_token = Some(Instant::now());
                    }
                    run.output_tokens += delta.token_ids.len();
                }
                EngineEvent::Finished { .. } => break,
                EngineEvent::Failed { reason, message } => {
                    anyhow::bail!("benchmark request failed ({reason}): {message}")
                }
                _ => {}
            }
        }
        run.end = Instant::now();
        Ok(run)
    }

    fn ttft_ms(&mut self, input_len: usize) -> anyhow::Result<f64> {
        let start = Instant::now();
        let mut stream = self.submit(input_len, 1)?;
        let run = Bench::drain(&mut stream)?;
        let first = run.first_token.context("no token came back")?;
        Ok(first.duration_since(start).as_secs_f64() * 1e3)
    }

    fn decode_tok_s(&mut self, tokens: usize) -> anyhow::Result<f64> {
        let mut stream = self.submit(16, tokens)?;
        let run = Bench::drain(&mut stream)?;
        let first = run.first_token.context("no token came back")?;
        let seconds = run.end.duration_since(first).as_secs_f64();
        Ok((run.output_tokens.saturating_sub(1)) as f64 / seconds.max(1e-9))
    }

    fn throughput(
        &mut self,
        concurrency: usize,
        input_len: usize,
        output_len: usize,
    ) -> anyhow::Result<f64> {
        let start = Instant::now();
        let mut streams = Vec::with_capacity(concurrency);
        for _ in 0..concurrency {
            streams.push(self.submit(input_len, output_len)?);
        }
        let mut tokens = 0;
        for stream in &mut streams {
            tokens += Bench::drain(stream)?.output_tokens;
        }
        Ok(tokens as f64 / start.elapsed().as_secs_f64())
    }
}

fn parse_list(text: &str) -> anyhow::Result<Vec<usize>> {
    text.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .parse::<usize>()
                .with_context(|| format!("`{s}` is not a count"))
        })
        .collect()
}

/// A number, or the error's first line (e.g. "OOM") so one failed point keeps the rest.
fn measured(result: anyhow::Result<f64>) -> Value {
    match result {
        Ok(value) => json!((value * 100.0).round() / 100.0),
        Err(err) => {
            let text = format!("{err:#}");
            let short = if text.to_lowercase().contains("memory") {
                "OOM".to_owned()
            } else {
                text
            };
            Value::String(short)
        }
    }
}

pub fn run(args: BenchEngineArgs) -> anyhow::Result<ExitCode> {
    let resolved = model_source::resolve(&args.model)?;
    let group = model_source::group_config(&resolved, &args.model, &args.engine)?;
    let started = allam_worker::group::start_group(&group, resolved.tokenizer.clone())
        .context("starting the engine")?;
    let max_context = started.model_config.max_position_embeddings;
    let mut bench = Bench {
        engine: started.engine.clone(),
        tokenizer: resolved.tokenizer.clone(),
        limits: Limits::for_context(max_context as u32),
        vocab: resolved
            .tokenizer
            .vocab_size()
            .min(started.model_config.vocab_size),
        salt: args.seed,
    };
    eprintln!(
        "bench-engine: {} on {}",
        resolved.served_name, started.backend_description
    );
    // Warm-up: first-use costs (kernel loading, allocator growth) stay out of the numbers.
    bench.ttft_ms(32)?;

    let mut ttft = BTreeMap::new();
    for len in parse_list(&args.ttft)? {
        let value = measured(bench.ttft_ms(len));
        eprintln!("  ttft {len:>5} tokens: {value} ms");
        ttft.insert(len.to_string(), value);
    }
    let decode = measured(bench.decode_tok_s(args.decode_tokens));
    eprintln!("  batch-1 decode: {decode} tokens/s");
    let mut throughput = BTreeMap::new();
    for concurrency in parse_list(&args.concurrency)? {
        let value = measured(bench.throughput(concurrency, args.input_len, args.output_len));
        eprintln!(
            "  concurrency {concurrency:>4} ({} in / {} out): {value} output tokens/s",
            args.input_len, args.output_len
        );
        throughput.insert(concurrency.to_string(), value);
    }
    let report = json!({
        "model": resolved.served_name,
        "backend": started.backend_description,
        "threads": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "ttft_ms": ttft,
        "batch1_decode_tok_s": decode,
        "throughput_out_tok_s": throughput,
        "input_len": args.input_len,
        "output_len": args.output_len,
    });
    let text = serde_json::to_string_pretty(&report)?;
    match &args.json {
        Some(path) => std::fs::write(path, text + "\n")
            .with_context(|| format!("writing {}", path.display()))?,
        None => println!("{text}"),
    }
    started.engine.shutdown();
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_avoid_specials_and_differ_by_salt() {
        let a = prompt_ids(64, 100, 1);
        let b = prompt_ids(64, 100, 2);
        assert!(a.iter().all(|&id| (3..100).contains(&id)));
        assert_ne!(a, b);
        assert_eq!(a, prompt_ids(64, 100, 1));
    }

    #[test]
    fn lists_parse() {
        assert_eq!(parse_list("1,8, 64").ok(), Some(vec![1, 8, 64]));
        assert!(parse_list("1,x").is_err());
    }
}
