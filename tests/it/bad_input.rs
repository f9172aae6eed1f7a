//! The bad-input catalogue: hostile or mistaken requests over HTTP and gRPC against one real
//! `allam serve`, each answered with its exact status and a message naming the problem.
//!
//! Invariants checked beyond the table: every HTTP error body has OpenAI's shape with `param`
//! set for parameter errors; a streaming request with a bad parameter is refused before any
//! stream starts; a long streaming request running through the whole catalogue completes
//! intact; afterwards a greedy request still reproduces the transformers golden.

use std::time::Duration;

use allam_proto::v1::generation_client::GenerationClient;
use allam_proto::v1::{ChatRequest, GenerateRequest, Message, SamplingParams, TokenizeRequest};
use futures::StreamExt;
use serde_json::{json, Value};
use tonic::transport::Channel;
use tonic::Code;

use crate::support::{fixtures_dir, goldens, Serve};

/// What an HTTP case sends.
enum Body {
    Json(Value),
    Raw(Vec<u8>),
}

struct HttpCase {
    name: &'static str,
    path: &'static str,
    body: Body,
    status: u16,
    /// The exact `param` of the error object (`None`: JSON `null`).
    param: Option<&'static str>,
    /// A substring of the message that names the problem.
    needle: &'static str,
}

fn chat(extra: Value) -> Value {
    let mut body = json!({
        "model": "tiny-allam",
        "messages": [{"role": "user", "content": "How do I prepare a cup of tea?"}],
        "max_tokens": 4,
    });
    merge(&mut body, extra);
    body
}

fn completion(extra: Value) -> Value {
    let mut body = json!({"prompt": "The capital of Saudi Arabia is", "max_tokens": 4});
    merge(&mut body, extra);
    body
}

fn score(parameters: Value) -> Value {
    json!({"input_data": {
        "input_string": [{"role": "user", "content": "How do I prepare a cup of tea?"}],
        "parameters": parameters,
    }})
}

fn merge(body: &mut Value, extra: Value) {
    if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
}

/// A prompt far past the 4096-token context but under every character/byte limit.
fn long_text() -> String {
    "tea ".repeat(5000)
}

