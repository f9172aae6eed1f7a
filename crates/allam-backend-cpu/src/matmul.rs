//! `out = x W^T` in f32, the only op whose speed matters on the CPU.
//!
//! Weights are `[n, k]` row-major, so every output element is a dot product of two contiguous
//! rows. The work is split over rayon tasks by output column (weight row) chunks; inside a
//! task, a block of `W_BLOCK` weight rows stays in L2 while every 4-row group of `x` streams
//! past it, and a register-tiled micro-kernel computes a `4 x 3` tile of outputs per pass over
//! `k` (4 x-rows and 3 w-rows loaded once per 8 lanes, 12 accumulators: 16 AVX registers).
//! Decode (one row) is memory bound on the weight stream; prefill reuses each loaded
//! weight vector for 4 rows.
//!
//! On x86-64 with AVX2+FMA (checked at run time) the micro-kernel uses intrinsics; elsewhere a
//! portable version written for auto-vectorization computes the same tiles.

use rayon::prelude::*;

/// Rows of `x` per micro-kernel tile.
const TILE_ROWS: usize = 4;
/// Weight rows per micro-kernel tile.
const TILE_COLS: usize = 3;
/// Weight rows kept hot while all of `x` streams past (multiple of `TILE_COLS`).
const W_BLOCK: usize = 48;
/// Below this many multiply-adds the rayon fan-out costs more than it saves.
const PARALLEL_MIN_MACS: usize = 1 << 16;

/// The two inputs of a product: `rows` rows of `x` and some rows of `w`, both `k` wide.
#[derive(Clone, Copy)]
struct Operands<'a> {
    x: &'a [f32],
    w: &'a [f32],
    k: usize,
}

/// `out[r * n + c] = sum_k x[r * k + i] * w[c * k + i]` for `r < rows`, `c < n`.
///
/// Callers have checked the shapes; slices shorter than the dimensions are a bug (panic).
pub(crate) fn linear(x: &[f32], rows: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    assert!(
        x.len() >= rows * k && w.len() >= n * k && out.len() >= rows * n,
        "linear: caller checked shapes"
    );
    let ops = Operands {
        x: &x[..rows * k],
        w,
        k,
    };
    let macs = rows * k * n;
    if macs < PARALLEL_MIN_MACS || rayon::current_num_threads() == 1 {
        column_block(ops, 0..n, &mut out[..rows * n], n);
        return;
    }
    let tasks = 4 * rayon::current_num_threads();
    let chunk = n.div_ceil(tasks).div_ceil(TILE_COLS) * TILE_COLS;
    if rows == 1 {
        // One output row is contiguous: tasks write their columns in place.
        out[..n]
            .par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, out_chunk)| {
                let c0 = i * chunk;
                let width = out_chunk.len();
                column_block(ops, c0..c0 + width, out_chunk, width);
            });
        return;
    }
    // Several rows: each task fills a private [rows, width] buffer, scattered afterwards.
    // The copy is O(rows * n) against O(rows * n * k) of compute.
    let starts: Vec<usize> = (0..n).step_by(chunk).collect();
    let parts: Vec<(usize, Vec<f32>)> = starts
        .into_par_iter()
        .map(|c0| {
            let c1 = (c0 + chunk).min(n);
            let width = c1 - c0;
            let mut buf = vec![0.0f32; rows * width];
            column_block(ops, c0..c1, &mut buf, width);
            (c0, buf)
        })
        .collect();
    for (c0, buf) in parts {
        let width = buf.len() / rows;
        for r in 0..rows {
            out[r * n + c0..r * n + c0 + width].copy_from_slice(&buf[r * width..(r + 1) * width]);
        }
    }
}

/// Computes output columns `cols` of every row of `ops.x` into `out`, whose row stride is
/// `ldo` and whose column 0 is output column `cols.start`.
fn column_block(ops: Operands<'_>, cols: std::ops::Range<usize>, out: &mut [f32], ldo: usize) {
    let simd = Simd::detect();
    let k = ops.k;
    let rows = ops.x.len() / k.max(1);
    let mut wb = cols.start;
    while wb < cols.end {
        let wb_end = (wb + W_BLOCK).min(cols.end);
        let mut r = 0;
        while r < rows {
            let rr = TILE_ROWS.min(rows - r);
            let mut c = wb;
            while c < wb_end {
                let cc = TILE_COLS.min(wb_end - c);
                let tile_ops = Operands {
                    x: &ops.x[r * k..(r + rr) * k],
                    w: &ops.w[c * k..(c + cc) * k],
                    k,
                };
                tile(
                    simd,
                    (rr, cc),
                    tile_ops,
                    &mut out[r * ldo + (c - cols.start)..],
                    ldo,
                );
                c += cc;
            }
            r += rr;
        }
        wb = wb_end;
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Simd {
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    Portable,
}

impl Simd {
    fn detect() -> Simd {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Simd::Avx2Fma;
            }
        }
        Simd::Portable
    }
}

macro_rules! dispatch_tile {
    ($f:ident, $dims:expr, $($arg:expr),*) => {
        match $dims {
            (4, 3) => $f::<4, 3>($($arg),*),
            (4, 2) => $f::<4, 2>($($arg),*),
            (4, 1) => $f::<4, 1>($($arg),*),
            (3, 3) => $f::<3, 3>($($arg),*),
            (3, 2) => $f::<3, 2>($($arg),*),
            (3, 1) => $f::<3, 1>($($arg),*),
            (2, 3) => $f::<2, 3>($($arg),*),
            (2, 2) => $f::<2, 2>($($arg),*),
            (2, 1) => $f::<2, 1>($($arg),*),
            (1, 3) => $f::<1, 3>($($arg),*),
            (1, 2) => $f::<1, 2>($($arg),*),
            (1, 1) => $f::<1, 1>($($arg),*),
            _ => unreachable!("tile sizes are bounded by TILE_ROWS x TILE_COLS"),
        }
    };
}

