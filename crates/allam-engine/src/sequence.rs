//! One sequence as the scheduler sees it: its tokens, how many of them have KV in the cache,
//! and its block table. Sampling and text state live in `core.rs`, so the scheduler stays
//! free of model and tokenizer concerns.
//!
//! Invariants: `num_computed < tokens.len()` while the sequence is live (the last token's KV is
//! computed in the step that samples the next one); `block_table` covers at least
//! `num_computed` tokens; the first `num_registered` blocks were offered to the prefix cache.

use allam_types::{RequestId, TokenId};

/// Engine-wide id of a sequence (a request with `n` > 1 has `n` of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct SeqId(pub(crate) u64);

/// Where a sequence is. A sequence is in exactly one of these (finished ones are removed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SeqState {
    Waiting,
    Running,
}

/// Scheduling order: lower priority value first, then earlier arrival, then sequence index.
pub(crate) type QueueKey = (i32, u64, u32, SeqId);

#[derive(Debug, Clone)]
pub(crate) struct Sequence {
    pub(crate) id: SeqId,
    pub(crate) request_id: RequestId,
    /// Which of the request's `n` sequences.
    pub(crate) index: u32,
    pub(crate) priority: i32,
    /// Admission order of the request (engine-wide counter); preemption keeps it, so a
    /// recomputed sequence goes back ahead of later arrivals.
    pub(crate) arrival: u64,
    /// Prompt then generated tokens.
    pub(crate) tokens: Vec<TokenId>,
    pub(crate) prompt_len: usize,
    pub(crate) num_computed: usize,
    pub(crate) block_table: Vec<u32>,
    /// Chained hashes of the first full blocks of `tokens` (extended lazily).
    pub(crate) block_hashes: Vec<u64>,
    pub(crate) num_registered: usize,
    /// Next prompt position whose logprob is still owed (`prompt_len` when none is), for
    /// requests that asked for prompt logprobs. While some are owed, the prefix cache is not
    /// consulted: cached positions produce no logits.
    pub(crate) prompt_logprobs_next: usize,
    pub(crate) state: SeqState,
}

impl Sequence {
    pub(crate) fn key(&self) -> QueueKey {
        (self.priority, self.arrival, self.index, self.id)
    }

    pub(crate) fn num_generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    pub(crate) fn generated(&self) -> &[TokenId] {
        &self.tokens[self.prompt_len..]
    }

    pub(crate) fn owes_prompt_logprobs(&self) -> bool {
        self.prompt_logprobs_next < self.prompt_len
    }
}
