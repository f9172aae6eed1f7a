//! The engine's state machine, run by the engine thread: admits requests, runs one step at a
//! time (plan → batch → execute → sample → stream), and settles cancellations.
//!
//! A request owns `n` sequences. Before its prompt is computed it has one (index 0); the step
//! that samples its first token forks the other `n - 1`, which share the prompt's full blocks.
//!
//! Invariants: every live sequence has a `SeqOutput` and belongs to a live request; a request's
//! stream receives exactly one terminal event (`Finished` or `Failed`), after which the request
//! and its sequences are gone and their blocks released. The engine never blocks on a client:
//! each request's event channel is bounded, and a request is scheduled only while its channel
//! has room for everything one step can send it plus one terminal event
//! ([`step_event_room`]). A request without that room is paused (kept, with its blocks, but not
//! scheduled); paused longer than `stream_write_timeout` it fails with `client_too_slow` (the
//! slot kept free guarantees that event fits) and its blocks are freed. A closed receiver
//! cancels the request at the next step.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use allam_backend::{SampledToken, StepBatch};
use allam_request::{SamplingParams, ValidRequest};
use allam_telemetry::metric_names as m;
use allam_tokenizer::Tokenizer;
use allam_types::{
    EngineEvent, FinishReason, RequestId, SequenceEnd, StepLogprobs, Timings, TokenDelta, TokenId,
    TokenLogprob, Usage,
};
use rand::Rng;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::Sender;

use crate::block_manager::BlockPool;
use crate::config::EngineConfig;
use crate::executor::{StepExecutor, StepOutput, StepSampling};
use crate::failure_reason;
use crate::output::SeqOutput;
use crate::sampler::{SampleInput, Sampler};
use crate::scheduler::{ScheduledSeq, Scheduler, SchedulerConfig, StepPlan};
use crate::sequence::{SeqId, SeqState, Sequence};
use crate::stats::{ModelInfo, Shared};

/// How often, at most, the prefix-cache summary is rebuilt while busy.
const HASH_PUBLISH_INTERVAL_MS: u128 = 50;

pub(crate) struct NewRequest {
    pub(crate) id: RequestId,
    pub(crate) request: ValidRequest,
    pub(crate) events: Sender<EngineEvent>,
    pub(crate) submitted_at: Instant,
    /// The submitter's span (the worker's request span): parent of this request's engine
    /// spans, so queue/prefill/decode join the caller's trace.
    pub(crate) span: tracing::Span,
}

/// Free channel slots a request needs to be scheduled: what one step can send it (a `Delta`
/// and a `SequenceEnd` per sequence, its prompt logprobs and `Finished`) plus one slot that
/// stays free for a terminal `Failed`.
pub(crate) fn step_event_room(n: u32) -> usize {
    2 * n.max(1) as usize + 3
}

/// Sends without waiting. Scheduling keeps room for every event a step sends, so a full
/// channel here is a bug in that accounting: logged, and the reader sees the stream end.
fn deliver(events: &Sender<EngineEvent>, event: EngineEvent) {
    if let Err(TrySendError::Full(_)) = events.try_send(event) {
        tracing::error!("a request's event channel was full; event dropped");
    }
}

struct RequestState {
    params: Arc<SamplingParams>,
    events: Sender<EngineEvent>,
    /// Since when the reader has left no room for another step (see [`step_event_room`]).
    paused_since: Option<Instant>,
    prompt_len: usize,
    seed: u64,
    submitted_at: Instant,
    scheduled_at: Option<Instant>,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
    live_seqs: Vec<SeqId>,
    forked: bool,
    completion_tokens: u32,
    cached_tokens: Option<u32>,
    /// Still counted in `Shared::queued_requests`.
    queued: bool,
    prompt_logprobs: Option<Vec<Option<StepLogprobs>>>,
    /// Parent of `phase` (see `NewRequest::span`).
    span: tracing::Span,
    /// The current phase's span: `engine.queue` until the first step that schedules the
    /// request, `engine.prefill` until its first token, `engine.decode` until it ends.
    /// Replacing or dropping it ends the phase.
    phase: tracing::Span,
}

