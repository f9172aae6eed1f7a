//! The model crate's error type. Every variant names what failed (config field, tensor,
//! file) so an operator can fix a checkpoint from the message alone.

use std::path::PathBuf;

/// Loading or running the model failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON file (config.json, the shard index) is not valid JSON.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A config field is missing or has a wrong type or value.
    #[error("{path}: field `{field}`: {detail}")]
    ConfigField {
        path: PathBuf,
        field: String,
        detail: String,
    },
    /// The config describes a model this crate does not run.
    #[error("{path}: field `{field}` is {value}; only LlamaForCausalLM (model_type \"llama\") is supported")]
    UnsupportedArchitecture {
        path: PathBuf,
        field: &'static str,
        value: String,
    },
    /// A config feature this crate does not implement (e.g. attention bias, yarn RoPE).
    #[error("{path}: field `{field}` = {value} is not supported: {detail}")]
    UnsupportedFeature {
        path: PathBuf,
        field: &'static str,
        value: String,
        detail: &'static str,
    },
    /// A `model.safetensors.index.json` is malformed.
    #[error("{path}: {detail}")]
    Index { path: PathBuf, detail: String },
    /// No weights were found in the model directory.
    #[error("{dir}: no model.safetensors or model.safetensors.index.json")]
    NoWeights { dir: PathBuf },
    /// A safetensors file is corrupt or truncated.
    #[error("{path}: corrupt safetensors file: {detail}")]
    Safetensors { path: PathBuf, detail: String },
    /// A tensor the architecture needs is absent.
    #[error("tensor `{tensor}` is missing from {path}")]
    MissingTensor { tensor: String, path: PathBuf },
    /// A tensor has the wrong shape for the config.
    #[error("tensor `{tensor}` in {path} has shape {actual:?}, the config implies {expected:?}")]
    TensorShape {
        tensor: String,
        path: PathBuf,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    /// A tensor has a dtype other than bf16, f16 or f32.
    #[error("tensor `{tensor}` in {path} has dtype {dtype}; expected BF16, F16 or F32")]
    TensorDType {
        tensor: String,
        path: PathBuf,
        dtype: String,
    },
    /// A row range outside a tensor was requested.
    #[error("tensor `{tensor}` in {path}: rows {start}..{end} outside its {rows} rows")]
    RowRange {
        tensor: String,
        path: PathBuf,
        start: usize,
        end: usize,
        rows: usize,
    },
    /// A column range outside a 2-D tensor was requested (or the tensor is not 2-D).
    #[error("tensor `{tensor}` in {path}: columns {start}..{end} of a tensor of shape {shape:?}")]
    ColumnRange {
        tensor: String,
        path: PathBuf,
        start: usize,
        end: usize,
        shape: Vec<usize>,
    },
    /// The model cannot be split over the tensor-parallel group.
    #[error("tensor parallelism over {world_size} ranks: `{field}` = {value} {detail}")]
    TensorParallel {
        world_size: usize,
        field: &'static str,
        value: usize,
        detail: String,
    },
    /// `--preset` named no known preset.
    #[error("unknown model preset `{name}`; known presets: {known}")]
    UnknownPreset { name: String, known: String },
    /// A backend op failed.
    #[error("{context}: {source}")]
    Backend {
        context: String,
        #[source]
        source: allam_backend::Error,
    },
}

impl Error {
    /// A short stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Io { .. } => "io",
            Error::Json { .. } => "json",
            Error::ConfigField { .. } => "config_field",
            Error::UnsupportedArchitecture { .. } => "unsupported_architecture",
            Error::UnsupportedFeature { .. } => "unsupported_feature",
            Error::Index { .. } => "shard_index",
            Error::NoWeights { .. } => "no_weights",
            Error::Safetensors { .. } => "corrupt_safetensors",
            Error::MissingTensor { .. } => "missing_tensor",
            Error::TensorShape { .. } => "tensor_shape",
            Error::TensorDType { .. } => "tensor_dtype",
            Error::RowRange { .. } => "row_range",
            Error::ColumnRange { .. } => "column_range",
            Error::TensorParallel { .. } => "tensor_parallel",
            Error::UnknownPreset { .. } => "unknown_preset",
            Error::Backend { source, .. } => source.reason(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn backend(
        context: impl Into<String>,
    ) -> impl FnOnce(allam_backend::Error) -> Error {
        let context = context.into();
        move |source| Error::Backend { context, source }
    }
}
