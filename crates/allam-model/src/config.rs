//! `ModelConfig`: a Llama `config.json` with the defaults transformers' `LlamaConfig` applies.
//!
//! Deviation from transformers, on purpose: the five size fields (`hidden_size`,
//! `intermediate_size`, `num_hidden_layers`, `num_attention_heads`, `vocab_size`) are required.
//! transformers would silently default them to Llama-7B sizes, which turns a truncated config
//! into a confusing shape error at weight load; here the message names the missing field.
//! Every other field takes the `LlamaConfig.__init__` default. Both the 4.x RoPE keys
//! (`rope_theta`, `rope_scaling`) and the 5.x `rope_parameters` object are read.

use std::path::{Path, PathBuf};

use allam_backend::AttentionLayout;
use allam_types::TokenId;
use serde_json::{json, Map, Value};

use crate::Error;

/// How RoPE frequencies are rescaled for long context (`rope_scaling` in config.json).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum RopeScaling {
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1 wavelength-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// A Llama-architecture model configuration (field names and meaning as in transformers).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architectures: Vec<String>,
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Absent in the file: `num_attention_heads` (multi-head attention).
    pub num_key_value_heads: usize,
    /// Absent in the file: `hidden_size / num_attention_heads`.
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub rms_norm_eps: f64,
    pub hidden_act: String,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    /// `torch_dtype` (4.x) or `dtype` (5.x), as written.
    pub torch_dtype: Option<String>,
    pub bos_token_id: Option<TokenId>,
    /// `eos_token_id` may be one id or a list in config.json; always a list here.
    pub eos_token_ids: Vec<TokenId>,
    pub pad_token_id: Option<TokenId>,
    pub initializer_range: f64,
    pub pretraining_tp: usize,
    pub attention_dropout: f64,
    pub use_cache: bool,
}

/// The architecture name this crate runs.
pub const LLAMA_ARCHITECTURE: &str = "LlamaForCausalLM";

struct Fields<'a> {
    obj: &'a Map<String, Value>,
    path: &'a Path,
}

impl Fields<'_> {
    fn err(&self, field: &str, detail: impl Into<String>) -> Error {
        Error::ConfigField {
            path: self.path.to_path_buf(),
            field: field.to_owned(),
            detail: detail.into(),
        }
    }

    /// `None` when absent or JSON null (transformers treats both as "use the default").
    fn get(&self, field: &str) -> Option<&Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn usize_opt(&self, field: &str) -> Result<Option<usize>, Error> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    self.err(field, format!("expected a non-negative integer, got {v}"))
                }),
        }
    }

    fn usize_req(&self, field: &str) -> Result<usize, Error> {
        self.usize_opt(field)?
            .ok_or_else(|| self.err(field, "missing (required: it fixes tensor shapes)"))
    }

    fn f64_or(&self, field: &str, default: f64) -> Result<f64, Error> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(field, format!("expected a number, got {v}"))),
        }
    }

    fn bool_or(&self, field: &str, default: bool) -> Result<bool, Error> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(field, format!("expected true or false, got {v}"))),
        }
    }

    fn string_opt(&self, field: &str) -> Result<Option<String>, Error> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(|s| Some(s.to_owned()))
                .ok_or_else(|| self.err(field, format!("expected a string, got {v}"))),
        }
    }

    fn token_opt(&self, field: &str, default: Option<TokenId>) -> Result<Option<TokenId>, Error> {
        if !self.obj.contains_key(field) {
            return Ok(default);
        }
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| TokenId::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected a token id, got {v}"))),
        }
    }
}

