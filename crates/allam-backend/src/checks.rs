//! Device-independent argument checks shared by every [`Backend`](crate::Backend)
//! implementation: operand shapes against the op contracts documented in `backend.rs`, batch
//! and id ranges, and byte counts. Each backend calls these before touching its own storage,
//! so the CPU reference and the CUDA backend reject exactly the same inputs with exactly the
//! same [`Error`] (tests on both sides assert the messages).
//!
//! Invariant: nothing here looks at a handle's storage or at device limits; checks that depend
//! on the device (supported head dims, u32 kernel ranges, handle kinds) stay in the backends.

use crate::{AttentionLayout, DType, Error, KvCache, KvCacheSpec, PreparedStep, StepBatch};
use crate::{Tensor, Weight};

/// `Error::ForeignHandle`: `operand` of `op` was not created by `backend`.
pub fn foreign(op: &'static str, operand: &'static str, backend: &'static str) -> Error {
    Error::ForeignHandle {
        op,
        operand,
        backend,
    }
}

/// Checks that `shape` is exactly `[rows, cols]`.
pub fn expect_2d(
    op: &'static str,
    operand: &'static str,
    shape: &[usize],
    rows: usize,
    cols: usize,
) -> Result<(), Error> {
    if shape == [rows, cols] {
        Ok(())
    } else {
        Err(Error::shape(
            op,
            operand,
            format!("[{rows}, {cols}]"),
            shape,
        ))
    }
}

/// Returns `(rows, cols)` of a 2-D shape.
pub fn dims_2d(
    op: &'static str,
    operand: &'static str,
    shape: &[usize],
) -> Result<(usize, usize), Error> {
    match shape {
        [rows, cols] => Ok((*rows, *cols)),
        _ => Err(Error::shape(op, operand, "[rows, cols]", shape)),
    }
}

/// Checks that `shape` is `[rows, _]` and returns its column count.
pub fn expect_rows(
    op: &'static str,
    operand: &'static str,
    shape: &[usize],
    rows: usize,
) -> Result<usize, Error> {
    let (r, cols) = dims_2d(op, operand, shape)?;
    if r != rows {
        return Err(Error::shape(op, operand, format!("[{rows}, _]"), shape));
    }
    Ok(cols)
}

/// `rows_to_host_f32`: `x` is 2-D and every asked row is one of its rows; returns
/// `(rows of x, cols)`.
pub fn check_row_picks(
    op: &'static str,
    x: &[usize],
    picks: &[usize],
) -> Result<(usize, usize), Error> {
    let (n, cols) = dims_2d(op, "x", x)?;
    if let Some(&bad) = picks.iter().find(|&&r| r >= n) {
        return Err(Error::shape(op, "x", format!("more than {bad} rows"), x));
    }
    Ok((n, cols))
}

/// `sample`: `logits` is `[rows.len(), vocab]` with `vocab > 0`, and the top logprobs asked
/// for fit the per-row buffer every backend reports into. Returns `vocab`.
pub fn sample_args(
    op: &'static str,
    backend: &'static str,
    logits: &[usize],
    rows: usize,
    logprobs: Option<usize>,
) -> Result<usize, Error> {
    let n_top = logprobs.unwrap_or(0);
    let vocab = expect_rows(op, "logits", logits, rows)?;
    if vocab == 0 {
        return Err(Error::shape(op, "logits", "[rows, vocab > 0]", logits));
    }
    if n_top > crate::sampling::MAX_TOP_LOGPROBS {
        return Err(Error::Unsupported {
            op,
            backend,
            detail: format!(
                "{n_top} top logprobs per row (at most {})",
                crate::sampling::MAX_TOP_LOGPROBS
            ),
        });
    }
    Ok(vocab)
}

/// `upload_weight`: `actual_bytes` must be exactly `dtype`'s size times the element count of
/// `shape`; the error is [`weight_bytes_error`].
pub fn check_weight_bytes(
    name: &str,
    dtype: DType,
    shape: &[usize],
    actual_bytes: usize,
) -> Result<(), Error> {
    if actual_bytes == weight_bytes(dtype, shape) {
        Ok(())
    } else {
        Err(weight_bytes_error(name, dtype, shape, actual_bytes))
    }
}

/// `upload_weight`'s `Error::WeightBytes` for bytes that do not decode as `dtype` `shape`.
pub fn weight_bytes_error(name: &str, dtype: DType, shape: &[usize], actual_bytes: usize) -> Error {
    Error::WeightBytes {
        name: name.to_owned(),
        dtype,
        shape: shape.to_vec(),
        expected_bytes: weight_bytes(dtype, shape),
        actual_bytes,
    }
}

fn weight_bytes(dtype: DType, shape: &[usize]) -> usize {
    shape.iter().product::<usize>() * dtype.size_in_bytes()
}

