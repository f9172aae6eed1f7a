//! The configured bounds `validate` enforces, and the defaults it fills in.
//!
//! Every bound is a named constant with the reason for its value; `Limits` is what operators
//! override (from CLI flags) and what `validate` receives. The sampling defaults (temperature
//! 1.0, top_p 1.0, top_k off, ...) are vLLM's and OpenAI's, so a client that sends nothing gets
//! the model's plain distribution; the model card's `do_sample=false` selects greedy.

/// ALLaM-2-7b's context (`max_position_embeddings`): prompt and generated tokens together.
pub const DEFAULT_MAX_CONTEXT: u32 = 4096;

/// `max_new_tokens` when the client sends none: enough for a chat answer, short enough that a
/// client that forgot the parameter does not hold a sequence slot for the whole context.
/// Lowered to what the context leaves after the prompt.
pub const DEFAULT_MAX_NEW_TOKENS: u32 = 256;

/// Upper bound on `stop` entries (vLLM has none; tgi allows 4). Each is matched against the
/// output after every token, so the count bounds per-token work.
pub const DEFAULT_MAX_STOP_STRINGS: usize = 16;

/// Upper bound on one stop string, in characters: the engine keeps this much text unreleased
/// while a stop string might still be forming.
pub const DEFAULT_MAX_STOP_CHARS: usize = 256;

/// Upper bound on `stop_token_ids` entries.
pub const DEFAULT_MAX_STOP_TOKEN_IDS: usize = 64;

/// Upper bound on `logprobs` and `prompt_logprobs` (OpenAI's `top_logprobs` allows 0..=20).
pub const DEFAULT_MAX_LOGPROBS: u32 = 20;

/// Upper bound on `n` (sequences per request); each one is a full sequence in the batch.
pub const DEFAULT_MAX_N: u32 = 16;

/// Upper bound on `top_k`: keeps the sampler's partial sort small. Values at or above the
/// vocabulary size mean "off" and are normalised to 0 before this check matters.
pub const DEFAULT_MAX_TOP_K: u32 = 1000;

/// Upper bound on `temperature`. Above ~2 output is already noise; 100 only guards against
/// absurd values (and overflow in `logits / temperature`).
pub const DEFAULT_MAX_TEMPERATURE: f64 = 100.0;

/// Temperatures below this are treated as greedy (0.0), as vLLM does: dividing logits by a
/// near-zero value overflows and picks the argmax anyway.
pub const GREEDY_TEMPERATURE_EPSILON: f64 = 1e-5;

/// A prompt longer than this many characters per context token cannot fit whatever it
/// tokenizes to (a Llama-family piece is at most 16 characters), so it is rejected before the
/// tokenizer spends time on it: about 0.1 s for 256 Ki characters, measured on this project's
/// 2-core machines.
pub const PROMPT_CHARS_PER_CONTEXT_TOKEN: usize = 64;

/// Defaults for sampling parameters the client left out.
pub const DEFAULT_TEMPERATURE: f32 = 1.0;
pub const DEFAULT_TOP_P: f32 = 1.0;
pub const DEFAULT_MIN_P: f32 = 0.0;
pub const DEFAULT_REPETITION_PENALTY: f32 = 1.0;

/// Bounds for `validate`. Build with [`Limits::for_context`] (or `default()` for ALLaM's 4096)
/// and override fields from configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Prompt tokens + `max_new_tokens` must not exceed this (the model's context).
    pub max_context: u32,
    /// The largest `max_new_tokens` a client may ask for.
    pub max_new_tokens: u32,
    /// `max_new_tokens` when absent (then lowered to the room the context leaves).
    pub default_max_new_tokens: u32,
    pub max_stop_strings: usize,
    /// Per stop string, in characters.
    pub max_stop_chars: usize,
    pub max_stop_token_ids: usize,
    /// For both `logprobs` and `prompt_logprobs`.
    pub max_logprobs: u32,
    pub max_n: u32,
    pub max_top_k: u32,
    pub max_temperature: f64,
    /// Total characters of a text prompt or of all chat message contents.
    pub max_prompt_chars: usize,
}

impl Limits {
    /// Defaults for a model with a context of `max_context` tokens.
    pub fn for_context(max_context: u32) -> Limits {
        Limits {
            max_context,
            max_new_tokens: max_context,
            default_max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
            max_stop_strings: DEFAULT_MAX_STOP_STRINGS,
            max_stop_chars: DEFAULT_MAX_STOP_CHARS,
            max_stop_token_ids: DEFAULT_MAX_STOP_TOKEN_IDS,
            max_logprobs: DEFAULT_MAX_LOGPROBS,
            max_n: DEFAULT_MAX_N,
            max_top_k: DEFAULT_MAX_TOP_K,
            max_temperature: DEFAULT_MAX_TEMPERATURE,
            max_prompt_chars: usize::try_from(max_context)
                .unwrap_or(usize::MAX)
                .saturating_mul(PROMPT_CHARS_PER_CONTEXT_TOKEN),
        }
    }
}

impl Default for Limits {
    /// ALLaM-2-7b's context of 4096 tokens.
    fn default() -> Self {
        Limits::for_context(DEFAULT_MAX_CONTEXT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_context() {
        let limits = Limits::default();
        assert_eq!(limits.max_context, 4096);
        assert_eq!(limits.max_new_tokens, 4096);
        assert_eq!(limits.max_prompt_chars, 4096 * 64);
        let small = Limits::for_context(128);
        assert_eq!(small.max_new_tokens, 128);
        assert_eq!(small.max_prompt_chars, 128 * 64);
        assert_eq!(small.default_max_new_tokens, DEFAULT_MAX_NEW_TOKENS);
    }
}