pub(crate) struct EngineCore {
    executor: Box<dyn StepExecutor>,
    scheduler: Scheduler,
    sampler: Sampler,
    tokenizer: Tokenizer,
    info: ModelInfo,
    requests: HashMap<RequestId, RequestState>,
    outputs: HashMap<SeqId, SeqOutput>,
    next_seq_id: u64,
    next_arrival: u64,
    batch: StepBatch,
    /// What this step asks of each logits row (reused across steps).
    sampling: StepSampling,
    shared: Arc<Shared>,
    max_published_hashes: usize,
    hashes_published_at: Option<Instant>,
    draining: bool,
    stream_write_timeout: Duration,
}

impl EngineCore {
    pub(crate) fn new(
        executor: Box<dyn StepExecutor>,
        tokenizer: Tokenizer,
        info: ModelInfo,
        config: &EngineConfig,
        shared: Arc<Shared>,
    ) -> EngineCore {
        let pool = BlockPool::new(
            info.num_blocks,
            info.block_size,
            config.enable_prefix_caching,
        );
        let scheduler = Scheduler::new(
            SchedulerConfig {
                max_num_batched_tokens: config.max_num_batched_tokens,
                max_num_seqs: config.max_num_seqs,
                chunk_size: config.chunk_size(),
                max_prefill_tokens_with_decodes: config.max_prefill_tokens_with_decodes,
            },
            pool,
        );
        EngineCore {
            executor,
            scheduler,
            sampler: Sampler::new(info.vocab_size),
            tokenizer,
            info,
            requests: HashMap::new(),
            outputs: HashMap::new(),
            next_seq_id: 0,
            next_arrival: 0,
            batch: StepBatch::default(),
            sampling: StepSampling::default(),
            shared,
            max_published_hashes: config.max_published_hashes,
            hashes_published_at: None,
            draining: false,
            stream_write_timeout: config.stream_write_timeout,
        }
    }

    pub(crate) fn is_idle(&self) -> bool {
        self.scheduler.is_idle()
    }

    pub(crate) fn add_request(&mut self, new: NewRequest) {
        let NewRequest {
            id,
            request,
            events,
            submitted_at,
            span,
        } = new;
        if self.draining {
            self.shared.dequeue_request();
            deliver(
                &events,
                EngineEvent::Failed {
                    reason: failure_reason::UNAVAILABLE,
                    message: "the engine is shutting down; retry on another worker".to_owned(),
                },
            );
            return;
        }
        let params = Arc::new(request.params().clone());
        let prompt = request.prompt_token_ids().to_vec();
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        deliver(
            &events,
            EngineEvent::Started {
                prompt_token_ids: prompt.clone(),
            },
        );
        metrics::counter!(m::PROMPT_TOKENS_TOTAL).increment(prompt.len() as u64);
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        let seq_id = self.new_seq_id();
        let wants_prompt_logprobs = params.prompt_logprobs.is_some();
        let seq = Sequence {
            id: seq_id,
            request_id: id,
            index: 0,
            priority: params.priority,
            arrival,
            prompt_len: prompt.len(),
            tokens: prompt,
            num_computed: 0,
            block_table: Vec::new(),
            block_hashes: Vec::new(),
            num_registered: 0,
            prompt_logprobs_next: if wants_prompt_logprobs { 1 } else { usize::MAX },
            state: SeqState::Waiting,
        };
        let prompt_len = seq.prompt_len;
        let phase = tracing::info_span!(parent: &span, "engine.queue", prompt_tokens = prompt_len);
        self.outputs
            .insert(seq_id, SeqOutput::new(0, seed, &self.tokenizer, &params));
        self.scheduler.add(seq);
        self.requests.insert(
            id,
            RequestState {
                params,
                events,
                paused_since: None,
                prompt_len,
                seed,
                submitted_at,
                scheduled_at: None,
                first_token_at: None,
                last_token_at: None,
                live_seqs: vec![seq_id],
                forked: false,
                completion_tokens: 0,
                cached_tokens: None,
                queued: true,
                prompt_logprobs: wants_prompt_logprobs.then(|| vec![None]),
                span,
                phase,
            },
        );
        self.publish_counts();
    }

    fn new_seq_id(&mut self) -> SeqId {
        let id = SeqId(self.next_seq_id);
        self.next_seq_id += 1;
        id
    }

    /// The client is gone: drop the request without telling anyone.
    pub(crate) fn cancel(&mut self, id: RequestId) {
        self.remove_request(id);
        self.publish_counts();
    }

