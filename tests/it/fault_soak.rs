//! Fault soak: many concurrent seeded SSE chat streams through a router over three worker
//! groups, while one group is killed with SIGKILL and, once it has left etcd, another is
//! drained with SIGTERM.
//!
//! Each stream must either finish with exactly the unary answer for its seed (taken through
//! the router before the load), or, only when it had its first chunk before the kill, end
//! with an explicit error event naming the killed group, its partial text a prefix of the
//! reference (nothing lost, nothing duplicated). Streams that had not started are retried by
//! the router before their first token, so they must complete; the drained group finishes
//! what it runs, so SIGTERM costs no stream at all. Every request is bounded by a timeout,
//! so a hang is an error too. After the faults the last group still gives the reference
//! answers. Loopback only; the whole test stays well under a minute.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::Value;

use crate::soak::{references, request, Answer, MAX_TOKENS};
use crate::support::{
    http_get_status, registered_groups, start_router, wait_until, EtcdServer, Worker,
};

const TASKS: usize = 128;
const SOAK: Duration = Duration::from_secs(15);
/// When, after the load starts, the first group is killed.
const KILL_AFTER: Duration = Duration::from_secs(3);
/// A stream longer than this is a hang.
const STREAM_TIMEOUT: Duration = Duration::from_secs(30);
const SEEDS: u64 = crate::soak::SEEDS;

/// How one stream ended, as seen by the client.
#[derive(Debug)]
enum Outcome {
    /// `[DONE]` without an error event.
    Completed(Answer),
    /// An error event (then `[DONE]`): its message and the text received before it.
    ErrorEvent { message: String, partial: String },
    /// Anything else: a non-200 status, a transport error, no `[DONE]`, a timeout.
    Broken(String),
}

#[derive(Debug)]
struct Record {
    seed: u64,
    started: Instant,
    first_chunk: Option<Instant>,
    outcome: Outcome,
}

/// One SSE stream to its end, noting when its first chunk arrived.
async fn stream_once(client: &reqwest::Client, url: &str, seed: u64) -> Record {
    let started = Instant::now();
    let mut first_chunk = None;
    let outcome = match tokio::time::timeout(
        STREAM_TIMEOUT,
        read_stream(client, url, seed, &mut first_chunk),
    )
    .await
    {
        Ok(outcome) => outcome,
        Err(_) => Outcome::Broken(format!("seed {seed}: no end within {STREAM_TIMEOUT:?}")),
    };
    Record {
        seed,
        started,
        first_chunk,
        outcome,
    }
}

async fn read_stream(
    client: &reqwest::Client,
    url: &str,
    seed: u64,
    first_chunk: &mut Option<Instant>,
) -> Outcome {
    let response = match client.post(url).json(&request(seed, true)).send().await {
        Ok(r) => r,
        Err(e) => return Outcome::Broken(format!("seed {seed}: {e}")),
    };
    let status = response.status().as_u16();
    if status != 200 {
        let body = response.text().await.unwrap_or_default();
        return Outcome::Broken(format!("seed {seed}: status {status} {body}"));
    }
    let mut bytes = response.bytes_stream();
    let mut buffer = Vec::new();
    let mut answer = Answer {
        text: String::new(),
        finish: String::new(),
        tokens: 0,
    };
    let mut error = None;
    let mut done = false;
    while let Some(chunk) = bytes.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return Outcome::Broken(format!("seed {seed}: transport: {e}")),
        };
        buffer.extend_from_slice(&chunk);
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buffer.drain(..end + 2).collect();
            let Ok(event) = String::from_utf8(event) else {
                return Outcome::Broken(format!("seed {seed}: event is not UTF-8"));
            };
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if done {
                return Outcome::Broken(format!("seed {seed}: data after [DONE]: {data}"));
            }
            if data == "[DONE]" {
                done = true;
                continue;
            }
            if error.is_some() {
                return Outcome::Broken(format!("seed {seed}: data after error event: {data}"));
            }
            let value: Value = match serde_json::from_str(data) {
                Ok(v) => v,
                Err(e) => return Outcome::Broken(format!("seed {seed}: {e}: {data}")),
            };
            if let Some(err) = value.get("error") {
                error = Some(err["message"].as_str().unwrap_or("").to_owned());
                continue;
            }
            first_chunk.get_or_insert_with(Instant::now);
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
        return Outcome::Broken(format!("seed {seed}: ended without [DONE]"));
    }
    match error {
        Some(message) => Outcome::ErrorEvent {
            message,
            partial: answer.text,
        },
        None => Outcome::Completed(answer),
    }
}

/// When the faults happened, for classifying the streams afterwards.
struct Faults {
    killed_at: Instant,
    terminated_at: Instant,
}

