//! The sampling rules every backend implements in [`crate::Backend::sample`], and their host
//! statement [`sample_row`].
//!
//! One statement for every device, so that a request's tokens depend on its logits, its
//! parameters and its seed, never on whether the draw ran in a GPU kernel
//! (`kernels/sampling.cu`) or on the host (the CPU twin, and the engine's path for requests
//! with penalties):
//! - `temperature <= 0` or `top_k == 1` is greedy: the first maximal id; NaN never wins.
//! - Otherwise weights are `exp((l - max) / T)`. Top-k keeps the logits `>=` the k-th largest;
//!   top-p then keeps the logits `>=` the largest threshold whose kept weight reaches
//!   `top_p` times the top-k weight (ties at a threshold are all kept, so the rule does not
//!   depend on how a sort orders equal logits).
//! - The token is the first id, **in id order**, whose running kept weight exceeds
//!   `uniform * kept weight`: a scan in id order needs no sort on the device.
//! - Logprobs are `log_softmax` of the raw logits (before temperature or filtering), the
//!   chosen token's and the `n` largest (descending, ties by id), as vLLM reports them. They
//!   are computed only when asked for (`logprobs: Some(n)`): a softmax denominator over the
//!   vocabulary costs more on a CPU than the pick itself.

/// Most top logprobs a backend reports per row (the kernel's fixed per-row buffer).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// One row's sampling parameters. `uniform` is the caller's seeded draw in `[0, 1)`, so the
/// result is reproducible and independent of the batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowSampling {
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: u32,
    /// `>= 1` disables top-p.
    pub top_p: f32,
    pub uniform: f32,
}

impl RowSampling {
    pub fn greedy() -> RowSampling {
        RowSampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            uniform: 0.0,
        }
    }

    /// Whether the row ignores its draw.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }

    /// The draw as every backend uses it: inside `[0, 1)` even for a careless caller.
    pub fn clamped_uniform(&self) -> f32 {
        if self.uniform.is_nan() {
            0.0
        } else {
            self.uniform.clamp(0.0, 1.0 - f32::EPSILON)
        }
    }
}

/// One row's result.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub token: u32,
    /// Raw `log_softmax` of the chosen token (NaN when no logprobs were asked for).
    pub logprob: f32,
    /// The `n` largest raw logprobs of `logprobs: Some(n)`, descending (ties by id).
    pub top: Vec<(u32, f32)>,
}

/// NaN reads as `-inf` everywhere: a broken logit can never be chosen or outrank a real one.
fn value(l: f32) -> f64 {
    if l.is_nan() {
        f64::NEG_INFINITY
    } else {
        f64::from(l)
    }
}

/// [`sample_row_with_margin`] without the margin.
pub fn sample_row(row: &[f32], p: &RowSampling, logprobs: Option<usize>) -> SampledToken {
    sample_row_with_margin(row, p, logprobs).0
}

/// Applies the module's rules to one row on the host, in f64. Also returns how far (as a
/// fraction of the kept weight) the draw landed from the chosen token's CDF boundaries
/// (infinite for greedy rows): a device that accumulates in f32 can only pick differently
/// when that is tiny, which is how the GPU self-check tells rounding from a bug.
pub fn sample_row_with_margin(
    row: &[f32],
    p: &RowSampling,
    logprobs: Option<usize>,
) -> (SampledToken, f64) {
    if row.is_empty() {
        // Callers check shapes; an empty row still must not panic.
        let none = SampledToken {
            token: 0,
            logprob: f32::NEG_INFINITY,
            top: Vec::new(),
        };
        return (none, f64::INFINITY);
    }
    let argmax = argmax(row);
    let max = value(row[argmax]);
    let mut chosen = argmax;
    let mut margin = f64::INFINITY;
    if !p.is_greedy() && max.is_finite() {
        (chosen, margin) = draw(row, p, max);
    }

    let Some(n_top) = logprobs else {
        let token = SampledToken {
            token: chosen as u32,
            logprob: f32::NAN,
            top: Vec::new(),
        };
        return (token, margin);
    };
    let (logprob, top) = log_softmax_given_max(row, max as f32, chosen, n_top);
    (
        SampledToken {
            token: chosen as u32,
            logprob,
            top,
        },
        margin,
    )
}

/// Index of the largest logit: the lowest among ties; NaN never wins (0 when nothing does).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0usize;
    let mut best_logit = f32::NEG_INFINITY;
    for (i, &l) in row.iter().enumerate() {
        // NaN compares false.
        if l > best_logit {
            best = i;
            best_logit = l;
        }
    }
    best
}

