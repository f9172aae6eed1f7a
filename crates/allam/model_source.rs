//! Resolves `--model` / `--preset` / neither into weights, a tokenizer and a served name;
//! writes the built-in demo model and synthetic checkpoints.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};

use allam_model::{LoadFormat, ModelConfig, ProgressMode};
use allam_tokenizer::Tokenizer;
use allam_worker::group::{Device, GroupConfig, TpConfig, TpLaunch, Weights};

use crate::cli::{self, DemoModelArgs, EngineArgs, ModelArgs, SynthModelArgs};

/// Seed of the demo model's weights: fixed, so every machine serves the same demo model.
const DEMO_SEED: u64 = 2024;

/// A resolved model: where weights come from and the tokenizer that goes with them.
pub struct ResolvedModel {
    pub weights: Weights,
    pub tokenizer: Tokenizer,
    pub served_name: String,
    pub progress: ProgressMode,
}

/// `$ALLAM_CACHE` or `~/.cache/allam-serve`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ALLAM_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache/allam-serve")
}

/// The built-in demo model, written on first use.
pub fn ensure_demo_model() -> anyhow::Result<PathBuf> {
    let dir = cache_dir().join("demo-model-v1");
    if !dir.join("model.safetensors").exists() {
        eprintln!(
            "writing the built-in demo model to {} (first run only)",
            dir.display()
        );
        write_demo_model(&dir)?;
    }
    Ok(dir)
}

/// Tokenizer trained by our own code + random weights sized to its vocabulary. Written to a
/// temporary sibling and renamed, so an interrupted first run never leaves half a model.
fn write_demo_model(dir: &Path) -> anyhow::Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let staging = parent.join(format!(".demo-model-{}", std::process::id()));
    let tokenizer = allam_tokenizer::write_demo_tokenizer(&staging)
        .with_context(|| format!("writing the demo tokenizer to {}", staging.display()))?;
    let mut config = ModelConfig::preset("demo")?;
    config.vocab_size = tokenizer.vocab_size();
    allam_model::write_synthetic_checkpoint(&config, &staging, DEMO_SEED)
        .with_context(|| format!("writing demo weights to {}", staging.display()))?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("replacing {}", dir.display()))?;
    }
    std::fs::rename(&staging, dir)
        .with_context(|| format!("moving {} to {}", staging.display(), dir.display()))?;
    Ok(())
}

fn load_tokenizer(dir: &Path) -> anyhow::Result<Tokenizer> {
    Tokenizer::from_dir(dir)
        .with_context(|| format!("loading the tokenizer from {}", dir.display()))
}

/// `--model DIR`, `--preset NAME` (dummy weights, demo tokenizer) or the demo model.
pub fn resolve(args: &ModelArgs) -> anyhow::Result<ResolvedModel> {
    let progress = if args.progress {
        ProgressMode::Always
    } else {
        ProgressMode::Auto
    };
    let format = match args.load_format {
        cli::LoadFormat::Auto => LoadFormat::Safetensors,
        cli::LoadFormat::Dummy => LoadFormat::Dummy,
    };
    if let Some(dir) = &args.model {
        if !dir.join("config.json").exists() {
            bail!(
                "--model {}: no config.json in that directory",
                dir.display()
            );
        }
        let tokenizer = load_tokenizer(dir)?;
        let served_name = args.served_model_name.clone().unwrap_or_else(|| {
            dir.file_name()
                .map_or_else(|| "model".to_owned(), |n| n.to_string_lossy().into_owned())
        });
        return Ok(ResolvedModel {
            weights: Weights::Dir {
                dir: dir.clone(),
                format,
            },
            tokenizer,
            served_name,
            progress,
        });
    }
    let demo_dir = ensure_demo_model()?;
    let tokenizer = load_tokenizer(&demo_dir)?;
    if let Some(preset) = &args.preset {
        let config = ModelConfig::preset(preset)?;
        return Ok(ResolvedModel {
            weights: Weights::Dummy {
                config: Box::new(config),
                seed: 0,
            },
            tokenizer,
            served_name: args
                .served_model_name
                .clone()
                .unwrap_or_else(|| preset.clone()),
            progress,
        });
    }
    Ok(ResolvedModel {
        weights: Weights::Dir {
            dir: demo_dir.clone(),
            format: LoadFormat::Safetensors,
        },
        tokenizer,
        served_name: args
            .served_model_name
            .clone()
            .unwrap_or_else(|| "allam-demo".to_owned()),
        progress,
    })
}

/// The engine flags as an `EngineConfig`.
pub fn engine_config(args: &EngineArgs) -> allam_engine::EngineConfig {
    allam_engine::EngineConfig {
        block_size: args.block_size,
        kv_cache_bytes: Some(args.kv_cache_memory),
        num_blocks: None,
        max_num_batched_tokens: args.max_num_batched_tokens,
        max_num_seqs: args.max_num_seqs,
        max_waiting: args.max_waiting,
        enable_prefix_caching: !args.no_prefix_caching,
        max_prefill_tokens_with_decodes: args.max_prefill_tokens_with_decodes,
        stream_buffer_events: args.stream_buffer_events,
        stream_write_timeout: args.stream_write_timeout,
        ..allam_engine::EngineConfig::default()
    }
}

