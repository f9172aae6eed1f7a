//! The gRPC client: `allam.v1.Generation` `ChatStream` for chat requests, `GenerateStream` for
//! raw prompts, `Tokenize` for calibrating random prompts.
//!
//! Requests are spread round-robin over a small pool of HTTP/2 connections. One connection
//! would cap the run at the server's `SETTINGS_MAX_CONCURRENT_STREAMS` (hyper's server
//! default is 200): streams past it wait inside the client, and that wait would be reported as
//! server TTFT. [`STREAMS_PER_CONNECTION`] stays well under that cap.

use std::sync::atomic::{AtomicUsize, Ordering};

use allam_proto::v1::generation_client::GenerationClient;
use allam_proto::v1::{
    ChatChunk, ChatRequest, FinishReason, GenerateChunk, GenerateRequest, Message, SamplingParams,
    TokenizeRequest, Usage,
};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::Streaming;

use crate::dataset::{Input, RequestSpec};
use crate::measure::{Failure, FailureKind, Recorder, Success};
use crate::Error;

/// Concurrent streams the pool puts on one connection at most.
pub(crate) const STREAMS_PER_CONNECTION: usize = 100;
/// Upper bound on pooled connections; 16 × 100 streams is beyond any sane benchmark.
const MAX_CONNECTIONS: usize = 16;

pub(crate) struct GrpcClient {
    clients: Vec<GenerationClient<Channel>>,
    next: AtomicUsize,
    authorization: Option<MetadataValue<Ascii>>,
}

impl GrpcClient {
    /// Connects `ceil(max_in_flight / STREAMS_PER_CONNECTION)` channels to `endpoint` (a URI;
    /// `http://` is assumed when no scheme is given).
    pub(crate) async fn connect(
        endpoint: &str,
        api_key: Option<&str>,
        max_in_flight: usize,
    ) -> Result<GrpcClient, Error> {
        let uri = if endpoint.contains("://") {
            endpoint.to_owned()
        } else {
            format!("http://{endpoint}")
        };
        let template = Endpoint::from_shared(uri).map_err(|source| Error::InvalidEndpoint {
            endpoint: endpoint.to_owned(),
            source,
        })?;
        let n_connections = max_in_flight
            .div_ceil(STREAMS_PER_CONNECTION)
            .clamp(1, MAX_CONNECTIONS);
        let mut clients = Vec::with_capacity(n_connections);
        for _ in 0..n_connections {
            let channel = template
                .clone()
                .connect()
                .await
                .map_err(|source| Error::Connect {
                    endpoint: endpoint.to_owned(),
                    source,
                })?;
            // Generated clients default to a 4 MiB decode limit; prompt logprobs can exceed it.
            clients.push(GenerationClient::new(channel).max_decoding_message_size(usize::MAX));
        }
        let authorization = api_key
            .map(|key| {
                format!("Bearer {key}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| Error::InvalidApiKey)
            })
            .transpose()?;
        Ok(GrpcClient {
            clients,
            next: AtomicUsize::new(0),
            authorization,
        })
    }

    fn client(&self) -> GenerationClient<Channel> {
        let idx = self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        self.clients[idx].clone()
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        request
    }

    /// Sends one request and reads its stream to the end.
    pub(crate) async fn send(&self, spec: &RequestSpec, seed: u64) -> Result<Success, Failure> {
        let params = SamplingParams {
            max_new_tokens: spec.max_tokens.map(i64::from),
            ignore_eos: spec.ignore_eos.then_some(true),
            seed: Some(seed),
            ..Default::default()
        };
        let mut client = self.client();
        match &spec.input {
            Input::Prompt(prompt) => {
                let request = self.request(GenerateRequest {
                    prompt: prompt.clone(),
                    params: Some(params),
                    model: None,
                });
                let recorder = Recorder::start();
                let stream = client
                    .generate_stream(request)
                    .await
                    .map_err(status_failure)?
                    .into_inner();
                read_stream(stream, recorder).await
            }
            Input::Chat(turns) => {
                let messages = turns
                    .iter()
                    .map(|turn| Message {
                        role: turn.role.clone(),
                        content: turn.content.clone(),
                    })
                    .collect();
                let request = self.request(ChatRequest {
                    messages,
                    params: Some(params),
                    model: None,
                });
                let recorder = Recorder::start();
                let stream = client
                    .chat_stream(request)
                    .await
                    .map_err(status_failure)?
                    .into_inner();
                read_stream(stream, recorder).await
            }
        }
    }

    /// Prompt tokens the server counts for `text` (bos included).
    pub(crate) async fn count_tokens(&self, text: &str) -> Result<usize, Failure> {
        let request = self.request(TokenizeRequest {
            text: text.to_owned(),
            messages: Vec::new(),
        });
        let response = self
            .client()
            .tokenize(request)
            .await
            .map_err(status_failure)?;
        Ok(response.into_inner().token_ids.len())
    }
}

fn status_failure(status: tonic::Status) -> Failure {
    Failure::new(FailureKind::Grpc(status.code()), status.message())
}

/// The fields `ChatChunk` and `GenerateChunk` share, so one reader serves both RPCs.
trait StreamChunk {
    fn index(&self) -> u32;
    fn n_tokens(&self) -> usize;
    fn has_text(&self) -> bool;
    fn finish_reason(&self) -> Option<i32>;
    fn usage(&self) -> Option<&Usage>;
}

macro_rules! impl_stream_chunk {
    ($chunk:ty) => {
        impl StreamChunk for $chunk {
            fn index(&self) -> u32 {
                self.index
            }
            fn n_tokens(&self) -> usize {
                self.token_ids.len()
            }
            fn has_text(&self) -> bool {
                !self.text.is_empty()
            }
            fn finish_reason(&self) -> Option<i32> {
                self.finish_reason
            }
            fn usage(&self) -> Option<&Usage> {
                self.usage.as_ref()
            }
        }
    };
}

impl_stream_chunk!(ChatChunk);
impl_stream_chunk!(GenerateChunk);

async fn read_stream<C: StreamChunk>(
    mut stream: Streaming<C>,
    mut recorder: Recorder,
) -> Result<Success, Failure> {
    let mut finished = false;
    while let Some(chunk) = stream.message().await.map_err(status_failure)? {
        // The benchmark sends n = 1; chunks of other sequences would be a server bug, and
        // counting them would inflate the token rate.
        if chunk.index() == 0 {
            if chunk.n_tokens() > 0 || chunk.has_text() {
                recorder.token_chunk(chunk.n_tokens());
            }
            if let Some(reason) = chunk.finish_reason() {
                finished = true;
                if let Ok(reason @ (FinishReason::Error | FinishReason::Cancelled)) =
                    FinishReason::try_from(reason)
                {
                    return Err(Failure::new(
                        FailureKind::FinishError,
                        format!(
                            "the server ended the sequence with {}",
                            reason.as_str_name()
                        ),
                    ));
                }
            }
        }
        if let Some(usage) = chunk.usage() {
            recorder.usage(usage.prompt_tokens, usage.completion_tokens);
        }
    }
    if !finished {
        return Err(Failure::new(
            FailureKind::Incomplete,
            "the stream ended without a chunk carrying `finish_reason`",
        ));
    }
    Ok(recorder.finish())
}
