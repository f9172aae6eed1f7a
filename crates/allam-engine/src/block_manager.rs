//! The KV block pool: reference-counted fixed-size blocks plus the automatic prefix cache.
//!
//! Every block is in exactly one of three states:
//! - **in use**: `ref_count > 0`, listed in some sequences' block tables;
//! - **cached free**: `ref_count == 0` but holding the KV of a full block whose chained hash is
//!   in the prefix cache; kept in an LRU list and evicted (its hash forgotten) only when an
//!   allocation finds no plain free block;
//! - **free**: `ref_count == 0`, no hash, on the free stack.
//!
//! Invariants: a block is freed only when its refcount reaches zero; a block with a hash is
//! never written again (sequences write only positions past their computed prefix, and only
//! full computed blocks get a hash); the hash map and the per-block hashes agree.
//!
//! A prefix-cache hit also compares the block's tokens and parent hash, so even a 64-bit hash
//! collision cannot hand a sequence someone else's KV.

use std::collections::HashMap;

use allam_types::prefix_hash::next_block_hash;

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct BlockMeta {
    ref_count: u32,
    /// Chained hash of the block's tokens, when it is in the prefix cache.
    hash: Option<u64>,
    /// Hash of the previous block in the chain (`None` for a first block).
    parent: Option<u64>,
    /// LRU links, meaningful only for cached free blocks.
    prev: u32,
    next: u32,
}

/// The pool. Owned by the scheduler, on the engine thread.
pub(crate) struct BlockPool {
    block_size: usize,
    meta: Vec<BlockMeta>,
    /// `block_size` tokens per block, valid for blocks with a hash.
    tokens: Vec<u32>,
    free: Vec<u32>,
    lru_head: u32,
    lru_tail: u32,
    num_cached_free: usize,
    cache: HashMap<u64, u32>,
    caching: bool,
}

impl BlockPool {
    pub(crate) fn new(num_blocks: usize, block_size: usize, caching: bool) -> BlockPool {
        let num_blocks = num_blocks.min(NIL as usize);
        BlockPool {
            block_size,
            meta: vec![
                BlockMeta {
                    ref_count: 0,
                    hash: None,
                    parent: None,
                    prev: NIL,
                    next: NIL,
                };
                num_blocks
            ],
            tokens: vec![0; if caching { num_blocks * block_size } else { 0 }],
            // Reversed so block 0 is handed out first (easier to read in traces).
            free: (0..num_blocks as u32).rev().collect(),
            lru_head: NIL,
            lru_tail: NIL,
            num_cached_free: 0,
            // Sized up front: growing a map of ~100k entries mid-step costs milliseconds.
            cache: HashMap::with_capacity(if caching { num_blocks } else { 0 }),
            caching,
        }
    }

    pub(crate) fn num_blocks(&self) -> usize {
        self.meta.len()
    }

    pub(crate) fn block_size(&self) -> usize {
        self.block_size
    }

    pub(crate) fn caching(&self) -> bool {
        self.caching
    }

    /// Blocks an allocation can get: plain free plus evictable cached ones.
    pub(crate) fn num_free(&self) -> usize {
        self.free.len() + self.num_cached_free
    }

    /// Blocks referenced by at least one sequence.
    pub(crate) fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// Takes a block with refcount 1; evicts the least recently used cached block when no
    /// plain free block is left. `None` when every block is in use.
    pub(crate) fn allocate(&mut self) -> Option<u32> {
        let block = match self.free.pop() {
            Some(block) => block,
            None => {
                let victim = self.lru_head;
                if victim == NIL {
                    return None;
                }
                self.lru_remove(victim);
                self.forget(victim);
                victim
            }
        };
        let meta = &mut self.meta[block as usize];
        debug_assert_eq!(meta.ref_count, 0, "allocating a referenced block");
        meta.ref_count = 1;
        Some(block)
    }

    /// Adds a reference to a block that is in use or cached free.
    pub(crate) fn incref(&mut self, block: u32) {
        let meta = &self.meta[block as usize];
        if meta.ref_count == 0 {
            debug_assert!(meta.hash.is_some(), "incref of a plain free block");
            self.lru_remove(block);
        }
        self.meta[block as usize].ref_count += 1;
    }

