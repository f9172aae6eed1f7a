//! A reader that falls behind pauses its own request, never the engine: bounded event
//! buffers, pausing, resuming with the same output, and `client_too_slow` after the write
//! timeout with every block freed.

use std::time::Duration;

use allam_engine::{failure_reason, EngineConfig};
use allam_request::RawSamplingParams;
use allam_types::{EngineEvent, TokenId};

use crate::support::*;

const BUFFER: usize = 8;

fn config(write_timeout: Duration) -> EngineConfig {
    EngineConfig {
        block_size: 4,
        num_blocks: Some(256),
        kv_cache_bytes: None,
        max_num_batched_tokens: 64,
        max_num_seqs: 16,
        stream_buffer_events: BUFFER,
        stream_write_timeout: write_timeout,
        ..EngineConfig::default()
    }
}

fn prompt(seed: u32, len: usize) -> Vec<TokenId> {
    let mut ids = vec![1];
    ids.extend((1..len as u32).map(|i| 3 + (seed * 97 + i * 13) % 3990));
    ids
}

#[test]
fn a_reader_that_stops_pauses_only_its_own_request_then_fails_too_slow() {
    let (handle, _) = start_fake(config(Duration::from_secs(1)), 256);
    let tok = tokenizer();
    let mut stalled = handle
        .submit(valid(&tok, &prompt(1, 12), greedy(900)))
        .expect("submit");
    wait_until("the stalled request to hold blocks", || {
        handle.stats().kv_blocks_used > 0
    });
    // Another request runs to the end beside it.
    let p = prompt(2, 9);
    let out = collect(&mut handle.submit(valid(&tok, &p, greedy(30))).expect("submit"));
    assert_eq!(out.failed, None);
    assert_eq!(out.ids[0], fake_greedy(&p, 30));

    // Paused: no more steps, its blocks kept, while the write timeout runs.
    let before = handle.stats();
    std::thread::sleep(Duration::from_millis(200));
    let after = handle.stats();
    assert_eq!(after.steps, before.steps, "a paused request is not stepped");
    assert!(
        after.kv_blocks_used > 0,
        "a paused request keeps its blocks"
    );

    // Read only once the write timeout has freed the blocks: reading earlier would resume it.
    assert_pool_full(&handle);
    let events: Vec<EngineEvent> = std::iter::from_fn(|| stalled.blocking_next()).collect();
    let deltas = events
        .iter()
        .filter(|e| matches!(e, EngineEvent::Delta(_)))
        .count();
    assert!(
        deltas < BUFFER,
        "the engine generated {deltas} tokens for a reader that read nothing (buffer {BUFFER})"
    );
    match events.last() {
        Some(EngineEvent::Failed { reason, message }) => {
            assert_eq!(*reason, failure_reason::CLIENT_TOO_SLOW);
            assert!(message.contains("read no output"), "{message}");
        }
        other => panic!("expected client_too_slow, got {other:?}"),
    }
    let generated: Vec<TokenId> = events
        .iter()
        .filter_map(|e| match e {
            EngineEvent::Delta(d) => Some(d.token_ids[0]),
            _ => None,
        })
        .collect();
    assert_eq!(generated, fake_greedy(&prompt(1, 12), generated.len()));
}

#[test]
fn a_slow_reader_gets_exactly_what_a_fast_one_gets() {
    let (handle, _) = start_fake(config(Duration::from_secs(30)), 256);
    let tok = tokenizer();
    for n in [1, 3] {
        let p = prompt(3 + n, 14);
        let params = RawSamplingParams {
            n: Some(i64::from(n)),
            logprobs: Some(2),
            ..greedy(40)
        };
        let fast = collect(
            &mut handle
                .submit(valid(&tok, &p, params.clone()))
                .expect("submit"),
        );
        let mut stream = handle.submit(valid(&tok, &p, params)).expect("submit");
        let slow = outcome(std::iter::from_fn(|| {
            // Slower than a step, so the buffer fills and the request pauses and resumes.
            std::thread::sleep(Duration::from_millis(3));
            stream.blocking_next()
        }));
        assert_eq!(slow.failed, None, "n = {n}");
        assert_eq!(slow.ids.len(), n as usize);
        for ids in &slow.ids {
            assert_eq!(ids, &fake_greedy(&p, 40), "n = {n}");
        }
        assert_eq!(slow.ids, fast.ids);
        assert_eq!(slow.logprobs, fast.logprobs);
        assert_eq!(slow.ends, fast.ends);
    }
    assert_pool_full(&handle);
}
