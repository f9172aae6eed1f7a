//! The OpenAI-compatible wire format: request bodies → `RawRequest`, engine events → whole
//! responses or SSE chunks. No IO here; the handlers in `routes` drive it.

pub(crate) mod chunks;
pub(crate) mod collect;
pub(crate) mod logprobs;
pub(crate) mod request;
pub(crate) mod wire;

use request::ResponseOptions;

/// Which OpenAI API a request came through; it decides the response shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Api {
    Chat,
    Completion,
}

/// Response-wide fields, fixed when the request is accepted.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ResponseMeta {
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The served model name (not the client's spelling).
    pub model: String,
    pub options: ResponseOptions,
}
