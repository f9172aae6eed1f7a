//! OpenAI request bodies (`/v1/chat/completions`, `/v1/completions`) and their mapping onto
//! `allam_request::RawRequest`.
//!
//! Only wire-shape checks happen here: JSON types (by serde, with the path), polymorphic fields
//! (`stop`, `prompt`, message `content`), options that contradict each other, and OpenAI
//! features this server does not implement (tools, `echo`, ...), which are refused rather than
//! silently ignored. Every range check (`temperature`, `n`, `max_tokens`, ...) belongs to
//! `allam_request::validate`, so one bad value gets one message on every front.
//!
//! Unknown fields are ignored, as OpenAI and vLLM do: SDKs add fields faster than servers.
//! Defaults that differ from the engine's: `/v1/completions` without `max_tokens` generates
//! 16 tokens (OpenAI's and vLLM's documented default); chat leaves it to validation.

use allam_request::{ChatMessage, PromptInput, RawRequest, RawSamplingParams};
use serde::Deserialize;
use serde_json::Value;

use crate::Error;

/// OpenAI's default `max_tokens` for the legacy completions API.
pub(crate) const COMPLETIONS_DEFAULT_MAX_TOKENS: i64 = 16;

#[derive(Debug, Default, Deserialize)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// `POST /v1/chat/completions` body.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct ChatCompletionRequest {
    pub model: Option<String>,
    pub messages: Option<Vec<ChatMessageIn>>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<i64>,
    pub stop: Option<Value>,
    pub seed: Option<u64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    // vLLM extras.
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<i64>,
    pub stop_token_ids: Option<Vec<i64>>,
    pub priority: Option<i64>,
    // Known OpenAI features this server does not implement; refused when actually used.
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    pub response_format: Option<Value>,
    pub logit_bias: Option<Value>,
}

/// One chat message as OpenAI clients send it.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatMessageIn {
    /// Optional in the type so that a missing role is reported as `messages[i].role`.
    #[serde(default)]
    pub role: Option<String>,
    /// A string, an array of content parts, or null (assistant turns with tool calls).
    #[serde(default)]
    pub content: Option<Value>,
}

/// `POST /v1/completions` body.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Option<Value>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<i64>,
    pub stop: Option<Value>,
    pub seed: Option<u64>,
    pub logprobs: Option<i64>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<i64>,
    pub stop_token_ids: Option<Vec<i64>>,
    pub priority: Option<i64>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<i64>,
    pub logit_bias: Option<Value>,
}

/// How an API spells the parameters `allam-request` names canonically, so that a 400's
/// `param` is the field the client actually sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WireNames {
    Chat {
        /// `max_completion_tokens` when the client sent it, else `max_tokens`.
        max_tokens: &'static str,
        /// `top_logprobs` when the client sent it, else `logprobs`.
        logprobs: &'static str,
    },
    Completions,
    /// The model card's `/score` format: everything sits under `input_data`.
    Score,
}

impl WireNames {
    /// The wire name of canonical `field`, or `None` when it is the same.
    pub(crate) fn param(self, field: &'static str) -> Option<String> {
        let renamed = match (self, field) {
            (WireNames::Chat { max_tokens, .. }, "max_new_tokens") => max_tokens,
            (WireNames::Chat { logprobs, .. }, "logprobs") => logprobs,
            (WireNames::Chat { .. } | WireNames::Completions, "min_new_tokens") => "min_tokens",
            (WireNames::Completions, "max_new_tokens") => "max_tokens",
            (WireNames::Score, "messages" | "prompt") => "input_data.input_string",
            (WireNames::Score, field) => return Some(format!("input_data.parameters.{field}")),
            _ => return None,
        };
        Some(renamed.to_owned())
    }
}

/// How the response must be shaped, decided while parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ResponseOptions {
    pub stream: bool,
    pub include_usage: bool,
    /// Whether choices carry a `logprobs` object.
    pub logprobs: bool,
    /// Number of choices (`n`), as sent; only used after validation accepted it.
    pub n: u32,
    pub names: WireNames,
}

