//! The fixtures' transformers goldens, reproduced through the paged-KV forward pass.
//! A wrong RoPE convention, ignored norm weights or a GQA head mix-up all move the logits far
//! past the 1e-3 tolerance (logit std is about 8).

use crate::support::{
    cpu_backend, golden_cases, load, logprob, max_abs_diff, run, run_padded, GoldenCase, SeqResult,
    SeqSpec,
};

const TOL: f32 = 1e-3;

fn check_case(case: &GoldenCase, result: &SeqResult, vocab: usize, check_prompt_rows: bool) {
    let id = &case.id;
    let t = case.input_ids.len();
    let last = &result.prompt_logits[result.prompt_logits.len() - vocab..];
    let diff = max_abs_diff(last, &case.last_logits);
    assert!(diff <= TOL, "{id}: last-position logits differ by {diff}");
    if check_prompt_rows {
        assert_eq!(
            result.prompt_logits.len(),
            t * vocab,
            "{id}: one logits row per prompt token"
        );
        for pos in 1..t {
            let want = case.prompt_logprobs[pos].expect("prompt logprob after the first token");
            let row = &result.prompt_logits[(pos - 1) * vocab..pos * vocab];
            let got = logprob(row, case.input_ids[pos]);
            assert!(
                (got - f64::from(want)).abs() <= f64::from(TOL),
                "{id}: prompt logprob at {pos}: {got} vs {want}"
            );
        }
    }
    assert_eq!(
        result.generated, case.greedy_ids,
        "{id}: greedy continuation"
    );
    for (step, (got, want)) in result
        .generated_logprobs
        .iter()
        .zip(&case.greedy_logprobs)
        .enumerate()
    {
        assert!(
            (got - f64::from(*want)).abs() <= f64::from(TOL),
            "{id}: logprob of greedy token {step}: {got} vs {want}"
        );
    }
}

/// Each case alone: whole prompt in one step (all rows' logits), then 24 single-token decodes.
/// Returns each case's logits, for cross-checks.
fn check_all_cases_alone(model_name: &str, goldens_of: &str) -> Vec<Vec<f32>> {
    let mut backend = cpu_backend();
    let model = load(model_name, &mut backend);
    let vocab = model.config().vocab_size;
    golden_cases(goldens_of)
        .iter()
        .map(|case| {
            let spec = SeqSpec {
                prompt: case.input_ids.clone(),
                chunk: usize::MAX,
                max_new: case.greedy_ids.len(),
                all_prompt_logits: true,
            };
            let result = run(&model, &mut backend, &[spec]).remove(0);
            check_case(case, &result, vocab, true);
            result.prompt_logits
        })
        .collect()
}

#[test]
fn tiny_allam_matches_goldens() {
    check_all_cases_alone("tiny-allam", "tiny-allam");
}

#[test]
fn tiny_allam_gqa_matches_goldens() {
    check_all_cases_alone("tiny-allam-gqa", "tiny-allam-gqa");
}

#[test]
fn sharded_checkpoint_matches_goldens_and_single_file_bit_for_bit() {
    let sharded = check_all_cases_alone("tiny-allam-sharded", "tiny-allam");
    let mut backend = cpu_backend();
    let model = load("tiny-allam", &mut backend);
    for (case, sharded_logits) in golden_cases("tiny-allam").iter().zip(&sharded) {
        let spec = SeqSpec {
            prompt: case.input_ids.clone(),
            chunk: usize::MAX,
            max_new: 1,
            all_prompt_logits: true,
        };
        let single = run(&model, &mut backend, &[spec]).remove(0).prompt_logits;
        assert!(
            single == *sharded_logits,
            "{}: sharded and single-file logits differ",
            case.id
        );
    }
}

/// All seven cases at once with 7-token prefill chunks: short prompts finish prefill and
/// decode in the same steps as the 619-token prompt's chunks, so most steps mix prefill
/// chunks and decodes of several sequences.
#[test]
fn chunked_prefill_in_mixed_batches_matches_goldens() {
    for model_name in ["tiny-allam", "tiny-allam-gqa"] {
        let mut backend = cpu_backend();
        let model = load(model_name, &mut backend);
        let cases = golden_cases(model_name);
        let specs: Vec<SeqSpec> = cases
            .iter()
            .map(|case| SeqSpec {
                prompt: case.input_ids.clone(),
                chunk: 7,
                max_new: case.greedy_ids.len(),
                all_prompt_logits: false,
            })
            .collect();
        let results = run(&model, &mut backend, &specs);
        for (case, result) in cases.iter().zip(&results) {
            check_case(case, result, model.config().vocab_size, false);
        }
    }
}

/// Two prompts prefilled in one step give each the logits it gets alone.
#[test]
fn batching_two_cases_does_not_change_their_logits() {
    let mut backend = cpu_backend();
    let model = load("tiny-allam", &mut backend);
    let cases = golden_cases("tiny-allam");
    let spec = |case: &GoldenCase| SeqSpec {
        prompt: case.input_ids.clone(),
        chunk: usize::MAX,
        max_new: 1,
        all_prompt_logits: true,
    };
    let (a, b) = (&cases[0], &cases[5]);
    let alone_a = run(&model, &mut backend, &[spec(a)])
        .remove(0)
        .prompt_logits;
    let alone_b = run(&model, &mut backend, &[spec(b)])
        .remove(0)
        .prompt_logits;
    let together = run(&model, &mut backend, &[spec(a), spec(b)]);
    assert!(
        max_abs_diff(&together[0].prompt_logits, &alone_a) <= 1e-5,
        "{}",
        a.id
    );
    assert!(
        max_abs_diff(&together[1].prompt_logits, &alone_b) <= 1e-5,
        "{}",
        b.id
    );
}

/// Decode steps padded as a CUDA graph replay pads them (dummy sequences in slot `PAD_SLOT`,
/// rows dropped) reproduce the goldens, and the real rows do not move: padding writes no KV
/// and takes nothing from the batch's sequences.
#[test]
fn padded_decode_steps_match_goldens_and_the_unpadded_run() {
    for model_name in ["tiny-allam", "tiny-allam-gqa"] {
        let mut backend = cpu_backend();
        let model = load(model_name, &mut backend);
        let cases = golden_cases(model_name);
        let specs: Vec<SeqSpec> = cases
            .iter()
            .map(|case| SeqSpec {
                prompt: case.input_ids.clone(),
                chunk: usize::MAX,
                max_new: case.greedy_ids.len(),
                all_prompt_logits: false,
            })
            .collect();
        let plain = run(&model, &mut backend, &specs);
        let padded = run_padded(&model, &mut backend, &specs, Some(cases.len() + 3));
        for ((case, p), q) in cases.iter().zip(&padded).zip(&plain) {
            check_case(case, p, model.config().vocab_size, false);
            assert_eq!(p.generated, q.generated, "{model_name} {}", case.id);
            let drift = p
                .generated_logprobs
                .iter()
                .zip(&q.generated_logprobs)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(drift < 1e-5, "{model_name} {}: {drift}", case.id);
        }
    }
}
