//! What the engine thread publishes for handles to read without talking to it: counters in
//! atomics, and the prefix-cache hash summary behind a mutex the engine only ever `try_lock`s,
//! so a reader can never make a step wait.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A snapshot of the engine's load and cache state.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EngineStats {
    /// Sequences holding KV blocks and being stepped.
    pub running: usize,
    /// Sequences waiting to be scheduled (new or preempted).
    pub waiting: usize,
    /// Requests accepted by `submit` that were not yet scheduled (bounded by `max_waiting`).
    pub queued_requests: usize,
    pub kv_blocks_total: usize,
    /// Blocks referenced by at least one sequence (cached free blocks count as free).
    pub kv_blocks_used: usize,
    pub kv_usage_ratio: f64,
    /// Prompt tokens found in the prefix cache / prompt tokens looked up, since start.
    pub prefix_cache_hit_ratio: f64,
    pub prefix_cache_queried_tokens: u64,
    pub prefix_cache_hit_tokens: u64,
    pub preemptions: u64,
    pub steps: u64,
}

/// Model and cache facts fixed at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    pub vocab_size: usize,
    /// Longest sequence (prompt + generated) the model accepts.
    pub max_context: usize,
    /// Tokens that end a sequence (unless `ignore_eos`): the model config's and the
    /// tokenizer's eos.
    pub eos_token_ids: Vec<u32>,
    pub block_size: usize,
    pub num_blocks: usize,
}

impl ModelInfo {
    /// Tokens the whole KV cache holds.
    pub fn kv_capacity_tokens(&self) -> usize {
        self.num_blocks * self.block_size
    }
}

#[derive(Default)]
pub(crate) struct Shared {
    /// Submitted, not yet scheduled. Incremented by `submit`, decremented by the engine.
    pub(crate) queued_requests: AtomicUsize,
    pub(crate) running: AtomicUsize,
    pub(crate) waiting: AtomicUsize,
    pub(crate) kv_blocks_used: AtomicUsize,
    pub(crate) prefix_queried: AtomicU64,
    pub(crate) prefix_hit: AtomicU64,
    pub(crate) preemptions: AtomicU64,
    pub(crate) steps: AtomicU64,
    /// No new requests (drain or shutdown began, or the thread ended).
    pub(crate) closed: AtomicBool,
    pub(crate) cached_hashes: Mutex<Arc<Vec<u64>>>,
}

impl Shared {
    pub(crate) fn snapshot(&self, kv_blocks_total: usize) -> EngineStats {
        let used = self.kv_blocks_used.load(Ordering::Relaxed);
        let queried = self.prefix_queried.load(Ordering::Relaxed);
        let hit = self.prefix_hit.load(Ordering::Relaxed);
        EngineStats {
            running: self.running.load(Ordering::Relaxed),
            waiting: self.waiting.load(Ordering::Relaxed),
            queued_requests: self.queued_requests.load(Ordering::Relaxed),
            kv_blocks_total,
            kv_blocks_used: used,
            kv_usage_ratio: ratio(used as u64, kv_blocks_total as u64),
            prefix_cache_hit_ratio: ratio(hit, queried),
            prefix_cache_queried_tokens: queried,
            prefix_cache_hit_tokens: hit,
            preemptions: self.preemptions.load(Ordering::Relaxed),
            steps: self.steps.load(Ordering::Relaxed),
        }
    }

    /// Decrements `queued_requests` (never below zero).
    pub(crate) fn dequeue_request(&self) {
        let _ = self
            .queued_requests
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}
