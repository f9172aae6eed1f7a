//! The engine thread and its front: `Engine::start` spawns the OS thread `allam-engine`, which
//! owns the model, the backend (a CUDA context is bound to it) and the KV cache; the cloneable
//! [`EngineHandle`] talks to it through a bounded command channel.
//!
//! Loop: when idle, park on a blocking receive; when busy, drain pending commands without
//! blocking, then run exactly one step. The thread never awaits and never blocks on a client.
//!
//! Failure policy: a failed forward pass fails the requests of that step (`Failed` with
//! reason `engine_error`) and the engine keeps serving; a persistent device fault therefore
//! shows as every request failing fast, loudly logged at `error`. If the thread itself dies,
//! every open stream ends with `Failed { reason: "engine_stopped" }` and `submit` answers
//! `Error::Stopped`.
//!
//! Shutdown is in two stages so a worker can put its own deadline around them: `drain` stops
//! admission and hands back requests that never started (retryable `unavailable`), letting
//! running ones finish; `shutdown` fails whatever is left (`shutdown`) and joins the thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use allam_backend::Backend;
use allam_model::Model;
use allam_request::ValidRequest;
use allam_tokenizer::Tokenizer;
use allam_types::RequestId;
use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::config::EngineConfig;
use crate::core::{step_event_room, EngineCore, NewRequest};
use crate::executor::{padding_step, ModelExecutor, StepExecutor};
use crate::stats::{EngineStats, ModelInfo, Shared};
use crate::stream::EventStream;
use crate::{failure_reason, Error};

/// Slack in the command channel beyond `max_waiting` submissions, for cancels and control.
const CONTROL_SLOTS: usize = 1024;

/// How long the thread waits for a command when every runnable request is paused behind its
/// reader: short, because a reader catching up sends no command.
const PAUSED_POLL: Duration = Duration::from_millis(2);

pub(crate) enum Command {
    Submit(Box<NewRequest>),
    Cancel(RequestId),
    Drain,
    Shutdown,
}

/// Starts engines.
pub struct Engine;

impl Engine {
    /// Sizes and allocates the KV cache (`num_blocks`, else `kv_cache_bytes` divided by the
    /// model's bytes per block), then spawns the named OS thread `allam-engine` that owns
    /// model, backend and cache.
    pub fn start(
        model: Model,
        mut backend: Box<dyn Backend>,
        tokenizer: Tokenizer,
        config: EngineConfig,
    ) -> Result<EngineHandle, Error> {
        config.check()?;
        let bytes_per_block = model.kv_cache_bytes_per_block(backend.as_ref(), config.block_size);
        let num_blocks = config.resolve_num_blocks(bytes_per_block)?;
        let kv = model
            .alloc_kv_cache(backend.as_mut(), num_blocks, config.block_size)
            .map_err(|e| Error::KvCacheAlloc {
                num_blocks,
                source: Box::new(e),
            })?;
        let model_config = model.config();
        let mut eos_token_ids = model_config.eos_token_ids.clone();
        if !eos_token_ids.contains(&tokenizer.eos_token_id()) {
            eos_token_ids.push(tokenizer.eos_token_id());
        }
        let info = ModelInfo {
            vocab_size: model_config.vocab_size,
            max_context: model_config.max_position_embeddings,
            eos_token_ids,
            block_size: config.block_size,
            num_blocks,
        };
        let executor = ModelExecutor { model, backend, kv };
        Engine::start_with_executor(Box::new(executor), info, tokenizer, config)
    }

