//! What computes a step: the seam between the engine and the model.
//!
//! `Engine::start` wraps a `Model`, its backend and its KV cache in [`ModelExecutor`]. A
//! tensor-parallel worker can supply its own executor (for example one that broadcasts the
//! batch to the other ranks before running rank 0's forward) through
//! `Engine::start_with_executor`; tests use a fake one.
//!
//! The engine says per logits row what it needs ([`StepSampling`]): a row whose request uses
//! only temperature / top-k / top-p is sampled by the backend ([`Backend::sample`], a kernel
//! on a GPU), so only its token id and logprobs come back; a row that needs host work
//! (prompt logprobs, penalties, min-p, the `n > 1` fork) comes back whole, and only those
//! rows leave the device.

use allam_backend::sampling::sample_row;
use allam_backend::{Backend, KvCache, RowSampling, SampledToken, StepBatch};
use allam_model::Model;

/// The error an executor reports; its message reaches the failed requests' `Failed` events.
pub type ExecutorError = Box<dyn std::error::Error + Send + Sync>;

/// A failed [`run_model_step`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StepError {
    #[error(transparent)]
    Model(#[from] allam_model::Error),
    #[error("sampling the step's rows: {0}")]
    Sample(#[source] allam_backend::Error),
    #[error("copying logits to the host: {0}")]
    Logits(#[source] allam_backend::Error),
    #[error("waiting for the step on the device: {0}")]
    Synchronize(#[source] allam_backend::Error),
}

/// What the engine needs from one step's logits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepSampling {
    /// One entry per `batch.logits_rows` entry, in that order: `Some` samples the row by
    /// these parameters, `None` asks for the row's logits.
    pub rows: Vec<Option<RowSampling>>,
    /// `Some(n)` when some sampled row reports logprobs: each pick's logprob and its row's
    /// `n` largest (the most any row asked for; at most
    /// `allam_backend::sampling::MAX_TOP_LOGPROBS`). `None` skips the softmax denominator.
    pub logprobs: Option<usize>,
}

impl StepSampling {
    /// Indices of the rows that come back as logits.
    fn logits_rows(&self) -> Vec<usize> {
        (0..self.rows.len())
            .filter(|&r| self.rows[r].is_none())
            .collect()
    }
}

/// A step's results.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepOutput {
    /// Host f32 logits of the rows whose [`StepSampling::rows`] entry is `None`, in row order,
    /// `vocab_size` values each; nothing else crosses to the host.
    pub logits: Vec<f32>,
    /// One entry per row: the pick of each `Some` row, `None` for the others.
    pub sampled: Vec<Option<SampledToken>>,
}

impl StepOutput {
    /// For executors that compute host logits of every row (fakes, tests): samples the
    /// `Some` rows on the host by the same rules the backends follow and keeps the others.
    pub fn from_host_logits(all_rows: &[f32], sampling: &StepSampling) -> StepOutput {
        let rows = sampling.rows.len();
        let vocab = all_rows.len().checked_div(rows).unwrap_or(0);
        let row = |r: usize| all_rows.get(r * vocab..(r + 1) * vocab).unwrap_or(&[]);
        let sampled = sampling
            .rows
            .iter()
            .enumerate()
            .map(|(r, p)| p.as_ref().map(|p| sample_row(row(r), p, sampling.logprobs)))
            .collect();
        let logits = sampling
            .logits_rows()
            .into_iter()
            .flat_map(|r| row(r).iter().copied())
            .collect();
        StepOutput { logits, sampled }
    }
}

/// Runs the model over one step's batch. Called only on the engine thread.
pub trait StepExecutor: Send {
    /// `sampling.rows` has one entry per entry of `batch.logits_rows`.
    fn execute(
        &mut self,
        batch: &StepBatch,
        sampling: &StepSampling,
    ) -> Result<StepOutput, ExecutorError>;

    /// Decode batch sizes the executor's backend replays from captured graphs
    /// ([`Backend::graph_batch_sizes`]); the engine warms each up before serving.
    fn graph_batch_sizes(&self) -> Vec<usize> {
        Vec::new()
    }
}

/// A step of `size` padding sequences (`StepBatch::push_padding_seq`): it writes no KV and
/// its picks are dropped, but it runs, and so captures, the decode graph of its size.
pub(crate) fn padding_step(size: usize, block_size: usize) -> (StepBatch, StepSampling) {
    let mut batch = StepBatch {
        block_size: block_size as u32,
        ..StepBatch::default()
    };
    for _ in 0..size {
        batch.push_padding_seq();
    }
    let sampling = StepSampling {
        rows: vec![Some(RowSampling::greedy()); size],
        logprobs: None,
    };
    (batch, sampling)
}

/// The forward pass and the sampling of one step on `backend`: every sampled row is picked
/// by the backend (a kernel on a GPU) and only the rows that need host work are copied out,
/// so one request with penalties does not pull a whole batch's logits off the device.
pub fn run_model_step(
    model: &Model,
    backend: &mut dyn Backend,
    kv: &mut KvCache,
    batch: &StepBatch,
    sampling: &StepSampling,
) -> Result<StepOutput, StepError> {
    let Some(logits) = model.forward_logits(backend, kv, batch)? else {
        return Ok(StepOutput {
            logits: Vec::new(),
            sampled: vec![None; sampling.rows.len()],
        });
    };
    let mut sampled = vec![None; sampling.rows.len()];
    if sampling.rows.iter().any(Option::is_some) {
        // Rows the host handles get a cheap greedy pick whose result is dropped: the kernel
        // runs over whole tensors, and a greedy row costs one max over the vocabulary.
        let params: Vec<RowSampling> = sampling
            .rows
            .iter()
            .map(|p| p.unwrap_or_else(RowSampling::greedy))
            .collect();
        let picks = backend
            .sample(&logits, &params, sampling.logprobs)
            .map_err(StepError::Sample)?;
        for ((slot, pick), p) in sampled.iter_mut().zip(picks).zip(&sampling.rows) {
            if p.is_some() {
                *slot = Some(pick);
            }
        }
    }
    let host_rows = sampling.logits_rows();
    let logits = if host_rows.is_empty() {
        Vec::new()
    } else {
        backend
            .rows_to_host_f32(&logits, &host_rows)
            .map_err(StepError::Logits)?
    };
    Ok(StepOutput { logits, sampled })
}

/// A model on one backend with its paged KV cache.
pub(crate) struct ModelExecutor {
    pub(crate) model: Model,
    pub(crate) backend: Box<dyn Backend>,
    pub(crate) kv: KvCache,
}

impl StepExecutor for ModelExecutor {
    fn execute(
        &mut self,
        batch: &StepBatch,
        sampling: &StepSampling,
    ) -> Result<StepOutput, ExecutorError> {
        Ok(run_model_step(
            &self.model,
            self.backend.as_mut(),
            &mut self.kv,
            batch,
            sampling,
        )?)
    }

    fn graph_batch_sizes(&self) -> Vec<usize> {
        self.backend.graph_batch_sizes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_logits_sample_only_the_rows_that_ask() {
        let logits = vec![0.0, 2.0, 1.0, 5.0, -1.0, 0.0, 3.0, 1.0, 4.0];
        let sampling = StepSampling {
            rows: vec![None, Some(RowSampling::greedy()), None],
            logprobs: Some(2),
        };
        let out = StepOutput::from_host_logits(&logits, &sampling);
        assert_eq!(
            out.logits,
            [0.0, 2.0, 1.0, 3.0, 1.0, 4.0],
            "rows 0 and 2 only"
        );
        assert_eq!(out.sampled[0], None);
        assert_eq!(out.sampled[2], None);
        let pick = out.sampled[1].as_ref().expect("row 1 sampled");
        assert_eq!(pick.token, 0);
        assert_eq!(pick.top.iter().map(|t| t.0).collect::<Vec<_>>(), [0, 2]);
    }
}
