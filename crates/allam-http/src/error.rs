//! The one error type of allam-http and its single mapping to HTTP: status code plus
//! OpenAI's error object `{"error": {"message", "type", "param", "code"}}`.
//!
//! Invariants:
//! - The status is chosen here and nowhere else (handlers return `Error`, never a status).
//! - `code` is the stable [`Error::reason`] label, the same word the
//!   `allam_request_failures_total{reason}` counter uses.
//! - Internal failures reach the client as a generic message; the detail is logged once here.
//!   Client mistakes (4xx) are not logged.
//! - Model not found is 404 `model_not_found`, as both OpenAI and vLLM answer; the OpenAI
//!   SDK raises `NotFoundError` for it.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// Everything an allam-http request or the server itself can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The body is not JSON, or a field has the wrong JSON type. `param` is the serde path
    /// (`messages[0].content`), `None` when the body as a whole is unreadable.
    #[error("{message}")]
    InvalidJson {
        param: Option<String>,
        message: String,
    },
    /// A well-typed field the HTTP front rejects before validation (a missing required field,
    /// an unsupported OpenAI feature, conflicting options).
    #[error("{message}")]
    InvalidParameter { param: String, message: String },
    /// `allam-request` rejected a parameter. `field()` names it in our canonical words
    /// (`max_new_tokens`); `wire_param`, when set, is the name this client's API used for it
    /// (`max_tokens`), which is what OpenAI's `param` must say.
    #[error("{error}")]
    Validation {
        error: allam_request::ValidationError,
        wire_param: Option<String>,
    },
    /// The request names a model this server does not serve.
    #[error("The model `{requested}` does not exist; this server serves `{served}`.")]
    ModelNotFound { requested: String, served: String },
    /// No such endpoint.
    #[error("no endpoint at `{path}`")]
    RouteNotFound { path: String },
    /// The body is over the configured limit (`--max-request-body-bytes`).
    #[error("request body too large: the limit is {limit_bytes} bytes")]
    PayloadTooLarge { limit_bytes: usize },
    /// The worker group refused the request as invalid for its model (e.g. more KV cache
    /// than the group has); retrying elsewhere cannot help.
    #[error("{0}")]
    WorkerRejected(String),
    /// Missing or wrong `Authorization: Bearer` key.
    #[error("invalid or missing API key")]
    Unauthenticated,
    /// Every worker group is at its outstanding-request limit.
    #[error("the server is overloaded; retry later")]
    Overloaded,
    /// No healthy worker group is known.
    #[error("no worker is available to serve the request")]
    NoWorkers,
    /// The worker group failed while serving the request.
    #[error("the worker serving the request failed: {0}")]
    Unavailable(String),
    /// The request's deadline passed before it finished.
    #[error("the request timed out")]
    DeadlineExceeded,
    /// A server bug or an unexpected state; the detail is logged, not sent.
    #[error("internal error: {0}")]
    Internal(String),
    /// The HTTPS certificate or key cannot be used (from [`crate::serve_tls`]).
    #[error("HTTPS configuration: {0}")]
    Tls(String),
    /// Accepting or serving connections failed (from [`crate::serve`]).
    #[error("HTTP server on {addr}: {source}")]
    Serve {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Stable label for the failures counter and the error body's `code`.
    pub fn reason(&self) -> &'static str {
        // Labels shared with `allam_router::Error::reason` use the router's words, so one
        // failure kind has one label whichever layer counted it.
        match self {
            Error::InvalidJson { .. } => "invalid_json",
            Error::InvalidParameter { .. } => "invalid_parameter",
            Error::Validation { .. } => "validation",
            Error::ModelNotFound { .. } => "model_not_found",
            Error::RouteNotFound { .. } => "not_found",
            Error::PayloadTooLarge { .. } => "payload_too_large",
            Error::WorkerRejected(_) => "worker_rejected",
            Error::Unauthenticated => "unauthenticated",
            Error::Overloaded => "overloaded",
            Error::NoWorkers => "no_workers",
            Error::Unavailable(_) => "unavailable",
            Error::DeadlineExceeded => "deadline_exceeded",
            Error::Internal(_) | Error::Serve { .. } | Error::Tls(_) => "internal",
        }
    }

    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Error::InvalidJson { .. }
            | Error::InvalidParameter { .. }
            | Error::Validation { .. }
            | Error::WorkerRejected(_) => StatusCode::BAD_REQUEST,
            Error::ModelNotFound { .. } | Error::RouteNotFound { .. } => StatusCode::NOT_FOUND,
            Error::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Unauthenticated => StatusCode::UNAUTHORIZED,
            Error::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            Error::NoWorkers | Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Error::Internal(_) | Error::Serve { .. } | Error::Tls(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// OpenAI's `type` class for this error.
    fn error_type(&self) -> &'static str {
        match self.status() {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            status if status.is_client_error() => "invalid_request_error",
            _ => "server_error",
        }
    }

    fn param(&self) -> Option<String> {
        match self {
            Error::InvalidJson { param, .. } => param.clone(),
            Error::InvalidParameter { param, .. } => Some(param.clone()),
            Error::Validation { error, wire_param } => wire_param
                .clone()
                .or_else(|| error.field().map(str::to_owned)),
            Error::ModelNotFound { .. } => Some("model".to_owned()),
            _ => None,
        }
    }

    /// The message a client sees: internal detail replaced by a generic sentence.
    fn public_message(&self) -> String {
        match self {
            Error::Internal(_) | Error::Serve { .. } | Error::Tls(_) => {
                "internal server error; the details are in the server log".to_owned()
            }
            other => other.to_string(),
        }
    }

    /// The OpenAI error object, as sent in a body or in an SSE `data:` event.
    pub(crate) fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorObject {
                message: self.public_message(),
                r#type: self.error_type(),
                param: self.param(),
                code: self.reason(),
            },
        }
    }

    /// Names a validation error's parameter the way the client's API spells it.
    pub(crate) fn with_wire_names(self, names: crate::openai::request::WireNames) -> Self {
        match self {
            Error::Validation { error, .. } => {
                let wire_param = error.field().and_then(|field| names.param(field));
                Error::Validation { error, wire_param }
            }
            other => other,
        }
    }

    /// Shorthand for the front's own parameter checks.
    pub(crate) fn invalid_parameter(param: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidParameter {
            param: param.into(),
            message: message.into(),
        }
    }
}

