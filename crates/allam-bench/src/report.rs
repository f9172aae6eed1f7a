//! The result of a run: counts, throughput and latency statistics, as JSON (`serde`) for
//! machines and as a table for people.
//!
//! Definitions: `duration_s` runs from the first request sent to the last one finished.
//! Throughputs divide by it and count only completed requests. Input tokens are the server's
//! `usage.prompt_tokens` (so random prompts are reported at their real length, not the
//! requested one); requests whose server sent no usage add no input tokens and are counted in
//! `requests_without_usage`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::measure::{Failure, Success};
use crate::stats::LatencyStats;

/// What `allam bench` measured. Serialized as-is by `--json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchReport {
    /// `grpc` or `openai`.
    pub backend: String,
    /// The gRPC endpoint or HTTP base URL (never the API key).
    pub target: String,
    /// `random`, `bilingual` or `jsonl`.
    pub dataset: String,
    pub num_requests: usize,
    pub completed: usize,
    pub failed: usize,
    /// Failed requests by kind: `http_<status>`, `grpc_<code>`, `timeout`, `connect`,
    /// `transport`, `protocol`, `stream_error`, `incomplete_stream`, `finish_error`.
    pub errors: BTreeMap<String, usize>,
    /// The first message seen for each kind in `errors`.
    pub error_examples: BTreeMap<String, String>,
    /// Configured Poisson rate in requests/s; `None` = all requests at once.
    pub request_rate: Option<f64>,
    pub max_concurrency: Option<usize>,
    /// The most requests that were in flight at once.
    pub peak_in_flight: usize,
    /// Random workload only: tokens per word measured on the target's tokenizer, or `None`
    /// when the target has no tokenize endpoint and one token per word was assumed.
    pub random_tokens_per_word: Option<f64>,
    pub duration_s: f64,
    pub total_input_tokens: u64,
    pub total_output_tokens: u64,
    pub mean_input_tokens: Option<f64>,
    pub mean_output_tokens: Option<f64>,
    /// Completed requests whose server sent no usage (output tokens counted by the client).
    pub requests_without_usage: usize,
    /// Completed requests per second.
    pub request_throughput: f64,
    pub output_token_throughput: f64,
    /// Input plus output tokens per second.
    pub total_token_throughput: f64,
    /// Time to first token; `None` when no request produced a token.
    pub ttft_ms: Option<LatencyStats>,
    /// Time per output token after the first (requests with at least two tokens).
    pub tpot_ms: Option<LatencyStats>,
    /// Gaps between consecutive token-carrying chunks, over all requests.
    pub itl_ms: Option<LatencyStats>,
    /// Whole request, send to end of stream.
    pub e2e_ms: Option<LatencyStats>,
}

/// Facts about the run that the outcomes do not carry.
#[derive(Debug, Clone)]
pub(crate) struct RunFacts {
    pub backend: String,
    pub target: String,
    pub dataset: String,
    pub request_rate: Option<f64>,
    pub max_concurrency: Option<usize>,
    pub peak_in_flight: usize,
    pub random_tokens_per_word: Option<f64>,
    pub duration: Duration,
}

/// Milliseconds, from integer nanoseconds so that whole milliseconds stay exact.
fn ms(duration: Duration) -> f64 {
    duration.as_nanos() as f64 / 1e6
}

