//! Starting a worker group's engine: pick the backend for `--device`, load (or synthesize)
//! the model onto it, size the KV cache and start the engine thread.
//!
//! Tensor parallelism: the ranks meet over TCP (allam-comm's rendezvous: a communicator and
//! the control channel). On the CPU that communicator carries the collectives. On CUDA rank
//! `r` opens GPU `cuda:{B + r}` (`--device cuda:B`), rank 0 makes the NCCL unique id and
//! broadcasts it over the TCP communicator, every rank tells the others whether its GPU
//! opened (so a missing GPU is named instead of leaving the others waiting in NCCL), and then
//! all join NCCL, which carries the collectives from there on.
//!
//! Invariant: weights are read and uploaded on the calling thread before the engine thread
//! exists, so a bad checkpoint fails start-up with the loader's message instead of failing
//! requests later.

use std::fmt;
use std::path::PathBuf;
use std::process::Command as ProcessCommand;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use allam_backend::Backend;
use allam_backend_cpu::{CpuBackend, CpuBackendConfig};
use allam_backend_cuda::{CudaBackend, CudaBackendConfig, CudaGraphOptions, NcclId};
use allam_comm::Communicator;
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

/// How the ranks of a group exchange partial results (torch.distributed's "backend").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Collectives {
    /// NCCL between GPUs (`--device cuda` with more than one rank), TCP between CPU ranks;
    /// nothing for one rank.
    #[default]
    Auto,
    /// NCCL, even for one rank: `--device cuda --tp 1` then runs as a one-rank NCCL group,
    /// which exercises the NCCL path on a machine with one GPU.
    Nccl,
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
    /// Decode steps replayed from CUDA graphs (`--cuda-graphs`; one-rank CUDA groups only).
    pub cuda_graphs: Option<CudaGraphOptions>,
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

