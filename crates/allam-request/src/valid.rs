//! The validated request type and the one function that makes it.

use allam_tokenizer::Tokenizer;
use allam_types::TokenId;

use crate::{Limits, RawRequest, ValidationError};

/// Sampling and stopping parameters after validation, defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0.0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means disabled.
    pub top_k: u32,
    pub min_p: f32,
    pub max_new_tokens: u32,
    pub min_new_tokens: u32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<TokenId>,
    pub ignore_eos: bool,
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub logprobs: Option<u32>,
    pub prompt_logprobs: Option<u32>,
    pub n: u32,
    pub priority: i32,
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// A request that passed validation. Fields are private: the only way to get one is
/// [`validate`] (or [`ValidRequest::from_parts_unchecked`] inside tests of other crates is
/// deliberately absent).
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    prompt_text: String,
    prompt_token_ids: Vec<TokenId>,
    params: SamplingParams,
}

impl ValidRequest {
    /// The rendered prompt (chat template applied) — for logs only with `--log-prompts`.
    pub fn prompt_text(&self) -> &str {
        &self.prompt_text
    }
    pub fn prompt_token_ids(&self) -> &[TokenId] {
        &self.prompt_token_ids
    }
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }
}

/// Checks every parameter, renders the chat template, tokenizes, and checks the prompt
/// against the context. Runs tokenizer work: call it off the async runtime's workers.
pub fn validate(
    raw: RawRequest,
    limits: &Limits,
    tokenizer: &Tokenizer,
) -> Result<ValidRequest, ValidationError> {
    let _ = (raw, limits, tokenizer);
    todo!("allam-request: validate")
}
