//! Turning one row of logits into one token, and logprobs.
//!
//! Order of processing (as in vLLM/HF): repetition penalty over prompt + generated tokens
//! (HF: positive logits divided, negative multiplied); presence / frequency penalties over
//! generated tokens (OpenAI: `logit -= presence * [count > 0] + frequency * count`); while
//! fewer than `min_new_tokens` were generated, eos (unless `ignore_eos`) and
//! `stop_token_ids` are masked; then greedy argmax, or temperature, top-k, top-p, min-p and
//! one draw from the sequence's own RNG.
//!
//! Determinism: the result depends only on the logits, the parameters, the sequence's tokens
//! and its RNG state, never on the batch. Candidates are visited in a fixed order (token id,
//! or probability then id after a sort), and exactly one RNG draw is taken per sampled step.
//!
//! Logprobs are those of the model's raw distribution (`log_softmax` of the logits before any
//! penalty, mask or temperature), which is what the goldens and vLLM's default report.

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

/// Reusable buffers, so a step allocates nothing per sequence.
pub(crate) struct Sampler {
    work: Vec<f32>,
    seen: Vec<u32>,
    candidates: Vec<(u32, f32)>,
    ids: Vec<u32>,
}

impl Sampler {
    pub(crate) fn new(vocab_size: usize) -> Sampler {
        Sampler {
            work: Vec::with_capacity(vocab_size),
            seen: vec![0; vocab_size],
            candidates: Vec::with_capacity(vocab_size),
            ids: Vec::with_capacity(vocab_size),
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
            return argmax(&self.work);
        }
        self.sample_stochastic(params, rng)
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

    fn sample_stochastic(&mut self, params: &SamplingParams, rng: &mut ChaCha8Rng) -> TokenId {
        let candidates = &mut self.candidates;
        candidates.clear();
        candidates.extend(
            self.work
                .iter()
                .enumerate()
                .filter(|(_, l)| l.is_finite())
                .map(|(i, &l)| (i as u32, l)),
        );
        if candidates.is_empty() {
            // Everything masked or non-finite: fall back to the least bad raw choice.
            return argmax(&self.work);
        }
        let by_logit_desc =
            |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let top_k = params.top_k as usize;
        let mut sorted = false;
        if top_k > 0 && top_k < candidates.len() {
            candidates.select_nth_unstable_by(top_k - 1, by_logit_desc);
            candidates.truncate(top_k);
            candidates.sort_unstable_by(by_logit_desc);
            sorted = true;
        }
        let max_logit = candidates
            .iter()
            .map(|c| c.1)
            .fold(f32::NEG_INFINITY, f32::max);
        let temperature = params.temperature.max(1e-6);
        for c in candidates.iter_mut() {
            c.1 = ((c.1 - max_logit) / temperature).exp();
        }
        if params.top_p < 1.0 {
            if !sorted {
                candidates.sort_unstable_by(by_logit_desc);
            }
            let total: f64 = candidates.iter().map(|c| f64::from(c.1)).sum();
            let threshold = f64::from(params.top_p) * total;
            let mut cumulative = 0.0f64;
            let mut keep = candidates.len();
            for (i, c) in candidates.iter().enumerate() {
                cumulative += f64::from(c.1);
                if cumulative >= threshold {
                    keep = i + 1;
                    break;
                }
            }
            candidates.truncate(keep.max(1));
        }
        if params.min_p > 0.0 {
            // After the max-shift the most likely candidate has weight 1.
            let p_max = candidates.iter().map(|c| c.1).fold(0.0f32, f32::max);
            let threshold = params.min_p * p_max;
            candidates.retain(|c| c.1 >= threshold);
        }
        let total: f64 = candidates.iter().map(|c| f64::from(c.1)).sum();
        let mut target = rng.random::<f64>() * total;
        for c in candidates.iter() {
            target -= f64::from(c.1);
            if target < 0.0 {
                return c.0;
            }
        }
        candidates.last().map(|c| c.0).unwrap_or(0)
    }

    /// Logprob of `chosen` and the `top_n` most likely tokens under `log_softmax(logits)`.
    pub(crate) fn logprobs(
        &mut self,
        logits: &[f32],
        chosen: TokenId,
        top_n: usize,
    ) -> StepLogprobs {
        let lse = log_sum_exp(logits);
        let logprob_of = |id: u32| {
            logits
                .get(id as usize)
                .map_or(f32::NEG_INFINITY, |&l| (f64::from(l) - lse) as f32)
        };
        let mut top = Vec::with_capacity(top_n);
        if top_n > 0 {
            let ids = &mut self.ids;
            ids.clear();
            ids.extend(0..logits.len() as u32);
            let by_desc = |a: &u32, b: &u32| {
                logits[*b as usize]
                    .total_cmp(&logits[*a as usize])
                    .then(a.cmp(b))
            };
            let n = top_n.min(ids.len());
            if n < ids.len() {
                ids.select_nth_unstable_by(n - 1, by_desc);
                ids.truncate(n);
            }
            ids.sort_unstable_by(by_desc);
            top.extend(ids.iter().map(|&id| TokenLogprob {
                id,
                logprob: logprob_of(id),
            }));
        }
        StepLogprobs {
            chosen: TokenLogprob {
                id: chosen,
                logprob: logprob_of(chosen),
            },
            top,
        }
    }
}

fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = logits
        .iter()
        .copied()
        .filter(|l| !l.is_nan())
        .fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return f64::from(max);
    }
    let sum: f64 = logits
        .iter()
        .filter(|l| !l.is_nan())
        .map(|&l| (f64::from(l) - f64::from(max)).exp())
        .sum();
    f64::from(max) + sum.ln()
}

/// Index of the largest logit; the lowest index among ties; NaN never wins.
fn argmax(logits: &[f32]) -> TokenId {
    let mut best = 0usize;
    let mut best_logit = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        if l > best_logit {
            best = i;
            best_logit = l;
        }
    }
    best as TokenId
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
        let mut sampler = Sampler::new(3);
        let lp = sampler.logprobs(&logits, 0, 2);
        let z: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        let expect = |l: f32| (f64::from(l) - z.ln()) as f32;
        assert!((lp.chosen.logprob - expect(1.0)).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.id).collect::<Vec<_>>(), vec![2, 1]);
        assert!((lp.top[0].logprob - expect(3.0)).abs() < 1e-6);
        assert!(sampler.logprobs(&logits, 1, 0).top.is_empty());
    }
}