/// `upload_rope_table`: `len` values must fill `[max_positions, rotary_dim]` with an even
/// `rotary_dim`; with `reject_empty`, an empty table (or `rotary_dim == 0`) is refused too.
pub fn check_rope_cos_sin(
    max_positions: usize,
    rotary_dim: usize,
    len: usize,
    reject_empty: bool,
) -> Result<(), Error> {
    if !rotary_dim.is_multiple_of(2)
        || len != max_positions * rotary_dim
        || (reject_empty && (rotary_dim == 0 || len == 0))
    {
        return Err(Error::shape(
            "upload_rope_table",
            "cos_sin",
            format!("[{max_positions}, {rotary_dim}] with even rotary_dim"),
            &[len],
        ));
    }
    Ok(())
}

/// `upload_f32`: `len` values must fill `shape`.
pub fn check_upload_f32(shape: &[usize], len: usize) -> Result<(), Error> {
    if shape.iter().product::<usize>() != len {
        return Err(Error::shape(
            "upload_f32",
            "data",
            format!("{shape:?}"),
            &[len],
        ));
    }
    Ok(())
}

/// `alloc_kv_cache`: the cache of `spec` (`bytes` long) must fit in `free` bytes.
pub fn check_kv_fits(spec: &KvCacheSpec, bytes: u64, free: u64) -> Result<(), Error> {
    if bytes > free {
        return Err(Error::OutOfMemory {
            what: format!("KV cache of {} blocks", spec.num_blocks),
            requested_bytes: bytes,
            free_bytes: free,
        });
    }
    Ok(())
}

/// `copy_kv_blocks`: every source and destination block is inside the cache.
pub fn check_copy_pairs(
    op: &'static str,
    pairs: &[(u32, u32)],
    num_blocks: usize,
) -> Result<(), Error> {
    if let Some(bad) = pairs
        .iter()
        .find(|(s, d)| *s as usize >= num_blocks || *d as usize >= num_blocks)
    {
        return Err(Error::InvalidBatch {
            op,
            detail: format!("pair {bad:?} outside {num_blocks} blocks"),
        });
    }
    Ok(())
}

/// `prepare_step`: the batch keeps its own invariants ([`StepBatch::validate`]) and uses the
/// cache's block size.
pub fn check_step_batch(
    op: &'static str,
    batch: &StepBatch,
    spec: &KvCacheSpec,
) -> Result<(), Error> {
    batch.validate(spec.num_blocks)?;
    if batch.block_size as usize != spec.block_size {
        return Err(Error::InvalidBatch {
            op,
            detail: format!(
                "batch block_size {} but the cache has {}",
                batch.block_size, spec.block_size
            ),
        });
    }
    Ok(())
}

/// `embedding`: `table` is `[vocab, hidden]` and `out` is `[num_tokens, hidden]`; returns
/// `(vocab, hidden)`.
pub fn check_embedding(
    op: &'static str,
    table: &Weight,
    step: &PreparedStep,
    out: &Tensor,
) -> Result<(usize, usize), Error> {
    let (vocab, hidden) = dims_2d(op, "table", table.shape())?;
    expect_2d(op, "out", out.shape(), step.num_tokens(), hidden)?;
    Ok((vocab, hidden))
}

/// `embedding_shard`: [`check_embedding`], and the table's rows, starting at id
/// `vocab_start`, lie inside a vocabulary of `vocab_size`; returns `(rows, hidden)`.
pub fn check_embedding_shard(
    op: &'static str,
    table: &Weight,
    vocab_start: usize,
    vocab_size: usize,
    step: &PreparedStep,
    out: &Tensor,
) -> Result<(usize, usize), Error> {
    let (rows, hidden) = check_embedding(op, table, step, out)?;
    if vocab_start
        .checked_add(rows)
        .is_none_or(|end| end > vocab_size)
    {
        return Err(Error::shape(
            op,
            "table",
            format!("rows within the vocabulary of {vocab_size} from row {vocab_start}"),
            table.shape(),
        ));
    }
    Ok((rows, hidden))
}

/// Embedding lookups: every token id (a backend may pass only the largest) is below
/// `vocab_size`; the first one that is not is named.
pub fn check_token_ids(
    op: &'static str,
    ids: impl IntoIterator<Item = u32>,
    vocab_size: usize,
) -> Result<(), Error> {
    first_in_range(op, ids, vocab_size, |id| {
        format!("token id {id} outside the vocabulary of {vocab_size}")
    })
}