/// `log_softmax(row)` at `chosen` and at the row's `n` largest logits (descending, ties by
/// id). NaN logits count as `-inf`. The host's one statement of the logprobs every path
/// reports.
pub fn log_softmax_at(row: &[f32], chosen: usize, n: usize) -> (f32, Vec<(u32, f32)>) {
    let max = row
        .get(argmax(row))
        .map_or(f32::NEG_INFINITY, |&l| value(l) as f32);
    log_softmax_given_max(row, max, chosen, n)
}

/// [`log_softmax_at`] for a caller that already knows the row's largest logit `max`
/// (`-inf` when there is none).
fn log_softmax_given_max(row: &[f32], max: f32, chosen: usize, n: usize) -> (f32, Vec<(u32, f32)>) {
    let lse = if max.is_finite() {
        // Exponentials in f32 (to about an ulp), summed in f64.
        // Two passes: the f32 one vectorizes, the f64 sum keeps 64k terms accurate.
        let exps: Vec<f32> = row.iter().map(|&l| exp_nonpositive(l - max)).collect();
        let sum: f64 = exps.iter().map(|&e| f64::from(e)).sum();
        f64::from(max) + sum.ln()
    } else {
        f64::from(max)
    };
    let at = |i: usize| (row.get(i).map_or(f64::NEG_INFINITY, |&l| value(l)) - lse) as f32;
    let top = top_n(row, n)
        .into_iter()
        .map(|i| (i as u32, at(i)))
        .collect();
    (at(chosen), top)
}

/// `exp(x)` for `x <= 0` (NaN and `-inf` give 0), in f32 to a few ulps: Cody-Waite range
/// reduction and a degree-6 polynomial, branch-free so a loop over a row vectorizes (the
/// softmax denominator of logprobs; `cargo bench -p allam-backend --bench sample`).
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Below this exp(x) is subnormal: report 0, which also covers -inf and NaN.
    let live = x >= -87.3;
    let x = if live { x.min(0.0) } else { 0.0 };
    // Round to nearest with the 1.5 * 2^23 trick: the integer lands in the low mantissa bits,
    // so neither a libm call nor a float-to-int cast stops the loop from vectorizing.
    const ROUNDER: f32 = 12_582_912.0;
    let shifted = x * LOG2E + ROUNDER;
    let n = shifted - ROUNDER;
    let n_bits = shifted.to_bits().wrapping_sub(ROUNDER.to_bits());
    let r = x - n * LN2_HI - n * LN2_LO;
    let poly = 1.987_569_2e-4_f32;
    let poly = poly * r + 1.398_199_9e-3;
    let poly = poly * r + 8.333_452e-3;
    let poly = poly * r + 4.166_579_6e-2;
    let poly = poly * r + 1.666_666_5e-1;
    let poly = poly * r + 0.5;
    let e = 1.0 + r + r * r * poly;
    // 2^n for n in [-126, 0] built from the exponent bits (n_bits is n modulo 2^32).
    let scale = f32::from_bits(n_bits.wrapping_add(127) << 23);
    if live {
        e * scale
    } else {
        0.0
    }
}

/// The stochastic pick of a row whose largest logit `max` is finite: (id, margin).
/// Weights are computed once (f32 exponentials, f64 sums); top-p sorts only as many of the
/// largest logits as it needs.
fn draw(row: &[f32], p: &RowSampling, max: f64) -> (usize, f64) {
    let vals: Vec<f32> = row
        .iter()
        .map(|&l| if l.is_nan() { f32::NEG_INFINITY } else { l })
        .collect();
    let (max32, inv_t) = (max as f32, 1.0 / p.temperature);
    // Called per element in branchy loops: the C library's `expf` is the faster one there.
    let weight = |v: f32| f64::from(((v - max32) * inv_t).exp());
    let k = p.top_k as usize;
    let floor = if k == 0 || k >= vals.len() {
        f32::NEG_INFINITY
    } else {
        let mut scratch = vals.clone();
        let (_, kth, _) = scratch.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        *kth
    };
    let w: Vec<f64> = vals
        .iter()
        .map(|&v| if v >= floor { weight(v) } else { 0.0 })
        .collect();
    let mut threshold = floor;
    if p.top_p < 1.0 {
        let target = f64::from(p.top_p) * w.iter().sum::<f64>();
        threshold = top_p_threshold(&vals, floor, target, weight);
    }
    let mass: f64 = vals
        .iter()
        .zip(&w)
        .filter(|(v, _)| **v >= threshold)
        .map(|(_, w)| w)
        .sum();
    let target = f64::from(p.clamped_uniform()) * mass;
    let mut run = 0.0;
    let mut last_kept = 0usize;
    for (i, (&v, &wi)) in vals.iter().zip(&w).enumerate() {
        if v >= threshold {
            let before = run;
            run += wi;
            last_kept = i;
            if run > target {
                return (i, (target - before).min(run - target) / mass);
            }
        }
    }
    // Only reachable when rounding leaves the draw at the very top of the mass.
    (last_kept, 0.0)
}

