//! The tiny fixture models on the CPU backend, batched every way the engine can batch,
//! against transformers' greedy ids, texts and logprobs (`goldens.json`, fixtures README §3).

use allam_backend_cpu::{CpuBackend, CpuBackendConfig};
use allam_engine::{Engine, EngineConfig, EngineHandle};
use allam_model::{LoadOptions, Model};
use allam_request::RawSamplingParams;
use allam_types::{FinishReason, TokenId};
use serde_json::Value;

use crate::support::*;

const MODELS: [&str; 2] = ["tiny-allam", "tiny-allam-gqa"];
/// Fixtures README §4: an f32 engine matches logprobs within 1e-3.
const LOGPROB_ATOL: f32 = 1e-3;

struct Case {
    id: String,
    input_ids: Vec<TokenId>,
    greedy_ids: Vec<TokenId>,
    greedy_text: String,
    greedy_logprobs: Vec<f32>,
    prompt_logprobs: Vec<Option<f32>>,
}

fn cases(model: &str) -> Vec<Case> {
    let path = fixtures_dir().join(model).join("goldens.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let goldens: Value = serde_json::from_str(&text).expect("goldens.json parses");
    let ids = |v: &Value| -> Vec<TokenId> {
        v.as_array()
            .expect("id list")
            .iter()
            .map(|x| x.as_u64().expect("id") as TokenId)
            .collect()
    };
    let floats = |v: &Value| -> Vec<Option<f32>> {
        v.as_array()
            .expect("float list")
            .iter()
            .map(|x| x.as_f64().map(|f| f as f32))
            .collect()
    };
    goldens["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| Case {
            id: c["id"].as_str().expect("id").to_owned(),
            input_ids: ids(&c["input_ids"]),
            greedy_ids: ids(&c["greedy"]["ids"]),
            greedy_text: c["greedy"]["text"].as_str().expect("text").to_owned(),
            greedy_logprobs: floats(&c["greedy"]["logprobs"])
                .into_iter()
                .map(|f| f.expect("logprob"))
                .collect(),
            prompt_logprobs: floats(&c["prompt_logprobs"]),
        })
        .collect()
}

fn start(model: &str, config: EngineConfig) -> EngineHandle {
    let dir = fixtures_dir().join(model);
    let mut backend = CpuBackend::new(&CpuBackendConfig::default()).expect("cpu backend");
    let model = Model::load(&dir, &mut backend, &LoadOptions::default()).expect("model loads");
    Engine::start(model, Box::new(backend), tokenizer(), config).expect("engine starts")
}

fn case_params(case: &Case, logprobs: bool) -> RawSamplingParams {
    RawSamplingParams {
        logprobs: logprobs.then_some(0),
        prompt_logprobs: logprobs.then_some(0),
        ..greedy(case.greedy_ids.len() as i64)
    }
}

fn check_ids(model: &str, case: &Case, out: &Outcome) {
    assert_eq!(out.failed, None, "{model}/{}", case.id);
    assert_eq!(
        out.ids[0], case.greedy_ids,
        "{model}/{}: greedy ids",
        case.id
    );
    let end = out.ends[0].clone().expect("ended");
    assert_eq!(end.0, FinishReason::Length);
    assert_eq!(end.1, case.greedy_text, "{model}/{}: text", case.id);
    assert_eq!(
        out.texts[0], case.greedy_text,
        "{model}/{}: streamed text",
        case.id
    );
}

fn check_logprobs(model: &str, case: &Case, out: &Outcome) {
    assert_eq!(out.logprobs[0].len(), case.greedy_logprobs.len());
    for (step, (got, want)) in out.logprobs[0]
        .iter()
        .zip(&case.greedy_logprobs)
        .enumerate()
    {
        assert!(
            (got.chosen.logprob - want).abs() < LOGPROB_ATOL,
            "{model}/{} step {step}: logprob {} vs golden {want}",
            case.id,
            got.chosen.logprob
        );
    }
    let prompt = out.prompt_logprobs.as_ref().expect("prompt logprobs");
    assert_eq!(prompt.len(), case.prompt_logprobs.len());
    for (t, (got, want)) in prompt.iter().zip(&case.prompt_logprobs).enumerate() {
        match (got, want) {
            (None, None) => {}
            (Some(got), Some(want)) => assert!(
                (got.chosen.logprob - want).abs() < LOGPROB_ATOL,
                "{model}/{} prompt position {t}: {} vs golden {want}",
                case.id,
                got.chosen.logprob
            ),
            other => panic!("{model}/{} prompt position {t}: {other:?}", case.id),
        }
    }
}

