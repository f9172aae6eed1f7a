//! ALLaM's tokenizer: `tokenizer.json` through the `tokenizers` library, the chat template
//! through minijinja (transformers-compatible), and a UTF-8-safe incremental detokenizer.
//!
//! * [`Tokenizer`] loads a model directory (or bytes), encodes, decodes, and renders chat
//!   messages; it is an `Arc` inside, so clones are cheap and it is `Send + Sync`.
//! * [`IncrementalDecoder`] turns generated ids into text pieces for streaming; the pieces never
//!   split a character and concatenate to the full decode.
//! * [`train_demo_tokenizer`] / [`write_demo_tokenizer`] build the demo model's tokenizer from a
//!   bilingual text shipped in this crate, deterministically.
//!
//! Everything here is CPU work: call it off the async runtime's worker threads.
//!
//! Invariant: encoding, decoding and chat rendering reproduce transformers exactly (checked
//! against the fixtures' goldens); ids outside the vocabulary are errors, never silently dropped.

// Prompts are Arabic as often as not: a byte-offset slice of a `str` is a panic waiting for a
// multi-byte character (tgi #1795).
#![warn(clippy::string_slice)]

mod chat;
mod config;
mod demo;
mod error;
mod incremental;
mod tokenizer;

pub use chat::{Message, Role, LLAMA2_CHAT_TEMPLATE};
pub use demo::{
    demo_tokenizer_files, train_demo_tokenizer, write_demo_tokenizer, DemoTokenizerFiles,
    DEMO_VOCAB_SIZE,
};
pub use error::Error;
pub use incremental::IncrementalDecoder;
pub use tokenizer::{SpecialToken, Tokenizer};
