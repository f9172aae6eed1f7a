//! `/metrics` after known traffic: every counter moves by exactly what was sent. Alone in its
//! test binary because the Prometheus recorder is process-wide: a test running beside it
//! would move the same counters.

mod support;

use allam_http::HttpConfig;
use allam_telemetry::metric_names as names;
use serde_json::{json, Value};
use support::{app_with_worker, get, golden_case, post, prometheus_sample};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_by_exactly_the_traffic_sent() {
    let server = app_with_worker(HttpConfig::default()).await;
    let app = &server.app;
    let scrape = || async {
        let reply = get(app, "/metrics").await;
        assert_eq!(reply.status, 200);
        assert!(reply.content_type.starts_with("text/plain"), "{}", reply.content_type);
        reply.text()
    };
    let before = scrape().await;

    let messages = golden_case("chat_en_tea")["messages"].clone();
    let chat = json!({"messages": messages, "temperature": 0, "max_tokens": 5});
    let chat_stream = json!({"messages": messages, "temperature": 0, "max_tokens": 5,
        "stream": true, "stream_options": {"include_usage": true}});
    let completion = json!({"prompt": "مرحبا بالعالم", "temperature": 0, "max_tokens": 4});
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
    usages.push(("score", json!({"prompt_tokens": chat_prompt_tokens, "completion_tokens": 3})));

    // Failures: one the router rejects (validation), two the HTTP front rejects.
    let bad = json!({"messages": messages, "temperature": -1});
    post(app, "/v1/chat/completions", bad.to_string()).await.expect_error(400, "validation", Some("temperature"));
    post(app, "/v1/chat/completions", "{").await.expect_error(400, "invalid_json", None);
    let wrong_model = json!({"model": "gpt-4", "messages": messages});
    post(app, "/v1/chat/completions", wrong_model.to_string()).await.expect_error(404, "model_not_found", Some("model"));

    let after = scrape().await;
    let delta = |name: &str, labels: &[(&str, &str)]| {
        prometheus_sample(&after, name, labels) - prometheus_sample(&before, name, labels)
    };
    let api = |api: &'static str| [("api", api)];

    assert_eq!(delta(names::REQUESTS_TOTAL, &api("openai_chat")), 5.0);
    assert_eq!(delta(names::REQUEST_SUCCESSES_TOTAL, &api("openai_chat")), 2.0);
    for reason in ["validation", "invalid_json", "model_not_found"] {
        let labels = [("api", "openai_chat"), ("reason", reason)];
        assert_eq!(delta(names::REQUEST_FAILURES_TOTAL, &labels), 1.0, "{reason}");
    }
    for api_label in ["openai_completions", "score"] {
        assert_eq!(delta(names::REQUESTS_TOTAL, &api(api_label)), 1.0, "{api_label}");
        assert_eq!(delta(names::REQUEST_SUCCESSES_TOTAL, &api(api_label)), 1.0, "{api_label}");
        assert_eq!(delta(names::REQUEST_FAILURES_TOTAL, &api(api_label)), 0.0, "{api_label}");
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
        assert_eq!(delta(&prompt_sum, &api(api_label)), tokens("prompt_tokens", Some(api_label)), "{api_label}");
        assert_eq!(delta(&generation_sum, &api(api_label)), tokens("completion_tokens", Some(api_label)), "{api_label}");
        let successes = delta(names::REQUEST_SUCCESSES_TOTAL, &api(api_label));
        assert_eq!(delta(&generation_count, &api(api_label)), successes, "{api_label}");
    }
    // The engine's own counters (same process here) saw the same tokens.
    assert_eq!(delta(names::PROMPT_TOKENS_TOTAL, &[]), tokens("prompt_tokens", None));
    assert_eq!(delta(names::GENERATED_TOKENS_TOTAL, &[]), tokens("completion_tokens", None));
    assert!(delta(&format!("{}_count", names::REQUEST_DURATION_SECONDS), &api("openai_chat")) >= 2.0);
}
