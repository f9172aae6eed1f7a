//! What one engine step asks the model to compute, in host memory. Backends copy the parts
//! they need to the device once per step.

use allam_types::TokenId;

/// One sequence's share of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqInBatch {
    /// Index of this sequence's first query token in `StepBatch::token_ids`.
    pub query_start: u32,
    /// Number of query tokens computed this step (1 for a decode, a chunk for a prefill).
    pub query_len: u32,
    /// Tokens in this sequence's KV cache once this step's tokens are written
    /// (cached prefix + earlier chunks + this step's query tokens).
    pub context_len: u32,
    /// Physical block of each logical block, covering at least `context_len` tokens.
    pub block_table: Vec<u32>,
}

/// A batch of query tokens from any mix of prefills (possibly chunked) and decodes.
///
/// Invariants: sequences are laid out back to back (`seqs[i].query_start` is the sum of the
/// earlier `query_len`s); `token_ids`, `positions` and `slot_mapping` have one entry per query
/// token; a query token at position `p` of a sequence sees positions `0..=p` (causal), and
/// its own K/V are written to `slot_mapping[t] = block_table[p / block_size] * block_size +
/// p % block_size` before attention reads them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepBatch {
    pub token_ids: Vec<TokenId>,
    pub positions: Vec<u32>,
    pub slot_mapping: Vec<u32>,
    pub seqs: Vec<SeqInBatch>,
    /// Query-token rows whose logits the caller needs, in output order.
    pub logits_rows: Vec<u32>,
    /// Tokens per KV block.
    pub block_size: u32,
}

impl StepBatch {
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }
}
