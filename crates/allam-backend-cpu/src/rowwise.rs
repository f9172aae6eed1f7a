//! Row-wise ops on `[rows, cols]` f32 activations: embedding gather, RMSNorm (plain and fused
//! with the residual add), SiLU-and-mul, row gather. Parallel over rows when there are many.

use rayon::prelude::*;

/// Rows below which ops stay on the calling thread.
const PARALLEL_MIN_ROWS: usize = 16;

/// `out[t] = table[ids[t]]`; ids are checked by the caller.
pub(crate) fn embedding(table: &[f32], hidden: usize, ids: &[u32], out: &mut [f32]) {
    for (row, id) in out.chunks_exact_mut(hidden).zip(ids) {
        let start = *id as usize * hidden;
        row.copy_from_slice(&table[start..start + hidden]);
    }
}

fn norm_row(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    // f64 sum of squares: costs nothing next to the matmuls and keeps the mean exact to f32.
    let sum_sq: f64 = x.iter().map(|v| f64::from(*v) * f64::from(*v)).sum();
    let inv = (1.0 / (sum_sq / x.len() as f64 + f64::from(eps)).sqrt()) as f32;
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * inv * w;
    }
}

/// `out = x / sqrt(mean(x^2) + eps) * weight` per row of width `weight.len()`.
pub(crate) fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let hidden = weight.len();
    if x.len() / hidden < PARALLEL_MIN_ROWS {
        for (xr, or) in x.chunks_exact(hidden).zip(out.chunks_exact_mut(hidden)) {
            norm_row(xr, weight, eps, or);
        }
    } else {
        x.par_chunks_exact(hidden)
            .zip(out.par_chunks_exact_mut(hidden))
            .for_each(|(xr, or)| norm_row(xr, weight, eps, or));
    }
}

/// `residual += x; out = rms_norm(residual)` per row.
pub(crate) fn add_rms_norm(
    residual: &mut [f32],
    x: &[f32],
    weight: &[f32],
    eps: f32,
    out: &mut [f32],
) {
    let hidden = weight.len();
    let body = |(rr, xr, or): (&mut [f32], &[f32], &mut [f32])| {
        for (r, v) in rr.iter_mut().zip(xr) {
            *r += v;
        }
        norm_row(rr, weight, eps, or);
    };
    if x.len() / hidden < PARALLEL_MIN_ROWS {
        residual
            .chunks_exact_mut(hidden)
            .zip(x.chunks_exact(hidden))
            .zip(out.chunks_exact_mut(hidden))
            .for_each(|((rr, xr), or)| body((rr, xr, or)));
    } else {
        residual
            .par_chunks_exact_mut(hidden)
            .zip(x.par_chunks_exact(hidden))
            .zip(out.par_chunks_exact_mut(hidden))
            .for_each(|((rr, xr), or)| body((rr, xr, or)));
    }
}

fn silu_mul_row(gate_up: &[f32], out: &mut [f32]) {
    let (gate, up) = gate_up.split_at(out.len());
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// `out[r] = silu(gate_up[r][..n]) * gate_up[r][n..]` with `n = width`.
pub(crate) fn silu_mul(gate_up: &[f32], width: usize, out: &mut [f32]) {
    if out.len() / width < PARALLEL_MIN_ROWS {
        for (g, o) in gate_up
            .chunks_exact(2 * width)
            .zip(out.chunks_exact_mut(width))
        {
            silu_mul_row(g, o);
        }
    } else {
        gate_up
            .par_chunks_exact(2 * width)
            .zip(out.par_chunks_exact_mut(width))
            .for_each(|(g, o)| silu_mul_row(g, o));
    }
}

/// `out[i] = x[rows[i]]`; rows are checked by the caller.
pub(crate) fn gather_rows(x: &[f32], cols: usize, rows: &[u32], out: &mut [f32]) {
    for (o, r) in out.chunks_exact_mut(cols).zip(rows) {
        let start = *r as usize * cols;
        o.copy_from_slice(&x[start..start + cols]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_rms(x: &[f32], w: &[f32], eps: f64) -> Vec<f32> {
        let mean = x.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / x.len() as f64;
        let inv = 1.0 / (mean + eps).sqrt();
        x.iter()
            .zip(w)
            .map(|(v, w)| (f64::from(*v) * inv * f64::from(*w)) as f32)
            .collect()
    }

    #[test]
    fn rms_norm_matches_formula_serial_and_parallel() {
        for rows in [1usize, 40] {
            let hidden = 6;
            let x: Vec<f32> = (0..rows * hidden)
                .map(|i| (i as f32 * 0.37).sin() * 3.0)
                .collect();
            let w: Vec<f32> = (0..hidden).map(|i| 1.0 + i as f32 * 0.1).collect();
            let mut out = vec![0.0; x.len()];
            rms_norm(&x, &w, 1e-5, &mut out);
            for r in 0..rows {
                let want = naive_rms(&x[r * hidden..(r + 1) * hidden], &w, 1e-5);
                for (a, b) in out[r * hidden..(r + 1) * hidden].iter().zip(&want) {
                    assert!((a - b).abs() < 1e-5, "{a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn add_rms_norm_updates_residual_then_normalizes() {
        for rows in [2usize, 33] {
            let hidden = 4;
            let mut residual: Vec<f32> = (0..rows * hidden).map(|i| i as f32 * 0.5 - 3.0).collect();
            let x: Vec<f32> = (0..rows * hidden).map(|i| (i as f32).cos()).collect();
            let w = vec![0.5, 1.0, 1.5, 2.0];
            let summed: Vec<f32> = residual.iter().zip(&x).map(|(a, b)| a + b).collect();
            let mut out = vec![0.0; x.len()];
            add_rms_norm(&mut residual, &x, &w, 1e-6, &mut out);
            assert_eq!(residual, summed);
            for r in 0..rows {
                let want = naive_rms(&summed[r * hidden..(r + 1) * hidden], &w, 1e-6);
                for (a, b) in out[r * hidden..(r + 1) * hidden].iter().zip(&want) {
                    assert!((a - b).abs() < 1e-5, "{a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn silu_mul_matches_formula() {
        for rows in [1usize, 20] {
            let n = 3;
            let gate_up: Vec<f32> = (0..rows * 2 * n).map(|i| i as f32 * 0.25 - 2.0).collect();
            let mut out = vec![0.0; rows * n];
            silu_mul(&gate_up, n, &mut out);
            for r in 0..rows {
                for i in 0..n {
                    let g = f64::from(gate_up[r * 2 * n + i]);
                    let u = f64::from(gate_up[r * 2 * n + n + i]);
                    let want = g / (1.0 + (-g).exp()) * u;
                    assert!((f64::from(out[r * n + i]) - want).abs() < 1e-5 * (1.0 + want.abs()));
                }
            }
        }
    }

    #[test]
    fn embedding_and_gather_copy_the_named_rows() {
        let table: Vec<f32> = (0..12).map(|i| i as f32).collect(); // 4 rows of 3
        let mut out = vec![0.0; 9];
        embedding(&table, 3, &[2, 0, 2], &mut out);
        assert_eq!(out, vec![6.0, 7.0, 8.0, 0.0, 1.0, 2.0, 6.0, 7.0, 8.0]);
        let mut picked = vec![0.0; 3];
        gather_rows(&out, 3, &[1], &mut picked);
        assert_eq!(picked, vec![0.0, 1.0, 2.0]);
    }
}
