//! The internal `allam.worker.v1.Worker` gRPC service over an [`EngineHandle`], with gRPC
//! health, and its conversions between engine events and the wire.
//!
//! Invariants:
//! - Every request is validated again here (token-id prompt + the client's raw parameters)
//!   against this group's limits and vocabulary; the router's word is not trusted.
//! - The engine's event stream lives inside the response stream: when the router cancels,
//!   resets or its deadline (`grpc-timeout`) passes, the response stream is dropped and the
//!   engine cancels the request at its next step.
//! - Submission errors are statuses before any event: INVALID_ARGUMENT (retrying cannot help),
//!   RESOURCE_EXHAUSTED (queue full), UNAVAILABLE (draining). A `Failed` event is `retryable`
//!   only while no output was sent.

use std::pin::Pin;
use std::time::{Duration, Instant};

use allam_engine::EngineHandle;
use allam_proto::v1 as pb;
use allam_proto::worker::v1 as wpb;
use allam_proto::worker::v1::worker_server::{Worker, WorkerServer};
use allam_request::{Limits, PromptInput, RawRequest, RawSamplingParams};
use allam_tokenizer::Tokenizer;
use allam_types::{EngineEvent, FinishReason, StepLogprobs, TokenLogprob};
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::Error;

/// Upper bound on hashes in one `Load` answer, whatever the router asks: 64 Ki hashes are
/// 512 KiB, polled several times a second.
const MAX_REPORTED_HASHES: usize = 65_536;

type EventStream = Pin<Box<dyn Stream<Item = Result<wpb::WorkerEvent, Status>> + Send>>;

/// The worker's gRPC service; [`serve_worker`] is the usual entry point.
#[derive(Clone)]
pub struct WorkerService {
    engine: EngineHandle,
    tokenizer: Tokenizer,
    limits: Limits,
    model_name: String,
    tp: u32,
    tls: Option<WorkerServerTls>,
}

/// The worker's side of mutual TLS with routers (PEM): its certificate and key, and the CA
/// whose signature a router's client certificate must carry.
#[derive(Debug, Clone)]
pub struct WorkerServerTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Vec<u8>,
}

impl std::fmt::Debug for WorkerService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerService")
            .field("model_name", &self.model_name)
            .field("tp", &self.tp)
            .finish_non_exhaustive()
    }
}

/// Serves `allam.worker.v1.Worker` + `grpc.health.v1.Health` on `listener` until `shutdown`
/// is cancelled. On shutdown it stops accepting, drains the engine (queued requests end with
/// a retryable failure, running ones finish) and returns once every stream has ended; it
/// does not stop the engine thread (`EngineHandle::shutdown` is the caller's last stage).
pub async fn serve_worker(
    engine: EngineHandle,
    tokenizer: Tokenizer,
    limits: Limits,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    WorkerService::new(engine, tokenizer, limits)
        .serve(listener, shutdown)
        .await
}

impl WorkerService {
    pub fn new(engine: EngineHandle, tokenizer: Tokenizer, limits: Limits) -> WorkerService {
        WorkerService {
            engine,
            tokenizer,
            limits,
            model_name: String::new(),
            tp: 1,
            tls: None,
        }
    }

    /// Serve only routers that present a certificate signed by `tls.client_ca_pem`.
    pub fn with_tls(mut self, tls: WorkerServerTls) -> WorkerService {
        self.tls = Some(tls);
        self
    }

    /// The model name reported in `Load` (routers warn when it differs from theirs).
    pub fn with_model_name(mut self, model_name: impl Into<String>) -> WorkerService {
        self.model_name = model_name.into();
        self
    }

    /// The group's tensor-parallel size, reported in `Load`.
    pub fn with_tp(mut self, tp: u32) -> WorkerService {
        self.tp = tp;
        self
    }

