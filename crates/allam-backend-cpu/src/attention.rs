//! RoPE, KV-cache writes and causal paged attention on f32 host memory.
//!
//! `qkv` rows are `[q heads | k heads | v heads]` (see `allam_backend::Backend`); a layer's K
//! (or V) array is `[num_blocks, block_size, n_kv_heads, head_dim]`, so the K of slot `s` is
//! the `n_kv_heads * head_dim` values starting at `s * n_kv_heads * head_dim`.

use allam_backend::{AttentionLayout, StepBatch};
use rayon::prelude::*;

/// Rotates the q and k heads of every row in place (HF half-split convention).
/// `table` row `p` is `[cos_0..cos_{d/2-1}, sin_0..sin_{d/2-1}]` for position `p`.
pub(crate) fn rope(qkv: &mut [f32], layout: &AttentionLayout, table: &[f32], positions: &[u32]) {
    let width = layout.qkv_width();
    let hd = layout.head_dim;
    let half = hd / 2;
    let rotated_heads = layout.n_heads + layout.n_kv_heads;
    let body = |(row, pos): (&mut [f32], &u32)| {
        let base = *pos as usize * hd;
        let (cos, sin) = table[base..base + hd].split_at(half);
        for head in row[..rotated_heads * hd].chunks_exact_mut(hd) {
            let (lo, hi) = head.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (lo[i], hi[i]);
                lo[i] = a * cos[i] - b * sin[i];
                hi[i] = b * cos[i] + a * sin[i];
            }
        }
    };
    if positions.len() < 16 {
        qkv.chunks_exact_mut(width).zip(positions).for_each(body);
    } else {
        qkv.par_chunks_exact_mut(width)
            .zip(positions.par_iter())
            .for_each(body);
    }
}

/// Copies each row's k and v heads to its slot of one layer's K and V arrays.
pub(crate) fn kv_write(
    qkv: &[f32],
    layout: &AttentionLayout,
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    slots: &[u32],
) {
    let width = layout.qkv_width();
    let q_w = layout.q_width();
    let kv_w = layout.kv_width();
    for (row, slot) in qkv.chunks_exact(width).zip(slots) {
        if *slot == allam_backend::PAD_SLOT {
            continue;
        }
        let dst = *slot as usize * kv_w;
        k_cache[dst..dst + kv_w].copy_from_slice(&row[q_w..q_w + kv_w]);
        v_cache[dst..dst + kv_w].copy_from_slice(&row[q_w + kv_w..q_w + 2 * kv_w]);
    }
}

/// Causal paged attention; `out` is `[num_tokens, n_heads * head_dim]`.
/// `token_seq[t]` is the index in `batch.seqs` of query token `t`.
pub(crate) fn attention(
    qkv: &[f32],
    layout: &AttentionLayout,
    k_cache: &[f32],
    v_cache: &[f32],
    batch: &StepBatch,
    token_seq: &[u32],
    out: &mut [f32],
) {
    let width = layout.qkv_width();
    let hd = layout.head_dim;
    let q_w = layout.q_width();
    let kv_w = layout.kv_width();
    let group = layout.n_heads / layout.n_kv_heads;
    let block_size = batch.block_size as usize;
    let body = |(t, out_row): (usize, &mut [f32])| {
        let seq = &batch.seqs[token_seq[t] as usize];
        let n_keys = batch.positions[t] as usize + 1;
        let slots: Vec<usize> = (0..n_keys)
            .map(|p| seq.block_table[p / block_size] as usize * block_size + p % block_size)
            .collect();
        let mut scores = vec![0.0f32; n_keys];
        let q_row = &qkv[t * width..t * width + q_w];
        for (h, out_head) in out_row.chunks_exact_mut(hd).enumerate() {
            let q = &q_row[h * hd..(h + 1) * hd];
            let kv_off = (h / group) * hd;
            let mut max = f32::NEG_INFINITY;
            for (score, slot) in scores.iter_mut().zip(&slots) {
                let k = &k_cache[slot * kv_w + kv_off..slot * kv_w + kv_off + hd];
                let dot: f32 = q.iter().zip(k).map(|(a, b)| a * b).sum();
                *score = dot * layout.softmax_scale;
                max = max.max(*score);
            }
            let mut denom = 0.0f32;
            for score in scores.iter_mut() {
                *score = (*score - max).exp();
                denom += *score;
            }
            out_head.fill(0.0);
            for (score, slot) in scores.iter().zip(&slots) {
                let p = score / denom;
                let v = &v_cache[slot * kv_w + kv_off..slot * kv_w + kv_off + hd];
                for (o, x) in out_head.iter_mut().zip(v) {
                    *o += p * x;
                }
            }
        }
    };
    if token_seq.len() < 4 && batch.positions.iter().all(|p| *p < 64) {
        out.chunks_exact_mut(q_w).enumerate().for_each(body);
    } else {
        out.par_chunks_exact_mut(q_w).enumerate().for_each(body);
    }
}

