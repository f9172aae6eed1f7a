//! Host sampling cost per row at ALLaM's 64k vocabulary, by what the row asks for. This is the
//! CPU twin's `Backend::sample` and the engine's host path; on a GPU the same rules run in
//! `kernels/sampling.cu`. Baseline: greedy without logprobs, measured in the same run.
//! Run: `cargo bench -p allam-backend --bench sample`.

use std::hint::black_box;
use std::time::Instant;

use allam_backend::sampling::{sample_row, RowSampling};

const VOCAB: usize = 64_000;
const ROWS: usize = 64;
const REPEATS: usize = 5;

/// Logits shaped like a language model's: a few large values over a broad normal-ish bulk.
fn logits(seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..VOCAB)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 11) as f32 / (1u64 << 53) as f32;
            let bulk = (u - 0.5) * 12.0;
            if i % 9973 == 0 {
                bulk + 14.0
            } else {
                bulk
            }
        })
        .collect()
}

fn main() {
    let rows: Vec<Vec<f32>> = (0..ROWS as u64).map(logits).collect();
    let hot = |top_k, top_p| RowSampling {
        temperature: 0.8,
        top_k,
        top_p,
        uniform: 0.37,
    };
    let cases: [(&str, RowSampling, Option<usize>); 6] = [
        (
            "greedy, no logprobs (baseline)",
            RowSampling::greedy(),
            None,
        ),
        ("greedy, logprobs 5", RowSampling::greedy(), Some(5)),
        ("temperature only", hot(0, 1.0), None),
        ("top-k 50", hot(50, 1.0), None),
        ("top-p 0.9", hot(0, 0.9), None),
        ("top-k 50 + top-p 0.9, logprobs 5", hot(50, 0.9), Some(5)),
    ];
    println!(
        "host sampling, vocab {VOCAB}, {ROWS} rows x {REPEATS}, {} threads available",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let mut baseline = None;
    for (name, params, logprobs) in cases {
        let start = Instant::now();
        for _ in 0..REPEATS {
            for row in &rows {
                black_box(sample_row(black_box(row), &params, logprobs));
            }
        }
        let per_row_us = start.elapsed().as_secs_f64() * 1e6 / (ROWS * REPEATS) as f64;
        let base = *baseline.get_or_insert(per_row_us);
        println!(
            "{name:<36} {per_row_us:>9.1} us/row  {:>6.1}x baseline",
            per_row_us / base
        );
    }
}
