//! What one request measured, and how a client records it while the stream arrives.
//!
//! Definitions (the same as `vllm bench serve`, so numbers compare):
//! - TTFT: from sending the request to the first chunk that carries a token (a non-empty
//!   text delta, or on gRPC non-empty `token_ids`: a chunk whose text is still empty because
//!   a multi-byte character is incomplete still proves a token was generated).
//! - ITL: the gap between consecutive token-carrying chunks. A chunk holding several tokens
//!   counts once, so ITL is per chunk, not per token.
//! - TPOT: `(e2e - ttft) / (output_tokens - 1)`, only for requests with at least 2 tokens.
//! - E2E: from sending the request to the end of its stream.
//!
//! Output tokens come from the server's final `usage`. A server that sends no usage gets the
//! client's own count (gRPC: `token_ids` received; HTTP: token-carrying chunks) and the report
//! counts such requests, since chunk counting undercounts multi-token chunks.

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

/// Why one request failed; the report groups failures by [`FailureKind::label`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureKind {
    /// The HTTP server answered with a non-2xx status.
    HttpStatus(u16),
    /// The gRPC call ended with a non-OK status (before or during the stream).
    Grpc(tonic::Code),
    /// The request took longer than the per-request timeout.
    Timeout,
    /// No connection could be made.
    Connect,
    /// The connection failed while the request was in flight.
    Transport,
    /// The server sent something that is not a valid chunk or SSE event.
    Protocol,
    /// An HTTP stream carried an `error` object instead of a chunk.
    StreamError,
    /// The stream ended without its final chunk (gRPC `finish_reason`, HTTP `[DONE]`).
    Incomplete,
    /// The server finished the sequence with reason `error` or `cancelled`.
    FinishError,
}

impl FailureKind {
    /// A short, stable label: `http_429`, `grpc_unavailable`, `timeout`, ...
    pub(crate) fn label(self) -> String {
        match self {
            FailureKind::HttpStatus(code) => format!("http_{code}"),
            FailureKind::Grpc(code) => format!("grpc_{}", grpc_code_name(code)),
            FailureKind::Timeout => "timeout".into(),
            FailureKind::Connect => "connect".into(),
            FailureKind::Transport => "transport".into(),
            FailureKind::Protocol => "protocol".into(),
            FailureKind::StreamError => "stream_error".into(),
            FailureKind::Incomplete => "incomplete_stream".into(),
            FailureKind::FinishError => "finish_error".into(),
        }
    }
}

/// The canonical gRPC status name in snake case (`RESOURCE_EXHAUSTED` → `resource_exhausted`).
fn grpc_code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// A failed request: its kind and the server's or client's message, for the report's examples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

impl Failure {
    pub(crate) fn new(kind: FailureKind, message: impl fmt::Display) -> Failure {
        Failure {
            kind,
            message: truncate_chars(&message.to_string(), 300),
        }
    }
}

/// At most `max_chars` characters of `text`, cut on a character boundary (messages from the
/// server may be Arabic, and byte slicing would split a letter).
pub(crate) fn truncate_chars(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((byte_idx, _)) => format!("{}…", text.get(..byte_idx).unwrap_or(text)),
        None => text.to_owned(),
    }
}

/// The measurements of one successful request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Success {
    /// `None` when the stream carried no token at all (e.g. eos came first).
    pub ttft: Option<Duration>,
    pub itl: Vec<Duration>,
    pub e2e: Duration,
    pub output_tokens: u32,
    /// The server's prompt token count, when it reported usage.
    pub prompt_tokens: Option<u32>,
    /// Whether `output_tokens` came from the server's usage rather than the client's count.
    pub usage_reported: bool,
}

impl Success {
    /// Time per output token after the first, when defined.
    pub(crate) fn tpot(&self) -> Option<Duration> {
        let ttft = self.ttft?;
        if self.output_tokens < 2 {
            return None;
        }
        Some(self.e2e.saturating_sub(ttft) / (self.output_tokens - 1))
    }
}