    /// Drops one reference; at zero the block becomes cached free (if it has a hash) or free.
    pub(crate) fn release(&mut self, block: u32) {
        let meta = &mut self.meta[block as usize];
        debug_assert!(
            meta.ref_count > 0,
            "releasing block {block} with refcount 0"
        );
        meta.ref_count = meta.ref_count.saturating_sub(1);
        if meta.ref_count > 0 {
            return;
        }
        if meta.hash.is_some() {
            self.lru_push_tail(block);
        } else {
            self.free.push(block);
        }
    }

    /// Releases a whole block table, last block first, so that a sequence's tail blocks are
    /// evicted before its (more shareable) leading ones.
    pub(crate) fn release_table(&mut self, table: &[u32]) {
        for &block in table.iter().rev() {
            self.release(block);
        }
    }

    /// The longest cached prefix of `tokens` (whose full-block hashes are `hashes`), at most
    /// `max_blocks` blocks. Each returned block gained a reference.
    pub(crate) fn lookup(&mut self, tokens: &[u32], hashes: &[u64], max_blocks: usize) -> Vec<u32> {
        let mut hits = Vec::new();
        if !self.caching {
            return hits;
        }
        let mut parent = None;
        for (i, &hash) in hashes.iter().take(max_blocks).enumerate() {
            let Some(&block) = self.cache.get(&hash) else {
                break;
            };
            let start = i * self.block_size;
            let Some(want) = tokens.get(start..start + self.block_size) else {
                break;
            };
            if self.meta[block as usize].parent != parent || self.block_tokens(block) != want {
                break;
            }
            self.incref(block);
            hits.push(block);
            parent = Some(hash);
        }
        hits
    }

    /// Enters a full, computed block into the prefix cache under `hash`. A no-op when caching
    /// is off, the block already has a hash, or another block holds this hash (the same
    /// prefix computed twice concurrently: the first stays canonical).
    pub(crate) fn register(&mut self, block: u32, hash: u64, parent: Option<u64>, tokens: &[u32]) {
        if !self.caching || tokens.len() != self.block_size {
            return;
        }
        if self.meta[block as usize].hash.is_some() || self.cache.contains_key(&hash) {
            return;
        }
        debug_assert!(self.meta[block as usize].ref_count > 0);
        let start = block as usize * self.block_size;
        self.tokens[start..start + self.block_size].copy_from_slice(tokens);
        let meta = &mut self.meta[block as usize];
        meta.hash = Some(hash);
        meta.parent = parent;
        self.cache.insert(hash, block);
    }

    /// Up to `max` hashes of cached blocks: cached free ones most recently released first,
    /// then in-use ones. Every hash names a prefix this pool can serve from cache.
    pub(crate) fn cached_hashes(&self, max: usize) -> Vec<u64> {
        let mut out = Vec::with_capacity(max.min(self.cache.len()));
        let mut cursor = self.lru_tail;
        while cursor != NIL && out.len() < max {
            if let Some(hash) = self.meta[cursor as usize].hash {
                out.push(hash);
            }
            cursor = self.meta[cursor as usize].prev;
        }
        for meta in &self.meta {
            if out.len() >= max {
                break;
            }
            if meta.ref_count > 0 {
                if let Some(hash) = meta.hash {
                    out.push(hash);
                }
            }
        }
        out
    }

    fn block_tokens(&self, block: u32) -> &[u32] {
        let start = block as usize * self.block_size;
        &self.tokens[start..start + self.block_size]
    }

    fn forget(&mut self, block: u32) {
        if let Some(hash) = self.meta[block as usize].hash.take() {
            if self.cache.get(&hash) == Some(&block) {
                self.cache.remove(&hash);
            }
        }
        self.meta[block as usize].parent = None;
    }

    fn lru_push_tail(&mut self, block: u32) {
        let tail = self.lru_tail;
        {
            let meta = &mut self.meta[block as usize];
            meta.prev = tail;
            meta.next = NIL;
        }
        if tail == NIL {
            self.lru_head = block;
        } else {
            self.meta[tail as usize].next = block;
        }
        self.lru_tail = block;
        self.num_cached_free += 1;
    }

