//! Runs `allam_bench::run` end to end against in-test servers with canned streaming answers:
//! an axum OpenAI-style SSE server and a tonic `allam.v1.Generation` server. They test the
//! client and measurement logic (wire shapes, timing, token accounting, failure kinds); the
//! real cluster is benchmarked by `allam bench` itself.
//!
//! The servers sleep between chunks to simulate generation, so the tests can assert lower
//! bounds on latencies (a client cannot see a token before the server sends it) but never
//! upper bounds, which would depend on the machine's load.

mod grpc;
mod http;

use std::io::Write;

/// Milliseconds the fake servers wait before the first token.
pub const FIRST_TOKEN_DELAY_MS: u64 = 20;
/// Milliseconds the fake servers wait between tokens.
pub const TOKEN_GAP_MS: u64 = 3;

/// A JSONL dataset with one `{"prompt": ...}` line per entry.
pub fn prompt_file(prompts: &[&str]) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    for prompt in prompts {
        let line = serde_json::json!({"prompt": prompt, "max_tokens": 4});
        writeln!(file, "{line}").expect("write temp file");
    }
    file
}

/// Whitespace-separated words in `text`.
pub fn n_words(text: &str) -> u32 {
    u32::try_from(text.split_whitespace().count()).expect("test prompts are short")
}
