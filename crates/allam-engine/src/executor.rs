//! What computes a step: the seam between the engine and the model.
//!
//! `Engine::start` wraps a `Model`, its backend and its KV cache in [`ModelExecutor`]. A
//! tensor-parallel worker can supply its own executor (for example one that broadcasts the
//! batch to the other ranks before running rank 0's forward) through
//! `Engine::start_with_executor`; tests use a fake one.

use allam_backend::{Backend, KvCache, StepBatch};
use allam_model::Model;

/// The error an executor reports; its message reaches the failed requests' `Failed` events.
pub type ExecutorError = Box<dyn std::error::Error + Send + Sync>;

/// Runs the model over one step's batch. Called only on the engine thread.
pub trait StepExecutor: Send {
    /// Host f32 logits, row-major `[batch.logits_rows.len(), vocab_size]`, one row per
    /// entry of `batch.logits_rows`, in that order.
    fn execute(&mut self, batch: &StepBatch) -> Result<Vec<f32>, ExecutorError>;
}

/// A model on one backend with its paged KV cache.
pub(crate) struct ModelExecutor {
    pub(crate) model: Model,
    pub(crate) backend: Box<dyn Backend>,
    pub(crate) kv: KvCache,
}

impl StepExecutor for ModelExecutor {
    fn execute(&mut self, batch: &StepBatch) -> Result<Vec<f32>, ExecutorError> {
        Ok(self
            .model
            .forward(self.backend.as_mut(), &mut self.kv, batch)?)
    }
}