impl ChatCompletionRequest {
    /// Maps onto the one raw form; the model name is checked by the caller.
    pub(crate) fn into_raw(self) -> Result<(RawRequest, ResponseOptions), Error> {
        refuse_used("tools", self.tools.as_ref())?;
        refuse_used("functions", self.functions.as_ref())?;
        refuse_used("function_call", self.function_call.as_ref())?;
        refuse_used("logit_bias", self.logit_bias.as_ref())?;
        if let Some(choice) = &self.tool_choice {
            if !(choice.is_null() || choice == "none") {
                return Err(unsupported("tool_choice"));
            }
        }
        if let Some(format) = &self.response_format {
            let is_text = format.is_null() || format.get("type").is_some_and(|t| t == "text");
            if !is_text {
                return Err(Error::invalid_parameter(
                    "response_format",
                    "only `{\"type\": \"text\"}` is supported",
                ));
            }
        }
        let messages = self
            .messages
            .ok_or_else(|| Error::invalid_parameter("messages", "`messages` is required"))?;
        let messages = messages
            .into_iter()
            .enumerate()
            .map(|(idx, message)| message_into_raw(idx, message))
            .collect::<Result<Vec<_>, _>>()?;

        let logprobs = match (self.logprobs, self.top_logprobs) {
            (Some(true), top) => Some(top.unwrap_or(0)),
            (_, Some(_)) => {
                return Err(Error::invalid_parameter(
                    "top_logprobs",
                    "`top_logprobs` needs `logprobs: true`",
                ))
            }
            (_, None) => None,
        };
        let stream = self.stream.unwrap_or(false);
        let include_usage = include_usage(stream, self.stream_options)?;
        let params = RawSamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            do_sample: None,
            // The newer name wins: the SDK deprecates `max_tokens` for chat.
            max_new_tokens: self.max_completion_tokens.or(self.max_tokens),
            min_new_tokens: self.min_tokens,
            seed: self.seed,
            stop: stop_strings(self.stop)?,
            stop_token_ids: self.stop_token_ids.unwrap_or_default(),
            ignore_eos: self.ignore_eos,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logprobs,
            prompt_logprobs: None,
            n: self.n,
            priority: self.priority,
        };
        let names = WireNames::Chat {
            max_tokens: if self.max_completion_tokens.is_some() {
                "max_completion_tokens"
            } else {
                "max_tokens"
            },
            logprobs: if self.top_logprobs.is_some() {
                "top_logprobs"
            } else {
                "logprobs"
            },
        };
        let options = ResponseOptions {
            stream,
            include_usage,
            logprobs: logprobs.is_some(),
            n: choice_count(self.n),
            names,
        };
        let raw = RawRequest {
            input: PromptInput::Chat(messages),
            params,
            model: self.model,
        };
        Ok((raw, options))
    }
}

impl CompletionRequest {
    /// Maps onto the one raw form; the model name is checked by the caller.
    pub(crate) fn into_raw(self) -> Result<(RawRequest, ResponseOptions), Error> {
        refuse_used("logit_bias", self.logit_bias.as_ref())?;
        if self.echo == Some(true) {
            return Err(unsupported("echo"));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(unsupported("suffix"));
        }
        if self
            .best_of
            .is_some_and(|best_of| Some(best_of) != self.n && best_of != 1)
        {
            return Err(Error::invalid_parameter(
                "best_of",
                "`best_of` other than `n` is not supported",
            ));
        }
        let prompt = self
            .prompt
            .ok_or_else(|| Error::invalid_parameter("prompt", "`prompt` is required"))?;
        let input = prompt_input(prompt)?;
        let stream = self.stream.unwrap_or(false);
        let include_usage = include_usage(stream, self.stream_options)?;
        let params = RawSamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            do_sample: None,
            max_new_tokens: Some(self.max_tokens.unwrap_or(COMPLETIONS_DEFAULT_MAX_TOKENS)),
            min_new_tokens: self.min_tokens,
            seed: self.seed,
            stop: stop_strings(self.stop)?,
            stop_token_ids: self.stop_token_ids.unwrap_or_default(),
            ignore_eos: self.ignore_eos,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logprobs: self.logprobs,
            prompt_logprobs: None,
            n: self.n,
            priority: self.priority,
        };
        let options = ResponseOptions {
            stream,
            include_usage,
            logprobs: self.logprobs.is_some(),
            n: choice_count(self.n),
            names: WireNames::Completions,
        };
        let raw = RawRequest {
            input,
            params,
            model: self.model,
        };
        Ok((raw, options))
    }
}

