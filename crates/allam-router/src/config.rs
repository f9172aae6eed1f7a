//! Construction inputs and small public value types of the router.

use std::time::{Duration, Instant};

use allam_membership::{MembershipWatcher, WorkerGroupInfo};

use crate::policy::Health;

/// How to build a [`crate::Router`].
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Served model id; requests naming another model are rejected.
    pub model_name: String,
    pub tokenizer: allam_tokenizer::Tokenizer,
    pub limits: allam_request::Limits,
    /// Requests this router keeps in flight on one group; beyond it on every group the answer
    /// is RESOURCE_EXHAUSTED / 429 at once.
    pub max_outstanding_per_group: usize,
    /// Upper bound on a request's life (combined with the client's own deadline).
    pub request_timeout: Option<Duration>,
    /// Accepted `authorization: Bearer` keys; empty = no authentication.
    pub api_keys: Vec<String>,
    /// How often each group's `Load` is polled (load, KV usage, prefix-cache summary, health).
    pub load_poll_interval: Duration,
    /// Bound on one `Load` call and on connecting to a group.
    pub worker_connect_timeout: Duration,
    /// Most prefix-cache block hashes asked from a group per poll.
    pub max_cached_hashes: u32,
    /// Mutual TLS towards the worker groups; `None` = plaintext (loopback, trusted networks).
    pub worker_tls: Option<WorkerClientTls>,
    /// How long a stream's router-side buffer may stay full (its client reads nothing)
    /// before the router ends it with `client_too_slow` and cancels it on the worker.
    pub stream_write_timeout: Duration,
}

/// The router's side of mutual TLS with worker groups (PEM): the CA that signed the workers'
/// certificates, and the router's own certificate and key, which the workers check.
#[derive(Debug, Clone)]
pub struct WorkerClientTls {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// Name the workers' certificates are issued for (their SAN), checked on every dial.
    pub server_name: String,
}

impl RouterConfig {
    /// Defaults: 256 outstanding per group, no timeout, no API keys, `Load` every 250 ms.
    pub fn new(
        model_name: impl Into<String>,
        tokenizer: allam_tokenizer::Tokenizer,
        limits: allam_request::Limits,
    ) -> RouterConfig {
        RouterConfig {
            model_name: model_name.into(),
            tokenizer,
            limits,
            max_outstanding_per_group: 256,
            request_timeout: None,
            api_keys: Vec::new(),
            load_poll_interval: Duration::from_millis(250),
            worker_connect_timeout: Duration::from_secs(1),
            max_cached_hashes: 4096,
            worker_tls: None,
            stream_write_timeout: Duration::from_secs(30),
        }
    }
}

/// Where the router learns its worker groups.
#[derive(Debug)]
pub enum Membership {
    /// A fixed list (one-process `allam serve`, `--peers`).
    Static(Vec<WorkerGroupInfo>),
    /// Followed from etcd; the router keeps the watcher alive.
    Etcd(MembershipWatcher),
}

/// Per-request facts from the front (gRPC or HTTP).
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// The client's deadline (gRPC `grpc-timeout`, HTTP timeout header).
    pub deadline: Option<Instant>,
    /// W3C trace context headers (`traceparent`, `tracestate`), forwarded to the worker.
    pub trace_headers: Vec<(String, String)>,
    /// Which API the request came through, for metric labels (`grpc_chat`, `openai_chat`, ...).
    pub api: &'static str,
}

impl RequestContext {
    pub fn new(api: &'static str) -> RequestContext {
        RequestContext {
            deadline: None,
            trace_headers: Vec::new(),
            api,
        }
    }
}

/// The served model, as clients see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    pub name: String,
    pub max_context: u32,
    pub vocab_size: u32,
}

/// One worker group as this router sees it (for `/metrics` and debugging).
#[derive(Debug, Clone, PartialEq)]
pub struct GroupStatus {
    pub name: String,
    pub grpc_addr: String,
    pub health: Health,
    /// Requests this router has in flight there.
    pub outstanding_requests: usize,
    /// Their estimated work in tokens (see the routing policy).
    pub outstanding_tokens: u64,
    /// From the group's last `Load` report.
    pub running: u32,
    pub waiting: u32,
    pub kv_usage: f64,
    pub cached_blocks: usize,
    /// Age of the last successful `Load` report.
    pub last_load_age: Option<Duration>,
}

/// Server TLS for the public gRPC port (PEM).
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// When set, clients must present a certificate signed by this CA (mTLS).
    pub client_ca_pem: Option<Vec<u8>>,
}
