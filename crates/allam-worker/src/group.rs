//! Starting a worker group's engine: pick the backend for `--device`, load (or synthesize)
//! the model onto it, size the KV cache and start the engine thread.
//!
//! Invariant: weights are read and uploaded on the calling thread before the engine thread
//! exists, so a bad checkpoint fails start-up with the loader's message instead of failing
//! requests later.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use allam_backend::Backend;
use allam_backend_cpu::{CpuBackend, CpuBackendConfig};
use allam_backend_cuda::CudaBackend;
use allam_engine::{Engine, EngineConfig, EngineHandle};
use allam_model::{LoadFormat, LoadOptions, Model, ModelConfig, ProgressMode};
use allam_tokenizer::Tokenizer;

use crate::Error;

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
}

/// A started engine and what the front needs to know about it.
pub struct StartedGroup {
    pub engine: EngineHandle,
    pub model_config: ModelConfig,
    pub backend_description: String,
}

/// Builds the backend, loads the model and starts the engine thread.
pub fn start_group(config: &GroupConfig, tokenizer: Tokenizer) -> Result<StartedGroup, Error> {
    let kv_budget = config.engine.kv_cache_bytes.unwrap_or(1 << 30) as u64;
    let mut backend: Box<dyn Backend> = match config.device {
        Device::Cpu => Box::new(CpuBackend::new(&CpuBackendConfig {
            threads: None,
            kv_cache_budget_bytes: kv_budget,
        })?),
        Device::Cuda(ordinal) => Box::new(CudaBackend::new(ordinal)?),
    };
    let model = match &config.weights {
        Weights::Dir { dir, format } => Model::load(
            dir,
            backend.as_mut(),
            &LoadOptions {
                format: *format,
                progress: config.progress,
                dummy_seed: 0,
            },
        )?,
        Weights::Dummy { config: model_config, seed } => {
            Model::from_config_dummy((**model_config).clone(), backend.as_mut(), *seed)?
        }
    };
    let model_config = model.config().clone();
    if model_config.vocab_size < tokenizer.vocab_size() {
        return Err(Error::TokenizerMismatch {
            model_vocab: model_config.vocab_size,
            tokenizer_vocab: tokenizer.vocab_size(),
        });
    }
    let info = backend.info();
    let backend_description = format!("{} ({})", info.name, info.device);
    let engine = Engine::start(model, backend, tokenizer, config.engine.clone())?;
    Ok(StartedGroup {
        engine,
        model_config,
        backend_description,
    })
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
