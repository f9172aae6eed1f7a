//! Sampling on the device (`kernels/sampling.cu`): one launch picks every row's token and
//! computes its raw logprob and the top-n raw logprobs, so only ids and a few floats cross to
//! the host. `reference_sample` is the host statement of the same rules, used by the self-check
//! and tested here.
//!
//! Rules (shared with the kernel): temperature <= 0 or top_k == 1 is greedy (first maximal
//! id). Otherwise weights are `exp((l - max) / T)`; top-k keeps logits >= the k-th largest;
//! top-p keeps logits >= the largest threshold whose kept weight is >= top_p * (top-k
//! weight); ties at a threshold are kept; the token is the first id, in id order, whose
//! running kept weight exceeds `uniform * total`. Logprobs are `log_softmax` of the raw logits.

use allam_backend::{checks, DType, Error as OpError, Tensor};
use allam_kernels::geometry::{self, SAMPLE_MAX_TOP};
use allam_kernels::Kernel;

use crate::storage::{self, raw, DevBuf};
use crate::{device_err, Arg, CudaBackend};

/// One row's sampling parameters. `uniform` is the caller's seeded draw in [0, 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceSampling {
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: u32,
    /// >= 1 disables top-p.
    pub top_p: f32,
    pub uniform: f32,
}

impl DeviceSampling {
    pub fn greedy() -> DeviceSampling {
        DeviceSampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            uniform: 0.0,
        }
    }
}

/// One row's result.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub token: u32,
    /// Raw `log_softmax` of the chosen token.
    pub logprob: f32,
    /// The `n_top` largest raw logprobs, descending (ties by id).
    pub top: Vec<(u32, f32)>,
}

impl CudaBackend {
    /// Samples one token per row of `logits` (an f32 `[rows.len(), vocab]` tensor from
    /// [`CudaBackend::alloc_f32`] + `linear`). `n_top` <= 20 top logprobs per row.
    pub fn sample(
        &mut self,
        logits: &Tensor,
        rows: &[DeviceSampling],
        n_top: usize,
    ) -> Result<Vec<SampledToken>, OpError> {
        const OP: &str = "sample";
        self.bind(OP)?;
        let (n_rows, vocab) = checks::dims_2d(OP, "logits", logits.shape())?;
        if n_rows != rows.len() {
            return Err(OpError::shape(
                OP,
                "logits",
                format!("[{}, vocab] (one row per parameter set)", rows.len()),
                logits.shape(),
            ));
        }
        if n_top > SAMPLE_MAX_TOP {
            return Err(OpError::Unsupported {
                op: OP,
                backend: storage::BACKEND_NAME,
                detail: format!("{n_top} top logprobs (at most {SAMPLE_MAX_TOP})"),
            });
        }
        if n_rows == 0 {
            return Ok(Vec::new());
        }
        let stream = self.dev.stream.clone();
        let logits_ptr = match storage::tensor(OP, "logits", logits)? {
            DevBuf::F32(s) => raw(s, &stream),
            DevBuf::Bf16(_) => {
                return Err(OpError::DTypeMismatch {
                    op: OP,
                    operand: "logits",
                    expected: "f32 (allocate with alloc_f32)".to_owned(),
                    actual: DType::BF16,
                })
            }
        };
        // Parameters packed as one u32 upload: temperature, top_k, top_p, uniform (f32 bits).
        let mut params: Vec<u32> = Vec::with_capacity(4 * n_rows);
        params.extend(rows.iter().map(|r| r.temperature.to_bits()));
        params.extend(rows.iter().map(|r| r.top_k));
        params.extend(rows.iter().map(|r| r.top_p.to_bits()));
        params.extend(
            rows.iter()
                .map(|r| r.uniform.clamp(0.0, 1.0 - f32::EPSILON).to_bits()),
        );
        let params_buf = stream.clone_htod(&params).map_err(|e| device_err(OP, e))?;
        let ids_buf = stream
            .alloc_zeros::<u32>(n_rows * (1 + SAMPLE_MAX_TOP))
            .map_err(|e| device_err(OP, e))?;
        let lp_buf = stream
            .alloc_zeros::<f32>(n_rows * (1 + SAMPLE_MAX_TOP))
            .map_err(|e| device_err(OP, e))?;
        let p = raw(&params_buf, &stream);
        let (ids, lps) = (raw(&ids_buf, &stream), raw(&lp_buf, &stream));
        let n = n_rows as u64;
        let vocab32 = u32::try_from(vocab).map_err(|_| device_err(OP, "vocab exceeds u32"))?;
        let args = [
            Arg::Ptr(logits_ptr),
            Arg::U32(vocab32),
            Arg::U32(vocab32),
            Arg::Ptr(p),
            Arg::Ptr(p + 4 * n),
            Arg::Ptr(p + 8 * n),
            Arg::Ptr(p + 12 * n),
            Arg::U32(n_top as u32),
            Arg::Ptr(ids),
            Arg::Ptr(lps),
            Arg::Ptr(ids + 4 * n),
            Arg::Ptr(lps + 4 * n),
        ];
        self.launch(
            OP,
            Kernel::SampleRows,
            geometry::sample_launch(n_rows as u32),
            &args,
        )?;
        let ids_host = stream.clone_dtoh(&ids_buf).map_err(|e| device_err(OP, e))?;
        let lps_host = stream.clone_dtoh(&lp_buf).map_err(|e| device_err(OP, e))?;
        stream.synchronize().map_err(|e| device_err(OP, e))?;
        let top_base = n_rows;
        Ok((0..n_rows)
            .map(|r| SampledToken {
                token: ids_host[r],
                logprob: lps_host[r],
                top: (0..n_top)
                    .map(|j| {
                        let at = top_base + r * SAMPLE_MAX_TOP + j;
                        (ids_host[at], lps_host[at])
                    })
                    .collect(),
            })
            .collect())
    }
}

