//! The serving engine: continuous batching over one shared paged KV cache.
//!
//! One OS thread (`allam-engine`) owns the model, the backend and the KV cache. Each step it
//! plans a batch (decodes first, then prefill chunks, under `max_num_batched_tokens` and
//! `max_num_seqs`; preemption by recompute when blocks run out), runs the forward pass,
//! samples every sequence with its own seeded RNG, detokenizes incrementally, and sends
//! events to each request's stream. Full KV blocks are shared through an automatic prefix
//! cache keyed by `allam_types::prefix_hash`.
//!
//! Entry points: [`Engine::start`] → [`EngineHandle`] (`submit`, `stats`,
//! `cached_block_hashes`, `model_info`, `drain`, `shutdown`) → [`EventStream`].
//!
//! Invariants: a sequence is in exactly one of waiting / running / finished; a KV block is
//! freed only at refcount zero; the engine never waits on a client (a closed receiver
//! cancels at the next step; a full event buffer pauses the request, never the engine); the same request with the same seed gives the same output
//! whatever else is batched with it.

mod block_manager;
mod config;
mod core;
mod engine;
mod error;
mod executor;
mod output;
mod sampler;
mod scheduler;
mod sequence;
mod stats;
mod stop;
mod stream;

#[doc(hidden)]
pub mod bench_support;

pub use config::EngineConfig;
pub use engine::{Engine, EngineHandle};
pub use error::Error;
pub use executor::{
    run_model_step, ExecutorError, StepError, StepExecutor, StepOutput, StepSampling,
};
pub use stats::{EngineStats, ModelInfo};
pub use stream::EventStream;

/// Stable `reason` labels of `EngineEvent::Failed`.
pub mod failure_reason {
    /// The request never started (queued at drain/shutdown): safe to retry elsewhere.
    pub const UNAVAILABLE: &str = "unavailable";
    /// The engine shut down while the request was running.
    pub const SHUTDOWN: &str = "shutdown";
    /// The model step that included the request failed.
    pub const ENGINE_ERROR: &str = "engine_error";
    /// The engine thread ended without finishing the request.
    pub const ENGINE_STOPPED: &str = "engine_stopped";
    /// The reader left the request's event buffer full for longer than
    /// `EngineConfig::stream_write_timeout`; its blocks were freed.
    pub const CLIENT_TOO_SLOW: &str = "client_too_slow";
}
