//! Tensor-parallel worker groups: N ranks (separate processes) split every layer; rank 0,
//! the leader, runs the engine and broadcasts each step's batch to the followers, every rank
//! runs its shard of the forward pass, and the ranks combine partial results through the
//! backend's collectives. Only rank 0 samples.
//!
//! Start-up, on every rank: assemble the group (`allam_comm::Rendezvous::accept` on rank 0,
//! `allam_comm::join` elsewhere), build the backend with the group's communicator, load the
//! model (each rank reads only its slices). Then rank 0 calls [`start_leader_engine`] (or
//! [`TpLeader::new`]) and every other rank calls [`run_follower`]. `Init` tells followers the
//! KV cache size and checks that all ranks loaded the same model; each follower answers with
//! its weight bytes, or with why it failed ([`report_follower_failure`]).
//!
//! Failure policy: after a step's batch has been sent, any failure (a follower died or hung,
//! a collective timed out) leaves the ranks out of step, so the group is marked unhealthy for
//! good ([`TpHealth`]): that step's requests fail with the message naming the rank, and every
//! later step fails at once without touching the group. Collectives are bounded by the
//! communicator's timeout, so nothing hangs. A follower exits with an error when the leader
//! goes away, and cleanly (`Ok`) on `Shutdown`, which the leader sends when it is dropped
//! (the engine thread ends).
//!
//! Invariant: rank 0 validates a batch before broadcasting it, so a bad batch fails alone
//! without breaking the group; followers re-validate what they receive and treat an invalid
//! batch as a broken protocol.

mod wire;

use std::process::{Child, Command as ProcessCommand, ExitStatus};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use allam_backend::{Backend, KvCache, StepBatch};
use allam_comm::{FollowerControl, LeaderControl};
use allam_engine::{
    run_model_step, Engine, EngineConfig, EngineHandle, ExecutorError, ModelInfo, StepExecutor,
    StepOutput, StepSampling,
};
use allam_model::Model;
use allam_tokenizer::Tokenizer;

use wire::{
    decode_command, decode_reply, encode_command, encode_reply, encode_step, Command, Reply,
};

