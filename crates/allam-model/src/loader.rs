//! Turning a `WeightSource` into backend weights: shape checks against the config, q/k/v and
//! gate/up fused into one `[out, in]` weight each (rows concatenated on the host), the RoPE
//! table, and an optional progress bar.
//!
//! Fusing here, once, lets each layer run one matmul for attention inputs and one for the MLP
//! input. Rows concatenate because linear weights are `[out, in]`: the fused output row is
//! `[q | k | v]` and `[gate | up]`, the layouts `allam_backend::Backend` documents.
//!
//! Under tensor parallelism (a backend whose `world_size()` exceeds 1) each tensor's full
//! shape is still checked against the config, but only this rank's rows or columns are read
//! (`shard.rs` says which) and uploaded: a rank holds about 1/N of the weights.

use std::borrow::Cow;
use std::io::IsTerminal;
use std::ops::Range;
use std::path::Path;

use allam_backend::{decode_to_f32, Backend, DType, Weight};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::dummy::DummySource;
use crate::model::LayerWeights;
use crate::shard::{ShardPlan, TpShard};
use crate::source::{SafetensorsSource, WeightSource};
use crate::tensor_names::{self, checkpoint_tensors};
use crate::{rope, Error, Model, ModelConfig};

/// Where the weights come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadFormat {
    /// `model.safetensors` or a sharded index in the model directory.
    #[default]
    Safetensors,
    /// Random weights for the directory's `config.json` (vLLM's `--load-format dummy`).
    Dummy,
}

/// When to draw a progress bar on stderr while loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProgressMode {
    /// Only when stderr is a terminal.
    #[default]
    Auto,
    Always,
    Never,
}

/// Options of [`Model::load`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoadOptions {
    pub format: LoadFormat,
    pub progress: ProgressMode,
    /// Seed of [`LoadFormat::Dummy`] weights.
    pub dummy_seed: u64,
}

impl Model {
    /// Loads `dir/config.json` and the weights `opts.format` names onto `backend`.
    pub fn load(dir: &Path, backend: &mut dyn Backend, opts: &LoadOptions) -> Result<Model, Error> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        match opts.format {
            LoadFormat::Safetensors => {
                let source = SafetensorsSource::open(dir)?;
                Model::from_source(config, &source, backend, opts.progress)
            }
            LoadFormat::Dummy => {
                let source = DummySource::new(&config, opts.dummy_seed);
                Model::from_source(config, &source, backend, opts.progress)
            }
        }
    }

    /// Random weights for `config` (see `dummy.rs` for the distribution); no files.
    pub fn from_config_dummy(
        config: ModelConfig,
        backend: &mut dyn Backend,
        seed: u64,
    ) -> Result<Model, Error> {
        config.validate()?;
        let source = DummySource::new(&config, seed);
        Model::from_source(config, &source, backend, ProgressMode::Never)
    }

    /// Loads every tensor `config` implies from `source`: all of it at world size 1, this
    /// rank's slices when `backend` is one rank of a tensor-parallel group
    /// ([`TpShard::of`]). A config the group cannot split fails here, before any read.
    pub fn from_source(
        config: ModelConfig,
        source: &dyn WeightSource,
        backend: &mut dyn Backend,
        progress: ProgressMode,
    ) -> Result<Model, Error> {
        config.validate()?;
        let plan = ShardPlan::new(&config, TpShard::of(backend))?;
        let bar = progress_bar(
            progress,
            checkpoint_tensors(&config).len() as u64,
            source.location(),
        );
        let mut loader = Loader {
            source,
            backend,
            bar: &bar,
        };
        let (h, q, kv, inter, vocab) = (
            config.hidden_size,
            config.q_dim(),
            config.kv_dim(),
            config.intermediate_size,
            config.vocab_size,
        );
        let embed = loader.rows(&tensor_names::embed(), &[vocab, h], plan.vocab.clone())?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let name = |leaf| tensor_names::layer(i, leaf);
            layers.push(LayerWeights {
                input_norm: loader.single(&name("input_layernorm"), &[h])?,
                qkv: loader.fused(
                    &name("self_attn.qkv_proj"),
                    &[
                        (name("self_attn.q_proj"), q, plan.q_rows.clone()),
                        (name("self_attn.k_proj"), kv, plan.kv_rows.clone()),
                        (name("self_attn.v_proj"), kv, plan.kv_rows.clone()),
                    ],
                    h,
                )?,
                o_proj: loader.cols(&name("self_attn.o_proj"), &[h, q], plan.q_rows.clone())?,
                post_norm: loader.single(&name("post_attention_layernorm"), &[h])?,
                gate_up: loader.fused(
                    &name("mlp.gate_up_proj"),
                    &[
                        (name("mlp.gate_proj"), inter, plan.inter.clone()),
                        (name("mlp.up_proj"), inter, plan.inter.clone()),
                    ],
                    h,
                )?,
                down: loader.cols(&name("mlp.down_proj"), &[h, inter], plan.inter.clone())?,
            });
        }
        let final_norm = loader.single(&tensor_names::final_norm(), &[h])?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(loader.rows(&tensor_names::lm_head(), &[vocab, h], plan.vocab.clone())?)
        };
        let table = rope::rope_table(&config);
        let rope_table = backend
            .upload_rope_table(config.max_position_embeddings, config.head_dim, &table)
            .map_err(Error::backend("uploading the RoPE table"))?;
        bar.finish_and_clear();
        if progress == ProgressMode::Always {
            eprintln!(
                "loaded {} parameters from {}{}",
                config.num_parameters(),
                source.location().display(),
                if plan.shard.world_size > 1 {
                    format!(
                        " (rank {} of {}: its slices only)",
                        plan.shard.rank, plan.shard.world_size
                    )
                } else {
                    String::new()
                }
            );
        }
        Ok(Model::new(
            config, plan, embed, layers, final_norm, lm_head, rope_table,
        ))
    }
}