    /// See [`serve_worker`].
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<WorkerServer<WorkerService>>()
            .await;
        let engine = self.engine.clone();
        let drain = shutdown.clone();
        let on_shutdown = async move {
            drain.cancelled().await;
            // Stop admission first, so calls racing the listener's close get UNAVAILABLE
            // (retryable) instead of a request that would then be cut short.
            engine.drain();
            health_reporter
                .set_not_serving::<WorkerServer<WorkerService>>()
                .await;
        };
        // tonic ignores `Server::tcp_nodelay` for `serve_with_incoming*`: without this, Nagle's
        // algorithm held streamed tokens back for up to ~40 ms (router_overhead bench).
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let mut builder = tonic::transport::Server::builder().tcp_nodelay(true);
        if let Some(tls) = &self.tls {
            builder = builder
                .tls_config(
                    tonic::transport::ServerTlsConfig::new()
                        .identity(tonic::transport::Identity::from_pem(
                            &tls.cert_pem,
                            &tls.key_pem,
                        ))
                        .client_ca_root(tonic::transport::Certificate::from_pem(
                            &tls.client_ca_pem,
                        )),
                )
                .map_err(|e| Error::Serve(format!("worker TLS config: {e}")))?;
        }
        builder
            .add_service(health_service)
            .add_service(WorkerServer::new(self))
            .serve_with_incoming_shutdown(incoming, on_shutdown)
            .await
            .map_err(|e| Error::Serve(e.to_string()))
    }

    async fn start(
        &self,
        request: Request<wpb::WorkerGenerateRequest>,
    ) -> Result<EventStream, Status> {
        let deadline = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map(|timeout| Instant::now() + timeout);
        let span = tracing::info_span!("worker.generate");
        allam_telemetry::set_span_parent(
            &span,
            allam_telemetry::extract_context(request.metadata()),
        );
        let request = request.into_inner();
        let _entered = span.enter();
        tracing::debug!(request_id = %request.request_id, n_prompt_tokens = request.prompt_token_ids.len(), "request received");
        let raw = RawRequest {
            input: PromptInput::TokenIds(request.prompt_token_ids),
            params: params_from_proto(request.params),
            model: None,
        };
        let (limits, tokenizer) = (self.limits.clone(), self.tokenizer.clone());
        drop(_entered);
        let valid =
            tokio::task::spawn_blocking(move || allam_request::validate(raw, &limits, &tokenizer))
                .await
                .map_err(|e| Status::internal(format!("validation task failed: {e}")))?
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Submitted inside the span: the engine's queue/prefill/decode spans become its children.
        let events = span
            .in_scope(|| self.engine.submit(valid))
            .map_err(submit_status)?;
        Ok(Box::pin(worker_events(events, deadline, span)))
    }
}

/// The engine's refusal as a status the router can act on.
fn submit_status(error: allam_engine::Error) -> Status {
    use allam_engine::Error as E;
    match error {
        E::QueueFull { .. } => Status::resource_exhausted(error.to_string()),
        E::PromptTooLarge { .. } | E::InvalidRequest(_) => {
            Status::invalid_argument(error.to_string())
        }
        E::Stopped => Status::unavailable(error.to_string()),
        other => {
            tracing::error!(error = %other, "engine refused a request");
            Status::internal(other.to_string())
        }
    }
}

/// Engine events → wire events, ending at the deadline if one was given. Every wait for an
/// event runs inside `span` (the request's `worker.generate`), so the span lasts until the
/// last event arrived (an OpenTelemetry span ends at its last exit).
fn worker_events(
    mut events: allam_engine::EventStream,
    deadline: Option<Instant>,
    span: tracing::Span,
) -> impl Stream<Item = Result<wpb::WorkerEvent, Status>> + Send {
    async_stream::stream! {
        let mut sent_output = false;
        loop {
            let next = match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline.into(), events.next())
                    .instrument(span.clone())
                    .await
                    .ok(),
                None => Some(events.next().instrument(span.clone()).await),
            };
            let Some(next) = next else {
                // Dropping `events` (when this stream ends) cancels the request.
                yield Err(Status::deadline_exceeded("the request's deadline passed"));
                return;
            };
            let Some(event) = next else { return };
            let terminal = matches!(event, EngineEvent::Finished { .. } | EngineEvent::Failed { .. });
            let retryable = !sent_output;
            if matches!(event, EngineEvent::Delta(_) | EngineEvent::SequenceEnd(_)) {
                sent_output = true;
            }
            yield Ok(event_to_proto(event, retryable));
            if terminal {
                return;
            }
        }
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    type GenerateStream = EventStream;

    async fn generate(
        &self,
        request: Request<wpb::WorkerGenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        self.start(request).await.map(Response::new)
    }

    async fn load(
        &self,
        request: Request<wpb::LoadRequest>,
    ) -> Result<Response<wpb::LoadReport>, Status> {
        let max_hashes = usize::try_from(request.get_ref().max_cached_hashes)
            .unwrap_or(usize::MAX)
            .min(MAX_REPORTED_HASHES);
        let stats = self.engine.stats();
        let info = self.engine.model_info();
        let cached_block_hashes = if max_hashes == 0 {
            Vec::new()
        } else {
            self.engine.cached_block_hashes(max_hashes)
        };
        Ok(Response::new(wpb::LoadReport {
            running: saturating_u32(stats.running),
            // A submitted request may sit in the command queue before the engine counts it
            // as waiting; the larger of the two is the honest backlog.
            waiting: saturating_u32(stats.waiting.max(stats.queued_requests)),
            kv_usage: stats.kv_usage_ratio,
            kv_blocks_total: stats.kv_blocks_total as u64,
            kv_blocks_used: stats.kv_blocks_used as u64,
            cached_block_hashes,
            block_size: saturating_u32(info.block_size),
            model_name: self.model_name.clone(),
            max_context: saturating_u32(info.max_context),
            vocab_size: saturating_u32(info.vocab_size),
            tp: self.tp,
        }))
    }
}

