//! Router behaviour over real gRPC against scripted fake worker groups (tests/support): load
//! spread, retry before the first token, UNAVAILABLE after it, RESOURCE_EXHAUSTED,
//! cancellation and deadline propagation, metadata forwarding, and the public gRPC front.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use allam_proto::v1 as pb;
use allam_proto::v1::generation_client::GenerationClient;
use allam_request::{ChatMessage, PromptInput, RawRequest, RawSamplingParams};
use allam_router::{Error, Membership, RequestContext, Router, RouterConfig};
use allam_types::EngineEvent;
use futures::StreamExt;
use support::{start_fake, FakeGroup, Script};
use tokio_util::sync::CancellationToken;
use tonic::Code;

const NORMAL: Script = Script::Normal {
    n_tokens: 4,
    token_delay: Duration::from_millis(5),
};

fn limits() -> allam_request::Limits {
    allam_request::Limits::default()
}

async fn router_with(groups: &[&FakeGroup], configure: impl FnOnce(&mut RouterConfig)) -> Router {
    let mut config = RouterConfig::new("tiny-allam", support::tokenizer(), limits());
    config.load_poll_interval = Duration::from_millis(50);
    configure(&mut config);
    let members = groups.iter().map(|g| g.info.clone()).collect();
    let router = Router::new(config, Membership::Static(members))
        .await
        .expect("router");
    let mut ready = router.ready_watch();
    tokio::time::timeout(Duration::from_secs(5), ready.wait_for(|r| *r))
        .await
        .expect("a fake group answers Load within 5 s")
        .expect("router alive");
    router
}

async fn router(groups: &[&FakeGroup]) -> Router {
    router_with(groups, |_| {}).await
}

fn chat(text: &str) -> RawRequest {
    RawRequest {
        input: PromptInput::Chat(vec![ChatMessage {
            role: "user".into(),
            content: text.into(),
        }]),
        params: RawSamplingParams::default(),
        model: None,
    }
}

fn ctx() -> RequestContext {
    RequestContext::new("test")
}

/// Drains a stream: (events, the error that ended it if any).
async fn drain(mut stream: allam_router::GenerationStream) -> (Vec<EngineEvent>, Option<Error>) {
    let mut events = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => events.push(event),
            Err(e) => return (events, Some(e)),
        }
    }
    (events, None)
}

