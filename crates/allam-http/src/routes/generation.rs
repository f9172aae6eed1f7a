//! `POST /v1/chat/completions` and `POST /v1/completions`, and the driver they share with
//! `/score`: authorize, parse, check the model, `Router::generate`, then either collect the
//! events into one JSON body or forward them as SSE.
//!
//! Invariant: `Router::generate` (which validates) returns before any response byte is
//! written, so a bad request is a 400 with the error object even with `stream: true`; only
//! failures after the first token travel inside the stream, as an error event before
//! `data: [DONE]`. Dropping the SSE body (client gone) drops the `GenerationStream`, which
//! cancels the request on the worker.

use std::convert::Infallible;
use std::time::Instant;

use allam_request::{PromptInput, RawRequest};
use allam_router::RequestContext;
use allam_telemetry::PromptText;
use allam_types::{EngineEvent, Usage};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::BoxStream;
use futures::StreamExt as _;
use tracing::Instrument as _;

use crate::extract::ApiJson;
use crate::openai::chunks::{error_payload, ChunkWriter};
use crate::openai::collect::{self, failed_event, CollectedChoice, Collector};
use crate::openai::request::{ChatCompletionRequest, CompletionRequest, ResponseOptions};
use crate::openai::{Api, ResponseMeta};
use crate::request_metrics::{request_span, RequestTracker, API_CHAT, API_COMPLETIONS};
use crate::state::{unix_now, AppState};
use crate::Error;

pub(crate) async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<ApiJson<ChatCompletionRequest>, Error>,
) -> Response {
    let span = request_span(API_CHAT, &headers);
    async move {
        let tracker = RequestTracker::start(API_CHAT);
        let prepared = state.authorize(&headers).and_then(|()| {
            let ApiJson(request) = body?;
            request.into_raw()
        });
        openai_response(state, Api::Chat, prepared, tracker).await
    }
    .instrument(span)
    .await
}

pub(crate) async fn completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<ApiJson<CompletionRequest>, Error>,
) -> Response {
    let span = request_span(API_COMPLETIONS, &headers);
    async move {
        let tracker = RequestTracker::start(API_COMPLETIONS);
        let prepared = state.authorize(&headers).and_then(|()| {
            let ApiJson(request) = body?;
            request.into_raw()
        });
        openai_response(state, Api::Completion, prepared, tracker).await
    }
    .instrument(span)
    .await
}

async fn openai_response(
    state: AppState,
    api: Api,
    prepared: Result<(RawRequest, ResponseOptions), Error>,
    tracker: RequestTracker,
) -> Response {
    let (raw, options) = match prepared.and_then(|(raw, options)| {
        state.check_model(raw.model.as_deref())?;
        Ok((raw, options))
    }) {
        Ok(prepared) => prepared,
        Err(err) => return reject(tracker, err),
    };
    let meta = ResponseMeta {
        id: new_response_id(api),
        created: unix_now(),
        model: state.model_name().to_owned(),
        options,
    };
    let events = match start(&state, raw, tracker.api()).await {
        Ok(events) => events,
        // The router counted this failure.
        Err(err) => return err.with_wire_names(options.names).into_response(),
    };
    if options.stream {
        return sse_response(state, api, meta, events, tracker);
    }
    match collect_events(events, options.n).await {
        Ok((choices, usage)) => {
            tracker.succeeded(usage);
            let pieces = state.pieces();
            match api {
                Api::Chat => {
                    Json(collect::chat_completion(&meta, choices, usage, pieces)).into_response()
                }
                Api::Completion => {
                    Json(collect::completion(&meta, choices, usage, pieces)).into_response()
                }
            }
        }
        Err(err) => err.into_response(),
    }
}

/// A request refused before routing: counted here (the router never saw it), then answered.
pub(crate) fn reject(tracker: RequestTracker, err: Error) -> Response {
    tracker.rejected(err.reason());
    err.into_response()
}

/// A routed request's events, starting with those read ahead by [`start`].
pub(crate) type Events = BoxStream<'static, Result<EngineEvent, allam_router::Error>>;