/// The largest logit `t >= floor` such that the weight of the logits `>= t` reaches
/// `target`. Sorts a growing prefix of the largest logits. Only the prefix's last tie group
/// can have copies outside it, so its running weight can only be short: a decision is never
/// early, and a missed one widens the prefix.
fn top_p_threshold(vals: &[f32], floor: f32, target: f64, weight: impl Fn(f32) -> f64) -> f32 {
    let mut kept: Vec<f32> = vals.iter().copied().filter(|v| *v >= floor).collect();
    let n = kept.len();
    let mut m = n.min(256);
    loop {
        if m < n {
            kept.select_nth_unstable_by(m - 1, |a, b| b.total_cmp(a));
        }
        let prefix = &mut kept[..m];
        prefix.sort_unstable_by(|a, b| b.total_cmp(a));
        let mut cumulative = 0.0;
        let mut i = 0;
        while i < m {
            let v = prefix[i];
            while i < m && prefix[i] == v {
                cumulative += weight(v);
                i += 1;
            }
            if cumulative >= target {
                return v;
            }
        }
        if m == n {
            return floor; // rounding kept the target out of reach: keep everything
        }
        m = n.min(m * 4);
    }
}

/// Ids of the `n` largest logits, descending, ties by id: one pass keeping the best `n` in a
/// small sorted buffer (ids arrive in order, so a later equal value goes after the earlier).
fn top_n(row: &[f32], n: usize) -> Vec<usize> {
    let n = n.min(row.len());
    let mut best: Vec<(f64, usize)> = Vec::with_capacity(n + 1);
    if n == 0 {
        return Vec::new();
    }
    for (i, &l) in row.iter().enumerate() {
        let v = value(l);
        if best.len() == n && v <= best[n - 1].0 {
            continue;
        }
        let at = best.partition_point(|&(b, _)| b >= v);
        best.insert(at, (v, i));
        best.truncate(n);
    }
    best.into_iter().map(|(_, i)| i).collect()
}

#[cfg(test)]
mod tests {
    use std::cmp::Ordering;

    use super::*;

    fn desc(a: f64, b: f64) -> Ordering {
        b.total_cmp(&a)
    }

    fn sampled(row: &[f32], temperature: f32, top_k: u32, top_p: f32, uniform: f32) -> u32 {
        let p = RowSampling {
            temperature,
            top_k,
            top_p,
            uniform,
        };
        sample_row(row, &p, None).token
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let row = [1.0, 5.0, 5.0, -1.0];
        assert_eq!(sample_row(&row, &RowSampling::greedy(), Some(0)).token, 1);
        // top_k = 1 is greedy whatever the temperature and draw.
        assert_eq!(sampled(&row, 2.0, 1, 1.0, 0.99), 1);
        // NaN never wins, even first.
        assert_eq!(sampled(&[f32::NAN, 1.0], 0.0, 0, 1.0, 0.0), 1);
    }

    #[test]
    fn top_k_keeps_the_k_largest_and_draws_in_id_order() {
        let row = [0.0, 10.0, 9.0, -5.0];
        assert_eq!(sampled(&row, 1.0, 2, 1.0, 0.0), 1);
        assert_eq!(sampled(&row, 1.0, 2, 1.0, 0.999), 2);
        // p(1) = 1 / (1 + e^-1) = 0.731 within the top 2.
        assert_eq!(sampled(&row, 1.0, 2, 1.0, 0.72), 1);
        assert_eq!(sampled(&row, 1.0, 2, 1.0, 0.74), 2);
    }