/// `n` for shaping the response only; validation has rejected anything outside 1..=max.
fn choice_count(n: Option<i64>) -> u32 {
    n.and_then(|n| u32::try_from(n).ok()).unwrap_or(1).max(1)
}

fn include_usage(stream: bool, options: Option<StreamOptions>) -> Result<bool, Error> {
    match options {
        Some(_) if !stream => Err(Error::invalid_parameter(
            "stream_options",
            "`stream_options` is only allowed with `stream: true`",
        )),
        Some(options) => Ok(options.include_usage.unwrap_or(false)),
        None => Ok(false),
    }
}

fn unsupported(param: &str) -> Error {
    Error::invalid_parameter(param, format!("`{param}` is not supported by this server"))
}

/// Refuses a feature field that carries something (null, `[]` and `{}` mean "unused").
fn refuse_used(param: &str, value: Option<&Value>) -> Result<(), Error> {
    let used = match value {
        None | Some(Value::Null) => false,
        Some(Value::Array(items)) => !items.is_empty(),
        Some(Value::Object(fields)) => !fields.is_empty(),
        Some(_) => true,
    };
    if used {
        Err(unsupported(param))
    } else {
        Ok(())
    }
}

/// `stop`: a string or an array of strings.
fn stop_strings(stop: Option<Value>) -> Result<Vec<String>, Error> {
    let wrong =
        || Error::invalid_parameter("stop", "`stop` must be a string or an array of strings");
    match stop {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(stop)) => Ok(vec![stop]),
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|item| match item {
                Value::String(stop) => Ok(stop),
                _ => Err(wrong()),
            })
            .collect(),
        Some(_) => Err(wrong()),
    }
}

/// `prompt`: a string, a one-element array of strings, or token ids (flat or one nested
/// array). Several prompts in one request are refused: each is its own request here.
fn prompt_input(prompt: Value) -> Result<PromptInput, Error> {
    let wrong = || {
        Error::invalid_parameter(
            "prompt",
            "`prompt` must be a string, an array with one string, or an array of token ids",
        )
    };
    let batched = || {
        Error::invalid_parameter(
            "prompt",
            "several prompts in one request are not supported; send one request per prompt",
        )
    };
    match prompt {
        Value::String(text) => Ok(PromptInput::Text(text)),
        Value::Array(mut items) => match items.first() {
            None => Err(Error::invalid_parameter(
                "prompt",
                "`prompt` must not be empty",
            )),
            Some(Value::String(_)) if items.len() > 1 => Err(batched()),
            Some(Value::String(_)) => match items.pop() {
                Some(Value::String(text)) => Ok(PromptInput::Text(text)),
                _ => Err(wrong()),
            },
            Some(Value::Array(_)) if items.len() > 1 => Err(batched()),
            Some(Value::Array(_)) => match items.pop() {
                Some(Value::Array(ids)) => token_ids(&ids).map(PromptInput::TokenIds),
                _ => Err(wrong()),
            },
            Some(Value::Number(_)) => token_ids(&items).map(PromptInput::TokenIds),
            Some(_) => Err(wrong()),
        },
        _ => Err(wrong()),
    }
}

fn token_ids(items: &[Value]) -> Result<Vec<u32>, Error> {
    if items.is_empty() {
        return Err(Error::invalid_parameter(
            "prompt",
            "`prompt` must not be empty",
        ));
    }
    items
        .iter()
        .map(|item| {
            item.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| {
                    Error::invalid_parameter(
                        "prompt",
                        format!("token ids in `prompt` must be non-negative integers, got {item}"),
                    )
                })
        })
        .collect()
}

