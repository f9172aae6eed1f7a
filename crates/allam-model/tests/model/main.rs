//! Integration tests of `allam-model` on the CPU backend: transformers goldens for every
//! fixture model, chunked prefill in mixed batches, load errors, synthetic checkpoints,
//! and tensor parallelism over ranks in threads.

mod fixtures;
mod goldens;
mod load_errors;
mod support;
mod synthetic;
mod tp;
