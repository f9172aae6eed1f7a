//! The host-side RoPE table `[max_position_embeddings, head_dim]` uploaded once per model.
//!
//! It reproduces transformers' float32 arithmetic: `inv_freq = 1 / theta^(2i/d)` in f32,
//! `angle = f32(pos) * inv_freq` rounded to f32, then cos/sin of that f32 angle. Computing
//! angles in f64 instead would be "more exact" but drift from the reference by up to ~1e-4
//! rad at position 4000; frequency rescaling (`rope_scaling`) is applied to `inv_freq` as in
//! transformers' `_compute_*_parameters`.

use crate::{ModelConfig, RopeScaling};

fn inv_freq(config: &ModelConfig) -> Vec<f32> {
    let dim = config.head_dim;
    let base = config.rope_theta as f32;
    let plain: Vec<f32> = (0..dim / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32))
        .collect();
    match &config.rope_scaling {
        None => plain,
        Some(RopeScaling::Linear { factor }) => plain.iter().map(|f| f / *factor as f32).collect(),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let (factor, low, high) = (
                *factor as f32,
                *low_freq_factor as f32,
                *high_freq_factor as f32,
            );
            let old_len = *original_max_position_embeddings as f32;
            let low_freq_wavelen = old_len / low;
            let high_freq_wavelen = old_len / high;
            plain
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen > low_freq_wavelen {
                        f / factor
                    } else if wavelen < high_freq_wavelen {
                        f
                    } else {
                        let smooth = (old_len / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// Row `p` = `[cos(p f_0) .. cos(p f_{d/2-1}), sin(p f_0) .. sin(p f_{d/2-1})]`.
pub(crate) fn rope_table(config: &ModelConfig) -> Vec<f32> {
    let freqs = inv_freq(config);
    let half = freqs.len();
    let mut table = vec![0.0f32; config.max_position_embeddings * 2 * half];
    for (pos, row) in table.chunks_exact_mut(2 * half).enumerate() {
        let (cos, sin) = row.split_at_mut(half);
        for (i, f) in freqs.iter().enumerate() {
            let angle = pos as f32 * f;
            cos[i] = angle.cos();
            sin[i] = angle.sin();
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_follows_the_fixture_readme_formula() {
        let mut config = ModelConfig::preset("tiny").expect("preset");
        config.max_position_embeddings = 8;
        let table = rope_table(&config);
        assert_eq!(table.len(), 8 * 32);
        // README §2.3: inv_freq[i] = 10000^(-2i/32), cos/sin of pos * inv_freq.
        for pos in [0usize, 1, 7] {
            for i in [0usize, 5, 15] {
                let angle = pos as f64 * 10000f64.powf(-(2.0 * i as f64) / 32.0);
                assert!((f64::from(table[pos * 32 + i]) - angle.cos()).abs() < 1e-6);
                assert!((f64::from(table[pos * 32 + 16 + i]) - angle.sin()).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn linear_scaling_divides_every_frequency() {
        let mut config = ModelConfig::preset("tiny").expect("preset");
        let plain = inv_freq(&config);
        config.rope_scaling = Some(RopeScaling::Linear { factor: 4.0 });
        let scaled = inv_freq(&config);
        for (p, s) in plain.iter().zip(&scaled) {
            assert!((p / 4.0 - s).abs() <= f32::EPSILON * p);
        }
    }
}