pub fn group_config(
    resolved: &ResolvedModel,
    model: &ModelArgs,
    engine: &EngineArgs,
) -> anyhow::Result<GroupConfig> {
    let device: Device = model
        .device
        .parse()
        .with_context(|| format!("--device {}", model.device))?;
    let tp = if model.tp > 1 {
        let exe = std::env::current_exe().context("locating this executable to start ranks")?;
        TpConfig {
            world_size: model.tp,
            group: format!("tp-{}", std::process::id()),
            launch: TpLaunch::SpawnLocal {
                exe,
                follower_args: follower_args(model, engine),
            },
            options: allam_worker::group::GroupOptions::default(),
        }
    } else {
        TpConfig::single()
    };
    let cuda_graphs = if model.cuda_graphs {
        if device == Device::Cpu {
            bail!("--cuda-graphs needs --device cuda (the CPU backend runs every step eagerly)");
        }
        if model.cuda_graph_max_batch == 0 {
            bail!("--cuda-graph-max-batch must be at least 1");
        }
        // A decode step never holds more than --max-num-seqs sequences: larger graphs would
        // only cost memory and warm-up time.
        Some(allam_backend_cuda::CudaGraphOptions {
            max_batch: model.cuda_graph_max_batch.min(engine.max_num_seqs.max(1)),
        })
    } else {
        None
    };
    Ok(GroupConfig {
        weights: resolved.weights.clone(),
        device,
        engine: engine_config(engine),
        progress: resolved.progress,
        tp,
        cuda_graphs,
    })
}

/// The flags a spawned follower rank needs to load the same model with the same KV budget
/// (every rank allocates rank 0's block count).
fn follower_args(model: &ModelArgs, engine: &EngineArgs) -> Vec<String> {
    let mut args = Vec::new();
    if let Some(dir) = &model.model {
        args.extend(["--model".to_owned(), dir.display().to_string()]);
    }
    if let Some(preset) = &model.preset {
        args.extend(["--preset".to_owned(), preset.clone()]);
    }
    if model.load_format == cli::LoadFormat::Dummy {
        args.extend(["--load-format".to_owned(), "dummy".to_owned()]);
    }
    args.extend([
        "--device".to_owned(),
        model.device.clone(),
        "--kv-cache-memory".to_owned(),
        engine.kv_cache_memory.to_string(),
        "--block-size".to_owned(),
        engine.block_size.to_string(),
    ]);
    // Every rank must decide alike which steps replay a graph (their collectives pair up).
    if model.cuda_graphs {
        args.extend([
            "--cuda-graphs".to_owned(),
            "--cuda-graph-max-batch".to_owned(),
            model.cuda_graph_max_batch.to_string(),
        ]);
    }
    args
}

pub fn synth_model(args: SynthModelArgs) -> anyhow::Result<ExitCode> {
    let config = ModelConfig::preset(&args.preset)?;
    allam_model::write_synthetic_checkpoint(&config, &args.out, args.seed)
        .with_context(|| format!("writing {}", args.out.display()))?;
    // A checkpoint is only usable with a tokenizer: ship the demo one beside the weights.
    allam_tokenizer::write_demo_tokenizer(&args.out)
        .with_context(|| format!("writing the demo tokenizer to {}", args.out.display()))?;
    eprintln!(
        "wrote preset `{}` ({} parameters) to {}",
        args.preset,
        config.num_parameters(),
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn demo_model(args: DemoModelArgs) -> anyhow::Result<ExitCode> {
    write_demo_model(&args.out)?;
    eprintln!("wrote the demo model to {}", args.out.display());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn parse(args: &[&str]) -> Command {
        Cli::try_parse_from(std::iter::once("allam").chain(args.iter().copied()))
            .expect("valid command line")
            .command
    }

    /// A spawned rank must load the same model the same way as rank 0, graphs included: the
    /// ranks' collectives pair up only if they all capture and replay the same steps.
    #[test]
    fn follower_ranks_get_the_leaders_model_and_graph_flags() {
        let Command::Serve(args) = parse(&[
            "serve",
            "--preset",
            "tiny",
            "--device",
            "cuda:2",
            "--tp",
            "2",
            "--cuda-graphs",
            "--cuda-graph-max-batch",
            "64",
            "--block-size",
            "32",
        ]) else {
            panic!("serve parses as serve");
        };
        let follower = follower_args(&args.model, &args.engine);
        let mut line = vec![
            "worker",
            "--group",
            "g",
            "--world-size",
            "2",
            "--rank",
            "1",
            "--peers",
            "127.0.0.1:1",
        ];
        line.extend(follower.iter().map(String::as_str));
        let Command::Worker(worker) = parse(&line) else {
            panic!("worker parses as worker");
        };
        assert_eq!(worker.model.preset.as_deref(), Some("tiny"));
        assert_eq!(worker.model.device, "cuda:2");
        assert!(worker.model.cuda_graphs);
        assert_eq!(worker.model.cuda_graph_max_batch, 64);
        assert_eq!(worker.engine.block_size, 32);

        let Command::Serve(plain) = parse(&["serve", "--preset", "tiny", "--tp", "2"]) else {
            panic!("serve parses as serve");
        };
        assert!(!follower_args(&plain.model, &plain.engine).contains(&"--cuda-graphs".to_owned()));
    }
}
