//! Engine behaviour with `FakeKvModel` (logits = hash of the context read back from the paged
//! cache), so every scheduling, caching or preemption mistake changes the output.

use std::sync::atomic::Ordering;

use allam_engine::{failure_reason, EngineConfig, Error};
use allam_request::RawSamplingParams;
use allam_types::{FinishReason, TokenId};
use futures::StreamExt;
use proptest::prelude::*;

use crate::support::*;

fn config() -> EngineConfig {
    EngineConfig {
        block_size: 4,
        num_blocks: Some(256),
        kv_cache_bytes: None,
        max_num_batched_tokens: 64,
        max_num_seqs: 16,
        ..EngineConfig::default()
    }
}

fn prompt(seed: u32, len: usize) -> Vec<TokenId> {
    let mut ids = vec![1];
    ids.extend((1..len as u32).map(|i| 3 + (seed * 131 + i * 17) % 3990));
    ids
}

/// Submits every prompt (each after the previous one produced its first token), then checks
/// every greedy output against the fake model's reference.
fn run_staggered(config: EngineConfig, prompts: &[Vec<TokenId>], max_new: usize) -> u64 {
    let num_blocks = config.num_blocks.expect("tests size the pool");
    let (handle, _) = start_fake(config, num_blocks);
    let tok = tokenizer();
    let mut started = Vec::new();
    for p in prompts {
        let stream = handle
            .submit(valid(&tok, p, greedy(max_new as i64)))
            .expect("submit");
        started.push(Started::until_first_token(stream));
    }
    for (p, s) in prompts.iter().zip(started) {
        let out = s.finish();
        assert_eq!(out.failed, None);
        assert_eq!(
            out.ids[0],
            fake_greedy(p, max_new),
            "prompt of {} tokens",
            p.len()
        );
        let end = out.ends[0].clone().expect("ended");
        assert_eq!(end.0, FinishReason::Length);
        assert_eq!(end.2, out.ids[0]);
        assert_eq!(
            end.1, out.texts[0],
            "SequenceEnd text = concatenated deltas"
        );
    }
    assert_pool_full(&handle);
    let preemptions = handle.stats().preemptions;
    handle.shutdown();
    preemptions
}

#[test]
fn staggered_batch_equals_alone() {
    let prompts: Vec<_> = (0..8).map(|i| prompt(i, 3 + i as usize * 9)).collect();
    let preemptions = run_staggered(config(), &prompts, 20);
    assert_eq!(preemptions, 0, "a roomy pool needs no preemption");
}

#[test]
fn preemption_under_a_tiny_pool_keeps_outputs() {
    let config = EngineConfig {
        num_blocks: Some(24),
        ..config()
    };
    let prompts: Vec<_> = (0..6).map(|i| prompt(i, 20 + i as usize * 5)).collect();
    let preemptions = run_staggered(config, &prompts, 30);
    assert!(
        preemptions > 0,
        "24 blocks of 4 cannot hold 6 sequences of ~60 tokens"
    );
}

#[test]
fn tiny_prefill_chunks_keep_outputs() {
    let config = EngineConfig {
        prefill_chunk_size: Some(7),
        ..config()
    };
    let prompts: Vec<_> = (0..5).map(|i| prompt(i, 30 + i as usize)).collect();
    run_staggered(config, &prompts, 10);
}

#[test]
fn prefix_cache_hit_reports_cached_tokens_and_same_output() {
    let (handle, _) = start_fake(config(), 256);
    let tok = tokenizer();
    let shared = prompt(7, 41);
    let mut second = shared.clone();
    second.extend([500, 501, 502]);
    let first = collect(
        &mut handle
            .submit(valid(&tok, &shared, greedy(8)))
            .expect("submit"),
    );
    assert_eq!(first.usage.expect("finished").cached_tokens, 0);
    let out = collect(
        &mut handle
            .submit(valid(&tok, &second, greedy(8)))
            .expect("submit"),
    );
    assert_eq!(out.ids[0], fake_greedy(&second, 8));
    // 41 shared tokens = 10 full blocks of 4.
    assert_eq!(out.usage.expect("finished").cached_tokens, 40);
    let stats = handle.stats();
    assert!(stats.prefix_cache_hit_tokens >= 40 && stats.prefix_cache_hit_ratio > 0.0);
    // The summary for routing names the blocks of the shared prefix.
    let want = allam_types::prefix_hash::prefix_block_hashes(&shared, 4);
    wait_until("the hash summary", || {
        let have = handle.cached_block_hashes(1000);
        want.iter().all(|h| have.contains(h))
    });
    assert_pool_full(&handle);
}

