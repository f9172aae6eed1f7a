//! `POST /tokenize` in vLLM's shape: `{"prompt": "..."}` or `{"messages": [...]}` →
//! `{"tokens": [...], "count": N, "max_model_len": M}`.
//!
//! A prompt is encoded as generation would encode it (bos prepended, no template); messages
//! are rendered with the chat template first. `add_special_tokens: false` is refused rather
//! than ignored, since the router cannot encode without bos.

use allam_request::PromptInput;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::extract::ApiJson;
use crate::openai::request::ChatMessageIn;
use crate::state::AppState;
use crate::Error;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<ChatMessageIn>>,
    add_special_tokens: Option<bool>,
    /// Accepted for vLLM compatibility; the chat template always ends with a generation prompt.
    #[allow(dead_code)]
    add_generation_prompt: Option<bool>,
}

#[derive(Debug, Serialize)]
struct TokenizeResponse {
    tokens: Vec<u32>,
    count: usize,
    max_model_len: u32,
}

impl TokenizeRequest {
    fn into_input(self) -> Result<PromptInput, Error> {
        if self.add_special_tokens == Some(false) {
            return Err(Error::invalid_parameter(
                "add_special_tokens",
                "`add_special_tokens: false` is not supported",
            ));
        }
        match (self.prompt, self.messages) {
            (Some(prompt), None) => Ok(PromptInput::Text(prompt)),
            (None, Some(messages)) => {
                let messages = messages
                    .into_iter()
                    .enumerate()
                    .map(|(idx, message)| {
                        let content = match message.content {
                            Some(serde_json::Value::String(content)) => content,
                            _ => {
                                return Err(Error::invalid_parameter(
                                    format!("messages[{idx}].content"),
                                    "`content` must be a string",
                                ))
                            }
                        };
                        let role = message.role.ok_or_else(|| {
                            Error::invalid_parameter(
                                format!("messages[{idx}].role"),
                                "`role` is required",
                            )
                        })?;
                        Ok(allam_request::ChatMessage { role, content })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(PromptInput::Chat(messages))
            }
            (Some(_), Some(_)) => Err(Error::invalid_parameter(
                "messages",
                "send either `prompt` or `messages`, not both",
            )),
            (None, None) => Err(Error::invalid_parameter(
                "prompt",
                "`prompt` or `messages` is required",
            )),
        }
    }
}

pub(crate) async fn tokenize(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<ApiJson<TokenizeRequest>, Error>,
) -> Response {
    let result = async {
        state.authorize(&headers)?;
        let ApiJson(request) = body?;
        state.check_model(request.model.as_deref())?;
        let tokens = state.router().tokenize(request.into_input()?).await?;
        Ok::<_, Error>(TokenizeResponse {
            count: tokens.len(),
            max_model_len: state.max_context(),
            tokens,
        })
    }
    .await;
    match result {
        Ok(response) => Json(response).into_response(),
        Err(err) => err.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extract::parse_json;

    fn input(body: &str) -> Result<PromptInput, Error> {
        parse_json::<TokenizeRequest>(body.as_bytes())?.into_input()
    }

    #[test]
    fn prompt_or_messages_but_not_both() {
        assert_eq!(
            input(r#"{"prompt": "مرحبا"}"#).expect("ok"),
            PromptInput::Text("مرحبا".into())
        );
        assert!(matches!(
            input(r#"{"messages": [{"role": "user", "content": "x"}], "add_generation_prompt": true}"#),
            Ok(PromptInput::Chat(ref m)) if m.len() == 1
        ));
        for body in [
            "{}",
            r#"{"prompt": "x", "messages": []}"#,
            r#"{"prompt": "x", "add_special_tokens": false}"#,
            r#"{"messages": [{"role": "user"}]}"#,
        ] {
            assert_eq!(
                input(body).expect_err(body).reason(),
                "invalid_parameter",
                "{body}"
            );
        }
    }
}
