//! `allam generate` and `allam synth-model` as a user runs them: the real binary, the
//! fixtures' models, output compared with the transformers goldens.

use std::process::Command;

use crate::support::{allam_bin, fixtures_dir, goldens};

fn generate(args: &[&str]) -> Vec<serde_json::Value> {
    let output = Command::new(allam_bin())
        .arg("generate")
        .args(args)
        .output()
        .expect("run allam generate");
    assert!(
        output.status.success(),
        "allam generate {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("utf-8 stdout")
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect()
}

fn ids(value: &serde_json::Value) -> Vec<u64> {
    value
        .as_array()
        .expect("id list")
        .iter()
        .map(|v| v.as_u64().expect("id"))
        .collect()
}

#[test]
fn generate_json_matches_the_tea_golden() {
    let model = fixtures_dir().join("tiny-allam");
    let golden = &goldens("tiny-allam")["cases"][0];
    assert_eq!(golden["id"], "chat_en_tea");
    let out = generate(&[
        "--model",
        model.to_str().expect("utf-8 path"),
        "--user",
        "How do I prepare a cup of tea?",
        "--greedy",
        "--max-new-tokens",
        "24",
        "--logprobs",
        "2",
        "--prompt-logprobs",
        "--json",
    ]);
    let result = &out[0];
    assert_eq!(result["prompt"], golden["rendered_prompt"]);
    assert_eq!(ids(&result["prompt_token_ids"]), ids(&golden["input_ids"]));
    assert_eq!(ids(&result["token_ids"]), ids(&golden["greedy"]["ids"]));
    assert_eq!(result["text"], golden["greedy"]["text"]);
    assert_eq!(result["finish_reason"], "length");
    let logprobs = result["logprobs"].as_array().expect("logprobs");
    assert_eq!(logprobs.len(), 24);
    for (step, (got, want)) in logprobs
        .iter()
        .zip(
            golden["greedy"]["logprobs"]
                .as_array()
                .expect("golden logprobs"),
        )
        .enumerate()
    {
        let diff = (got["logprob"].as_f64().expect("f64") - want.as_f64().expect("f64")).abs();
        assert!(diff <= 1e-3, "step {step}: logprob off by {diff}");
        assert_eq!(got["top"].as_array().map(Vec::len), Some(2));
    }
    let prompt_logprobs = result["prompt_logprobs"]
        .as_array()
        .expect("prompt logprobs");
    assert!(prompt_logprobs[0].is_null());
    for (t, (got, want)) in prompt_logprobs
        .iter()
        .zip(golden["prompt_logprobs"].as_array().expect("golden"))
        .enumerate()
        .skip(1)
    {
        let diff = (got["logprob"].as_f64().expect("f64") - want.as_f64().expect("f64")).abs();
        assert!(diff <= 1e-3, "prompt position {t}: logprob off by {diff}");
    }
}

/// Every golden case in one `--requests` file: submitted at once, batched by the engine,
/// printed in order, each equal to its golden.
#[test]
fn generate_requests_file_batches_every_golden_case() {
    for model in ["tiny-allam", "tiny-allam-gqa"] {
        let goldens = goldens(model);
        let cases = goldens["cases"].as_array().expect("cases");
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("requests.jsonl");
        let mut lines = String::new();
        for case in cases {
            let line = if case["kind"] == "chat" {
                serde_json::json!({"messages": case["messages"], "greedy": true, "max_new_tokens": 24})
            } else {
                serde_json::json!({"prompt": case["prompt"], "greedy": true, "max_new_tokens": 24})
            };
            lines.push_str(&line.to_string());
            lines.push('\n');
        }
        std::fs::write(&path, lines).expect("write requests");
        let model_dir = fixtures_dir().join(model);
        let out = generate(&[
            "--model",
            model_dir.to_str().expect("utf-8"),
            "--requests",
            path.to_str().expect("utf-8"),
        ]);
        assert_eq!(out.len(), cases.len());
        for (result, case) in out.iter().zip(cases) {
            assert_eq!(
                ids(&result["token_ids"]),
                ids(&case["greedy"]["ids"]),
                "{model} {}",
                case["id"]
            );
            assert_eq!(ids(&result["prompt_token_ids"]), ids(&case["input_ids"]));
        }
    }
}

#[test]
fn bad_model_directory_is_a_clear_error() {
    let output = Command::new(allam_bin())
        .args(["generate", "--model", "/nonexistent/model", "--user", "hi"])
        .output()
        .expect("run allam");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/model"), "{stderr}");
}

#[test]
fn cuda_without_a_gpu_fails_with_one_sentence() {
    let model = fixtures_dir().join("tiny-allam");
    let output = Command::new(allam_bin())
        .args([
            "generate",
            "--model",
            model.to_str().expect("utf-8"),
            "--device",
            "cuda",
            "--user",
            "hi",
        ])
        .output()
        .expect("run allam");
    if output.status.success() {
        // A machine with a GPU ran it; nothing to check here.
        return;
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.to_lowercase().contains("cuda"), "{stderr}");
}

/// `--cuda-graphs` combinations that cannot work are refused before anything loads, with
/// the flag named; on this machine (no GPU) the valid combination fails only for the GPU.
#[test]
fn cuda_graph_flags_are_checked() {
    let model = fixtures_dir().join("tiny-allam");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().expect("utf-8"),
            "--user",
            "hi",
            "--cuda-graphs",
        ];
        args.extend_from_slice(extra);
        let output = Command::new(allam_bin())
            .args(&args)
            .output()
            .expect("run allam");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (ok, stderr) = run(&["--device", "cpu"]);
    assert!(
        !ok && stderr.contains("--cuda-graphs needs --device cuda"),
        "{stderr}"
    );
    let (ok, stderr) = run(&["--device", "cuda", "--cuda-graph-max-batch", "0"]);
    assert!(!ok && stderr.contains("--cuda-graph-max-batch"), "{stderr}");
    let (ok, stderr) = run(&["--device", "cuda"]);
    if !ok {
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!stderr.contains("--cuda-graphs"), "{stderr}");
    }
}

#[test]
fn synth_model_writes_a_loadable_checkpoint() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("tiny");
    let status = Command::new(allam_bin())
        .args([
            "synth-model",
            "--preset",
            "tiny",
            "--out",
            out.to_str().expect("utf-8"),
        ])
        .status()
        .expect("run synth-model");
    assert!(status.success());
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(file).exists(), "{file} missing");
    }
    let result = generate(&[
        "--model",
        out.to_str().expect("utf-8"),
        "--prompt",
        "tea and coffee",
        "--greedy",
        "--max-new-tokens",
        "5",
        "--json",
    ]);
    let n = result[0]["token_ids"].as_array().map_or(0, Vec::len);
    let finish = &result[0]["finish_reason"];
    assert!(
        (n == 5 && finish == "length") || ((1..5).contains(&n) && finish == "stop"),
        "{n} tokens, finish {finish}"
    );
}