#[test]
fn fault_soak_kill_and_sigterm_under_streaming_load() {
    let dir = tempfile::tempdir().expect("temp dir");
    let etcd = EtcdServer::start().expect("etcd (Debian etcd-server) must be installed");
    let endpoint = etcd.endpoint();
    let w0 = Worker::start("w0", &endpoint, dir.path(), &[], &[]);
    let w1 = Worker::start(
        "w1",
        &endpoint,
        dir.path(),
        &["--shutdown-timeout", "20"],
        &[],
    );
    let w2 = Worker::start("w2", &endpoint, dir.path(), &[], &[]);
    let (router, http) = start_router(&endpoint, dir.path(), &[], &[]);
    wait_until(
        "three groups registered in etcd",
        Duration::from_secs(90),
        || registered_groups(&endpoint).len() == 3,
    );
    wait_until("router ready", Duration::from_secs(30), || {
        http_get_status(&format!("{http}/ready")) == Some(200)
    });
    // The router learns membership through its watch; give it all groups before loading.
    std::thread::sleep(Duration::from_millis(500));
    let url = format!("{http}/v1/chat/completions");

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (records, faults, mut w1, before, after) = runtime.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(STREAM_TIMEOUT)
            .pool_max_idle_per_host(TASKS)
            .build()
            .expect("client");
        let before = references(&client, &url).await;
        let started = Instant::now();
        let deadline = started + SOAK;
        let tasks: Vec<_> = (0..TASKS)
            .map(|task| {
                let (client, url) = (client.clone(), url.clone());
                tokio::spawn(async move {
                    let mut records = Vec::new();
                    let mut round = 0;
                    while round == 0 || Instant::now() < deadline {
                        let seed = (task as u64 + round) % SEEDS;
                        round += 1;
                        records.push(stream_once(&client, &url, seed).await);
                    }
                    records
                })
            })
            .collect();
        // The faults run on a blocking thread: they poll etcd and wait on processes.
        let endpoint_for_faults = endpoint.clone();
        let faults = tokio::task::spawn_blocking(move || {
            let pause = KILL_AFTER.saturating_sub(started.elapsed());
            std::thread::sleep(pause);
            w0.proc.signal(libc::SIGKILL);
            let killed_at = Instant::now();
            // SIGTERM only once the killed group is gone from etcd, so that the drain is
            // checked on its own: no stream may fail because of it.
            wait_until("w0 leaves etcd", Duration::from_secs(2 + 2 + 5), || {
                !registered_groups(&endpoint_for_faults).contains(&"w0".to_owned())
            });
            std::thread::sleep(Duration::from_secs(1));
            w1.proc.signal(libc::SIGTERM);
            let terminated_at = Instant::now();
            drop(w0);
            (
                Faults {
                    killed_at,
                    terminated_at,
                },
                w1,
            )
        });
        let mut records = Vec::new();
        for task in tasks {
            records.extend(task.await.expect("soak task"));
        }
        let (faults, w1) = faults.await.expect("fault thread");
        let after = references(&client, &url).await;
        (records, faults, w1, before, after)
    });

    let mut identical = 0;
    let mut failed_after_first = 0;
    let mut identical_after_sigterm = 0;
    let mut other = Vec::new();
    for record in &records {
        let reference = &before[&record.seed];
        match &record.outcome {
            Outcome::Completed(answer) if answer == reference => {
                identical += 1;
                if record.started > faults.terminated_at {
                    identical_after_sigterm += 1;
                }
            }
            Outcome::Completed(answer) => other.push(format!(
                "seed {}: streamed {answer:?} != unary {reference:?}",
                record.seed
            )),
            Outcome::ErrorEvent { message, partial }
                if record.first_chunk.is_some_and(|t| t < faults.killed_at)
                    && message.contains("worker group w0")
                    && reference.text.starts_with(partial.as_str()) =>
            {
                failed_after_first += 1;
            }
            Outcome::ErrorEvent { message, partial } => other.push(format!(
                "seed {}: error event {message:?} after {partial:?} (first chunk {:?} after \
                 start, kill {:?} after start)",
                record.seed,
                record.first_chunk.map(|t| t - record.started),
                faults.killed_at.checked_duration_since(record.started),
            )),
            Outcome::Broken(why) => other.push(why.clone()),
        }
    }
    eprintln!(
        "fault soak: {} streams by {TASKS} clients, {MAX_TOKENS} tokens each: {identical} \
         identical, {failed_after_first} failed after the first token (kill -9 of w0), {} \
         other errors; {identical_after_sigterm} identical streams started after SIGTERM of w1",
        records.len(),
        other.len()
    );
    assert!(
        other.is_empty(),
        "{} other errors in {} streams, first ones:\n{}\nrouter log tail:\n{}",
        other.len(),
        records.len(),
        other
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n"),
        tail(&router.log_text(), 40)
    );
    assert_eq!(identical + failed_after_first, records.len());
    assert!(records.len() >= TASKS, "only {} streams", records.len());
    assert!(
        identical_after_sigterm > 0,
        "no stream started after the SIGTERM completed: the last group did not serve"
    );
    assert!(
        before.values().any(|a| a.tokens > 1),
        "degenerate references: {before:?}"
    );
    // Only w2 is left; it gives the same answers as the three groups did before the faults.
    assert_eq!(after, before, "unary answers changed across the faults");
    assert_eq!(registered_groups(&endpoint), vec!["w2".to_owned()]);
    let status = w1
        .proc
        .wait_exit(Duration::from_secs(25))
        .expect("w1 exits after draining");
    assert!(
        status.success(),
        "w1 exit {status}:\n{}",
        tail(&w1.proc.log_text(), 40)
    );
    assert!(w2.generated_tokens() > 0.0, "w2 never served");
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