    /// Stops admitting: fails every request not yet scheduled as retryable, keeps the rest.
    pub(crate) fn drain(&mut self) {
        self.draining = true;
        let never_scheduled: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(_, r)| r.scheduled_at.is_none())
            .map(|(id, _)| *id)
            .collect();
        for id in never_scheduled {
            self.fail_request(
                id,
                failure_reason::UNAVAILABLE,
                "the engine is shutting down before this request started; retry".to_owned(),
            );
        }
    }

    /// Fails everything (after `drain`, only started requests remain).
    pub(crate) fn abort_all(&mut self, reason: &'static str, message: &str) {
        let ids: Vec<RequestId> = self.requests.keys().copied().collect();
        for id in ids {
            self.fail_request(id, reason, message.to_owned());
        }
    }

    fn fail_request(&mut self, id: RequestId, reason: &'static str, message: String) {
        if let Some(state) = self.remove_request(id) {
            self.publish_counts();
            deliver(&state.events, EngineEvent::Failed { reason, message });
        }
    }

    fn remove_request(&mut self, id: RequestId) -> Option<RequestState> {
        let state = self.requests.remove(&id)?;
        for seq_id in &state.live_seqs {
            self.scheduler.remove(*seq_id);
            self.outputs.remove(seq_id);
        }
        if state.queued {
            self.shared.dequeue_request();
        }
        Some(state)
    }

    fn reap_disconnected(&mut self) {
        let gone: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(_, r)| r.events.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.remove_request(id);
        }
    }

    /// Pauses the requests whose reader left no room for another step, resumes those whose
    /// reader caught up, and fails those paused past `stream_write_timeout`.
    fn settle_backpressure(&mut self, now: Instant) {
        let mut paused = HashSet::new();
        let mut too_slow = Vec::new();
        for (id, state) in &mut self.requests {
            if state.events.capacity() >= step_event_room(state.params.n) {
                state.paused_since = None;
                continue;
            }
            let since = *state.paused_since.get_or_insert(now);
            if now.duration_since(since) >= self.stream_write_timeout {
                too_slow.push(*id);
            } else {
                paused.extend(state.live_seqs.iter().copied());
            }
        }
        self.scheduler.set_paused(paused);
        let timeout = self.stream_write_timeout;
        for id in too_slow {
            tracing::warn!(request = id.0, ?timeout, "client too slow: request failed");
            self.fail_request(
                id,
                failure_reason::CLIENT_TOO_SLOW,
                format!(
                    "the client read no output for {timeout:?} while the stream's buffer was full"
                ),
            );
            metrics::counter!(m::CLIENT_TOO_SLOW_TOTAL, "hop" => "engine").increment(1);
        }
        let still_paused = self.requests.values().filter(|r| r.paused_since.is_some());
        metrics::gauge!(m::PAUSED_REQUESTS).set(still_paused.count() as f64);
    }

    /// Runs exactly one step. `false` when no sequence was runnable (all paused behind their
    /// readers, or nothing to do), so the caller can wait instead of spinning.
    pub(crate) fn step(&mut self) -> bool {
        self.reap_disconnected();
        let started = Instant::now();
        self.settle_backpressure(started);
        let plan = self.scheduler.schedule();
        if !plan.preempted.is_empty() {
            metrics::counter!(m::PREEMPTIONS_TOTAL).increment(plan.preempted.len() as u64);
        }
        if plan.seqs.is_empty() {
            self.publish_counts();
            return false;
        }
        // Admission is settled before the forward pass, so `queued_requests` (which bounds
        // `submit`) never counts a request that is already computing.
        for s in plan
            .seqs
            .iter()
            .filter(|s| s.admitted_cached_tokens.is_some())
        {
            if let Some(request_id) = self.scheduler.seq(s.seq_id).map(|q| q.request_id) {
                self.note_scheduled(request_id, s, started);
            }
        }
        self.scheduler.build_batch(&plan, &mut self.batch);
        self.plan_sampling(&plan);
        let result = self.executor.execute(&self.batch, &self.sampling);
        self.shared.steps.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(output) => {
                self.scheduler.complete(&plan);
                self.process_outputs(&plan, &output);
            }
            Err(error) => self.fail_step(&plan, &error.to_string()),
        }
        metrics::histogram!(m::STEP_DURATION_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::histogram!(m::BATCH_SIZE).record(plan.seqs.len() as f64);
        self.publish_counts();
        self.publish_hashes(false);
        true
    }

    /// The forward pass failed: the requests in this step fail, the engine goes on. Their KV
    /// writes of this step are discarded with their blocks (nothing of this step was entered
    /// in the prefix cache, and shared blocks are never written), so other requests are safe.
    fn fail_step(&mut self, plan: &StepPlan, message: &str) {
        tracing::error!(error = %message, sequences = plan.seqs.len(), "model step failed");
        let mut failed = Vec::new();
        for s in &plan.seqs {
            if let Some(seq) = self.scheduler.seq(s.seq_id) {
                if !failed.contains(&seq.request_id) {
                    failed.push(seq.request_id);
                }
            }
        }
        for id in failed {
            self.fail_request(
                id,
                failure_reason::ENGINE_ERROR,
                format!("the model step failed: {message}"),
            );
        }
    }

    /// Decides, row by row in `logits_rows` order, which rows the backend samples by itself
    /// (taking their draws now) and which come back as logits.
    fn plan_sampling(&mut self, plan: &StepPlan) {
        let rows = &mut self.sampling.rows;
        rows.clear();
        let mut logprobs: Option<usize> = None;
        let (mut on_backend, mut on_host) = (0u64, 0u64);
        for s in &plan.seqs {
            rows.extend(std::iter::repeat_n(None, s.prompt_rows.len()));
            if !s.samples {
                continue;
            }
            let seq = self.scheduler.seq(s.seq_id);
            let state = seq.and_then(|q| self.requests.get(&q.request_id));
            let row = match (seq, state, self.outputs.get_mut(&s.seq_id)) {
                // The step that forks `n > 1` samples every child from this row on the host.
                (Some(seq), Some(state), Some(out)) if state.forked || state.params.n <= 1 => {
                    let row = Sampler::backend_row(
                        &SampleInput {
                            logits: &[],
                            params: &state.params,
                            tokens: &seq.tokens,
                            prompt_len: seq.prompt_len,
                            eos: &self.info.eos_token_ids,
                        },
                        &mut out.rng,
                    );
                    if row.is_some() {
                        if let Some(n) = state.params.logprobs {
                            logprobs = Some(logprobs.unwrap_or(0).max(n as usize));
                        }
                    }
                    row
                }
                _ => None,
            };
            if row.is_some() {
                on_backend += 1;
            } else {
                on_host += 1;
            }
            rows.push(row);
        }
        self.sampling.logprobs = logprobs;
        metrics::counter!(m::SAMPLED_ROWS_TOTAL, "path" => "backend").increment(on_backend);
        metrics::counter!(m::SAMPLED_ROWS_TOTAL, "path" => "host").increment(on_host);
    }

    fn process_outputs(&mut self, plan: &StepPlan, output: &StepOutput) {
        let vocab = self.info.vocab_size;
        let asked = &self.sampling.rows;
        let host_rows = asked.iter().filter(|p| p.is_none()).count();
        let shapes_match = output.sampled.len() == asked.len()
            && output.logits.len() == host_rows * vocab
            && output
                .sampled
                .iter()
                .zip(asked)
                .all(|(got, want)| got.is_some() == want.is_some());
        if !shapes_match {
            let message = format!(
                "the model returned {} logits and {} sampled rows, expected {host_rows} rows of \
                 {vocab} logits and {} picks",
                output.logits.len(),
                output.sampled.iter().flatten().count(),
                asked.len() - host_rows,
            );
            self.fail_step(plan, &message);
            return;
        }
        // Host rows arrive packed, in row order: the k-th `None` row is logits row k.
        let mut host_rows = output.logits.chunks_exact(vocab.max(1));
        let now = Instant::now();
        let mut row_idx = 0usize;
        for s in &plan.seqs {
            let request_id = self.scheduler.seq(s.seq_id).map(|seq| seq.request_id);
            for p in s.prompt_rows.clone() {
                let row = host_rows.next();
                if let (Some(request_id), Some(row)) = (request_id, row) {
                    self.record_prompt_logprob(request_id, s.seq_id, p, row);
                }
                row_idx += 1;
            }
            if let Some(request_id) = request_id {
                self.maybe_send_prompt_logprobs(request_id, s.seq_id);
            }
            if s.samples {
                match &output.sampled[row_idx] {
                    Some(pick) => {
                        if let Some(request_id) = request_id {
                            self.emit_sampled(request_id, s.seq_id, pick, now);
                        }
                    }
                    None => {
                        let row = host_rows.next();
                        if let (Some(request_id), Some(row)) = (request_id, row) {
                            self.sample_and_emit(request_id, s.seq_id, row, now);
                        }
                    }
                }
                row_idx += 1;
            }
        }
    }

    /// A token the backend sampled: its logprobs came with it.
    fn emit_sampled(
        &mut self,
        request_id: RequestId,
        seq_id: SeqId,
        pick: &SampledToken,
        now: Instant,
    ) {
        let Some(state) = self.requests.get(&request_id) else {
            return;
        };
        let params = Arc::clone(&state.params);
        let logprobs = params
            .logprobs
            .map(|top_n| {
                vec![StepLogprobs {
                    chosen: TokenLogprob {
                        id: pick.token,
                        logprob: pick.logprob,
                    },
                    top: pick
                        .top
                        .iter()
                        .take(top_n as usize)
                        .map(|&(id, logprob)| TokenLogprob { id, logprob })
                        .collect(),
                }]
            })
            .unwrap_or_default();
        self.emit_token(request_id, seq_id, pick.token, logprobs, &params, now);
    }

    fn note_scheduled(&mut self, request_id: RequestId, s: &ScheduledSeq, now: Instant) {
        let Some(state) = self.requests.get_mut(&request_id) else {
            return;
        };
        if state.scheduled_at.is_none() {
            state.scheduled_at = Some(now);
            // Before the forward pass, so the prefill span covers its compute.
            state.phase = tracing::info_span!(
                parent: &state.span,
                "engine.prefill",
                cached_tokens = s.admitted_cached_tokens
            );
            metrics::histogram!(m::QUEUE_DURATION_SECONDS)
                .record(now.duration_since(state.submitted_at).as_secs_f64());
        }
        if state.queued {
            state.queued = false;
            self.shared.dequeue_request();
        }
        if let Some(cached) = s.admitted_cached_tokens {
            if state.cached_tokens.is_none() {
                state.cached_tokens = Some(cached as u32);
            }
        }
    }

    fn record_prompt_logprob(
        &mut self,
        request_id: RequestId,
        seq_id: SeqId,
        p: usize,
        row: &[f32],
    ) {
        let Some(state) = self.requests.get_mut(&request_id) else {
            return;
        };
        let Some(collected) = state.prompt_logprobs.as_mut() else {
            return;
        };
        // Entry `p + 1` (entry 0 is the `None` of the first token).
        if collected.len() != p + 1 {
            return;
        }
        let Some(&next_token) = self.scheduler.seq(seq_id).and_then(|q| q.tokens.get(p + 1)) else {
            return;
        };
        let top_n = state.params.prompt_logprobs.unwrap_or(0) as usize;
        collected.push(Some(self.sampler.logprobs(row, next_token, top_n)));
    }

    fn maybe_send_prompt_logprobs(&mut self, request_id: RequestId, seq_id: SeqId) {
        let Some(state) = self.requests.get_mut(&request_id) else {
            return;
        };
        let done = state
            .prompt_logprobs
            .as_ref()
            .is_some_and(|c| c.len() >= state.prompt_len);
        let owes = self
            .scheduler
            .seq(seq_id)
            .is_some_and(|q| q.owes_prompt_logprobs());
        if done && !owes {
            if let Some(collected) = state.prompt_logprobs.take() {
                deliver(&state.events, EngineEvent::PromptLogprobs(collected));
            }
        }
    }

    fn sample_and_emit(&mut self, request_id: RequestId, seq_id: SeqId, row: &[f32], now: Instant) {
        let Some(state) = self.requests.get(&request_id) else {
            return;
        };
        let params = Arc::clone(&state.params);
        let fork_now = !state.forked && params.n > 1;
        let token = self.sample_for(seq_id, &params, row);
        let mut sampled = vec![(seq_id, token)];
        if fork_now {
            sampled.extend(self.fork_children(request_id, seq_id, &params, row));
        }
        for (id, token) in sampled {
            let logprobs = params
                .logprobs
                .map(|top_n| vec![self.sampler.logprobs(row, token, top_n as usize)])
                .unwrap_or_default();
            self.emit_token(request_id, id, token, logprobs, &params, now);
        }
    }

    fn sample_for(&mut self, seq_id: SeqId, params: &SamplingParams, row: &[f32]) -> TokenId {
        let (Some(seq), Some(out)) = (self.scheduler.seq(seq_id), self.outputs.get_mut(&seq_id))
        else {
            return 0;
        };
        self.sampler.sample(
            &SampleInput {
                logits: row,
                params,
                tokens: &seq.tokens,
                prompt_len: seq.prompt_len,
                eos: &self.info.eos_token_ids,
            },
            &mut out.rng,
        )
    }

    /// Creates sequences 1..n from the parent's computed prompt; each samples its first token
    /// from the same logits row with its own RNG.
    fn fork_children(
        &mut self,
        request_id: RequestId,
        parent: SeqId,
        params: &Arc<SamplingParams>,
        row: &[f32],
    ) -> Vec<(SeqId, TokenId)> {
        let Some(parent_seq) = self.scheduler.seq(parent).cloned() else {
            return Vec::new();
        };
        let Some(state) = self.requests.get_mut(&request_id) else {
            return Vec::new();
        };
        state.forked = true;
        let seed = state.seed;
        let mut out = Vec::new();
        for index in 1..params.n {
            let id = SeqId(self.next_seq_id);
            self.next_seq_id += 1;
            let child = Sequence {
                id,
                index,
                tokens: Vec::new(),
                block_table: Vec::new(),
                block_hashes: Vec::new(),
                num_computed: 0,
                num_registered: 0,
                state: SeqState::Waiting,
                ..parent_seq.clone()
            };
            self.scheduler.fork(parent, child);
            self.outputs
                .insert(id, SeqOutput::new(index, seed, &self.tokenizer, params));
            if let Some(state) = self.requests.get_mut(&request_id) {
                state.live_seqs.push(id);
            }
            let token = self.sample_for(id, params, row);
            out.push((id, token));
        }
        out
    }

    fn emit_token(
        &mut self,
        request_id: RequestId,
        seq_id: SeqId,
        token: TokenId,
        logprobs: Vec<StepLogprobs>,
        params: &SamplingParams,
        now: Instant,
    ) {
        self.scheduler.append_token(seq_id, token);
        let Some(seq) = self.scheduler.seq(seq_id) else {
            return;
        };
        let generated = seq.num_generated();
        let context_full = seq.tokens.len() >= self.info.max_context;
        let Some(out) = self.outputs.get_mut(&seq_id) else {
            return;
        };
        let (text, finish) = out.on_token(
            token,
            params,
            &self.info.eos_token_ids,
            generated,
            context_full,
        );
        let index = out.index;
        metrics::counter!(m::GENERATED_TOKENS_TOTAL).increment(1);
        let Some(state) = self.requests.get_mut(&request_id) else {
            return;
        };
        match state.last_token_at {
            None => {
                state.first_token_at = Some(now);
                state.phase = tracing::info_span!(
                    parent: &state.span,
                    "engine.decode",
                    completion_tokens = tracing::field::Empty,
                    finish_reason = tracing::field::Empty,
                );
                metrics::histogram!(m::TIME_TO_FIRST_TOKEN_SECONDS)
                    .record(now.duration_since(state.submitted_at).as_secs_f64());
            }
            Some(last) if index == 0 => {
                metrics::histogram!(m::INTER_TOKEN_LATENCY_SECONDS)
                    .record(now.duration_since(last).as_secs_f64());
            }
            Some(_) => {}
        }
        if index == 0 || state.last_token_at.is_none() {
            state.last_token_at = Some(now);
        }
        deliver(
            &state.events,
            EngineEvent::Delta(TokenDelta {
                index,
                token_ids: vec![token],
                text,
                logprobs,
            }),
        );
        if let Some(reason) = finish {
            self.finish_sequence(request_id, seq_id, reason, now);
        }
    }

    fn finish_sequence(
        &mut self,
        request_id: RequestId,
        seq_id: SeqId,
        reason: FinishReason,
        now: Instant,
    ) {
        let seq = self.scheduler.remove(seq_id);
        let out = self.outputs.remove(&seq_id);
        let Some(state) = self.requests.get_mut(&request_id) else {
            return;
        };
        state.live_seqs.retain(|id| *id != seq_id);
        if let (Some(seq), Some(out)) = (seq, out) {
            state.completion_tokens += seq.num_generated() as u32;
            deliver(
                &state.events,
                EngineEvent::SequenceEnd(SequenceEnd {
                    index: out.index,
                    finish_reason: reason,
                    text: out.text().to_owned(),
                    token_ids: seq.generated().to_vec(),
                }),
            );
        }
        let all_forked = state.forked || state.params.n <= 1;
        if !state.live_seqs.is_empty() || !all_forked {
            return;
        }
        let ms = |t: Option<Instant>| {
            t.map_or(0.0, |t| {
                t.duration_since(state.submitted_at).as_secs_f64() * 1e3
            })
        };
        let usage = Usage {
            prompt_tokens: state.prompt_len as u32,
            completion_tokens: state.completion_tokens,
            cached_tokens: state.cached_tokens.unwrap_or(0),
        };
        let timings = Timings {
            queue_ms: ms(state.scheduled_at),
            ttft_ms: ms(state.first_token_at),
            total_ms: ms(Some(now)),
        };
        state
            .phase
            .record("completion_tokens", state.completion_tokens)
            .record("finish_reason", reason.as_str());
        if let Some(mut state) = self.requests.remove(&request_id) {
            // Counts first, so a client that reads stats after `Finished` sees its blocks free.
            self.publish_counts();
            // Closed before `Finished` goes out, so the decode span ends inside the caller's.
            state.phase = tracing::Span::none();
            deliver(&state.events, EngineEvent::Finished { usage, timings });
        }
    }

    /// Publishes the cheap counters (atomics only).
    pub(crate) fn publish_counts(&self) {
        let shared = &self.shared;
        let (queried, hit) = self.scheduler.prefix_cache_tokens();
        let pool = self.scheduler.pool();
        shared
            .running
            .store(self.scheduler.num_running(), Ordering::Relaxed);
        shared
            .waiting
            .store(self.scheduler.num_waiting(), Ordering::Relaxed);
        shared
            .kv_blocks_used
            .store(pool.num_used(), Ordering::Relaxed);
        let old_queried = shared.prefix_queried.swap(queried, Ordering::Relaxed);
        let old_hit = shared.prefix_hit.swap(hit, Ordering::Relaxed);
        shared
            .preemptions
            .store(self.scheduler.num_preemptions(), Ordering::Relaxed);
        metrics::counter!(m::PREFIX_CACHE_QUERIED_TOKENS_TOTAL)
            .increment(queried.saturating_sub(old_queried));
        metrics::counter!(m::PREFIX_CACHE_HIT_TOKENS_TOTAL).increment(hit.saturating_sub(old_hit));
        metrics::gauge!(m::RUNNING_REQUESTS).set(self.scheduler.num_running() as f64);
        metrics::gauge!(m::WAITING_REQUESTS).set(self.scheduler.num_waiting() as f64);
        metrics::gauge!(m::KV_CACHE_USAGE_RATIO)
            .set(pool.num_used() as f64 / pool.num_blocks().max(1) as f64);
        if queried > 0 {
            metrics::gauge!(m::PREFIX_CACHE_HIT_RATIO).set(hit as f64 / queried as f64);
        }
    }

    /// Rebuilds the prefix-cache summary, at most every `HASH_PUBLISH_INTERVAL_MS` unless
    /// `force`. Skipped (not waited for) when a reader holds the lock.
    pub(crate) fn publish_hashes(&mut self, force: bool) {
        let due = force
            || self
                .hashes_published_at
                .is_none_or(|t| t.elapsed().as_millis() >= HASH_PUBLISH_INTERVAL_MS);
        if !due || !self.scheduler.pool().caching() {
            return;
        }
        let hashes = Arc::new(self.scheduler.cached_hashes(self.max_published_hashes));
        if let Ok(mut slot) = self.shared.cached_hashes.try_lock() {
            *slot = hashes;
            self.hashes_published_at = Some(Instant::now());
        }
    }
}
