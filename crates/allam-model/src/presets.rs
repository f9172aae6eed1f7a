//! Named model shapes for dummy weights (`--load-format dummy`) and `allam synth-model`.
//! Everything not listed is the ALLaM-2-7b value (Llama defaults, eps 1e-5, theta 10000,
//! bos 1, eos 2, untied embeddings).

use crate::{Error, ModelConfig, LLAMA_ARCHITECTURE};

/// Every preset name, in the order `--help` lists them.
pub const PRESET_NAMES: &[&str] = &["allam-7b", "allam-100m", "tiny", "demo"];

struct Shape {
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    intermediate: usize,
    vocab: usize,
}

fn shape(name: &str) -> Option<Shape> {
    let s = |hidden, layers, heads, kv_heads, intermediate, vocab| Shape {
        hidden,
        layers,
        heads,
        kv_heads,
        intermediate,
        vocab,
    };
    Some(match name {
        // ALLaM-2-7b (see fixtures/README.md §2.1).
        "allam-7b" => s(4096, 32, 32, 32, 11008, 64000),
        // ~100.9M parameters with the real 64k vocabulary; GQA 2:1 so dummy runs exercise it.
        "allam-100m" => s(512, 12, 8, 4, 1408, 64000),
        // The fixtures' tiny-allam.
        "tiny" => s(256, 4, 8, 8, 688, 4000),
        // The built-in demo: quick on two cores; callers set `vocab_size` to their tokenizer's.
        "demo" => s(256, 4, 8, 4, 704, 4000),
        _ => return None,
    })
}

impl ModelConfig {
    /// The config of preset `name` (one of [`PRESET_NAMES`]).
    pub fn preset(name: &str) -> Result<ModelConfig, Error> {
        let shape = shape(name).ok_or_else(|| Error::UnknownPreset {
            name: name.to_owned(),
            known: PRESET_NAMES.join(", "),
        })?;
        Ok(ModelConfig {
            architectures: vec![LLAMA_ARCHITECTURE.to_owned()],
            model_type: "llama".to_owned(),
            hidden_size: shape.hidden,
            intermediate_size: shape.intermediate,
            num_hidden_layers: shape.layers,
            num_attention_heads: shape.heads,
            num_key_value_heads: shape.kv_heads,
            head_dim: shape.hidden / shape.heads,
            vocab_size: shape.vocab,
            max_position_embeddings: 4096,
            rope_theta: 10000.0,
            rope_scaling: None,
            rms_norm_eps: 1e-5,
            hidden_act: "silu".to_owned(),
            attention_bias: false,
            mlp_bias: false,
            tie_word_embeddings: false,
            torch_dtype: Some("bfloat16".to_owned()),
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            pad_token_id: None,
            initializer_range: 0.02,
            pretraining_tp: 1,
            attention_dropout: 0.0,
            use_cache: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_is_valid_and_sized_as_documented() {
        for name in PRESET_NAMES {
            let config = ModelConfig::preset(name).expect("listed preset exists");
            config.validate().expect("preset is valid");
        }
        let params = |n| ModelConfig::preset(n).expect("preset").num_parameters();
        // Independent count for ALLaM-7B: 2 * 64000 * 4096 embeddings + 32 layers of
        // (4 * 4096^2 attention + 3 * 4096 * 11008 MLP + 2 * 4096 norms) + 4096 final norm.
        assert_eq!(
            params("allam-7b"),
            2 * 64000 * 4096 + 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096) + 4096
        );
        assert_eq!(params("tiny"), 5_212_416, "fixtures README §2.2");
        let m100 = params("allam-100m");
        assert!((95_000_000..=105_000_000).contains(&m100), "{m100}");
        let err = ModelConfig::preset("allam-70b").expect_err("no such preset");
        assert!(
            err.to_string().contains("allam-70b") && err.to_string().contains("tiny"),
            "{err}"
        );
    }
}
