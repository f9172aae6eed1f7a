//! Process-wide observability after known traffic: `/metrics` counters move by exactly what
//! was sent; no prompt text reaches the logs (of any crate on the path) unless `log_prompts`;
//! a client's `traceparent` makes the HTTP, router and worker spans one trace. One test in its
//! own binary, because the Prometheus recorder and the tracing subscriber are global: a test
//! running beside it would move the same counters.

mod support;

use std::sync::{Arc, Mutex};

use allam_http::HttpConfig;
use allam_telemetry::metric_names as names;
use serde_json::{json, Value};
use support::{app_with_worker, get, golden_case, post, post_with, prometheus_sample};

/// Collects every formatted log line of the process.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuffer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log buffer")).into_owned()
    }
}

/// Keeps `(span name, trace id)` of every finished span.
#[derive(Debug, Clone, Default)]
struct SpanCollector(Arc<Mutex<Vec<(String, String)>>>);

impl opentelemetry_sdk::trace::SpanProcessor for SpanCollector {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: opentelemetry_sdk::trace::SpanData) {
        let trace_id = span.span_context.trace_id().to_string();
        self.0
            .lock()
            .expect("spans")
            .push((span.name.into_owned(), trace_id));
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(
        &self,
        _timeout: std::time::Duration,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }
}

impl SpanCollector {
    fn names_in_trace(&self, trace_id: &str) -> Vec<String> {
        let spans = self.0.lock().expect("spans");
        spans
            .iter()
            .filter(|(_, id)| id == trace_id)
            .map(|(name, _)| name.clone())
            .collect()
    }
}

/// The process-wide subscriber: `filter`, formatted logs into a buffer, and OpenTelemetry
/// spans into a collector (as `allam_telemetry::init_tracing` composes them, minus export).
fn install_global_subscriber(filter: &str) -> (LogBuffer, SpanCollector) {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    let logs = LogBuffer::default();
    let writer = logs.clone();
    let spans = SpanCollector::default();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_span_processor(spans.clone())
        .build();
    tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new(filter))
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(move || writer.clone()),
        )
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
        .init();
    (logs, spans)
}

