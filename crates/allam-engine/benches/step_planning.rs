//! Scheduler step time with 256 running sequences of 2k tokens each, no model: plan the step,
//! build the `StepBatch` (block tables included), record completion, append a token.
//! Goal (issue 3): ≤ 200 µs per step. Run: `cargo bench -p allam-engine --bench step_planning`.

use std::time::{Duration, Instant};

use allam_engine::bench_support::StepPlanningBench;

const SEQS: usize = 256;
const CONTEXT_TOKENS: usize = 2048;
const BLOCK_SIZE: usize = 16;
const WARMUP_STEPS: usize = 200;
const MEASURED_STEPS: usize = 2000;

fn main() {
    let setup = Instant::now();
    let mut bench = StepPlanningBench::new(
        SEQS,
        CONTEXT_TOKENS,
        BLOCK_SIZE,
        WARMUP_STEPS + MEASURED_STEPS + BLOCK_SIZE,
    );
    println!(
        "setup: {SEQS} sequences x {CONTEXT_TOKENS} tokens in {:?}",
        setup.elapsed()
    );
    for _ in 0..WARMUP_STEPS {
        bench.step();
    }
    let mut samples: Vec<Duration> = Vec::with_capacity(MEASURED_STEPS);
    for _ in 0..MEASURED_STEPS {
        let started = Instant::now();
        let tokens = bench.step();
        samples.push(started.elapsed());
        assert_eq!(tokens, SEQS, "every sequence decodes one token per step");
    }
    assert_eq!(bench.num_running(), SEQS);
    samples.sort();
    let pct = |p: f64| samples[((samples.len() - 1) as f64 * p) as usize];
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    println!(
        "step planning ({SEQS} running x {CONTEXT_TOKENS} tokens, block {BLOCK_SIZE}): \
         mean {mean:?}, p50 {:?}, p90 {:?}, p99 {:?}, max {:?} over {MEASURED_STEPS} steps \
         (goal <= 200us)",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
}
