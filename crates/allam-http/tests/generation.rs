//! Generation end to end: HTTP → real router → real in-process worker → engine running the
//! tiny fixture model on the CPU backend. Expected texts and token counts come from the
//! fixtures' transformers goldens (`tiny-allam/goldens.json`); everything else is checked
//! against another route of this same server (streamed vs not, `/score` vs chat).

mod support;

use allam_http::HttpConfig;
use serde_json::{json, Value};
use support::{app_with_worker, golden_case, post, WorkerApp, MODEL_NAME};

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";
/// The goldens' greedy length.
const GOLDEN_TOKENS: u64 = 24;

async fn worker_app() -> WorkerApp {
    app_with_worker(HttpConfig::default()).await
}

fn greedy_chat_body(messages: &Value, stream: bool) -> String {
    let mut body = json!({
        "model": MODEL_NAME,
        "messages": messages,
        "temperature": 0,
        "max_tokens": GOLDEN_TOKENS,
        "stream": stream,
    });
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    body.to_string()
}

fn assert_usage(usage: &Value, prompt_tokens: &Value, completion_tokens: u64) {
    assert_eq!(&usage["prompt_tokens"], prompt_tokens, "{usage}");
    assert_eq!(usage["completion_tokens"], completion_tokens, "{usage}");
    let total = prompt_tokens.as_u64().expect("count") + completion_tokens;
    assert_eq!(usage["total_tokens"], total, "{usage}");
}

