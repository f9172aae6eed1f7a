//! Raw API parameters → `ValidRequest`.
//!
//! Every front (OpenAI JSON, gRPC, the model card's `/score`, the CLI) parses into
//! [`RawRequest`] and calls [`validate`]. The engine accepts only [`ValidRequest`], which has
//! no other constructor, so unchecked input can never reach the scheduler, and one bad input
//! yields one message everywhere.
//!
//! Invariant: a `ValidRequest`'s prompt length + `max_new_tokens` fits the model context.

// Prompts are Arabic as often as not: a byte-offset slice of a `str` is a panic waiting for a
// multi-byte character (tgi #1795).
#![warn(clippy::string_slice)]

mod error;
pub mod limits;
mod params;
mod prompt;
mod raw;
mod valid;

pub use error::ValidationError;
pub use limits::Limits;
pub use raw::{ChatMessage, PromptInput, RawRequest, RawSamplingParams};
pub use valid::{validate, SamplingParams, ValidRequest};