fn saturating_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Parses a `grpc-timeout` value: up to 8 ASCII digits and a unit (H M S m u n).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let unit_at = value.len().checked_sub(1)?;
    let (digits, unit) = (value.get(..unit_at)?, value.get(unit_at..)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Wire params → raw params, field for field (the router sends the client's values as given).
fn params_from_proto(params: Option<pb::SamplingParams>) -> RawSamplingParams {
    let p = params.unwrap_or_default();
    RawSamplingParams {
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k,
        min_p: p.min_p,
        do_sample: p.do_sample,
        max_new_tokens: p.max_new_tokens,
        min_new_tokens: p.min_new_tokens,
        seed: p.seed,
        stop: p.stop,
        stop_token_ids: p.stop_token_ids,
        ignore_eos: p.ignore_eos,
        repetition_penalty: p.repetition_penalty,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        logprobs: p.logprobs,
        prompt_logprobs: p.prompt_logprobs,
        n: p.n,
        priority: p.priority,
    }
}

fn finish_reason_to_proto(reason: FinishReason) -> pb::FinishReason {
    match reason {
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Cancelled => pb::FinishReason::Cancelled,
        FinishReason::Error => pb::FinishReason::Error,
    }
}

fn token_logprob_to_proto(t: TokenLogprob) -> pb::TokenLogprob {
    pb::TokenLogprob {
        token_id: t.id,
        logprob: t.logprob,
    }
}

fn logprobs_to_proto(step: &StepLogprobs) -> pb::Logprobs {
    pb::Logprobs {
        chosen: Some(token_logprob_to_proto(step.chosen)),
        top: step
            .top
            .iter()
            .copied()
            .map(token_logprob_to_proto)
            .collect(),
    }
}

/// One engine event on the wire. `retryable` applies to `Failed` only.
fn event_to_proto(event: EngineEvent, retryable: bool) -> wpb::WorkerEvent {
    use wpb::worker_event::Event;
    let event = match event {
        EngineEvent::Started { prompt_token_ids } => {
            Event::Started(wpb::Started { prompt_token_ids })
        }
        EngineEvent::PromptLogprobs(positions) => Event::PromptLogprobs(wpb::PromptLogprobs {
            positions: positions
                .iter()
                .map(|p| p.as_ref().map(logprobs_to_proto).unwrap_or_default())
                .collect(),
        }),
        EngineEvent::Delta(delta) => Event::Delta(wpb::Delta {
            index: delta.index,
            token_ids: delta.token_ids,
            text: delta.text,
            logprobs: delta.logprobs.iter().map(logprobs_to_proto).collect(),
        }),
        EngineEvent::SequenceEnd(end) => Event::SequenceEnd(wpb::SequenceEnd {
            index: end.index,
            finish_reason: finish_reason_to_proto(end.finish_reason) as i32,
            text: end.text,
            token_ids: end.token_ids,
        }),
        EngineEvent::Finished { usage, timings } => Event::Finished(wpb::Finished {
            usage: Some(pb::Usage {
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                cached_tokens: usage.cached_tokens,
            }),
            timings: Some(pb::Timings {
                queue_ms: timings.queue_ms,
                ttft_ms: timings.ttft_ms,
                total_ms: timings.total_ms,
            }),
        }),
        EngineEvent::Failed { reason, message } => Event::Failed(wpb::Failed {
            reason: reason.to_string(),
            message,
            retryable,
        }),
    };
    wpb::WorkerEvent { event: Some(event) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_events_carry_retryability() {
        let event = event_to_proto(
            EngineEvent::Failed {
                reason: allam_engine::failure_reason::UNAVAILABLE,
                message: "drained".into(),
            },
            true,
        );
        let Some(wpb::worker_event::Event::Failed(failed)) = event.event else {
            panic!("expected Failed, got {event:?}");
        };
        assert_eq!(failed.reason, "unavailable");
        assert!(failed.retryable);
    }

    #[test]
    fn submit_errors_map_to_actionable_statuses() {
        use allam_engine::Error as E;
        use tonic::Code;
        assert_eq!(
            submit_status(E::QueueFull { max_waiting: 1 }).code(),
            Code::ResourceExhausted
        );
        assert_eq!(submit_status(E::Stopped).code(), Code::Unavailable);
        let too_large = submit_status(E::PromptTooLarge {
            prompt_tokens: 10,
            max_new_tokens: 100,
            needed_tokens: 109,
            capacity_tokens: 64,
        });
        assert_eq!(too_large.code(), Code::InvalidArgument);
        assert!(
            too_large.message().contains("`max_new_tokens`"),
            "{}",
            too_large.message()
        );
    }

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(
            parse_grpc_timeout("1500m"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("2s"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }
}
