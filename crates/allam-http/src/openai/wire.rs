//! OpenAI response shapes, as serialized: chat completion, completion, their stream chunks,
//! usage and logprobs. Plain data; building them from engine events is `collect` (whole
//! response) and `chunks` (SSE).
//!
//! Invariant: field names and `object` strings are OpenAI's, so the official SDKs parse them.

use serde::Serialize;

pub(crate) const OBJECT_CHAT_COMPLETION: &str = "chat.completion";
pub(crate) const OBJECT_CHAT_COMPLETION_CHUNK: &str = "chat.completion.chunk";
pub(crate) const OBJECT_TEXT_COMPLETION: &str = "text_completion";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct PromptTokensDetails {
    pub cached_tokens: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct UsageOut {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub prompt_tokens_details: PromptTokensDetails,
}

impl From<allam_types::Usage> for UsageOut {
    fn from(usage: allam_types::Usage) -> Self {
        UsageOut {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.prompt_tokens.saturating_add(usage.completion_tokens),
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: usage.cached_tokens,
            },
        }
    }
}

/// One alternative in chat logprobs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct ChatTopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// One generated token in chat logprobs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<ChatTopLogprob>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

/// Legacy completions logprobs: parallel arrays, one entry per generated token.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<serde_json::Map<String, serde_json::Value>>,
    /// Character offset of each token in the choice's generated text.
    pub text_offset: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct AssistantMessage {
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: UsageOut,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct ChatChunkChoice {
    pub index: u32,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// `usage` on stream chunks: absent without `include_usage`; with it, `null` on every chunk
/// but the last one (OpenAI's documented shape).
pub(crate) type ChunkUsage = Option<Option<UsageOut>>;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: ChunkUsage,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Completion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    pub usage: UsageOut,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct CompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: ChunkUsage,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_total_is_the_sum_and_chunk_usage_has_three_shapes() {
        let usage = UsageOut::from(allam_types::Usage {
            prompt_tokens: 7,
            completion_tokens: 5,
            cached_tokens: 3,
        });
        assert_eq!(usage.total_tokens, 12);
        let chunk = |usage: ChunkUsage| {
            serde_json::to_value(CompletionChunk {
                id: "cmpl-1".into(),
                object: OBJECT_TEXT_COMPLETION,
                created: 1,
                model: "m".into(),
                choices: vec![],
                usage,
            })
            .expect("serializable")
        };
        assert!(chunk(None).get("usage").is_none());
        assert!(chunk(Some(None))["usage"].is_null());
        assert_eq!(
            chunk(Some(Some(usage)))["usage"]["prompt_tokens_details"]["cached_tokens"],
            3
        );
    }
}
