//! Hooks for `benches/` (not API, hidden from docs): drive the scheduler without a model.

use allam_backend::StepBatch;
use allam_types::RequestId;

use crate::block_manager::BlockPool;
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::sequence::{SeqId, SeqState, Sequence};

/// `num_seqs` running sequences of `context_tokens` computed tokens each, decoding.
pub struct StepPlanningBench {
    scheduler: Scheduler,
    batch: StepBatch,
    next_token: u32,
}

impl StepPlanningBench {
    /// Builds the sequences and prefills them (bookkeeping only) until all are decoding.
    /// The pool has room for `headroom_tokens` more tokens per sequence.
    pub fn new(
        num_seqs: usize,
        context_tokens: usize,
        block_size: usize,
        headroom_tokens: usize,
    ) -> StepPlanningBench {
        let blocks_per_seq = (context_tokens + headroom_tokens).div_ceil(block_size) + 1;
        let pool = BlockPool::new(num_seqs * blocks_per_seq, block_size, true);
        let mut scheduler = Scheduler::new(
            SchedulerConfig {
                max_num_batched_tokens: 1 << 16,
                max_num_seqs: num_seqs,
                chunk_size: 1 << 16,
                max_prefill_tokens_with_decodes: 1 << 16,
            },
            pool,
        );
        for i in 0..num_seqs {
            // Distinct prompts, so nothing is shared and every block is a real allocation.
            let tokens: Vec<u32> = (0..context_tokens)
                .map(|t| ((i * 7919 + t * 31) % 64_000) as u32)
                .collect();
            scheduler.add(Sequence {
                id: SeqId(i as u64),
                request_id: RequestId(i as u64),
                index: 0,
                priority: 0,
                arrival: i as u64,
                prompt_len: tokens.len(),
                tokens,
                num_computed: 0,
                block_table: Vec::new(),
                block_hashes: Vec::new(),
                num_registered: 0,
                prompt_logprobs_next: usize::MAX,
                state: SeqState::Waiting,
            });
        }
        let mut bench = StepPlanningBench {
            scheduler,
            batch: StepBatch::default(),
            next_token: 1,
        };
        while bench.scheduler.num_waiting() > 0
            || bench.scheduler.seq_ids().any(|id| {
                bench
                    .scheduler
                    .seq(id)
                    .is_some_and(|s| s.num_computed + 1 < s.tokens.len())
            })
        {
            bench.step();
        }
        bench
    }

    /// One decode step's scheduling work: plan, build the `StepBatch`, record completion,
    /// append a token to every sampling sequence. Returns the batch's token count.
    pub fn step(&mut self) -> usize {
        let plan = self.scheduler.schedule();
        self.scheduler.build_batch(&plan, &mut self.batch);
        self.scheduler.complete(&plan);
        for s in &plan.seqs {
            if s.samples {
                self.scheduler.append_token(s.seq_id, self.next_token);
            }
        }
        self.next_token = self.next_token.wrapping_add(1) % 64_000;
        self.batch.num_tokens()
    }

    pub fn num_running(&self) -> usize {
        self.scheduler.num_running()
    }
}