fn finished(events: &[EngineEvent]) -> bool {
    matches!(events.last(), Some(EngineEvent::Finished { .. }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_spread_over_both_groups() {
    let slow = Script::Normal {
        n_tokens: 5,
        token_delay: Duration::from_millis(20),
    };
    let a = start_fake("a", slow).await;
    let b = start_fake("b", slow).await;
    let router = router(&[&a, &b]).await;
    let requests = (0..20).map(|i| {
        let router = router.clone();
        async move {
            let stream = router
                .generate(chat(&format!("request {i}: مرحبا")), ctx())
                .await
                .expect("routed");
            drain(stream).await
        }
    });
    for (events, error) in futures::future::join_all(requests).await {
        assert!(error.is_none() && finished(&events), "{error:?} {events:?}");
    }
    let (n_a, n_b) = (a.observed.calls(), b.observed.calls());
    assert_eq!(n_a + n_b, 20);
    assert!(n_a >= 5 && n_b >= 5, "unbalanced spread: a={n_a} b={n_b}");
    // Every guard was released.
    for group in router.groups() {
        assert_eq!(group.outstanding_requests, 0, "{group:?}");
        assert_eq!(group.outstanding_tokens, 0, "{group:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_before_first_token_is_retried_on_another_group() {
    for failing in [
        Script::RefuseUnavailable,
        Script::FailRetryableBeforeFirstToken,
    ] {
        let a = start_fake("a", failing).await;
        let b = start_fake("b", NORMAL).await;
        let router = router(&[&a, &b]).await;
        for i in 0..4 {
            let stream = router
                .generate(chat(&format!("hello {i}")), ctx())
                .await
                .unwrap_or_else(|e| panic!("{failing:?}: request {i} failed: {e}"));
            assert_eq!(stream.group(), "b");
            let (events, error) = drain(stream).await;
            assert!(
                error.is_none() && finished(&events),
                "{failing:?}: {error:?}"
            );
            // The client saw one Started, not one per try.
            let n_started = events
                .iter()
                .filter(|e| matches!(e, EngineEvent::Started { .. }))
                .count();
            assert_eq!(n_started, 1, "{failing:?}: {events:?}");
        }
        // Ties go to "a" first on a fresh router, so at least the first request failed over.
        assert!(a.observed.calls() >= 1, "{failing:?}: a was never tried");
        assert_eq!(b.observed.calls(), 4, "{failing:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_tried_on_two_groups_at_most() {
    let a = start_fake("a", Script::RefuseUnavailable).await;
    let b = start_fake("b", Script::RefuseUnavailable).await;
    let c = start_fake("c", Script::RefuseUnavailable).await;
    let router = router(&[&a, &b, &c]).await;
    let err = router
        .generate(chat("hi"), ctx())
        .await
        .expect_err("every group refuses");
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    assert_eq!(err.to_status().code(), Code::Unavailable);
    let total = a.observed.calls() + b.observed.calls() + c.observed.calls();
    assert_eq!(total, 2, "one try plus one retry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_after_first_token_is_unavailable_and_not_rerun() {
    let a = start_fake("a", Script::FailAfterFirstToken).await;
    let b = start_fake("b", NORMAL).await;
    let router = router(&[&a, &b]).await;
    let stream = router.generate(chat("hi"), ctx()).await.expect("committed");
    assert_eq!(
        stream.group(),
        "a",
        "ties go to the first group on a fresh router"
    );
    let (events, error) = drain(stream).await;
    assert!(
        events.iter().any(|e| matches!(e, EngineEvent::Delta(_))),
        "{events:?}"
    );
    let error = error.expect("the stream ends with an error");
    assert!(matches!(error, Error::Unavailable(_)), "{error:?}");
    assert!(
        error.to_string().contains("after the first token"),
        "{error}"
    );
    assert_eq!(
        b.observed.calls(),
        0,
        "a started request must not run twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_groups_answer_resource_exhausted_at_once() {
    let a = start_fake("a", Script::HangAfterFirstToken).await;
    let router = router_with(&[&a], |c| c.max_outstanding_per_group = 2).await;
    let first = router.generate(chat("one"), ctx()).await.expect("slot 1");
    let second = router.generate(chat("two"), ctx()).await.expect("slot 2");

    // The public front answers RESOURCE_EXHAUSTED without waiting.
    let (addr, stop) = serve(router.clone()).await;
    let mut client = client(addr).await;
    let asked = Instant::now();
    let status = client
        .chat(chat_request("three"))
        .await
        .expect_err("no slot left");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "queued instead of refusing"
    );
    assert_eq!(
        a.observed.calls(),
        2,
        "the refused request never reached the group"
    );

    // A slot frees when a stream is dropped.
    drop(first);
    let third = router
        .generate(chat("three"), ctx())
        .await
        .expect("slot freed");
    drop((second, third));
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_queue_full_moves_to_another_group_or_is_overloaded() {
    let a = start_fake("a", Script::RefuseQueueFull).await;
    let b = start_fake("b", NORMAL).await;
    let router = router(&[&a, &b]).await;
    let stream = router
        .generate(chat("hi"), ctx())
        .await
        .expect("b serves it");
    assert_eq!(stream.group(), "b");

    let only_full = router_with(&[&a], |_| {}).await;
    let err = only_full
        .generate(chat("hi"), ctx())
        .await
        .expect_err("nobody can take it");
    assert!(matches!(err, Error::Overloaded), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stream_cancels_on_the_worker() {
    let a = start_fake("a", Script::HangAfterFirstToken).await;
    let router = router(&[&a]).await;
    let mut stream = router.generate(chat("hi"), ctx()).await.expect("committed");
    loop {
        match stream.next().await {
            Some(Ok(EngineEvent::Delta(_))) => break,
            Some(Ok(_)) => continue,
            other => panic!("expected a delta, got {other:?}"),
        }
    }
    let cancelled = a.observed.cancelled_notify.notified();
    drop(stream);
    tokio::time::timeout(Duration::from_secs(5), cancelled)
        .await
        .expect("the worker saw its stream dropped");
    assert_eq!(a.observed.cancelled.load(Ordering::SeqCst), 1);
    assert_eq!(router.groups()[0].outstanding_requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_ends_the_stream_and_reaches_the_worker() {
    let a = start_fake("a", Script::HangAfterFirstToken).await;
    let router = router(&[&a]).await;
    let cancelled = a.observed.cancelled_notify.notified();
    let mut context = ctx();
    context.deadline = Some(Instant::now() + Duration::from_millis(400));
    let stream = router
        .generate(chat("hi"), context)
        .await
        .expect("committed");
    let (_, error) = drain(stream).await;
    assert!(matches!(error, Some(Error::DeadlineExceeded)), "{error:?}");
    tokio::time::timeout(Duration::from_secs(5), cancelled)
        .await
        .expect("the worker's stream was cancelled at the deadline");
    let timeouts = a.observed.grpc_timeouts.lock().expect("lock").clone();
    assert_eq!(timeouts.len(), 1, "grpc-timeout forwarded to the worker");

    // Over the public API: grpc-timeout from the client becomes DEADLINE_EXCEEDED.
    let (addr, stop) = serve(router.clone()).await;
    let mut client = client(addr).await;
    let mut request = tonic::Request::new(chat_request("hi"));
    request.set_timeout(Duration::from_millis(400));
    let mut chunks = client
        .chat_stream(request)
        .await
        .expect("stream opens")
        .into_inner();
    let status = loop {
        match chunks.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without the deadline error"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let mut request = tonic::Request::new(chat_request("hi"));
    request.set_timeout(Duration::from_millis(400));
    let status = client
        .chat(request)
        .await
        .expect_err("unary past its deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_front_streams_authenticates_and_forwards_trace_context() {
    let a = start_fake("a", NORMAL).await;
    let router = router_with(&[&a], |c| c.api_keys = vec!["k-123".into()]).await;
    let (addr, stop) = serve(router).await;
    let mut client = client(addr).await;

    let status = client.chat(chat_request("hi")).await.expect_err("no key");
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut wrong = tonic::Request::new(chat_request("hi"));
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer nope".parse().expect("ascii"));
    assert_eq!(
        client.chat(wrong).await.expect_err("wrong key").code(),
        Code::Unauthenticated
    );

    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let mut request = tonic::Request::new(chat_request("مرحبا"));
    request
        .metadata_mut()
        .insert("authorization", "Bearer k-123".parse().expect("ascii"));
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().expect("ascii"));
    let mut chunks = client
        .chat_stream(request)
        .await
        .expect("stream")
        .into_inner();
    let mut text = String::new();
    let mut last = None;
    while let Some(chunk) = chunks.message().await.expect("chunk") {
        text.push_str(&chunk.text);
        last = Some(chunk);
    }
    let last = last.expect("at least one chunk");
    assert_eq!(text, "t0 t1 t2 t3 ");
    // The final chunk carries finish_reason and usage together.
    assert_eq!(last.finish_reason, Some(pb::FinishReason::Length as i32));
    assert_eq!(last.usage.expect("usage").completion_tokens, 4);
    assert_eq!(
        a.observed.traceparents.lock().expect("lock").as_slice(),
        [traceparent]
    );

    let mut unary = tonic::Request::new(chat_request("hello"));
    unary
        .metadata_mut()
        .insert("authorization", "Bearer k-123".parse().expect("ascii"));
    let response = client.chat(unary).await.expect("unary chat").into_inner();
    assert_eq!(response.text, "t0 t1 t2 t3 ");
    assert_eq!(response.token_ids, [100, 101, 102, 103]);
    assert_eq!(response.finish_reason, pb::FinishReason::Length as i32);
    assert_eq!(response.model, "tiny-allam");
    // The prompt the worker got is the chat template's rendering, tokenized by the router.
    let prompt = a
        .observed
        .prompts
        .lock()
        .expect("lock")
        .last()
        .cloned()
        .expect("a prompt");
    assert_eq!(prompt.first(), Some(&1), "starts with bos");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_invalid_argument_naming_the_field() {
    let a = start_fake("a", NORMAL).await;
    let router = router(&[&a]).await;
    let (addr, stop) = serve(router).await;
    let mut client = client(addr).await;

    let mut request = chat_request("hi");
    request.params = Some(pb::SamplingParams {
        top_p: Some(1.5),
        ..Default::default()
    });
    let status = client.chat(request.clone()).await.expect_err("top_p 1.5");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("`top_p`"), "{}", status.message());
    // Streaming gives the same answer, as a status, before any chunk.
    let status = client.chat_stream(request).await.expect_err("top_p 1.5");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("`top_p`"), "{}", status.message());

    let mut request = chat_request("hi");
    request.model = Some("gpt-4".into());
    let status = client.chat(request).await.expect_err("wrong model");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("`model`"), "{}", status.message());
    assert_eq!(
        a.observed.calls(),
        0,
        "invalid requests never reach a worker"
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() {
    let a = start_fake("a", NORMAL).await;
    let router = router(&[&a]).await;
    let (addr, stop) = serve(router).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let response = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "allam.v1.Generation".into(),
            })
            .await;
        if let Ok(r) = &response {
            if r.get_ref().status
                == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            {
                break;
            }
        }
        assert!(Instant::now() < deadline, "never SERVING: {response:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    let response = responses
        .message()
        .await
        .expect("answer")
        .expect("one message");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.iter().any(|n| n == "allam.v1.Generation"),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| n == "grpc.health.v1.Health"),
        "{names:?}"
    );
    assert!(
        !names.iter().any(|n| n.contains("worker")),
        "internal API leaked: {names:?}"
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_group_means_unavailable_and_not_ready() {
    // A group whose port refuses connections.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let info = support::group_info("dead", &format!("http://{closed}"));
    let mut config = RouterConfig::new("tiny-allam", support::tokenizer(), limits());
    config.load_poll_interval = Duration::from_millis(50);
    let router = Router::new(config, Membership::Static(vec![info]))
        .await
        .expect("router");
    let err = router
        .generate(chat("hi"), ctx())
        .await
        .expect_err("dead group");
    assert_eq!(err.to_status().code(), Code::Unavailable, "{err:?}");
    assert!(!router.ready());
    let empty = Router::new(
        RouterConfig::new("tiny-allam", support::tokenizer(), limits()),
        Membership::Static(Vec::new()),
    )
    .await
    .expect("router");
    assert!(matches!(
        empty.generate(chat("hi"), ctx()).await,
        Err(Error::NoWorkers)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_and_model_info_match_the_tokenizer() {
    let a = start_fake("a", NORMAL).await;
    let router = router(&[&a]).await;
    let (addr, stop) = serve(router).await;
    let mut client = client(addr).await;
    let tokenizer = support::tokenizer();

    let text = "السلام عليكم, hello";
    let ids = client
        .tokenize(pb::TokenizeRequest {
            text: text.into(),
            messages: Vec::new(),
        })
        .await
        .expect("tokenize text")
        .into_inner()
        .token_ids;
    assert_eq!(ids, tokenizer.encode(text, true).expect("encode"));

    let ids = client
        .tokenize(pb::TokenizeRequest {
            text: String::new(),
            messages: vec![pb::Message {
                role: "user".into(),
                content: text.into(),
            }],
        })
        .await
        .expect("tokenize chat")
        .into_inner()
        .token_ids;
    let rendered = tokenizer
        .apply_chat_template(&[allam_tokenizer::Message::user(text)], true)
        .expect("template");
    assert_eq!(ids, tokenizer.encode(&rendered, false).expect("encode"));

    let info = client
        .model_info(pb::ModelInfoRequest {})
        .await
        .expect("model info")
        .into_inner();
    assert_eq!(info.name, "tiny-allam");
    assert_eq!(info.max_context, limits().max_context);
    assert_eq!(info.vocab_size as usize, tokenizer.vocab_size());
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_membership_adds_and_removes_groups() {
    use allam_membership::testing::EtcdServer;
    use allam_membership::{EtcdConfig, MembershipWatcher, Registration, RegistrationConfig};

    let etcd = EtcdServer::start().expect("start etcd");
    let etcd_config = EtcdConfig::new(vec![etcd.endpoint()]);
    let watcher = MembershipWatcher::start(etcd_config.clone()).expect("watcher");
    let mut config = RouterConfig::new("tiny-allam", support::tokenizer(), limits());
    config.load_poll_interval = Duration::from_millis(50);
    let router = Router::new(config, Membership::Etcd(watcher))
        .await
        .expect("router");
    assert!(matches!(
        router.generate(chat("hi"), ctx()).await,
        Err(Error::NoWorkers)
    ));

    let a = start_fake("a", NORMAL).await;
    let registration = Registration::start(RegistrationConfig::new(etcd_config), a.info.clone())
        .expect("register");
    let mut ready = router.ready_watch();
    tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|r| *r))
        .await
        .expect("the registered group becomes ready")
        .expect("router alive");
    let stream = router
        .generate(chat("hi"), ctx())
        .await
        .expect("routed via etcd");
    assert_eq!(stream.group(), "a");
    let (events, error) = drain(stream).await;
    assert!(error.is_none() && finished(&events), "{error:?}");

    registration.deregister().await.expect("deregister");
    tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|r| !*r))
        .await
        .expect("the group leaves routing after deregistering")
        .expect("router alive");
    assert!(router.groups().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_clients_that_trust_the_certificate() {
    let a = start_fake("a", NORMAL).await;
    let router = router(&[&a]).await;
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .expect("self-signed cert");
    let cert_pem = certified.cert.pem();
    let tls = allam_router::TlsConfig {
        cert_pem: cert_pem.clone().into_bytes(),
        key_pem: certified.key_pair.serialize_pem().into_bytes(),
        client_ca_pem: None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    tokio::spawn(allam_router::serve_grpc(
        router,
        listener,
        stop.clone(),
        Some(tls),
    ));
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .expect("url")
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(cert_pem))
                .domain_name("localhost"),
        )
        .expect("client tls")
        .connect()
        .await
        .expect("TLS handshake with the router");
    let response = GenerationClient::new(channel)
        .chat(chat_request("hi"))
        .await
        .expect("chat over TLS")
        .into_inner();
    assert_eq!(response.text, "t0 t1 t2 t3 ");
    stop.cancel();
}

fn chat_request(text: &str) -> pb::ChatRequest {
    pb::ChatRequest {
        messages: vec![pb::Message {
            role: "user".into(),
            content: text.into(),
        }],
        params: None,
        model: None,
    }
}

async fn serve(router: Router) -> (std::net::SocketAddr, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    tokio::spawn(allam_router::serve_grpc(
        router,
        listener,
        stop.clone(),
        None,
    ));
    (addr, stop)
}

async fn client(addr: std::net::SocketAddr) -> GenerationClient<tonic::transport::Channel> {
    GenerationClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to the router")
}
