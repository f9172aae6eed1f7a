//! Distributed tracing end to end: an in-test OTLP/gRPC trace receiver, a router and a worker
//! (real `allam` processes, etcd membership) exporting to it, and one chat request carrying a
//! W3C `traceparent`. Every hop must land in the client's trace, parented hop by hop:
//! client → `http_request` → `router.generate` (router) → `worker.generate` →
//! `engine.queue` / `engine.prefill` / `engine.decode` (worker).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use serde_json::json;

use crate::support::{
    http_client, http_get_status, registered_groups, start_router, wait_until, EtcdServer, Worker,
};

/// One received span, flattened with its resource's `service.name`.
#[derive(Debug, Clone)]
struct ReceivedSpan {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    start_ns: u64,
    end_ns: u64,
    attributes: Vec<(String, String)>,
}

impl ReceivedSpan {
    fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Collects every exported span; the test filters by trace id.
#[derive(Default, Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

impl Collector {
    fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        let spans = self.spans.lock().unwrap_or_else(|p| p.into_inner());
        spans
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn value_text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(kvs: &[KeyValue]) -> Vec<(String, String)> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), value_text(kv.value.as_ref())))
        .collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let resource = attributes(
                resource_spans
                    .resource
                    .as_ref()
                    .map_or(&[][..], |r| &r.attributes[..]),
            );
            let service = resource
                .iter()
                .find(|(k, _)| k == "service.name")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    received.push(ReceivedSpan {
                        service: service.clone(),
                        name: span.name.clone(),
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        start_ns: span.start_time_unix_nano,
                        end_ns: span.end_time_unix_nano,
                        attributes: attributes(&span.attributes),
                    });
                }
            }
        }
        self.spans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// The receiver on its own runtime, bound before anyone exports (no port race).
struct Receiver {
    collector: Collector,
    endpoint: String,
    _rt: tokio::runtime::Runtime,
}

fn start_receiver() -> Receiver {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("receiver runtime");
    let collector = Collector::default();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(SocketAddr::from((
            [127, 0, 0, 1],
            0,
        ))))
        .expect("bind the OTLP receiver");
    let addr = listener.local_addr().expect("receiver address");
    let service = TraceServiceServer::new(collector.clone());
    rt.spawn(async move {
        let incoming = tokio_stream_incoming(listener);
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await;
    });
    Receiver {
        collector,
        endpoint: format!("http://{addr}"),
        _rt: rt,
    }
}

/// Accepted connections as the stream tonic's `serve_with_incoming` takes.
fn tokio_stream_incoming(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    })
}

/// A fresh, valid W3C trace id (32 hex digits, not all zero) for this run.
fn new_trace_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos());
    let pid = u128::from(std::process::id());
    format!("{:032x}", (nanos ^ (pid << 96)) | 1)
}

/// The spans every hop must contribute, by service.
const ROUTER_SPANS: [&str; 2] = ["http_request", "router.generate"];
const WORKER_SPANS: [&str; 4] = [
    "worker.generate",
    "engine.queue",
    "engine.prefill",
    "engine.decode",
];

fn names(spans: &[ReceivedSpan], service: &str) -> BTreeSet<String> {
    spans
        .iter()
        .filter(|s| s.service == service)
        .map(|s| s.name.clone())
        .collect()
}

fn complete(spans: &[ReceivedSpan]) -> bool {
    let router = names(spans, "allam-router");
    let worker = names(spans, "allam-worker");
    ROUTER_SPANS.iter().all(|n| router.contains(*n))
        && WORKER_SPANS.iter().all(|n| worker.contains(*n))
}

fn one<'a>(spans: &'a [ReceivedSpan], service: &str, name: &str) -> &'a ReceivedSpan {
    let found: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.service == service && s.name == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "exactly one {service}/{name} span in the trace: {spans:#?}"
    );
    found[0]
}

