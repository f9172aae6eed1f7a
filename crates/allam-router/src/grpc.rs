//! The public gRPC front: `allam.v1.Generation` over [`Router`], plus `grpc.health.v1.Health`
//! (SERVING while the router is ready) and server reflection (v1 and v1alpha), so grpcurl and
//! generic clients work without our `.proto` files.
//!
//! Every handler authenticates, builds a `RequestContext` from metadata (`grpc-timeout`,
//! `traceparent`/`tracestate`), converts the request, and maps errors through
//! [`Error::to_status`] — the only status mapping of this API.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::{Duration, Instant};

use allam_proto::v1 as pb;
use allam_proto::v1::generation_server::{Generation, GenerationServer};
use allam_request::{ChatMessage, PromptInput, RawRequest};
use allam_types::{EngineEvent, StepLogprobs, Timings, Usage};
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::convert::{
    finish_reason_to_proto, logprobs_to_proto, params_from_proto, prompt_logprobs_to_proto,
    timings_to_proto, usage_to_proto,
};
use crate::{Error, GenerationStream, RequestContext, Router, TlsConfig};

/// tonic's server answers CANCELLED ("Timeout expired") when `grpc-timeout` passes before a
/// unary handler returns. Ending our own wait this much earlier makes the answer
/// DEADLINE_EXCEEDED, as the gRPC spec has it, instead of racing tonic's timer.
const DEADLINE_MARGIN: Duration = Duration::from_millis(5);

/// W3C trace-context headers forwarded to workers.
const TRACE_HEADERS: [&str; 3] = ["traceparent", "tracestate", "baggage"];

type ChunkStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Serves the public gRPC API on `listener` until `shutdown` is cancelled; in-flight calls
/// are allowed to finish (tonic's graceful shutdown).
pub async fn serve_grpc(
    router: Router,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
    tls: Option<TlsConfig>,
) -> Result<(), Error> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(allam_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(allam_proto::GENERATION_SERVICE_NAME)
        .with_service_name("grpc.health.v1.Health")
        .build_v1()
        .map_err(|e| Error::Internal(format!("reflection service: {e}")))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(allam_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(allam_proto::GENERATION_SERVICE_NAME)
        .with_service_name("grpc.health.v1.Health")
        .build_v1alpha()
        .map_err(|e| Error::Internal(format!("reflection service: {e}")))?;

    // Health follows readiness: SERVING while at least one worker group is healthy.
    let mut ready = router.ready_watch();
    let health_stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            let status = if *ready.borrow_and_update() {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            for service in ["", allam_proto::GENERATION_SERVICE_NAME] {
                health_reporter.set_service_status(service, status).await;
            }
            tokio::select! {
                () = health_stop.cancelled() => break,
                changed = ready.changed() => if changed.is_err() { break },
            }
        }
        for service in ["", allam_proto::GENERATION_SERVICE_NAME] {
            health_reporter
                .set_service_status(service, tonic_health::ServingStatus::NotServing)
                .await;
        }
    });

    let mut builder = tonic::transport::Server::builder().tcp_nodelay(true);
    if let Some(tls) = tls {
        let mut config = tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(tls.cert_pem, tls.key_pem),
        );
        if let Some(ca) = tls.client_ca_pem {
            config = config.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        builder = builder
            .tls_config(config)
            .map_err(|e| Error::Internal(format!("gRPC TLS config: {e}")))?;
    }
    // tonic ignores `Server::tcp_nodelay` for `serve_with_incoming*`: without this, Nagle's
    // algorithm held streamed tokens back for up to ~40 ms (router_overhead bench).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(GenerationServer::new(GenerationService { router }))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
        .map_err(|e| Error::Internal(format!("gRPC server: {e}")))
}

struct GenerationService {
    router: Router,
}

impl GenerationService {
    /// Checks the API key and gathers the request's context from its metadata.
    fn context<T>(
        &self,
        request: &Request<T>,
        api: &'static str,
    ) -> Result<RequestContext, Status> {
        let metadata = request.metadata();
        let key = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        self.router.check_api_key(key).map_err(|e| e.to_status())?;
        let deadline = metadata
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map(|timeout| Instant::now() + timeout.saturating_sub(DEADLINE_MARGIN));
        let trace_headers = TRACE_HEADERS
            .iter()
            .filter_map(|name| {
                let value = metadata.get(*name)?.to_str().ok()?;
                Some(((*name).to_string(), value.to_string()))
            })
            .collect();
        Ok(RequestContext {
            deadline,
            trace_headers,
            api,
        })
    }

    async fn start(
        &self,
        raw: RawRequest,
        ctx: RequestContext,
    ) -> Result<GenerationStream, Status> {
        self.router
            .generate(raw, ctx)
            .await
            .map_err(|e| e.to_status())
    }
}

fn chat_raw(request: pb::ChatRequest) -> RawRequest {
    RawRequest {
        input: PromptInput::Chat(
            request
                .messages
                .into_iter()
                .map(|m| ChatMessage {
                    role: m.role,
                    content: m.content,
                })
                .collect(),
        ),
        params: params_from_proto(request.params),
        model: request.model,
    }
}

