//! Random weights without files (`--load-format dummy`) and synthetic checkpoints on disk
//! (`allam synth-model`). Both draw from [`DummySource`], so a synthetic checkpoint loaded
//! from disk and dummy weights with the same config and seed give bit-identical models.
//!
//! Values are bf16 (what real checkpoints hold). Each tensor's stream is seeded from the
//! seed and the tensor name and generated in 64 Ki-element chunks with their own seeds, so
//! generation is parallel yet independent of the thread count. Linear and embedding weights
//! are N(0, 0.02), norm weights 1 + N(0, 0.02). The normal is approximated by a 4-term
//! Irwin-Hall sum (one u64 per value): 7B parameters must generate in seconds, not minutes,
//! and the tails beyond 3.5 sigma do not matter for a stand-in model.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use allam_backend::DType;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::source::{TensorMeta, WeightSource, SINGLE_FILE};
use crate::tensor_names::{checkpoint_tensors, TensorRole};
use crate::{Error, ModelConfig};

const STD: f32 = 0.02;
const CHUNK: usize = 1 << 16;

/// Deterministic random weights for a config.
pub(crate) struct DummySource {
    label: PathBuf,
    seed: u64,
    tensors: HashMap<String, (Vec<usize>, TensorRole)>,
}

impl DummySource {
    pub(crate) fn new(config: &ModelConfig, seed: u64) -> DummySource {
        DummySource {
            label: PathBuf::from(format!("<dummy weights, seed {seed}>")),
            seed,
            tensors: checkpoint_tensors(config)
                .into_iter()
                .map(|(name, shape, role)| (name, (shape, role)))
                .collect(),
        }
    }

    fn generate(&self, name: &str, numel: usize, role: TensorRole) -> Vec<u8> {
        let tensor_seed = splitmix64(self.seed ^ fnv1a(name));
        let (offset, std) = match role {
            TensorRole::Norm => (1.0f32, STD),
            TensorRole::Embedding | TensorRole::Linear => (0.0, STD),
        };
        let mut out = vec![0u8; numel * 2];
        out.par_chunks_mut(CHUNK * 2)
            .enumerate()
            .for_each(|(chunk_idx, bytes)| {
                let mut rng = ChaCha8Rng::seed_from_u64(splitmix64(
                    tensor_seed.wrapping_add(chunk_idx as u64),
                ));
                for pair in bytes.chunks_exact_mut(2) {
                    let value = offset + std * approx_standard_normal(rng.next_u64());
                    pair.copy_from_slice(&half::bf16::from_f32(value).to_le_bytes());
                }
            });
        out
    }
}

impl WeightSource for DummySource {
    fn location(&self) -> &Path {
        &self.label
    }

    fn meta(&self, name: &str) -> Result<TensorMeta, Error> {
        let (shape, _) = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            tensor: name.to_owned(),
            path: self.label.clone(),
        })?;
        Ok(TensorMeta {
            dtype: DType::BF16,
            shape: shape.clone(),
            file: self.label.clone(),
        })
    }

    fn read(&self, name: &str) -> Result<Cow<'_, [u8]>, Error> {
        let (shape, role) = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            tensor: name.to_owned(),
            path: self.label.clone(),
        })?;
        Ok(Cow::Owned(self.generate(
            name,
            shape.iter().product(),
            *role,
        )))
    }
}

/// Sum of four 16-bit uniforms, centred and scaled to unit variance (Irwin-Hall, n = 4).
fn approx_standard_normal(bits: u64) -> f32 {
    let u = |shift: u32| (((bits >> shift) & 0xFFFF) as f32 + 0.5) / 65536.0;
    // Var(sum of 4 U(0,1)) = 4/12, so multiply the centred sum by sqrt(3).
    (u(0) + u(16) + u(32) + u(48) - 2.0) * 3f32.sqrt()
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Writes `config.json`, `generation_config.json` and a bf16 `model.safetensors` of random
/// weights (the same values [`crate::Model::from_config_dummy`] uses for `seed`) into
/// `out_dir`, creating it. Streams tensor by tensor, so memory stays at one tensor.
pub fn write_synthetic_checkpoint(
    config: &ModelConfig,
    out_dir: &Path,
    seed: u64,
) -> Result<(), Error> {
    config.validate()?;
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let write_json = |name: &str, value: &serde_json::Value| -> Result<(), Error> {
        let path = out_dir.join(name);
        let text = serde_json::to_string_pretty(value).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
        std::fs::write(&path, text + "\n").map_err(|e| Error::io(&path, e))
    };
    write_json("config.json", &config.to_json())?;
    let eos = match config.eos_token_ids.as_slice() {
        [one] => serde_json::json!(one),
        many => serde_json::json!(many),
    };
    write_json(
        "generation_config.json",
        &serde_json::json!({"bos_token_id": config.bos_token_id, "eos_token_id": eos}),
    )?;

    let source = DummySource::new(config, seed);
    let tensors = checkpoint_tensors(config);
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".to_owned(),
        serde_json::json!({"format": "pt"}),
    );
    let mut offset = 0usize;
    for (name, shape, _) in &tensors {
        let bytes = shape.iter().product::<usize>() * 2;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let path = out_dir.join(SINGLE_FILE);
    let io_err = |e| Error::io(&path, e);
    let mut header_text = serde_json::Value::Object(header).to_string();
    // The data section starts 8-byte aligned, as the format recommends.
    while !header_text.len().is_multiple_of(8) {
        header_text.push(' ');
    }
    let file = std::fs::File::create(&path).map_err(io_err)?;
    let mut out = BufWriter::new(file);
    out.write_all(&(header_text.len() as u64).to_le_bytes())
        .map_err(io_err)?;
    out.write_all(header_text.as_bytes()).map_err(io_err)?;
    for (name, _, _) in &tensors {
        out.write_all(&source.read(name)?).map_err(io_err)?;
    }
    out.flush().map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approx_normal_has_unit_moments() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let n = 200_000;
        let xs: Vec<f64> = (0..n)
            .map(|_| f64::from(approx_standard_normal(rng.next_u64())))
            .collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((var - 1.0).abs() < 0.02, "{var}");
    }

    #[test]
    fn dummy_tensors_are_seeded_and_distinct() {
        let config = ModelConfig::preset("tiny").expect("preset");
        let a = DummySource::new(&config, 1);
        let b = DummySource::new(&config, 2);
        let name = "model.layers.0.self_attn.q_proj.weight";
        assert_eq!(a.read(name).expect("tensor"), a.read(name).expect("tensor"));
        assert_ne!(a.read(name).expect("tensor"), b.read(name).expect("tensor"));
        assert_ne!(
            a.read(name).expect("tensor"),
            a.read("model.layers.1.self_attn.q_proj.weight")
                .expect("tensor")
        );
        let norm = allam_backend::decode_to_f32(
            DType::BF16,
            &a.read("model.norm.weight").expect("tensor"),
        )
        .expect("bf16 bytes");
        assert!(
            norm.iter().all(|w| (0.8..1.2).contains(w)),
            "norm weights near 1"
        );
    }
}