fn cuda_config(config: &GroupConfig, ordinal: usize) -> CudaBackendConfig {
    CudaBackendConfig {
        cuda_graphs: config.cuda_graphs,
        ..CudaBackendConfig::from_env(ordinal)
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
    start_group_with(config, tokenizer, Collectives::Auto)
}

/// [`start_group`] with a choice of collectives ([`Collectives::Nccl`] needs `--device cuda`).
pub fn start_group_with(
    config: &GroupConfig,
    tokenizer: Tokenizer,
    collectives: Collectives,
) -> Result<StartedGroup, Error> {
    if collectives == Collectives::Nccl && config.device == Device::Cpu {
        return Err(Error::Tp(tp::TpError::Config {
            field: "collectives",
            detail: "NCCL needs --device cuda (CPU ranks use TCP)".to_owned(),
        }));
    }
    if config.tp.world_size > 1 {
        return start_tp_group(config, tokenizer);
    }
    let mut backend: Box<dyn Backend> = match (config.device, collectives) {
        (Device::Cpu, _) => Box::new(CpuBackend::new(&cpu_config(&config.engine))?),
        (Device::Cuda(ordinal), Collectives::Auto) => {
            Box::new(CudaBackend::with_config(&cuda_config(config, ordinal))?)
        }
        (Device::Cuda(ordinal), Collectives::Nccl) => {
            allam_backend_cuda::check_tp_devices(ordinal, 1)?;
            let id = NcclId::new()?;
            Box::new(CudaBackend::with_nccl(
                &cuda_config(config, ordinal),
                &id,
                0,
                1,
                config.tp.options.collective_timeout,
            )?)
        }
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
    if let Device::Cuda(base) = config.device {
        // Before any rank starts: no driver, too few GPUs or no NCCL is one sentence here.
        allam_backend_cuda::check_tp_devices(base, n)?;
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
    let mut backend = rank_backend(config, leader.communicator)?;
    let model = load_model(config, backend.as_mut())?;
    check_vocab(&model, &tokenizer)?;
    let model_config = model.config().clone();
    let info = backend.info();
    let backend_description = format!("{} ({}) x{n} ranks", info.name, info.device);
    let started = tp::start_leader_engine(
        model,
        backend,
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
    let loaded = rank_backend(config, group.communicator).and_then(|mut backend| {
        let model = load_model(config, backend.as_mut())?;
        Ok((model, backend))
    });
    let (model, backend) = match loaded {
        Ok(loaded) => loaded,
        Err(err) => {
            tp::report_follower_failure(&mut control, &err.to_string());
            return Err(err);
        }
    };
    tp::run_follower(model, backend, control)?;
    Ok(())
}

/// This rank's backend in an assembled group: the CPU backend over the TCP communicator, or
/// this rank's GPU in the group's NCCL communicator.
fn rank_backend(
    config: &GroupConfig,
    comm: Arc<allam_comm::TcpCommunicator>,
) -> Result<Box<dyn Backend>, Error> {
    Ok(match config.device {
        Device::Cpu => Box::new(CpuBackend::with_communicator(
            &cpu_config(&config.engine),
            comm,
        )?),
        Device::Cuda(base) => Box::new(join_nccl_rank(
            config,
            base,
            comm.as_ref(),
            config.tp.options.collective_timeout,
        )?),
    })
}

/// First byte of a rank's start-up status in the exchange before NCCL.
const GPU_OPENED: u8 = 0;
const GPU_FAILED: u8 = 1;

/// Opens GPU `base + rank` and joins the group's NCCL communicator, exchanging the unique id
/// and every rank's start-up status over `comm` (the module doc has the sequence). Every
/// rank calls it at the same point; a failure on any rank fails all of them with its cause.
fn join_nccl_rank(
    config: &GroupConfig,
    base: usize,
    comm: &dyn Communicator,
    timeout: Duration,
) -> Result<CudaBackend, Error> {
    let (rank, n) = (comm.rank(), comm.world_size());
    // Rank 0's id; an empty broadcast tells the others it has none.
    let mut id_bytes = Vec::new();
    let mut id_failure = None;
    if rank == 0 {
        match NcclId::new() {
            Ok(id) => id_bytes = id.as_bytes().to_vec(),
            Err(e) => id_failure = Some(e),
        }
    }
    comm.broadcast_bytes(0, &mut id_bytes)
        .map_err(tp::TpError::from)?;
    if let Some(e) = id_failure {
        return Err(e.into());
    }
    if id_bytes.is_empty() {
        return Err(Error::Tp(tp::TpError::RankFailed {
            rank: 0,
            message: "it could not create the NCCL unique id (see its log)".to_owned(),
        }));
    }
    let id = NcclId::from_bytes(&id_bytes)?;
    let opened = CudaBackend::with_config(&cuda_config(config, base + rank));
    let status = match &opened {
        Ok(_) => vec![GPU_OPENED],
        Err(e) => [&[GPU_FAILED][..], e.to_string().as_bytes()].concat(),
    };
    let statuses = comm.all_gather_bytes(&status).map_err(tp::TpError::from)?;
    let mut backend = opened?;
    if let Some((failed, status)) = statuses
        .iter()
        .enumerate()
        .find(|(_, s)| s.first() != Some(&GPU_OPENED))
    {
        return Err(Error::Tp(tp::TpError::RankFailed {
            rank: failed,
            message: String::from_utf8_lossy(status.get(1..).unwrap_or_default()).into_owned(),
        }));
    }
    backend.join_nccl(&id, rank, n, timeout)?;
    Ok(backend)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        let dir = std::env::var_os("ALLAM_FIXTURES").map_or_else(
            || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures"),
            PathBuf::from,
        );
        assert!(
            dir.join("tiny-allam").is_dir(),
            "test fixtures not found at {} (set ALLAM_FIXTURES)",
            dir.display()
        );
        dir
    }

    fn tiny_group(device: Device, world_size: usize) -> (GroupConfig, Tokenizer) {
        let tokenizer = Tokenizer::from_dir(&fixtures().join("tiny-allam")).expect("tokenizer");
        let config = GroupConfig {
            weights: Weights::Dummy {
                config: Box::new(ModelConfig::preset("tiny").expect("preset")),
                seed: 1,
            },
            device,
            engine: allam_engine::EngineConfig::default(),
            progress: ProgressMode::Never,
            cuda_graphs: None,
            tp: TpConfig {
                world_size,
                ..TpConfig::single()
            },
        };
        (config, tokenizer)
    }

    /// `--device cuda --tp 2` used to be refused as "not yet"; now it gets as far as the
    /// device check. On a machine without an NVIDIA driver (CI) that is the CUDA backend's
    /// one-sentence error, before any rank or socket exists; where a driver exists it must
    /// not be the old refusal either (one GPU: too few GPUs; more: NCCL or a start).
    #[test]
    fn cuda_tensor_parallelism_fails_with_the_device_error_not_a_refusal() {
        let (config, tokenizer) = tiny_group(Device::Cuda(0), 2);
        match start_group(&config, tokenizer) {
            Err(Error::CudaBackend(allam_backend_cuda::Error::NoDriver)) => {
                let msg = allam_backend_cuda::Error::NoDriver.to_string();
                assert!(msg.contains("--device cpu"), "{msg}");
                assert_eq!(msg.matches(". ").count(), 0, "one sentence: {msg}");
            }
            Err(other) => {
                let msg = other.to_string();
                assert!(!msg.contains("does not have yet"), "{msg}");
                assert!(
                    matches!(other, Error::CudaBackend(_)),
                    "a device or NCCL error, not {msg}"
                );
            }
            Ok(_) => {} // two GPUs and NCCL: the group started
        }
    }

    #[test]
    fn nccl_for_one_rank_needs_a_gpu() {
        let (config, tokenizer) = tiny_group(Device::Cpu, 1);
        let err = start_group_with(&config, tokenizer, Collectives::Nccl)
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|m| m.contains("NCCL needs --device cuda")),
            "{err:?}"
        );
        let (config, tokenizer) = tiny_group(Device::Cuda(0), 1);
        match start_group_with(&config, tokenizer, Collectives::Nccl) {
            // No driver (CI), no NCCL, or no GPU: each is the backend's clean error.
            Err(Error::CudaBackend(_)) | Ok(_) => {}
            Err(other) => panic!("expected a CUDA backend error, got {other}"),
        }
    }

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