#[test]
fn n_sequences_share_the_prompt_and_finish_together() {
    let config = EngineConfig {
        prefill_chunk_size: Some(5),
        ..config()
    };
    let (handle, _) = start_fake(config, 256);
    let tok = tokenizer();
    let p = prompt(3, 23);
    let params = RawSamplingParams {
        n: Some(3),
        ..greedy(6)
    };
    let out = collect(&mut handle.submit(valid(&tok, &p, params)).expect("submit"));
    assert_eq!(out.ids.len(), 3);
    for ids in &out.ids {
        assert_eq!(ids, &fake_greedy(&p, 6), "greedy children equal the parent");
    }
    assert_eq!(out.usage.expect("finished").completion_tokens, 18);
    assert_pool_full(&handle);
}

#[test]
fn seeded_sampling_is_reproducible_across_batch_mixes() {
    let (handle, _) = start_fake(config(), 256);
    let tok = tokenizer();
    let p = prompt(11, 17);
    let sampled = |seed| RawSamplingParams {
        do_sample: Some(true),
        temperature: Some(1.0),
        top_p: Some(0.95),
        top_k: Some(50),
        seed: Some(seed),
        max_new_tokens: Some(24),
        ignore_eos: Some(true),
        n: Some(2),
        ..RawSamplingParams::default()
    };
    let alone = collect(&mut handle.submit(valid(&tok, &p, sampled(42))).expect("submit"));
    // Same request among different company, arriving at different points.
    let mut others = Vec::new();
    for i in 0..4 {
        others.push(
            handle
                .submit(valid(
                    &tok,
                    &prompt(20 + i, 9 + i as usize * 13),
                    sampled(u64::from(i)),
                ))
                .expect("submit"),
        );
    }
    let mixed = collect(&mut handle.submit(valid(&tok, &p, sampled(42))).expect("submit"));
    for mut s in others {
        assert_eq!(collect(&mut s).failed, None);
    }
    assert_eq!(alone.ids, mixed.ids);
    assert_ne!(
        alone.ids[0], alone.ids[1],
        "the n sequences draw from different streams"
    );
    let other_seed = collect(&mut handle.submit(valid(&tok, &p, sampled(43))).expect("submit"));
    assert_ne!(alone.ids, other_seed.ids);
    assert_pool_full(&handle);
}

/// A request's rows go to the backend's sampler when it uses only temperature / top-k /
/// top-p, to the host's otherwise (here: a `min_p` too small to mask anything). Both take the
/// same seeded draw and follow the same rules, so the tokens are the same.
#[test]
fn backend_and_host_sampling_give_a_seeded_request_the_same_tokens() {
    let (handle, _) = start_fake(config(), 256);
    let tok = tokenizer();
    let p = prompt(7, 15);
    let params = |seed, min_p| RawSamplingParams {
        do_sample: Some(true),
        temperature: Some(0.9),
        top_p: Some(0.9),
        top_k: Some(40),
        min_p,
        seed: Some(seed),
        max_new_tokens: Some(20),
        ignore_eos: Some(true),
        logprobs: Some(3),
        ..RawSamplingParams::default()
    };
    for seed in [1u64, 2, 3] {
        let backend = collect(
            &mut handle
                .submit(valid(&tok, &p, params(seed, None)))
                .expect("submit"),
        );
        let host = collect(
            &mut handle
                .submit(valid(&tok, &p, params(seed, Some(1e-30))))
                .expect("submit"),
        );
        assert_eq!(backend.failed, None);
        assert_eq!(backend.ids, host.ids, "seed {seed}");
        assert_eq!(backend.logprobs, host.logprobs, "seed {seed}");
    }
    assert_pool_full(&handle);
}