/// Hands the request to the router (which validates it) and reads ahead to the first event
/// that carries output, so that every failure up to there, a worker's `Failed` included, is
/// still an HTTP status: nothing has been sent yet.
pub(crate) async fn start(
    state: &AppState,
    raw: RawRequest,
    api: &'static str,
) -> Result<Events, Error> {
    if tracing::enabled!(tracing::Level::DEBUG) {
        let prompt = prompt_for_log(&raw.input);
        tracing::debug!(
            prompt = %PromptText::new(&prompt, state.config().log_prompts),
            "generation request"
        );
    }
    let context = RequestContext {
        deadline: None,
        trace_headers: allam_telemetry::current_trace_headers(),
        api,
    };
    let routed = Instant::now();
    let mut stream = state.router().generate(raw, context).await?;
    tracing::debug!(
        route_ms = routed.elapsed().as_secs_f64() * 1e3,
        group = stream.group(),
        "routed"
    );
    let mut head = Vec::new();
    while let Some(item) = stream.next().await {
        match item? {
            EngineEvent::Failed { reason, message } => return Err(failed_event(reason, message)),
            event @ (EngineEvent::Started { .. } | EngineEvent::PromptLogprobs(_)) => {
                head.push(event)
            }
            event => {
                head.push(event);
                break;
            }
        }
    }
    Ok(futures::stream::iter(head.into_iter().map(Ok))
        .chain(stream)
        .boxed())
}

/// Drains the events into whole choices; `n` pre-sizes the choice list.
pub(crate) async fn collect_events(
    mut events: Events,
    n: u32,
) -> Result<(Vec<CollectedChoice>, Usage), Error> {
    let mut collector = Collector::new(n);
    while let Some(event) = events.next().await {
        collector.push(event?)?;
    }
    collector.finish()
}

fn sse_response(
    state: AppState,
    api: Api,
    meta: ResponseMeta,
    mut events: Events,
    tracker: RequestTracker,
) -> Response {
    let span = tracing::Span::current();
    let body = async_stream::stream! {
        let mut writer = ChunkWriter::new(api, meta);
        let mut tracker = Some(tracker);
        loop {
            let Some(item) = events.next().instrument(span.clone()).await else {
                // The router ends the stream right after `Finished`/`Failed`/an error, all
                // handled below; an end without them is a lost worker.
                let err = Error::Unavailable(
                    "the generation stream ended before the request finished".into(),
                );
                yield Ok::<Event, Infallible>(Event::default().data(error_payload(&err)));
                break;
            };
            let finished = match &item {
                Ok(EngineEvent::Finished { usage, .. }) => Some(*usage),
                _ => None,
            };
            match item.map_err(Error::from).and_then(|event| writer.on_event(event, state.pieces())) {
                Ok(payloads) => {
                    for payload in payloads {
                        yield Ok(Event::default().data(payload));
                    }
                }
                Err(err) => {
                    yield Ok(Event::default().data(error_payload(&err)));
                    break;
                }
            }
            if let Some(usage) = finished {
                if let Some(tracker) = tracker.take() {
                    tracker.succeeded(usage);
                }
                break;
            }
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    Sse::new(body)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// `chatcmpl-…` / `cmpl-…` with 96 random bits: unique enough to correlate logs.
fn new_response_id(api: Api) -> String {
    let prefix = match api {
        Api::Chat => "chatcmpl",
        Api::Completion => "cmpl",
    };
    format!("{prefix}-{:024x}", rand::random::<u128>() >> 32)
}

/// The user text of a request, for [`PromptText`] (which redacts it by default).
fn prompt_for_log(input: &PromptInput) -> String {
    match input {
        PromptInput::Chat(messages) => messages
            .iter()
            .map(|message| format!("{}: {}", message.role, message.content))
            .collect::<Vec<_>>()
            .join("\n"),
        PromptInput::Text(text) => text.clone(),
        PromptInput::TokenIds(ids) => format!("{} token ids", ids.len()),
    }
}
