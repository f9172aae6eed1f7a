//! What a worker group publishes about itself, where it lives in etcd, and how to reach etcd.
//!
//! Key layout: `/allam/v1/workers/<group>` → JSON [`WorkerGroupInfo`], attached to the group's
//! lease. The key exists exactly while the group keeps its lease alive, so "key present" is the
//! membership test; nothing else is stored.

use std::time::Duration;

use crate::Error;

/// Prefix of every worker group key (versioned like the public API).
pub const WORKERS_PREFIX: &str = "/allam/v1/workers/";

/// Default lease TTL: a dead group leaves routing at most this long after its last keepalive.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// One worker group as registered in etcd.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WorkerGroupInfo {
    /// Unique group name; the last segment of the key.
    pub group: String,
    /// Where the group leader serves `allam.worker.v1.Worker`, e.g. `http://10.0.0.5:50061`.
    pub grpc_addr: String,
    /// Tensor-parallel size (ranks in the group).
    pub tp: u32,
    /// Served model name.
    pub model: String,
    /// Unix time in milliseconds when this group process started; a restarted group under the
    /// same name gets a new value, which tells the router to reconnect.
    pub started_at_ms: u64,
}

impl WorkerGroupInfo {
    /// The etcd key this group registers under.
    pub fn key(&self) -> String {
        group_key(&self.group)
    }
}

/// `/allam/v1/workers/<group>`.
pub fn group_key(group: &str) -> String {
    format!("{WORKERS_PREFIX}{group}")
}

/// Group names become etcd key segments and metric labels: keep them to `[A-Za-z0-9._-]`.
pub(crate) fn check_group_name(group: &str) -> Result<(), Error> {
    let ok = !group.is_empty()
        && group.len() <= 128
        && group
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "`group` must be 1-128 characters of [A-Za-z0-9._-], got {group:?}"
        )))
    }
}

/// How to reach etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Bound on establishing a connection.
    pub connect_timeout: Duration,
    /// Bound on one unary call (grant, put, get, revoke, one keepalive round trip).
    pub request_timeout: Duration,
}

impl EtcdConfig {
    /// Defaults suited to a LAN: 2 s to connect, 3 s per call.
    pub fn new(endpoints: Vec<String>) -> EtcdConfig {
        EtcdConfig {
            endpoints,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(3),
        }
    }

    pub(crate) fn check(&self) -> Result<(), Error> {
        if self.endpoints.is_empty() {
            return Err(Error::Config("`etcd endpoints` must not be empty".into()));
        }
        Ok(())
    }

    pub(crate) async fn connect(&self) -> Result<etcd_client::Client, Error> {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            // HTTP/2 pings notice a silently dead peer (no RST, e.g. a partition) so that a
            // watch or keepalive stream errors instead of hanging.
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        let connect = etcd_client::Client::connect(&self.endpoints, Some(options));
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(source)) => Err(Error::Etcd {
                op: "connect".into(),
                source,
            }),
            Err(_) => Err(self.timeout_error("connect")),
        }
    }

    pub(crate) fn timeout_error(&self, op: &str) -> Error {
        Error::Timeout {
            op: op.to_string(),
            timeout_ms: u64::try_from(self.request_timeout.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// Runs one etcd call under `request_timeout`, naming it in the error.
    pub(crate) async fn call<T>(
        &self,
        op: &str,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, Error> {
        match tokio::time::timeout(self.request_timeout, fut).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(Error::Etcd {
                op: op.to_string(),
                source,
            }),
            Err(_) => Err(self.timeout_error(op)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_json_round_trips_with_stable_field_names() {
        let info = WorkerGroupInfo {
            group: "g0".into(),
            grpc_addr: "http://127.0.0.1:50061".into(),
            tp: 2,
            model: "allam-2-7b-instruct".into(),
            started_at_ms: 1_700_000_000_000,
        };
        let json = serde_json::to_value(&info).expect("plain struct serializes");
        // Other tools (dashboards, etcdctl users) read these names: they are part of the layout.
        for field in ["group", "grpc_addr", "tp", "model", "started_at_ms"] {
            assert!(json.get(field).is_some(), "missing {field} in {json}");
        }
        let back: WorkerGroupInfo = serde_json::from_value(json).expect("round trip");
        assert_eq!(back, info);
        assert_eq!(info.key(), "/allam/v1/workers/g0");
    }

    #[test]
    fn group_names_are_restricted() {
        for good in ["g0", "group-1.a_b", "A"] {
            assert!(check_group_name(good).is_ok(), "{good}");
        }
        for bad in ["", "a/b", "a b", "مجموعة", &"x".repeat(129)] {
            let err = check_group_name(bad).expect_err(bad);
            assert!(err.to_string().contains("`group`"), "{err}");
        }
    }
}
