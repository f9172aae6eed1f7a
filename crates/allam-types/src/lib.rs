//! Vocabulary shared by every allam crate: ids, finish reasons, usage, timings, and the
//! events a request's stream carries. No IO, no async, no wire formats: the router and the
//! worker convert these to and from protobuf/JSON at their edges.

pub mod prefix_hash;

use std::fmt;

/// A token id in the model's vocabulary.
pub type TokenId = u32;

/// Identifies one request inside one process. Assigned by whoever admits the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "req-{}", self.0)
    }
}

/// Index of a block in the paged KV-cache pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

/// Why a sequence stopped producing tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// `max_new_tokens` reached.
    Length,
    /// An eos token, a `stop_token_ids` entry or a `stop` string.
    Stop,
    /// The client went away or asked to stop.
    Cancelled,
    /// The engine or the worker group failed while the request was running.
    Error,
}

impl FinishReason {
    /// The word OpenAI-style APIs use.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Error => "error",
        }
    }
}

impl fmt::Display for FinishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Token accounting of one finished request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens whose KV came from the prefix cache instead of being computed.
    pub cached_tokens: u32,
}

/// Wall-clock phases of one request, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Timings {
    /// Admission to first scheduled step.
    pub queue_ms: f64,
    /// Admission to first generated token.
    pub ttft_ms: f64,
    /// Admission to finish.
    pub total_ms: f64,
}

/// The logprob of one token.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenLogprob {
    pub id: TokenId,
    pub logprob: f32,
}

/// Logprobs of one generated token: the chosen one and the `top` most likely ones.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepLogprobs {
    pub chosen: TokenLogprob,
    pub top: Vec<TokenLogprob>,
}

/// One step's output for one sequence of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenDelta {
    /// Which of the request's `n` sequences this belongs to.
    pub index: u32,
    pub token_ids: Vec<TokenId>,
    /// Text that became printable with these tokens (may be empty while a multi-byte
    /// character is incomplete; concatenating all deltas gives the full text).
    pub text: String,
    pub logprobs: Vec<StepLogprobs>,
}

/// The end of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceEnd {
    pub index: u32,
    pub finish_reason: FinishReason,
    /// The full generated text (the stop string excluded).
    pub text: String,
    pub token_ids: Vec<TokenId>,
}

/// What a request's event stream carries, in order: `Started`, then (if asked for) one
/// `PromptLogprobs` once the prompt is computed, then any number of `Delta` and `SequenceEnd`,
/// then exactly one `Finished` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// The prompt was admitted.
    Started {
        prompt_token_ids: Vec<TokenId>,
    },
    /// Per prompt position; the first entry is `None` (nothing predicts the first token).
    PromptLogprobs(Vec<Option<StepLogprobs>>),
    Delta(TokenDelta),
    SequenceEnd(SequenceEnd),
    Finished {
        usage: Usage,
        timings: Timings,
    },
    /// The request could not be completed; `reason` is a stable label, `message` is for people.
    Failed {
        reason: &'static str,
        message: String,
    },
}