/// Submits every case, each after the previous one produced its first token, and checks all.
fn staggered(model: &str, config: EngineConfig, logprobs: bool) -> EngineHandle {
    let handle = start(model, config);
    let tok = tokenizer();
    let cases = cases(model);
    let started: Vec<_> = cases
        .iter()
        .map(|case| {
            let request = valid(&tok, &case.input_ids, case_params(case, logprobs));
            Started::until_first_token(handle.submit(request).expect("submit"))
        })
        .collect();
    for (case, s) in cases.iter().zip(started) {
        let out = s.finish();
        check_ids(model, case, &out);
        if logprobs {
            check_logprobs(model, case, &out);
        }
    }
    assert_pool_full(&handle);
    handle
}

#[test]
fn goldens_batched_with_staggered_arrival_and_logprobs() {
    for model in MODELS {
        staggered(model, EngineConfig::default(), true).shutdown();
    }
}

#[test]
fn goldens_with_prefill_chunks_of_7() {
    for model in MODELS {
        let config = EngineConfig {
            prefill_chunk_size: Some(7),
            ..EngineConfig::default()
        };
        staggered(model, config, false).shutdown();
    }
}

#[test]
fn goldens_under_preemption() {
    for model in MODELS {
        // 44 blocks of 16 tokens: the long case (643 tokens with its output) fits alone, but
        // not next to the others. Submitted longest first, it is admitted first (its whole
        // prompt fits, the admission rule's condition) and the short ones after it; their
        // outputs then grow until running sequences run out of blocks.
        let bytes_per_block = {
            let dir = fixtures_dir().join(model);
            let mut backend = CpuBackend::new(&CpuBackendConfig::default()).expect("backend");
            let m = Model::load(&dir, &mut backend, &LoadOptions::default()).expect("loads");
            m.kv_cache_bytes_per_block(&backend, 16)
        };
        let config = EngineConfig {
            kv_cache_bytes: Some(44 * bytes_per_block),
            prefill_chunk_size: Some(64),
            ..EngineConfig::default()
        };
        let handle = start(model, config);
        assert_eq!(
            handle.model_info().num_blocks,
            44,
            "sized from the byte budget"
        );
        let tok = tokenizer();
        let mut cases = cases(model);
        cases.sort_by_key(|case| std::cmp::Reverse(case.input_ids.len()));
        let mut streams: Vec<_> = cases
            .iter()
            .map(|case| {
                let request = valid(&tok, &case.input_ids, case_params(case, false));
                handle.submit(request).expect("submit")
            })
            .collect();
        for (case, stream) in cases.iter().zip(&mut streams) {
            check_ids(model, case, &collect(stream));
        }
        assert!(
            handle.stats().preemptions > 0,
            "{model}: the budget forces preemption"
        );
        assert_pool_full(&handle);
        handle.shutdown();
    }
}

#[test]
fn prefix_cache_reuses_a_long_prompt() {
    let model = MODELS[0];
    let handle = start(model, EngineConfig::default());
    let tok = tokenizer();
    let cases = cases(model);
    let long = cases
        .iter()
        .find(|c| c.id == "raw_long_600")
        .expect("the long case exists");
    let run = || {
        let request = valid(&tok, &long.input_ids, case_params(long, false));
        collect(&mut handle.submit(request).expect("submit"))
    };
    let first = run();
    check_ids(model, long, &first);
    assert_eq!(first.usage.expect("finished").cached_tokens, 0);
    let second = run();
    check_ids(model, long, &second);
    let cached = second.usage.expect("finished").cached_tokens as usize;
    // Every full block but the one holding the last prompt token (its logits are needed).
    assert_eq!(cached, (long.input_ids.len() - 1) / 16 * 16);
    assert_pool_full(&handle);
    handle.shutdown();
}