fn progress_bar(mode: ProgressMode, len: u64, location: &Path) -> ProgressBar {
    let show = match mode {
        ProgressMode::Auto => std::io::stderr().is_terminal(),
        ProgressMode::Always => true,
        ProgressMode::Never => false,
    };
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} tensors ({elapsed})")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(format!("loading {}", location.display()));
    bar
}

struct Loader<'a> {
    source: &'a dyn WeightSource,
    backend: &'a mut dyn Backend,
    bar: &'a ProgressBar,
}

impl<'a> Loader<'a> {
    /// Checks `name`'s full shape against the config; returns its dtype and file.
    fn check(&self, name: &str, shape: &[usize]) -> Result<DType, Error> {
        let meta = self.source.meta(name)?;
        if meta.shape != shape {
            return Err(Error::TensorShape {
                tensor: name.to_owned(),
                path: meta.file,
                expected: shape.to_vec(),
                actual: meta.shape,
            });
        }
        Ok(meta.dtype)
    }

    /// Shape-checks `name` and reads its rows `rows`.
    fn read_rows(
        &self,
        name: &str,
        shape: &[usize],
        rows: Range<usize>,
    ) -> Result<(DType, Cow<'a, [u8]>), Error> {
        let source: &'a dyn WeightSource = self.source;
        let dtype = self.check(name, shape)?;
        let bytes = source.read_rows(name, rows)?;
        self.bar.inc(1);
        Ok((dtype, bytes))
    }

    fn upload(
        &mut self,
        name: &str,
        dtype: DType,
        shape: &[usize],
        bytes: &[u8],
    ) -> Result<Weight, Error> {
        let weight = self.backend.upload_weight(name, dtype, shape, bytes);
        weight.map_err(Error::backend(format!("uploading tensor `{name}`")))
    }

    /// A replicated tensor: all of it on every rank.
    fn single(&mut self, name: &str, shape: &[usize]) -> Result<Weight, Error> {
        let rows = shape.first().copied().unwrap_or(1);
        let (dtype, bytes) = self.read_rows(name, shape, 0..rows)?;
        self.upload(name, dtype, shape, &bytes)
    }

    /// Rows `rows` of a 2-D `[rows, cols]` tensor (column-parallel: a vocabulary slice).
    fn rows(
        &mut self,
        name: &str,
        shape: &[usize; 2],
        rows: Range<usize>,
    ) -> Result<Weight, Error> {
        let local = [rows.len(), shape[1]];
        let (dtype, bytes) = self.read_rows(name, shape, rows)?;
        self.upload(name, dtype, &local, &bytes)
    }

    /// Columns `cols` of a 2-D `[rows, cols]` tensor (row-parallel: o_proj, down_proj).
    fn cols(
        &mut self,
        name: &str,
        shape: &[usize; 2],
        cols: Range<usize>,
    ) -> Result<Weight, Error> {
        let source: &'a dyn WeightSource = self.source;
        let dtype = self.check(name, shape)?;
        let local = [shape[0], cols.len()];
        let bytes = source.read_cols(name, cols)?;
        self.bar.inc(1);
        self.upload(name, dtype, &local, &bytes)
    }

    /// Concatenates rows `range` of each part (each `[total_rows, cols]`) into one weight
    /// `fused_name`.
    fn fused(
        &mut self,
        fused_name: &str,
        parts: &[(String, usize, Range<usize>)],
        cols: usize,
    ) -> Result<Weight, Error> {
        let mut pieces = Vec::with_capacity(parts.len());
        for (name, rows, range) in parts {
            pieces.push(self.read_rows(name, &[*rows, cols], range.clone())?);
        }
        let total_rows: usize = parts.iter().map(|(_, _, range)| range.len()).sum();
        let first_dtype = pieces[0].0;
        let (dtype, bytes) = if pieces.iter().all(|(d, _)| *d == first_dtype) {
            (
                first_dtype,
                pieces
                    .iter()
                    .flat_map(|(_, b)| b.iter().copied())
                    .collect::<Vec<u8>>(),
            )
        } else {
            // Mixed dtypes (never seen in practice): widen all to f32 rather than guess.
            let mut out = Vec::new();
            for (d, b) in &pieces {
                let values = decode_to_f32(*d, b).expect("shape-checked bytes are whole elements");
                out.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            }
            (DType::F32, out)
        };
        drop(pieces);
        let weight = self
            .backend
            .upload_weight(fused_name, dtype, &[total_rows, cols], &bytes);
        weight.map_err(Error::backend(format!(
            "uploading fused tensor `{fused_name}`"
        )))
    }
}
