//! The CPU backend's tensor-parallel ops: the vocabulary-sliced embedding lookup and the two
//! collectives the model needs, over an `allam_comm::Communicator`.
//!
//! Invariant: a communicator failure becomes `Error::Collective` naming the op; the
//! communicator itself stays broken afterwards, so every later step fails fast too.

use allam_backend::{Error, PreparedStep, Tensor, Weight};
use allam_comm::Communicator;

use allam_backend::checks::{check_embedding_shard, check_token_ids, dims_2d};

use crate::storage;

fn collective(op: &'static str) -> impl FnOnce(allam_comm::Error) -> Error {
    move |e| Error::Collective {
        op,
        message: e.to_string(),
    }
}

/// Rows of `table` hold ids `vocab_start..vocab_start + rows`; other ids get zeros.
pub(crate) fn embedding_shard(
    table: &Weight,
    vocab_start: usize,
    vocab_size: usize,
    step: &PreparedStep,
    out: &mut Tensor,
) -> Result<(), Error> {
    const OP: &str = "embedding_shard";
    let (rows, hidden) = check_embedding_shard(OP, table, vocab_start, vocab_size, step, out)?;
    let ids = &storage::step(OP, step)?.batch.token_ids;
    check_token_ids(OP, ids.iter().copied(), vocab_size)?;
    let table = storage::weight(OP, "table", table)?;
    let out = storage::tensor_mut(OP, "out", out)?;
    for (row, id) in out.chunks_exact_mut(hidden).zip(ids) {
        match (*id as usize)
            .checked_sub(vocab_start)
            .filter(|r| *r < rows)
        {
            Some(r) => row.copy_from_slice(&table[r * hidden..(r + 1) * hidden]),
            None => row.fill(0.0),
        }
    }
    Ok(())
}

pub(crate) fn all_reduce_sum(comm: &dyn Communicator, x: &mut Tensor) -> Result<(), Error> {
    const OP: &str = "all_reduce_sum";
    let data = storage::tensor_mut(OP, "x", x)?;
    comm.all_reduce_sum_f32(data).map_err(collective(OP))
}