fn generate_raw(request: pb::GenerateRequest) -> RawRequest {
    RawRequest {
        input: PromptInput::Text(request.prompt),
        params: params_from_proto(request.params),
        model: request.model,
    }
}

#[tonic::async_trait]
impl Generation for GenerationService {
    type ChatStreamStream = ChunkStream<pb::ChatChunk>;
    type GenerateStreamStream = ChunkStream<pb::GenerateChunk>;

    async fn chat(
        &self,
        request: Request<pb::ChatRequest>,
    ) -> Result<Response<pb::ChatResponse>, Status> {
        let ctx = self.context(&request, "grpc_chat")?;
        let stream = self.start(chat_raw(request.into_inner()), ctx).await?;
        let collected = collect(stream).await?;
        Ok(Response::new(
            collected.into_response(self.router.model_name()),
        ))
    }

    async fn chat_stream(
        &self,
        request: Request<pb::ChatRequest>,
    ) -> Result<Response<Self::ChatStreamStream>, Status> {
        let ctx = self.context(&request, "grpc_chat_stream")?;
        let stream = self.start(chat_raw(request.into_inner()), ctx).await?;
        Ok(Response::new(Box::pin(chunks(stream))))
    }

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let ctx = self.context(&request, "grpc_generate")?;
        let stream = self.start(generate_raw(request.into_inner()), ctx).await?;
        let collected = collect(stream).await?;
        Ok(Response::new(
            collected.into_response(self.router.model_name()),
        ))
    }

    async fn generate_stream(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let ctx = self.context(&request, "grpc_generate_stream")?;
        let stream = self.start(generate_raw(request.into_inner()), ctx).await?;
        Ok(Response::new(Box::pin(chunks(stream))))
    }

    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        self.context(&request, "grpc_tokenize")?;
        let request = request.into_inner();
        let input = if request.messages.is_empty() {
            PromptInput::Text(request.text)
        } else {
            PromptInput::Chat(
                request
                    .messages
                    .into_iter()
                    .map(|m| ChatMessage {
                        role: m.role,
                        content: m.content,
                    })
                    .collect(),
            )
        };
        let token_ids = self
            .router
            .tokenize(input)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(pb::TokenizeResponse { token_ids }))
    }

    async fn model_info(
        &self,
        request: Request<pb::ModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfoResponse>, Status> {
        self.context(&request, "grpc_model_info")?;
        let info = self.router.model_info();
        Ok(Response::new(pb::ModelInfoResponse {
            name: info.name,
            max_context: info.max_context,
            vocab_size: info.vocab_size,
        }))
    }
}

