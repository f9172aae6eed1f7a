//! The OpenAI-compatible HTTP client: `POST /v1/chat/completions` for chat requests and
//! `POST /v1/completions` for raw prompts, both with `stream: true` and
//! `stream_options.include_usage`, read as Server-Sent Events; `POST /tokenize` (vLLM's shape,
//! at the server root) for calibrating random prompts.
//!
//! vLLM extensions (`ignore_eos`) are sent only when set, so a strict OpenAI server sees only
//! fields it knows. Plain HTTP only: this build of reqwest has no TLS, and an `https://` base
//! URL is refused when the client is made rather than failing every request.

use futures::StreamExt;
use serde_json::{json, Map, Value};

use super::sse::SseParser;
use crate::dataset::{Input, RequestSpec};
use crate::measure::{Failure, FailureKind, Recorder, Success};
use crate::Error;

pub(crate) struct HttpClient {
    client: reqwest::Client,
    /// `<base>/v1`, without a trailing slash.
    api_url: String,
    /// The server root, where vLLM serves `/tokenize`.
    root_url: String,
    model: Option<String>,
    authorization: Option<String>,
}

impl HttpClient {
    /// `base_url` is the server root (`http://host:8000`) or its `/v1` (both are accepted, as
    /// users paste either).
    pub(crate) fn new(
        base_url: &str,
        model: Option<&str>,
        api_key: Option<&str>,
    ) -> Result<HttpClient, Error> {
        let trimmed = base_url.trim_end_matches('/');
        if !trimmed.starts_with("http://") {
            return Err(Error::InvalidConfig {
                field: "target.base_url",
                reason: format!(
                    "expected an `http://` URL, got `{base_url}` (TLS is not supported by the \
                     benchmark client)"
                ),
            });
        }
        let root_url = trimmed.strip_suffix("/v1").unwrap_or(trimmed).to_owned();
        let authorization = api_key.map(|key| format!("Bearer {key}"));
        if let Some(value) = &authorization {
            reqwest::header::HeaderValue::from_str(value).map_err(|_| Error::InvalidApiKey)?;
        }
        let client = reqwest::Client::builder()
            // Benchmarks open many parallel streams to one host; idle connections are reused
            // across requests instead of paying a handshake per request.
            .pool_max_idle_per_host(usize::MAX)
            .build()
            .map_err(|source| Error::HttpClient { source })?;
        Ok(HttpClient {
            client,
            api_url: format!("{root_url}/v1"),
            root_url,
            model: model.map(str::to_owned),
            authorization,
        })
    }

    fn post(&self, url: String, body: &Value) -> reqwest::RequestBuilder {
        let builder = self.client.post(url).json(body);
        match &self.authorization {
            Some(value) => builder.header(reqwest::header::AUTHORIZATION, value),
            None => builder,
        }
    }

    /// Sends one request and reads its stream to the end.
    pub(crate) async fn send(&self, spec: &RequestSpec, seed: u64) -> Result<Success, Failure> {
        let mut body = Map::new();
        if let Some(model) = &self.model {
            body.insert("model".into(), json!(model));
        }
        let (url, api) = match &spec.input {
            Input::Prompt(prompt) => {
                body.insert("prompt".into(), json!(prompt));
                (format!("{}/completions", self.api_url), Api::Completions)
            }
            Input::Chat(turns) => {
                let messages: Vec<Value> = turns
                    .iter()
                    .map(|turn| json!({"role": turn.role, "content": turn.content}))
                    .collect();
                body.insert("messages".into(), Value::Array(messages));
                (format!("{}/chat/completions", self.api_url), Api::Chat)
            }
        };
        if let Some(max_tokens) = spec.max_tokens {
            body.insert("max_tokens".into(), json!(max_tokens));
        }
        if spec.ignore_eos {
            body.insert("ignore_eos".into(), json!(true));
        }
        body.insert("seed".into(), json!(seed));
        body.insert("stream".into(), json!(true));
        body.insert("stream_options".into(), json!({"include_usage": true}));

        let recorder = Recorder::start();
        let response = self
            .post(url, &Value::Object(body))
            .send()
            .await
            .map_err(transport_failure)?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(Failure::new(
                FailureKind::HttpStatus(status.as_u16()),
                error_message(&text),
            ));
        }
        read_sse(response, api, recorder).await
    }

    /// Prompt tokens the server counts for `text` (bos included), via vLLM's `/tokenize`.
    pub(crate) async fn count_tokens(&self, text: &str) -> Result<usize, Failure> {
        let mut body = json!({"prompt": text});
        if let Some(model) = &self.model {
            body["model"] = json!(model);
        }
        let response = self
            .post(format!("{}/tokenize", self.root_url), &body)
            .send()
            .await
            .map_err(transport_failure)?;
        let status = response.status();
        if !status.is_success() {
            return Err(Failure::new(
                FailureKind::HttpStatus(status.as_u16()),
                "tokenize failed",
            ));
        }
        let value: Value = response.json().await.map_err(transport_failure)?;
        value
            .get("count")
            .and_then(Value::as_u64)
            .and_then(|count| usize::try_from(count).ok())
            .ok_or_else(|| Failure::new(FailureKind::Protocol, "`/tokenize` returned no `count`"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Chat,
    Completions,
}

fn transport_failure(err: reqwest::Error) -> Failure {
    let kind = if err.is_connect() {
        FailureKind::Connect
    } else if err.is_timeout() {
        FailureKind::Timeout
    } else if err.is_decode() {
        FailureKind::Protocol
    } else {
        FailureKind::Transport
    };
    Failure::new(kind, error_chain(&err))
}

/// reqwest's top-level message is generic ("error sending request"); the cause says why.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// The `error.message` of an OpenAI error body, else the body itself.
fn error_message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|value| {
            let error = value.get("error")?;
            error
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .or_else(|| error.as_str().map(str::to_owned))
        })
        .unwrap_or_else(|| body.to_owned())
}

