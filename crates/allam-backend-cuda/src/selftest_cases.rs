//! The self-check cases: shapes chosen to hit every kernel path (vector and scalar paths,
//! every head-dim instance, GQA, split-K with one and many partitions, chunked prefill over a
//! cached prefix, mixed batches, copied blocks, f32 logits and every sampling mode).
//! Each case runs the same host data through both backends and records one `OpCheck`.

use allam_backend::{
    AttentionLayout, Backend, Error as OpError, KvCache, KvCacheSpec, PreparedStep, StepBatch,
};

use crate::selftest::{compare, upload, upload_weight, Harness, OpCheck, Tol, EXACT};
use allam_backend::sampling::{sample_row_with_margin, RowSampling};

/// One self-check case: runs its shapes and records its `OpCheck`s.
type Case = fn(&mut Harness);

pub(crate) fn run_all(h: &mut Harness) {
    let cases: [(&str, Case); 10] = [
        ("embedding", embedding),
        ("embedding_shard", embedding_shard),
        ("norms", norms),
        ("linear", linear),
        ("rope", rope),
        ("attention", attention),
        ("copy_kv_blocks", copy_kv_blocks),
        ("silu_mul", silu_mul),
        ("gather_rows", gather_rows),
        ("sampling", sampling),
    ];
    for (name, case) in cases {
        let started = std::time::Instant::now();
        case(h);
        tracing::debug!(
            case = name,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "self-check case done"
        );
    }
}

const BLOCK: u32 = 16;

/// A KV cache big enough for `batch` plus the prepared step.
fn prepare(
    b: &mut dyn Backend,
    batch: &StepBatch,
    spec: KvCacheSpec,
) -> Result<(KvCache, PreparedStep), OpError> {
    let kv = b.alloc_kv_cache(&spec)?;
    let step = b.prepare_step(batch, &kv)?;
    Ok((kv, step))
}

fn spec(num_blocks: usize, block_size: u32, n_kv_heads: usize, head_dim: usize) -> KvCacheSpec {
    KvCacheSpec {
        num_layers: 1,
        num_blocks,
        block_size: block_size as usize,
        n_kv_heads,
        head_dim,
    }
}

/// One sequence whose whole context is this step's `n` query tokens.
fn prompt_batch(ids: &[u32]) -> (StepBatch, usize) {
    let blocks = (ids.len() as u32).div_ceil(BLOCK) as usize;
    let mut b = StepBatch {
        block_size: BLOCK,
        ..Default::default()
    };
    b.push_seq(ids, ids.len() as u32, (0..blocks as u32).collect());
    (b, blocks.max(1))
}

fn embedding(h: &mut Harness) {
    let (vocab, hidden, n) = (1000usize, 256usize, 37usize);
    let table = h.normal_bf16(vocab * hidden, 1.0);
    let ids: Vec<u32> = (0..n).map(|_| h.rng.below(vocab) as u32).collect();
    let (batch, blocks) = prompt_batch(&ids);
    let r = h.both(|b| {
        let w = upload_weight(b, "embed", &[vocab, hidden], &table)?;
        let (_kv, step) = prepare(b, &batch, spec(blocks, BLOCK, 1, 32))?;
        let mut out = b.alloc(&[n, hidden])?;
        b.embedding(&w, &step, &mut out)?;
        b.to_host_f32(&out)
    });
    h.record(
        "embedding",
        &format!("vocab={vocab} hidden={hidden} tokens={n}"),
        EXACT,
        r,
    );
}

/// The vocabulary-parallel lookup of a tensor-parallel rank, on one device: a slice of the
/// table from row `start`; ids outside it give zero rows (the all-reduce completes them).
fn embedding_shard(h: &mut Harness) {
    let (vocab, hidden, n) = (1000usize, 256usize, 41usize);
    for (start, rows) in [(0usize, 500usize), (500, 500), (333, 334)] {
        let table = h.normal_bf16(rows * hidden, 1.0);
        let ids: Vec<u32> = (0..n).map(|_| h.rng.below(vocab) as u32).collect();
        let (batch, blocks) = prompt_batch(&ids);
        let r = h.both(|b| {
            let w = upload_weight(b, "embed slice", &[rows, hidden], &table)?;
            let (_kv, step) = prepare(b, &batch, spec(blocks, BLOCK, 1, 32))?;
            let mut out = b.alloc(&[n, hidden])?;
            b.embedding_shard(&w, start, vocab, &step, &mut out)?;
            b.to_host_f32(&out)
        });
        h.record(
            "embedding_shard",
            &format!(
                "rows {start}..{} of vocab={vocab} hidden={hidden} tokens={n}",
                start + rows
            ),
            EXACT,
            r,
        );
    }
}

