//! Step planning: which sequences compute how many tokens this step, under the token budget
//! (`max_num_batched_tokens`), the sequence budget (`max_num_seqs`) and the KV block pool.
//!
//! Order of a step:
//! 1. Running sequences, highest priority / earliest arrival first: a decode takes one token,
//!    an unfinished prefill takes a chunk, so prefills ride along with decodes and never stall
//!    them. A sequence that needs a block when none is free preempts the running sequence
//!    with the lowest priority / latest arrival (possibly itself): its blocks are released and
//!    it goes back to waiting with all its tokens, to be recomputed later (outputs do not
//!    change: sampling state stays with the sequence).
//! 2. If nothing was preempted, waiting sequences in the same order: look up the longest
//!    cached prefix, then allocate blocks for the first chunk. The first one that does not fit
//!    stops admission (strict priority, no overtaking).
//!
//! Latency under mixed load: a step that carries decode rows carries at most
//! `max_prefill_tokens_with_decodes` prefill tokens (running prefills and admissions
//! together), so a running stream's gap between two tokens is bounded by one step of
//! `decodes + max_prefill_tokens_with_decodes` tokens, however long the prompts arriving
//! beside it. Without decodes a prefill gets the whole budget.
//!
//! Admission under KV pressure (the fairness rule): a waiting sequence is admitted only when
//! the free blocks cover its *whole* uncomputed prompt plus what the running prefills still
//! need for theirs, not just its first chunk. So admitting a newcomer never makes an earlier
//! request's prefill preempt anyone, queues are served strictly by (priority, arrival) with no
//! overtaking, and preempted sequences keep their arrival, so they go back in before anything
//! that arrived after them. Victims are always the latest arrival of the lowest priority.
//!
//! Invariants: a sequence is in exactly one of `waiting` / `running` (finished ones are
//! removed); `running` stays sorted by `Sequence::key`; a planned sequence has blocks for every
//! token it computes.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ops::Bound::{Excluded, Unbounded};
use std::ops::Range;

use allam_backend::StepBatch;

use crate::block_manager::{extend_block_hashes, BlockPool};
use crate::sequence::{QueueKey, SeqId, SeqState, Sequence};

#[derive(Debug, Clone, Copy)]
pub(crate) struct SchedulerConfig {
    pub(crate) max_num_batched_tokens: usize,
    pub(crate) max_num_seqs: usize,
    pub(crate) chunk_size: usize,
    /// Prefill tokens a step may carry beside decode rows.
    pub(crate) max_prefill_tokens_with_decodes: usize,
}

/// One sequence's work in a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ScheduledSeq {
    pub(crate) seq_id: SeqId,
    /// Tokens with KV before this step.
    pub(crate) start: usize,
    /// Query tokens this step.
    pub(crate) len: usize,
    /// Prompt positions `p` whose logits (predicting token `p + 1`) feed prompt logprobs.
    pub(crate) prompt_rows: Range<usize>,
    /// The chunk reaches the last known token: its logits row samples the next token.
    pub(crate) samples: bool,
    /// Set when the sequence was admitted from waiting this step: prompt tokens served by the
    /// prefix cache.
    pub(crate) admitted_cached_tokens: Option<usize>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct StepPlan {
    pub(crate) seqs: Vec<ScheduledSeq>,
    pub(crate) preempted: Vec<SeqId>,
}

impl StepPlan {
    #[cfg(test)]
    pub(crate) fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.len).sum()
    }
}

pub(crate) struct Scheduler {
    config: SchedulerConfig,
    pool: BlockPool,
    seqs: HashMap<SeqId, Sequence>,
    waiting: BTreeSet<QueueKey>,
    running: Vec<SeqId>,
    num_preemptions: u64,
    prefix_queried_tokens: u64,
    prefix_hit_tokens: u64,
    /// Sequences not to schedule this step (their reader is behind); they keep their blocks
    /// and may still be preempted.
    paused: HashSet<SeqId>,
}