#[test]
fn stop_string_split_across_tokens_is_caught_and_excluded() {
    let (handle, _) = start_fake(config(), 256);
    let tok = tokenizer();
    let p = prompt(5, 12);
    let run = |params| collect(&mut handle.submit(valid(&tok, &p, params)).expect("submit"));
    // Find the per-token texts of a plain run, then pick a stop string made of the end of one
    // token's text and the start of the next.
    let mut stream = handle.submit(valid(&tok, &p, greedy(30))).expect("submit");
    let mut pieces = Vec::new();
    while let Some(event) = stream.blocking_next() {
        if let allam_types::EngineEvent::Delta(d) = event {
            pieces.push(d.text);
        }
    }
    let full: String = pieces.concat();
    let k = (3..pieces.len() - 1)
        .find(|&k| {
            let (a, b) = (&pieces[k], &pieces[k + 1]);
            a.chars().count() >= 2
                && !b.is_empty()
                && !a.contains('\u{fffd}')
                && !b.contains('\u{fffd}')
        })
        .expect("some adjacent pieces have text");
    let tail: String = pieces[k]
        .chars()
        .rev()
        .take(2)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let stop = format!("{tail}{}", pieces[k + 1].chars().next().expect("non-empty"));
    let cut = full.find(&stop).expect("stop occurs");
    let out = run(RawSamplingParams {
        stop: vec![stop.clone()],
        ..greedy(30)
    });
    let end = out.ends[0].clone().expect("ended");
    assert_eq!(end.0, FinishReason::Stop);
    assert_eq!(end.1, full[..cut]);
    assert_eq!(
        out.texts[0],
        full[..cut],
        "streamed text excludes the stop string"
    );
    assert!(!out.texts[0].contains(&stop));
    // With min_new_tokens past the stop point the string no longer stops the sequence.
    let out = run(RawSamplingParams {
        stop: vec![stop],
        min_new_tokens: Some(30),
        ..greedy(30)
    });
    assert_eq!(out.ends[0].clone().expect("ended").0, FinishReason::Length);
    assert_eq!(out.texts[0], full);
    assert_pool_full(&handle);
}

#[test]
fn stop_token_ids_end_the_sequence_without_text() {
    let (handle, _) = start_fake(config(), 256);
    let tok = tokenizer();
    let p = prompt(9, 10);
    let reference = fake_greedy(&p, 12);
    let stop_id = reference[4];
    let cut = reference
        .iter()
        .position(|&t| t == stop_id)
        .expect("present");
    let out = collect(
        &mut handle
            .submit(valid(
                &tok,
                &p,
                RawSamplingParams {
                    stop_token_ids: vec![i64::from(stop_id)],
                    ..greedy(12)
                },
            ))
            .expect("submit"),
    );
    assert_eq!(
        out.ids[0],
        reference[..=cut].to_vec(),
        "the stop token id is reported"
    );
    let text_before = tok.decode(&reference[..cut], true).expect("decodes");
    assert_eq!(out.texts[0], text_before);
    assert_eq!(out.ends[0].clone().expect("ended").0, FinishReason::Stop);
}

#[test]
fn logprobs_and_prompt_logprobs_follow_the_model() {
    let config = EngineConfig {
        prefill_chunk_size: Some(3),
        ..config()
    };
    let (handle, _) = start_fake(config, 256);
    let tok = tokenizer();
    let p = prompt(13, 11);
    // Cache the prompt first: prompt logprobs must still cover every position.
    collect(&mut handle.submit(valid(&tok, &p, greedy(2))).expect("submit"));
    let params = RawSamplingParams {
        logprobs: Some(3),
        prompt_logprobs: Some(2),
        ..greedy(5)
    };
    let out = collect(&mut handle.submit(valid(&tok, &p, params)).expect("submit"));
    let log_softmax = |ctx: &[TokenId], id: TokenId| {
        let l = fake_logits(ctx, FAKE_VOCAB);
        let max = l.iter().copied().fold(f32::MIN, f32::max) as f64;
        let z: f64 = l.iter().map(|&x| (x as f64 - max).exp()).sum();
        (l[id as usize] as f64 - max - z.ln()) as f32
    };
    let prompt_lp = out.prompt_logprobs.clone().expect("asked for");
    assert_eq!(prompt_lp.len(), p.len());
    assert!(prompt_lp[0].is_none());
    for t in 1..p.len() {
        let lp = prompt_lp[t].clone().expect("every later position");
        assert_eq!(lp.chosen.id, p[t]);
        assert!((lp.chosen.logprob - log_softmax(&p[..t], p[t])).abs() < 1e-4);
        assert_eq!(lp.top.len(), 2);
    }
    let mut context = p.clone();
    for (step, lp) in out.logprobs[0].iter().enumerate() {
        let id = out.ids[0][step];
        assert_eq!(lp.chosen.id, id);
        assert_eq!(lp.top[0].id, id, "greedy picks the top token");
        assert!((lp.chosen.logprob - log_softmax(&context, id)).abs() < 1e-4);
        context.push(id);
    }
    assert_eq!(
        out.usage.expect("finished").cached_tokens,
        0,
        "no cache with prompt logprobs"
    );
}