#[test]
fn one_trace_id_spans_router_and_worker() {
    let receiver = start_receiver();
    let dir = tempfile::tempdir().expect("temp dir");
    let etcd = EtcdServer::start().expect("etcd (Debian etcd-server) must be installed");
    let endpoint = etcd.endpoint();
    // The batch exporters flush every 5 s by default; a short delay only makes the test
    // quicker, the deadline below still does the synchronizing.
    let envs = [("OTEL_BSP_SCHEDULE_DELAY", "200")];
    let otlp = ["--otlp-endpoint", receiver.endpoint.as_str()];
    let worker = Worker::start("w0", &endpoint, dir.path(), &otlp, &envs);
    let (router, http) = start_router(&endpoint, dir.path(), &otlp, &envs);
    wait_until(
        "the worker group registered in etcd",
        Duration::from_secs(90),
        || registered_groups(&endpoint) == vec!["w0".to_owned()],
    );
    // Ready means a group is known and healthy: the router can route to the worker.
    wait_until("router ready", Duration::from_secs(60), || {
        http_get_status(&format!("{http}/ready")) == Some(200)
    });

    let trace_id = new_trace_id();
    let client_span_id = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace_id}-{client_span_id}-01");
    let client = http_client::blocking_client();
    let response = client
        .post(&format!("{http}/v1/chat/completions"))
        .header("traceparent", &traceparent)
        .json(&json!({
            "messages": [{"role": "user", "content": "How do I prepare a cup of tea?"}],
            "max_tokens": 8, "temperature": 0,
        }))
        .send()
        .expect("chat request");
    assert_eq!(
        response.status,
        200,
        "{}\nrouter log:\n{}",
        response.body,
        router.log_text()
    );
    let body = response.json();

    let deadline = Instant::now() + Duration::from_secs(60);
    let spans = loop {
        let spans = receiver.collector.trace(&trace_id);
        if complete(&spans) {
            break spans;
        }
        assert!(
            Instant::now() < deadline,
            "spans of trace {trace_id} missing after 60 s: router has {:?} (want {ROUTER_SPANS:?}), \
             worker has {:?} (want {WORKER_SPANS:?})\nall spans: {spans:#?}\nrouter log:\n{}\nworker log:\n{}",
            names(&spans, "allam-router"),
            names(&spans, "allam-worker"),
            router.log_text(),
            worker.proc.log_text(),
        );
        std::thread::sleep(Duration::from_millis(100));
    };

    // One trace, both services, each hop the child of the previous one.
    let http_span = one(&spans, "allam-router", "http_request");
    let route = one(&spans, "allam-router", "router.generate");
    let worker_span = one(&spans, "allam-worker", "worker.generate");
    assert_eq!(
        http_span.parent_span_id, client_span_id,
        "the client's span is the root's parent"
    );
    assert_eq!(
        route.parent_span_id, http_span.span_id,
        "route runs inside the HTTP request"
    );
    assert_eq!(
        worker_span.parent_span_id, route.span_id,
        "traceparent crossed the gRPC hop"
    );
    let phases: Vec<&ReceivedSpan> = ["engine.queue", "engine.prefill", "engine.decode"]
        .iter()
        .map(|name| one(&spans, "allam-worker", name))
        .collect();
    for phase in &phases {
        assert_eq!(
            phase.parent_span_id, worker_span.span_id,
            "{} under worker.generate",
            phase.name
        );
        assert!(phase.start_ns <= phase.end_ns, "{phase:?}");
    }
    // Phases follow each other (a phase starts before the previous one is closed, never
    // before it began).
    assert!(phases[0].start_ns <= phases[1].start_ns && phases[1].start_ns <= phases[2].start_ns);
    assert!(
        worker_span.end_ns >= phases[2].end_ns,
        "worker.generate covers the decode: {spans:#?}"
    );

    // The decode span records how the request finished, as the client saw it.
    let decode = phases[2];
    let completion_tokens = body["usage"]["completion_tokens"].to_string();
    assert_eq!(
        decode.attribute("completion_tokens"),
        Some(completion_tokens.as_str()),
        "{decode:?}"
    );
    assert_eq!(
        decode.attribute("finish_reason"),
        body["choices"][0]["finish_reason"].as_str(),
        "{decode:?}"
    );
    drop(router);
    drop(worker);
}