/// Copies whole blocks `src -> dst` of one layer array (`block_elems` values per block).
pub(crate) fn copy_blocks(cache: &mut [f32], block_elems: usize, pairs: &[(u32, u32)]) {
    for &(src, dst) in pairs {
        let (src, dst) = (src as usize * block_elems, dst as usize * block_elems);
        cache.copy_within(src..src + block_elems, dst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> AttentionLayout {
        AttentionLayout {
            n_heads,
            n_kv_heads,
            head_dim,
            softmax_scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }

    fn values(len: usize, seed: f32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as f32 + seed) * 0.731).sin())
            .collect()
    }

    #[test]
    fn rope_rotates_half_split_pairs_and_leaves_v_alone() {
        let l = layout(1, 1, 4);
        let mut qkv = values(l.qkv_width(), 1.0);
        let orig = qkv.clone();
        // Position 1 with angles 0.3 and 0.7 for pairs (0, 2) and (1, 3).
        let (a0, a1) = (0.3f32, 0.7f32);
        let mut table = vec![1.0, 1.0, 0.0, 0.0];
        table.extend([a0.cos(), a1.cos(), a0.sin(), a1.sin()]);
        rope(&mut qkv, &l, &table, &[1]);
        for head in 0..2 {
            let x = &orig[head * 4..head * 4 + 4];
            let want = [
                x[0] * a0.cos() - x[2] * a0.sin(),
                x[1] * a1.cos() - x[3] * a1.sin(),
                x[2] * a0.cos() + x[0] * a0.sin(),
                x[3] * a1.cos() + x[1] * a1.sin(),
            ];
            for (got, want) in qkv[head * 4..head * 4 + 4].iter().zip(want) {
                assert!((got - want).abs() < 1e-6);
            }
        }
        assert_eq!(qkv[8..], orig[8..], "v must not rotate");
    }

    /// Dense reference: token `i` of one sequence attends to keys `0..=i`.
    fn dense_attention(
        q: &[Vec<f32>],
        k: &[Vec<f32>],
        v: &[Vec<f32>],
        l: &AttentionLayout,
    ) -> Vec<Vec<f32>> {
        let hd = l.head_dim;
        let group = l.n_heads / l.n_kv_heads;
        q.iter()
            .enumerate()
            .map(|(i, qi)| {
                let mut out = vec![0.0f32; l.n_heads * hd];
                for h in 0..l.n_heads {
                    let kvh = h / group;
                    let scores: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..hd)
                                .map(|d| f64::from(qi[h * hd + d]) * f64::from(k[j][kvh * hd + d]))
                                .sum::<f64>()
                                * f64::from(l.softmax_scale)
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let denom: f64 = exps.iter().sum();
                    for d in 0..hd {
                        let acc: f64 = (0..=i)
                            .map(|j| exps[j] / denom * f64::from(v[j][kvh * hd + d]))
                            .sum();
                        out[h * hd + d] = acc as f32;
                    }
                }
                out
            })
            .collect()
    }

    #[test]
    fn paged_gqa_attention_over_scattered_blocks_matches_dense() {
        let l = layout(4, 2, 8);
        let block_size = 4;
        let num_blocks = 8;
        let len = 10; // spans 3 blocks, last one partial
        let block_table = vec![5u32, 1, 6];
        let rows: Vec<Vec<f32>> = (0..len)
            .map(|t| values(l.qkv_width(), t as f32 * 13.0))
            .collect();
        let q: Vec<Vec<f32>> = rows.iter().map(|r| r[..l.q_width()].to_vec()).collect();
        let k: Vec<Vec<f32>> = rows
            .iter()
            .map(|r| r[l.q_width()..l.q_width() + l.kv_width()].to_vec())
            .collect();
        let v: Vec<Vec<f32>> = rows
            .iter()
            .map(|r| r[l.q_width() + l.kv_width()..].to_vec())
            .collect();
        let want = dense_attention(&q, &k, &v, &l);

        // Prefill the first 7 tokens, then decode the rest one at a time, through the cache.
        let mut k_cache = vec![f32::NAN; num_blocks * block_size * l.kv_width()];
        let mut v_cache = k_cache.clone();
        let mut start = 0;
        for end in [7usize, 8, 9, 10] {
            let mut batch = StepBatch {
                block_size: block_size as u32,
                ..StepBatch::default()
            };
            let ids: Vec<u32> = (start..end).map(|t| t as u32).collect();
            batch.push_seq(&ids, end as u32, block_table.clone());
            batch.validate(num_blocks).expect("test batch is valid");
            let qkv: Vec<f32> = rows[start..end].concat();
            kv_write(&qkv, &l, &mut k_cache, &mut v_cache, &batch.slot_mapping);
            let mut out = vec![0.0f32; (end - start) * l.q_width()];
            let token_seq = vec![0u32; end - start];
            attention(&qkv, &l, &k_cache, &v_cache, &batch, &token_seq, &mut out);
            for (i, t) in (start..end).enumerate() {
                for (a, b) in out[i * l.q_width()..(i + 1) * l.q_width()]
                    .iter()
                    .zip(&want[t])
                {
                    assert!((a - b).abs() < 1e-5, "token {t}: {a} vs {b}");
                }
            }
            start = end;
        }
    }

    #[test]
    fn copy_blocks_moves_whole_blocks() {
        let mut cache: Vec<f32> = (0..12).map(|i| i as f32).collect();
        copy_blocks(&mut cache, 4, &[(0, 2)]);
        assert_eq!(cache[8..], [0.0, 1.0, 2.0, 3.0]);
        assert_eq!(cache[..8], (0..8).map(|i| i as f32).collect::<Vec<_>>()[..]);
    }
}