impl Scheduler {
    pub(crate) fn new(config: SchedulerConfig, pool: BlockPool) -> Scheduler {
        Scheduler {
            config,
            pool,
            seqs: HashMap::new(),
            waiting: BTreeSet::new(),
            running: Vec::new(),
            num_preemptions: 0,
            prefix_queried_tokens: 0,
            prefix_hit_tokens: 0,
            paused: HashSet::new(),
        }
    }

    /// Sequences to skip from the next `schedule` on, until the next call.
    pub(crate) fn set_paused(&mut self, paused: HashSet<SeqId>) {
        self.paused = paused;
    }

    pub(crate) fn pool(&self) -> &BlockPool {
        &self.pool
    }

    pub(crate) fn num_running(&self) -> usize {
        self.running.len()
    }

    pub(crate) fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub(crate) fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    pub(crate) fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }

    /// (queried, hit) prompt tokens of prefix-cache lookups so far.
    pub(crate) fn prefix_cache_tokens(&self) -> (u64, u64) {
        (self.prefix_queried_tokens, self.prefix_hit_tokens)
    }

    pub(crate) fn seq(&self, id: SeqId) -> Option<&Sequence> {
        self.seqs.get(&id)
    }

    pub(crate) fn seq_ids(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.seqs.keys().copied()
    }

    /// Queues a new sequence (no blocks yet).
    pub(crate) fn add(&mut self, mut seq: Sequence) {
        seq.state = SeqState::Waiting;
        seq.num_computed = 0;
        seq.block_table.clear();
        seq.num_registered = 0;
        self.waiting.insert(seq.key());
        self.seqs.insert(seq.id, seq);
    }

    /// Removes a sequence wherever it is and releases its blocks. Returns it.
    pub(crate) fn remove(&mut self, id: SeqId) -> Option<Sequence> {
        let seq = self.seqs.remove(&id)?;
        match seq.state {
            SeqState::Waiting => {
                self.waiting.remove(&seq.key());
            }
            SeqState::Running => {
                if let Some(pos) = self.running.iter().position(|r| *r == id) {
                    self.running.remove(pos);
                }
            }
        }
        self.pool.release_table(&seq.block_table);
        Some(seq)
    }

    /// Appends a sampled token.
    pub(crate) fn append_token(&mut self, id: SeqId, token: u32) {
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.tokens.push(token);
        }
    }

    /// Starts sequence `child` as a copy of `parent`'s prompt (its first token is appended
    /// next, like any sampled token), sharing the parent's full prompt blocks (refcounted). The prompt's partial last block
    /// is not shared: the child recomputes those few tokens into its own block, which needs
    /// no device copy. When the running set is full the child waits, without blocks.
    pub(crate) fn fork(&mut self, parent: SeqId, mut child: Sequence) {
        let Some(parent_seq) = self.seqs.get(&parent) else {
            return;
        };
        let bs = self.pool.block_size();
        child.tokens = parent_seq.tokens[..parent_seq.prompt_len].to_vec();
        child.prompt_len = parent_seq.prompt_len;
        child.prompt_logprobs_next = parent_seq.prompt_len;
        let shared = (parent_seq.prompt_len / bs).min(parent_seq.num_computed / bs);
        let shared_blocks = parent_seq.block_table[..shared].to_vec();
        child.block_hashes =
            parent_seq.block_hashes[..shared.min(parent_seq.block_hashes.len())].to_vec();
        if self.running.len() >= self.config.max_num_seqs || parent_seq.state != SeqState::Running {
            self.add(child);
            return;
        }
        for &block in &shared_blocks {
            self.pool.incref(block);
        }
        child.block_table = shared_blocks;
        child.num_computed = shared * bs;
        child.num_registered = shared.min(parent_seq.num_registered);
        child.state = SeqState::Running;
        let key = child.key();
        let pos = self.running_insert_pos(key);
        self.running.insert(pos, child.id);
        self.seqs.insert(child.id, child);
    }

    fn running_insert_pos(&self, key: QueueKey) -> usize {
        self.running
            .partition_point(|id| self.seqs.get(id).map(Sequence::key) < Some(key))
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.pool.block_size())
    }

    /// Plans one step. Allocates the blocks the planned work needs.
    pub(crate) fn schedule(&mut self) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget = self.config.max_num_batched_tokens;
        let chunk = self.config.chunk_size.max(1);

        // Decodes not yet visited. A prefill chunk never takes the budget they need, so a
        // running stream never stalls behind a long prompt (a high-priority newcomer or a
        // preempted sequence being recomputed can sort before decodes).
        let mut decodes_ahead = self
            .running
            .iter()
            .filter(|id| {
                !self.paused.contains(id)
                    && self
                        .seqs
                        .get(id)
                        .is_some_and(|s| s.tokens.len() == s.num_computed + 1)
            })
            .count();
        // Prefill tokens this step may still carry (capped only when decodes ride in it).
        let mut prefill_budget = if decodes_ahead > 0 {
            self.config.max_prefill_tokens_with_decodes
        } else {
            usize::MAX
        };
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let Some(seq) = self.seqs.get(&id) else {
                self.running.remove(i);
                continue;
            };
            let remaining = seq.tokens.len().saturating_sub(seq.num_computed);
            if remaining == 0 || self.paused.contains(&id) {
                // `remaining == 0` cannot happen for a live sequence; skip rather than compute
                // nothing.
                i += 1;
                continue;
            }
            if remaining == 1 {
                decodes_ahead = decodes_ahead.saturating_sub(1);
            }
            let room = if remaining == 1 {
                budget.saturating_sub(decodes_ahead)
            } else {
                budget.saturating_sub(decodes_ahead).min(prefill_budget)
            };
            if room == 0 {
                i += 1;
                continue;
            }
            let len = remaining.min(room).min(chunk);
            let needed = self
                .blocks_for(seq.num_computed + len)
                .saturating_sub(seq.block_table.len());
            let mut scheduled = true;
            while self.pool.num_free() < needed {
                let victim_pos = self.running.len() - 1;
                let victim = self.running[victim_pos];
                if victim != id
                    && !self.paused.contains(&victim)
                    && self
                        .seqs
                        .get(&victim)
                        .is_some_and(|v| v.tokens.len() == v.num_computed + 1)
                {
                    decodes_ahead = decodes_ahead.saturating_sub(1);
                }
                self.preempt(victim_pos);
                plan.preempted.push(victim);
                if victim == id {
                    scheduled = false;
                    break;
                }
            }
            if !scheduled {
                break;
            }
            let start = {
                let seq = self.seqs.get(&id).expect("scheduled sequence is live");
                seq.num_computed
            };
            self.grow_table(id, needed);
            plan.seqs.push(self.scheduled(id, start, len, None));
            budget -= len;
            if remaining > 1 {
                prefill_budget = prefill_budget.saturating_sub(len);
            }
            i += 1;
        }

        if plan.preempted.is_empty() {
            self.admit_waiting(&mut plan, budget.min(prefill_budget), chunk);
        }
        plan
    }

    /// Blocks the running prefills still need to reach the end of their prompts.
    fn blocks_owed_to_running_prefills(&self) -> usize {
        self.running
            .iter()
            .filter_map(|id| self.seqs.get(id))
            .filter(|s| s.tokens.len() > s.num_computed + 1)
            .map(|s| {
                self.blocks_for(s.tokens.len())
                    .saturating_sub(s.block_table.len())
            })
            .sum()
    }

    fn admit_waiting(&mut self, plan: &mut StepPlan, mut budget: usize, chunk: usize) {
        let bs = self.pool.block_size();
        let mut owed = self.blocks_owed_to_running_prefills();
        // Paused sequences are passed over; they keep their place for when they resume.
        let mut passed: Option<QueueKey> = None;
        while budget > 0 && self.running.len() < self.config.max_num_seqs {
            let next = match passed {
                None => self.waiting.first(),
                Some(after) => self.waiting.range((Excluded(after), Unbounded)).next(),
            };
            let Some(&key) = next else {
                break;
            };
            let id = key.3;
            if self.paused.contains(&id) {
                passed = Some(key);
                continue;
            }
            let Some(seq) = self.seqs.get_mut(&id) else {
                self.waiting.remove(&key);
                continue;
            };
            // At least the last token is computed, because its logits sample the next one.
            let max_hit_blocks = (seq.tokens.len() - 1) / bs;
            let mut hits = Vec::new();
            let lookup = self.pool.caching() && !seq.owes_prompt_logprobs();
            if lookup {
                extend_block_hashes(&mut seq.block_hashes, &seq.tokens, bs, max_hit_blocks);
                hits = self
                    .pool
                    .lookup(&seq.tokens, &seq.block_hashes, max_hit_blocks);
            }
            let cached = hits.len() * bs;
            let len = (seq.tokens.len() - cached).min(budget).min(chunk);
            let needed = (cached + len).div_ceil(bs) - hits.len();
            // The fairness rule (module docs): room for the whole prompt, beside what the
            // running prefills are owed.
            let whole_prompt = seq.tokens.len().div_ceil(bs) - hits.len();
            if self.pool.num_free() < whole_prompt + owed {
                self.pool.release_table(&hits);
                break;
            }
            owed += whole_prompt - needed;
            if lookup {
                self.prefix_queried_tokens += seq.tokens.len() as u64;
                self.prefix_hit_tokens += cached as u64;
            }
            seq.num_registered = hits.len();
            seq.block_table = hits;
            seq.num_computed = cached;
            seq.state = SeqState::Running;
            self.waiting.remove(&key);
            let pos = self.running_insert_pos(key);
            self.running.insert(pos, id);
            self.grow_table(id, needed);
            plan.seqs
                .push(self.scheduled(id, cached, len, Some(cached)));
            budget -= len;
        }
    }

    fn grow_table(&mut self, id: SeqId, needed: usize) {
        let mut blocks = Vec::with_capacity(needed);
        for _ in 0..needed {
            blocks.push(self.pool.allocate().expect("free blocks were counted"));
        }
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.block_table.extend(blocks);
        }
    }

    fn scheduled(
        &self,
        id: SeqId,
        start: usize,
        len: usize,
        admitted_cached_tokens: Option<usize>,
    ) -> ScheduledSeq {
        let seq = self.seqs.get(&id).expect("scheduled sequence is live");
        let prompt_rows = if seq.owes_prompt_logprobs() {
            let lo = start.max(seq.prompt_logprobs_next.saturating_sub(1));
            let hi = (start + len).min(seq.prompt_len - 1);
            lo..hi.max(lo)
        } else {
            0..0
        };
        ScheduledSeq {
            seq_id: id,
            start,
            len,
            prompt_rows,
            samples: start + len == seq.tokens.len(),
            admitted_cached_tokens,
        }
    }

    fn preempt(&mut self, running_pos: usize) {
        let id = self.running.remove(running_pos);
        self.num_preemptions += 1;
        if let Some(seq) = self.seqs.get_mut(&id) {
            self.pool.release_table(&seq.block_table);
            seq.block_table.clear();
            seq.num_computed = 0;
            seq.num_registered = 0;
            seq.state = SeqState::Waiting;
            self.waiting.insert(seq.key());
        }
    }

    /// Fills `batch` (cleared first) for `plan`. Logits rows are, per planned sequence in
    /// order: its prompt rows, then its sampling row.
    pub(crate) fn build_batch(&self, plan: &StepPlan, batch: &mut StepBatch) {
        batch.token_ids.clear();
        batch.positions.clear();
        batch.slot_mapping.clear();
        batch.seqs.clear();
        batch.logits_rows.clear();
        batch.block_size = self.pool.block_size() as u32;
        for s in &plan.seqs {
            let seq = self.seqs.get(&s.seq_id).expect("planned sequence is live");
            let end = s.start + s.len;
            let rows = batch.push_seq(
                &seq.tokens[s.start..end],
                end as u32,
                seq.block_table[..self.blocks_for(end)].to_vec(),
            );
            for p in s.prompt_rows.clone() {
                batch.logits_rows.push(rows.start + (p - s.start) as u32);
            }
            if s.samples {
                batch.logits_rows.push(rows.end - 1);
            }
        }
    }

    /// Records that `plan`'s tokens now have KV: advances `num_computed`, settles owed prompt
    /// logprobs, and offers newly full blocks to the prefix cache.
    pub(crate) fn complete(&mut self, plan: &StepPlan) {
        let bs = self.pool.block_size();
        for s in &plan.seqs {
            let Some(seq) = self.seqs.get_mut(&s.seq_id) else {
                continue;
            };
            seq.num_computed = s.start + s.len;
            if !s.prompt_rows.is_empty() {
                seq.prompt_logprobs_next = seq.prompt_logprobs_next.max(s.prompt_rows.end + 1);
            }
            if seq.owes_prompt_logprobs() && seq.num_computed + 1 >= seq.prompt_len {
                seq.prompt_logprobs_next = seq.prompt_len;
            }
            if !self.pool.caching() {
                continue;
            }
            let full = seq.num_computed / bs;
            if full <= seq.num_registered {
                continue;
            }
            extend_block_hashes(&mut seq.block_hashes, &seq.tokens, bs, full);
            for j in seq.num_registered..full {
                let parent = if j == 0 {
                    None
                } else {
                    Some(seq.block_hashes[j - 1])
                };
                self.pool.register(
                    seq.block_table[j],
                    seq.block_hashes[j],
                    parent,
                    &seq.tokens[j * bs..(j + 1) * bs],
                );
            }
            seq.num_registered = full;
        }
    }

    pub(crate) fn cached_hashes(&self, max: usize) -> Vec<u64> {
        self.pool.cached_hashes(max)
    }

    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        self.pool.check_invariants();
        let mut refs = vec![0u32; self.pool.num_blocks()];
        for (id, seq) in &self.seqs {
            match seq.state {
                SeqState::Waiting => {
                    assert!(self.waiting.contains(&seq.key()), "{id:?} not in waiting");
                    assert!(!self.running.contains(id));
                    assert!(seq.block_table.is_empty());
                }
                SeqState::Running => {
                    assert!(self.running.contains(id), "{id:?} not in running");
                    assert!(!self.waiting.contains(&seq.key()));
                }
            }
            assert!(seq.block_table.len() * self.pool.block_size() >= seq.num_computed);
            for &b in &seq.block_table {
                refs[b as usize] += 1;
            }
        }
        for (b, &r) in refs.iter().enumerate() {
            assert_eq!(self.pool.ref_count(b as u32), r, "refcount of block {b}");
        }
        assert_eq!(self.waiting.len() + self.running.len(), self.seqs.len());
        let keys: Vec<_> = self.running.iter().map(|id| self.seqs[id].key()).collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "running is sorted");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use allam_types::RequestId;

    fn seq(id: u64, priority: i32, tokens: Vec<u32>) -> Sequence {
        Sequence {
            id: SeqId(id),
            request_id: RequestId(id),
            index: 0,
            priority,
            arrival: id,
            prompt_len: tokens.len(),
            tokens,
            num_computed: 0,
            block_table: Vec::new(),
            block_hashes: Vec::new(),
            num_registered: 0,
            prompt_logprobs_next: usize::MAX,
            state: SeqState::Waiting,
        }
    }

    fn scheduler(num_blocks: usize, budget: usize, chunk: usize, caching: bool) -> Scheduler {
        Scheduler::new(
            SchedulerConfig {
                max_num_batched_tokens: budget,
                max_num_seqs: 8,
                chunk_size: chunk,
                max_prefill_tokens_with_decodes: usize::MAX,
            },
            BlockPool::new(num_blocks, 4, caching),
        )
    }

    #[test]
    fn steps_with_decodes_carry_at_most_the_prefill_cap() {
        let mut s = scheduler(256, 64, 64, false);
        s.config.max_prefill_tokens_with_decodes = 10;
        s.add(seq(1, 0, vec![1, 2, 3]));
        run_step(&mut s); // seq 1 decodes from now on
        s.add(seq(2, 0, (0..40).collect()));
        s.add(seq(3, 0, (0..40).collect()));
        for _ in 0..3 {
            let plan = run_step(&mut s);
            let prefill: usize = plan
                .seqs
                .iter()
                .filter(|p| p.seq_id.0 != 1)
                .map(|p| p.len)
                .sum();
            assert!(
                plan.seqs.iter().any(|p| p.seq_id.0 == 1),
                "the decode rides in every step"
            );
            assert_eq!(prefill, 10, "prefill tokens beside a decode are capped");
        }
        // Without decodes a prefill takes the whole budget.
        let mut alone = scheduler(256, 64, 64, false);
        alone.config.max_prefill_tokens_with_decodes = 10;
        alone.add(seq(4, 0, (0..40).collect()));
        assert_eq!(run_step(&mut alone).seqs[0].len, 40);
    }

    #[test]
    fn admission_needs_room_for_the_whole_prompt_beside_running_prefills() {
        // 12 blocks of 4 tokens, 8-token chunks. Seq 1's 32-token prompt needs 8 blocks.
        let mut s = scheduler(12, 24, 8, false);
        s.add(seq(1, 0, (0..32).collect()));
        assert_eq!(run_step(&mut s).seqs.len(), 1);
        // 10 free before this step; seq 1 owes 4 beyond its next chunk: seq 2's whole prompt (4) fits.
        s.add(seq(2, 0, (0..16).collect()));
        assert_eq!(
            run_step(&mut s).seqs.len(),
            2,
            "seq 2 fits beside seq 1's debt"
        );
        // 4 free after this step's chunks, but seq 1 still owes 2: seq 3's first chunk
        // (2 blocks) would fit, its prompt beside that debt would not. It waits rather than
        // make seq 1's last chunk preempt someone.
        s.add(seq(3, 0, (0..8).collect()));
        let plan = run_step(&mut s);
        assert!(plan.preempted.is_empty());
        assert!(
            plan.seqs.iter().all(|p| p.seq_id.0 != 3),
            "seq 3 is not admitted into blocks seq 1 is owed"
        );
        let plan = run_step(&mut s);
        assert!(
            plan.seqs.iter().any(|p| p.seq_id.0 == 1 && p.samples),
            "seq 1 finishes its prompt without being preempted"
        );
        assert!(!plan.preempted.contains(&SeqId(1)));
    }

    /// Plays `steps` steps, appending token 7 to every sampling sequence.
    fn run_step(s: &mut Scheduler) -> StepPlan {
        let plan = s.schedule();
        let mut batch = StepBatch::default();
        s.build_batch(&plan, &mut batch);
        batch
            .validate(s.pool.num_blocks())
            .expect("scheduler builds valid batches");
        s.complete(&plan);
        for p in &plan.seqs {
            if p.samples {
                s.append_token(p.seq_id, 7);
            }
        }
        s.check_invariants();
        plan
    }

    #[test]
    fn prefill_is_chunked_and_decodes_ride_along() {
        let mut s = scheduler(64, 8, 5, false);
        s.add(seq(1, 0, (0..3).collect()));
        let plan = run_step(&mut s);
        assert_eq!(plan.seqs.len(), 1);
        assert!(plan.seqs[0].samples, "3-token prompt fits one chunk");
        s.add(seq(2, 0, (0..12).collect()));
        // Step: seq 1 decodes (1 token), seq 2 prefills a chunk of 5.
        let plan = run_step(&mut s);
        let lens: Vec<(u64, usize, bool)> = plan
            .seqs
            .iter()
            .map(|p| (p.seq_id.0, p.len, p.samples))
            .collect();
        assert_eq!(lens, vec![(1, 1, true), (2, 5, false)]);
        let plan = run_step(&mut s);
        assert_eq!(plan.seqs[1].len, 5);
        let plan = run_step(&mut s);
        assert_eq!((plan.seqs[1].len, plan.seqs[1].samples), (2, true));
    }

    #[test]
    fn token_budget_is_respected() {
        let mut s = scheduler(64, 6, 100, false);
        for id in 1..=3 {
            s.add(seq(id, 0, (0..4).collect()));
        }
        let plan = run_step(&mut s);
        assert!(plan.num_tokens() <= 6);
        assert_eq!(plan.seqs[0].len, 4);
        assert_eq!(
            plan.seqs[1].len, 2,
            "second prompt gets the rest of the budget"
        );
        assert_eq!(s.num_running(), 2);
        assert_eq!(s.num_waiting(), 1);
    }

    #[test]
    fn a_prefill_sorted_first_never_starves_decodes() {
        let mut s = scheduler(64, 8, 100, false);
        s.add(seq(1, 0, vec![1, 2, 3]));
        s.add(seq(2, 0, vec![4, 5]));
        run_step(&mut s); // both prefilled, both decoding now
        s.add(seq(3, -1, (0..30).collect())); // higher priority: sorts first once running
        let plan = run_step(&mut s);
        assert_eq!(
            plan.seqs.len(),
            3,
            "two decodes then the newcomer's first chunk"
        );
        let plan = run_step(&mut s);
        let lens: Vec<(u64, usize)> = plan.seqs.iter().map(|p| (p.seq_id.0, p.len)).collect();
        assert_eq!(
            lens,
            vec![(3, 6), (1, 1), (2, 1)],
            "the chunk leaves room for decodes"
        );
    }

    #[test]
    fn priority_then_fcfs() {
        let mut s = scheduler(64, 4, 100, false);
        s.add(seq(1, 5, vec![1, 2, 3, 4]));
        s.add(seq(2, 0, vec![1, 2, 3, 4]));
        s.add(seq(3, 5, vec![1, 2, 3, 4]));
        let order: Vec<u64> = (0..3)
            .map(|_| {
                let plan = s.schedule();
                let id = plan.seqs.last().expect("admits one").seq_id;
                s.complete(&plan);
                s.remove(id);
                id.0
            })
            .collect();
        assert_eq!(order, vec![2, 1, 3]);
    }

    #[test]
    fn preemption_frees_the_latest_and_recomputes_it() {
        // 4 blocks of 4 tokens; two sequences of 6 tokens each need 2 blocks, then grow.
        let mut s = scheduler(4, 64, 64, false);
        s.add(seq(1, 0, (0..7).collect()));
        s.add(seq(2, 0, (10..17).collect()));
        run_step(&mut s); // both prefilled: 2 blocks each, pool full
        assert_eq!(s.pool.num_free(), 0);
        let plan = run_step(&mut s); // both now hold 8 tokens; the 9th token needs a block
        assert!(plan.preempted.is_empty());
        let plan = run_step(&mut s);
        assert_eq!(
            plan.preempted,
            vec![SeqId(2)],
            "latest arrival is the victim"
        );
        assert_eq!(s.num_preemptions(), 1);
        let victim = s.seq(SeqId(2)).expect("still live");
        assert_eq!(victim.state, SeqState::Waiting);
        assert_eq!(
            victim.tokens.len(),
            9,
            "generated tokens are kept for recompute"
        );
        s.remove(SeqId(1));
        let plan = run_step(&mut s);
        assert_eq!(plan.seqs[0].seq_id, SeqId(2));
        assert_eq!((plan.seqs[0].start, plan.seqs[0].len), (0, 9));
    }

    #[test]
    fn self_preemption_when_lowest() {
        let mut s = scheduler(2, 64, 64, false);
        s.add(seq(1, 0, (0..4).collect()));
        s.add(seq(2, 9, (0..3).collect()));
        run_step(&mut s);
        // seq 1 now has 5 tokens (needs a 2nd block); seq 2 has 4 (fits). Pool: 0 free.
        let plan = run_step(&mut s);
        assert_eq!(plan.preempted, vec![SeqId(2)]);
        assert_eq!(plan.seqs.len(), 1);
        assert_eq!(plan.seqs[0].seq_id, SeqId(1));
    }

    #[test]
    fn prefix_hits_skip_computation_but_not_the_last_token() {
        let mut s = scheduler(16, 64, 64, true);
        let prompt: Vec<u32> = (0..12).collect();
        s.add(seq(1, 0, prompt.clone()));
        run_step(&mut s);
        s.remove(SeqId(1));
        // Same 12 tokens: 3 full blocks cached, but only 2 may be used (the last token must
        // be computed to get logits).
        s.add(seq(2, 0, prompt.clone()));
        let plan = run_step(&mut s);
        assert_eq!(plan.seqs[0].admitted_cached_tokens, Some(8));
        assert_eq!((plan.seqs[0].start, plan.seqs[0].len), (8, 4));
        let mut longer = prompt.clone();
        longer.extend([50, 51, 52]);
        s.add(seq(3, 0, longer));
        let plan = run_step(&mut s);
        let p3 = plan
            .seqs
            .iter()
            .find(|p| p.seq_id == SeqId(3))
            .expect("admitted");
        assert_eq!(p3.admitted_cached_tokens, Some(12));
        // Queried: all three prompts; hit: 8 then 12.
        assert_eq!(s.prefix_cache_tokens(), (12 + 12 + 15, 8 + 12));
    }

    #[test]
    fn prompt_logprob_rows_cover_each_position_once() {
        let mut s = scheduler(16, 64, 3, true);
        let mut sq = seq(1, 0, (0..8).collect());
        sq.prompt_logprobs_next = 1;
        s.add(sq);
        let mut rows = Vec::new();
        loop {
            let plan = run_step(&mut s);
            rows.extend(plan.seqs[0].prompt_rows.clone());
            if plan.seqs[0].samples {
                break;
            }
        }
        assert_eq!(rows, (0..7).collect::<Vec<_>>());
        assert!(!s.seq(SeqId(1)).expect("live").owes_prompt_logprobs());
    }

    #[test]
    fn fork_shares_full_prompt_blocks() {
        let mut s = scheduler(16, 64, 64, false);
        s.add(seq(1, 0, (0..10).collect()));
        run_step(&mut s);
        let parent = s.seq(SeqId(1)).expect("live").clone();
        let mut child = seq(2, 0, Vec::new());
        child.request_id = parent.request_id;
        child.index = 1;
        child.arrival = parent.arrival;
        s.fork(SeqId(1), child);
        s.append_token(SeqId(2), 99);
        s.check_invariants();
        let c = s.seq(SeqId(2)).expect("child").clone();
        assert_eq!(c.block_table, parent.block_table[..2].to_vec());
        assert_eq!(c.num_computed, 8);
        assert_eq!(c.tokens.len(), 11);
        assert_eq!(c.tokens[10], 99);
        let plan = run_step(&mut s);
        let pc = plan
            .seqs
            .iter()
            .find(|p| p.seq_id == SeqId(2))
            .expect("child runs");
        assert_eq!((pc.start, pc.len, pc.samples), (8, 3, true));
        s.remove(SeqId(1));
        s.remove(SeqId(2));
        assert_eq!(s.pool.num_free(), 16);
    }

    #[test]
    fn removing_everything_returns_every_block() {
        let mut s = scheduler(8, 64, 5, true);
        for id in 1..=4 {
            s.add(seq(id, (id % 2) as i32, (0..(id as u32 * 5)).collect()));
        }
        for _ in 0..6 {
            run_step(&mut s);
        }
        let ids: Vec<SeqId> = s.seq_ids().collect();
        for id in ids {
            s.remove(id);
        }
        s.check_invariants();
        assert_eq!(s.pool.num_free(), 8);
        assert!(s.is_idle());
    }
}