#[test]
fn dropping_streams_cancels_and_frees_every_block() {
    let (handle, _) = start_fake(config(), 256);
    let tok = tokenizer();
    let running = Started::until_first_token(
        handle
            .submit(valid(&tok, &prompt(1, 30), greedy(900)))
            .expect("submit"),
    );
    let queued: Vec<_> = (0..3)
        .map(|i| {
            handle
                .submit(valid(&tok, &prompt(i, 50), greedy(900)))
                .expect("submit")
        })
        .collect();
    wait_until("work in the pool", || handle.stats().kv_blocks_used > 0);
    drop(running);
    drop(queued);
    assert_pool_full(&handle);
    assert_eq!(handle.stats().queued_requests, 0);
}

#[test]
fn stream_impl_ends_with_finished() {
    let (handle, _) = start_fake(config(), 256);
    let tok = tokenizer();
    let stream = handle
        .submit(valid(&tok, &prompt(2, 6), greedy(3)))
        .expect("submit");
    let events: Vec<_> = futures::executor::block_on(stream.collect());
    assert!(matches!(
        events.first(),
        Some(allam_types::EngineEvent::Started { .. })
    ));
    assert!(matches!(
        events.last(),
        Some(allam_types::EngineEvent::Finished { .. })
    ));
    assert_eq!(events.len(), 1 + 3 + 1 + 1);
}

#[test]
fn admission_errors_are_typed() {
    let config = EngineConfig {
        max_waiting: 2,
        ..config()
    };
    let (handle, hooks) = start_fake(config, 16); // 64 tokens of cache
    let tok = tokenizer();
    match handle.submit(valid(&tok, &prompt(1, 60), greedy(10))) {
        Err(Error::PromptTooLarge {
            capacity_tokens: 64,
            ..
        }) => {}
        other => panic!("expected PromptTooLarge, got {other:?}"),
    }
    let last_id = valid(&tok, &[1, 3999], greedy(1));
    let out = collect(
        &mut handle
            .submit(last_id)
            .expect("ids within the vocabulary are fine"),
    );
    assert_eq!(out.failed, None);
    // Hold the engine inside a step, so submissions stay queued.
    hooks.gate.close();
    let entered = hooks.gate.entered.load(Ordering::SeqCst);
    let first = handle
        .submit(valid(&tok, &prompt(2, 5), greedy(50)))
        .expect("submit");
    wait_until("a step to start", || {
        hooks.gate.entered.load(Ordering::SeqCst) > entered
    });
    let queued: Vec<_> = (0..2)
        .map(|i| {
            handle
                .submit(valid(&tok, &prompt(i, 5), greedy(1)))
                .expect("room for 2")
        })
        .collect();
    match handle.submit(valid(&tok, &prompt(9, 5), greedy(1))) {
        Err(Error::QueueFull { max_waiting: 2 }) => {}
        other => panic!("expected QueueFull, got {other:?}"),
    }
    hooks.gate.open();
    drop(first);
    for mut s in queued {
        assert_eq!(collect(&mut s).failed, None);
    }
    handle.shutdown();
    assert!(matches!(
        handle.submit(valid(&tok, &prompt(1, 5), greedy(1))),
        Err(Error::Stopped)
    ));
}

