//! One try of a request on one worker group, up to its first token, and the stream that
//! follows once it has committed.
//!
//! A try *commits* at the first event that carries output (`Delta`, `SequenceEnd`, `Finished`,
//! or a non-retryable `Failed`). Before that nothing has reached the client, so any failure
//! may be retried on another group; after it, a failure ends the client's stream with
//! UNAVAILABLE. `Started`/`PromptLogprobs` are buffered until the commit so a retried request
//! never shows the client two `Started`.
//!
//! Cancellation: every worker stream lives inside the returned `GenerationStream`; dropping it
//! drops the tonic stream, which resets the HTTP/2 stream, which drops the worker's engine
//! stream, which cancels the request in the engine.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use allam_proto::worker::v1 as wpb;
use allam_types::EngineEvent;
use futures::{Stream, StreamExt};
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

/// The events of one routed request: `Stream<Item = Result<EngineEvent, Error>>`. Ends after
/// `Finished`/`Failed`, or after one `Err` (the group failed mid-stream or the deadline
/// passed). Dropping it cancels the request on the worker.
pub struct GenerationStream {
    inner: Pin<Box<dyn Stream<Item = Result<EngineEvent, Error>> + Send>>,
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
        GenerationStream {
            inner: Box::pin(inner),
            group,
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
        self.inner.poll_next_unpin(cx)
    }
}