impl ModelConfig {
    /// Reads and validates `path` (a `config.json`).
    pub fn from_file(path: &Path) -> Result<ModelConfig, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        ModelConfig::from_json_str(&text, path)
    }

    /// Parses and validates config JSON; `path` is only used in messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<ModelConfig, Error> {
        let value: Value = serde_json::from_str(text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let obj = value.as_object().ok_or_else(|| Error::ConfigField {
            path: path.to_path_buf(),
            field: "(top level)".to_owned(),
            detail: "expected a JSON object".to_owned(),
        })?;
        let config = ModelConfig::from_fields(&Fields { obj, path })?;
        config.validate_at(path)?;
        Ok(config)
    }

    fn from_fields(f: &Fields<'_>) -> Result<ModelConfig, Error> {
        let architectures = match f.get("architectures") {
            None => Vec::new(),
            Some(v) => v
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .map(|s| s.as_str().map(str::to_owned))
                        .collect::<Option<Vec<_>>>()
                })
                .ok_or_else(|| {
                    f.err(
                        "architectures",
                        format!("expected a list of strings, got {v}"),
                    )
                })?,
        };
        let model_type = f.string_opt("model_type")?.unwrap_or_default();
        let hidden_size = f.usize_req("hidden_size")?;
        let num_attention_heads = f.usize_req("num_attention_heads")?;
        let num_key_value_heads = f
            .usize_opt("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        let head_dim = match f.usize_opt("head_dim")? {
            Some(d) => d,
            None if num_attention_heads > 0 => hidden_size / num_attention_heads,
            None => 0,
        };
        let eos_token_ids = match f.obj.get("eos_token_id") {
            None => vec![2],
            Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().and_then(|n| TokenId::try_from(n).ok()))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| f.err("eos_token_id", "expected token ids"))?,
            Some(v) => vec![v
                .as_u64()
                .and_then(|n| TokenId::try_from(n).ok())
                .ok_or_else(|| f.err("eos_token_id", format!("expected a token id, got {v}")))?],
        };
        // 5.x nests RoPE settings in `rope_parameters`; 4.x has top-level keys.
        let rope_parameters = f.get("rope_parameters").and_then(Value::as_object);
        let rope_theta = match rope_parameters.and_then(|p| p.get("rope_theta")) {
            Some(v) => v.as_f64().ok_or_else(|| {
                f.err(
                    "rope_parameters.rope_theta",
                    format!("expected a number, got {v}"),
                )
            })?,
            None => f.f64_or("rope_theta", 10000.0)?,
        };
        let rope_scaling = match (f.get("rope_scaling"), rope_parameters) {
            (Some(v), _) => parse_rope_scaling(f, "rope_scaling", v)?,
            (None, Some(p)) => parse_rope_scaling(f, "rope_parameters", &Value::Object(p.clone()))?,
            (None, None) => None,
        };
        let torch_dtype = match f.string_opt("torch_dtype")? {
            Some(d) => Some(d),
            None => f.string_opt("dtype")?,
        };
        Ok(ModelConfig {
            architectures,
            model_type,
            hidden_size,
            intermediate_size: f.usize_req("intermediate_size")?,
            num_hidden_layers: f.usize_req("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: f.usize_req("vocab_size")?,
            max_position_embeddings: f.usize_opt("max_position_embeddings")?.unwrap_or(2048),
            rope_theta,
            rope_scaling,
            rms_norm_eps: f.f64_or("rms_norm_eps", 1e-6)?,
            hidden_act: f
                .string_opt("hidden_act")?
                .unwrap_or_else(|| "silu".to_owned()),
            attention_bias: f.bool_or("attention_bias", false)?,
            mlp_bias: f.bool_or("mlp_bias", false)?,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            torch_dtype,
            bos_token_id: f.token_opt("bos_token_id", Some(1))?,
            eos_token_ids,
            pad_token_id: f.token_opt("pad_token_id", None)?,
            initializer_range: f.f64_or("initializer_range", 0.02)?,
            pretraining_tp: f.usize_opt("pretraining_tp")?.unwrap_or(1),
            attention_dropout: f.f64_or("attention_dropout", 0.0)?,
            use_cache: f.bool_or("use_cache", true)?,
        })
    }

    /// Checks the architecture and that the sizes are consistent and supported.
    pub fn validate(&self) -> Result<(), Error> {
        self.validate_at(Path::new("<model config>"))
    }

    fn validate_at(&self, path: &Path) -> Result<(), Error> {
        let unsupported_arch = |field, value: String| Error::UnsupportedArchitecture {
            path: path.to_path_buf(),
            field,
            value,
        };
        if !self.architectures.is_empty()
            && !self.architectures.iter().any(|a| a == LLAMA_ARCHITECTURE)
        {
            return Err(unsupported_arch(
                "architectures",
                format!("{:?}", self.architectures),
            ));
        }
        if !self.model_type.is_empty() && self.model_type != "llama" {
            return Err(unsupported_arch(
                "model_type",
                format!("{:?}", self.model_type),
            ));
        }
        if self.architectures.is_empty() && self.model_type.is_empty() {
            return Err(Error::ConfigField {
                path: path.to_path_buf(),
                field: "model_type".to_owned(),
                detail: "missing, and no `architectures` either: cannot tell this is a Llama model"
                    .to_owned(),
            });
        }
        let field_err = |field: &str, detail: String| Error::ConfigField {
            path: path.to_path_buf(),
            field: field.to_owned(),
            detail,
        };
        for (field, value) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return Err(field_err(field, "must be positive, got 0".to_owned()));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(field_err(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads = {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(field_err(
                "head_dim",
                format!("RoPE needs an even head_dim, got {}", self.head_dim),
            ));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return Err(field_err(
                "rms_norm_eps",
                format!("must be positive, got {}", self.rms_norm_eps),
            ));
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return Err(field_err(
                "rope_theta",
                format!("must be positive, got {}", self.rope_theta),
            ));
        }
        let unsupported = |field, value: String, detail| Error::UnsupportedFeature {
            path: path.to_path_buf(),
            field,
            value,
            detail,
        };
        if self.hidden_act != "silu" {
            return Err(unsupported(
                "hidden_act",
                format!("{:?}", self.hidden_act),
                "only silu is implemented",
            ));
        }
        if self.attention_bias {
            return Err(unsupported(
                "attention_bias",
                "true".to_owned(),
                "biased projections are not implemented",
            ));
        }
        if self.mlp_bias {
            return Err(unsupported(
                "mlp_bias",
                "true".to_owned(),
                "biased projections are not implemented",
            ));
        }
        Ok(())
    }

    /// Query heads times head size (the q part of the fused qkv projection).
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// KV heads times head size (each of the k and v parts).
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Attention geometry at tensor-parallel size 1.
    pub fn attention_layout(&self) -> AttentionLayout {
        AttentionLayout {
            n_heads: self.num_attention_heads,
            n_kv_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            softmax_scale: (1.0 / (self.head_dim as f64).sqrt()) as f32,
        }
    }

    /// Parameters of the checkpoint (tied embeddings counted once).
    pub fn num_parameters(&self) -> u64 {
        let h = self.hidden_size as u64;
        let per_layer = 2 * h
            + h * (self.q_dim() as u64 + 2 * self.kv_dim() as u64)
            + self.q_dim() as u64 * h
            + 3 * h * self.intermediate_size as u64;
        let embed = self.vocab_size as u64 * h;
        let lm_head = if self.tie_word_embeddings { 0 } else { embed };
        embed + lm_head + h + self.num_hidden_layers as u64 * per_layer
    }

    /// The config as transformers-4.x `config.json` (what [`crate::write_synthetic_checkpoint`] writes).
    pub fn to_json(&self) -> Value {
        let rope_scaling = match &self.rope_scaling {
            None => Value::Null,
            Some(RopeScaling::Linear { factor }) => {
                json!({"rope_type": "linear", "factor": factor})
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
        };
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        json!({
            "architectures": if self.architectures.is_empty() { vec![LLAMA_ARCHITECTURE.to_owned()] } else { self.architectures.clone() },
            "model_type": if self.model_type.is_empty() { "llama" } else { self.model_type.as_str() },
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": self.hidden_act,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.torch_dtype.clone().unwrap_or_else(|| "bfloat16".to_owned()),
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "initializer_range": self.initializer_range,
            "pretraining_tp": self.pretraining_tp,
            "attention_dropout": self.attention_dropout,
            "use_cache": self.use_cache,
        })
    }
}

fn parse_rope_scaling(
    f: &Fields<'_>,
    field: &'static str,
    v: &Value,
) -> Result<Option<RopeScaling>, Error> {
    let obj = v
        .as_object()
        .ok_or_else(|| f.err(field, format!("expected an object, got {v}")))?;
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| -> Result<f64, Error> {
        obj.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| f.err(&format!("{field}.{key}"), "missing or not a number"))
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: num("factor")?,
        })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        })),
        other => Err(Error::UnsupportedFeature {
            path: PathBuf::from(f.path),
            field,
            value: format!("{other:?}"),
            detail: "only default, linear and llama3 RoPE are implemented",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelConfig, Error> {
        ModelConfig::from_json_str(text, Path::new("dir/config.json"))
    }

    const MINIMAL: &str = r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 100,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 50}"#;

    #[test]
    fn absent_fields_take_llama_config_defaults() {
        let c = parse(MINIMAL).expect("minimal config");
        assert_eq!(c.num_key_value_heads, 4, "defaults to num_attention_heads");
        assert_eq!(c.head_dim, 16, "hidden_size / num_attention_heads");
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.rms_norm_eps, 1e-6);
        assert_eq!(c.max_position_embeddings, 2048);
        assert!(!c.tie_word_embeddings && !c.attention_bias && !c.mlp_bias);
        assert_eq!(c.hidden_act, "silu");
        assert_eq!(
            (c.bos_token_id, c.eos_token_ids.clone(), c.pad_token_id),
            (Some(1), vec![2], None)
        );
        assert_eq!(c.rope_scaling, None);
    }

    #[test]
    fn explicit_and_v5_fields_are_read() {
        let text = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 100,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "vocab_size": 50, "eos_token_id": [2, 7], "bos_token_id": null, "dtype": "bfloat16",
            "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}}"#;
        let c = parse(text).expect("config");
        assert_eq!((c.num_key_value_heads, c.head_dim), (2, 32));
        assert_eq!(c.eos_token_ids, vec![2, 7]);
        assert_eq!(c.bos_token_id, None);
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
        assert_eq!(c.torch_dtype.as_deref(), Some("bfloat16"));
    }

    #[test]
    fn to_json_round_trips() {
        let mut c = parse(MINIMAL).expect("config");
        c.rope_scaling = Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        });
        c.torch_dtype = Some("bfloat16".to_owned());
        c.architectures = vec![LLAMA_ARCHITECTURE.to_owned()];
        let back = parse(&c.to_json().to_string()).expect("round trip");
        assert_eq!(back, c);
    }

    #[test]
    fn errors_name_the_file_and_field() {
        let cases = [
            (r#"{"model_type": "llama"}"#, "`hidden_size`"),
            (
                &MINIMAL.replace("\"vocab_size\": 50", "\"vocab_size\": -1"),
                "`vocab_size`",
            ),
            (&MINIMAL.replace("\"llama\"", "\"mistral\""), "`model_type`"),
            (
                &MINIMAL.replace("}", ", \"hidden_act\": \"gelu\"}"),
                "`hidden_act`",
            ),
            (
                &MINIMAL.replace("}", ", \"attention_bias\": true}"),
                "`attention_bias`",
            ),
            (
                &MINIMAL.replace(
                    "}",
                    ", \"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 4.0}}",
                ),
                "`rope_scaling`",
            ),
            (
                &MINIMAL.replace("}", ", \"num_key_value_heads\": 3}"),
                "`num_key_value_heads`",
            ),
            (
                &MINIMAL.replace("\"model_type\": \"llama\",", ""),
                "`model_type`",
            ),
        ];
        for (text, field) in cases {
            let msg = parse(text).expect_err(field).to_string();
            assert!(
                msg.contains(field) && msg.contains("dir/config.json"),
                "want {field}: {msg}"
            );
        }
        let msg = parse("[1, 2").expect_err("bad json").to_string();
        assert!(
            msg.contains("dir/config.json") && msg.contains("invalid JSON"),
            "{msg}"
        );
    }
}