/// A message's content: a string, text parts (joined with newlines), or null (empty).
fn message_into_raw(idx: usize, message: ChatMessageIn) -> Result<ChatMessage, Error> {
    let param = format!("messages[{idx}].content");
    let content = match message.content {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text,
        Some(Value::Array(parts)) => {
            let texts = parts
                .iter()
                .map(|part| {
                    let is_text = part.get("type").is_some_and(|t| t == "text");
                    match part.get("text").and_then(Value::as_str) {
                        Some(text) if is_text => Ok(text),
                        _ => Err(Error::invalid_parameter(
                            param.clone(),
                            "only `{\"type\": \"text\", \"text\": ...}` content parts are supported",
                        )),
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            texts.join("\n")
        }
        Some(_) => {
            return Err(Error::invalid_parameter(
                param,
                "`content` must be a string or an array of text parts",
            ))
        }
    };
    let role = message.role.ok_or_else(|| {
        Error::invalid_parameter(format!("messages[{idx}].role"), "`role` is required")
    })?;
    // OpenAI's newer name for the system role; the chat template knows only `system`.
    let role = if role == "developer" {
        "system".to_owned()
    } else {
        role
    };
    Ok(ChatMessage { role, content })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extract::parse_json;

    fn chat(body: &str) -> Result<(RawRequest, ResponseOptions), Error> {
        parse_json::<ChatCompletionRequest>(body.as_bytes())?.into_raw()
    }

    fn completion(body: &str) -> Result<(RawRequest, ResponseOptions), Error> {
        parse_json::<CompletionRequest>(body.as_bytes())?.into_raw()
    }

    fn param_of(result: Result<(RawRequest, ResponseOptions), Error>) -> String {
        match result.expect_err("must be rejected") {
            Error::InvalidParameter { param, .. } => param,
            Error::InvalidJson { param, .. } => param.unwrap_or_default(),
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn chat_maps_every_sampling_field() {
        let (raw, options) = chat(
            r#"{"model": "m", "messages": [{"role": "system", "content": "s"},
                {"role": "user", "content": "كيف أجهز كوب شاهي؟"}],
                "stream": true, "stream_options": {"include_usage": true}, "n": 2,
                "stop": "\n", "seed": 7, "logprobs": true, "top_logprobs": 3,
                "max_tokens": 10, "max_completion_tokens": 12, "temperature": 0.6,
                "top_p": 0.9, "presence_penalty": 0.1, "frequency_penalty": 0.2,
                "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": true,
                "min_tokens": 2, "stop_token_ids": [5], "user": "ignored"}"#,
        )
        .expect("valid");
        assert_eq!(raw.model.as_deref(), Some("m"));
        assert_eq!(
            raw.input,
            PromptInput::Chat(vec![
                ChatMessage {
                    role: "system".into(),
                    content: "s".into()
                },
                ChatMessage {
                    role: "user".into(),
                    content: "كيف أجهز كوب شاهي؟".into()
                },
            ])
        );
        let expected = RawSamplingParams {
            temperature: Some(0.6),
            top_p: Some(0.9),
            top_k: Some(40),
            min_p: Some(0.05),
            do_sample: None,
            max_new_tokens: Some(12),
            min_new_tokens: Some(2),
            seed: Some(7),
            stop: vec!["\n".into()],
            stop_token_ids: vec![5],
            ignore_eos: Some(true),
            repetition_penalty: Some(1.1),
            presence_penalty: Some(0.1),
            frequency_penalty: Some(0.2),
            logprobs: Some(3),
            prompt_logprobs: None,
            n: Some(2),
            priority: None,
        };
        assert_eq!(raw.params, expected);
        assert_eq!(
            options,
            ResponseOptions {
                stream: true,
                include_usage: true,
                logprobs: true,
                n: 2,
                names: WireNames::Chat {
                    max_tokens: "max_completion_tokens",
                    logprobs: "top_logprobs"
                },
            }
        );
    }

    #[test]
    fn chat_defaults_leave_everything_to_validation() {
        let (raw, options) =
            chat(r#"{"messages": [{"role": "user", "content": "hi"}]}"#).expect("valid");
        assert_eq!(raw.params, RawSamplingParams::default());
        assert_eq!(raw.model, None);
        assert_eq!(
            options,
            ResponseOptions {
                stream: false,
                include_usage: false,
                logprobs: false,
                n: 1,
                names: WireNames::Chat {
                    max_tokens: "max_tokens",
                    logprobs: "logprobs"
                },
            }
        );
    }

    #[test]
    fn chat_content_parts_and_developer_role() {
        let (raw, _) = chat(
            r#"{"messages": [{"role": "developer", "content": [{"type": "text", "text": "a"},
                {"type": "text", "text": "b"}]}, {"role": "assistant", "content": null}]}"#,
        )
        .expect("valid");
        assert_eq!(
            raw.input,
            PromptInput::Chat(vec![
                ChatMessage {
                    role: "system".into(),
                    content: "a\nb".into()
                },
                ChatMessage {
                    role: "assistant".into(),
                    content: String::new()
                },
            ])
        );
    }

    #[test]
    fn chat_logprobs_true_without_top_means_zero_top() {
        let (raw, options) =
            chat(r#"{"messages": [{"role": "user", "content": "x"}], "logprobs": true}"#)
                .expect("valid");
        assert_eq!(raw.params.logprobs, Some(0));
        assert!(options.logprobs);
        let (raw, options) =
            chat(r#"{"messages": [{"role": "user", "content": "x"}], "logprobs": false}"#)
                .expect("valid");
        assert_eq!(raw.params.logprobs, None);
        assert!(!options.logprobs);
    }

    #[test]
    fn chat_rejections_name_the_parameter() {
        let user = r#""messages": [{"role": "user", "content": "x"}]"#;
        let cases = [
            ("{}".to_owned(), "messages"),
            (format!(r#"{{{user}, "top_logprobs": 2}}"#), "top_logprobs"),
            (
                format!(r#"{{{user}, "stream_options": {{"include_usage": true}}}}"#),
                "stream_options",
            ),
            (format!(r#"{{{user}, "stop": 5}}"#), "stop"),
            (format!(r#"{{{user}, "stop": ["a", 5]}}"#), "stop"),
            (
                format!(r#"{{{user}, "tools": [{{"type": "function"}}]}}"#),
                "tools",
            ),
            (
                format!(r#"{{{user}, "tool_choice": "auto"}}"#),
                "tool_choice",
            ),
            (
                format!(r#"{{{user}, "logit_bias": {{"5": 1}}}}"#),
                "logit_bias",
            ),
            (
                format!(r#"{{{user}, "response_format": {{"type": "json_object"}}}}"#),
                "response_format",
            ),
            (
                format!(r#"{{{user}, "temperature": "hot"}}"#),
                "temperature",
            ),
            (format!(r#"{{{user}, "logprobs": 3}}"#), "logprobs"),
            (format!(r#"{{{user}, "seed": -1}}"#), "seed"),
            (
                r#"{"messages": [{"role": "user", "content": 5}]}"#.to_owned(),
                "messages[0].content",
            ),
            (
                r#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#
                    .to_owned(),
                "messages[0].content",
            ),
            (
                r#"{"messages": [{"content": "x"}]}"#.to_owned(),
                "messages[0].role",
            ),
        ];
        for (body, param) in cases {
            assert_eq!(param_of(chat(&body)), param, "{body}");
        }
        // Empty feature fields mean "unused" and are accepted.
        chat(&format!(
            r#"{{{user}, "tools": [], "logit_bias": {{}}, "tool_choice": "none"}}"#
        ))
        .expect("unused features are fine");
    }

    #[test]
    fn completion_prompt_shapes() {
        let input = |body: &str| completion(body).expect("valid").0.input;
        assert_eq!(
            input(r#"{"prompt": "مرحبا"}"#),
            PromptInput::Text("مرحبا".into())
        );
        assert_eq!(
            input(r#"{"prompt": ["one"]}"#),
            PromptInput::Text("one".into())
        );
        assert_eq!(
            input(r#"{"prompt": [1, 5, 9]}"#),
            PromptInput::TokenIds(vec![1, 5, 9])
        );
        assert_eq!(
            input(r#"{"prompt": [[1, 5]]}"#),
            PromptInput::TokenIds(vec![1, 5])
        );
        for body in [
            r#"{}"#,
            r#"{"prompt": []}"#,
            r#"{"prompt": ["a", "b"]}"#,
            r#"{"prompt": [[1], [2]]}"#,
            r#"{"prompt": [1, -2]}"#,
            r#"{"prompt": [1, "a"]}"#,
            r#"{"prompt": 5}"#,
            r#"{"prompt": [{}]}"#,
        ] {
            assert_eq!(param_of(completion(body)), "prompt", "{body}");
        }
    }

    #[test]
    fn completion_defaults_and_fields() {
        let (raw, options) = completion(r#"{"prompt": "x"}"#).expect("valid");
        assert_eq!(
            raw.params.max_new_tokens,
            Some(COMPLETIONS_DEFAULT_MAX_TOKENS)
        );
        assert_eq!(raw.params.logprobs, None);
        assert!(!options.logprobs);
        let (raw, options) = completion(
            r#"{"prompt": "x", "max_tokens": -3, "logprobs": 2, "stop": ["a", "b"], "n": 3,
                "best_of": 3, "echo": false, "suffix": ""}"#,
        )
        .expect("valid");
        // Negative values reach validation, which owns the message.
        assert_eq!(raw.params.max_new_tokens, Some(-3));
        assert_eq!(raw.params.logprobs, Some(2));
        assert_eq!(raw.params.stop, vec!["a".to_owned(), "b".to_owned()]);
        assert!(options.logprobs);
        assert_eq!(options.n, 3);
    }

    #[test]
    fn wire_names_follow_what_the_client_sent() {
        let chat_names = |body: &str| chat(body).expect("valid").1.names;
        let user = r#""messages": [{"role": "user", "content": "x"}]"#;
        let names = chat_names(&format!(r#"{{{user}, "max_completion_tokens": 5}}"#));
        assert_eq!(
            names.param("max_new_tokens").as_deref(),
            Some("max_completion_tokens")
        );
        assert_eq!(names.param("logprobs").as_deref(), Some("logprobs"));
        let names = chat_names(&format!(
            r#"{{{user}, "max_tokens": 5, "logprobs": true, "top_logprobs": 99}}"#
        ));
        assert_eq!(names.param("max_new_tokens").as_deref(), Some("max_tokens"));
        assert_eq!(names.param("logprobs").as_deref(), Some("top_logprobs"));
        assert_eq!(names.param("min_new_tokens").as_deref(), Some("min_tokens"));
        assert_eq!(names.param("temperature"), None);
        let names = completion(r#"{"prompt": "x"}"#).expect("valid").1.names;
        assert_eq!(names.param("max_new_tokens").as_deref(), Some("max_tokens"));
        assert_eq!(names.param("prompt"), None);
        assert_eq!(
            WireNames::Score.param("messages").as_deref(),
            Some("input_data.input_string")
        );
        assert_eq!(
            WireNames::Score.param("top_p").as_deref(),
            Some("input_data.parameters.top_p")
        );
    }

    #[test]
    fn completion_rejections_name_the_parameter() {
        for (body, param) in [
            (r#"{"prompt": "x", "echo": true}"#, "echo"),
            (r#"{"prompt": "x", "suffix": "end"}"#, "suffix"),
            (r#"{"prompt": "x", "best_of": 4}"#, "best_of"),
            (r#"{"prompt": "x", "logprobs": true}"#, "logprobs"),
            (r#"{"prompt": "x", "max_tokens": "ten"}"#, "max_tokens"),
        ] {
            assert_eq!(param_of(completion(body)), param, "{body}");
        }
    }
}
