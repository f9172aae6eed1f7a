//! `ValidationError`: why a request was rejected, with the offending parameter named.
//!
//! Messages follow one style: the parameter in backticks, the rule, the value given, e.g.
//! `` `top_p` must be in (0, 1], got 1.5 ``. `field()` is the parameter for OpenAI's `param`
//! (our canonical names: `max_new_tokens`, `stop`, `messages`, `prompt`, ...; a front whose wire
//! name differs maps it). `reason()` is a short stable label for metrics. All fronts (HTTP,
//! gRPC, `/score`) surface these unchanged, so one bad input gives one message everywhere.

/// A request that `validate` rejected. Always the client's fault (HTTP 400 / INVALID_ARGUMENT).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// A numeric parameter outside its range; `expected` reads after "must be".
    #[error("`{field}` must be {expected}, got {got}")]
    OutOfRange {
        field: &'static str,
        expected: String,
        got: String,
    },

    /// A list parameter with too many entries.
    #[error("`{field}` must have at most {max} entries, got {got}")]
    TooMany {
        field: &'static str,
        max: usize,
        got: usize,
    },

    /// An empty stop string (it would match everywhere).
    #[error("`stop[{index}]` must not be empty")]
    EmptyStopString { index: usize },

    #[error("`stop[{index}]` must be at most {max_chars} characters long, got {got_chars}")]
    StopStringTooLong {
        index: usize,
        max_chars: usize,
        got_chars: usize,
    },

    /// A token id (in `stop_token_ids` or a token-id prompt) outside the vocabulary.
    #[error("`{field}[{index}]` must be a token id in [0, {vocab_size}), got {id}")]
    TokenIdOutOfVocab {
        field: &'static str,
        index: usize,
        id: i64,
        vocab_size: usize,
    },

    /// An empty prompt or message list.
    #[error("`{field}` must not be empty")]
    EmptyPrompt { field: &'static str },

    /// A prompt (or all message contents together) over the character limit.
    #[error("`{field}` must be at most {max_chars} characters long, got {got_chars}")]
    PromptTooLong {
        field: &'static str,
        max_chars: usize,
        got_chars: usize,
    },

    /// A NUL character in prompt text; `location` is e.g. `messages[2].content`.
    #[error("`{location}` must not contain NUL characters (U+0000)")]
    NulCharacter {
        field: &'static str,
        location: String,
    },

    #[error("`messages[{index}].role` must be one of `system`, `user`, `assistant`, got `{role}`")]
    UnknownRole { index: usize, role: String },

    /// The chat template refused the messages (its own message, e.g. roles must alternate).
    #[error("`messages` cannot be rendered with the model's chat template: {message}")]
    ChatTemplate { message: String },

    #[error("`messages` cannot be used: the model has no chat template; send a `prompt` instead")]
    NoChatTemplate,

    /// The prompt alone leaves no room to generate.
    #[error(
        "`{field}` is {prompt_tokens} tokens long, but the context of {max_context} tokens \
         allows at most {} prompt tokens (at least 1 must remain for generation)",
        max_context.saturating_sub(1)
    )]
    PromptExceedsContext {
        field: &'static str,
        prompt_tokens: usize,
        max_context: u32,
    },

    /// Prompt + requested generation exceeds the context.
    #[error(
        "`max_new_tokens` ({max_new_tokens}) plus the prompt's {prompt_tokens} tokens must be \
         at most the context of {max_context} tokens; at most {} new tokens fit",
        (*max_context as usize).saturating_sub(*prompt_tokens)
    )]
    ContextExceeded {
        prompt_tokens: usize,
        max_new_tokens: u32,
        max_context: u32,
    },

    /// `min_new_tokens` cannot be met within the context.
    #[error(
        "`min_new_tokens` ({min_new_tokens}) does not fit: the prompt's {prompt_tokens} tokens \
         leave {} of the context's {max_context} tokens",
        (*max_context as usize).saturating_sub(*prompt_tokens)
    )]
    MinNewTokensExceedsContext {
        prompt_tokens: usize,
        min_new_tokens: u32,
        max_context: u32,
    },

    /// The tokenizer failed on the prompt.
    #[error("`{field}` could not be tokenized: {message}")]
    Tokenize {
        field: &'static str,
        message: String,
    },
}

impl ValidationError {
    /// The offending parameter, for OpenAI's `param` (our canonical name).
    pub fn field(&self) -> Option<&'static str> {
        Some(match self {
            ValidationError::OutOfRange { field, .. }
            | ValidationError::TooMany { field, .. }
            | ValidationError::TokenIdOutOfVocab { field, .. }
            | ValidationError::EmptyPrompt { field }
            | ValidationError::PromptTooLong { field, .. }
            | ValidationError::NulCharacter { field, .. }
            | ValidationError::PromptExceedsContext { field, .. }
            | ValidationError::Tokenize { field, .. } => field,
            ValidationError::EmptyStopString { .. } | ValidationError::StopStringTooLong { .. } => {
                "stop"
            }
            ValidationError::UnknownRole { .. }
            | ValidationError::ChatTemplate { .. }
            | ValidationError::NoChatTemplate => "messages",
            ValidationError::ContextExceeded { .. } => "max_new_tokens",
            ValidationError::MinNewTokensExceedsContext { .. } => "min_new_tokens",
        })
    }

    /// A short, stable label for metrics (`allam_request_failures_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            ValidationError::OutOfRange { .. } => "out_of_range",
            ValidationError::TooMany { .. } => "too_many",
            ValidationError::EmptyStopString { .. } => "empty_stop_string",
            ValidationError::StopStringTooLong { .. } => "stop_string_too_long",
            ValidationError::TokenIdOutOfVocab { .. } => "token_id_out_of_vocab",
            ValidationError::EmptyPrompt { .. } => "empty_prompt",
            ValidationError::PromptTooLong { .. } => "prompt_too_long",
            ValidationError::NulCharacter { .. } => "nul_character",
            ValidationError::UnknownRole { .. } => "unknown_role",
            ValidationError::ChatTemplate { .. } => "chat_template",
            ValidationError::NoChatTemplate => "no_chat_template",
            ValidationError::PromptExceedsContext { .. }
            | ValidationError::ContextExceeded { .. }
            | ValidationError::MinNewTokensExceedsContext { .. } => "context_length_exceeded",
            ValidationError::Tokenize { .. } => "tokenize",
        }
    }
}
