//! Host-side packing of a step's metadata: everything the kernels index by (token ids,
//! positions, slots, logits rows, per-sequence block tables and lengths, prefill tiles) goes
//! into ONE u32 buffer, so a step costs one host-to-device copy.
//!
//! The batch is split by kind: sequences with `query_len == 1` go to the split-K decode
//! kernel, the others (prefills, chunks, prefix-cache hits) to the tiled prefill kernel. Each
//! group gets its own compacted arrays (the kernels index them by group-local sequence).
//!
//! Invariant: `pack_step` only runs on a batch that passed `StepBatch::validate`, so every
//! block id is inside the cache and every table covers its context.

use std::ops::Range;

use allam_backend::StepBatch;
use allam_kernels::geometry::{self, DecodePartitions, PrefillTiles};

/// Where each array sits in [`StepLayout::words`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StepLayout {
    pub(crate) words: Vec<u32>,
    pub(crate) token_ids: Range<usize>,
    pub(crate) positions: Range<usize>,
    pub(crate) slot_mapping: Range<usize>,
    pub(crate) logits_rows: Range<usize>,
    pub(crate) prefill: Option<PrefillMeta>,
    pub(crate) decode: Option<DecodeMeta>,
    /// Largest token id and position (checked against the table sizes by the ops).
    pub(crate) max_token_id: Option<u32>,
    pub(crate) max_position: Option<u32>,
}

/// Sequences with more than one query token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PrefillMeta {
    pub(crate) n_seqs: u32,
    pub(crate) max_blocks: u32,
    /// `[n_seqs, max_blocks]`, rows padded with block 0 (never read: past the context).
    pub(crate) block_tables: Range<usize>,
    pub(crate) query_start: Range<usize>,
    pub(crate) query_len: Range<usize>,
    pub(crate) context_lens: Range<usize>,
    pub(crate) n_tiles: u32,
    pub(crate) tile_seq: Range<usize>,
    pub(crate) tile_q_start: Range<usize>,
}

/// Sequences with exactly one query token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DecodeMeta {
    pub(crate) n_seqs: u32,
    pub(crate) max_blocks: u32,
    pub(crate) block_tables: Range<usize>,
    pub(crate) context_lens: Range<usize>,
    pub(crate) query_rows: Range<usize>,
    pub(crate) parts: DecodePartitions,
}

fn push(words: &mut Vec<u32>, data: impl IntoIterator<Item = u32>) -> Range<usize> {
    let start = words.len();
    words.extend(data);
    start..words.len()
}

/// Blocks a context of `context_len` tokens occupies.
fn blocks_needed(context_len: u32, block_size: u32) -> u32 {
    context_len.div_ceil(block_size)
}

/// `[n, max_blocks]` block tables of `seqs`, each cut to the blocks its context needs and
/// padded with 0.
fn pack_tables(
    words: &mut Vec<u32>,
    batch: &StepBatch,
    seqs: &[usize],
    max_blocks: u32,
) -> Range<usize> {
    let start = words.len();
    for &s in seqs {
        let seq = &batch.seqs[s];
        let needed = blocks_needed(seq.context_len, batch.block_size) as usize;
        let row = &seq.block_table[..needed];
        words.extend_from_slice(row);
        words.extend(std::iter::repeat_n(0, max_blocks as usize - needed));
    }
    start..words.len()
}

/// Packs a validated batch. `num_sms` feeds the decode split-K heuristic, `n_kv_heads` too
/// (CTAs per sequence).
pub(crate) fn pack_step(batch: &StepBatch, n_kv_heads: u32, num_sms: u32) -> StepLayout {
    pack_step_with(batch, n_kv_heads, num_sms, None)
}