#[rustfmt::skip]
fn http_cases() -> Vec<HttpCase> {
    const CHAT: &str = "/v1/chat/completions";
    const COMP: &str = "/v1/completions";
    let stops: Vec<String> = (0..17).map(|i| format!("stop{i}")).collect();
    let user = |content: &str| json!([{"role": "user", "content": content}]);
    let case = |name, path, body: Value, status, param, needle| HttpCase {
        name,
        path,
        body: Body::Json(body),
        status,
        param,
        needle,
    };
    let raw = |name, path, body: Vec<u8>, status, needle| HttpCase {
        name,
        path,
        body: Body::Raw(body),
        status,
        param: None,
        needle,
    };
    let mut huge = br#"{"messages":[{"role":"user","content":""#.to_vec();
    huge.extend(std::iter::repeat_n(b'a', 5 << 20));
    huge.extend(br#""}]}"#);
    vec![
        case("chat: empty messages", CHAT, chat(json!({"messages": []})), 400, Some("messages"), "`messages` must not be empty"),
        case("chat: unknown role", CHAT, chat(json!({"messages": [{"role": "robot", "content": "x"}]})), 400, Some("messages"), "robot"),
        case("chat: two user turns in a row", CHAT, chat(json!({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})), 400, Some("messages"), "alternate"),
        case("chat: assistant first", CHAT, chat(json!({"messages": [{"role": "assistant", "content": "a"}]})), 400, Some("messages"), "alternate"),
        case("chat: missing role", CHAT, chat(json!({"messages": [{"content": "x"}]})), 400, Some("messages[0].role"), "`role`"),
        case("chat: prompt over the context", CHAT, chat(json!({"messages": user(&long_text())})), 400, Some("messages"), "4096"),
        case("chat: 1 MB single message", CHAT, chat(json!({"messages": user(&"x".repeat(1 << 20))})), 400, Some("messages"), "at most 262144 characters"),
        case("chat: NUL in content", CHAT, chat(json!({"messages": user("a\u{0}b")})), 400, Some("messages"), "NUL"),
        case("chat: max_tokens 0", CHAT, chat(json!({"max_tokens": 0})), 400, Some("max_tokens"), "max_new_tokens"),
        case("chat: max_tokens negative", CHAT, chat(json!({"max_tokens": -1})), 400, Some("max_tokens"), "got -1"),
        case("chat: max_tokens over the limit", CHAT, chat(json!({"max_tokens": 100_000})), 400, Some("max_tokens"), "got 100000"),
        case("chat: max_completion_tokens 0", CHAT, chat(json!({"max_completion_tokens": 0})), 400, Some("max_completion_tokens"), "max_new_tokens"),
        case("chat: temperature < 0", CHAT, chat(json!({"temperature": -0.5})), 400, Some("temperature"), "`temperature`"),
        case("chat: temperature absurd", CHAT, chat(json!({"temperature": 1000})), 400, Some("temperature"), "`temperature`"),
        case("chat: top_p 0", CHAT, chat(json!({"top_p": 0})), 400, Some("top_p"), "`top_p`"),
        case("chat: top_p > 1", CHAT, chat(json!({"top_p": 1.5})), 400, Some("top_p"), "`top_p`"),
        case("chat: top_k < -1", CHAT, chat(json!({"top_k": -2})), 400, Some("top_k"), "`top_k`"),
        case("chat: 17 stop strings", CHAT, chat(json!({"stop": stops})), 400, Some("stop"), "at most 16"),
        case("chat: stop string too long", CHAT, chat(json!({"stop": "x".repeat(300)})), 400, Some("stop"), "`stop[0]`"),
        case("chat: n too large", CHAT, chat(json!({"n": 100})), 400, Some("n"), "`n`"),
        case("chat: n 0", CHAT, chat(json!({"n": 0})), 400, Some("n"), "`n`"),
        case("chat: unknown model", CHAT, chat(json!({"model": "gpt-4"})), 404, Some("model"), "gpt-4"),
        case("chat: top_logprobs over the limit", CHAT, chat(json!({"logprobs": true, "top_logprobs": 50})), 400, Some("top_logprobs"), "logprobs"),
        case("chat: presence_penalty out of range", CHAT, chat(json!({"presence_penalty": 3})), 400, Some("presence_penalty"), "`presence_penalty`"),
        case("chat: frequency_penalty out of range", CHAT, chat(json!({"frequency_penalty": -3})), 400, Some("frequency_penalty"), "`frequency_penalty`"),
        case("chat: min_p > 1", CHAT, chat(json!({"min_p": 2})), 400, Some("min_p"), "`min_p`"),
        case("chat: repetition_penalty 0", CHAT, chat(json!({"repetition_penalty": 0})), 400, Some("repetition_penalty"), "`repetition_penalty`"),
        case("chat: string temperature", CHAT, chat(json!({"temperature": "hot"})), 400, Some("temperature"), "`temperature`"),
        case("chat: number for messages", CHAT, chat(json!({"messages": 5})), 400, Some("messages"), "`messages`"),
        case("chat: negative seed", CHAT, chat(json!({"seed": -1})), 400, Some("seed"), "`seed`"),
        case("chat: stream with a bad parameter", CHAT, chat(json!({"stream": true, "temperature": -1})), 400, Some("temperature"), "`temperature`"),
        case("chat: stream_options without stream", CHAT, chat(json!({"stream_options": {"include_usage": true}})), 400, Some("stream_options"), "`stream: true`"),
        raw("chat: malformed JSON", CHAT, br#"{"messages": ["#.to_vec(), 400, "malformed JSON"),
        raw("chat: trailing garbage", CHAT, b"{} {}".to_vec(), 400, "trailing characters"),
        raw("chat: empty body", CHAT, Vec::new(), 400, "malformed JSON"),
        raw("chat: invalid UTF-8 bytes", CHAT, b"{\"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\"}]}".to_vec(), 400, "malformed JSON"),
        raw("chat: body over 4 MiB", CHAT, huge, 413, "4194304"),
        case("completions: max_tokens 0", COMP, completion(json!({"max_tokens": 0})), 400, Some("max_tokens"), "max_new_tokens"),
        case("completions: logprobs over the limit", COMP, completion(json!({"logprobs": 50})), 400, Some("logprobs"), "logprobs"),
        case("completions: prompt over the context", COMP, completion(json!({"prompt": long_text()})), 400, Some("prompt"), "4096"),
        case("completions: unknown model", COMP, completion(json!({"model": "nope"})), 404, Some("model"), "nope"),
        case("completions: missing prompt", COMP, json!({"max_tokens": 4}), 400, Some("prompt"), "`prompt` is required"),
        case("completions: number prompt", COMP, completion(json!({"prompt": 5})), 400, Some("prompt"), "`prompt`"),
        case("completions: empty prompt", COMP, completion(json!({"prompt": ""})), 400, Some("prompt"), "must not be empty"),
        case("completions: echo unsupported", COMP, completion(json!({"echo": true})), 400, Some("echo"), "`echo`"),
        case("completions: best_of", COMP, completion(json!({"best_of": 3})), 400, Some("best_of"), "`best_of`"),
        case("completions: stream with top_p > 1", COMP, completion(json!({"stream": true, "top_p": 2})), 400, Some("top_p"), "`top_p`"),
        case("score: empty input_string", "/score", json!({"input_data": {"input_string": [], "parameters": {}}}), 400, Some("input_data.input_string"), "must not be empty"),
        case("score: max_new_tokens 0", "/score", score(json!({"max_new_tokens": 0})), 400, Some("input_data.parameters.max_new_tokens"), "max_new_tokens"),
        case("score: temperature < 0", "/score", score(json!({"temperature": -1})), 400, Some("input_data.parameters.temperature"), "`temperature`"),
        case("score: top_p 0", "/score", score(json!({"top_p": 0})), 400, Some("input_data.parameters.top_p"), "`top_p`"),
        case("score: string max_new_tokens", "/score", score(json!({"max_new_tokens": "many"})), 400, Some("input_data.parameters.max_new_tokens"), "max_new_tokens"),
        case("score: missing input_data", "/score", json!({"input_string": []}), 400, Some("input_data"), "`input_data` is required"),
        raw("score: not JSON", "/score", b"nope".to_vec(), 400, "malformed JSON"),
        case("tokenize: prompt over the context", "/tokenize", json!({"prompt": long_text()}), 400, Some("prompt"), "4096"),
        case("tokenize: nothing to tokenize", "/tokenize", json!({}), 400, Some("prompt"), "`prompt` or `messages`"),
        case("tokenize: unknown role", "/tokenize", json!({"messages": [{"role": "robot", "content": "x"}]}), 400, Some("messages"), "robot"),
        case("tokenize: number prompt", "/tokenize", json!({"prompt": 5}), 400, Some("prompt"), "`prompt`"),
        raw("tokenize: invalid UTF-8", "/tokenize", vec![0xff], 400, "malformed JSON"),
        case("unknown route", "/v1/nothing", json!({}), 404, None, "/v1/nothing"),
    ]
}

/// Checks one HTTP case; returns a description of every mismatch.
async fn check_http(client: &reqwest::Client, base: &str, case: &HttpCase) -> Option<String> {
    let request = client.post(format!("{base}{}", case.path));
    let request = match &case.body {
        Body::Json(value) => request.json(value),
        Body::Raw(bytes) => request
            .header("content-type", "application/json")
            .body(bytes.clone()),
    };
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => return Some(format!("{}: request failed: {e}", case.name)),
    };
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let text = response.text().await.unwrap_or_default();
    let mut problems = Vec::new();
    if status != case.status {
        problems.push(format!("status {status}, expected {}", case.status));
    }
    // A refused stream is a JSON error, never an event stream that errors later.
    if !content_type.starts_with("application/json") {
        problems.push(format!("content-type {content_type:?}"));
    }
    match serde_json::from_str::<Value>(&text) {
        Err(e) => problems.push(format!("body is not JSON ({e})")),
        Ok(body) => problems.extend(openai_error_problems(&body, case)),
    }
    (!problems.is_empty()).then(|| format!("{}: {} — body {text}", case.name, problems.join("; ")))
}

fn openai_error_problems(body: &Value, case: &HttpCase) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(error) = body.get("error").and_then(Value::as_object) else {
        return vec!["no `error` object".to_owned()];
    };
    if body.as_object().map(|o| o.len()) != Some(1) {
        problems.push("keys other than `error`".to_owned());
    }
    let mut keys: Vec<&str> = error.keys().map(String::as_str).collect();
    keys.sort_unstable();
    if keys != ["code", "message", "param", "type"] {
        problems.push(format!("error keys {keys:?}"));
    }
    let message = error.get("message").and_then(Value::as_str).unwrap_or("");
    if !message.contains(case.needle) {
        problems.push(format!("message lacks {:?}", case.needle));
    }
    if !error.get("type").is_some_and(Value::is_string) {
        problems.push("`type` is not a string".to_owned());
    }
    if !error.get("code").is_some_and(Value::is_string) {
        problems.push("`code` is not a string".to_owned());
    }
    let param = error.get("param").cloned().unwrap_or(Value::Bool(false));
    let expected = case
        .param
        .map_or(Value::Null, |p| Value::String(p.to_owned()));
    if param != expected {
        problems.push(format!("param {param}, expected {expected}"));
    }
    problems
}

