//! Starting a worker group's engine: pick the backend for `--device`, load (or synthesize)
//! the model onto it, size the KV cache and start the engine thread.
//!
//! Invariant: weights are read and uploaded on the calling thread before the engine thread
//! exists, so a bad checkpoint fails start-up with the loader's message instead of failing
//! requests later.

use std::fmt;
use std::path::PathBuf;
use std::process::Command as ProcessCommand;
use std::str::FromStr;

use allam_backend::Backend;
use allam_backend_cpu::{CpuBackend, CpuBackendConfig};
use allam_backend_cuda::CudaBackend;
use allam_engine::{Engine, EngineConfig, EngineHandle};
use allam_model::{LoadFormat, LoadOptions, Model, ModelConfig, ProgressMode};
use allam_tokenizer::Tokenizer;

pub use allam_comm::GroupOptions;

use crate::tp::{self, FollowerProcesses};
use crate::Error;

/// How the ranks of a tensor-parallel group come together.
#[derive(Debug, Clone)]
pub enum TpLaunch {
    /// Rank 0 starts ranks `1..N` itself as child processes of `exe` (`allam serve --tp N`):
    /// `exe worker --world-size N --rank R --group G --peers ADDR <follower_args>`.
    SpawnLocal {
        exe: PathBuf,
        follower_args: Vec<String>,
    },
    /// Rank 0 listens on `bind_addr` and waits for ranks started elsewhere with `--peers`.
    External { bind_addr: String },
}

/// Tensor parallelism of a group; `world_size` 1 means none.
#[derive(Debug, Clone)]
pub struct TpConfig {
    pub world_size: usize,
    /// Names the group in the rendezvous handshake (ranks of another group are refused).
    pub group: String,
    pub launch: TpLaunch,
    pub options: allam_comm::GroupOptions,
}

impl TpConfig {
    pub fn single() -> TpConfig {
        TpConfig {
            world_size: 1,
            group: "local".to_owned(),
            launch: TpLaunch::External {
                bind_addr: "127.0.0.1:0".to_owned(),
            },
            options: allam_comm::GroupOptions::default(),
        }
    }
}

