//! `EngineConfig`: construction inputs of the engine, with vLLM-like defaults, and the
//! checks that turn a bad value into `Error::InvalidConfig` naming the field.

use crate::Error;

/// How the engine sizes its KV cache and batches work.
///
/// KV cache size: `num_blocks` wins if set; otherwise `kv_cache_bytes` is divided by the
/// model's bytes per block.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Tokens per KV block (16 by default).
    pub block_size: usize,
    /// Memory budget of the KV cache (1 GiB by default).
    pub kv_cache_bytes: Option<usize>,
    /// Exact number of KV blocks (tests use it to force preemption).
    pub num_blocks: Option<usize>,
    /// Query tokens computed per step, over all sequences (vLLM `--max-num-batched-tokens`).
    pub max_num_batched_tokens: usize,
    /// Sequences in the running set (vLLM `--max-num-seqs`).
    pub max_num_seqs: usize,
    /// Requests admitted but not yet scheduled; beyond it `submit` answers `QueueFull`.
    pub max_waiting: usize,
    /// Reuse KV blocks of earlier prompts with the same prefix.
    pub enable_prefix_caching: bool,
    /// Longest prefill chunk of one sequence per step (default: the whole token budget).
    pub prefill_chunk_size: Option<usize>,
    /// How many cached block hashes the engine publishes for prefix-affinity routing.
    pub max_published_hashes: usize,
    /// Prefill tokens a step may carry beside decode rows (512 by default): bounds the gap a
    /// running stream sees while long prompts arrive. Steps without decodes use the whole
    /// `max_num_batched_tokens`.
    pub max_prefill_tokens_with_decodes: usize,
    /// Events buffered per request between the engine and its reader (at least one step's
    /// worth for the request's `n` is always allowed). A request whose buffer has no room for
    /// another step is paused: it keeps its KV blocks but is not scheduled.
    pub stream_buffer_events: usize,
    /// How long a request may stay paused behind a reader that does not read before it fails
    /// with `client_too_slow` and its blocks are freed.
    pub stream_write_timeout: std::time::Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            block_size: 16,
            kv_cache_bytes: Some(1 << 30),
            num_blocks: None,
            max_num_batched_tokens: 2048,
            max_num_seqs: 256,
            max_waiting: 1024,
            enable_prefix_caching: true,
            prefill_chunk_size: None,
            max_published_hashes: 16_384,
            max_prefill_tokens_with_decodes: 512,
            stream_buffer_events: 256,
            stream_write_timeout: std::time::Duration::from_secs(30),
        }
    }
}

impl EngineConfig {
    pub(crate) fn check(&self) -> Result<(), Error> {
        let positive = [
            ("block_size", self.block_size),
            ("max_num_batched_tokens", self.max_num_batched_tokens),
            ("max_num_seqs", self.max_num_seqs),
            ("max_waiting", self.max_waiting),
            ("stream_buffer_events", self.stream_buffer_events),
            (
                "max_prefill_tokens_with_decodes",
                self.max_prefill_tokens_with_decodes,
            ),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(Error::InvalidConfig {
                    field,
                    problem: "must be at least 1, got 0".to_owned(),
                });
            }
        }
        if self.prefill_chunk_size == Some(0) {
            return Err(Error::InvalidConfig {
                field: "prefill_chunk_size",
                problem: "must be at least 1 when set, got 0".to_owned(),
            });
        }
        if self.num_blocks == Some(0) {
            return Err(Error::InvalidConfig {
                field: "num_blocks",
                problem: "must be at least 1 when set, got 0".to_owned(),
            });
        }
        if self.stream_write_timeout.is_zero() {
            return Err(Error::InvalidConfig {
                field: "stream_write_timeout",
                problem: "must be longer than zero".to_owned(),
            });
        }
        if self.num_blocks.is_none() && self.kv_cache_bytes.is_none() {
            return Err(Error::InvalidConfig {
                field: "kv_cache_bytes",
                problem: "must be set when `num_blocks` is not".to_owned(),
            });
        }
        Ok(())
    }

    /// Tokens of one sequence computed per step at most.
    pub(crate) fn chunk_size(&self) -> usize {
        self.prefill_chunk_size
            .unwrap_or(self.max_num_batched_tokens)
            .min(self.max_num_batched_tokens)
    }

    /// Blocks for the cache given the model's bytes per block.
    pub(crate) fn resolve_num_blocks(&self, bytes_per_block: usize) -> Result<usize, Error> {
        if let Some(n) = self.num_blocks {
            return Ok(n);
        }
        let budget = self.kv_cache_bytes.unwrap_or(0);
        if bytes_per_block == 0 {
            return Err(Error::InvalidConfig {
                field: "kv_cache_bytes",
                problem: "cannot be used: the model reports 0 bytes per KV block".to_owned(),
            });
        }
        let n = budget / bytes_per_block;
        if n == 0 {
            return Err(Error::InvalidConfig {
                field: "kv_cache_bytes",
                problem: format!(
                    "{budget} bytes is less than one KV block ({bytes_per_block} bytes)"
                ),
            });
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        assert!(EngineConfig::default().check().is_ok());
    }

    #[test]
    fn zero_fields_are_named() {
        type Edit = fn(&mut EngineConfig);
        let cases: [(&str, Edit); 8] = [
            ("max_prefill_tokens_with_decodes", |c| {
                c.max_prefill_tokens_with_decodes = 0
            }),
            ("stream_buffer_events", |c| c.stream_buffer_events = 0),
            ("stream_write_timeout", |c| {
                c.stream_write_timeout = std::time::Duration::ZERO
            }),
            ("block_size", |c| c.block_size = 0),
            ("max_num_seqs", |c| c.max_num_seqs = 0),
            ("prefill_chunk_size", |c| c.prefill_chunk_size = Some(0)),
            ("num_blocks", |c| c.num_blocks = Some(0)),
            ("kv_cache_bytes", |c| c.kv_cache_bytes = None),
        ];
        for (field, edit) in cases {
            let mut config = EngineConfig::default();
            edit(&mut config);
            match config.check() {
                Err(Error::InvalidConfig { field: got, .. }) => assert_eq!(got, field),
                other => panic!("{field}: expected InvalidConfig, got {other:?}"),
            }
        }
    }

    #[test]
    fn blocks_from_budget() {
        let config = EngineConfig {
            kv_cache_bytes: Some(1000),
            ..EngineConfig::default()
        };
        assert_eq!(config.resolve_num_blocks(100).ok(), Some(10));
        assert!(config.resolve_num_blocks(2000).is_err());
        let exact = EngineConfig {
            num_blocks: Some(7),
            ..config
        };
        assert_eq!(exact.resolve_num_blocks(2000).ok(), Some(7));
    }

    #[test]
    fn chunk_never_exceeds_budget() {
        let config = EngineConfig {
            max_num_batched_tokens: 64,
            prefill_chunk_size: Some(100),
            ..EngineConfig::default()
        };
        assert_eq!(config.chunk_size(), 64);
    }
}