    #[test]
    fn top_p_cuts_the_tail_and_keeps_ties() {
        // Probabilities 0.5, 0.25, 0.25 (ties), 0: top_p 0.5 keeps only id 0; 0.6 keeps the
        // tie pair too (both at the threshold).
        let l2 = 2f32.ln();
        let row = [l2, 0.0, 0.0, f32::NEG_INFINITY];
        assert_eq!(sampled(&row, 1.0, 0, 0.5, 0.99), 0);
        assert_eq!(sampled(&row, 1.0, 0, 0.6, 0.99), 2);
        assert_eq!(sampled(&row, 1.0, 0, 0.6, 0.6), 1);
    }

    #[test]
    fn temperature_flattens_the_draw() {
        let row = [1.0, 0.0];
        // T = 1: p(0) = 0.731; a draw of 0.8 lands on id 1. T = 100: p(0) ~ 0.5025.
        assert_eq!(sampled(&row, 1.0, 0, 1.0, 0.8), 1);
        assert_eq!(sampled(&row, 1.0, 0, 1.0, 0.7), 0);
        assert_eq!(sampled(&row, 100.0, 0, 1.0, 0.45), 0);
        assert_eq!(sampled(&row, 100.0, 0, 1.0, 0.51), 1);
    }

    #[test]
    fn an_empty_row_is_not_a_panic() {
        let s = sample_row(&[], &RowSampling::greedy(), Some(3));
        assert_eq!((s.token, s.top.len()), (0, 0));
    }

    #[test]
    fn a_draw_of_one_or_nan_stays_inside_the_kept_mass() {
        let row = [0.0, 0.0, f32::NEG_INFINITY];
        assert_eq!(sampled(&row, 1.0, 0, 1.0, 1.0), 1);
        assert_eq!(sampled(&row, 1.0, 0, 1.0, f32::NAN), 0);
    }

