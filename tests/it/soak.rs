//! Soak: 256 concurrent seeded SSE chat streams against one real `allam serve`, repeated for
//! a bounded time, with zero errors and zero lost or duplicated tokens.
//!
//! Every stream uses one of 32 seeds (each with its own prompt); its concatenated deltas,
//! finish reason and token count must equal the unary answer for the same seed and
//! parameters, taken before the load. The unary answers are taken again after the load and
//! must not have changed. The run lasts `ALLAM_SOAK_SECS` seconds (default 20 to keep CI
//! fast); the 60 s run is `ALLAM_SOAK_SECS=60 cargo test -p allam-serve --test it soak`.
//! Loopback only; every loop is bounded by the deadline and every request by a timeout.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

use crate::support::{fixtures_dir, Serve};

const STREAMS: usize = 256;
pub(crate) const SEEDS: u64 = 32;
pub(crate) const MAX_TOKENS: u32 = 16;

/// What a request produced: text, finish reason, completion tokens.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Answer {
    pub(crate) text: String,
    pub(crate) finish: String,
    pub(crate) tokens: u64,
}

fn soak_secs() -> u64 {
    std::env::var("ALLAM_SOAK_SECS")
        .ok()
        .map(|s| s.parse().expect("ALLAM_SOAK_SECS is a number of seconds"))
        .unwrap_or(20)
}

pub(crate) fn request(seed: u64, stream: bool) -> Value {
    let mut body = json!({
        "messages": [{"role": "user", "content": format!("Soak {seed}: how do I brew a good cup of tea?")}],
        "max_tokens": MAX_TOKENS, "temperature": 0.8, "top_p": 0.95, "seed": seed,
    });
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

async fn unary(client: &reqwest::Client, url: &str, seed: u64) -> Result<Answer, String> {
    let response = client
        .post(url)
        .json(&request(seed, false))
        .send()
        .await
        .map_err(|e| format!("unary seed {seed}: {e}"))?;
    let status = response.status().as_u16();
    let body: Value = response
        .json()
        .await
        .map_err(|e| format!("unary seed {seed}: {e}"))?;
    if status != 200 {
        return Err(format!("unary seed {seed}: {status} {body}"));
    }
    let choice = &body["choices"][0];
    Ok(Answer {
        text: choice["message"]["content"]
            .as_str()
            .unwrap_or("")
            .to_owned(),
        finish: choice["finish_reason"].as_str().unwrap_or("").to_owned(),
        tokens: body["usage"]["completion_tokens"].as_u64().unwrap_or(0),
    })
}

/// One SSE stream to its end: deltas concatenated, `[DONE]` required, usage from the last chunk.
async fn streamed(client: &reqwest::Client, url: &str, seed: u64) -> Result<Answer, String> {
    let response = client
        .post(url)
        .json(&request(seed, true))
        .send()
        .await
        .map_err(|e| format!("stream seed {seed}: {e}"))?;
    let status = response.status().as_u16();
    if status != 200 {
        let body = response.text().await.unwrap_or_default();
        return Err(format!("stream seed {seed}: {status} {body}"));
    }
    let mut bytes = response.bytes_stream();
    let mut buffer = Vec::new();
    let mut answer = Answer {
        text: String::new(),
        finish: String::new(),
        tokens: 0,
    };
    let mut done = false;
    while let Some(chunk) = bytes.next().await {
        let chunk = chunk.map_err(|e| format!("stream seed {seed}: {e}"))?;
        buffer.extend_from_slice(&chunk);
        // Events end with a blank line; split on bytes so a multi-byte character cut by the
        // transport is joined before decoding.
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buffer.drain(..end + 2).collect();
            let event = String::from_utf8(event).map_err(|e| format!("seed {seed}: {e}"))?;
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if done {
                return Err(format!("stream seed {seed}: data after [DONE]: {data}"));
            }
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let value: Value =
                serde_json::from_str(data).map_err(|e| format!("seed {seed}: {e}: {data}"))?;
            if value.get("error").is_some() {
                return Err(format!("stream seed {seed}: error event {value}"));
            }
            if let Some(tokens) = value["usage"]["completion_tokens"].as_u64() {
                answer.tokens = tokens;
            }
            if let Some(choice) = value["choices"].get(0) {
                answer
                    .text
                    .push_str(choice["delta"]["content"].as_str().unwrap_or(""));
                if let Some(reason) = choice["finish_reason"].as_str() {
                    answer.finish = reason.to_owned();
                }
            }
        }
    }
    if !done {
        return Err(format!("stream seed {seed}: ended without [DONE]"));
    }
    Ok(answer)
}

pub(crate) async fn references(client: &reqwest::Client, url: &str) -> HashMap<u64, Answer> {
    let tasks: Vec<_> = (0..SEEDS)
        .map(|seed| {
            let (client, url) = (client.clone(), url.to_owned());
            tokio::spawn(async move { (seed, unary(&client, &url, seed).await) })
        })
        .collect();
    let mut answers = HashMap::new();
    for task in tasks {
        let (seed, answer) = task.await.expect("reference task");
        answers.insert(seed, answer.expect("reference request"));
    }
    answers
}

#[test]
fn soak_256_concurrent_streams_match_unary_runs() {
    let model = fixtures_dir().join("tiny-allam");
    let serve = Serve::start(&["--model", model.to_str().expect("utf-8 path")], &[]);
    let url = format!("{}/v1/chat/completions", serve.http);
    let secs = soak_secs();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .pool_max_idle_per_host(STREAMS)
            .build()
            .expect("client");
        let before = references(&client, &url).await;
        let expected = Arc::new(before.clone());
        let started = Instant::now();
        let deadline = started + Duration::from_secs(secs);
        let completed = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..STREAMS)
            .map(|worker| {
                let (client, url) = (client.clone(), url.clone());
                let (expected, completed) = (expected.clone(), completed.clone());
                tokio::spawn(async move {
                    let mut errors = Vec::new();
                    let mut round = 0;
                    // At least one stream per worker, so all 256 are in flight at the start.
                    while round == 0 || Instant::now() < deadline {
                        let seed = (worker as u64 + round) % SEEDS;
                        round += 1;
                        match streamed(&client, &url, seed).await {
                            Ok(answer) if answer == expected[&seed] => {}
                            Ok(answer) => errors.push(format!(
                                "seed {seed}: streamed {answer:?} != unary {:?}",
                                expected[&seed]
                            )),
                            Err(e) => errors.push(e),
                        }
                        completed.fetch_add(1, Ordering::Relaxed);
                        if errors.len() >= 3 {
                            break;
                        }
                    }
                    errors
                })
            })
            .collect();
        let mut errors = Vec::new();
        for worker in workers {
            errors.extend(worker.await.expect("soak worker"));
        }
        let elapsed = started.elapsed();
        let streams = completed.load(Ordering::Relaxed);
        eprintln!(
            "soak: {streams} streams of {MAX_TOKENS} tokens by {STREAMS} clients in {:.1} s \
             ({:.1} streams/s), {} errors",
            elapsed.as_secs_f64(),
            streams as f64 / elapsed.as_secs_f64(),
            errors.len()
        );
        assert!(
            errors.is_empty(),
            "{} errors in {streams} streams, first ones:\n{}",
            errors.len(),
            errors
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(streams >= STREAMS, "only {streams} streams finished");
        assert!(
            before.values().any(|a| a.tokens > 1),
            "degenerate references: {before:?}"
        );
        // The load changed nothing: unary answers after it equal those before it.
        let after = references(&client, &url).await;
        assert_eq!(after, before, "unary answers changed across the soak");
    });
}