/// A prompt nobody would log by accident: checked absent, then present with `log_prompts`.
const SECRET: &str = "كلمة السر 7319";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_logs_and_traces_after_known_traffic() {
    // Debug for every allam crate on the request path: any prompt logging would show.
    let (logs, spans) = install_global_subscriber(
        "info,allam_http=debug,allam_router=debug,allam_worker=debug,allam_engine=debug,allam_request=debug",
    );
    let server = app_with_worker(HttpConfig::default()).await;
    let app = &server.app;
    let scrape = || async {
        let reply = get(app, "/metrics").await;
        assert_eq!(reply.status, 200);
        assert!(
            reply.content_type.starts_with("text/plain"),
            "{}",
            reply.content_type
        );
        reply.text()
    };
    let before = scrape().await;

    let messages = golden_case("chat_en_tea")["messages"].clone();
    let chat = json!({"messages": messages, "temperature": 0, "max_tokens": 5});
    let chat_stream = json!({"messages": messages, "temperature": 0, "max_tokens": 5,
        "stream": true, "stream_options": {"include_usage": true}});
    let completion = json!({"prompt": SECRET, "temperature": 0, "max_tokens": 4});
    let score = json!({"input_data": {"input_string": messages,
        "parameters": {"do_sample": false, "max_new_tokens": 3}}});

    let mut usages: Vec<(&str, Value)> = Vec::new();
    let reply = post(app, "/v1/chat/completions", chat.to_string()).await;
    usages.push(("openai_chat", reply.json()["usage"].clone()));
    let reply = post(app, "/v1/chat/completions", chat_stream.to_string()).await;
    let last = reply.sse_chunks().pop().expect("usage chunk");
    usages.push(("openai_chat", last["usage"].clone()));
    let reply = post(app, "/v1/completions", completion.to_string()).await;
    usages.push(("openai_completions", reply.json()["usage"].clone()));
    let reply = post(app, "/score", score.to_string()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    // `/score` answers no usage: its prompt is the chat prompt, and it generated 3 tokens
    // (the goldens show no eos in this prompt's first 24 greedy tokens).
    let chat_prompt_tokens = usages[0].1["prompt_tokens"].clone();
    usages.push((
        "score",
        json!({"prompt_tokens": chat_prompt_tokens, "completion_tokens": 3}),
    ));

    // Failures: one the router rejects (validation), two the HTTP front rejects.
    let bad = json!({"messages": messages, "temperature": -1});
    post(app, "/v1/chat/completions", bad.to_string())
        .await
        .expect_error(400, "validation", Some("temperature"));
    post(app, "/v1/chat/completions", "{")
        .await
        .expect_error(400, "invalid_json", None);
    let wrong_model = json!({"model": "gpt-4", "messages": messages});
    post(app, "/v1/chat/completions", wrong_model.to_string())
        .await
        .expect_error(404, "model_not_found", Some("model"));

    let after = scrape().await;
    let delta = |name: &str, labels: &[(&str, &str)]| {
        prometheus_sample(&after, name, labels) - prometheus_sample(&before, name, labels)
    };
    let api = |api: &'static str| [("api", api)];

    assert_eq!(delta(names::REQUESTS_TOTAL, &api("openai_chat")), 5.0);
    assert_eq!(
        delta(names::REQUEST_SUCCESSES_TOTAL, &api("openai_chat")),
        2.0
    );
    for reason in ["validation", "invalid_json", "model_not_found"] {
        let labels = [("api", "openai_chat"), ("reason", reason)];
        assert_eq!(
            delta(names::REQUEST_FAILURES_TOTAL, &labels),
            1.0,
            "{reason}"
        );
    }
    for api_label in ["openai_completions", "score"] {
        assert_eq!(
            delta(names::REQUESTS_TOTAL, &api(api_label)),
            1.0,
            "{api_label}"
        );
        assert_eq!(
            delta(names::REQUEST_SUCCESSES_TOTAL, &api(api_label)),
            1.0,
            "{api_label}"
        );
        assert_eq!(
            delta(names::REQUEST_FAILURES_TOTAL, &api(api_label)),
            0.0,
            "{api_label}"
        );
    }

    let tokens = |field: &str, api_label: Option<&str>| -> f64 {
        usages
            .iter()
            .filter(|(label, _)| api_label.is_none_or(|wanted| wanted == *label))
            .map(|(_, usage)| usage[field].as_f64().expect("token count"))
            .sum()
    };
    for api_label in ["openai_chat", "openai_completions", "score"] {
        let prompt_sum = format!("{}_sum", names::REQUEST_PROMPT_TOKENS);
        let generation_sum = format!("{}_sum", names::REQUEST_GENERATION_TOKENS);
        let generation_count = format!("{}_count", names::REQUEST_GENERATION_TOKENS);
        assert_eq!(
            delta(&prompt_sum, &api(api_label)),
            tokens("prompt_tokens", Some(api_label)),
            "{api_label}"
        );
        assert_eq!(
            delta(&generation_sum, &api(api_label)),
            tokens("completion_tokens", Some(api_label)),
            "{api_label}"
        );
        let successes = delta(names::REQUEST_SUCCESSES_TOTAL, &api(api_label));
        assert_eq!(
            delta(&generation_count, &api(api_label)),
            successes,
            "{api_label}"
        );
    }
    // The engine's own counters (same process here) saw the same tokens.
    assert_eq!(
        delta(names::PROMPT_TOKENS_TOTAL, &[]),
        tokens("prompt_tokens", None)
    );
    assert_eq!(
        delta(names::GENERATED_TOKENS_TOTAL, &[]),
        tokens("completion_tokens", None)
    );
    // One sampled row per generated token; these plain requests' rows were all picked by
    // the backend.
    assert_eq!(
        delta(names::SAMPLED_ROWS_TOTAL, &[("path", "backend")]),
        tokens("completion_tokens", None)
    );
    assert_eq!(delta(names::SAMPLED_ROWS_TOTAL, &[("path", "host")]), 0.0);
    assert!(
        delta(
            &format!("{}_count", names::REQUEST_DURATION_SECONDS),
            &api("openai_chat")
        ) >= 2.0
    );
    // The router's view of its one worker group, idle again.
    let group = [("group", "test-group")];
    assert_eq!(
        prometheus_sample(&after, names::WORKER_GROUP_HEALTHY, &group),
        1.0,
        "{after}"
    );
    assert_eq!(
        prometheus_sample(&after, names::WORKER_GROUP_OUTSTANDING_REQUESTS, &group),
        0.0
    );

    // Logs: the debug line for each request is there, redacted.
    let text = logs.text();
    assert!(
        text.contains("generation request"),
        "debug logging is on: {text}"
    );
    assert!(text.contains("<redacted"), "{text}");
    assert!(
        !text.contains(SECRET),
        "prompt text leaked into the logs:\n{text}"
    );
    // With `--log-prompts`, the same request's prompt is logged.
    let logging_app = support::http_app(
        server.router.clone(),
        HttpConfig {
            log_prompts: true,
            ..HttpConfig::default()
        },
    );
    let reply = post(&logging_app, "/v1/completions", completion.to_string()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(logs.text().contains(SECRET), "log_prompts shows the prompt");

    // Traces: the client's trace id reaches the HTTP, router and worker spans.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let reply = post_with(
        app,
        "/v1/chat/completions",
        chat.to_string(),
        &[("traceparent", &traceparent)],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    // The worker's span closes when its stream ends, just after the reply: poll for it.
    let wanted = ["http_request", "router.generate", "worker.generate"];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut interval = tokio::time::interval(std::time::Duration::from_millis(10));
    loop {
        interval.tick().await;
        let names = spans.names_in_trace(trace_id);
        if wanted.iter().all(|name| names.iter().any(|n| n == name)) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "spans in the client's trace: {names:?}"
        );
    }
}