/// One `rr x cc` tile (`dims`): `out[r * ldo + c] = x[r] . w[c]`.
fn tile(simd: Simd, dims: (usize, usize), ops: Operands<'_>, out: &mut [f32], ldo: usize) {
    let (rr, cc) = dims;
    assert!(
        rr >= 1
            && cc >= 1
            && ops.x.len() >= rr * ops.k
            && ops.w.len() >= cc * ops.k
            && out.len() > (rr - 1) * ldo + cc - 1,
        "tile bounds come from column_block"
    );
    match simd {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Avx2Fma` is only constructed after run-time detection of avx2 and fma,
        // and the assert above guarantees every pointer the kernel reads is in bounds.
        Simd::Avx2Fma => unsafe { dispatch_tile!(tile_avx2, dims, ops, out, ldo) },
        Simd::Portable => dispatch_tile!(tile_portable, dims, ops, out, ldo),
    }
}

fn tile_portable<const R: usize, const C: usize>(ops: Operands<'_>, out: &mut [f32], ldo: usize) {
    const LANES: usize = 8;
    let Operands { x, w, k } = ops;
    let mut acc = [[[0.0f32; LANES]; C]; R];
    let k_vec = k / LANES * LANES;
    let mut i = 0;
    while i < k_vec {
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let xs = &x[r * k + i..r * k + i + LANES];
            for (c, acc_rc) in acc_r.iter_mut().enumerate() {
                let ws = &w[c * k + i..c * k + i + LANES];
                for l in 0..LANES {
                    acc_rc[l] += xs[l] * ws[l];
                }
            }
        }
        i += LANES;
    }
    for (r, acc_r) in acc.iter().enumerate() {
        for (c, acc_rc) in acc_r.iter().enumerate() {
            let mut sum: f32 = acc_rc.iter().sum();
            for j in k_vec..k {
                sum += x[r * k + j] * w[c * k + j];
            }
            out[r * ldo + c] = sum;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const R: usize, const C: usize>(
    ops: Operands<'_>,
    out: &mut [f32],
    ldo: usize,
) {
    use std::arch::x86_64::*;
    let Operands { x, w, k } = ops;
    let k_vec = k / 8 * 8;
    let xp = x.as_ptr();
    let wp = w.as_ptr();
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut i = 0;
    while i < k_vec {
        let mut wv = [_mm256_setzero_ps(); C];
        for (c, wv_c) in wv.iter_mut().enumerate() {
            // SAFETY: c * k + i + 8 <= C * k <= w.len() (checked by `tile`).
            *wv_c = unsafe { _mm256_loadu_ps(wp.add(c * k + i)) };
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            // SAFETY: r * k + i + 8 <= R * k <= x.len() (checked by `tile`).
            let xv = unsafe { _mm256_loadu_ps(xp.add(r * k + i)) };
            for (c, acc_rc) in acc_r.iter_mut().enumerate() {
                *acc_rc = _mm256_fmadd_ps(xv, wv[c], *acc_rc);
            }
        }
        i += 8;
    }
    for (r, acc_r) in acc.iter().enumerate() {
        for (c, acc_rc) in acc_r.iter().enumerate() {
            let lo = _mm256_castps256_ps128(*acc_rc);
            let hi = _mm256_extractf128_ps(*acc_rc, 1);
            let s4 = _mm_add_ps(lo, hi);
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
            let mut sum = _mm_cvtss_f32(s1);
            for j in k_vec..k {
                sum += x[r * k + j] * w[c * k + j];
            }
            out[r * ldo + c] = sum;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], rows: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; rows * n];
        for r in 0..rows {
            for c in 0..n {
                let mut s = 0.0f64;
                for i in 0..k {
                    s += f64::from(x[r * k + i]) * f64::from(w[c * k + i]);
                }
                out[r * n + c] = s as f32;
            }
        }
        out
    }

    fn pseudo_random(len: usize, seed: u32) -> Vec<f32> {
        // xorshift32: deterministic test data without a dev-dependency.
        let mut s = seed.max(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn linear_matches_naive_on_ragged_shapes_serial_and_parallel() {
        // Shapes cover tile edges (rows % 4, n % 3, k % 8 != 0) and both the serial and the
        // parallel paths (PARALLEL_MIN_MACS).
        for &(rows, k, n) in &[
            (1, 7, 5),
            (3, 9, 4),
            (5, 17, 7),
            (1, 256, 700),
            (9, 130, 301),
            (4, 64, 48),
        ] {
            let x = pseudo_random(rows * k, 7 + rows as u32);
            let w = pseudo_random(n * k, 11 + n as u32);
            let mut out = vec![f32::NAN; rows * n];
            linear(&x, rows, k, &w, n, &mut out);
            let want = naive(&x, rows, k, &w, n);
            for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "rows={rows} k={k} n={n} i={i}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn portable_and_simd_tiles_agree() {
        let k = 37;
        let x = pseudo_random(4 * k, 3);
        let w = pseudo_random(3 * k, 5);
        let mut a = vec![0.0f32; 4 * 3];
        let mut b = vec![0.0f32; 4 * 3];
        let ops = Operands { x: &x, w: &w, k };
        tile(Simd::Portable, (4, 3), ops, &mut a, 3);
        tile(Simd::detect(), (4, 3), ops, &mut b, 3);
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() < 1e-5, "{p} vs {q}");
        }
    }
}