/// Which RPC a gRPC case calls.
enum Rpc {
    Chat(ChatRequest),
    ChatStream(ChatRequest),
    Generate(GenerateRequest),
    GenerateStream(GenerateRequest),
    Tokenize(TokenizeRequest),
}

struct GrpcCase {
    name: &'static str,
    rpc: Rpc,
    code: Code,
    needle: &'static str,
}

fn message(role: &str, content: &str) -> Message {
    Message {
        role: role.to_owned(),
        content: content.to_owned(),
    }
}

fn params() -> SamplingParams {
    SamplingParams {
        max_new_tokens: Some(4),
        ..Default::default()
    }
}

fn chat_request(messages: Vec<Message>, params: SamplingParams) -> ChatRequest {
    ChatRequest {
        messages,
        params: Some(params),
        model: None,
    }
}

fn tea() -> Vec<Message> {
    vec![message("user", "How do I prepare a cup of tea?")]
}

fn generate_request(prompt: &str, params: SamplingParams) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.to_owned(),
        params: Some(params),
        model: None,
    }
}

#[rustfmt::skip]
fn grpc_cases() -> Vec<GrpcCase> {
    let with = |f: fn(&mut SamplingParams)| {
        let mut p = params();
        f(&mut p);
        p
    };
    let case = |name, rpc, code, needle| GrpcCase {
        name,
        rpc,
        code,
        needle,
    };
    let bad = Code::InvalidArgument;
    vec![
        case("Chat: empty messages", Rpc::Chat(chat_request(vec![], params())), bad, "`messages`"),
        case("Chat: unknown role", Rpc::Chat(chat_request(vec![message("robot", "x")], params())), bad, "robot"),
        case("Chat: two user turns", Rpc::Chat(chat_request(vec![message("user", "a"), message("user", "b")], params())), bad, "alternate"),
        case("Chat: prompt over the context", Rpc::Chat(chat_request(vec![message("user", &long_text())], params())), bad, "4096"),
        case("Chat: 1 MB message", Rpc::Chat(chat_request(vec![message("user", &"x".repeat(1 << 20))], params())), bad, "262144"),
        case("Chat: NUL in content", Rpc::Chat(chat_request(vec![message("user", "a\0b")], params())), bad, "NUL"),
        case("Chat: max_new_tokens 0", Rpc::Chat(chat_request(tea(), with(|p| p.max_new_tokens = Some(0)))), bad, "`max_new_tokens`"),
        case("Chat: max_new_tokens negative", Rpc::Chat(chat_request(tea(), with(|p| p.max_new_tokens = Some(-5)))), bad, "`max_new_tokens`"),
        case("Chat: max_new_tokens over the limit", Rpc::Chat(chat_request(tea(), with(|p| p.max_new_tokens = Some(100_000)))), bad, "`max_new_tokens`"),
        case("Chat: temperature < 0", Rpc::Chat(chat_request(tea(), with(|p| p.temperature = Some(-1.0)))), bad, "`temperature`"),
        case("Chat: temperature NaN", Rpc::Chat(chat_request(tea(), with(|p| p.temperature = Some(f64::NAN)))), bad, "`temperature`"),
        case("Chat: top_p 0", Rpc::Chat(chat_request(tea(), with(|p| p.top_p = Some(0.0)))), bad, "`top_p`"),
        case("Chat: top_p > 1", Rpc::Chat(chat_request(tea(), with(|p| p.top_p = Some(1.5)))), bad, "`top_p`"),
        case("Chat: top_k < -1", Rpc::Chat(chat_request(tea(), with(|p| p.top_k = Some(-2)))), bad, "`top_k`"),
        case("Chat: 17 stop strings", Rpc::Chat(chat_request(tea(), with(|p| p.stop = (0..17).map(|i| format!("s{i}")).collect()))), bad, "`stop`"),
        case("Chat: n too large", Rpc::Chat(chat_request(tea(), with(|p| p.n = Some(100)))), bad, "`n`"),
        case("Chat: logprobs over the limit", Rpc::Chat(chat_request(tea(), with(|p| p.logprobs = Some(50)))), bad, "`logprobs`"),
        case("Chat: prompt_logprobs over the limit", Rpc::Chat(chat_request(tea(), with(|p| p.prompt_logprobs = Some(50)))), bad, "prompt_logprobs"),
        case("Chat: presence_penalty out of range", Rpc::Chat(chat_request(tea(), with(|p| p.presence_penalty = Some(3.0)))), bad, "`presence_penalty`"),
        case("Chat: unknown model", Rpc::Chat(ChatRequest {model: Some("gpt-4".to_owned()), ..chat_request(tea(), params()) }), bad, "`model` must be `tiny-allam`"),
        case("ChatStream: temperature < 0", Rpc::ChatStream(chat_request(tea(), with(|p| p.temperature = Some(-1.0)))), bad, "`temperature`"),
        case("ChatStream: empty messages", Rpc::ChatStream(chat_request(vec![], params())), bad, "`messages`"),
        case("ChatStream: top_k < -1", Rpc::ChatStream(chat_request(tea(), with(|p| p.top_k = Some(-7)))), bad, "`top_k`"),
        case("Generate: empty prompt", Rpc::Generate(generate_request("", params())), bad, "`prompt`"),
        case("Generate: prompt over the context", Rpc::Generate(generate_request(&long_text(), params())), bad, "4096"),
        case("Generate: top_p > 1", Rpc::Generate(generate_request("hello", with(|p| p.top_p = Some(2.0)))), bad, "`top_p`"),
        case("Generate: n 0", Rpc::Generate(generate_request("hello", with(|p| p.n = Some(0)))), bad, "`n`"),
        case("GenerateStream: max_new_tokens negative", Rpc::GenerateStream(generate_request("hello", with(|p| p.max_new_tokens = Some(-1)))), bad, "`max_new_tokens`"),
        case("GenerateStream: NUL in prompt", Rpc::GenerateStream(generate_request("a\0b", params())), bad, "NUL"),
        case("GenerateStream: unknown model", Rpc::GenerateStream(GenerateRequest {model: Some("nope".to_owned()), ..generate_request("hello", params()) }), bad, "got `nope`"),
        case("Tokenize: unknown role", Rpc::Tokenize(TokenizeRequest {text: String::new(), messages: vec![message("robot", "x")]}), bad, "robot"),
    ]
}