#[test]
fn drain_hands_back_queued_then_shutdown_fails_running() {
    let (handle, hooks) = start_fake(config(), 256);
    let tok = tokenizer();
    hooks.gate.close();
    let entered = hooks.gate.entered.load(Ordering::SeqCst);
    let running = handle
        .submit(valid(&tok, &prompt(1, 5), greedy(900)))
        .expect("submit");
    wait_until("a step to start", || {
        hooks.gate.entered.load(Ordering::SeqCst) > entered
    });
    let mut queued = handle
        .submit(valid(&tok, &prompt(2, 5), greedy(100)))
        .expect("submit");
    handle.drain();
    assert!(matches!(
        handle.submit(valid(&tok, &prompt(3, 5), greedy(1))),
        Err(Error::Stopped)
    ));
    hooks.gate.open();
    let queued_out = collect(&mut queued);
    assert_eq!(
        queued_out.failed.map(|f| f.0),
        Some(failure_reason::UNAVAILABLE.to_owned()),
        "a request that never started is handed back as retryable"
    );
    // The running request goes on after the drain...
    let running = Started::until_first_token(running);
    // ...until shutdown fails it.
    hooks.gate.close();
    let entered = hooks.gate.entered.load(Ordering::SeqCst);
    wait_until("another step", || {
        hooks.gate.entered.load(Ordering::SeqCst) > entered
    });
    let shutdown = {
        let handle = handle.clone();
        std::thread::spawn(move || handle.shutdown())
    };
    hooks.gate.open();
    shutdown.join().expect("shutdown joins");
    let running_out = running.finish();
    assert!(!running_out.ids[0].is_empty());
    assert_eq!(
        running_out.failed.map(|f| f.0),
        Some(failure_reason::SHUTDOWN.to_owned())
    );
}

#[test]
fn a_failed_step_fails_its_requests_and_the_engine_goes_on() {
    let (handle, hooks) = start_fake(config(), 256);
    let tok = tokenizer();
    hooks.fail.store(true, Ordering::SeqCst);
    let out = collect(
        &mut handle
            .submit(valid(&tok, &prompt(1, 5), greedy(4)))
            .expect("submit"),
    );
    assert_eq!(
        out.failed.map(|f| f.0),
        Some(failure_reason::ENGINE_ERROR.to_owned())
    );
    hooks.fail.store(false, Ordering::SeqCst);
    let p = prompt(1, 5);
    let out = collect(&mut handle.submit(valid(&tok, &p, greedy(4))).expect("submit"));
    assert_eq!(out.ids[0], fake_greedy(&p, 4));
    assert_pool_full(&handle);
}

/// One request of a random mix.
#[derive(Debug, Clone)]
struct MixItem {
    prefix: usize,
    suffix_len: usize,
    max_new: usize,
    priority: i64,
    n: i64,
}

fn mix_item() -> impl Strategy<Value = MixItem> {
    (0usize..3, 0usize..12, 1usize..12, 0i64..3, 1i64..3).prop_map(
        |(prefix, suffix_len, max_new, priority, n)| MixItem {
            prefix,
            suffix_len,
            max_new,
            priority,
            n,
        },
    )
}

fn run_mix(
    config: EngineConfig,
    items: &[MixItem],
    prefixes: &[Vec<TokenId>],
) -> Vec<Vec<Vec<TokenId>>> {
    let num_blocks = config.num_blocks.expect("sized");
    let (handle, _) = start_fake(config, num_blocks);
    let tok = tokenizer();
    let streams: Vec<_> = items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let mut ids = prefixes[item.prefix].clone();
            ids.extend((0..item.suffix_len as u32).map(|t| 1000 + i as u32 * 7 + t));
            let params = RawSamplingParams {
                priority: Some(item.priority),
                n: Some(item.n),
                ..greedy(item.max_new as i64)
            };
            handle.submit(valid(&tok, &ids, params)).expect("submit")
        })
        .collect();
    let outs = streams
        .into_iter()
        .map(|mut s| {
            let out = collect(&mut s);
            assert_eq!(out.failed, None);
            out.ids
        })
        .collect();
    assert_pool_full(&handle);
    handle.shutdown();
    outs
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    /// Eviction and sharing under pressure never corrupt a block: a tight, caching, chunked
    /// engine gives what a roomy engine without caching gives.
    #[test]
    fn random_mixes_under_pressure_match_a_no_cache_run(items in prop::collection::vec(mix_item(), 1..10)) {
        let prefixes: Vec<Vec<TokenId>> = (0..3).map(|i| prompt(100 + i, 9 + 4 * i as usize)).collect();
        let tight = EngineConfig {
            num_blocks: Some(14),
            prefill_chunk_size: Some(5),
            max_num_batched_tokens: 16,
            ..config()
        };
        let roomy = EngineConfig {
            enable_prefix_caching: false,
            num_blocks: Some(512),
            ..config()
        };
        let got = run_mix(tight, &items, &prefixes);
        let want = run_mix(roomy, &items, &prefixes);
        prop_assert_eq!(got, want);
    }
}

