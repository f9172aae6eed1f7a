//! One try of a request on one worker group, up to its first token, and the stream that
//! follows once it has committed.
//!
//! A try *commits* at the first event that carries output (`Delta`, `SequenceEnd`, `Finished`,
//! or a non-retryable `Failed`). Before that nothing has reached the client, so any failure
//! may be retried on another group; after it, a failure ends the client's stream with
//! UNAVAILABLE. `Started`/`PromptLogprobs` are buffered until the commit so a retried request
//! never shows the client two `Started`.
//!
//! Cancellation: every worker stream is owned by its forwarding task, which ends when the
//! returned `GenerationStream` is dropped; that drops the tonic stream, which resets the
//! HTTP/2 stream, which drops the worker's engine stream, which cancels the request in the
//! engine.
//!
//! Backpressure: the forwarding task keeps reading the worker stream (so its HTTP/2 window
//! keeps moving) into a buffer of [`FORWARD_BUFFER`] events towards the client. If that buffer
//! stays full for the stream write timeout, the client is not reading: the task drops the
//! worker stream (cancelling the request there, freeing its window and blocks) and the client,
//! should it read again, gets what was buffered and then `Failed { reason: client_too_slow }`.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use allam_proto::worker::v1 as wpb;
use allam_types::EngineEvent;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tonic::{Code, Status, Streaming};

use crate::convert::event_from_worker;
use crate::groups::InFlight;
use crate::Error;

/// How a failed try ends the request.
pub(crate) enum TryError {
    /// Nothing reached the client: another group may run it.
    Retry(Error),
    /// Retrying cannot help (invalid for the model, deadline passed).
    Fatal(Error),
}

/// What a committed try hands to the stream.
pub(crate) struct Committed {
    pub(crate) buffered: Vec<EngineEvent>,
    pub(crate) stream: Streaming<wpb::WorkerEvent>,
}

/// Opens the worker stream on `inflight`'s group and reads until the commit point.
pub(crate) async fn try_group(
    inflight: &InFlight,
    request: wpb::WorkerGenerateRequest,
    trace_headers: &[(String, String)],
    deadline: Option<Instant>,
) -> Result<Committed, TryError> {
    let group = inflight.group();
    let mut grpc_request = tonic::Request::new(request);
    // Malformed pairs are skipped, never fatal: tracing must not fail a request.
    allam_telemetry::inject_pairs_into_metadata(trace_headers, grpc_request.metadata_mut());
    if let Some(deadline) = deadline {
        // Sent as `grpc-timeout`, so the worker stops on its own when the client's time is up.
        grpc_request.set_timeout(deadline.saturating_duration_since(Instant::now()));
    }
    let mut client = group.client.clone();
    let opened = within(deadline, client.generate(grpc_request))
        .await
        .ok_or(TryError::Fatal(Error::DeadlineExceeded))?;
    let mut stream = match opened {
        Ok(response) => response.into_inner(),
        Err(status) => return Err(classify(inflight, &status)),
    };
    let mut buffered = Vec::new();
    loop {
        let next = within(deadline, stream.message())
            .await
            .ok_or(TryError::Fatal(Error::DeadlineExceeded))?;
        let event = match next {
            Ok(Some(event)) => event,
            Ok(None) => {
                return Err(TryError::Retry(Error::Unavailable(format!(
                    "worker group {} closed the stream before the first token",
                    group.name()
                ))))
            }
            Err(status) => return Err(classify(inflight, &status)),
        };
        let retryable_failure = matches!(
            &event.event,
            Some(wpb::worker_event::Event::Failed(f)) if f.retryable
        );
        let event = event_from_worker(event).map_err(|why| {
            TryError::Retry(Error::Unavailable(format!(
                "worker group {} sent a malformed event: {why}",
                group.name()
            )))
        })?;
        match event {
            EngineEvent::Started { .. } | EngineEvent::PromptLogprobs(_) => buffered.push(event),
            EngineEvent::Failed { reason, message } if retryable_failure => {
                return Err(TryError::Retry(Error::Unavailable(format!(
                    "worker group {}: {reason}: {message}",
                    group.name()
                ))))
            }
            _ => {
                buffered.push(event);
                return Ok(Committed { buffered, stream });
            }
        }
    }
}

/// A status from a worker before the commit point.
fn classify(inflight: &InFlight, status: &Status) -> TryError {
    let group = inflight.group();
    match status.code() {
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            TryError::Fatal(Error::WorkerRejected(status.message().to_string()))
        }
        Code::DeadlineExceeded => TryError::Fatal(Error::DeadlineExceeded),
        Code::ResourceExhausted => TryError::Retry(Error::Overloaded),
        code => {
            if matches!(code, Code::Unavailable | Code::Unknown | Code::Internal) {
                // Transport failures (refused, reset) surface as these codes.
                group.mark_unhealthy(status.message());
            }
            TryError::Retry(Error::Unavailable(format!(
                "worker group {}: {}",
                group.name(),
                status.message()
            )))
        }
    }
}

/// `fut`, bounded by `deadline` (`None` = unbounded). `None` when the deadline passed.
async fn within<F: std::future::Future>(deadline: Option<Instant>, fut: F) -> Option<F::Output> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline.into(), fut).await.ok(),
        None => Some(fut.await),
    }
}