/// Runs one gRPC case; a streaming RPC must fail before yielding any chunk.
async fn check_grpc(client: &mut GenerationClient<Channel>, case: GrpcCase) -> Option<String> {
    let result: Result<(), tonic::Status> = match case.rpc {
        Rpc::Chat(r) => client.chat(r).await.map(drop),
        Rpc::Generate(r) => client.generate(r).await.map(drop),
        Rpc::Tokenize(r) => client.tokenize(r).await.map(drop),
        Rpc::ChatStream(r) => match client.chat_stream(r).await {
            Err(status) => Err(status),
            Ok(stream) => first_item(stream.into_inner()).await,
        },
        Rpc::GenerateStream(r) => match client.generate_stream(r).await {
            Err(status) => Err(status),
            Ok(stream) => first_item(stream.into_inner()).await,
        },
    };
    match result {
        Ok(()) => Some(format!("{}: succeeded (or streamed a chunk)", case.name)),
        Err(status) if status.code() != case.code || !status.message().contains(case.needle) => {
            Some(format!(
                "{}: got {:?} {:?}, expected {:?} naming {:?}",
                case.name,
                status.code(),
                status.message(),
                case.code,
                case.needle
            ))
        }
        Err(_) => None,
    }
}

/// `Ok` when the stream yields a chunk (a refused request must not), else its error.
async fn first_item<T>(mut stream: tonic::Streaming<T>) -> Result<(), tonic::Status> {
    match stream.message().await? {
        Some(_) => Ok(()),
        None => Err(tonic::Status::ok(
            "stream ended without a chunk or an error",
        )),
    }
}

