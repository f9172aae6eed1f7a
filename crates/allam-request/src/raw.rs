//! The one unvalidated form every API front parses into.

/// One chat turn as the client sent it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// What to generate from: chat messages rendered through the model's chat template, or a raw
/// prompt (encoded with bos prepended, no template).
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Chat(Vec<ChatMessage>),
    Text(String),
    /// Already tokenized (the worker re-validates ids against the vocabulary).
    TokenIds(Vec<u32>),
}

/// Sampling and stopping parameters as sent; `None` means "use the default".
/// Signed/float types are deliberate: a negative `max_new_tokens` must reach validation
/// and be rejected with a message, not be lost in parsing.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RawSamplingParams {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    /// Model-card name; `Some(false)` forces greedy whatever the temperature.
    pub do_sample: Option<bool>,
    pub max_new_tokens: Option<i64>,
    pub min_new_tokens: Option<i64>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<i64>,
    pub ignore_eos: Option<bool>,
    pub repetition_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    /// Number of top logprobs per generated token; `Some(0)` = only the chosen token's.
    pub logprobs: Option<i64>,
    /// Number of top logprobs per prompt token; `Some(0)` = only the actual token's.
    pub prompt_logprobs: Option<i64>,
    pub n: Option<i64>,
    pub priority: Option<i64>,
}

/// A request before validation.
#[derive(Debug, Clone, PartialEq)]
pub struct RawRequest {
    pub input: PromptInput,
    pub params: RawSamplingParams,
    /// The model name the client asked for, if the API carries one.
    pub model: Option<String>,
}
