//! The HTTP front against a real `Router` that has no worker: probes, model listing,
//! `/tokenize`, and every error that must be answered before (or instead of) generation, in
//! OpenAI's error shape, streamed or not.

mod support;

use allam_http::HttpConfig;
use support::{app_without_workers, get, golden_case, post, post_with, tokenizer, MODEL_NAME};

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";

async fn open_app() -> axum::Router {
    app_without_workers(HttpConfig::default(), &[]).await
}

#[tokio::test]
async fn health_is_live_and_ready_needs_a_worker_group() {
    let app = open_app().await;
    assert_eq!(get(&app, "/health").await.status, 200);
    let ready = get(&app, "/ready").await;
    assert_eq!(ready.status, 503, "{}", ready.text());
}

#[tokio::test]
async fn models_lists_the_served_model() {
    let app = open_app().await;
    let reply = get(&app, "/v1/models").await;
    assert_eq!(reply.status, 200);
    let body = reply.json();
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"][0]["id"], MODEL_NAME);
    assert_eq!(body["data"][0]["object"], "model");
    assert_eq!(body["data"][0]["max_model_len"], 4096);
    assert_eq!(
        get(&app, &format!("/v1/models/{MODEL_NAME}")).await.json()["id"],
        MODEL_NAME
    );
    get(&app, "/v1/models/gpt-4")
        .await
        .expect_error(404, "model_not_found", Some("model"));
    get(&app, "/v1/nothing")
        .await
        .expect_error(404, "not_found", None);
}