/// A long greedy SSE chat; returns the concatenated text and the finish reason.
async fn stream_chat(
    client: &reqwest::Client,
    base: &str,
    body: &Value,
    started: tokio::sync::oneshot::Sender<()>,
) -> (String, String) {
    let mut started = Some(started);
    let response = client
        .post(format!("{base}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .expect("stream request");
    assert_eq!(response.status().as_u16(), 200);
    let mut bytes = response.bytes_stream();
    let mut buffer = String::new();
    let mut text = String::new();
    let mut finish = String::new();
    let mut done = false;
    while let Some(chunk) = bytes.next().await {
        buffer.push_str(std::str::from_utf8(&chunk.expect("stream chunk")).expect("UTF-8 SSE"));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let value: Value = serde_json::from_str(data).expect("JSON chunk");
            let choice = &value["choices"][0];
            if let Some(started) = started.take() {
                let _ = started.send(());
            }
            text.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
            if let Some(reason) = choice["finish_reason"].as_str() {
                finish = reason.to_owned();
            }
        }
    }
    assert!(done, "stream ended without [DONE]");
    (text, finish)
}

#[test]
fn bad_inputs_get_exact_errors_and_harm_nothing_in_flight() {
    let model = fixtures_dir().join("tiny-allam");
    let serve = Serve::start(&["--model", model.to_str().expect("utf-8 path")], &[]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        // No connection reuse: after answering 413 the server closes the connection without
        // reading the rest of the body (as it should), and a pooled client would then send
        // the next case on that closed connection.
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .pool_max_idle_per_host(0)
            .build()
            .expect("client");
        // A long request in flight for the whole catalogue.
        let long = json!({
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 400, "ignore_eos": true, "temperature": 0, "stream": true,
        });
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let in_flight = tokio::spawn({
            let (http, base, long) = (http.clone(), serve.http.clone(), long.clone());
            async move { stream_chat(&http, &base, &long, started_tx).await }
        });
        // The catalogue starts only once the long stream is producing tokens.
        tokio::time::timeout(Duration::from_secs(60), started)
            .await
            .expect("the long stream starts")
            .expect("first chunk signal");

        let cases = http_cases();
        let grpc = grpc_cases();
        let count = cases.len() + grpc.len();
        let mut failures = Vec::new();
        for case in &cases {
            failures.extend(check_http(&http, &serve.http, case).await);
        }
        let mut client = GenerationClient::connect(serve.grpc.clone())
            .await
            .expect("gRPC connect")
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(16 << 20);
        for case in grpc {
            failures.extend(check_grpc(&mut client, case).await);
        }
        assert!(
            failures.is_empty(),
            "{} of {count} cases failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
        assert!(count >= 40, "only {count} cases");

        let (text, finish) = tokio::time::timeout(Duration::from_secs(120), in_flight)
            .await
            .expect("the long stream finishes")
            .expect("stream task");
        assert_eq!(finish, "length");
        // Nothing was lost or altered: the same request unstreamed gives the same text.
        let mut unary = long;
        unary["stream"] = json!(false);
        let unary: Value = http
            .post(format!("{}/v1/chat/completions", serve.http))
            .json(&unary)
            .send()
            .await
            .expect("unary")
            .json()
            .await
            .expect("unary JSON");
        assert_eq!(
            unary["choices"][0]["message"]["content"].as_str(),
            Some(text.as_str())
        );

        // The server still answers correctly: the transformers greedy golden.
        let golden = goldens("tiny-allam");
        let tea = &golden["cases"][0];
        assert_eq!(tea["id"], "chat_en_tea");
        let answer: Value = http
            .post(format!("{}/v1/chat/completions", serve.http))
            .json(&json!({"messages": tea["messages"], "temperature": 0,
                "max_tokens": tea["greedy"]["max_new_tokens"]}))
            .send()
            .await
            .expect("golden request")
            .json()
            .await
            .expect("golden JSON");
        assert_eq!(
            answer["choices"][0]["message"]["content"],
            tea["greedy"]["text"]
        );
    });
}