impl From<allam_router::Error> for Error {
    fn from(err: allam_router::Error) -> Self {
        match err {
            allam_router::Error::Validation(error) => Error::Validation {
                error,
                wire_param: None,
            },
            allam_router::Error::WorkerRejected(message) => Error::WorkerRejected(message),
            allam_router::Error::Unauthenticated => Error::Unauthenticated,
            allam_router::Error::Overloaded => Error::Overloaded,
            allam_router::Error::NoWorkers => Error::NoWorkers,
            allam_router::Error::Unavailable(message) => Error::Unavailable(message),
            allam_router::Error::DeadlineExceeded => Error::DeadlineExceeded,
            allam_router::Error::Internal(message) => Error::Internal(message),
            // A variant added to the router later: keep its reason in the log, stay generic.
            other => Error::Internal(format!("{} ({})", other, other.reason())),
        }
    }
}

#[derive(Debug, serde::Serialize)]
pub(crate) struct ErrorBody {
    error: ErrorObject,
}

#[derive(Debug, serde::Serialize)]
struct ErrorObject {
    message: String,
    r#type: &'static str,
    param: Option<String>,
    code: &'static str,
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, reason = self.reason(), "request failed");
        }
        (status, Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_router_error_maps_to_its_documented_status() {
        use allam_router::Error as R;
        let cases = [
            (R::Unauthenticated, 401, "authentication_error"),
            (R::Overloaded, 429, "rate_limit_error"),
            (R::NoWorkers, 503, "server_error"),
            (R::Unavailable("rank 1 died".into()), 503, "server_error"),
            (R::DeadlineExceeded, 504, "server_error"),
            (R::Internal("bug".into()), 500, "server_error"),
        ];
        for (router_err, status, error_type) in cases {
            let err = Error::from(router_err);
            assert_eq!(err.status().as_u16(), status, "{err:?}");
            assert_eq!(err.body().error.r#type, error_type, "{err:?}");
            assert_eq!(err.body().error.param, None, "{err:?}");
        }
    }

    #[test]
    fn internal_detail_never_reaches_the_client() {
        let err = Error::Internal("secret path /models/x".into());
        let body = serde_json::to_string(&err.body()).expect("serializable");
        assert!(!body.contains("/models/x"), "{body}");
        assert!(body.contains("\"code\":\"internal\""), "{body}");
    }

    #[test]
    fn model_not_found_is_404_naming_model() {
        let err = Error::ModelNotFound {
            requested: "gpt-4".into(),
            served: "allam".into(),
        };
        assert_eq!(err.status(), StatusCode::NOT_FOUND);
        let body = serde_json::to_value(err.body()).expect("serializable");
        assert_eq!(body["error"]["param"], "model");
        assert_eq!(body["error"]["code"], "model_not_found");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert!(body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("gpt-4")));
    }

    #[test]
    fn invalid_parameter_carries_param() {
        let body = serde_json::to_value(
            Error::invalid_parameter("top_logprobs", "needs `logprobs: true`").body(),
        )
        .expect("serializable");
        assert_eq!(body["error"]["param"], "top_logprobs");
        assert_eq!(body["error"]["code"], "invalid_parameter");
    }

    #[test]
    fn worker_rejection_is_a_client_error_without_param() {
        let err = Error::from(allam_router::Error::WorkerRejected(
            "needs 900 KV blocks".into(),
        ));
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        let body = serde_json::to_value(err.body()).expect("serializable");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert!(body["error"]["param"].is_null());
        assert!(body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("900")));
    }
}