fn norms(h: &mut Harness) {
    for hidden in [256usize, 4096, 100] {
        let rows = 7;
        let x = h.normal_bf16(rows * hidden, 1.0);
        let w: Vec<f32> = h
            .normal_bf16(hidden, 0.1)
            .iter()
            .map(|v| crate::selftest::round_bf16(1.0 + v))
            .collect();
        let r = h.both(|b| {
            let xt = upload(b, &[rows, hidden], &x)?;
            let wt = upload_weight(b, "norm", &[hidden], &w)?;
            let mut out = b.alloc(&[rows, hidden])?;
            b.rms_norm(&xt, &wt, 1e-5, &mut out)?;
            b.to_host_f32(&out)
        });
        h.record(
            "rms_norm",
            &format!("rows={rows} hidden={hidden}"),
            Tol {
                atol: 1e-3,
                rtol: 8e-3,
            },
            r,
        );

        let res = h.normal_bf16(rows * hidden, 1.0);
        let r = h.both(|b| {
            let xt = upload(b, &[rows, hidden], &x)?;
            let mut rt = upload(b, &[rows, hidden], &res)?;
            let wt = upload_weight(b, "norm", &[hidden], &w)?;
            let mut out = b.alloc(&[rows, hidden])?;
            b.add_rms_norm(&mut rt, &xt, &wt, 1e-5, &mut out)?;
            let mut both = b.to_host_f32(&out)?;
            both.extend(b.to_host_f32(&rt)?);
            Ok(both)
        });
        h.record(
            "add_rms_norm",
            &format!("rows={rows} hidden={hidden} (out + residual)"),
            Tol {
                atol: 1e-3,
                rtol: 1e-2,
            },
            r,
        );
    }
}

fn linear(h: &mut Harness) {
    let shapes: &[(usize, usize, usize)] = if h.quick {
        &[(1, 256, 128), (33, 64, 96)]
    } else {
        &[(1, 4096, 4096), (33, 512, 1376), (200, 256, 768)]
    };
    for &(rows, k, n) in shapes {
        let x = h.normal_bf16(rows * k, 1.0);
        let w = h.normal_bf16(n * k, 0.05);
        let sigma = (k as f64).sqrt() * 0.05;
        let r = h.both(|b| {
            let xt = upload(b, &[rows, k], &x)?;
            let wt = upload_weight(b, "w", &[n, k], &w)?;
            let mut out = b.alloc(&[rows, n])?;
            b.linear(&xt, &wt, &mut out)?;
            b.to_host_f32(&out)
        });
        h.record(
            "linear",
            &format!("rows={rows} in={k} out={n} bf16"),
            Tol {
                atol: 1e-3 * sigma,
                rtol: 8e-3,
            },
            r,
        );
    }
}

fn rope_table(max_positions: usize, dim: usize, theta: f64) -> Vec<f32> {
    let half = dim / 2;
    let mut t = Vec::with_capacity(max_positions * dim);
    for p in 0..max_positions {
        let angles: Vec<f64> = (0..half)
            .map(|i| p as f64 * theta.powf(-2.0 * i as f64 / dim as f64))
            .collect();
        t.extend(angles.iter().map(|a| a.cos() as f32));
        t.extend(angles.iter().map(|a| a.sin() as f32));
    }
    t
}

