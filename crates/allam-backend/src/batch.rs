//! What one engine step asks the model to compute, in host memory. Backends copy the parts
//! they need to the device once per step ([`Backend::prepare_step`](crate::Backend::prepare_step)),
//! after [`StepBatch::validate`] has checked the invariants below, so no kernel ever indexes
//! out of bounds on a malformed batch.

use allam_types::TokenId;

use crate::Error;

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
/// p % block_size` before attention reads them. The one exception is [`PAD_SLOT`]: a padding
/// token (see [`StepBatch::padded_decode`]) whose K/V are written nowhere.
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

/// `slot_mapping` value of a padding token: its K/V are not written.
pub const PAD_SLOT: u32 = u32::MAX;

impl StepBatch {
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }

    /// This batch padded to `size` sequences, for a backend that replays one recorded step
    /// for every batch up to a size (CUDA graphs); `None` unless it is a pure decode batch
    /// (one query token per sequence, every row's logits asked for in order) of at most
    /// `size` sequences whose contexts fit `max_blocks` blocks. The padding sequences
    /// ([`StepBatch::push_padding_seq`]) come after the batch's own, and so do their logits
    /// rows, which are to be dropped.
    pub fn padded_decode(&self, size: usize, max_blocks: u32) -> Option<StepBatch> {
        let n = self.seqs.len();
        let block_size = self.block_size.max(1);
        let decode_only = n > 0
            && n <= size
            && self
                .seqs
                .iter()
                .enumerate()
                .all(|(i, s)| s.query_len == 1 && s.query_start == i as u32)
            && self.logits_rows.iter().copied().eq(0..n as u32)
            && self
                .seqs
                .iter()
                .all(|s| s.context_len.div_ceil(block_size) <= max_blocks);
        if !decode_only {
            return None;
        }
        let mut padded = self.clone();
        for _ in n..size {
            padded.push_padding_seq();
        }
        Some(padded)
    }

    /// Appends one padding sequence, logits row included: token 0 at position 0 with context
    /// 1 in block 0, its slot [`PAD_SLOT`], so it reads block 0 and writes nothing.
    pub fn push_padding_seq(&mut self) {
        let rows = self.push_seq(&[0], 1, vec![0]);
        self.logits_rows.push(rows.start);
        if let Some(slot) = self.slot_mapping.last_mut() {
            *slot = PAD_SLOT;
        }
    }

    /// Appends one sequence whose `query_tokens` are its last tokens of `context_len`,
    /// filling `positions` and `slot_mapping` from `block_table` (`block_size` must be set).
    /// Returns the query rows it occupies; push to `logits_rows` the ones you need.
    /// Does not validate: [`StepBatch::validate`] does, once per step.
    pub fn push_seq(
        &mut self,
        query_tokens: &[TokenId],
        context_len: u32,
        block_table: Vec<u32>,
    ) -> std::ops::Range<u32> {
        let query_start = self.token_ids.len() as u32;
        let query_len = query_tokens.len() as u32;
        let first_pos = context_len.saturating_sub(query_len);
        let block_size = self.block_size.max(1);
        for (i, token) in query_tokens.iter().enumerate() {
            let pos = first_pos + i as u32;
            let block = block_table
                .get((pos / block_size) as usize)
                .copied()
                .unwrap_or(u32::MAX);
            self.token_ids.push(*token);
            self.positions.push(pos);
            self.slot_mapping.push(
                block
                    .wrapping_mul(block_size)
                    .wrapping_add(pos % block_size),
            );
        }
        self.seqs.push(SeqInBatch {
            query_start,
            query_len,
            context_len,
            block_table,
        });
        query_start..query_start + query_len
    }

    /// Checks every documented invariant against a cache of `num_blocks` blocks; also that
    /// each sequence's query tokens sit at positions `context_len - query_len ..context_len`
    /// in order, and that `logits_rows` name existing rows.
    pub fn validate(&self, num_blocks: usize) -> Result<(), Error> {
        let bad = |detail: String| {
            Err(Error::InvalidBatch {
                op: "prepare_step",
                detail,
            })
        };
        let n = self.token_ids.len();
        if self.positions.len() != n || self.slot_mapping.len() != n {
            return bad(format!(
                "token_ids has {n} entries but positions has {} and slot_mapping {}",
                self.positions.len(),
                self.slot_mapping.len()
            ));
        }
        if self.block_size == 0 {
            return bad("block_size is 0".to_owned());
        }
        let block_size = self.block_size as u64;
        let mut next_start = 0u64;
        for (seq_idx, seq) in self.seqs.iter().enumerate() {
            if u64::from(seq.query_start) != next_start {
                return bad(format!(
                    "seqs[{seq_idx}].query_start is {} but the previous sequences end at {next_start}",
                    seq.query_start
                ));
            }
            if seq.query_len == 0 || seq.query_len > seq.context_len {
                return bad(format!(
                    "seqs[{seq_idx}] has query_len {} and context_len {} (need 1 <= query_len <= context_len)",
                    seq.query_len, seq.context_len
                ));
            }
            next_start += u64::from(seq.query_len);
            if next_start > n as u64 {
                return bad(format!("seqs[{seq_idx}] runs past the {n} query tokens"));
            }
            let needed_blocks = u64::from(seq.context_len).div_ceil(block_size);
            if (seq.block_table.len() as u64) < needed_blocks {
                return bad(format!(
                    "seqs[{seq_idx}] has {} blocks in its table, {needed_blocks} needed for context_len {}",
                    seq.block_table.len(),
                    seq.context_len
                ));
            }
            if let Some(block) = seq.block_table.iter().find(|b| **b as usize >= num_blocks) {
                return bad(format!(
                    "seqs[{seq_idx}] refers to block {block}, the cache has {num_blocks}"
                ));
            }
            let first_pos = seq.context_len - seq.query_len;
            for i in 0..seq.query_len {
                let t = (seq.query_start + i) as usize;
                let pos = first_pos + i;
                if self.positions[t] != pos {
                    return bad(format!(
                        "token {t} (seqs[{seq_idx}]) has position {}, expected {pos}",
                        self.positions[t]
                    ));
                }
                let block = u64::from(seq.block_table[(pos / self.block_size) as usize]);
                let slot = block * block_size + u64::from(pos % self.block_size);
                let padding = self.slot_mapping[t] == PAD_SLOT && pos == 0;
                if u64::from(self.slot_mapping[t]) != slot && !padding {
                    return bad(format!(
                        "token {t} (seqs[{seq_idx}]) has slot {}, its block table says {slot}",
                        self.slot_mapping[t]
                    ));
                }
            }
        }
        if next_start != n as u64 {
            return bad(format!(
                "seqs cover {next_start} query tokens, the batch has {n}"
            ));
        }
        if let Some(row) = self.logits_rows.iter().find(|r| **r as usize >= n) {
            return bad(format!(
                "logits_rows names row {row}, the batch has {n} tokens"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_seq_batch() -> StepBatch {
        let mut batch = StepBatch {
            block_size: 4,
            ..StepBatch::default()
        };
        // A 6-token prefill chunk over blocks [3, 0] and a decode at position 9 over [1, 2, 4].
        batch.push_seq(&[1, 2, 3, 4, 5, 6], 6, vec![3, 0]);
        let rows = batch.push_seq(&[7], 10, vec![1, 2, 4]);
        batch.logits_rows = vec![5, rows.start];
        batch
    }

    #[test]
    fn push_seq_fills_positions_and_slots_from_the_block_table() {
        let batch = two_seq_batch();
        assert_eq!(batch.positions, vec![0, 1, 2, 3, 4, 5, 9]);
        // Position p -> block_table[p / 4] * 4 + p % 4.
        assert_eq!(batch.slot_mapping, vec![12, 13, 14, 15, 0, 1, 17]);
        assert_eq!(batch.seqs[1].query_start, 6);
        batch.validate(5).expect("valid");
    }

    #[test]
    fn validate_rejects_each_broken_invariant() {
        type Breaker = fn(&mut StepBatch);
        let breakers: [(Breaker, &str); 7] = [
            (|b| b.positions[1] = 7, "position"),
            (|b| b.slot_mapping[6] = 3, "slot"),
            (|b| b.seqs[1].block_table.truncate(2), "blocks"),
            (|b| b.seqs[1].query_start = 5, "query_start"),
            (|b| b.logits_rows.push(7), "logits_rows"),
            (|b| b.block_size = 0, "block_size"),
            (|b| b.token_ids.truncate(6), "token_ids"),
        ];
        for (breaker, word) in breakers {
            let mut batch = two_seq_batch();
            breaker(&mut batch);
            let msg = batch.validate(5).expect_err(word).to_string();
            assert!(msg.contains(word), "want {word}: {msg}");
        }
        let msg = two_seq_batch()
            .validate(4)
            .expect_err("block 4")
            .to_string();
        assert!(msg.contains("block 4"), "{msg}");
    }

    fn decode_batch(contexts: &[u32]) -> StepBatch {
        let mut b = StepBatch {
            block_size: 4,
            ..Default::default()
        };
        for (i, &ctx) in contexts.iter().enumerate() {
            let blocks: Vec<u32> = (0..ctx.div_ceil(4))
                .map(|j| (10 * i as u32) + j + 1)
                .collect();
            let rows = b.push_seq(&[7 + i as u32], ctx, blocks);
            b.logits_rows.push(rows.start);
        }
        b
    }

    #[test]
    fn padding_adds_inert_sequences() {
        let b = decode_batch(&[5, 9, 1]);
        let p = b.padded_decode(8, 16).expect("decode batch");
        assert_eq!(p.seqs.len(), 8);
        assert_eq!(p.logits_rows, (0..8).collect::<Vec<u32>>());
        assert_eq!(&p.slot_mapping[..3], &b.slot_mapping[..]);
        assert!(p.slot_mapping[3..].iter().all(|&s| s == PAD_SLOT));
        assert!(p.seqs[3..]
            .iter()
            .all(|s| s.context_len == 1 && s.query_len == 1));
        assert!(p.positions[3..].iter().all(|&x| x == 0));
    }

    #[test]
    fn only_pure_decode_batches_that_fit_are_padded() {
        let b = decode_batch(&[5, 9]);
        assert!(
            b.padded_decode(1, 16).is_none(),
            "more sequences than the size"
        );
        assert!(
            b.padded_decode(2, 2).is_none(),
            "context 9 needs 3 blocks of 4"
        );
        let mut prefill = decode_batch(&[5]);
        prefill.push_seq(&[1, 2], 2, vec![3]);
        prefill.logits_rows.push(2);
        assert!(prefill.padded_decode(4, 16).is_none());
        let mut silent = decode_batch(&[5, 9]);
        silent.logits_rows.pop();
        assert!(
            silent.padded_decode(4, 16).is_none(),
            "a row that does not sample"
        );
        assert!(StepBatch::default().padded_decode(4, 16).is_none());
    }

    #[test]
    fn a_padded_batch_is_still_valid() {
        let p = decode_batch(&[5, 9, 1])
            .padded_decode(8, 16)
            .expect("decode batch");
        p.validate(40).expect("padding slots are allowed");
        let mut bad = p.clone();
        bad.slot_mapping[1] = PAD_SLOT;
        assert!(
            bad.validate(40).is_err(),
            "only a position-0 token may be padding"
        );
    }
}
