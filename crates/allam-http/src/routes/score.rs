//! `POST /score`: the model card's real-time inference format (Azure-ML style).
//!
//! Request, exactly as the card's samples:
//! `{"input_data": {"input_string": [{"role": "user", "content": "..."}],
//!   "parameters": {"temperature": 0.6, "top_p": 0.9, "do_sample": true, "max_new_tokens": 200}}}`
//! Response: `{"output": "<generated text>"}`.
//!
//! `do_sample: false` means greedy whatever the temperature (`RawSamplingParams::do_sample`).
//! `input_string` may also be a plain string (a raw prompt, no chat template). Besides the
//! card's four parameters, `top_k`, `repetition_penalty`, `seed`, `stop` and `min_new_tokens`
//! are accepted under their Hugging Face names. Errors use the same OpenAI error object as
//! the rest of the API. The request goes through the same `Router::generate` as chat, so
//! greedy `/score` and greedy chat give the same text for the same messages.

use allam_request::{PromptInput, RawRequest, RawSamplingParams};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::Instrument as _;

use super::generation::{collect_events, reject, start};
use crate::extract::ApiJson;
use crate::openai::request::{ChatMessageIn, WireNames};
use crate::request_metrics::{request_span, RequestTracker, API_SCORE};
use crate::state::AppState;
use crate::Error;

#[derive(Debug, Deserialize)]
pub(crate) struct ScoreRequest {
    #[serde(default)]
    input_data: Option<InputData>,
}