/// Events buffered between a worker stream and a client that reads slower than it arrives.
pub(crate) const FORWARD_BUFFER: usize = 64;

/// `Failed.reason` when the client left the router's buffer full past the write timeout
/// (the engine's own label for the same thing).
const CLIENT_TOO_SLOW: &str = "client_too_slow";

/// The events of one routed request: `Stream<Item = Result<EngineEvent, Error>>`. Ends after
/// `Finished`/`Failed`, or after one `Err` (the group failed mid-stream or the deadline
/// passed). Dropping it cancels the request on the worker.
pub struct GenerationStream {
    events: mpsc::Receiver<Result<EngineEvent, Error>>,
    /// Set by the forwarding task when it gave up on a client that did not read.
    stalled: Arc<AtomicBool>,
    write_timeout: Duration,
    ended: bool,
    group: String,
}

impl std::fmt::Debug for GenerationStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenerationStream")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl GenerationStream {
    /// The worker group serving the request.
    pub fn group(&self) -> &str {
        &self.group
    }

    pub(crate) fn new(
        committed: Committed,
        inflight: InFlight,
        deadline: Option<Instant>,
        write_timeout: Duration,
        outcome: crate::metrics::Outcome,
    ) -> GenerationStream {
        let group = inflight.group().name().to_string();
        let Committed {
            buffered,
            mut stream,
        } = committed;
        let name = group.clone();
        let inner = async_stream::stream! {
            // Owned here: released when the stream ends or is dropped.
            let inflight = inflight;
            let mut outcome = outcome;
            for event in buffered {
                let terminal = is_terminal(&event);
                outcome.observe(&event);
                yield Ok(event);
                if terminal {
                    return;
                }
            }
            loop {
                let Some(next) = within(deadline, stream.message()).await else {
                    outcome.fail(&Error::DeadlineExceeded);
                    yield Err(Error::DeadlineExceeded);
                    return;
                };
                let error = match next {
                    Ok(Some(event)) => match event_from_worker(event) {
                        Ok(event) => {
                            let terminal = is_terminal(&event);
                            outcome.observe(&event);
                            yield Ok(event);
                            if terminal {
                                return;
                            }
                            continue;
                        }
                        Err(why) => Error::Unavailable(format!(
                            "worker group {name} sent a malformed event: {why}"
                        )),
                    },
                    Ok(None) => Error::Unavailable(format!(
                        "worker group {name} closed the stream before the request finished"
                    )),
                    Err(status) if status.code() == Code::DeadlineExceeded => Error::DeadlineExceeded,
                    Err(status) => {
                        if matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Internal) {
                            inflight.group().mark_unhealthy(status.message());
                        }
                        Error::Unavailable(format!(
                            "worker group {name} failed after the first token: {}",
                            status.message()
                        ))
                    }
                };
                outcome.fail(&error);
                yield Err(error);
                return;
            }
        };
        let (sender, events) = mpsc::channel(FORWARD_BUFFER);
        let stalled = Arc::new(AtomicBool::new(false));
        tokio::spawn(forward(
            Box::pin(inner),
            sender,
            write_timeout,
            Arc::clone(&stalled),
            group.clone(),
        ));
        GenerationStream {
            events,
            stalled,
            write_timeout,
            ended: false,
            group,
        }
    }
}

/// Moves one request's events from its worker stream to the client's buffer; ends (dropping
/// the worker stream) at the last event, when the client is gone, or when the client left the
/// buffer full for `write_timeout`.
async fn forward(
    mut source: Pin<Box<dyn Stream<Item = Result<EngineEvent, Error>> + Send>>,
    sender: mpsc::Sender<Result<EngineEvent, Error>>,
    write_timeout: Duration,
    stalled: Arc<AtomicBool>,
    group: String,
) {
    loop {
        let item = tokio::select! {
            () = sender.closed() => return,
            item = source.next() => item,
        };
        let Some(item) = item else { return };
        match tokio::time::timeout(write_timeout, sender.send(item)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                stalled.store(true, Ordering::Release);
                tracing::warn!(%group, ?write_timeout, "client too slow: stream cancelled on the worker");
                metrics::counter!(
                    allam_telemetry::metric_names::CLIENT_TOO_SLOW_TOTAL,
                    "hop" => "router"
                )
                .increment(1);
                return;
            }
        }
    }
}

fn is_terminal(event: &EngineEvent) -> bool {
    matches!(
        event,
        EngineEvent::Finished { .. } | EngineEvent::Failed { .. }
    )
}

impl Stream for GenerationStream {
    type Item = Result<EngineEvent, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.events.poll_recv(cx) {
            Poll::Ready(Some(item)) => {
                if item.as_ref().map_or(true, is_terminal) {
                    self.ended = true;
                }
                Poll::Ready(Some(item))
            }
            Poll::Ready(None) => {
                self.ended = true;
                // The task always sends a last event unless it gave up on this client.
                let item = if self.stalled.load(Ordering::Acquire) {
                    Ok(EngineEvent::Failed {
                        reason: CLIENT_TOO_SLOW,
                        message: format!(
                            "the client read no output for {:?}; the request was cancelled",
                            self.write_timeout
                        ),
                    })
                } else {
                    Err(Error::Unavailable(format!(
                        "the stream from worker group {} ended early",
                        self.group
                    )))
                };
                Poll::Ready(Some(item))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
