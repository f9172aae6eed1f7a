//! The timed loop: sends each request at its scheduled time (and only when a concurrency slot
//! is free), streams it on its own task, and gathers the outcomes.
//!
//! Each request runs on a spawned task so that reading hundreds of streams spreads over the
//! runtime's threads; a single task polling every stream would add its own queueing to the
//! measured latencies. The clock of a request starts when it is sent, after it got its slot,
//! as in `vllm bench serve`: waiting for `max_concurrency` is the client's choice, not server
//! latency.
//!
//! Invariant: dropping the run future aborts every request task it spawned, so a cancelled
//! benchmark (Ctrl-C in the CLI) leaves no streams running against the server.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::client::Client;
use crate::dataset::RequestSpec;
use crate::measure::{Failure, FailureKind, Success};

/// How the loop runs, taken from `BenchConfig`.
pub(crate) struct LoopConfig {
    pub offsets: Vec<Duration>,
    pub max_concurrency: Option<usize>,
    pub timeout: Duration,
    pub seed: u64,
    pub progress: bool,
}

/// What the loop observed besides the per-request outcomes.
pub(crate) struct LoopResult {
    /// Outcomes in request order.
    pub outcomes: Vec<Result<Success, Failure>>,
    /// First send to last completion.
    pub duration: Duration,
    pub peak_in_flight: usize,
}

/// Aborts the request tasks when the run is dropped before they finish.
struct AbortOnDrop(Vec<AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for handle in &self.0 {
            handle.abort();
        }
    }
}

fn progress_bar(enabled: bool, n_requests: usize) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(n_requests as u64), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{bar:40} {pos}/{len} requests [{elapsed_precise}<{eta_precise}] {msg}",
    ) {
        bar.set_style(style);
    }
    bar
}

pub(crate) async fn run_loop(
    client: Arc<Client>,
    specs: Vec<RequestSpec>,
    config: LoopConfig,
) -> LoopResult {
    let n_requests = specs.len();
    let semaphore = config
        .max_concurrency
        .map(|limit| Arc::new(Semaphore::new(limit)));
    // Capacity for every outcome: a request task never waits on the collector.
    let (outcome_tx, mut outcome_rx) = mpsc::channel(n_requests.max(1));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak_in_flight = Arc::new(AtomicUsize::new(0));
    let bar = progress_bar(config.progress, n_requests);
    let mut tasks = AbortOnDrop(Vec::with_capacity(n_requests));
    let start = Instant::now();

    let dispatch = async {
        for (idx, (spec, offset)) in specs.into_iter().zip(config.offsets).enumerate() {
            tokio::time::sleep_until(start + offset).await;
            let permit = match &semaphore {
                Some(semaphore) => Some(
                    Arc::clone(semaphore)
                        .acquire_owned()
                        .await
                        .expect("the semaphore is never closed"),
                ),
                None => None,
            };
            let client = Arc::clone(&client);
            let outcome_tx = outcome_tx.clone();
            let in_flight = Arc::clone(&in_flight);
            let peak_in_flight = Arc::clone(&peak_in_flight);
            let timeout = config.timeout;
            let seed = config.seed.wrapping_add(idx as u64);
            let task = tokio::spawn(async move {
                let now_in_flight = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                peak_in_flight.fetch_max(now_in_flight, Ordering::SeqCst);
                let outcome = match tokio::time::timeout(timeout, client.send(&spec, seed)).await {
                    Ok(outcome) => outcome,
                    Err(_) => Err(Failure::new(
                        FailureKind::Timeout,
                        format!("no end of stream within {timeout:?}"),
                    )),
                };
                let finished_at = Instant::now();
                in_flight.fetch_sub(1, Ordering::SeqCst);
                drop(permit);
                // The receiver outlives every task unless the run itself was dropped.
                let _ = outcome_tx.send((idx, outcome, finished_at)).await;
            });
            tasks.0.push(task.abort_handle());
        }
        // The collector stops once the last task's sender is gone too.
        drop(outcome_tx);
    };

    let collect = async {
        let mut outcomes: Vec<Option<Result<Success, Failure>>> = vec![None; n_requests];
        let mut last_finish = start;
        let mut n_failed = 0_usize;
        while let Some((idx, outcome, finished_at)) = outcome_rx.recv().await {
            if outcome.is_err() {
                n_failed += 1;
                bar.set_message(format!("{n_failed} failed"));
            }
            last_finish = last_finish.max(finished_at);
            outcomes[idx] = Some(outcome);
            bar.inc(1);
        }
        (outcomes, last_finish)
    };

    let ((), (outcomes, last_finish)) = tokio::join!(dispatch, collect);
    bar.finish_and_clear();
    let outcomes = outcomes
        .into_iter()
        .map(|outcome| {
            // A task that panicked never reported; count it rather than lose it.
            outcome.unwrap_or_else(|| {
                Err(Failure::new(
                    FailureKind::Transport,
                    "the request task ended without an outcome",
                ))
            })
        })
        .collect();
    LoopResult {
        outcomes,
        duration: last_finish.saturating_duration_since(start),
        peak_in_flight: peak_in_flight.load(Ordering::SeqCst),
    }
}