/// (sequences, every slot padding) of each step a [`WarmupProbe`] executed.
type SeenSteps = std::sync::Arc<std::sync::Mutex<Vec<(usize, bool)>>>;

/// Reports graph sizes like a CUDA backend with `--cuda-graphs` and records every step.
struct WarmupProbe {
    inner: FakeKvModel,
    sizes: Vec<usize>,
    seen: SeenSteps,
    fail_size: Option<usize>,
}

impl allam_engine::StepExecutor for WarmupProbe {
    fn execute(
        &mut self,
        batch: &allam_backend::StepBatch,
        sampling: &allam_engine::StepSampling,
    ) -> Result<allam_engine::StepOutput, allam_engine::ExecutorError> {
        let padding = batch
            .slot_mapping
            .iter()
            .all(|&s| s == allam_backend::PAD_SLOT);
        self.seen
            .lock()
            .expect("probe lock")
            .push((batch.seqs.len(), padding));
        if Some(batch.seqs.len()) == self.fail_size && padding {
            return Err("out of memory capturing".into());
        }
        self.inner.execute(batch, sampling)
    }

    fn graph_batch_sizes(&self) -> Vec<usize> {
        self.sizes.clone()
    }
}

fn probe_engine(
    fail_size: Option<usize>,
) -> (Result<allam_engine::EngineHandle, Error>, SeenSteps) {
    let config = config();
    let num_blocks = config.num_blocks.expect("sized");
    let seen = std::sync::Arc::default();
    let probe = WarmupProbe {
        inner: FakeKvModel::new(num_blocks, config.block_size),
        sizes: vec![1, 2, 4],
        seen: std::sync::Arc::clone(&seen),
        fail_size,
    };
    let info = allam_engine::ModelInfo {
        vocab_size: FAKE_VOCAB,
        max_context: 4096,
        eos_token_ids: vec![2],
        block_size: config.block_size,
        num_blocks,
    };
    let started =
        allam_engine::Engine::start_with_executor(Box::new(probe), info, tokenizer(), config);
    (started, seen)
}

/// Before serving, the engine runs one padding-only step per graph size, largest first; they
/// write no KV, so requests afterwards see exactly what an engine without graphs gives.
#[test]
fn graph_sizes_are_warmed_up_before_serving_without_touching_the_cache() {
    let (handle, seen) = probe_engine(None);
    let handle = handle.expect("engine starts");
    assert_eq!(
        *seen.lock().expect("probe lock"),
        [(4, true), (2, true), (1, true)]
    );
    let tok = tokenizer();
    let p = prompt(3, 11);
    let warmed = collect(&mut handle.submit(valid(&tok, &p, greedy(12))).expect("submit"));
    let (plain, _) = start_fake(config(), 256);
    let reference = collect(&mut plain.submit(valid(&tok, &p, greedy(12))).expect("submit"));
    assert_eq!(warmed.failed, None);
    assert_eq!(warmed.ids, reference.ids);
    assert_pool_full(&handle);
}

#[test]
fn a_failed_graph_warm_up_fails_start_up_naming_the_size() {
    let (started, _) = probe_engine(Some(2));
    let err = started.err().expect("start-up fails");
    assert!(matches!(err, Error::GraphWarmup { size: 2, .. }), "{err}");
    assert!(err.to_string().contains("2 sequences"), "{err}");
}
