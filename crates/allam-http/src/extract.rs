//! `ApiJson<T>`: the JSON body extractor every endpoint uses instead of `axum::Json`.
//!
//! axum's `Json` answers 422 for a type mismatch and 415 without a JSON content type, in
//! plain text. OpenAI clients expect 400 with the error object, and the offending field
//! named. So: read the bytes (axum's `DefaultBodyLimit` applies: over the limit is 413),
//! deserialize with `serde_path_to_error`, and report the path as `param`.
//!
//! The content type is not checked: `curl -d` sends `application/x-www-form-urlencoded`,
//! and a JSON body is unambiguous anyway.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::Error;

/// A JSON body that failed as an OpenAI-shaped 400/413 [`Error`], never a 422.
#[derive(Debug)]
pub(crate) struct ApiJson<T>(pub T);

/// What the extractor needs from the app state: the limit, for the 413 message.
pub(crate) trait BodyLimit {
    fn max_body_bytes(&self) -> usize;
}

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: BodyLimit + Send + Sync,
{
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Error::PayloadTooLarge {
                    limit_bytes: state.max_body_bytes(),
                }
            } else {
                Error::InvalidJson {
                    param: None,
                    message: format!("could not read the request body: {}", rejection.body_text()),
                }
            }
        })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Deserializes `bytes`, naming the field path on failure.
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        json_error(path, &inner)
    })?;
    // Trailing garbage after the object is malformed JSON too.
    deserializer
        .end()
        .map_err(|err| json_error(".".to_owned(), &err))?;
    Ok(value)
}

fn json_error(path: String, err: &serde_json::Error) -> Error {
    use serde_json::error::Category;
    // Only type/value errors have a meaningful field; a syntax error's path is where the
    // parser stopped (serde_path_to_error reports `?` for an unfinished map).
    let param = (err.classify() == Category::Data && path != "." && path != "?").then_some(path);
    let message = match (err.classify(), &param) {
        (Category::Data, Some(param)) => format!("invalid value for `{param}`: {err}"),
        (Category::Data, None) => format!("invalid request body: {err}"),
        (Category::Syntax | Category::Eof, _) => format!("malformed JSON body: {err}"),
        (Category::Io, _) => format!("could not read the JSON body: {err}"),
    };
    Error::InvalidJson { param, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Body {
        #[allow(dead_code)]
        temperature: Option<f64>,
        #[allow(dead_code)]
        messages: Option<Vec<Message>>,
    }

    #[derive(Debug, serde::Deserialize)]
    struct Message {
        #[allow(dead_code)]
        role: String,
    }

    fn param_and_code(result: Result<Body, Error>) -> (Option<String>, &'static str) {
        let err = result.expect_err("must fail");
        let reason = err.reason();
        match err {
            Error::InvalidJson { param, .. } => (param, reason),
            other => panic!("not an InvalidJson: {other:?}"),
        }
    }

    #[test]
    fn wrong_type_names_the_field_path() {
        let (param, code) = param_and_code(parse_json(br#"{"temperature": "hot"}"#));
        assert_eq!(param.as_deref(), Some("temperature"));
        assert_eq!(code, "invalid_json");
        let (param, _) = param_and_code(parse_json(br#"{"messages": [{"role": 7}]}"#));
        assert_eq!(param.as_deref(), Some("messages[0].role"));
    }

    #[test]
    fn syntax_errors_and_trailing_garbage_have_no_param() {
        for body in [
            &br#"{"temperature": 0.5"#[..],
            br#"{} {}"#,
            b"not json",
            b"",
        ] {
            let (param, code) = param_and_code(parse_json(body));
            assert_eq!(param, None, "{}", String::from_utf8_lossy(body));
            assert_eq!(code, "invalid_json");
        }
    }

    #[test]
    fn well_formed_body_parses() {
        let body: Body = parse_json(br#"{"temperature": 0.5, "extra": [1]}"#).expect("valid");
        assert_eq!(body.temperature, Some(0.5));
    }
}