/// Concatenated streamed text of choice `index` (`delta.content` for chat, `text` else).
fn streamed_text(chunks: &[Value], index: u64) -> String {
    chunks
        .iter()
        .flat_map(|chunk| chunk["choices"].as_array().cloned().unwrap_or_default())
        .filter(|choice| choice["index"] == index)
        .filter_map(|choice| {
            choice["delta"]["content"]
                .as_str()
                .or_else(|| choice["text"].as_str())
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_chat_matches_the_goldens_english_and_arabic_streamed_or_not() {
    let server = worker_app().await;
    for case_id in ["chat_en_tea", "chat_ar_tea"] {
        let case = golden_case(case_id);
        let golden_text = case["greedy"]["text"].as_str().expect("golden text");

        let reply = post(
            &server.app,
            CHAT,
            greedy_chat_body(&case["messages"], false),
        )
        .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let body = reply.json();
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["model"], MODEL_NAME);
        assert_eq!(body["choices"][0]["message"]["role"], "assistant");
        assert_eq!(
            body["choices"][0]["message"]["content"], golden_text,
            "{case_id}"
        );
        assert_eq!(body["choices"][0]["finish_reason"], "length");
        assert_usage(&body["usage"], &case["num_prompt_tokens"], GOLDEN_TOKENS);

        let reply = post(&server.app, CHAT, greedy_chat_body(&case["messages"], true)).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let chunks = reply.sse_chunks();
        assert!(chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk"));
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(streamed_text(&chunks, 0), golden_text, "{case_id} streamed");
        let finish: Vec<&str> = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
            .collect();
        assert_eq!(finish, vec!["length"]);
        let last = chunks.last().expect("usage chunk");
        assert_eq!(last["choices"], json!([]));
        assert_usage(&last["usage"], &case["num_prompt_tokens"], GOLDEN_TOKENS);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_completion_of_a_raw_prompt_matches_the_goldens_streamed_or_not() {
    let server = worker_app().await;
    let case = golden_case("raw_mixed");
    let golden_text = case["greedy"]["text"].as_str().expect("golden text");
    let body = |stream: bool| {
        json!({"prompt": case["prompt"], "max_tokens": GOLDEN_TOKENS, "temperature": 0, "stream": stream})
            .to_string()
    };
    let reply = post(&server.app, COMPLETIONS, body(false)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let json = reply.json();
    assert_eq!(json["object"], "text_completion");
    assert_eq!(json["choices"][0]["text"], golden_text);
    assert_eq!(json["choices"][0]["finish_reason"], "length");
    assert_usage(&json["usage"], &case["num_prompt_tokens"], GOLDEN_TOKENS);

    let reply = post(&server.app, COMPLETIONS, body(true)).await;
    let chunks = reply.sse_chunks();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "text_completion" && c.get("usage").is_none()));
    assert_eq!(streamed_text(&chunks, 0), golden_text);
}

/// The bytes a vocabulary piece stands for: `<0xNN>` is one raw byte, `▁` is a space.
fn piece_bytes(piece: &str) -> Vec<u8> {
    let hex = piece
        .strip_prefix("<0x")
        .and_then(|rest| rest.strip_suffix('>'));
    match hex.and_then(|hex| u8::from_str_radix(hex, 16).ok()) {
        Some(byte) => vec![byte],
        None => piece.replace('\u{2581}', " ").into_bytes(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_follow_the_golden_tokens() {
    let server = worker_app().await;
    let case = golden_case("chat_en_tea");
    let body = json!({
        "messages": case["messages"], "temperature": 0, "max_tokens": 4,
        "logprobs": true, "top_logprobs": 3,
    });
    let reply = post(&server.app, CHAT, body.to_string()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let content = reply.json()["choices"][0]["logprobs"]["content"].clone();
    let content = content.as_array().expect("logprobs.content");
    assert_eq!(content.len(), 4);
    for (step, entry) in content.iter().enumerate() {
        let golden_top = &case["greedy"]["top5"][step];
        let piece = golden_top[0]["token"].as_str().expect("golden piece");
        assert_eq!(
            entry["bytes"],
            json!(piece_bytes(piece)),
            "step {step}: {piece}"
        );
        let logprob = entry["logprob"].as_f64().expect("logprob");
        let golden = case["greedy"]["logprobs"][step]
            .as_f64()
            .expect("golden logprob");
        assert!(
            (logprob - golden).abs() < 1e-2,
            "step {step}: {logprob} vs {golden}"
        );
        assert_eq!(entry["top_logprobs"].as_array().map(Vec::len), Some(3));
        assert_eq!(entry["top_logprobs"][0]["token"], entry["token"]);
    }

    let body = json!({"prompt": "hello", "max_tokens": 3, "temperature": 0, "logprobs": 2});
    let json = post(&server.app, COMPLETIONS, body.to_string())
        .await
        .json();
    let logprobs = &json["choices"][0]["logprobs"];
    assert_eq!(
        logprobs["tokens"].as_array().map(Vec::len),
        Some(3),
        "{json}"
    );
    assert_eq!(logprobs["token_logprobs"].as_array().map(Vec::len), Some(3));
    assert_eq!(logprobs["text_offset"][0], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_cards_score_samples_answer_200_with_output() {
    let server = worker_app().await;
    for content in ["How do I prepare a cup of tea?", "كيف أجهز كوب شاهي؟"] {
        // The card's sample request, field for field.
        let body = json!({
            "input_data": {
                "input_string": [{"role": "user", "content": content}],
                "parameters": {"temperature": 0.6, "top_p": 0.9, "do_sample": true, "max_new_tokens": 200}
            }
        });
        let reply = post(&server.app, "/score", body.to_string()).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let json = reply.json();
        assert!(json["output"].is_string(), "{json}");
        assert_eq!(
            json.as_object().map(|o| o.len()),
            Some(1),
            "only `output`: {json}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_score_equals_greedy_chat_for_the_same_messages() {
    let server = worker_app().await;
    for case_id in ["chat_en_tea", "chat_ar_tea"] {
        let case = golden_case(case_id);
        let score = json!({
            "input_data": {
                "input_string": case["messages"],
                "parameters": {"temperature": 0.6, "top_p": 0.9, "do_sample": false, "max_new_tokens": GOLDEN_TOKENS}
            }
        });
        let score = post(&server.app, "/score", score.to_string()).await;
        assert_eq!(score.status, 200, "{}", score.text());
        let chat = post(
            &server.app,
            CHAT,
            greedy_chat_body(&case["messages"], false),
        )
        .await
        .json();
        assert_eq!(
            score.json()["output"],
            chat["choices"][0]["message"]["content"],
            "{case_id}"
        );
        assert_eq!(score.json()["output"], case["greedy"]["text"], "{case_id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_cut_the_text_and_n_gives_every_choice() {
    let server = worker_app().await;
    let case = golden_case("chat_en_tea");
    let golden_text = case["greedy"]["text"].as_str().expect("golden text");
    // A stop string from the middle of the golden continuation: the answer is what precedes it.
    let stop = "especially";
    let (expected, _) = golden_text
        .split_once(stop)
        .expect("the golden text contains the stop");
    let body = json!({"messages": case["messages"], "temperature": 0, "max_tokens": GOLDEN_TOKENS, "stop": [stop]});
    let json = post(&server.app, CHAT, body.to_string()).await.json();
    assert_eq!(json["choices"][0]["message"]["content"], expected, "{json}");
    assert_eq!(json["choices"][0]["finish_reason"], "stop");

    let body = json!({"prompt": "The", "max_tokens": 5, "n": 3, "seed": 7, "temperature": 1.0, "ignore_eos": true});
    let json = post(&server.app, COMPLETIONS, body.to_string())
        .await
        .json();
    let choices = json["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 3, "{json}");
    for (index, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], index as u64);
        assert_eq!(choice["finish_reason"], "length");
    }
    assert_eq!(json["usage"]["completion_tokens"], 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_cancels_its_request_and_serve_drains_on_shutdown() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let server = worker_app().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let state = support::http_state(server.router.clone(), HttpConfig::default());
    let serving = tokio::spawn(allam_http::serve(state, listener, shutdown.clone()));

    // Long enough that finishing would take thousands of engine steps.
    let max_tokens = 3500;
    let body = json!({"messages": [{"role": "user", "content": "اكتب قصة طويلة"}], "stream": true,
        "max_tokens": max_tokens, "ignore_eos": true, "temperature": 0})
    .to_string();
    let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    client.write_all(request.as_bytes()).await.expect("send");
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    // Read until the first content chunk (after the role chunk) has arrived.
    while String::from_utf8_lossy(&received)
        .matches("data: {")
        .count()
        < 2
    {
        let n = tokio::time::timeout(std::time::Duration::from_secs(30), client.read(&mut buf))
            .await
            .expect("a chunk within 30 s")
            .expect("read");
        assert!(
            n > 0,
            "server closed early: {}",
            String::from_utf8_lossy(&received)
        );
        received.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&received).starts_with("HTTP/1.1 200"));
    drop(client);

    // The engine drops the sequence long before it could have generated `max_tokens`.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut interval = tokio::time::interval(std::time::Duration::from_millis(10));
    let stats = loop {
        interval.tick().await;
        let stats = server.engine_stats();
        if stats.running == 0 && stats.waiting == 0 {
            break stats;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still running: {stats:?}"
        );
    };
    assert!(
        stats.steps < max_tokens / 2,
        "not cancelled early: {stats:?}"
    );

    shutdown.cancel();
    tokio::time::timeout(std::time::Duration::from_secs(10), serving)
        .await
        .expect("serve returns after shutdown")
        .expect("no panic")
        .expect("serve ends cleanly");
}