fn layout(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> AttentionLayout {
    AttentionLayout {
        n_heads,
        n_kv_heads,
        head_dim,
        softmax_scale: 1.0 / (head_dim as f32).sqrt(),
    }
}

fn rope(h: &mut Harness) {
    let max_positions = 4096usize;
    for (heads, kv_heads, hd) in [(8usize, 2usize, 32usize), (32, 32, 128)] {
        let lay = layout(heads, kv_heads, hd);
        let table = rope_table(max_positions, hd, 10_000.0);
        // Decodes at scattered positions (up to the table's end) plus a 10-token prompt.
        let mut batch = StepBatch {
            block_size: BLOCK,
            ..Default::default()
        };
        let full_table: Vec<u32> = (0..(max_positions as u32 / BLOCK)).collect();
        for _ in 0..12 {
            let pos = h.rng.below(max_positions) as u32;
            batch.push_seq(&[1], pos + 1, full_table.clone());
        }
        batch.push_seq(&[1; 10], 10, full_table.clone());
        let n = batch.num_tokens();
        let qkv = h.normal_bf16(n * lay.qkv_width(), 1.0);
        let r = h.both(|b| {
            let (_kv, step) = prepare(b, &batch, spec(full_table.len(), BLOCK, kv_heads, hd))?;
            let tw = b.upload_rope_table(max_positions, hd, &table)?;
            let mut t = upload(b, &[n, lay.qkv_width()], &qkv)?;
            b.rope(&mut t, &lay, &tw, &step)?;
            b.to_host_f32(&t)
        });
        h.record(
            "rope",
            &format!("heads={heads} kv={kv_heads} hd={hd} tokens={n}"),
            Tol {
                atol: 1e-2,
                rtol: 1e-2,
            },
            r,
        );
    }
}

/// Two steps over a fresh cache: step 0 writes each sequence's cached prefix, step 1 writes
/// the query tokens and runs attention. Physical blocks are shuffled.
struct AttnBatch {
    step0: Option<StepBatch>,
    step1: StepBatch,
    num_blocks: usize,
}

fn attn_batch(h: &mut Harness, seqs: &[(u32, u32)], block_size: u32) -> AttnBatch {
    let needed: usize = seqs
        .iter()
        .map(|(p, q)| (p + q).div_ceil(block_size) as usize)
        .sum();
    let num_blocks = needed + 3;
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    h.rng.shuffle(&mut ids);
    let mut next = ids.into_iter();
    let mut step0 = StepBatch {
        block_size,
        ..Default::default()
    };
    let mut step1 = step0.clone();
    for &(prefix, query) in seqs {
        let n_blocks = (prefix + query).div_ceil(block_size) as usize;
        let table: Vec<u32> = next.by_ref().take(n_blocks).collect();
        if prefix > 0 {
            step0.push_seq(&vec![1; prefix as usize], prefix, table.clone());
        }
        step1.push_seq(&vec![1; query as usize], prefix + query, table);
    }
    AttnBatch {
        step0: (!step0.seqs.is_empty()).then_some(step0),
        step1,
        num_blocks,
    }
}

fn run_attention(
    b: &mut dyn Backend,
    lay: &AttentionLayout,
    ab: &AttnBatch,
    qkv0: &[f32],
    qkv1: &[f32],
) -> Result<Vec<f32>, OpError> {
    let mut kv = b.alloc_kv_cache(&spec(
        ab.num_blocks,
        ab.step1.block_size,
        lay.n_kv_heads,
        lay.head_dim,
    ))?;
    if let Some(s0) = &ab.step0 {
        let step = b.prepare_step(s0, &kv)?;
        let t = upload(b, &[s0.num_tokens(), lay.qkv_width()], qkv0)?;
        b.kv_write(&t, lay, &mut kv, 0, &step)?;
    }
    let n = ab.step1.num_tokens();
    let step = b.prepare_step(&ab.step1, &kv)?;
    let t = upload(b, &[n, lay.qkv_width()], qkv1)?;
    b.kv_write(&t, lay, &mut kv, 0, &step)?;
    let mut out = b.alloc(&[n, lay.q_width()])?;
    b.attention(&t, lay, &kv, 0, &step, &mut out)?;
    b.to_host_f32(&out)
}

/// (name, (cached prefix, query tokens) per sequence, block size).
type BatchCase = (&'static str, Vec<(u32, u32)>, u32);

fn attention(h: &mut Harness) {
    let wide: Vec<(u32, u32)> = (0..48).map(|i| ((i * 97 + 13) % 1500, 1)).collect();
    let batches: [BatchCase; 4] = [
        ("prefill", vec![(0, 37), (0, 70)], 16),
        (
            "decode",
            vec![(0, 1), (16, 1), (299, 1), (1099, 1), (2499, 1)],
            16,
        ),
        (
            "mixed",
            vec![(60, 40), (31, 33), (0, 1), (500, 1), (0, 5), (3, 1)],
            32,
        ),
        ("decode-wide", wide, 16),
    ];
    let layouts: &[(usize, usize, usize)] = if h.quick {
        &[(8, 2, 32), (2, 2, 128)]
    } else {
        &[(8, 8, 32), (8, 2, 32), (16, 4, 64), (32, 32, 128)]
    };
    for &(heads, kv_heads, hd) in layouts {
        let lay = layout(heads, kv_heads, hd);
        for (name, seqs, block_size) in &batches {
            if *name == "decode-wide" && (hd != 128 || h.quick) {
                continue; // one wide case is enough; it exercises the large-batch partitioning
            }
            let ab = attn_batch(h, seqs, *block_size);
            let n0 = ab.step0.as_ref().map_or(0, |s| s.num_tokens());
            let qkv0 = h.normal_bf16(n0 * lay.qkv_width(), 1.0);
            let qkv1 = h.normal_bf16(ab.step1.num_tokens() * lay.qkv_width(), 1.0);
            let r = h.both(|b| run_attention(b, &lay, &ab, &qkv0, &qkv1));
            let case = format!("heads={heads} kv={kv_heads} hd={hd} {name} bs={block_size}");
            h.record(
                "attention",
                &case,
                Tol {
                    atol: 2e-2,
                    rtol: 2e-2,
                },
                r,
            );
        }
    }
}

/// Copy-on-write: a sequence's prefix blocks are copied to fresh ids, and a decode through
/// the copies must see the same keys and values.
fn copy_kv_blocks(h: &mut Harness) {
    let lay = layout(8, 2, 32);
    let prefix = 40u32; // 3 blocks of 16
    let num_blocks = 8usize;
    let mut s0 = StepBatch {
        block_size: BLOCK,
        ..Default::default()
    };
    s0.push_seq(&vec![1; prefix as usize], prefix, vec![0, 1, 2]);
    let mut s1 = StepBatch {
        block_size: BLOCK,
        ..Default::default()
    };
    s1.push_seq(&[1], prefix + 1, vec![5, 6, 7]);
    let pairs = [(0u32, 5u32), (1, 6), (2, 7)];
    let qkv0 = h.normal_bf16(prefix as usize * lay.qkv_width(), 1.0);
    let qkv1 = h.normal_bf16(lay.qkv_width(), 1.0);
    let r = h.both(|b| {
        let mut kv = b.alloc_kv_cache(&spec(num_blocks, BLOCK, lay.n_kv_heads, lay.head_dim))?;
        let step = b.prepare_step(&s0, &kv)?;
        let t = upload(b, &[prefix as usize, lay.qkv_width()], &qkv0)?;
        b.kv_write(&t, &lay, &mut kv, 0, &step)?;
        b.copy_kv_blocks(&mut kv, &pairs)?;
        let step = b.prepare_step(&s1, &kv)?;
        let t = upload(b, &[1, lay.qkv_width()], &qkv1)?;
        b.kv_write(&t, &lay, &mut kv, 0, &step)?;
        let mut out = b.alloc(&[1, lay.q_width()])?;
        b.attention(&t, &lay, &kv, 0, &step, &mut out)?;
        b.to_host_f32(&out)
    });
    h.record(
        "copy_kv_blocks",
        "3 blocks copied, decode through the copies",
        Tol {
            atol: 2e-2,
            rtol: 2e-2,
        },
        r,
    );
}

fn silu_mul(h: &mut Harness) {
    for inter in [688usize, 13, 11008] {
        let rows = 9;
        let gu = h.normal_bf16(rows * 2 * inter, 1.5);
        let r = h.both(|b| {
            let t = upload(b, &[rows, 2 * inter], &gu)?;
            let mut out = b.alloc(&[rows, inter])?;
            b.silu_mul(&t, &mut out)?;
            b.to_host_f32(&out)
        });
        h.record(
            "silu_mul",
            &format!("rows={rows} inter={inter}"),
            Tol {
                atol: 1e-3,
                rtol: 8e-3,
            },
            r,
        );
    }
}

fn gather_rows(h: &mut Harness) {
    let (n, cols) = (20usize, 256usize);
    let ids = vec![1u32; n];
    let (mut batch, blocks) = prompt_batch(&ids);
    batch.logits_rows = vec![19, 0, 7];
    let x = h.normal_bf16(n * cols, 1.0);
    let r = h.both(|b| {
        let (_kv, step) = prepare(b, &batch, spec(blocks, BLOCK, 1, 32))?;
        let t = upload(b, &[n, cols], &x)?;
        let mut out = b.alloc(&[3, cols])?;
        b.gather_rows(&t, &step, &mut out)?;
        b.to_host_f32(&out)
    });
    h.record("gather_rows", "rows [19, 0, 7] of 20", EXACT, r);
    // The engine's copy of only the rows it samples on the host.
    let r = h.both(|b| {
        let t = upload(b, &[n, cols], &x)?;
        b.rows_to_host_f32(&t, &[19, 0, 7, 7])
    });
    h.record("rows_to_host_f32", "rows [19, 0, 7, 7] of 20", EXACT, r);
}

/// f32 logits from `linear` (checked against the CPU), then device sampling against the
/// host statement of the same rules on the very same logits.
fn sampling(h: &mut Harness) {
    if h.dut.cuda().is_none() {
        return; // f32 logits and device sampling exist only on the CUDA backend
    }
    if h.dut.cuda().is_none() {
        return; // f32 logits and device sampling exist only on the CUDA backend
    }
    let (rows, hidden, vocab, n_top) = (24usize, 256usize, 64_000usize, 5usize);
    let x = h.normal_bf16(rows * hidden, 1.0);
    let w = h.normal_bf16(vocab * hidden, 0.5);
    let modes = [
        (0.0f32, 0u32, 1.0f32),
        (0.7, 50, 1.0),
        (1.0, 0, 0.9),
        (1.3, 200, 0.8),
        (1.0, 0, 1.0),
        (1.0, 1, 1.0),
    ];
    let params: Vec<RowSampling> = (0..rows)
        .map(|r| {
            let (temperature, top_k, top_p) = modes[r % modes.len()];
            RowSampling {
                temperature,
                top_k,
                top_p,
                uniform: h.rng.uniform(),
            }
        })
        .collect();
    let cpu_logits = (|| {
        let c = &mut h.cpu;
        let xt = upload(c, &[rows, hidden], &x)?;
        let wt = upload_weight(c, "lm_head", &[vocab, hidden], &w)?;
        let mut out = c.alloc(&[rows, vocab])?;
        c.linear(&xt, &wt, &mut out)?;
        c.to_host_f32(&out)
    })();
    let Some(g) = h.dut.cuda() else {
        return;
    };
    let mut gpu_run = || -> Result<(Vec<f32>, Vec<allam_backend::SampledToken>), OpError> {
        let xt = g.upload_f32(&[rows, hidden], &x)?;
        let wt = upload_weight(g, "lm_head", &[vocab, hidden], &w)?;
        let mut logits = g.alloc_logits(&[rows, vocab])?;
        g.linear(&xt, &wt, &mut logits)?;
        let host = g.to_host_f32(&logits)?;
        let picks = g.sample(&logits, &params, Some(n_top))?;
        Ok((host, picks))
    };
    let (gpu_logits, picks) = match gpu_run() {
        Ok(v) => v,
        Err(e) => {
            h.record("linear", "lm_head f32 out", EXACT, Err(e.clone_message()));
            h.record("sample", "device sampling", EXACT, Err(e));
            return;
        }
    };
    let sigma = (hidden as f64).sqrt() * 0.5;
    h.record(
        "linear",
        &format!("rows={rows} in={hidden} out={vocab} f32 (lm_head)"),
        Tol {
            atol: 1e-4 * sigma,
            rtol: 1e-4,
        },
        cpu_logits.map(|c| (gpu_logits.clone(), c)),
    );

    let mut mismatches = Vec::new();
    let mut boundary = 0;
    let (mut lp_gpu, mut lp_ref) = (Vec::new(), Vec::new());
    for r in 0..rows {
        let row = &gpu_logits[r * vocab..(r + 1) * vocab];
        let (want, margin) = sample_row_with_margin(row, &params[r], Some(n_top));
        let got = &picks[r];
        let top_ids_match = got.top.iter().map(|t| t.0).eq(want.top.iter().map(|t| t.0));
        if got.token != want.token || !top_ids_match {
            if margin < 1e-4 && top_ids_match {
                boundary += 1; // f32 vs f64 rounding at a CDF boundary: not a bug
            } else {
                mismatches.push(format!(
                    "row {r}: token {} vs {}, top ids {:?} vs {:?}",
                    got.token, want.token, got.top, want.top
                ));
            }
            continue;
        }
        lp_gpu.push(got.logprob);
        lp_ref.push(want.logprob);
        lp_gpu.extend(got.top.iter().map(|t| t.1));
        lp_ref.extend(want.top.iter().map(|t| t.1));
    }
    let mut check: OpCheck = compare(
        "sample",
        "logprobs of chosen + top-5",
        Tol {
            atol: 2e-3,
            rtol: 0.0,
        },
        &lp_gpu,
        &lp_ref,
    );
    check.case = format!("rows={rows} vocab={vocab} greedy/top-k/top-p/temperature, top-{n_top}");
    if !mismatches.is_empty() {
        check.passed = false;
        check.detail = mismatches.join("; ");
    } else if boundary > 0 {
        check.detail =
            format!("{boundary} row(s) differed only at a CDF boundary (< 1e-4 of the mass)");
    }
    h.checks.push(check);
}

trait CloneMessage {
    fn clone_message(&self) -> OpError;
}

impl CloneMessage for OpError {
    /// `allam_backend::Error` is not `Clone`; the same failure recorded twice keeps its text.
    fn clone_message(&self) -> OpError {
        OpError::Device {
            op: "selftest",
            backend: crate::storage::BACKEND_NAME,
            message: self.to_string(),
        }
    }
}
