//! Shared test plumbing: the fixtures path, a CPU backend, goldens parsing, and a tiny
//! scheduler that drives `Model::forward` the way the engine will (paged blocks, chunked
//! prefill, one decode token per step, several sequences per step).

use allam_backend::{KvCache, StepBatch};
use allam_backend_cpu::{CpuBackend, CpuBackendConfig};
use allam_model::{LoadOptions, Model, ProgressMode};
use serde_json::Value;

pub use crate::fixtures::model_dir;

/// Load options without a progress bar (a terminal on stderr must not get one in tests).
pub fn quiet() -> LoadOptions {
    LoadOptions {
        progress: ProgressMode::Never,
        ..LoadOptions::default()
    }
}

pub fn cpu_backend() -> CpuBackend {
    CpuBackend::new(&CpuBackendConfig::default()).expect("CPU backend")
}

pub fn load(name: &str, backend: &mut CpuBackend) -> Model {
    Model::load(&model_dir(name), backend, &quiet())
        .unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

pub struct GoldenCase {
    pub id: String,
    pub input_ids: Vec<u32>,
    pub last_logits: Vec<f32>,
    /// `[0]` is None (no logprob for the first token).
    pub prompt_logprobs: Vec<Option<f32>>,
    pub greedy_ids: Vec<u32>,
    pub greedy_logprobs: Vec<f32>,
}

pub fn golden_cases(model: &str) -> Vec<GoldenCase> {
    let path = model_dir(model).join("goldens.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let root: Value = serde_json::from_str(&text).expect("goldens.json is JSON");
    let floats = |v: &Value| -> Vec<f32> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_f64().expect("number") as f32)
            .collect()
    };
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect()
    };
    root["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| GoldenCase {
            id: c["id"].as_str().expect("id").to_owned(),
            input_ids: ids(&c["input_ids"]),
            last_logits: floats(&c["last_logits"]),
            prompt_logprobs: c["prompt_logprobs"]
                .as_array()
                .expect("prompt_logprobs")
                .iter()
                .map(|x| x.as_f64().map(|f| f as f32))
                .collect(),
            greedy_ids: ids(&c["greedy"]["ids"]),
            greedy_logprobs: floats(&c["greedy"]["logprobs"]),
        })
        .collect()
}

pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// `log_softmax(row)[id]` in f64.
pub fn logprob(row: &[f32], id: u32) -> f64 {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|v| (f64::from(*v) - max).exp()).sum();
    f64::from(row[id as usize]) - max - sum.ln()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub const BLOCK_SIZE: usize = 16;
pub const NUM_BLOCKS: usize = 257;

/// One sequence to run through [`run`].
pub struct SeqSpec {
    pub prompt: Vec<u32>,
    /// Prompt tokens per prefill step.
    pub chunk: usize,
    /// Greedy tokens to generate.
    pub max_new: usize,
    /// Ask for logits of every prompt row (needs `chunk >= prompt.len()`).
    pub all_prompt_logits: bool,
}

#[derive(Default)]
pub struct SeqResult {
    /// `[T, vocab]` when `all_prompt_logits`, else the last prompt row only.
    pub prompt_logits: Vec<f32>,
    pub generated: Vec<u32>,
    /// Logprob of each generated token under the distribution it was picked from.
    pub generated_logprobs: Vec<f64>,
}

struct SeqState {
    tokens: Vec<u32>,
    computed: usize,
    block_table: Vec<u32>,
    done: bool,
}

/// Runs all sequences together, greedy, one decode token per step, each step batching every
/// unfinished sequence (so prefill chunks and decodes mix). Blocks are handed out in a
/// scrambled order so block tables are never contiguous.
pub fn run(model: &Model, backend: &mut CpuBackend, specs: &[SeqSpec]) -> Vec<SeqResult> {
    run_padded(model, backend, specs, None)
}

/// [`run`], with every pure decode step padded to `pad_decode_to` sequences as a CUDA graph
/// replay pads it ([`StepBatch::padded_decode`]); the padding rows' logits are dropped.
pub fn run_padded(
    model: &Model,
    backend: &mut CpuBackend,
    specs: &[SeqSpec],
    pad_decode_to: Option<usize>,
) -> Vec<SeqResult> {
    let vocab = model.config().vocab_size;
    let mut kv: KvCache = model
        .alloc_kv_cache(backend, NUM_BLOCKS, BLOCK_SIZE)
        .expect("KV cache");
    let mut next_block = 0usize;
    let mut take_block = || {
        // 101 is coprime with NUM_BLOCKS, so this visits every block once.
        let b = (next_block * 101) % NUM_BLOCKS;
        next_block += 1;
        assert!(next_block <= NUM_BLOCKS, "test KV cache too small");
        b as u32
    };
    let mut states: Vec<SeqState> = specs
        .iter()
        .map(|s| SeqState {
            tokens: s.prompt.clone(),
            computed: 0,
            block_table: Vec::new(),
            done: s.max_new == 0,
        })
        .collect();
    let mut results: Vec<SeqResult> = specs.iter().map(|_| SeqResult::default()).collect();
    while states.iter().any(|s| !s.done) {
        let mut batch = StepBatch {
            block_size: BLOCK_SIZE as u32,
            ..StepBatch::default()
        };
        // (seq index, first logits row, rows) for each sequence that samples this step.
        let mut samplers = Vec::new();
        for (i, (state, spec)) in states.iter_mut().zip(specs).enumerate() {
            if state.done {
                continue;
            }
            let end = if state.computed < spec.prompt.len() {
                (state.computed + spec.chunk).min(spec.prompt.len())
            } else {
                state.computed + 1
            };
            while state.block_table.len() * BLOCK_SIZE < end {
                state.block_table.push(take_block());
            }
            let rows = batch.push_seq(
                &state.tokens[state.computed..end],
                end as u32,
                state.block_table.clone(),
            );
            if end >= spec.prompt.len() {
                let prefill_all = spec.all_prompt_logits && state.computed == 0;
                let first = batch.logits_rows.len();
                if prefill_all {
                    batch.logits_rows.extend(rows.clone());
                } else {
                    batch.logits_rows.push(rows.end - 1);
                }
                samplers.push((i, first, batch.logits_rows.len() - first));
            }
            state.computed = end;
        }
        let max_blocks = (NUM_BLOCKS / 2) as u32;
        let padded = pad_decode_to.and_then(|size| batch.padded_decode(size, max_blocks));
        let mut logits = model
            .forward(backend, &mut kv, padded.as_ref().unwrap_or(&batch))
            .expect("forward");
        logits.truncate(batch.logits_rows.len() * vocab);
        assert_eq!(logits.len(), batch.logits_rows.len() * vocab);
        for (i, first, n_rows) in samplers {
            let rows = &logits[first * vocab..(first + n_rows) * vocab];
            let last = &rows[(n_rows - 1) * vocab..];
            let state = &mut states[i];
            let result = &mut results[i];
            if result.generated.is_empty() {
                result.prompt_logits = rows.to_vec();
            }
            let next = argmax(last);
            result.generated.push(next);
            result.generated_logprobs.push(logprob(last, next));
            state.tokens.push(next);
            state.done = result.generated.len() >= specs[i].max_new;
        }
    }
    results
}
