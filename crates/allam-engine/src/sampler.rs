//! Turning one row of logits into one token, and logprobs.
//!
//! Order of processing (as in vLLM/HF): repetition penalty over prompt + generated tokens
//! (HF: positive logits divided, negative multiplied); presence / frequency penalties over
//! generated tokens (OpenAI: `logit -= presence * [count > 0] + frequency * count`); while
//! fewer than `min_new_tokens` were generated, eos (unless `ignore_eos`) and
//! `stop_token_ids` are masked; then greedy argmax, or min-p and the shared rules of
//! `allam_backend::sampling` (temperature, top-k, top-p, one draw from the sequence's own RNG).
//! A decision that needs none of the host-only steps goes to the backend instead
//! ([`Sampler::backend_row`]), with the same draw, so both paths pick the same token.
//!
//! Determinism: the result depends only on the logits, the parameters, the sequence's tokens
//! and its RNG state, never on the batch. Candidates are visited in token id order, and
//! exactly one RNG draw is taken per non-greedy sampled step.
//!
//! Logprobs are those of the model's raw distribution (`log_softmax` of the logits before any
//! penalty, mask or temperature), which is what the goldens and vLLM's default report.

use allam_backend::sampling::{argmax, log_softmax_at, sample_row, RowSampling, MAX_TOP_LOGPROBS};
use allam_request::SamplingParams;
use allam_types::{StepLogprobs, TokenId, TokenLogprob};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Per-token inputs of one sampling decision.
pub(crate) struct SampleInput<'a> {
    pub(crate) logits: &'a [f32],
    pub(crate) params: &'a SamplingParams,
    /// Prompt followed by the tokens generated so far.
    pub(crate) tokens: &'a [TokenId],
    pub(crate) prompt_len: usize,
    pub(crate) eos: &'a [TokenId],
}

/// The shared rules' parameters of one decision, with the step's one draw from the
/// sequence's RNG unless it is greedy: both sampling paths get their row here, which is what
/// keeps a seeded request's tokens the same on either.
fn row_sampling(params: &SamplingParams, rng: &mut ChaCha8Rng) -> RowSampling {
    if params.is_greedy() {
        return RowSampling::greedy();
    }
    RowSampling {
        temperature: params.temperature,
        top_k: params.top_k,
        top_p: params.top_p,
        uniform: rng.random::<f32>(),
    }
}

/// Reusable buffers, so a step allocates nothing per sequence.
pub(crate) struct Sampler {
    work: Vec<f32>,
    seen: Vec<u32>,
}

impl Sampler {
    pub(crate) fn new(vocab_size: usize) -> Sampler {
        Sampler {
            work: Vec::with_capacity(vocab_size),
            seen: vec![0; vocab_size],
        }
    }