/// The host statement of the kernel's rules, in f64. Also returns how far (as a fraction of
/// the kept mass) the draw landed from the chosen token's CDF boundaries: f32-vs-f64 rounding
/// can only change the pick when that is tiny.
pub(crate) fn reference_sample(
    row: &[f32],
    p: &DeviceSampling,
    n_top: usize,
) -> (SampledToken, f64) {
    let l: Vec<f64> = row
        .iter()
        .map(|v| {
            if v.is_nan() {
                f64::NEG_INFINITY
            } else {
                f64::from(*v)
            }
        })
        .collect();
    let mut argmax = 0usize;
    for (i, v) in l.iter().enumerate() {
        if *v > l[argmax] {
            argmax = i;
        }
    }
    let max = l.get(argmax).copied().unwrap_or(f64::NEG_INFINITY);
    let lse = max + l.iter().map(|v| (v - max).exp()).sum::<f64>().ln();

    let mut chosen = argmax;
    let mut margin = f64::INFINITY;
    if p.temperature > 0.0 && p.top_k != 1 && max.is_finite() {
        let inv_t = 1.0 / f64::from(p.temperature);
        let mut desc: Vec<f64> = l.clone();
        desc.sort_by(|a, b| b.total_cmp(a));
        let k = p.top_k as usize;
        let floor = if k == 0 || k >= l.len() {
            f64::NEG_INFINITY
        } else {
            desc[k - 1]
        };
        let w = |v: f64| ((v - max) * inv_t).exp();
        let total: f64 = l.iter().filter(|v| **v >= floor).map(|v| w(*v)).sum();
        let mut threshold = floor;
        if p.top_p < 1.0 {
            let target = f64::from(p.top_p) * total;
            let mut cum = 0.0;
            let mut i = 0;
            while i < desc.len() && desc[i] >= floor {
                let v = desc[i];
                while i < desc.len() && desc[i] == v {
                    cum += w(v);
                    i += 1;
                }
                if cum >= target {
                    threshold = v;
                    break;
                }
            }
        }
        let mass: f64 = l.iter().filter(|v| **v >= threshold).map(|v| w(*v)).sum();
        let target = f64::from(p.uniform) * mass;
        let mut run = 0.0;
        for (i, v) in l.iter().enumerate() {
            if *v >= threshold {
                let before = run;
                run += w(*v);
                if run > target {
                    chosen = i;
                    margin = ((target - before).min(run - target)) / mass;
                    break;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..l.len()).collect();
    order.sort_by(|a, b| l[*b].total_cmp(&l[*a]).then(a.cmp(b)));
    let top = order
        .iter()
        .take(n_top)
        .map(|&i| (i as u32, (l[i] - lse) as f32))
        .collect();
    (
        SampledToken {
            token: chosen as u32,
            logprob: (l[chosen] - lse) as f32,
            top,
        },
        margin,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampled(row: &[f32], temperature: f32, top_k: u32, top_p: f32, uniform: f32) -> u32 {
        let p = DeviceSampling {
            temperature,
            top_k,
            top_p,
            uniform,
        };
        reference_sample(row, &p, 0).0.token
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let row = [1.0, 5.0, 5.0, -1.0];
        assert_eq!(
            reference_sample(&row, &DeviceSampling::greedy(), 0).0.token,
            1
        );
        // top_k = 1 is greedy whatever the temperature and draw.
        assert_eq!(sampled(&row, 2.0, 1, 1.0, 0.99), 1);
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
        // T = 1: p(0) = 0.731; a draw of 0.8 lands on id 1. T = 100: p(0) ~ 0.5025, 0.45 -> id 0.
        assert_eq!(sampled(&row, 1.0, 0, 1.0, 0.8), 1);
        assert_eq!(sampled(&row, 1.0, 0, 1.0, 0.7), 0);
        assert_eq!(sampled(&row, 100.0, 0, 1.0, 0.45), 0);
        assert_eq!(sampled(&row, 100.0, 0, 1.0, 0.51), 1);
    }

    #[test]
    fn logprobs_are_raw_and_top_n_is_sorted_with_id_ties() {
        let row = [0.0, 3.0, 3.0, f32::NAN, 1.0];
        let (s, _) = reference_sample(&row, &DeviceSampling::greedy(), 3);
        let lse = (3.0f64.exp() * 2.0 + 1.0 + 1.0f64.exp()).ln();
        assert!((f64::from(s.logprob) - (3.0 - lse)).abs() < 1e-6);
        let ids: Vec<u32> = s.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 2, 4]);
        assert!((f64::from(s.top[2].1) - (1.0 - lse)).abs() < 1e-6);
    }
}