    fn lru_remove(&mut self, block: u32) {
        let (prev, next) = {
            let meta = &self.meta[block as usize];
            (meta.prev, meta.next)
        };
        if prev == NIL {
            self.lru_head = next;
        } else {
            self.meta[prev as usize].next = next;
        }
        if next == NIL {
            self.lru_tail = prev;
        } else {
            self.meta[next as usize].prev = prev;
        }
        let meta = &mut self.meta[block as usize];
        meta.prev = NIL;
        meta.next = NIL;
        self.num_cached_free -= 1;
    }

    /// Checks every structural invariant; for tests.
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        let mut in_lru = vec![false; self.num_blocks()];
        let mut cursor = self.lru_head;
        let mut count = 0;
        let mut prev = NIL;
        while cursor != NIL {
            assert_eq!(self.meta[cursor as usize].prev, prev, "LRU back link");
            assert!(!in_lru[cursor as usize], "LRU cycle");
            in_lru[cursor as usize] = true;
            count += 1;
            prev = cursor;
            cursor = self.meta[cursor as usize].next;
        }
        assert_eq!(self.lru_tail, prev);
        assert_eq!(count, self.num_cached_free);
        let mut in_free = vec![false; self.num_blocks()];
        for &b in &self.free {
            assert!(!in_free[b as usize], "block {b} twice on the free stack");
            in_free[b as usize] = true;
        }
        for (b, meta) in self.meta.iter().enumerate() {
            match (meta.ref_count, meta.hash) {
                (0, Some(_)) => assert!(in_lru[b] && !in_free[b], "cached free block {b}"),
                (0, None) => assert!(in_free[b] && !in_lru[b], "free block {b}"),
                _ => assert!(!in_free[b] && !in_lru[b], "used block {b}"),
            }
            if let Some(hash) = meta.hash {
                assert_eq!(self.cache.get(&hash), Some(&(b as u32)), "cache map of {b}");
            }
        }
        assert_eq!(
            self.cache.len(),
            self.meta.iter().filter(|m| m.hash.is_some()).count()
        );
    }

    #[cfg(test)]
    pub(crate) fn ref_count(&self, block: u32) -> u32 {
        self.meta[block as usize].ref_count
    }
}