    #[test]
    fn logprobs_are_raw_and_top_n_is_sorted_with_id_ties() {
        let row = [0.0, 3.0, 3.0, f32::NAN, 1.0];
        let s = sample_row(&row, &RowSampling::greedy(), Some(3));
        let lse = (3.0f64.exp() * 2.0 + 1.0 + 1.0f64.exp()).ln();
        assert!((f64::from(s.logprob) - (3.0 - lse)).abs() < 1e-6);
        let ids: Vec<u32> = s.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 2, 4]);
        assert!((f64::from(s.top[2].1) - (1.0 - lse)).abs() < 1e-6);
        // Temperature does not change the reported logprobs.
        let hot = RowSampling {
            temperature: 5.0,
            top_k: 0,
            top_p: 1.0,
            uniform: 0.3,
        };
        let t = sample_row(&row, &hot, Some(3));
        assert_eq!(t.top, s.top);
        // Not asking for logprobs changes nothing but the logprobs.
        let u = sample_row(&row, &hot, None);
        assert_eq!(u.token, t.token);
        assert!(u.logprob.is_nan() && u.top.is_empty());
    }

    /// The frequencies of many seeded draws follow the kept, renormalised distribution.
    #[test]
    fn draws_follow_the_filtered_distribution() {
        let row = [2.0f32, 1.0, 0.5, 0.0, -1.0, -3.0];
        let p = |uniform| RowSampling {
            temperature: 0.7,
            top_k: 4,
            top_p: 0.9,
            uniform,
        };
        let n = 20_000;
        let mut counts = [0usize; 6];
        for i in 0..n {
            let u = (i as f32 + 0.5) / n as f32;
            counts[sample_row(&row, &p(u), None).token as usize] += 1;
        }
        // Expected: top-4 ids 0..4, weights exp((l - 2) / 0.7); top-p 0.9 then drops id 3
        // when the first three already hold >= 90%.
        let w: Vec<f64> = row[..4]
            .iter()
            .map(|&l| ((f64::from(l) - 2.0) / 0.7).exp())
            .collect();
        let total: f64 = w.iter().sum();
        let keep = if (w[0] + w[1] + w[2]) / total >= 0.9 {
            3
        } else {
            4
        };
        let kept: f64 = w[..keep].iter().sum();
        for id in 0..6 {
            let want = if id < keep { w[id] / kept } else { 0.0 };
            let got = counts[id] as f64 / n as f64;
            assert!((got - want).abs() < 2e-3, "id {id}: {got} vs {want}");
        }
    }

    /// The rules' plain statement (full sort, f64 throughout): the oracle for `draw`.
    fn reference_draw(row: &[f32], p: &RowSampling, max: f64) -> (usize, f64) {
        let inv_t = 1.0 / f64::from(p.temperature);
        let w = |v: f64| ((v - max) * inv_t).exp();
        let k = p.top_k as usize;
        let floor = if k == 0 || k >= row.len() {
            f64::NEG_INFINITY
        } else {
            let mut values: Vec<f64> = row.iter().map(|&l| value(l)).collect();
            let (_, kth, _) = values.select_nth_unstable_by(k - 1, |a, b| desc(*a, *b));
            *kth
        };
        let kept_weight = |threshold: f64| -> f64 {
            row.iter()
                .map(|&l| value(l))
                .filter(|v| *v >= threshold)
                .map(w)
                .sum()
        };
        let mut threshold = floor;
        if p.top_p < 1.0 {
            let target = f64::from(p.top_p) * kept_weight(floor);
            let mut kept: Vec<f64> = row
                .iter()
                .map(|&l| value(l))
                .filter(|v| *v >= floor)
                .collect();
            kept.sort_unstable_by(|a, b| desc(*a, *b));
            let mut cumulative = 0.0;
            let mut i = 0;
            while i < kept.len() {
                let v = kept[i];
                while i < kept.len() && kept[i] == v {
                    cumulative += w(v);
                    i += 1;
                }
                if cumulative >= target {
                    threshold = v;
                    break;
                }
            }
        }
        let mass = kept_weight(threshold);
        let target = f64::from(p.clamped_uniform()) * mass;
        let mut run = 0.0;
        let mut last_kept = 0usize;
        for (i, &l) in row.iter().enumerate() {
            let v = value(l);
            if v >= threshold {
                let before = run;
                run += w(v);
                last_kept = i;
                if run > target {
                    return (i, (target - before).min(run - target) / mass);
                }
            }
        }
        // Only reachable when rounding leaves the draw at the very top of the mass.
        (last_kept, 0.0)
    }

    /// The fast `draw` picks what the plain statement picks, on rows full of ties and with
    /// every filter, except where the draw lands within rounding of a CDF boundary.
    #[test]
    fn the_fast_draw_matches_the_plain_statement() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut checked = 0;
        for case in 0..400 {
            let len = [5usize, 64, 700, 3000][case % 4];
            // Quantised logits make long tie groups, including at the top-p boundary.
            let step = [0.0f64, 0.25, 1.0][case % 3];
            let row: Vec<f32> = (0..len)
                .map(|_| {
                    let v = (next() - 0.5) * 16.0;
                    if step > 0.0 {
                        ((v / step).round() * step) as f32
                    } else {
                        v as f32
                    }
                })
                .collect();
            let p = RowSampling {
                temperature: [0.3f32, 0.8, 1.0, 2.5][case % 4],
                top_k: [0u32, 1, 5, 50, 1000][case % 5],
                top_p: [1.0f32, 0.9, 0.5, 0.05, 0.999][(case / 5) % 5],
                uniform: next() as f32,
            };
            if p.is_greedy() {
                continue;
            }
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let (want, margin) = reference_draw(&row, &p, max);
            let (got, _) = draw(&row, &p, max);
            if margin > 1e-5 {
                assert_eq!(got, want, "case {case}: {p:?}");
                checked += 1;
            }
        }
        assert!(checked > 250, "only {checked} cases were decisive");
    }

    #[test]
    fn the_exponential_is_exact_to_a_few_ulps_and_zero_below_range() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp_nonpositive(x));
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_3;
        }
        assert!(
            worst < 4.0 * f64::from(f32::EPSILON),
            "relative error {worst}"
        );
        assert_eq!(exp_nonpositive(0.0), 1.0);
        for dead in [-88.0f32, -1e30, f32::NEG_INFINITY, f32::NAN] {
            assert_eq!(exp_nonpositive(dead), 0.0, "{dead}");
        }
    }

    #[test]
    fn top_n_is_the_sorted_prefix_with_id_ties() {
        let row: Vec<f32> = (0..500)
            .map(|i| match i % 7 {
                0 => f32::NAN,
                1 => f32::NEG_INFINITY,
                _ => ((i * 37 % 23) as f32 - 11.0) / 2.0,
            })
            .collect();
        let mut sorted: Vec<usize> = (0..row.len()).collect();
        sorted.sort_by(|a, b| desc(value(row[*a]), value(row[*b])).then(a.cmp(b)));
        for n in [0usize, 1, 2, 5, 20, 499, 500, 600] {
            assert_eq!(top_n(&row, n), sorted[..n.min(500)], "n = {n}");
        }
    }
}
