//! A scripted `allam.worker.v1.Worker`: a real tonic server on loopback that streams canned
//! events, so router logic (spread, retry, cancellation, deadlines) is tested over real gRPC
//! without an engine. Each fake records what it saw (calls, metadata, cancellations).

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use allam_membership::WorkerGroupInfo;
use allam_proto::v1 as pb;
use allam_proto::worker::v1::worker_server::{Worker, WorkerServer};
use allam_proto::worker::v1::{self as wpb, worker_event::Event};
use futures::Stream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// What a fake worker does with each Generate call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Script {
    /// Started, `n_tokens` deltas `token_delay` apart, SequenceEnd, Finished.
    Normal {
        n_tokens: u32,
        token_delay: Duration,
    },
    /// Answers UNAVAILABLE before any event.
    RefuseUnavailable,
    /// Answers RESOURCE_EXHAUSTED (engine queue full).
    RefuseQueueFull,
    /// Started, then a retryable Failed (the engine handed a queued request back).
    FailRetryableBeforeFirstToken,
    /// Started, one delta, then the stream errors with INTERNAL.
    FailAfterFirstToken,
    /// Started, one delta, then nothing until the client goes away.
    HangAfterFirstToken,
}

/// What a fake worker observed.
#[derive(Default)]
pub struct Observed {
    pub generate_calls: AtomicUsize,
    /// Streams dropped before their last event (client cancelled, deadline, reset).
    pub cancelled: AtomicUsize,
    pub cancelled_notify: Notify,
    pub traceparents: Mutex<Vec<String>>,
    pub grpc_timeouts: Mutex<Vec<String>>,
    pub prompts: Mutex<Vec<Vec<u32>>>,
}

impl Observed {
    pub fn calls(&self) -> usize {
        self.generate_calls.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct FakeWorker {
    script: Script,
    observed: Arc<Observed>,
}

/// Counts a cancellation if dropped before `finish`.
struct CancelProbe {
    observed: Arc<Observed>,
    finished: bool,
}

impl Drop for CancelProbe {
    fn drop(&mut self) {
        if !self.finished {
            self.observed.cancelled.fetch_add(1, Ordering::SeqCst);
            self.observed.cancelled_notify.notify_waiters();
        }
    }
}

fn event(event: Event) -> Result<wpb::WorkerEvent, Status> {
    Ok(wpb::WorkerEvent { event: Some(event) })
}

fn delta(i: u32) -> Event {
    Event::Delta(wpb::Delta {
        index: 0,
        token_ids: vec![100 + i],
        text: format!("t{i} "),
        logprobs: Vec::new(),
    })
}

#[tonic::async_trait]
impl Worker for FakeWorker {
    type GenerateStream = Pin<Box<dyn Stream<Item = Result<wpb::WorkerEvent, Status>> + Send>>;

    async fn generate(
        &self,
        request: Request<wpb::WorkerGenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let observed = Arc::clone(&self.observed);
        observed.generate_calls.fetch_add(1, Ordering::SeqCst);
        if let Some(v) = request
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
        {
            observed
                .traceparents
                .lock()
                .expect("lock")
                .push(v.to_string());
        }
        if let Some(v) = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
        {
            observed
                .grpc_timeouts
                .lock()
                .expect("lock")
                .push(v.to_string());
        }
        let prompt = request.into_inner().prompt_token_ids;
        observed.prompts.lock().expect("lock").push(prompt.clone());
        let started = Event::Started(wpb::Started {
            prompt_token_ids: prompt.clone(),
        });
        let script = self.script;
        match script {
            Script::RefuseUnavailable => return Err(Status::unavailable("fake: shutting down")),
            Script::RefuseQueueFull => return Err(Status::resource_exhausted("fake: queue full")),
            _ => {}
        }
        let stream = async_stream::stream! {
            let mut probe = CancelProbe { observed, finished: false };
            yield event(started);
            match script {
                Script::Normal { n_tokens, token_delay } => {
                    let mut ids = Vec::new();
                    let mut text = String::new();
                    for i in 0..n_tokens {
                        tokio::time::sleep(token_delay).await;
                        ids.push(100 + i);
                        text.push_str(&format!("t{i} "));
                        yield event(delta(i));
                    }
                    yield event(Event::SequenceEnd(wpb::SequenceEnd {
                        index: 0,
                        finish_reason: pb::FinishReason::Length as i32,
                        text,
                        token_ids: ids,
                    }));
                    probe.finished = true;
                    yield event(Event::Finished(wpb::Finished {
                        usage: Some(pb::Usage {
                            prompt_tokens: u32::try_from(prompt.len()).unwrap_or(u32::MAX),
                            completion_tokens: n_tokens,
                            cached_tokens: 0,
                        }),
                        timings: Some(pb::Timings::default()),
                    }));
                }
                Script::FailRetryableBeforeFirstToken => {
                    probe.finished = true;
                    yield event(Event::Failed(wpb::Failed {
                        reason: "unavailable".into(),
                        message: "fake: handed back while queued".into(),
                        retryable: true,
                    }));
                }
                Script::FailAfterFirstToken => {
                    yield event(delta(0));
                    probe.finished = true;
                    yield Err(Status::internal("fake: engine died"));
                }
                Script::HangAfterFirstToken => {
                    yield event(delta(0));
                    futures::future::pending::<()>().await;
                }
                Script::RefuseUnavailable | Script::RefuseQueueFull => {}
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn load(
        &self,
        _request: Request<wpb::LoadRequest>,
    ) -> Result<Response<wpb::LoadReport>, Status> {
        Ok(Response::new(wpb::LoadReport {
            block_size: 16,
            model_name: "tiny-allam".into(),
            kv_blocks_total: 64,
            ..Default::default()
        }))
    }
}

/// A fake worker serving on a loopback port until dropped.
pub struct FakeGroup {
    pub info: WorkerGroupInfo,
    pub observed: Arc<Observed>,
    stop: CancellationToken,
}

impl Drop for FakeGroup {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub async fn start_fake(group: &str, script: Script) -> FakeGroup {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let observed = Arc::new(Observed::default());
    let stop = CancellationToken::new();
    let service = WorkerServer::new(FakeWorker {
        script,
        observed: Arc::clone(&observed),
    });
    let shutdown = stop.clone();
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let served = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            eprintln!("fake worker stopped with {e}");
        }
    });
    FakeGroup {
        info: group_info(group, &format!("http://{addr}")),
        observed,
        stop,
    }
}

pub fn group_info(group: &str, grpc_addr: &str) -> WorkerGroupInfo {
    WorkerGroupInfo {
        group: group.into(),
        grpc_addr: grpc_addr.into(),
        tp: 1,
        model: "tiny-allam".into(),
        started_at_ms: u64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("clock after 1970")
                .as_millis(),
        )
        .expect("fits u64"),
    }
}

/// The fixtures directory (`ALLAM_FIXTURES`, else `<workspace>/../shared/fixtures`); panics
/// loudly when missing, since a skipped test proves nothing.
pub fn fixtures() -> PathBuf {
    let dir = std::env::var_os("ALLAM_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures")
        });
    assert!(
        dir.join("tokenizer.json").is_file(),
        "test fixtures not found at {} (set ALLAM_FIXTURES)",
        dir.display()
    );
    dir
}

pub fn tokenizer() -> allam_tokenizer::Tokenizer {
    allam_tokenizer::Tokenizer::from_dir(&fixtures().join("tiny-allam")).expect("fixture tokenizer")
}
