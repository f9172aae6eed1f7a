//! The `Backend` trait: the device operations the Llama forward pass is written against.
//! The CPU twin (`allam-backend-cpu`, f32) and the CUDA backend (`allam-backend-cuda`, bf16)
//! implement it; `allam-model` and `allam-engine` only ever see `dyn Backend`.

mod batch;

pub use batch::{SeqInBatch, StepBatch};
