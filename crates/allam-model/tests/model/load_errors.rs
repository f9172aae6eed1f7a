//! Broken checkpoints: each error must name the file and the field or tensor at fault.

use std::path::Path;

use allam_model::{Error, Model};

use crate::support::{cpu_backend, model_dir, quiet};

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).expect("fixture dir") {
        let entry = entry.expect("dir entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy fixture file");
        let mut perms = std::fs::metadata(to.join(entry.file_name()))
            .expect("metadata")
            .permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        // fixtures are read-only; the copy is ours
        perms.set_readonly(false);
        std::fs::set_permissions(to.join(entry.file_name()), perms).expect("chmod");
    }
}

fn load_err(dir: &Path) -> Error {
    let mut backend = cpu_backend();
    match Model::load(dir, &mut backend, &quiet()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e,
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = dir.join("config.json");
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("config")).expect("json");
    edit(value.as_object_mut().expect("object"));
    std::fs::write(&path, value.to_string()).expect("write config");
}

#[test]
fn missing_shard_names_the_shard_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    copy_dir(&model_dir("tiny-allam-sharded"), tmp.path());
    std::fs::remove_file(tmp.path().join("model-00002-of-00002.safetensors")).expect("rm");
    let msg = load_err(tmp.path()).to_string();
    assert!(msg.contains("model-00002-of-00002.safetensors"), "{msg}");
}

#[test]
fn tensor_missing_from_index_is_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    copy_dir(&model_dir("tiny-allam-sharded"), tmp.path());
    let path = tmp.path().join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("index")).expect("json");
    index["weight_map"]
        .as_object_mut()
        .expect("weight_map")
        .remove("model.layers.2.mlp.up_proj.weight");
    std::fs::write(&path, index.to_string()).expect("write index");
    let err = load_err(tmp.path());
    assert!(matches!(err, Error::MissingTensor { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("model.layers.2.mlp.up_proj.weight"),
        "{err}"
    );
}

#[test]
fn truncated_safetensors_names_file_and_tensor() {
    let tmp = tempfile::tempdir().expect("tempdir");
    copy_dir(&model_dir("tiny-allam"), tmp.path());
    let path = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&path).expect("read");
    let cut = bytes.len() - 1000;
    // The first tensor (in file order) that the cut reaches is the one to name.
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + header_len]).expect("header json");
    let data_len = (cut - 8 - header_len) as u64;
    let first_cut = header
        .iter()
        .filter_map(|(name, info)| Some((info.get("data_offsets")?[1].as_u64()?, name.clone())))
        .filter(|(end, _)| *end > data_len)
        .min()
        .expect("some tensor is cut")
        .1;
    std::fs::write(&path, &bytes[..cut]).expect("truncate");
    let msg = load_err(tmp.path()).to_string();
    assert!(msg.contains("model.safetensors"), "{msg}");
    assert!(
        msg.contains("truncated") && msg.contains(&format!("`{first_cut}`")),
        "{msg}"
    );
}

#[test]
fn garbage_safetensors_header_names_the_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    copy_dir(&model_dir("tiny-allam"), tmp.path());
    let path = tmp.path().join("model.safetensors");
    std::fs::write(&path, b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!").expect("write");
    let msg = load_err(tmp.path()).to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("corrupt"),
        "{msg}"
    );
}

#[test]
fn wrong_shape_names_tensor_and_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    copy_dir(&model_dir("tiny-allam"), tmp.path());
    // A GQA config over MHA weights: k_proj is [256, 256], the config says [64, 256].
    edit_config(tmp.path(), |c| {
        c.insert("num_key_value_heads".into(), 2.into());
    });
    let err = load_err(tmp.path());
    let msg = err.to_string();
    assert!(matches!(err, Error::TensorShape { .. }), "{err:?}");
    assert!(
        msg.contains("model.layers.0.self_attn.k_proj.weight") && msg.contains("model.safetensors"),
        "{msg}"
    );
}

#[test]
fn bad_configs_name_file_and_field() {
    type Edit = fn(&mut serde_json::Map<String, serde_json::Value>);
    let cases: [(Edit, &str); 5] = [
        (|c| drop(c.remove("hidden_size")), "`hidden_size`"),
        (
            |c| drop(c.insert("num_attention_heads".into(), "eight".into())),
            "`num_attention_heads`",
        ),
        (
            |c| {
                drop(c.insert(
                    "architectures".into(),
                    serde_json::json!(["MistralForCausalLM"]),
                ))
            },
            "`architectures`",
        ),
        (
            |c| drop(c.insert("model_type".into(), "gpt2".into())),
            "`model_type`",
        ),
        (
            |c| drop(c.insert("num_key_value_heads".into(), 3.into())),
            "`num_key_value_heads`",
        ),
    ];
    for (edit, field) in cases {
        let tmp = tempfile::tempdir().expect("tempdir");
        copy_dir(&model_dir("tiny-allam"), tmp.path());
        edit_config(tmp.path(), edit);
        let msg = load_err(tmp.path()).to_string();
        assert!(
            msg.contains(field) && msg.contains("config.json"),
            "want {field}: {msg}"
        );
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    copy_dir(&model_dir("tiny-allam"), tmp.path());
    std::fs::write(tmp.path().join("config.json"), "{\"hidden_size\": 256,").expect("write");
    let err = load_err(tmp.path());
    assert!(matches!(err, Error::Json { .. }), "{err:?}");
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn directory_without_weights_says_so() {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        model_dir("tiny-allam").join("config.json"),
        tmp.path().join("config.json"),
    )
    .expect("copy");
    let err = load_err(tmp.path());
    assert!(matches!(err, Error::NoWeights { .. }), "{err:?}");
}
