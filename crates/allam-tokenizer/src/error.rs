//! The one error type of this crate.
//!
//! Every variant names what failed: the file and the field for load errors, the role for chat
//! input, the template's own message for template errors. `reason()` is the short stable label
//! that metrics and logs use; callers never branch on the display text.

use std::path::PathBuf;

use allam_types::TokenId;

/// Everything that can go wrong loading, running or training a tokenizer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tokenizer file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A tokenizer file could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// `tokenizer.json` is not a tokenizer the `tokenizers` library accepts.
    #[error("invalid {file}: {message}")]
    InvalidTokenizerJson { file: String, message: String },

    /// `tokenizer_config.json` (or `special_tokens_map.json`) is malformed.
    #[error("invalid {file}: field `{field}`: {message}")]
    InvalidConfig {
        file: String,
        field: &'static str,
        message: String,
    },

    /// A required special token is missing from the config or from the vocabulary.
    #[error("{file}: `{field}` {message}")]
    MissingSpecialToken {
        file: String,
        field: &'static str,
        message: String,
    },

    /// The chat template does not compile.
    #[error("chat template in {file} does not compile: {message}")]
    TemplateSyntax { file: String, message: String },

    /// Rendering the chat template failed; `message` is the template's own message when it
    /// called `raise_exception`.
    #[error("chat template error: {message}")]
    Template { message: String },

    /// The tokenizer has no chat template, so chat messages cannot be rendered.
    #[error("the tokenizer has no chat template (tokenizer_config.json has no `chat_template`)")]
    NoChatTemplate,

    /// A chat role other than system/user/assistant.
    #[error("unknown chat role `{role}`: expected one of `system`, `user`, `assistant`")]
    UnknownRole { role: String },

    /// A token id outside the vocabulary.
    #[error("token id {id} is out of the vocabulary (size {vocab_size})")]
    UnknownTokenId { id: TokenId, vocab_size: usize },

    /// The `tokenizers` library failed to encode.
    #[error("encoding failed: {message}")]
    Encode { message: String },

    /// The `tokenizers` library failed to decode.
    #[error("decoding failed: {message}")]
    Decode { message: String },

    /// Training the demo tokenizer failed.
    #[error("training the demo tokenizer failed: {message}")]
    Train { message: String },
}

impl Error {
    /// A short, stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Io { .. } => "tokenizer_io",
            Error::Write { .. } => "tokenizer_write",
            Error::InvalidTokenizerJson { .. } => "invalid_tokenizer_json",
            Error::InvalidConfig { .. } => "invalid_tokenizer_config",
            Error::MissingSpecialToken { .. } => "missing_special_token",
            Error::TemplateSyntax { .. } => "chat_template_syntax",
            Error::Template { .. } => "chat_template",
            Error::NoChatTemplate => "no_chat_template",
            Error::UnknownRole { .. } => "unknown_role",
            Error::UnknownTokenId { .. } => "unknown_token_id",
            Error::Encode { .. } => "encode",
            Error::Decode { .. } => "decode",
            Error::Train { .. } => "train",
        }
    }
}