async fn read_sse(
    response: reqwest::Response,
    api: Api,
    mut recorder: Recorder,
) -> Result<Success, Failure> {
    let mut parser = SseParser::default();
    let mut body = response.bytes_stream();
    while let Some(bytes) = body.next().await {
        let bytes = bytes.map_err(transport_failure)?;
        let events = parser
            .push(&bytes)
            .map_err(|_| Failure::new(FailureKind::Protocol, "the SSE stream is not UTF-8"))?;
        for data in events {
            if data.trim() == "[DONE]" {
                return Ok(recorder.finish());
            }
            handle_event(&data, api, &mut recorder)?;
        }
    }
    Err(Failure::new(
        FailureKind::Incomplete,
        "the stream ended before `data: [DONE]`",
    ))
}

fn handle_event(data: &str, api: Api, recorder: &mut Recorder) -> Result<(), Failure> {
    let chunk: Value = serde_json::from_str(data).map_err(|err| {
        Failure::new(FailureKind::Protocol, format!("a chunk is not JSON: {err}"))
    })?;
    if let Some(error) = chunk.get("error") {
        let message = error
            .get("message")
            .and_then(Value::as_str)
            .map_or_else(|| error.to_string(), str::to_owned);
        return Err(Failure::new(FailureKind::StreamError, message));
    }
    let choices = chunk.get("choices").and_then(Value::as_array);
    for choice in choices.into_iter().flatten() {
        // n = 1: other indices would be a server bug and must not inflate the token rate.
        if choice.get("index").and_then(Value::as_u64).unwrap_or(0) != 0 {
            continue;
        }
        let text = match api {
            Api::Chat => choice.pointer("/delta/content"),
            Api::Completions => choice.get("text"),
        };
        if text.and_then(Value::as_str).is_some_and(|t| !t.is_empty()) {
            recorder.token_chunk(1);
        }
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            // vLLM says `abort`; allam-serve says `error` / `cancelled`.
            if matches!(reason, "error" | "cancelled" | "abort") {
                return Err(Failure::new(
                    FailureKind::FinishError,
                    format!("the server ended the sequence with `{reason}`"),
                ));
            }
        }
    }
    if let Some(usage) = chunk.get("usage").filter(|usage| usage.is_object()) {
        let field = |name: &str| {
            usage
                .get(name)
                .and_then(Value::as_u64)
                .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
        };
        recorder.usage(field("prompt_tokens"), field("completion_tokens"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_forms_are_normalized() {
        for base in [
            "http://127.0.0.1:8000",
            "http://127.0.0.1:8000/",
            "http://127.0.0.1:8000/v1",
            "http://127.0.0.1:8000/v1/",
        ] {
            let client = HttpClient::new(base, None, None).expect("valid base URL");
            assert_eq!(client.api_url, "http://127.0.0.1:8000/v1", "{base}");
            assert_eq!(client.root_url, "http://127.0.0.1:8000", "{base}");
        }
        for bad in ["https://example.com", "127.0.0.1:8000", "ftp://x"] {
            let err = HttpClient::new(bad, None, None)
                .err()
                .expect("only http:// is accepted");
            assert!(err.to_string().contains("target.base_url"), "{err}");
        }
        assert!(matches!(
            HttpClient::new("http://x", None, Some("bad\nkey")),
            Err(Error::InvalidApiKey)
        ));
    }

    #[test]
    fn error_bodies_yield_their_message() {
        let body = r#"{"error": {"message": "`top_p` must be in (0, 1], got 1.5", "type": "invalid_request_error"}}"#;
        assert_eq!(error_message(body), "`top_p` must be in (0, 1], got 1.5");
        assert_eq!(error_message("plain text"), "plain text");
    }

    #[tokio::test(start_paused = true)]
    async fn chunks_record_tokens_usage_and_failures() {
        let mut recorder = Recorder::start();
        let chat = [
            r#"{"choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":null}],"usage":null}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"مر"},"finish_reason":null}],"usage":null}"#,
            r#"{"choices":[{"index":1,"delta":{"content":"x"},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"حبا"},"finish_reason":"length"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}"#,
        ];
        for data in chat {
            handle_event(data, Api::Chat, &mut recorder).expect("valid chunk");
        }
        let success = recorder.finish();
        // The role-only delta and the other sequence carry no token of sequence 0.
        assert_eq!(success.itl.len(), 1);
        assert_eq!((success.prompt_tokens, success.output_tokens), (Some(9), 3));

        let mut recorder = Recorder::start();
        handle_event(
            r#"{"choices":[{"index":0,"text":"hi","finish_reason":null}]}"#,
            Api::Completions,
            &mut recorder,
        )
        .expect("valid chunk");
        assert!(recorder.finish().ttft.is_some());

        let failures = [
            ("not json", FailureKind::Protocol),
            (r#"{"error":{"message":"boom"}}"#, FailureKind::StreamError),
            (
                r#"{"choices":[{"index":0,"text":"","finish_reason":"error"}]}"#,
                FailureKind::FinishError,
            ),
        ];
        for (data, kind) in failures {
            let mut recorder = Recorder::start();
            let failure =
                handle_event(data, Api::Completions, &mut recorder).expect_err("a failing chunk");
            assert_eq!(failure.kind, kind, "{data}");
        }
    }
}
