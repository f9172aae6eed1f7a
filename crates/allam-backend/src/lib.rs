//! The `Backend` trait: the device operations the Llama forward pass is written against.
//! The CPU twin (`allam-backend-cpu`, f32) and the CUDA backend (`allam-backend-cuda`, bf16)
//! implement it; `allam-model` and `allam-engine` only ever see `dyn Backend`.
//!
//! Device memory is reached only through opaque handles ([`Tensor`], [`Weight`], [`KvCache`],
//! [`PreparedStep`]) that the creating backend downcasts; see `backend.rs` for tensor layouts.

mod backend;
mod batch;
pub mod checks;
mod dtype;
mod error;
mod handle;
pub mod sampling;

pub use backend::{AttentionLayout, Backend, BackendInfo, GraphStep};
pub use batch::{SeqInBatch, StepBatch, PAD_SLOT};
pub use dtype::{decode_to_f32, DType};
pub use error::Error;
pub use handle::{KvCache, KvCacheSpec, PreparedStep, Tensor, Weight};
pub use sampling::{RowSampling, SampledToken};