/// Ok when every one of `values` is below `limit`; else `Error::InvalidBatch` with `detail` of
/// the first that is not.
fn first_in_range(
    op: &'static str,
    values: impl IntoIterator<Item = u32>,
    limit: usize,
    detail: impl FnOnce(u32) -> String,
) -> Result<(), Error> {
    match values.into_iter().find(|v| *v as usize >= limit) {
        Some(v) => Err(Error::InvalidBatch {
            op,
            detail: detail(v),
        }),
        None => Ok(()),
    }
}

fn expect_norm_weight(op: &'static str, weight: &Weight, hidden: usize) -> Result<(), Error> {
    if weight.shape() != [hidden] {
        return Err(Error::shape(
            op,
            "weight",
            format!("[{hidden}]"),
            weight.shape(),
        ));
    }
    Ok(())
}

/// `rms_norm`: `x` and `out` are `[rows, hidden]`, `weight` is `[hidden]`; returns
/// `(rows, hidden)`.
pub fn check_rms_norm(
    op: &'static str,
    x: &Tensor,
    weight: &Weight,
    out: &Tensor,
) -> Result<(usize, usize), Error> {
    let (rows, hidden) = dims_2d(op, "x", x.shape())?;
    expect_norm_weight(op, weight, hidden)?;
    expect_2d(op, "out", out.shape(), rows, hidden)?;
    Ok((rows, hidden))
}

/// `add_rms_norm`: `residual`, `x` and `out` are `[rows, hidden]`, `weight` is `[hidden]`;
/// returns `(rows, hidden)`.
pub fn check_add_rms_norm(
    op: &'static str,
    residual: &Tensor,
    x: &Tensor,
    weight: &Weight,
    out: &Tensor,
) -> Result<(usize, usize), Error> {
    let (rows, hidden) = dims_2d(op, "residual", residual.shape())?;
    expect_2d(op, "x", x.shape(), rows, hidden)?;
    expect_2d(op, "out", out.shape(), rows, hidden)?;
    expect_norm_weight(op, weight, hidden)?;
    Ok((rows, hidden))
}

/// `linear`: `x` is `[rows, k]`, `weight` is `[n, k]`, `out` is `[rows, n]`; returns
/// `(rows, k, n)`.
pub fn check_linear(
    op: &'static str,
    x: &Tensor,
    weight: &Weight,
    out: &Tensor,
) -> Result<(usize, usize, usize), Error> {
    let (rows, k) = dims_2d(op, "x", x.shape())?;
    let (n, wk) = dims_2d(op, "weight", weight.shape())?;
    if wk != k {
        return Err(Error::shape(
            op,
            "weight",
            format!("[_, {k}] (in = x's columns)"),
            weight.shape(),
        ));
    }
    expect_2d(op, "out", out.shape(), rows, n)?;
    Ok((rows, k, n))
}

/// Attention-block ops (`rope`, `kv_write`, `attention`): `qkv` is
/// `[num_tokens, qkv_width]` of `layout`.
pub fn check_qkv(
    op: &'static str,
    qkv: &Tensor,
    layout: &AttentionLayout,
    step: &PreparedStep,
) -> Result<(), Error> {
    expect_2d(
        op,
        "qkv",
        qkv.shape(),
        step.num_tokens(),
        layout.qkv_width(),
    )
}

/// `rope`: the table is `[max_positions, head_dim]`; returns `(max_positions, rotary_dim)`.
pub fn check_rope_table(
    op: &'static str,
    rope_table: &Weight,
    layout: &AttentionLayout,
) -> Result<(usize, usize), Error> {
    let (max_positions, rotary_dim) = dims_2d(op, "rope_table", rope_table.shape())?;
    if rotary_dim != layout.head_dim {
        return Err(Error::shape(
            op,
            "rope_table",
            format!("[_, {}] (head_dim)", layout.head_dim),
            rope_table.shape(),
        ));
    }
    Ok((max_positions, rotary_dim))
}

/// `rope`: every position (a backend may pass only the largest) has a row in the table; the
/// first one that does not is named.
pub fn check_positions(
    op: &'static str,
    positions: impl IntoIterator<Item = u32>,
    max_positions: usize,
) -> Result<(), Error> {
    first_in_range(op, positions, max_positions, |p| {
        format!("position {p} past the RoPE table's {max_positions} positions")
    })
}

/// `kv_write` and `attention`: `layer` exists in the cache, whose heads match `layout`.
pub fn check_kv_layer(
    op: &'static str,
    kv: &KvCache,
    layer: usize,
    layout: &AttentionLayout,
) -> Result<(), Error> {
    let spec = kv.spec();
    if layer >= spec.num_layers
        || spec.n_kv_heads != layout.n_kv_heads
        || spec.head_dim != layout.head_dim
    {
        return Err(Error::shape(
            op,
            "kv",
            format!(
                "layer < {} with {} KV heads of {}",
                spec.num_layers, layout.n_kv_heads, layout.head_dim
            ),
            &[layer, spec.n_kv_heads, spec.head_dim],
        ));
    }
    Ok(())
}

