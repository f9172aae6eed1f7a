//! The one error type of the engine: what `Engine::start` and `EngineHandle::submit` can
//! answer. Failures of a running request are not errors of this type: they reach the
//! request's stream as `EngineEvent::Failed` with one of the [`crate::failure_reason`] labels.

/// A failed engine call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `EngineConfig` field `field` has an unusable value.
    #[error("engine config: `{field}` {problem}")]
    InvalidConfig {
        field: &'static str,
        problem: String,
    },
    /// The model could not allocate its KV cache or answer a sizing question.
    #[error("allocating the KV cache of {num_blocks} blocks: {source}")]
    KvCacheAlloc {
        num_blocks: usize,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A padding step that captures a decode graph failed before serving (typically: the
    /// graph's activations do not fit beside the KV cache).
    #[error(
        "warming up the decode graph for {size} sequences: {source} (lower the KV cache budget \
         or the largest graph batch, or turn CUDA graphs off)"
    )]
    GraphWarmup {
        size: usize,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The engine thread could not be spawned.
    #[error("spawning the `allam-engine` thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// The waiting queue holds `max_waiting` requests already (retry later: 429).
    #[error("the engine's waiting queue is full ({max_waiting} requests)")]
    QueueFull { max_waiting: usize },
    /// The request needs more KV blocks than the whole cache has, so it could never run.
    #[error(
        "the request needs {needed_tokens} tokens of KV cache (prompt {prompt_tokens} + \
         `max_new_tokens` {max_new_tokens}) but the whole cache holds {capacity_tokens}"
    )]
    PromptTooLarge {
        prompt_tokens: usize,
        max_new_tokens: usize,
        needed_tokens: usize,
        capacity_tokens: usize,
    },
    /// The request's prompt is empty or a token id is outside the model's vocabulary.
    #[error("the request is not valid for this model: {0}")]
    InvalidRequest(String),
    /// The engine is shutting down or its thread has ended.
    #[error("the engine has stopped")]
    Stopped,
}

impl Error {
    /// A short stable label for the `reason` metric label and error bodies.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidConfig { .. } => "invalid_config",
            Error::KvCacheAlloc { .. } => "kv_cache_alloc",
            Error::GraphWarmup { .. } => "graph_warmup",
            Error::Spawn(_) => "engine_spawn",
            Error::QueueFull { .. } => "queue_full",
            Error::PromptTooLarge { .. } => "prompt_too_large",
            Error::InvalidRequest(_) => "invalid_request",
            Error::Stopped => "engine_stopped",
        }
    }
}