/// A tensor-parallel group failed to start or to run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TpError {
    /// A collective, the control channel or the rendezvous failed (names the rank).
    #[error(transparent)]
    Comm(#[from] allam_comm::Error),
    #[error(transparent)]
    Model(#[from] allam_model::Error),
    #[error(transparent)]
    Engine(#[from] allam_engine::Error),
    #[error(transparent)]
    Step(#[from] allam_engine::StepError),
    /// A follower reported that it could not start.
    #[error("rank {rank} failed to start: {message}")]
    RankFailed { rank: usize, message: String },
    /// A control message did not decode or made no sense in context.
    #[error("control protocol with rank {rank}: {detail}")]
    Protocol { rank: usize, detail: String },
    /// The ranks disagree on the group or the model, or a setting is unusable.
    #[error("tensor-parallel group: `{field}` {detail}")]
    Config { field: &'static str, detail: String },
    /// A batch failed the leader's checks before it was broadcast (the group is unharmed).
    #[error("step batch rejected before broadcast: {0}")]
    InvalidBatch(#[from] allam_backend::Error),
    /// An earlier failure broke the group; it must be restarted.
    #[error("the tensor-parallel group is unhealthy: {first_failure}")]
    Unhealthy { first_failure: String },
}

impl TpError {
    /// A short stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            TpError::Comm(e) => e.reason(),
            TpError::Model(e) => e.reason(),
            TpError::Engine(e) => e.reason(),
            TpError::Step(allam_engine::StepError::Model(e)) => e.reason(),
            TpError::Step(_) => "step",
            TpError::RankFailed { .. } => "rank_failed",
            TpError::Protocol { .. } => "protocol",
            TpError::Config { .. } => "tp_config",
            TpError::InvalidBatch(_) => "invalid_batch",
            TpError::Unhealthy { .. } => "group_unhealthy",
        }
    }
}

/// Whether a group still works; cloneable, cheap to read from any thread (health probes).
#[derive(Debug, Clone, Default)]
pub struct TpHealth(Arc<Mutex<Option<String>>>);

impl TpHealth {
    pub fn is_healthy(&self) -> bool {
        self.failure().is_none()
    }

    /// The first failure that broke the group, if any.
    pub fn failure(&self) -> Option<String> {
        match self.0.lock() {
            Ok(failure) => failure.clone(),
            Err(_) => Some("a thread panicked while recording the group's health".to_owned()),
        }
    }

    fn mark_failed(&self, message: String) {
        if let Ok(mut failure) = self.0.lock() {
            failure.get_or_insert(message);
        }
    }
}

/// What `Init` checks all ranks agree on: the whole model's shape and the group size.
fn model_summary(model: &Model) -> String {
    let c = model.config();
    format!(
        "layers {} hidden {} heads {}/{} head_dim {} intermediate {} vocab {} tied {} world {}",
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.intermediate_size,
        c.vocab_size,
        c.tie_word_embeddings,
        model.tp_shard().world_size
    )
}

/// Rank 0's executor: broadcasts each step to the followers, then runs its own shard.
pub struct TpLeader {
    model: Model,
    backend: Box<dyn Backend>,
    kv: KvCache,
    control: LeaderControl,
    health: TpHealth,
    rank_weight_bytes: Vec<u64>,
}

impl TpLeader {
    /// Sends `Init` (KV cache of `num_blocks` × `block_size` on every rank), allocates rank
    /// 0's cache, and waits up to `startup_timeout` for every follower to load and answer.
    pub fn new(
        model: Model,
        mut backend: Box<dyn Backend>,
        mut control: LeaderControl,
        num_blocks: usize,
        block_size: usize,
        startup_timeout: Duration,
    ) -> Result<TpLeader, TpError> {
        let world_size = control.num_followers() + 1;
        let shard = model.tp_shard();
        if backend.rank() != 0 || shard.rank != 0 {
            return Err(TpError::Config {
                field: "rank",
                detail: format!(
                    "the leader must be rank 0; the backend is rank {} and the model rank {}",
                    backend.rank(),
                    shard.rank
                ),
            });
        }
        if backend.world_size() != world_size || shard.world_size != world_size {
            return Err(TpError::Config {
                field: "world_size",
                detail: format!(
                    "the control channel reaches {world_size} ranks, the backend's group has {} and the model was loaded for {}",
                    backend.world_size(),
                    shard.world_size
                ),
            });
        }
        let init = Command::Init {
            num_blocks: num_blocks as u64,
            block_size: block_size as u64,
            model_summary: model_summary(&model),
        };
        control.send_all(&encode_command(&init))?;
        // Allocate ours while the followers allocate theirs; report ours after theirs, so a
        // follower's own failure message is not hidden behind a leader-side one.
        let kv = model.alloc_kv_cache(backend.as_mut(), num_blocks, block_size);
        let deadline = Instant::now() + startup_timeout;
        let mut rank_weight_bytes = vec![model.weight_bytes()];
        for rank in 1..world_size {
            let left = deadline.saturating_duration_since(Instant::now());
            let bytes = control.recv_from(rank, left.max(Duration::from_millis(1)))?;
            match decode_reply(&bytes).map_err(|detail| TpError::Protocol { rank, detail })? {
                Reply::Ready { weight_bytes } => rank_weight_bytes.push(weight_bytes),
                Reply::Failed { message } => return Err(TpError::RankFailed { rank, message }),
            }
        }
        Ok(TpLeader {
            kv: kv?,
            model,
            backend,
            control,
            health: TpHealth::default(),
            rank_weight_bytes,
        })
    }

    /// The group's health, for probes; shared with this executor.
    pub fn health(&self) -> TpHealth {
        self.health.clone()
    }

    /// Bytes of weights each rank holds, by rank (from `Init`'s answers).
    pub fn rank_weight_bytes(&self) -> &[u64] {
        &self.rank_weight_bytes
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// KV blocks on every rank.
    pub fn num_blocks(&self) -> usize {
        self.kv.spec().num_blocks
    }

    /// Checks that need no other rank, so a bad batch never reaches the followers.
    fn check_batch(&self, batch: &StepBatch) -> Result<(), allam_backend::Error> {
        let spec = self.kv.spec();
        batch.validate(spec.num_blocks)?;
        let vocab = self.model.config().vocab_size;
        let bad = |detail: String| allam_backend::Error::InvalidBatch {
            op: "tp step",
            detail,
        };
        if batch.block_size as usize != spec.block_size {
            return Err(bad(format!(
                "block_size {} but the cache has {}",
                batch.block_size, spec.block_size
            )));
        }
        if let Some(id) = batch.token_ids.iter().find(|id| **id as usize >= vocab) {
            return Err(bad(format!(
                "token id {id} outside the vocabulary of {vocab}"
            )));
        }
        Ok(())
    }

    fn step(&mut self, batch: &StepBatch, sampling: &StepSampling) -> Result<StepOutput, TpError> {
        if let Some(first_failure) = self.health.failure() {
            return Err(TpError::Unhealthy { first_failure });
        }
        self.check_batch(batch)?;
        let sent = self.control.send_all(&encode_step(batch));
        let result = match sent {
            Ok(()) => run_model_step(
                &self.model,
                self.backend.as_mut(),
                &mut self.kv,
                batch,
                sampling,
            )
            .map_err(TpError::from),
            Err(e) => Err(TpError::from(e)),
        };
        if let Err(error) = &result {
            self.health.mark_failed(error.to_string());
            // Followers idle on the control channel (or blocked in a collective the broken
            // communicator already closed) stop now rather than at their timeouts.
            self.control.close(error.to_string());
        }
        result
    }
}

impl StepExecutor for TpLeader {
    fn execute(
        &mut self,
        batch: &StepBatch,
        sampling: &StepSampling,
    ) -> Result<StepOutput, ExecutorError> {
        Ok(self.step(batch, sampling)?)
    }

    fn graph_batch_sizes(&self) -> Vec<usize> {
        self.backend.graph_batch_sizes()
    }
}

impl Drop for TpLeader {
    /// Tells healthy followers to exit cleanly; a broken group's followers see the sockets
    /// close instead.
    fn drop(&mut self) {
        if self.health.is_healthy() {
            let _ = self.control.send_all(&encode_command(&Command::Shutdown));
        }
    }
}

/// A started tensor-parallel engine.
pub struct TpEngine {
    pub engine: EngineHandle,
    pub health: TpHealth,
    /// Bytes of weights each rank holds, by rank.
    pub rank_weight_bytes: Vec<u64>,
}

/// [`allam_engine::Engine::start`] for a group: sizes the KV cache (`num_blocks`, else
/// `kv_cache_bytes` over rank 0's bytes per block; each follower's backend must have room
/// for as many), starts every rank's cache through [`TpLeader::new`], and the engine thread
/// over it.
pub fn start_leader_engine(
    model: Model,
    backend: Box<dyn Backend>,
    control: LeaderControl,
    tokenizer: Tokenizer,
    config: EngineConfig,
    startup_timeout: Duration,
) -> Result<TpEngine, TpError> {
    let block_size = config.block_size;
    let num_blocks = match (config.num_blocks, config.kv_cache_bytes) {
        (Some(n), _) => n,
        (None, Some(bytes)) => {
            let per_block = model.kv_cache_bytes_per_block(backend.as_ref(), block_size);
            bytes.checked_div(per_block).unwrap_or(0)
        }
        (None, None) => 0,
    };
    if num_blocks == 0 || block_size == 0 {
        return Err(TpError::Config {
            field: "kv_cache_bytes",
            detail: format!(
                "leaves {num_blocks} KV blocks of {block_size} tokens; set `num_blocks` or a larger budget"
            ),
        });
    }
    let model_config = model.config().clone();
    let mut eos_token_ids = model_config.eos_token_ids.clone();
    if !eos_token_ids.contains(&tokenizer.eos_token_id()) {
        eos_token_ids.push(tokenizer.eos_token_id());
    }
    let leader = TpLeader::new(
        model,
        backend,
        control,
        num_blocks,
        block_size,
        startup_timeout,
    )?;
    let health = leader.health();
    let rank_weight_bytes = leader.rank_weight_bytes().to_vec();
    let info = ModelInfo {
        vocab_size: model_config.vocab_size,
        max_context: model_config.max_position_embeddings,
        eos_token_ids,
        block_size,
        num_blocks,
    };
    let engine = Engine::start_with_executor(Box::new(leader), info, tokenizer, config)?;
    Ok(TpEngine {
        engine,
        health,
        rank_weight_bytes,
    })
}

/// Tells rank 0 why this follower cannot start (e.g. its weights failed to load), so the
/// leader's start-up error names the cause instead of a closed connection. Best effort.
pub fn report_follower_failure(control: &mut FollowerControl, message: &str) {
    let reply = Reply::Failed {
        message: message.to_owned(),
    };
    let _ = control.send(&encode_reply(&reply));
}

/// A follower's life after its model is loaded: answer `Init`, then run every step rank 0
/// sends until `Shutdown` (`Ok`). Rank 0 going away, a failed collective, or a message
/// that breaks the protocol is an `Err`: the process should exit non-zero.
pub fn run_follower(
    model: Model,
    mut backend: Box<dyn Backend>,
    mut control: FollowerControl,
) -> Result<(), TpError> {
    let Some(mut kv) = follower_init(&model, backend.as_mut(), &mut control)? else {
        return Ok(());
    };
    loop {
        let command = decode_command(&control.recv()?).map_err(from_leader)?;
        match command {
            Command::Step(batch) => {
                batch
                    .validate(kv.spec().num_blocks)
                    .map_err(|e| from_leader(format!("invalid step batch: {e}")))?;
                // The logits stay on the device (rank 0 samples); the wait bounds this step's
                // collectives before the next command is read.
                model.forward_logits(backend.as_mut(), &mut kv, &batch)?;
                backend
                    .synchronize()
                    .map_err(|e| TpError::Step(allam_engine::StepError::Synchronize(e)))?;
            }
            Command::Shutdown => return Ok(()),
            Command::Init { .. } => return Err(from_leader("a second `Init`".to_owned())),
        }
    }
}

fn from_leader(detail: String) -> TpError {
    TpError::Protocol { rank: 0, detail }
}

/// Waits for `Init`, checks the model matches rank 0's, allocates the cache and answers.
/// `None` when rank 0 shut the group down first.
fn follower_init(
    model: &Model,
    backend: &mut dyn Backend,
    control: &mut FollowerControl,
) -> Result<Option<KvCache>, TpError> {
    let (num_blocks, block_size, theirs) =
        match decode_command(&control.recv()?).map_err(from_leader)? {
            Command::Init {
                num_blocks,
                block_size,
                model_summary,
            } => (num_blocks, block_size, model_summary),
            Command::Shutdown => return Ok(None),
            Command::Step(_) => return Err(from_leader("a step before `Init`".to_owned())),
        };
    let ours = model_summary(model);
    if theirs != ours {
        let message = format!("rank 0 loaded `{theirs}`, this rank `{ours}`");
        report_follower_failure(control, &message);
        return Err(TpError::Config {
            field: "model",
            detail: message,
        });
    }
    let kv = usize::try_from(num_blocks)
        .ok()
        .zip(usize::try_from(block_size).ok())
        .ok_or_else(|| from_leader(format!("a cache of {num_blocks} x {block_size}")))
        .and_then(|(n, b)| Ok(model.alloc_kv_cache(backend, n, b)?));
    match kv {
        Ok(kv) => {
            let ready = Reply::Ready {
                weight_bytes: model.weight_bytes(),
            };
            control.send(&encode_reply(&ready))?;
            Ok(Some(kv))
        }
        Err(e) => {
            report_follower_failure(control, &e.to_string());
            Err(e)
        }
    }
}

/// Follower processes started by rank 0 (`allam serve --tp N` starts ranks 1..N as
/// `allam worker` children); killed when dropped, so a failed leader leaves none behind.
#[derive(Debug)]
pub struct FollowerProcesses {
    children: Vec<(usize, Child)>,
}

impl FollowerProcesses {
    /// Starts one process per rank `1..world_size` from `command_for_rank(rank)` (typically
    /// `allam worker --world-size N --rank R --group G --peers ADDR ...`).
    pub fn spawn(
        world_size: usize,
        mut command_for_rank: impl FnMut(usize) -> ProcessCommand,
    ) -> std::io::Result<FollowerProcesses> {
        let mut processes = FollowerProcesses {
            children: Vec::new(),
        };
        for rank in 1..world_size {
            let child = command_for_rank(rank).spawn()?;
            processes.children.push((rank, child));
        }
        Ok(processes)
    }

    /// Wraps already started children, `(rank, child)`.
    pub fn from_children(children: Vec<(usize, Child)>) -> FollowerProcesses {
        FollowerProcesses { children }
    }

    /// Process ids by rank.
    pub fn pids(&self) -> Vec<(usize, u32)> {
        self.children.iter().map(|(r, c)| (*r, c.id())).collect()
    }

    /// Kills rank `rank`'s process now (tests; an operator stopping a broken group).
    pub fn kill(&mut self, rank: usize) -> std::io::Result<()> {
        for (r, child) in &mut self.children {
            if *r == rank {
                child.kill()?;
                child.wait()?;
            }
        }
        Ok(())
    }

    /// Waits up to `timeout` for every child to exit; exit statuses by rank, `None` for
    /// those still running (which are left running).
    pub fn wait(&mut self, timeout: Duration) -> Vec<(usize, Option<ExitStatus>)> {
        let deadline = Instant::now() + timeout;
        self.children
            .iter_mut()
            .map(|(rank, child)| loop {
                match child.try_wait() {
                    Ok(Some(status)) => break (*rank, Some(status)),
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => break (*rank, None),
                }
            })
            .collect()
    }
}

impl Drop for FollowerProcesses {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}