#[derive(Debug, Deserialize)]
struct InputData {
    /// Messages (array) or a raw prompt (string).
    #[serde(default)]
    input_string: Option<Value>,
    #[serde(default)]
    parameters: ScoreParameters,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ScoreParameters {
    temperature: Option<f64>,
    top_p: Option<f64>,
    do_sample: Option<bool>,
    max_new_tokens: Option<i64>,
    top_k: Option<i64>,
    repetition_penalty: Option<f64>,
    seed: Option<u64>,
    stop: Option<Vec<String>>,
    min_new_tokens: Option<i64>,
}

#[derive(Debug, Serialize)]
struct ScoreResponse {
    output: String,
}

const PARAM_INPUT: &str = "input_data.input_string";

impl ScoreRequest {
    pub(crate) fn into_raw(self) -> Result<RawRequest, Error> {
        let input_data = self
            .input_data
            .ok_or_else(|| Error::invalid_parameter("input_data", "`input_data` is required"))?;
        let input = match input_data.input_string {
            Some(Value::String(text)) => PromptInput::Text(text),
            Some(Value::Array(items)) => {
                let messages = items
                    .into_iter()
                    .enumerate()
                    .map(|(idx, item)| {
                        let message: ChatMessageIn =
                            serde_json::from_value(item).map_err(|err| {
                                Error::invalid_parameter(
                                    format!("{PARAM_INPUT}[{idx}]"),
                                    err.to_string(),
                                )
                            })?;
                        let content = match message.content {
                            Some(Value::String(content)) => content,
                            _ => {
                                return Err(Error::invalid_parameter(
                                    format!("{PARAM_INPUT}[{idx}].content"),
                                    "`content` must be a string",
                                ))
                            }
                        };
                        let role = message.role.ok_or_else(|| {
                            Error::invalid_parameter(
                                format!("{PARAM_INPUT}[{idx}].role"),
                                "`role` is required",
                            )
                        })?;
                        Ok(allam_request::ChatMessage { role, content })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                PromptInput::Chat(messages)
            }
            None | Some(Value::Null) => {
                return Err(Error::invalid_parameter(
                    PARAM_INPUT,
                    "`input_string` is required",
                ))
            }
            Some(_) => {
                return Err(Error::invalid_parameter(
                    PARAM_INPUT,
                    "`input_string` must be an array of messages or a string",
                ))
            }
        };
        let p = input_data.parameters;
        let params = RawSamplingParams {
            temperature: p.temperature,
            top_p: p.top_p,
            top_k: p.top_k,
            do_sample: p.do_sample,
            max_new_tokens: p.max_new_tokens,
            min_new_tokens: p.min_new_tokens,
            seed: p.seed,
            stop: p.stop.unwrap_or_default(),
            repetition_penalty: p.repetition_penalty,
            ..RawSamplingParams::default()
        };
        Ok(RawRequest {
            input,
            params,
            model: None,
        })
    }
}

pub(crate) async fn score(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<ApiJson<ScoreRequest>, Error>,
) -> Response {
    let span = request_span(API_SCORE, &headers);
    async move {
        let tracker = RequestTracker::start(API_SCORE);
        let prepared = state.authorize(&headers).and_then(|()| {
            let ApiJson(request) = body?;
            request.into_raw()
        });
        let raw = match prepared {
            Ok(raw) => raw,
            Err(err) => return reject(tracker, err),
        };
        let events = match start(&state, raw, API_SCORE).await {
            Ok(events) => events,
            // The router counted this failure.
            Err(err) => return err.with_wire_names(WireNames::Score).into_response(),
        };
        match collect_events(events, 1).await {
            Ok((choices, usage)) => {
                tracker.succeeded(usage);
                let output = choices
                    .first()
                    .map(|c| c.text().to_owned())
                    .unwrap_or_default();
                Json(ScoreResponse { output }).into_response()
            }
            Err(err) => err.into_response(),
        }
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extract::parse_json;

    /// The card's English sample request, verbatim.
    const CARD_ENGLISH: &str = r#"{
    "input_data": {
        "input_string": [
            {
                "role": "user",
                "content": "How do I prepare a cup of tea?"
            }
        ],
        "parameters": {
            "temperature": 0.6,
            "top_p": 0.9,
            "do_sample": true,
            "max_new_tokens": 200
        }
    }
}"#;

    fn raw(body: &str) -> Result<RawRequest, Error> {
        parse_json::<ScoreRequest>(body.as_bytes())?.into_raw()
    }

    #[test]
    fn card_sample_maps_to_chat_with_its_four_parameters() {
        let raw = raw(CARD_ENGLISH).expect("the card's request is valid");
        assert_eq!(
            raw.input,
            PromptInput::Chat(vec![allam_request::ChatMessage {
                role: "user".into(),
                content: "How do I prepare a cup of tea?".into()
            }])
        );
        let expected = RawSamplingParams {
            temperature: Some(0.6),
            top_p: Some(0.9),
            do_sample: Some(true),
            max_new_tokens: Some(200),
            ..RawSamplingParams::default()
        };
        assert_eq!(raw.params, expected);
        assert_eq!(raw.model, None);
    }

    #[test]
    fn greedy_flag_and_string_input() {
        let raw =
            raw(r#"{"input_data": {"input_string": "كيف", "parameters": {"do_sample": false}}}"#)
                .expect("valid");
        assert_eq!(raw.input, PromptInput::Text("كيف".into()));
        assert_eq!(raw.params.do_sample, Some(false));
        // Parameters are optional.
        raw_ok(r#"{"input_data": {"input_string": [{"role": "user", "content": "x"}]}}"#);
    }

    fn raw_ok(body: &str) {
        raw(body).expect("valid");
    }

    #[test]
    fn rejections_name_the_field() {
        let param = |body: &str| match raw(body).expect_err("invalid") {
            Error::InvalidParameter { param, .. } => param,
            Error::InvalidJson { param, .. } => param.unwrap_or_default(),
            other => panic!("{other:?}"),
        };
        assert_eq!(param("{}"), "input_data");
        assert_eq!(param(r#"{"input_data": {}}"#), PARAM_INPUT);
        assert_eq!(param(r#"{"input_data": {"input_string": 3}}"#), PARAM_INPUT);
        assert_eq!(
            param(r#"{"input_data": {"input_string": [{"role": "user", "content": 3}]}}"#),
            "input_data.input_string[0].content"
        );
        assert_eq!(
            param(r#"{"input_data": {"input_string": [{"content": "x"}]}}"#),
            "input_data.input_string[0].role"
        );
        assert_eq!(
            param(r#"{"input_data": {"input_string": "x", "parameters": {"do_sample": "yes"}}}"#),
            "input_data.parameters.do_sample"
        );
    }
}