/// Parses a `grpc-timeout` value: up to 8 ASCII digits and a unit (H M S m u n).
pub(crate) fn parse_grpc_timeout(value: &str) -> Option<Duration> {
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

/// One sequence of a unary answer.
#[derive(Default)]
struct Sequence {
    text: String,
    token_ids: Vec<u32>,
    finish_reason: Option<allam_types::FinishReason>,
    logprobs: Vec<StepLogprobs>,
}

/// A whole request's output, for the unary calls.
#[derive(Default)]
struct Collected {
    sequences: BTreeMap<u32, Sequence>,
    prompt_logprobs: Vec<Option<StepLogprobs>>,
    usage: Usage,
    timings: Timings,
}

/// Drains a stream into a unary answer; a failure anywhere becomes the call's status.
async fn collect(mut stream: GenerationStream) -> Result<Collected, Status> {
    let mut collected = Collected::default();
    while let Some(item) = stream.next().await {
        match item.map_err(|e| e.to_status())? {
            EngineEvent::Started { .. } => {}
            EngineEvent::PromptLogprobs(positions) => collected.prompt_logprobs = positions,
            EngineEvent::Delta(delta) => {
                let seq = collected.sequences.entry(delta.index).or_default();
                seq.logprobs.extend(delta.logprobs);
                // Kept until SequenceEnd brings the authoritative text (stop string removed).
                seq.text.push_str(&delta.text);
                seq.token_ids.extend(delta.token_ids);
            }
            EngineEvent::SequenceEnd(end) => {
                let seq = collected.sequences.entry(end.index).or_default();
                seq.text = end.text;
                seq.token_ids = end.token_ids;
                seq.finish_reason = Some(end.finish_reason);
            }
            EngineEvent::Finished { usage, timings } => {
                collected.usage = usage;
                collected.timings = timings;
                return Ok(collected);
            }
            EngineEvent::Failed { reason, message } => {
                return Err(Error::Unavailable(format!("{reason}: {message}")).to_status())
            }
        }
    }
    Err(Error::Unavailable("the stream ended without a result".into()).to_status())
}

/// The unary response types share one shape.
trait FromCollected {
    fn build(collected: Collected, model: &str) -> Self;
}

macro_rules! impl_from_collected {
    ($response:ty) => {
        impl FromCollected for $response {
            fn build(collected: Collected, model: &str) -> Self {
                let n = collected.sequences.len();
                let choices: Vec<pb::Choice> = collected
                    .sequences
                    .into_iter()
                    .map(|(index, seq)| pb::Choice {
                        index,
                        text: seq.text,
                        token_ids: seq.token_ids,
                        finish_reason: seq
                            .finish_reason
                            .map(finish_reason_to_proto)
                            .unwrap_or(pb::FinishReason::Unspecified)
                            as i32,
                        logprobs: seq.logprobs.iter().map(logprobs_to_proto).collect(),
                    })
                    .collect();
                let first = choices.first().cloned().unwrap_or_default();
                Self {
                    text: first.text,
                    token_ids: first.token_ids,
                    finish_reason: first.finish_reason,
                    usage: Some(usage_to_proto(collected.usage)),
                    logprobs: first.logprobs,
                    prompt_logprobs: prompt_logprobs_to_proto(&collected.prompt_logprobs),
                    choices: if n > 1 { choices } else { Vec::new() },
                    timings: Some(timings_to_proto(collected.timings)),
                    model: model.to_string(),
                }
            }
        }
    };
}

impl_from_collected!(pb::ChatResponse);
impl_from_collected!(pb::GenerateResponse);

impl Collected {
    fn into_response<R: FromCollected>(self, model: &str) -> R {
        R::build(self, model)
    }
}

/// The fields both chunk types share.
#[derive(Default)]
struct ChunkParts {
    index: u32,
    text: String,
    token_ids: Vec<u32>,
    logprobs: Vec<pb::Logprobs>,
    finish_reason: Option<pb::FinishReason>,
    usage: Option<pb::Usage>,
    prompt_logprobs: Vec<pb::Logprobs>,
    timings: Option<pb::Timings>,
}

macro_rules! impl_from_parts {
    ($chunk:ty) => {
        impl From<ChunkParts> for $chunk {
            fn from(p: ChunkParts) -> Self {
                Self {
                    index: p.index,
                    text: p.text,
                    token_ids: p.token_ids,
                    logprobs: p.logprobs,
                    finish_reason: p.finish_reason.map(|r| r as i32),
                    usage: p.usage,
                    prompt_logprobs: p.prompt_logprobs,
                    timings: p.timings,
                }
            }
        }
    };
}

impl_from_parts!(pb::ChatChunk);
impl_from_parts!(pb::GenerateChunk);

/// Turns events into chunks: deltas as they come; a sequence's end is held back one event so
/// that, when the request's `Finished` follows, the two merge into one final chunk carrying
/// `finish_reason` and `usage` (the common n = 1 case ends with exactly one such chunk).
fn chunks<T: From<ChunkParts> + Send + 'static>(
    mut stream: GenerationStream,
) -> impl Stream<Item = Result<T, Status>> + Send {
    async_stream::stream! {
        let mut pending_end: Option<ChunkParts> = None;
        let mut prompt_logprobs: Vec<pb::Logprobs> = Vec::new();
        while let Some(item) = stream.next().await {
            let event = match item {
                Ok(event) => event,
                Err(e) => {
                    if let Some(end) = pending_end.take() {
                        yield Ok(T::from(end));
                    }
                    yield Err(e.to_status());
                    return;
                }
            };
            let chunk = match event {
                EngineEvent::Started { .. } => continue,
                EngineEvent::PromptLogprobs(positions) => {
                    prompt_logprobs = prompt_logprobs_to_proto(&positions);
                    continue;
                }
                EngineEvent::Delta(delta) => ChunkParts {
                    index: delta.index,
                    text: delta.text,
                    token_ids: delta.token_ids,
                    logprobs: delta.logprobs.iter().map(logprobs_to_proto).collect(),
                    ..ChunkParts::default()
                },
                EngineEvent::SequenceEnd(end) => {
                    if let Some(previous) = pending_end.take() {
                        yield Ok(T::from(previous));
                    }
                    pending_end = Some(ChunkParts {
                        index: end.index,
                        finish_reason: Some(finish_reason_to_proto(end.finish_reason)),
                        prompt_logprobs: std::mem::take(&mut prompt_logprobs),
                        ..ChunkParts::default()
                    });
                    continue;
                }
                EngineEvent::Finished { usage, timings } => {
                    let mut last = pending_end.take().unwrap_or_default();
                    last.usage = Some(usage_to_proto(usage));
                    last.timings = Some(timings_to_proto(timings));
                    if last.prompt_logprobs.is_empty() {
                        last.prompt_logprobs = std::mem::take(&mut prompt_logprobs);
                    }
                    yield Ok(T::from(last));
                    return;
                }
                EngineEvent::Failed { reason, message } => {
                    if let Some(end) = pending_end.take() {
                        yield Ok(T::from(end));
                    }
                    yield Err(Error::Unavailable(format!("{reason}: {message}")).to_status());
                    return;
                }
            };
            if let Some(end) = pending_end.take() {
                yield Ok(T::from(end));
            }
            let mut chunk = chunk;
            if !prompt_logprobs.is_empty() {
                chunk.prompt_logprobs = std::mem::take(&mut prompt_logprobs);
            }
            yield Ok(T::from(chunk));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("9n"), Some(Duration::from_nanos(9)));
        for bad in ["", "S", "5", "5s", "123456789S", "-5S", "5 S", "٥S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }
}