/// Chained hashes of the full blocks of `tokens`, extending `hashes` (which already covers
/// the first `hashes.len()` blocks) up to `num_blocks` blocks.
pub(crate) fn extend_block_hashes(
    hashes: &mut Vec<u64>,
    tokens: &[u32],
    block_size: usize,
    num_blocks: usize,
) {
    let num_blocks = num_blocks.min(tokens.len() / block_size);
    while hashes.len() < num_blocks {
        let i = hashes.len();
        let hash = next_block_hash(
            hashes.last().copied(),
            &tokens[i * block_size..(i + 1) * block_size],
        );
        hashes.push(hash);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use allam_types::prefix_hash::prefix_block_hashes;

    fn fill_and_register(pool: &mut BlockPool, tokens: &[u32]) -> Vec<u32> {
        let hashes = prefix_block_hashes(tokens, pool.block_size());
        let mut table = Vec::new();
        for (i, &hash) in hashes.iter().enumerate() {
            let block = pool.allocate().expect("pool has room");
            let bs = pool.block_size();
            let parent = if i == 0 { None } else { Some(hashes[i - 1]) };
            pool.register(block, hash, parent, &tokens[i * bs..(i + 1) * bs]);
            table.push(block);
        }
        table
    }

    #[test]
    fn allocate_until_empty_then_release() {
        let mut pool = BlockPool::new(3, 4, false);
        let blocks: Vec<u32> = (0..3).filter_map(|_| pool.allocate()).collect();
        assert_eq!(blocks.len(), 3);
        assert_eq!(pool.allocate(), None);
        assert_eq!(pool.num_used(), 3);
        pool.release_table(&blocks);
        assert_eq!(pool.num_free(), 3);
        pool.check_invariants();
    }

    #[test]
    fn shared_block_freed_only_at_zero() {
        let mut pool = BlockPool::new(2, 4, true);
        let tokens: Vec<u32> = (0..4).collect();
        let table = fill_and_register(&mut pool, &tokens);
        let hashes = prefix_block_hashes(&tokens, 4);
        let hit = pool.lookup(&tokens, &hashes, 1);
        assert_eq!(hit, table);
        assert_eq!(pool.ref_count(table[0]), 2);
        pool.release(table[0]);
        assert_eq!(pool.num_used(), 1, "still referenced by the second user");
        pool.release(table[0]);
        assert_eq!(pool.num_used(), 0);
        pool.check_invariants();
    }

    #[test]
    fn cached_free_block_is_reused_then_evicted_lru() {
        let mut pool = BlockPool::new(2, 2, true);
        let a = [1, 2];
        let b = [3, 4];
        let ta = fill_and_register(&mut pool, &a);
        let tb = fill_and_register(&mut pool, &b);
        pool.release_table(&ta); // a released first: least recently used
        pool.release_table(&tb);
        assert_eq!(pool.num_free(), 2);
        // A hit revives a cached block without computing it.
        let hb = prefix_block_hashes(&b, 2);
        assert_eq!(pool.lookup(&b, &hb, 1), tb);
        pool.release_table(&tb);
        // Running out of plain free blocks evicts `a` (LRU), not `b`.
        let fresh = pool.allocate().expect("evicts one");
        assert_eq!(fresh, ta[0]);
        let ha = prefix_block_hashes(&a, 2);
        assert!(pool.lookup(&a, &ha, 1).is_empty(), "a was evicted");
        assert_eq!(pool.lookup(&b, &hb, 1), tb, "b survives");
        pool.check_invariants();
    }

    #[test]
    fn lookup_stops_at_first_miss_and_respects_max() {
        let mut pool = BlockPool::new(8, 2, true);
        let tokens: Vec<u32> = (0..8).collect();
        let table = fill_and_register(&mut pool, &tokens);
        let hashes = prefix_block_hashes(&tokens, 2);
        let mut other = tokens.clone();
        other[3] = 99; // block 1 differs
        let other_hashes = prefix_block_hashes(&other, 2);
        assert_eq!(pool.lookup(&other, &other_hashes, 4), vec![table[0]]);
        assert_eq!(pool.lookup(&tokens, &hashes, 2), table[..2].to_vec());
        pool.check_invariants();
    }

    #[test]
    fn collision_does_not_hand_out_wrong_tokens() {
        let mut pool = BlockPool::new(2, 2, true);
        let tokens = [5, 6];
        let block = pool.allocate().expect("room");
        pool.register(block, 42, None, &tokens);
        // Same hash, different tokens: a (simulated) collision must miss.
        assert!(pool.lookup(&[7, 8], &[42], 1).is_empty());
        assert_eq!(pool.lookup(&tokens, &[42], 1), vec![block]);
    }

    #[test]
    fn duplicate_registration_keeps_the_first() {
        let mut pool = BlockPool::new(2, 2, true);
        let tokens = [5, 6];
        let hash = prefix_block_hashes(&tokens, 2)[0];
        let first = pool.allocate().expect("room");
        let second = pool.allocate().expect("room");
        pool.register(first, hash, None, &tokens);
        pool.register(second, hash, None, &tokens);
        pool.release(second);
        assert_eq!(pool.num_free(), 1);
        assert_eq!(pool.cached_hashes(10), vec![hash]);
        pool.check_invariants();
    }

    #[test]
    fn no_caching_means_no_hits() {
        let mut pool = BlockPool::new(2, 2, false);
        let tokens = [1, 2];
        let table = fill_and_register(&mut pool, &tokens);
        let hashes = prefix_block_hashes(&tokens, 2);
        assert!(pool.lookup(&tokens, &hashes, 1).is_empty());
        pool.release_table(&table);
        assert!(pool.cached_hashes(10).is_empty());
        pool.check_invariants();
    }

    #[test]
    fn extend_hashes_matches_batch() {
        let tokens: Vec<u32> = (0..37).collect();
        let mut hashes = Vec::new();
        extend_block_hashes(&mut hashes, &tokens, 4, 3);
        assert_eq!(hashes.len(), 3);
        extend_block_hashes(&mut hashes, &tokens, 4, 100);
        assert_eq!(hashes, prefix_block_hashes(&tokens, 4));
    }
}
