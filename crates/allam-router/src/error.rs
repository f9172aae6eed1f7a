//! The router's one error type and its single mapping to gRPC statuses.
//!
//! Client mistakes (validation, auth) carry their message to the client; `Internal` answers a
//! generic message and logs the details once, here.

/// Why a request could not be served.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A parameter or the prompt is invalid; the message names the field.
    #[error(transparent)]
    Validation(#[from] allam_request::ValidationError),
    /// The worker group refused the request as invalid for its model (e.g. prompt +
    /// `max_new_tokens` need more KV cache than the group has). Not retried elsewhere.
    #[error("{0}")]
    WorkerRejected(String),
    /// API keys are configured and the request carried none, or a wrong one.
    #[error("missing or invalid API key: send `authorization: Bearer <key>`")]
    Unauthenticated,
    /// Every routable worker group is at `max_outstanding_per_group`.
    #[error("every worker group is at capacity; retry later")]
    Overloaded,
    /// No worker group is known and healthy.
    #[error("no worker group is available")]
    NoWorkers,
    /// The worker group failed (after the first token, or on the retry too).
    #[error("worker group unavailable: {0}")]
    Unavailable(String),
    /// The request's deadline passed.
    #[error("the request's deadline passed")]
    DeadlineExceeded,
    /// A bug or an unexpected failure; details go to the log, not the client.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Short fixed label for the `reason` label of `allam_request_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Validation(_) => "validation",
            Error::WorkerRejected(_) => "worker_rejected",
            Error::Unauthenticated => "unauthenticated",
            Error::Overloaded => "overloaded",
            Error::NoWorkers => "no_workers",
            Error::Unavailable(_) => "unavailable",
            Error::DeadlineExceeded => "deadline_exceeded",
            Error::Internal(_) => "internal",
        }
    }

    /// The gRPC status for the public API (the one place this mapping is written).
    pub fn to_status(&self) -> tonic::Status {
        use tonic::Status;
        match self {
            Error::Validation(_) | Error::WorkerRejected(_) => {
                Status::invalid_argument(self.to_string())
            }
            Error::Unauthenticated => Status::unauthenticated(self.to_string()),
            Error::Overloaded => Status::resource_exhausted(self.to_string()),
            Error::NoWorkers | Error::Unavailable(_) => Status::unavailable(self.to_string()),
            Error::DeadlineExceeded => Status::deadline_exceeded(self.to_string()),
            Error::Internal(details) => {
                tracing::error!(error = %details, "internal error answered as INTERNAL");
                Status::internal("internal error")
            }
        }
    }
}