/// Where a group computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl FromStr for Device {
    type Err = Error;

    fn from_str(text: &str) -> Result<Device, Error> {
        let bad = || Error::InvalidDevice {
            given: text.to_owned(),
        };
        match text {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => {
                let ordinal = text.strip_prefix("cuda:").ok_or_else(bad)?;
                ordinal.parse().map(Device::Cuda).map_err(|_| bad())
            }
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Where the weights come from.
#[derive(Debug, Clone)]
pub enum Weights {
    /// A Hugging Face model directory (safetensors, or dummy weights for its config).
    Dir { dir: PathBuf, format: LoadFormat },
    /// Random weights of a given shape (presets), no files.
    Dummy { config: Box<ModelConfig>, seed: u64 },
}

/// Everything needed to start one group's engine.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    pub weights: Weights,
    pub device: Device,
    pub engine: EngineConfig,
    pub progress: ProgressMode,
    pub tp: TpConfig,
}

/// A started engine and what the front needs to know about it.
pub struct StartedGroup {
    pub engine: EngineHandle,
    pub model_config: ModelConfig,
    pub backend_description: String,
    /// Ranks `1..N` this process started; they are killed when this is dropped, so keep it
    /// as long as the engine.
    pub followers: Option<FollowerProcesses>,
    /// Weight bytes each rank holds (one entry without tensor parallelism).
    pub rank_weight_bytes: Vec<u64>,
}

fn cpu_config(config: &EngineConfig) -> CpuBackendConfig {
    CpuBackendConfig {
        threads: None,
        kv_cache_budget_bytes: config.kv_cache_bytes.unwrap_or(1 << 30) as u64,
    }
}

fn load_model(config: &GroupConfig, backend: &mut dyn Backend) -> Result<Model, Error> {
    Ok(match &config.weights {
        Weights::Dir { dir, format } => Model::load(
            dir,
            backend,
            &LoadOptions {
                format: *format,
                progress: config.progress,
                dummy_seed: 0,
            },
        )?,
        Weights::Dummy {
            config: model_config,
            seed,
        } => Model::from_config_dummy((**model_config).clone(), backend, *seed)?,
    })
}

fn check_vocab(model: &Model, tokenizer: &Tokenizer) -> Result<(), Error> {
    if model.config().vocab_size < tokenizer.vocab_size() {
        return Err(Error::TokenizerMismatch {
            model_vocab: model.config().vocab_size,
            tokenizer_vocab: tokenizer.vocab_size(),
        });
    }
    Ok(())
}

/// Builds the backend, loads the model and starts the engine thread; with tensor
/// parallelism, first assembles the group (spawning or awaiting ranks `1..N`).
pub fn start_group(config: &GroupConfig, tokenizer: Tokenizer) -> Result<StartedGroup, Error> {
    if config.tp.world_size > 1 {
        return start_tp_group(config, tokenizer);
    }
    let mut backend: Box<dyn Backend> = match config.device {
        Device::Cpu => Box::new(CpuBackend::new(&cpu_config(&config.engine))?),
        Device::Cuda(ordinal) => Box::new(CudaBackend::new(ordinal)?),
    };
    let model = load_model(config, backend.as_mut())?;
    check_vocab(&model, &tokenizer)?;
    let model_config = model.config().clone();
    let rank_weight_bytes = vec![model.weight_bytes()];
    let info = backend.info();
    let backend_description = format!("{} ({})", info.name, info.device);
    let engine = Engine::start(model, backend, tokenizer, config.engine.clone())?;
    Ok(StartedGroup {
        engine,
        model_config,
        backend_description,
        followers: None,
        rank_weight_bytes,
    })
}

fn start_tp_group(config: &GroupConfig, tokenizer: Tokenizer) -> Result<StartedGroup, Error> {
    let tp_config = &config.tp;
    let n = tp_config.world_size;
    if config.device != Device::Cpu {
        return Err(Error::Tp(tp::TpError::Config {
            field: "world_size",
            detail: format!(
                "{n} needs collectives the CUDA backend does not have yet (NCCL); use --device cpu or --tp 1"
            ),
        }));
    }
    let bind_addr = match &tp_config.launch {
        TpLaunch::SpawnLocal { .. } => "127.0.0.1:0",
        TpLaunch::External { bind_addr } => bind_addr.as_str(),
    };
    let rendezvous =
        allam_comm::Rendezvous::bind(bind_addr, &tp_config.group, n, tp_config.options)
            .map_err(tp::TpError::from)?;
    let peers = rendezvous
        .local_addr()
        .map_err(tp::TpError::from)?
        .to_string();
    let followers = match &tp_config.launch {
        TpLaunch::SpawnLocal { exe, follower_args } => Some(
            FollowerProcesses::spawn(n, |rank| {
                let mut command = ProcessCommand::new(exe);
                command
                    .arg("worker")
                    .args(["--world-size", &n.to_string()])
                    .args(["--rank", &rank.to_string()])
                    .args(["--group", &tp_config.group])
                    .args(["--peers", &peers])
                    .args(follower_args);
                command
            })
            .map_err(|e| Error::Serve(format!("starting follower ranks: {e}")))?,
        ),
        TpLaunch::External { .. } => None,
    };
    let leader = rendezvous.accept().map_err(tp::TpError::from)?;
    let mut backend =
        CpuBackend::with_communicator(&cpu_config(&config.engine), leader.communicator)?;
    let model = load_model(config, &mut backend)?;
    check_vocab(&model, &tokenizer)?;
    let model_config = model.config().clone();
    let info = backend.info();
    let backend_description = format!("{} ({}) x{n} ranks", info.name, info.device);
    let started = tp::start_leader_engine(
        model,
        Box::new(backend),
        leader.control,
        tokenizer,
        config.engine.clone(),
        tp_config.options.rendezvous_timeout,
    )?;
    Ok(StartedGroup {
        engine: started.engine,
        model_config,
        backend_description,
        followers,
        rank_weight_bytes: started.rank_weight_bytes,
    })
}

/// Runs rank `rank >= 1` of a group until rank 0 shuts it down: joins at `peers`, loads
/// this rank's slices, then executes every step rank 0 broadcasts.
pub fn run_follower_rank(config: &GroupConfig, peers: &str, rank: usize) -> Result<(), Error> {
    let tp_config = &config.tp;
    let group = allam_comm::join(
        peers,
        &tp_config.group,
        rank,
        tp_config.world_size,
        tp_config.options,
    )
    .map_err(tp::TpError::from)?;
    let mut control = group.control;
    let mut backend =
        CpuBackend::with_communicator(&cpu_config(&config.engine), group.communicator)?;
    let model = match load_model(config, &mut backend) {
        Ok(model) => model,
        Err(err) => {
            tp::report_follower_failure(&mut control, &err.to_string());
            return Err(err);
        }
    };
    tp::run_follower(model, Box::new(backend), control)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse() {
        assert_eq!("cpu".parse::<Device>().ok(), Some(Device::Cpu));
        assert_eq!("cuda".parse::<Device>().ok(), Some(Device::Cuda(0)));
        assert_eq!("cuda:3".parse::<Device>().ok(), Some(Device::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "CPU"] {
            let err = bad.parse::<Device>().err().map(|e| e.to_string());
            assert!(
                err.as_deref().is_some_and(|m| m.contains(bad)),
                "{bad}: {err:?}"
            );
        }
    }
}