    /// Starts an engine over any executor; `info.num_blocks` blocks of `info.block_size`
    /// tokens must already exist wherever the executor keeps its KV cache.
    pub fn start_with_executor(
        mut executor: Box<dyn StepExecutor>,
        info: ModelInfo,
        tokenizer: Tokenizer,
        config: EngineConfig,
    ) -> Result<EngineHandle, Error> {
        config.check()?;
        if info.block_size != config.block_size {
            return Err(Error::InvalidConfig {
                field: "block_size",
                problem: format!(
                    "is {} but the executor's cache uses blocks of {}",
                    config.block_size, info.block_size
                ),
            });
        }
        if info.num_blocks == 0 || info.vocab_size == 0 {
            return Err(Error::InvalidConfig {
                field: "num_blocks",
                problem: format!(
                    "the cache has {} blocks and the model {} vocabulary entries; need at least 1",
                    info.num_blocks, info.vocab_size
                ),
            });
        }
        // Largest first: if graphs do not fit beside the KV cache, start-up says so at once.
        for size in executor.graph_batch_sizes().into_iter().rev() {
            let (batch, sampling) = padding_step(size, info.block_size);
            executor
                .execute(&batch, &sampling)
                .map_err(|source| Error::GraphWarmup { size, source })?;
        }
        let shared = Arc::new(Shared::default());
        let (commands, receiver) =
            crossbeam_channel::bounded(config.max_waiting.saturating_add(CONTROL_SLOTS));
        let core = EngineCore::new(
            executor,
            tokenizer,
            info.clone(),
            &config,
            Arc::clone(&shared),
        );
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("allam-engine".to_owned())
            .spawn(move || run(core, receiver, thread_shared))
            .map_err(Error::Spawn)?;
        Ok(EngineHandle {
            inner: Arc::new(HandleInner {
                commands,
                shared,
                info,
                max_waiting: config.max_waiting,
                stream_buffer_events: config.stream_buffer_events,
                next_request_id: AtomicU64::new(1),
                thread: Mutex::new(Some(thread)),
            }),
        })
    }
}