/// [`pack_step`], with the decode tables `fixed_max_blocks` wide and the split-K geometry
/// sized for that many blocks of context when given: then the layout (every range, every
/// launch scalar) depends only on the number of sequences, which a replayed graph needs.
pub(crate) fn pack_step_with(
    batch: &StepBatch,
    n_kv_heads: u32,
    num_sms: u32,
    fixed_max_blocks: Option<u32>,
) -> StepLayout {
    let mut words = Vec::new();
    let token_ids = push(&mut words, batch.token_ids.iter().copied());
    let positions = push(&mut words, batch.positions.iter().copied());
    let slot_mapping = push(&mut words, batch.slot_mapping.iter().copied());
    let logits_rows = push(&mut words, batch.logits_rows.iter().copied());

    let (decode_seqs, prefill_seqs): (Vec<usize>, Vec<usize>) =
        (0..batch.seqs.len()).partition(|&s| batch.seqs[s].query_len == 1);
    let max_blocks_of = |seqs: &[usize]| {
        seqs.iter()
            .map(|&s| blocks_needed(batch.seqs[s].context_len, batch.block_size))
            .max()
            .unwrap_or(0)
            .max(1)
    };

    let prefill = (!prefill_seqs.is_empty()).then(|| {
        let max_blocks = max_blocks_of(&prefill_seqs);
        let block_tables = pack_tables(&mut words, batch, &prefill_seqs, max_blocks);
        let query_start = push(
            &mut words,
            prefill_seqs.iter().map(|&s| batch.seqs[s].query_start),
        );
        let query_len = push(
            &mut words,
            prefill_seqs.iter().map(|&s| batch.seqs[s].query_len),
        );
        let context_lens = push(
            &mut words,
            prefill_seqs.iter().map(|&s| batch.seqs[s].context_len),
        );
        let tiles: PrefillTiles = geometry::prefill_tiles(
            prefill_seqs
                .iter()
                .enumerate()
                .map(|(local, &s)| (local as u32, batch.seqs[s].query_len)),
        );
        let tile_seq = push(&mut words, tiles.tile_seq.iter().copied());
        let tile_q_start = push(&mut words, tiles.tile_q_start.iter().copied());
        PrefillMeta {
            n_seqs: prefill_seqs.len() as u32,
            max_blocks,
            block_tables,
            query_start,
            query_len,
            context_lens,
            n_tiles: tiles.len() as u32,
            tile_seq,
            tile_q_start,
        }
    });

    let decode = (!decode_seqs.is_empty()).then(|| {
        let max_blocks = fixed_max_blocks.unwrap_or_else(|| max_blocks_of(&decode_seqs));
        let block_tables = pack_tables(&mut words, batch, &decode_seqs, max_blocks);
        let context_lens = push(
            &mut words,
            decode_seqs.iter().map(|&s| batch.seqs[s].context_len),
        );
        let query_rows = push(
            &mut words,
            decode_seqs.iter().map(|&s| batch.seqs[s].query_start),
        );
        let max_context = match fixed_max_blocks {
            Some(blocks) => blocks * batch.block_size,
            None => decode_seqs
                .iter()
                .map(|&s| batch.seqs[s].context_len)
                .max()
                .unwrap_or(1),
        };
        DecodeMeta {
            n_seqs: decode_seqs.len() as u32,
            max_blocks,
            block_tables,
            context_lens,
            query_rows,
            parts: geometry::decode_partitions(
                max_context,
                decode_seqs.len() as u32,
                n_kv_heads,
                num_sms,
            ),
        }
    });

    if words.is_empty() {
        // Device allocations of zero bytes are avoided everywhere; one pad word is cheaper
        // than a special case.
        words.push(0);
    }
    StepLayout {
        words,
        token_ids,
        positions,
        slot_mapping,
        logits_rows,
        prefill,
        decode,
        max_token_id: batch.token_ids.iter().copied().max(),
        max_position: batch.positions.iter().copied().max(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two decodes around a chunked prefill and a fresh prompt, block size 4, with
    /// deliberately scattered physical blocks.
    fn mixed_batch() -> StepBatch {
        let mut b = StepBatch {
            block_size: 4,
            ..Default::default()
        };
        b.push_seq(&[11], 6, vec![9, 3]); // decode at position 5
        b.push_seq(&[1, 2, 3], 10, vec![4, 7, 2]); // chunk: positions 7..10 of 10
        b.push_seq(&[5], 1, vec![8]); // decode at position 0
        b.push_seq(&[6, 7], 2, vec![1, 0, 5]); // fresh prompt; table longer than needed
        b.logits_rows = vec![0, 3, 4, 6];
        b.validate(10).expect("valid batch");
        b
    }

    #[test]
    fn flat_arrays_are_copied_verbatim() {
        let b = mixed_batch();
        let l = pack_step(&b, 2, 132);
        assert_eq!(&l.words[l.token_ids.clone()], &b.token_ids[..]);
        assert_eq!(&l.words[l.positions.clone()], &b.positions[..]);
        assert_eq!(&l.words[l.slot_mapping.clone()], &b.slot_mapping[..]);
        assert_eq!(&l.words[l.logits_rows.clone()], &b.logits_rows[..]);
        assert_eq!(l.max_token_id, Some(11));
        assert_eq!(l.max_position, Some(9));
    }

    #[test]
    fn prefill_group_is_compacted_with_padded_tables_and_tiles() {
        let b = mixed_batch();
        let l = pack_step(&b, 2, 132);
        let p = l.prefill.expect("two prefills");
        assert_eq!(p.n_seqs, 2);
        // Contexts 10 and 2 at block size 4 need 3 and 1 blocks.
        assert_eq!(p.max_blocks, 3);
        assert_eq!(&l.words[p.block_tables.clone()], &[4, 7, 2, 1, 0, 0]);
        assert_eq!(&l.words[p.query_start.clone()], &[1, 5]);
        assert_eq!(&l.words[p.query_len.clone()], &[3, 2]);
        assert_eq!(&l.words[p.context_lens.clone()], &[10, 2]);
        assert_eq!(p.n_tiles, 2);
        assert_eq!(&l.words[p.tile_seq.clone()], &[0, 1]);
        assert_eq!(&l.words[p.tile_q_start.clone()], &[0, 0]);
    }

    #[test]
    fn decode_group_points_at_its_query_rows() {
        let b = mixed_batch();
        let l = pack_step(&b, 2, 132);
        let d = l.decode.expect("two decodes");
        assert_eq!(d.n_seqs, 2);
        assert_eq!(d.max_blocks, 2);
        assert_eq!(&l.words[d.block_tables.clone()], &[9, 3, 8, 0]);
        assert_eq!(&l.words[d.context_lens.clone()], &[6, 1]);
        assert_eq!(&l.words[d.query_rows.clone()], &[0, 4]);
        assert!(d.parts.partition_size * d.parts.max_partitions >= 6);
    }

    #[test]
    fn every_slot_the_kernels_compute_matches_the_batch_slot_mapping() {
        // Recompute each query token's slot from the packed tables, as the kernels do, and
        // compare with what kv_write will use.
        let b = mixed_batch();
        let l = pack_step(&b, 2, 132);
        let w = &l.words;
        let bs = b.block_size;
        let p = l.prefill.as_ref().expect("prefill");
        for s in 0..p.n_seqs as usize {
            let start = w[p.query_start.start + s];
            let qlen = w[p.query_len.start + s];
            let ctx = w[p.context_lens.start + s];
            for i in 0..qlen {
                let pos = ctx - qlen + i;
                let blk = w[p.block_tables.start + s * p.max_blocks as usize + (pos / bs) as usize];
                assert_eq!(blk * bs + pos % bs, b.slot_mapping[(start + i) as usize]);
            }
        }
        let d = l.decode.as_ref().expect("decode");
        for s in 0..d.n_seqs as usize {
            let row = w[d.query_rows.start + s];
            let pos = w[d.context_lens.start + s] - 1;
            let blk = w[d.block_tables.start + s * d.max_blocks as usize + (pos / bs) as usize];
            assert_eq!(blk * bs + pos % bs, b.slot_mapping[row as usize]);
        }
    }

    #[test]
    fn single_kind_batches_and_the_empty_batch() {
        let mut b = StepBatch {
            block_size: 16,
            ..Default::default()
        };
        b.push_seq(&[1, 2, 3], 3, vec![0]);
        let l = pack_step(&b, 8, 132);
        assert!(l.decode.is_none());
        assert_eq!(l.prefill.as_ref().map(|p| p.n_seqs), Some(1));

        let empty = StepBatch {
            block_size: 16,
            ..Default::default()
        };
        let l = pack_step(&empty, 8, 132);
        assert!(l.prefill.is_none() && l.decode.is_none());
        assert_eq!(l.words.len(), 1, "never a zero-byte upload");
        assert_eq!(l.max_token_id, None);
    }
}