impl BenchReport {
    pub(crate) fn build(facts: RunFacts, outcomes: &[Result<Success, Failure>]) -> BenchReport {
        let successes: Vec<&Success> = outcomes.iter().filter_map(|o| o.as_ref().ok()).collect();
        let mut errors = BTreeMap::new();
        let mut error_examples = BTreeMap::new();
        for failure in outcomes.iter().filter_map(|o| o.as_ref().err()) {
            let label = failure.kind.label();
            *errors.entry(label.clone()).or_insert(0) += 1;
            error_examples
                .entry(label)
                .or_insert_with(|| failure.message.clone());
        }
        let total_input_tokens: u64 = successes
            .iter()
            .filter_map(|s| s.prompt_tokens)
            .map(u64::from)
            .sum();
        let total_output_tokens: u64 = successes.iter().map(|s| u64::from(s.output_tokens)).sum();
        let n_with_usage = successes.iter().filter(|s| s.usage_reported).count();
        let duration_s = facts.duration.as_secs_f64();
        let per_second = |amount: f64| {
            if duration_s > 0.0 {
                amount / duration_s
            } else {
                0.0
            }
        };
        let ttft: Vec<f64> = successes.iter().filter_map(|s| s.ttft).map(ms).collect();
        let tpot: Vec<f64> = successes.iter().filter_map(|s| s.tpot()).map(ms).collect();
        let itl: Vec<f64> = successes
            .iter()
            .flat_map(|s| s.itl.iter().copied().map(ms))
            .collect();
        let e2e: Vec<f64> = successes.iter().map(|s| ms(s.e2e)).collect();
        BenchReport {
            backend: facts.backend,
            target: facts.target,
            dataset: facts.dataset,
            num_requests: outcomes.len(),
            completed: successes.len(),
            failed: outcomes.len() - successes.len(),
            errors,
            error_examples,
            request_rate: facts.request_rate,
            max_concurrency: facts.max_concurrency,
            peak_in_flight: facts.peak_in_flight,
            random_tokens_per_word: facts.random_tokens_per_word,
            duration_s,
            total_input_tokens,
            total_output_tokens,
            mean_input_tokens: (n_with_usage > 0)
                .then(|| total_input_tokens as f64 / n_with_usage as f64),
            mean_output_tokens: (!successes.is_empty())
                .then(|| total_output_tokens as f64 / successes.len() as f64),
            requests_without_usage: successes.len() - n_with_usage,
            request_throughput: per_second(successes.len() as f64),
            output_token_throughput: per_second(total_output_tokens as f64),
            total_token_throughput: per_second((total_input_tokens + total_output_tokens) as f64),
            ttft_ms: LatencyStats::from_samples(&ttft),
            tpot_ms: LatencyStats::from_samples(&tpot),
            itl_ms: LatencyStats::from_samples(&itl),
            e2e_ms: LatencyStats::from_samples(&e2e),
        }
    }

