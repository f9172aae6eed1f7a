//! The membership crate's one error type.

/// What can go wrong talking to etcd or decoding what is stored there.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration cannot work (no endpoints, TTL out of range, bad group name).
    #[error("invalid membership config: {0}")]
    Config(String),
    /// An etcd call failed; `op` names the call (`lease_grant`, `put /allam/v1/workers/g0`, ...).
    #[error("etcd {op} failed: {source}")]
    Etcd {
        op: String,
        #[source]
        source: etcd_client::Error,
    },
    /// An etcd call did not answer within the configured request timeout.
    #[error("etcd {op} timed out after {timeout_ms} ms")]
    Timeout { op: String, timeout_ms: u64 },
    /// A value under the workers prefix is not a `WorkerGroupInfo` JSON document.
    #[error("bad membership value under key `{key}`: {message}")]
    BadValue { key: String, message: String },
    /// The keepalive thread could not be started or has already stopped.
    #[error("registration thread: {0}")]
    Thread(String),
    /// Registration did not succeed before the caller's deadline.
    #[error("not registered in etcd after {waited_ms} ms (last error: {last_error})")]
    NotRegistered { waited_ms: u64, last_error: String },
}

impl Error {
    /// A short fixed label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Config(_) => "config",
            Error::Etcd { .. } => "etcd",
            Error::Timeout { .. } => "etcd_timeout",
            Error::BadValue { .. } => "bad_value",
            Error::Thread(_) => "thread",
            Error::NotRegistered { .. } => "not_registered",
        }
    }
}
