//! Dummy weights and synthetic checkpoints: the same seed gives the same model whether the
//! weights are generated in memory or written to disk and loaded back.

use allam_model::{write_synthetic_checkpoint, LoadFormat, LoadOptions, Model, ModelConfig};

use crate::support::{cpu_backend, model_dir, quiet, run, SeqSpec};

fn small_config() -> ModelConfig {
    let mut config = ModelConfig::preset("demo").expect("preset");
    config.vocab_size = 300;
    config.num_hidden_layers = 2;
    config
}

fn logits_of(model: &Model, backend: &mut allam_backend_cpu::CpuBackend) -> (Vec<f32>, Vec<u32>) {
    let spec = SeqSpec {
        prompt: vec![1, 17, 42, 299, 5, 8, 100],
        chunk: 3,
        max_new: 5,
        all_prompt_logits: false,
    };
    let result = run(model, backend, &[spec]).remove(0);
    (result.prompt_logits, result.generated)
}

#[test]
fn synthetic_checkpoint_loads_to_the_dummy_model_bit_for_bit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = small_config();
    write_synthetic_checkpoint(&config, tmp.path(), 7).expect("write checkpoint");
    let mut backend = cpu_backend();
    let from_disk = Model::load(tmp.path(), &mut backend, &quiet()).expect("load");
    assert_eq!(from_disk.config(), &config, "config.json round-trips");
    let dummy = Model::from_config_dummy(config.clone(), &mut backend, 7).expect("dummy");
    let other_seed = Model::from_config_dummy(config, &mut backend, 8).expect("dummy");
    let (disk_logits, disk_tokens) = logits_of(&from_disk, &mut backend);
    let (dummy_logits, dummy_tokens) = logits_of(&dummy, &mut backend);
    assert!(disk_logits == dummy_logits);
    assert_eq!(disk_tokens, dummy_tokens);
    assert!(disk_logits.iter().all(|v| v.is_finite()));
    assert!(
        logits_of(&other_seed, &mut backend).0 != dummy_logits,
        "seed matters"
    );
}

#[test]
fn dummy_load_format_needs_only_config_json() {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        model_dir("tiny-allam-gqa").join("config.json"),
        tmp.path().join("config.json"),
    )
    .expect("copy");
    let mut backend = cpu_backend();
    let opts = LoadOptions {
        format: LoadFormat::Dummy,
        dummy_seed: 3,
        ..quiet()
    };
    let model = Model::load(tmp.path(), &mut backend, &opts).expect("dummy load");
    assert_eq!(model.config().num_key_value_heads, 2);
    let (logits, tokens) = logits_of(&model, &mut backend);
    assert_eq!(logits.len(), 4000);
    assert_eq!(tokens.len(), 5);
}