    /// A plain-text table for people, in the spirit of `vllm bench serve`'s summary.
    pub fn to_table(&self) -> String {
        let mut out = String::from("============ allam bench result ============\n");
        let mut row = |label: &str, value: String| {
            let _ = writeln!(out, "{label:<40} {value}");
        };
        row("Backend:", format!("{} ({})", self.backend, self.target));
        row("Dataset:", self.dataset.clone());
        row(
            "Request rate (req/s):",
            self.request_rate
                .map_or_else(|| "inf".to_owned(), |rate| format!("{rate}")),
        );
        row(
            "Max concurrency:",
            self.max_concurrency
                .map_or_else(|| "unlimited".to_owned(), |n| n.to_string()),
        );
        row("Peak requests in flight:", self.peak_in_flight.to_string());
        row("Successful requests:", self.completed.to_string());
        row("Failed requests:", self.failed.to_string());
        row("Benchmark duration (s):", format!("{:.2}", self.duration_s));
        row("Total input tokens:", self.total_input_tokens.to_string());
        row("Total output tokens:", self.total_output_tokens.to_string());
        if let Some(mean) = self.mean_input_tokens {
            row("Mean input tokens:", format!("{mean:.1}"));
        }
        if let Some(mean) = self.mean_output_tokens {
            row("Mean output tokens:", format!("{mean:.1}"));
        }
        if let Some(ratio) = self.random_tokens_per_word {
            row("Random prompt tokens per word:", format!("{ratio:.3}"));
        }
        if self.requests_without_usage > 0 {
            row(
                "Requests without server usage:",
                self.requests_without_usage.to_string(),
            );
        }
        row(
            "Request throughput (req/s):",
            format!("{:.2}", self.request_throughput),
        );
        row(
            "Output token throughput (tok/s):",
            format!("{:.2}", self.output_token_throughput),
        );
        row(
            "Total token throughput (tok/s):",
            format!("{:.2}", self.total_token_throughput),
        );
        for (kind, count) in &self.errors {
            let example = self
                .error_examples
                .get(kind)
                .map(|message| format!(" ({message})"))
                .unwrap_or_default();
            row(&format!("Errors {kind}:"), format!("{count}{example}"));
        }
        let _ = writeln!(
            out,
            "{:<12} {:>10} {:>10} {:>10} {:>10} {:>8}",
            "Latency ms", "mean", "p50", "p90", "p99", "n"
        );
        let latencies = [
            ("TTFT", &self.ttft_ms),
            ("TPOT", &self.tpot_ms),
            ("ITL", &self.itl_ms),
            ("E2E", &self.e2e_ms),
        ];
        for (name, stats) in latencies {
            let _ = match stats {
                Some(s) => writeln!(
                    out,
                    "{name:<12} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>8}",
                    s.mean, s.p50, s.p90, s.p99, s.count
                ),
                None => writeln!(out, "{name:<12} {:>10}", "-"),
            };
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::measure::FailureKind;

    fn success(ttft_ms: u64, e2e_ms: u64, output_tokens: u32, prompt: Option<u32>) -> Success {
        Success {
            ttft: Some(Duration::from_millis(ttft_ms)),
            itl: vec![Duration::from_millis(2); output_tokens.saturating_sub(1) as usize],
            e2e: Duration::from_millis(e2e_ms),
            output_tokens,
            prompt_tokens: prompt,
            usage_reported: prompt.is_some(),
        }
    }

    fn facts(duration: Duration) -> RunFacts {
        RunFacts {
            backend: "grpc".into(),
            target: "http://127.0.0.1:1".into(),
            dataset: "random".into(),
            request_rate: Some(2.5),
            max_concurrency: None,
            peak_in_flight: 3,
            random_tokens_per_word: Some(1.25),
            duration,
        }
    }

    #[test]
    fn report_aggregates_outcomes() {
        let outcomes = vec![
            Ok(success(10, 30, 11, Some(100))),
            Ok(success(20, 60, 21, Some(50))),
            Ok(success(30, 40, 1, None)),
            Err(Failure::new(FailureKind::HttpStatus(429), "busy")),
            Err(Failure::new(FailureKind::HttpStatus(429), "still busy")),
            Err(Failure::new(FailureKind::Timeout, "slow")),
        ];
        let report = BenchReport::build(facts(Duration::from_secs(2)), &outcomes);
        assert_eq!(
            (report.completed, report.failed, report.num_requests),
            (3, 3, 6)
        );
        assert_eq!(report.errors.get("http_429"), Some(&2));
        assert_eq!(report.errors.get("timeout"), Some(&1));
        assert_eq!(
            report.error_examples.get("http_429").map(String::as_str),
            Some("busy")
        );
        assert_eq!(report.total_input_tokens, 150);
        assert_eq!(report.total_output_tokens, 33);
        assert_eq!(report.requests_without_usage, 1);
        assert_eq!(report.mean_input_tokens, Some(75.0));
        assert_eq!(report.request_throughput, 1.5);
        assert_eq!(report.output_token_throughput, 16.5);
        assert_eq!(report.total_token_throughput, 91.5);
        let ttft = report.ttft_ms.expect("three TTFT samples");
        assert_eq!((ttft.count, ttft.mean, ttft.p50), (3, 20.0, 20.0));
        // TPOT: (30-10)/10 = 2 and (60-20)/20 = 2; the one-token request has none.
        let tpot = report.tpot_ms.expect("two TPOT samples");
        assert_eq!((tpot.count, tpot.mean), (2, 2.0));
        assert_eq!(report.itl_ms.expect("itl samples").count, 30);

        let table = report.to_table();
        for needle in [
            "grpc",
            "Errors http_429:",
            "2 (busy)",
            "TTFT",
            "1.50",
            "2.5",
        ] {
            assert!(table.contains(needle), "missing {needle:?} in\n{table}");
        }
        let json = serde_json::to_value(&report).expect("the report serializes");
        assert_eq!(json["errors"]["http_429"], 2);
        assert_eq!(json["ttft_ms"]["p50"], 20.0);
    }

    #[test]
    fn all_failed_run_has_no_latencies() {
        let outcomes = vec![Err(Failure::new(
            FailureKind::Grpc(tonic::Code::Unavailable),
            "down",
        ))];
        let report = BenchReport::build(facts(Duration::ZERO), &outcomes);
        assert_eq!(report.completed, 0);
        assert!(report.ttft_ms.is_none() && report.e2e_ms.is_none());
        assert_eq!(report.request_throughput, 0.0);
        assert!(report.to_table().contains("grpc_unavailable"));
        let json = serde_json::to_value(&report).expect("the report serializes");
        assert!(json["ttft_ms"].is_null());
    }
}