    /// Picks the next token.
    pub(crate) fn sample(&mut self, input: &SampleInput<'_>, rng: &mut ChaCha8Rng) -> TokenId {
        let params = input.params;
        self.work.clear();
        self.work.extend_from_slice(input.logits);
        self.apply_penalties(input);
        let generated = input.tokens.len().saturating_sub(input.prompt_len);
        if generated < params.min_new_tokens as usize {
            let eos: &[TokenId] = if params.ignore_eos { &[] } else { input.eos };
            for &token in eos.iter().chain(&params.stop_token_ids) {
                if let Some(l) = self.work.get_mut(token as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        if params.is_greedy() {
            return argmax(&self.work) as TokenId;
        }
        if params.min_p > 0.0 {
            // p_T(l) >= min_p * p_T(max)  <=>  l >= max + T ln(min_p): a logit-space floor,
            // applied before top-k / top-p (as vLLM v1 does).
            let max = self.work.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let floor = max + params.temperature * params.min_p.ln();
            for l in self.work.iter_mut() {
                if *l < floor {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        sample_row(&self.work, &row_sampling(params, rng), None).token
    }

    /// The row a backend can sample by itself, or `None` when this decision needs the host
    /// (penalties, min-p, masked eos, more top logprobs than a backend reports). Takes the
    /// step's one draw from `rng` exactly when [`Sampler::sample`] would, so a seeded request
    /// gets the same tokens on either path.
    pub(crate) fn backend_row(
        input: &SampleInput<'_>,
        rng: &mut ChaCha8Rng,
    ) -> Option<RowSampling> {
        let params = input.params;
        let generated = input.tokens.len().saturating_sub(input.prompt_len);
        let masks = generated < params.min_new_tokens as usize
            && !((params.ignore_eos || input.eos.is_empty()) && params.stop_token_ids.is_empty());
        let host_only = params.repetition_penalty != 1.0
            || params.presence_penalty != 0.0
            || params.frequency_penalty != 0.0
            || params.min_p > 0.0
            || masks
            || params.logprobs.unwrap_or(0) as usize > MAX_TOP_LOGPROBS;
        if host_only {
            return None;
        }
        Some(row_sampling(params, rng))
    }

    fn apply_penalties(&mut self, input: &SampleInput<'_>) {
        let params = input.params;
        let vocab = self.work.len();
        if params.repetition_penalty != 1.0 {
            let penalty = params.repetition_penalty;
            for &token in input.tokens {
                let t = token as usize;
                if t < vocab && self.seen[t] == 0 {
                    self.seen[t] = 1;
                    let l = &mut self.work[t];
                    *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
                }
            }
            for &token in input.tokens {
                if let Some(s) = self.seen.get_mut(token as usize) {
                    *s = 0;
                }
            }
        }
        if params.presence_penalty != 0.0 || params.frequency_penalty != 0.0 {
            let generated = input.tokens.get(input.prompt_len..).unwrap_or(&[]);
            for &token in generated {
                if let Some(count) = self.seen.get_mut(token as usize) {
                    *count += 1;
                }
            }
            for &token in generated {
                let t = token as usize;
                if t < vocab && self.seen[t] > 0 {
                    let count = self.seen[t] as f32;
                    self.work[t] -= params.presence_penalty + params.frequency_penalty * count;
                    self.seen[t] = 0;
                }
            }
        }
    }

    /// Logprob of `chosen` and the `top_n` most likely tokens under `log_softmax(logits)`:
    /// `allam_backend::sampling::log_softmax_at`, what backend-sampled rows report too.
    pub(crate) fn logprobs(&self, logits: &[f32], chosen: TokenId, top_n: usize) -> StepLogprobs {
        let (logprob, top) = log_softmax_at(logits, chosen as usize, top_n);
        StepLogprobs {
            chosen: TokenLogprob {
                id: chosen,
                logprob,
            },
            top: top
                .into_iter()
                .map(|(id, logprob)| TokenLogprob { id, logprob })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn params() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            max_new_tokens: 16,
            min_new_tokens: 0,
            seed: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logprobs: None,
            prompt_logprobs: None,
            n: 1,
            priority: 0,
        }
    }

    fn sample_once(
        logits: &[f32],
        p: &SamplingParams,
        tokens: &[u32],
        prompt_len: usize,
        seed: u64,
    ) -> u32 {
        let mut sampler = Sampler::new(logits.len());
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        sampler.sample(
            &SampleInput {
                logits,
                params: p,
                tokens,
                prompt_len,
                eos: &[2],
            },
            &mut rng,
        )
    }

    #[test]
    fn greedy_takes_argmax_lowest_on_ties() {
        assert_eq!(sample_once(&[0.0, 3.0, 1.0, 3.0], &params(), &[0], 1, 0), 1);
        assert_eq!(sample_once(&[f32::NAN, 1.0], &params(), &[0], 1, 0), 1);
    }

    #[test]
    fn repetition_penalty_divides_positive_multiplies_negative() {
        let mut p = params();
        p.repetition_penalty = 2.0;
        // Token 1 (logit 3) was seen: 3 / 2 = 1.5 < 2 (token 3) -> 3 wins.
        assert_eq!(sample_once(&[0.0, 3.0, -5.0, 2.0], &p, &[1], 1, 0), 3);
        // Negative seen logit gets more negative: token 0 (-1 -> -2) loses to token 2 (-1.5).
        assert_eq!(sample_once(&[-1.0, -9.0, -1.5, -9.0], &p, &[0], 1, 0), 2);
    }

    #[test]
    fn presence_and_frequency_only_count_generated_tokens() {
        let mut p = params();
        p.frequency_penalty = 1.0;
        let logits = [0.0, 5.0, 4.0, 0.0];
        // Token 1 in the prompt only: no penalty.
        assert_eq!(sample_once(&logits, &p, &[1, 1], 2, 0), 1);
        // Token 1 generated twice: 5 - 2 = 3 < 4.
        assert_eq!(sample_once(&logits, &p, &[0, 1, 1], 1, 0), 2);
        let mut p = params();
        p.presence_penalty = 1.5;
        assert_eq!(sample_once(&logits, &p, &[0, 1], 1, 0), 2);
    }

    #[test]
    fn min_new_tokens_masks_eos_and_stop_ids() {
        let mut p = params();
        p.min_new_tokens = 2;
        p.stop_token_ids = vec![3];
        let logits = [0.0, 1.0, 9.0, 8.0];
        assert_eq!(
            sample_once(&logits, &p, &[0, 5], 1, 0),
            1,
            "1 generated < 2"
        );
        assert_eq!(
            sample_once(&logits, &p, &[0, 5, 5], 1, 0),
            2,
            "2 generated: eos allowed"
        );
        p.ignore_eos = true;
        assert_eq!(
            sample_once(&logits, &p, &[0, 5], 1, 0),
            2,
            "eos not masked when ignored"
        );
    }

    #[test]
    fn top_k_one_is_greedy_and_seeded_draws_repeat() {
        let mut p = params();
        p.temperature = 1.0;
        p.top_k = 1;
        let logits = [0.0, 1.0, 0.5, 0.9];
        for seed in 0..20 {
            assert_eq!(sample_once(&logits, &p, &[0], 1, seed), 1);
        }
        p.top_k = 0;
        let a: Vec<u32> = (0..20)
            .map(|s| sample_once(&logits, &p, &[0], 1, s))
            .collect();
        let b: Vec<u32> = (0..20)
            .map(|s| sample_once(&logits, &p, &[0], 1, s))
            .collect();
        assert_eq!(a, b);
        assert!(
            a.iter().any(|&t| t != a[0]),
            "temperature 1 over close logits varies"
        );
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        let mut p = params();
        p.temperature = 1.0;
        // Probabilities ~ [0.665, 0.245, 0.09]: top_p 0.5 keeps only token 0.
        let logits = [2.0, 1.0, 0.0];
        p.top_p = 0.5;
        assert!((0..50).all(|s| sample_once(&logits, &p, &[0], 1, s) == 0));
        p.top_p = 1.0;
        p.min_p = 0.5; // 0.245 / 0.665 < 0.5: only token 0 survives
        assert!((0..50).all(|s| sample_once(&logits, &p, &[0], 1, s) == 0));
        p.min_p = 0.3; // token 1 survives (0.37), token 2 (0.135) does not
        let picks: Vec<u32> = (0..200)
            .map(|s| sample_once(&logits, &p, &[0], 1, s))
            .collect();
        assert!(picks.contains(&1));
        assert!(!picks.contains(&2));
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let mut p = params();
        p.temperature = 1.0;
        let logits = [0.0f32, (3.0f32).ln()]; // p = [0.25, 0.75]
        let ones = (0..4000)
            .filter(|&s| sample_once(&logits, &p, &[0], 1, s) == 1)
            .count();
        assert!((2800..3200).contains(&ones), "got {ones} of 4000");
    }

    #[test]
    fn logprobs_are_log_softmax() {
        let logits = [1.0f32, 2.0, 3.0];
        let sampler = Sampler::new(3);
        let lp = sampler.logprobs(&logits, 0, 2);
        let z: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        let expect = |l: f32| (f64::from(l) - z.ln()) as f32;
        assert!((lp.chosen.logprob - expect(1.0)).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.id).collect::<Vec<_>>(), vec![2, 1]);
        assert!((lp.top[0].logprob - expect(3.0)).abs() < 1e-6);
        assert!(sampler.logprobs(&logits, 1, 0).top.is_empty());
    }

    /// A seeded request picks the same tokens whether the backend or the host samples it:
    /// both take the same single draw and apply the same rules.
    #[test]
    fn backend_rows_and_host_sampling_agree_draw_for_draw() {
        let vocab = 50;
        let logits: Vec<f32> = (0..vocab)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.6)
            .collect();
        let modes = [
            (0.0f32, 0u32, 1.0f32),
            (0.8, 0, 1.0),
            (1.2, 5, 1.0),
            (0.7, 0, 0.8),
            (1.0, 1, 1.0),
        ];
        for (temperature, top_k, top_p) in modes {
            let mut p = params();
            (p.temperature, p.top_k, p.top_p) = (temperature, top_k, top_p);
            for seed in 0..40 {
                let input = SampleInput {
                    logits: &logits,
                    params: &p,
                    tokens: &[0],
                    prompt_len: 1,
                    eos: &[2],
                };
                let mut host_rng = ChaCha8Rng::seed_from_u64(seed);
                let mut backend_rng = ChaCha8Rng::seed_from_u64(seed);
                let host = Sampler::new(vocab).sample(&input, &mut host_rng);
                let row = Sampler::backend_row(&input, &mut backend_rng).expect("plain row");
                assert_eq!(
                    sample_row(&logits, &row, None).token,
                    host,
                    "{p:?} seed {seed}"
                );
                // The next draw is in step too.
                assert_eq!(host_rng.random::<u64>(), backend_rng.random::<u64>());
            }
        }
    }

    #[test]
    fn penalties_masks_and_min_p_stay_on_the_host() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let host_only = |edit: fn(&mut SamplingParams)| {
            let mut p = params();
            p.temperature = 1.0;
            edit(&mut p);
            p
        };
        let cases: [fn(&mut SamplingParams); 5] = [
            |p| p.repetition_penalty = 1.1,
            |p| p.presence_penalty = 0.5,
            |p| p.frequency_penalty = -0.5,
            |p| p.min_p = 0.1,
            |p| p.min_new_tokens = 4,
        ];
        for edit in cases {
            let p = host_only(edit);
            let input = SampleInput {
                logits: &[],
                params: &p,
                tokens: &[0, 1],
                prompt_len: 1,
                eos: &[2],
            };
            assert_eq!(Sampler::backend_row(&input, &mut rng), None, "{p:?}");
        }
        // min_new_tokens with nothing to mask (eos ignored, no stop ids) needs no host work.
        let mut p = host_only(|p| p.min_new_tokens = 4);
        p.ignore_eos = true;
        let input = SampleInput {
            logits: &[],
            params: &p,
            tokens: &[0, 1],
            prompt_len: 1,
            eos: &[2],
        };
        assert!(Sampler::backend_row(&input, &mut rng).is_some());
    }
}
