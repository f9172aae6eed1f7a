//! The Llama (ALLaM) model over `dyn Backend`: `config.json` parsing with transformers'
//! defaults, safetensors loading (single file or sharded, memory mapped), dummy and synthetic
//! weights from named presets, and the forward pass over a mixed prefill/decode `StepBatch`.
//!
//! Entry points: [`Model::load`] (a model directory), [`Model::from_config_dummy`] (random
//! weights for a [`ModelConfig`], e.g. [`ModelConfig::preset`]), [`Model::forward`], and
//! [`write_synthetic_checkpoint`].
//!
//! Tensor parallelism: load onto a backend that is one rank of a group (its `world_size()`
//! exceeds 1) and the model holds only that rank's Megatron slices ([`TpShard`]); every rank
//! then calls [`Model::forward`] with the same batches and gets the same logits.

mod config;
mod dummy;
mod error;
mod loader;
mod model;
mod presets;
mod rope;
mod shard;
mod source;
mod tensor_names;

pub use allam_backend::{KvCache, StepBatch};
pub use config::{ModelConfig, RopeScaling, LLAMA_ARCHITECTURE};
pub use dummy::write_synthetic_checkpoint;
pub use error::Error;
pub use loader::{LoadFormat, LoadOptions, ProgressMode};
pub use model::Model;
pub use presets::PRESET_NAMES;
pub use shard::TpShard;
pub use source::{SafetensorsSource, TensorMeta, WeightSource, INDEX_FILE, SINGLE_FILE};
