//! The validated request type and the one function that makes it.
//!
//! Invariant: a `ValidRequest` exists only if every parameter is in range, the prompt is
//! non-empty, every prompt id is in the vocabulary, and prompt tokens + `max_new_tokens` fit the
//! context. There is no other constructor.

use allam_tokenizer::Tokenizer;
use allam_types::TokenId;

use crate::params::check_params;
use crate::prompt::check_prompt;
use crate::{Limits, RawRequest, ValidationError};

/// Sampling and stopping parameters after validation, defaults applied (see `limits` for the
/// defaults and bounds).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0.0 means greedy; otherwise in [1e-5, max_temperature].
    pub temperature: f32,
    /// In (0, 1]; 1.0 keeps every token.
    pub top_p: f32,
    /// 0 means disabled (also what -1 and values ≥ the vocabulary size become).
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
/// [`validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    prompt_text: String,
    prompt_token_ids: Vec<TokenId>,
    params: SamplingParams,
    model: Option<String>,
}

impl ValidRequest {
    /// The rendered prompt (chat template applied; for token-id prompts, their decode) — for
    /// logs only with `--log-prompts`.
    pub fn prompt_text(&self) -> &str {
        &self.prompt_text
    }
    pub fn prompt_token_ids(&self) -> &[TokenId] {
        &self.prompt_token_ids
    }
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }
    /// The model name the client asked for, passed through unchecked.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }
}

/// Checks every parameter, renders the chat template, tokenizes, and checks the prompt
/// against the context. Runs tokenizer work: call it off the async runtime's workers.
///
/// Parameters are checked first (cheap), then the prompt, then the fit: prompt tokens +
/// `max_new_tokens` ≤ `limits.max_context`. Without `max_new_tokens`, it becomes
/// `min(max(default_max_new_tokens, min_new_tokens), room left in the context)`.
pub fn validate(
    raw: RawRequest,
    limits: &Limits,
    tokenizer: &Tokenizer,
) -> Result<ValidRequest, ValidationError> {
    let RawRequest {
        input,
        params,
        model,
    } = raw;
    let checked = check_params(&params, limits, tokenizer.vocab_size())?;
    let prompt = check_prompt(input, limits, tokenizer)?;

    let prompt_tokens = prompt.token_ids.len();
    let max_context = usize::try_from(limits.max_context).unwrap_or(usize::MAX);
    if prompt_tokens >= max_context {
        return Err(ValidationError::PromptExceedsContext {
            field: prompt.field,
            prompt_tokens,
            max_context: limits.max_context,
        });
    }
    // Fits in u32: it is below `max_context`.
    let room = u32::try_from(max_context - prompt_tokens).unwrap_or(u32::MAX);
    let mut sampling = checked.params;
    sampling.max_new_tokens = match checked.requested_max_new_tokens {
        Some(requested) if requested > room => {
            return Err(ValidationError::ContextExceeded {
                prompt_tokens,
                max_new_tokens: requested,
                max_context: limits.max_context,
            })
        }
        Some(requested) => requested,
        None => {
            if sampling.min_new_tokens > room {
                return Err(ValidationError::MinNewTokensExceedsContext {
                    prompt_tokens,
                    min_new_tokens: sampling.min_new_tokens,
                    max_context: limits.max_context,
                });
            }
            limits
                .default_max_new_tokens
                .max(sampling.min_new_tokens)
                .min(limits.max_new_tokens)
                .min(room)
                .max(1)
        }
    };

    Ok(ValidRequest {
        prompt_text: prompt.text,
        prompt_token_ids: prompt.token_ids,
        params: sampling,
        model,
    })
}