fn run(mut core: EngineCore, commands: Receiver<Command>, shared: Arc<Shared>) {
    tracing::info!("engine thread started");
    'serve: loop {
        if core.is_idle() {
            core.publish_counts();
            core.publish_hashes(true);
            match commands.recv() {
                Ok(command) => {
                    if !apply(&mut core, command) {
                        break 'serve;
                    }
                }
                // Every handle and stream is gone: nobody can submit again.
                Err(_) => break 'serve,
            }
        }
        while let Ok(command) = commands.try_recv() {
            if !apply(&mut core, command) {
                break 'serve;
            }
        }
        if !core.is_idle() && !core.step() {
            match commands.recv_timeout(PAUSED_POLL) {
                Ok(command) => {
                    if !apply(&mut core, command) {
                        break 'serve;
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break 'serve,
            }
        }
    }
    shared.closed.store(true, Ordering::Release);
    core.drain();
    core.abort_all(
        failure_reason::SHUTDOWN,
        "the engine shut down before this request finished",
    );
    // Requests submitted after the loop ended are answered, not left hanging.
    while let Ok(command) = commands.try_recv() {
        apply(&mut core, command);
        core.abort_all(failure_reason::SHUTDOWN, "the engine has shut down");
    }
    core.publish_counts();
    tracing::info!("engine thread stopped");
}

/// Applies one command; `false` means leave the loop.
fn apply(core: &mut EngineCore, command: Command) -> bool {
    match command {
        Command::Submit(new) => core.add_request(*new),
        Command::Cancel(id) => core.cancel(id),
        Command::Drain => core.drain(),
        Command::Shutdown => return false,
    }
    true
}

struct HandleInner {
    commands: Sender<Command>,
    shared: Arc<Shared>,
    info: ModelInfo,
    max_waiting: usize,
    stream_buffer_events: usize,
    next_request_id: AtomicU64,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// The cloneable front of a running engine. Every method returns without waiting for a step
/// (except `shutdown`, which joins the thread).
#[derive(Clone)]
pub struct EngineHandle {
    inner: Arc<HandleInner>,
}

impl EngineHandle {
    /// Queues a request and returns its event stream. `Error::QueueFull` when `max_waiting`
    /// requests are already queued, `Error::PromptTooLarge` when prompt + `max_new_tokens`
    /// can never fit the whole KV cache, `Error::InvalidRequest` when the prompt is empty, a
    /// token id is outside the model's vocabulary or the context is exceeded, and
    /// `Error::Stopped` after `drain`/`shutdown`.
    pub fn submit(&self, request: ValidRequest) -> Result<EventStream, Error> {
        let inner = &self.inner;
        if inner.shared.closed.load(Ordering::Acquire) {
            return Err(Error::Stopped);
        }
        self.check_fits(&request)?;
        let queued = inner.shared.queued_requests.fetch_add(1, Ordering::AcqRel);
        if queued >= inner.max_waiting {
            inner.shared.dequeue_request();
            return Err(Error::QueueFull {
                max_waiting: inner.max_waiting,
            });
        }
        let id = RequestId(inner.next_request_id.fetch_add(1, Ordering::Relaxed));
        // Room for `Started` plus one step, whatever the configured buffer.
        let capacity = inner
            .stream_buffer_events
            .max(step_event_room(request.params().n) + 1);
        let (events, receiver) = tokio::sync::mpsc::channel(capacity);
        let command = Command::Submit(Box::new(NewRequest {
            id,
            request,
            events,
            submitted_at: Instant::now(),
            span: tracing::Span::current(),
        }));
        match inner.commands.try_send(command) {
            Ok(()) => Ok(EventStream::new(id, receiver, inner.commands.clone())),
            Err(TrySendError::Full(_)) => {
                inner.shared.dequeue_request();
                Err(Error::QueueFull {
                    max_waiting: inner.max_waiting,
                })
            }
            Err(TrySendError::Disconnected(_)) => {
                inner.shared.dequeue_request();
                Err(Error::Stopped)
            }
        }
    }

    fn check_fits(&self, request: &ValidRequest) -> Result<(), Error> {
        let info = &self.inner.info;
        let prompt = request.prompt_token_ids();
        let params = request.params();
        if prompt.is_empty() {
            return Err(Error::InvalidRequest("the prompt has no tokens".to_owned()));
        }
        if let Some(bad) = prompt.iter().find(|&&t| t as usize >= info.vocab_size) {
            return Err(Error::InvalidRequest(format!(
                "prompt token id {bad} is outside the model's vocabulary of {}",
                info.vocab_size
            )));
        }
        let max_new = params.max_new_tokens as usize;
        let needed = prompt.len() + max_new;
        if needed > info.max_context {
            return Err(Error::InvalidRequest(format!(
                "prompt ({} tokens) + `max_new_tokens` ({max_new}) exceeds the model context of {}",
                prompt.len(),
                info.max_context
            )));
        }
        // The last generated token is never fed back, so its KV is never stored.
        let kv_tokens = needed.saturating_sub(1).max(prompt.len());
        if kv_tokens > info.kv_capacity_tokens() {
            return Err(Error::PromptTooLarge {
                prompt_tokens: prompt.len(),
                max_new_tokens: max_new,
                needed_tokens: kv_tokens,
                capacity_tokens: info.kv_capacity_tokens(),
            });
        }
        Ok(())
    }

    /// Current load and cache state (published by the engine thread after every change).
    pub fn stats(&self) -> EngineStats {
        self.inner.shared.snapshot(self.inner.info.num_blocks)
    }

    /// Up to `max` chained block hashes (`allam_types::prefix_hash`) the prefix cache can
    /// serve, most recently used first; refreshed at most every 50 ms while busy.
    pub fn cached_block_hashes(&self, max: usize) -> Vec<u64> {
        let hashes = match self.inner.shared.cached_hashes.lock() {
            Ok(slot) => Arc::clone(&slot),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        };
        hashes.iter().take(max).copied().collect()
    }

    /// Vocabulary, context and cache geometry.
    pub fn model_info(&self) -> ModelInfo {
        self.inner.info.clone()
    }

    /// Stops admission: later `submit`s answer `Error::Stopped`, queued requests that never
    /// started end with a retryable `Failed { reason: "unavailable" }`, running ones finish.
    /// Returns at once; watch `stats().running` to know when the work is done.
    pub fn drain(&self) {
        self.inner.shared.closed.store(true, Ordering::Release);
        let _ = self.inner.commands.send(Command::Drain);
    }

    /// Drains, fails whatever still runs (`Failed { reason: "shutdown" }`) and joins the
    /// engine thread. Idempotent. Blocks for at most one step: call it off async workers.
    pub fn shutdown(&self) {
        self.drain();
        let _ = self.inner.commands.send(Command::Shutdown);
        let thread = match self.inner.thread.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(thread) = thread {
            if thread.join().is_err() {
                tracing::error!("the engine thread panicked");
            }
        }
    }
}