/// `kv_write` (after the backend's own layout check): `qkv` fits the step and `layer` the
/// cache.
pub fn check_kv_write(
    op: &'static str,
    qkv: &Tensor,
    layout: &AttentionLayout,
    kv: &KvCache,
    layer: usize,
    step: &PreparedStep,
) -> Result<(), Error> {
    check_qkv(op, qkv, layout, step)?;
    check_kv_layer(op, kv, layer, layout)
}

/// `attention` (after the backend's own layout check): `qkv` fits the step, `out` is
/// `[num_tokens, q_width]` and `layer` fits the cache.
pub fn check_attention(
    op: &'static str,
    qkv: &Tensor,
    layout: &AttentionLayout,
    kv: &KvCache,
    layer: usize,
    step: &PreparedStep,
    out: &Tensor,
) -> Result<(), Error> {
    check_qkv(op, qkv, layout, step)?;
    expect_2d(op, "out", out.shape(), step.num_tokens(), layout.q_width())?;
    check_kv_layer(op, kv, layer, layout)
}

/// `silu_mul`: `gate_up` is `[rows, 2 * n]` and `out` is `[rows, n]`; returns `(rows, n)`.
pub fn check_silu_mul(
    op: &'static str,
    gate_up: &Tensor,
    out: &Tensor,
) -> Result<(usize, usize), Error> {
    let (rows, double) = dims_2d(op, "gate_up", gate_up.shape())?;
    if double % 2 != 0 {
        return Err(Error::shape(
            op,
            "gate_up",
            "[rows, 2 * n]",
            gate_up.shape(),
        ));
    }
    expect_2d(op, "out", out.shape(), rows, double / 2)?;
    Ok((rows, double / 2))
}

/// `gather_rows`: `x` is `[num_tokens, cols]` and `out` is `[num_logits_rows, cols]`; returns
/// `(num_tokens, cols)`.
pub fn check_gather_rows(
    op: &'static str,
    x: &Tensor,
    step: &PreparedStep,
    out: &Tensor,
) -> Result<(usize, usize), Error> {
    let rows = step.num_tokens();
    let cols = expect_rows(op, "x", x.shape(), rows)?;
    expect_2d(op, "out", out.shape(), step.num_logits_rows(), cols)?;
    Ok((rows, cols))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_helpers_name_operand_and_expected_shape() {
        assert_eq!(dims_2d("op", "x", &[2, 3]).expect("2-D"), (2, 3));
        let msg = dims_2d("op", "x", &[2, 3, 4]).expect_err("3-D").to_string();
        assert_eq!(
            msg,
            "op: operand `x` has shape [2, 3, 4], expected [rows, cols]"
        );
        let msg = expect_2d("op", "out", &[2, 4], 2, 3)
            .expect_err("cols")
            .to_string();
        assert_eq!(msg, "op: operand `out` has shape [2, 4], expected [2, 3]");
        assert_eq!(expect_rows("op", "x", &[5, 7], 5).expect("rows"), 7);
        let msg = expect_rows("op", "x", &[4, 7], 5)
            .expect_err("rows")
            .to_string();
        assert_eq!(msg, "op: operand `x` has shape [4, 7], expected [5, _]");
    }

    #[test]
    fn byte_and_range_checks_report_the_offender() {
        check_weight_bytes("w", DType::BF16, &[2, 3], 12).expect("6 bf16");
        let err = check_weight_bytes("w", DType::BF16, &[2, 3], 11).expect_err("11 bytes");
        assert!(
            matches!(
                err,
                Error::WeightBytes {
                    expected_bytes: 12,
                    actual_bytes: 11,
                    ..
                }
            ),
            "{err:?}"
        );
        check_rope_cos_sin(0, 0, 0, false).expect("empty allowed");
        assert!(check_rope_cos_sin(0, 0, 0, true).is_err(), "empty refused");
        assert!(check_rope_cos_sin(2, 3, 6, false).is_err(), "odd dim");
        let msg = check_token_ids("embedding", [1, 9, 12], 9)
            .expect_err("9 of 9")
            .to_string();
        assert!(msg.contains("token id 9 outside"), "{msg}");
        let msg = check_positions("rope", Some(4), 4)
            .expect_err("4 of 4")
            .to_string();
        assert!(msg.contains("position 4 past"), "{msg}");
        let msg = check_copy_pairs("copy_kv_blocks", &[(0, 1), (0, 3)], 3)
            .expect_err("block 3 of 3")
            .to_string();
        assert!(msg.contains("pair (0, 3) outside 3 blocks"), "{msg}");
    }
}