/// Records token arrival times while a stream is read.
#[derive(Debug)]
pub(crate) struct Recorder {
    sent: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    itl: Vec<Duration>,
    counted_tokens: u32,
    usage: Option<(u32, u32)>,
}

impl Recorder {
    /// Starts the clock; call right before the request goes on the wire.
    pub(crate) fn start() -> Recorder {
        Recorder {
            sent: Instant::now(),
            first_token: None,
            last_token: None,
            itl: Vec::new(),
            counted_tokens: 0,
            usage: None,
        }
    }

    /// A chunk carrying `n_tokens` (at least one) arrived now.
    pub(crate) fn token_chunk(&mut self, n_tokens: usize) {
        let now = Instant::now();
        match self.last_token {
            None => self.first_token = Some(now),
            Some(last) => self.itl.push(now.saturating_duration_since(last)),
        }
        self.last_token = Some(now);
        let n_tokens = u32::try_from(n_tokens.max(1)).unwrap_or(u32::MAX);
        self.counted_tokens = self.counted_tokens.saturating_add(n_tokens);
    }

    /// The server's usage for the request.
    pub(crate) fn usage(&mut self, prompt_tokens: u32, completion_tokens: u32) {
        self.usage = Some((prompt_tokens, completion_tokens));
    }

    /// The stream ended successfully now.
    pub(crate) fn finish(self) -> Success {
        let (prompt_tokens, output_tokens, usage_reported) = match self.usage {
            Some((prompt, completion)) => (Some(prompt), completion, true),
            None => (None, self.counted_tokens, false),
        };
        Success {
            ttft: self
                .first_token
                .map(|first| first.saturating_duration_since(self.sent)),
            itl: self.itl,
            e2e: self.sent.elapsed(),
            output_tokens,
            prompt_tokens,
            usage_reported,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn recorder_times_first_token_and_gaps() {
        let mut recorder = Recorder::start();
        tokio::time::advance(Duration::from_millis(40)).await;
        recorder.token_chunk(1);
        tokio::time::advance(Duration::from_millis(10)).await;
        recorder.token_chunk(2);
        tokio::time::advance(Duration::from_millis(15)).await;
        recorder.token_chunk(1);
        tokio::time::advance(Duration::from_millis(5)).await;
        let success = recorder.finish();
        assert_eq!(success.ttft, Some(Duration::from_millis(40)));
        assert_eq!(
            success.itl,
            vec![Duration::from_millis(10), Duration::from_millis(15)]
        );
        assert_eq!(success.e2e, Duration::from_millis(70));
        // No usage from the server: the client's own count stands in.
        assert_eq!(success.output_tokens, 4);
        assert!(!success.usage_reported);
        // (70 - 40) ms over 3 tokens after the first.
        assert_eq!(success.tpot(), Some(Duration::from_millis(10)));
    }

    #[tokio::test(start_paused = true)]
    async fn server_usage_wins_and_empty_streams_have_no_ttft() {
        let mut recorder = Recorder::start();
        recorder.token_chunk(1);
        recorder.usage(12, 5);
        let success = recorder.finish();
        assert_eq!(
            (success.prompt_tokens, success.output_tokens),
            (Some(12), 5)
        );
        assert!(success.usage_reported);

        let mut empty = Recorder::start();
        empty.usage(3, 0);
        let success = empty.finish();
        assert_eq!(success.ttft, None);
        assert_eq!(success.tpot(), None);
    }

    #[test]
    fn labels_and_truncation() {
        assert_eq!(FailureKind::HttpStatus(429).label(), "http_429");
        assert_eq!(
            FailureKind::Grpc(tonic::Code::ResourceExhausted).label(),
            "grpc_resource_exhausted"
        );
        assert_eq!(truncate_chars("مرحبا بالعالم", 5), "مرحبا…");
        assert_eq!(truncate_chars("short", 10), "short");
    }
}
