//! CPU decode and prefill throughput of the fixtures' tiny model and the ~100M dummy preset.
//! Run with `cargo bench -p allam-model --bench decode`; prints the machine's core count with
//! every number (STYLE §2.8). Not part of the test suite.

#[path = "../tests/model/fixtures.rs"]
mod fixtures;

use std::time::Instant;

use allam_backend::{Backend, StepBatch};
use allam_backend_cpu::{CpuBackend, CpuBackendConfig};
use allam_model::{LoadOptions, Model, ModelConfig};

const BLOCK_SIZE: usize = 16;

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Prefills `prompt_len` tokens for each of `batch` sequences, then decodes `steps` tokens
/// each; returns (prefill tokens/s, decode tokens/s).
fn measure(
    model: &Model,
    backend: &mut CpuBackend,
    batch: usize,
    prompt_len: usize,
    steps: usize,
) -> (f64, f64) {
    let vocab = model.config().vocab_size as u32;
    let blocks_per_seq = (prompt_len + steps).div_ceil(BLOCK_SIZE);
    let mut kv = model
        .alloc_kv_cache(backend, batch * blocks_per_seq, BLOCK_SIZE)
        .expect("KV cache");
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|s| ((s * blocks_per_seq) as u32..((s + 1) * blocks_per_seq) as u32).collect())
        .collect();
    let mut tokens: Vec<Vec<u32>> = (0..batch)
        .map(|s| {
            (0..prompt_len)
                .map(|i| ((i * 31 + s * 7 + 1) as u32) % vocab)
                .collect()
        })
        .collect();

    let mut step = StepBatch {
        block_size: BLOCK_SIZE as u32,
        ..StepBatch::default()
    };
    for (seq, table) in tokens.iter().zip(&tables) {
        let rows = step.push_seq(seq, prompt_len as u32, table.clone());
        step.logits_rows.push(rows.end - 1);
    }
    let start = Instant::now();
    let logits = model.forward(backend, &mut kv, &step).expect("prefill");
    let prefill_tps = (batch * prompt_len) as f64 / start.elapsed().as_secs_f64();
    for (seq, row) in tokens.iter_mut().zip(logits.chunks_exact(vocab as usize)) {
        seq.push(argmax(row));
    }

    let start = Instant::now();
    for _ in 0..steps {
        let mut step = StepBatch {
            block_size: BLOCK_SIZE as u32,
            ..StepBatch::default()
        };
        for (seq, table) in tokens.iter().zip(&tables) {
            let len = seq.len();
            let rows = step.push_seq(&seq[len - 1..], len as u32, table.clone());
            step.logits_rows.push(rows.end - 1);
        }
        let logits = model.forward(backend, &mut kv, &step).expect("decode");
        for (seq, row) in tokens.iter_mut().zip(logits.chunks_exact(vocab as usize)) {
            seq.push(argmax(row));
        }
    }
    let decode_tps = (batch * steps) as f64 / start.elapsed().as_secs_f64();
    (prefill_tps, decode_tps)
}

fn report(name: &str, model: &Model, backend: &mut CpuBackend) {
    let params = model.config().num_parameters() as f64 / 1e6;
    for (batch, prompt_len, steps) in [(1, 128, 32), (8, 32, 16)] {
        let (prefill, decode) = measure(model, backend, batch, prompt_len, steps);
        println!(
            "{name:<12} {params:>7.1}M params  batch {batch:>2}  prefill {prompt_len:>4} tok: {prefill:>9.1} tok/s  decode: {decode:>8.2} tok/s"
        );
    }
}

fn main() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut backend = CpuBackend::new(&CpuBackendConfig {
        threads: None,
        kv_cache_budget_bytes: 4 << 30,
    })
    .expect("CPU backend");
    println!("{}; available cores: {cores}", backend.info().device);

    let tiny = Model::load(
        &fixtures::model_dir("tiny-allam"),
        &mut backend,
        &LoadOptions::default(),
    )
    .expect("tiny-allam fixture");
    report("tiny-allam", &tiny, &mut backend);
    drop(tiny);

    let config = ModelConfig::preset("allam-100m").expect("preset");
    let m100 = Model::from_config_dummy(config, &mut backend, 0).expect("dummy 100m");
    report("allam-100m", &m100, &mut backend);
}