pub(crate) fn all_gather_cols(
    comm: Option<&dyn Communicator>,
    x: &Tensor,
    out: &mut Tensor,
) -> Result<(), Error> {
    const OP: &str = "all_gather_cols";
    let (rows, cols) = dims_2d(OP, "x", x.shape())?;
    let (out_rows, out_cols) = dims_2d(OP, "out", out.shape())?;
    if out_rows != rows {
        return Err(Error::shape(OP, "out", format!("[{rows}, _]"), out.shape()));
    }
    let local = storage::tensor(OP, "x", x)?;
    let parts: Vec<Vec<f32>> = match comm {
        Some(comm) => comm.all_gather_f32(local).map_err(collective(OP))?,
        None => vec![local.to_vec()],
    };
    if rows == 0 {
        // Nothing to place; the call still had to join the collective.
        return Ok(());
    }
    let mut widths = Vec::with_capacity(parts.len());
    for (rank, part) in parts.iter().enumerate() {
        if part.len() % rows != 0 {
            return Err(Error::Collective {
                op: OP,
                message: format!(
                    "rank {rank} sent {} values, not a whole number of {rows} rows",
                    part.len()
                ),
            });
        }
        widths.push(part.len() / rows);
    }
    let total: usize = widths.iter().sum();
    if total != out_cols || widths.get(comm.map_or(0, |c| c.rank())) != Some(&cols) {
        return Err(Error::shape(
            OP,
            "out",
            format!("[{rows}, {total}] (the ranks' columns together)"),
            out.shape(),
        ));
    }
    if total == 0 {
        return Ok(());
    }
    let out = storage::tensor_mut(OP, "out", out)?;
    for (r, out_row) in out.chunks_exact_mut(total).enumerate() {
        let mut at = 0;
        for (part, width) in parts.iter().zip(&widths) {
            out_row[at..at + width].copy_from_slice(&part[r * width..(r + 1) * width]);
            at += width;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use allam_backend::{Backend, DType, KvCacheSpec, StepBatch};
    use allam_comm::{join, GroupOptions, Rendezvous};

    use crate::{CpuBackend, CpuBackendConfig};

    fn config() -> CpuBackendConfig {
        CpuBackendConfig {
            threads: Some(1),
            kv_cache_budget_bytes: 1 << 20,
        }
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// Rank-0 and rank-1 backends of one TCP group, in this process.
    fn two_ranks() -> (CpuBackend, CpuBackend) {
        let opts = GroupOptions {
            collective_timeout: Duration::from_secs(10),
            rendezvous_timeout: Duration::from_secs(10),
        };
        let rendezvous = Rendezvous::bind("127.0.0.1:0", "cpu", 2, opts).expect("bind");
        let addr = rendezvous.local_addr().expect("addr").to_string();
        let joiner = std::thread::spawn(move || join(&addr, "cpu", 1, 2, opts).expect("join"));
        let leader = rendezvous.accept().expect("accept");
        let follower = joiner.join().expect("thread");
        (
            CpuBackend::with_communicator(&config(), leader.communicator).expect("rank 0"),
            CpuBackend::with_communicator(&config(), follower.communicator).expect("rank 1"),
        )
    }

    fn step_for(backend: &mut CpuBackend, ids: &[u32]) -> allam_backend::PreparedStep {
        let spec = KvCacheSpec {
            num_layers: 1,
            num_blocks: 1,
            block_size: 16,
            n_kv_heads: 1,
            head_dim: 2,
        };
        let kv = backend.alloc_kv_cache(&spec).expect("kv");
        let mut batch = StepBatch {
            block_size: 16,
            ..StepBatch::default()
        };
        batch.push_seq(ids, ids.len() as u32, vec![0]);
        backend.prepare_step(&batch, &kv).expect("step")
    }

    #[test]
    fn vocabulary_slices_sum_to_the_whole_lookup() {
        let mut b = CpuBackend::new(&config()).expect("backend");
        let (vocab, hidden) = (5usize, 3usize);
        let table: Vec<f32> = (0..vocab * hidden).map(|i| i as f32 + 0.5).collect();
        let ids = [4u32, 0, 2, 3];
        let step = step_for(&mut b, &ids);
        let mut summed = vec![0.0f32; ids.len() * hidden];
        for (start, end) in [(0usize, 2usize), (2, 5)] {
            let slice = &table[start * hidden..end * hidden];
            let w = b
                .upload_weight(
                    "embed",
                    DType::F32,
                    &[end - start, hidden],
                    &f32_bytes(slice),
                )
                .expect("w");
            let mut out = b.alloc(&[ids.len(), hidden]).expect("out");
            b.embedding_shard(&w, start, vocab, &step, &mut out)
                .expect("lookup");
            for (s, v) in summed.iter_mut().zip(b.to_host_f32(&out).expect("host")) {
                *s += v;
            }
        }
        let want: Vec<f32> = ids
            .iter()
            .flat_map(|id| table[*id as usize * hidden..(*id as usize + 1) * hidden].to_vec())
            .collect();
        assert_eq!(summed, want);
        let w = b
            .upload_weight("embed", DType::F32, &[2, hidden], &f32_bytes(&table[..6]))
            .expect("w");
        let mut out = b.alloc(&[ids.len(), hidden]).expect("out");
        let err = b
            .embedding_shard(&w, 0, 4, &step, &mut out)
            .expect_err("id 4 of a vocabulary of 4");
        assert!(err.to_string().contains("token id 4"), "{err}");
    }

    /// Column-parallel then row-parallel linears over two ranks give the one-rank result.
    #[test]
    fn two_ranks_reduce_and_gather_like_one() {
        let (rows, k, n) = (3usize, 4usize, 6usize);
        let x: Vec<f32> = (0..rows * k).map(|i| (i as f32 * 0.7).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.3).cos()).collect();
        let mut solo = CpuBackend::new(&config()).expect("backend");
        let xs = solo.upload_f32(&[rows, k], &x).expect("x");
        let ws = solo
            .upload_weight("w", DType::F32, &[n, k], &f32_bytes(&w))
            .expect("w");
        let mut full = solo.alloc(&[rows, n]).expect("out");
        solo.linear(&xs, &ws, &mut full).expect("linear");
        let full = solo.to_host_f32(&full).expect("host");

        let (r0, r1) = two_ranks();
        assert_eq!((r0.rank(), r0.world_size(), r1.rank()), (0, 2, 1));
        let run = move |mut b: CpuBackend| {
            let rank = b.rank();
            // Column-parallel: this rank's 3 output rows of w, gathered.
            let w_rows = &w[rank * 3 * k..(rank + 1) * 3 * k];
            let wr = b
                .upload_weight("w", DType::F32, &[3, k], &f32_bytes(w_rows))
                .expect("w");
            let xr = b.upload_f32(&[rows, k], &x).expect("x");
            let mut part = b.alloc(&[rows, 3]).expect("part");
            b.linear(&xr, &wr, &mut part).expect("linear");
            let mut gathered = b.alloc(&[rows, n]).expect("gathered");
            b.all_gather_cols(&part, &mut gathered).expect("gather");
            // Row-parallel: this rank's half of the inputs, summed.
            let half = k / 2;
            let x_cols: Vec<f32> = x
                .chunks_exact(k)
                .flat_map(|r| r[rank * half..(rank + 1) * half].to_vec())
                .collect();
            let w_cols: Vec<f32> = w
                .chunks_exact(k)
                .flat_map(|r| r[rank * half..(rank + 1) * half].to_vec())
                .collect();
            let xc = b.upload_f32(&[rows, half], &x_cols).expect("x cols");
            let wc = b
                .upload_weight("w", DType::F32, &[n, half], &f32_bytes(&w_cols))
                .expect("w cols");
            let mut reduced = b.alloc(&[rows, n]).expect("reduced");
            b.linear(&xc, &wc, &mut reduced).expect("linear");
            b.all_reduce_sum(&mut reduced).expect("reduce");
            (
                b.to_host_f32(&gathered).expect("host"),
                b.to_host_f32(&reduced).expect("host"),
            )
        };
        let run1 = run.clone();
        let other = std::thread::spawn(move || run1(r1));
        let results = [run(r0), other.join().expect("rank 1")];
        for (gathered, reduced) in &results {
            assert_eq!(gathered, &full, "gathered columns are the one-rank columns");
            for (a, b) in reduced.iter().zip(&full) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
        assert_eq!(results[0].1, results[1].1, "both ranks hold the same sum");
    }

    #[test]
    fn a_backend_without_a_group_is_rank_0_of_1() {
        let mut b = CpuBackend::new(&config()).expect("backend");
        assert_eq!((b.rank(), b.world_size()), (0, 1));
        let mut x = b.upload_f32(&[1, 2], &[1.0, 2.0]).expect("x");
        b.all_reduce_sum(&mut x).expect("no-op");
        let mut out = b.alloc(&[1, 2]).expect("out");
        b.all_gather_cols(&x, &mut out).expect("copy");
        assert_eq!(b.to_host_f32(&out).expect("host"), [1.0, 2.0]);
    }
}