#[tokio::test]
async fn tokenize_matches_the_goldens_for_chat_and_the_tokenizer_for_text() {
    let app = open_app().await;
    for case_id in ["chat_en_tea", "chat_ar_tea"] {
        let case = golden_case(case_id);
        let body = serde_json::json!({"model": MODEL_NAME, "messages": case["messages"]});
        let reply = post(&app, "/tokenize", body.to_string()).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let body = reply.json();
        assert_eq!(body["tokens"], case["input_ids"], "{case_id}");
        assert_eq!(body["count"], case["num_prompt_tokens"], "{case_id}");
        assert_eq!(body["max_model_len"], 4096);
    }
    let text = "مرحبا بالعالم، hello 123";
    let expected = tokenizer().encode(text, true).expect("encodes");
    let reply = post(
        &app,
        "/tokenize",
        serde_json::json!({"prompt": text}).to_string(),
    )
    .await;
    assert_eq!(reply.json()["tokens"], serde_json::json!(expected));
    post(&app, "/tokenize", "{}")
        .await
        .expect_error(400, "invalid_parameter", Some("prompt"));
    post(&app, "/tokenize", r#"{"prompt": "x", "model": "other"}"#)
        .await
        .expect_error(404, "model_not_found", Some("model"));
}

#[tokio::test]
async fn invalid_parameters_are_400_naming_the_parameter_streamed_or_not() {
    let app = open_app().await;
    let user = r#""messages": [{"role": "user", "content": "كيف أجهز كوب شاهي؟"}]"#;
    for stream in [false, true] {
        let cases = [
            (
                CHAT,
                format!(r#"{{{user}, "stream": {stream}, "temperature": -1}}"#),
                "temperature",
            ),
            (
                CHAT,
                format!(r#"{{{user}, "stream": {stream}, "top_p": 1.5}}"#),
                "top_p",
            ),
            (
                CHAT,
                format!(r#"{{{user}, "stream": {stream}, "n": 0}}"#),
                "n",
            ),
            (
                COMPLETIONS,
                format!(r#"{{"prompt": "x", "stream": {stream}, "max_tokens": -1}}"#),
                "max_tokens",
            ),
            (
                CHAT,
                format!(r#"{{"messages": [], "stream": {stream}}}"#),
                "messages",
            ),
        ];
        for (uri, body, param) in cases {
            let reply = post(&app, uri, body.clone()).await;
            assert!(
                reply.content_type.starts_with("application/json"),
                "{body}: {}",
                reply.content_type
            );
            let message = reply.expect_error(400, "validation", Some(param));
            assert!(message.starts_with('`'), "{message}");
        }
    }
}

#[tokio::test]
async fn malformed_json_and_wrong_types_are_400_not_422() {
    let app = open_app().await;
    let message =
        post(&app, CHAT, r#"{"messages": [ "#)
            .await
            .expect_error(400, "invalid_json", None);
    assert!(message.contains("malformed"), "{message}");
    post(&app, CHAT, "")
        .await
        .expect_error(400, "invalid_json", None);
    let message = post(
        &app,
        CHAT,
        r#"{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}"#,
    )
    .await
    .expect_error(400, "invalid_json", Some("temperature"));
    assert!(message.contains("temperature"), "{message}");
    post(&app, COMPLETIONS, r#"{"prompt": "x", "max_tokens": 1.5}"#)
        .await
        .expect_error(400, "invalid_json", Some("max_tokens"));
    post(&app, CHAT, r#"{"messages": [{"role": 1, "content": "x"}]}"#)
        .await
        .expect_error(400, "invalid_json", Some("messages[0].role"));
    post(
        &app,
        "/score",
        r#"{"input_data": {"input_string": "x", "parameters": {"max_new_tokens": "200"}}}"#,
    )
    .await
    .expect_error(
        400,
        "invalid_json",
        Some("input_data.parameters.max_new_tokens"),
    );
}

#[tokio::test]
async fn unknown_model_is_404_model_not_found() {
    let app = open_app().await;
    for stream in [false, true] {
        let body = format!(
            r#"{{"model": "gpt-4o", "stream": {stream}, "messages": [{{"role": "user", "content": "x"}}]}}"#
        );
        let message =
            post(&app, CHAT, body)
                .await
                .expect_error(404, "model_not_found", Some("model"));
        assert!(message.contains("gpt-4o"), "{message}");
    }
    post(&app, COMPLETIONS, r#"{"model": "davinci", "prompt": "x"}"#)
        .await
        .expect_error(404, "model_not_found", Some("model"));
}

#[tokio::test]
async fn valid_request_without_workers_is_503() {
    let app = open_app().await;
    // `curl -d` sends no JSON content type: the body is still read as JSON.
    let untyped = axum::http::Request::post(CHAT)
        .body(axum::body::Body::from(
            r#"{"messages": [{"role": "user", "content": "hi"}]}"#,
        ))
        .expect("request");
    support::send(&app, untyped)
        .await
        .expect_error(503, "no_workers", None);
    let body = format!(
        r#"{{"model": "{MODEL_NAME}", "messages": [{{"role": "user", "content": "hi"}}]}}"#
    );
    post(&app, CHAT, body)
        .await
        .expect_error(503, "no_workers", None);
    let score = r#"{"input_data": {"input_string": [{"role": "user", "content": "hi"}], "parameters": {"do_sample": false}}}"#;
    post(&app, "/score", score)
        .await
        .expect_error(503, "no_workers", None);
    let bad_score = r#"{"input_data": {"input_string": [{"role": "user", "content": "hi"}], "parameters": {"top_p": 0}}}"#;
    post(&app, "/score", bad_score).await.expect_error(
        400,
        "validation",
        Some("input_data.parameters.top_p"),
    );
}

#[tokio::test]
async fn api_keys_guard_the_api_but_not_the_probes() {
    let app = app_without_workers(HttpConfig::default(), &["sk-right"]).await;
    let body = r#"{"messages": [{"role": "user", "content": "hi"}]}"#;
    post(&app, CHAT, body)
        .await
        .expect_error(401, "unauthenticated", None);
    post_with(&app, CHAT, body, &[("authorization", "Bearer sk-wrong")])
        .await
        .expect_error(401, "unauthenticated", None);
    post_with(&app, "/score", "{}", &[("authorization", "Basic sk-right")])
        .await
        .expect_error(401, "unauthenticated", None);
    get(&app, "/v1/models")
        .await
        .expect_error(401, "unauthenticated", None);
    post(&app, "/tokenize", r#"{"prompt": "x"}"#)
        .await
        .expect_error(401, "unauthenticated", None);
    // The right key gets past authentication (and then finds no worker).
    post_with(&app, CHAT, body, &[("authorization", "Bearer sk-right")])
        .await
        .expect_error(503, "no_workers", None);
    assert_eq!(get(&app, "/health").await.status, 200);
    assert_eq!(get(&app, "/metrics").await.status, 200);

    let config = HttpConfig {
        metrics_require_auth: true,
        ..HttpConfig::default()
    };
    let app = app_without_workers(config, &["sk-right"]).await;
    get(&app, "/metrics")
        .await
        .expect_error(401, "unauthenticated", None);
    assert_eq!(get(&app, "/health").await.status, 200);
}

#[tokio::test]
async fn oversized_body_is_413() {
    let config = HttpConfig {
        max_body_bytes: 1024,
        ..HttpConfig::default()
    };
    let app = app_without_workers(config, &[]).await;
    let big = format!(
        r#"{{"messages": [{{"role": "user", "content": "{}"}}]}}"#,
        "ك".repeat(1024)
    );
    let message = post(&app, CHAT, big)
        .await
        .expect_error(413, "payload_too_large", None);
    assert!(message.contains("1024"), "{message}");
}

#[tokio::test]
async fn unsupported_openai_features_are_refused_not_ignored() {
    let app = open_app().await;
    let user = r#""messages": [{"role": "user", "content": "x"}]"#;
    for (body, param) in [
        (
            format!(
                r#"{{{user}, "tools": [{{"type": "function", "function": {{"name": "f"}}}}]}}"#
            ),
            "tools",
        ),
        (
            format!(r#"{{{user}, "response_format": {{"type": "json_object"}}}}"#),
            "response_format",
        ),
        (format!(r#"{{{user}, "top_logprobs": 3}}"#), "top_logprobs"),
        (
            format!(r#"{{{user}, "stream_options": {{"include_usage": true}}}}"#),
            "stream_options",
        ),
    ] {
        post(&app, CHAT, body)
            .await
            .expect_error(400, "invalid_parameter", Some(param));
    }
    post(&app, COMPLETIONS, r#"{"prompt": ["a", "b"]}"#)
        .await
        .expect_error(400, "invalid_parameter", Some("prompt"));
    post(&app, COMPLETIONS, r#"{"prompt": "x", "echo": true}"#)
        .await
        .expect_error(400, "invalid_parameter", Some("echo"));
}
