//! The router's table of worker groups: two gRPC channels (requests, and `Load` on a
//! connection of its own), in-flight counters, the last `Load` report and a health flag per
//! group, reconciled against membership snapshots.
//!
//! Invariants:
//! - `Load` never shares a connection with request streams: streams whose clients stopped
//!   reading can fill their connection's HTTP/2 window, and a congested connection must not
//!   read as a dead group.
//! - A stream's HTTP/2 receive window is small ([`STREAM_WINDOW`]) and the connection's large
//!   ([`CONNECTION_WINDOW`]), so the data stalled streams hold is bounded per stream and
//!   hundreds of them cannot close the connection to the rest.
//! - A group's outstanding counters are changed only through [`InFlight`] (incremented when a
//!   request is routed there, decremented when its guard drops, whatever the outcome).
//! - A failed connect, `Load` or mid-stream transport error marks a group unhealthy; only the
//!   next successful `Load` (or a re-registration with a new `started_at_ms`) clears it.
//! - Locks here are std mutexes held for a few field updates, never across an await.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use allam_membership::WorkerGroupInfo;
use allam_proto::worker::v1::worker_client::WorkerClient;
use allam_proto::worker::v1::{LoadReport, LoadRequest};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::config::GroupStatus;
use crate::policy::{Candidate, Health};

/// Block size assumed for a group until its first `Load` report says otherwise.
pub(crate) const DEFAULT_BLOCK_SIZE: usize = 16;

/// HTTP/2 receive window of one worker stream: what a stalled stream can hold unread here.
/// Token events are ~100 bytes, so this is thousands of tokens of slack.
pub(crate) const STREAM_WINDOW: u32 = 256 * 1024;

/// HTTP/2 receive window of a whole request connection: 4096 stalled streams' worth, so the
/// router's in-flight limit is reached long before stalled streams can starve the others.
pub(crate) const CONNECTION_WINDOW: u32 = 1 << 30;

pub(crate) struct Group {
    pub(crate) info: WorkerGroupInfo,
    /// Request streams.
    pub(crate) client: WorkerClient<Channel>,
    /// `Load` polls only (its own connection).
    load_client: WorkerClient<Channel>,
    outstanding_requests: AtomicUsize,
    outstanding_tokens: AtomicU64,
    load: Mutex<GroupLoad>,
    stop: CancellationToken,
    ready: Arc<watch::Sender<bool>>,
    /// The table's groups, to recompute readiness after a health change.
    siblings: std::sync::Weak<RwLock<BTreeMap<String, Arc<Group>>>>,
}

struct GroupLoad {
    health: Health,
    running: u32,
    waiting: u32,
    kv_usage: f64,
    block_size: usize,
    /// The group's prefix-cache summary, plus prompts routed there since the last report
    /// (they will be cached by the time a similar prompt arrives).
    cached: HashSet<u64>,
    updated_at: Option<Instant>,
    model_mismatch_logged: bool,
}

impl Group {
    pub(crate) fn name(&self) -> &str {
        &self.info.group
    }

    pub(crate) fn health(&self) -> Health {
        self.lock_load().health
    }

    pub(crate) fn block_size(&self) -> usize {
        self.lock_load().block_size
    }

    fn lock_load(&self) -> std::sync::MutexGuard<'_, GroupLoad> {
        // A panic while holding this lock can only come from a bug in the few field updates
        // below; the data stays usable, so recover instead of poisoning every request.
        self.load
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The policy's view of this group for one request.
    pub(crate) fn candidate(&self, prompt_hashes: &[u64], tried: bool) -> Candidate {
        let load = self.lock_load();
        Candidate {
            health: load.health,
            tried,
            outstanding_requests: self.outstanding_requests.load(Ordering::Relaxed),
            outstanding_tokens: self.outstanding_tokens.load(Ordering::Relaxed),
            kv_usage: load.kv_usage,
            matched_blocks: crate::policy::matched_blocks(prompt_hashes, &load.cached),
            block_size: load.block_size,
        }
    }

    /// Counts a request as in flight here until the guard drops, and remembers its blocks as
    /// likely cached.
    pub(crate) fn begin(self: &Arc<Self>, work: u64, prompt_hashes: &[u64]) -> InFlight {
        self.outstanding_requests.fetch_add(1, Ordering::Relaxed);
        self.outstanding_tokens.fetch_add(work, Ordering::Relaxed);
        self.lock_load()
            .cached
            .extend(prompt_hashes.iter().copied());
        InFlight {
            group: Arc::clone(self),
            work,
        }
    }

    pub(crate) fn mark_unhealthy(&self, why: &str) {
        let changed = {
            let mut load = self.lock_load();
            let changed = load.health != Health::Unhealthy;
            load.health = Health::Unhealthy;
            changed
        };
        if changed {
            tracing::warn!(group = %self.info.group, why, "worker group marked unhealthy");
            self.refresh_ready();
        }
    }

    fn apply_load(&self, report: &LoadReport, model_name: &str) {
        let changed = {
            let mut load = self.lock_load();
            let changed = load.health != Health::Healthy;
            load.health = Health::Healthy;
            load.running = report.running;
            load.waiting = report.waiting;
            load.kv_usage = report.kv_usage;
            if report.block_size > 0 {
                load.block_size = report.block_size as usize;
            }
            load.cached = report.cached_block_hashes.iter().copied().collect();
            load.updated_at = Some(Instant::now());
            if !report.model_name.is_empty()
                && report.model_name != model_name
                && !load.model_mismatch_logged
            {
                load.model_mismatch_logged = true;
                tracing::warn!(group = %self.info.group, group_model = %report.model_name, router_model = %model_name, "worker group serves a different model name");
            }
            changed
        };
        if changed {
            tracing::info!(group = %self.info.group, "worker group healthy");
            self.refresh_ready();
        }
    }

    fn refresh_ready(&self) {
        if let Some(groups) = self.siblings.upgrade() {
            publish_ready(&groups, &self.ready);
        }
    }

    pub(crate) fn status(&self) -> GroupStatus {
        let load = self.lock_load();
        GroupStatus {
            name: self.info.group.clone(),
            grpc_addr: self.info.grpc_addr.clone(),
            health: load.health,
            outstanding_requests: self.outstanding_requests.load(Ordering::Relaxed),
            outstanding_tokens: self.outstanding_tokens.load(Ordering::Relaxed),
            running: load.running,
            waiting: load.waiting,
            kv_usage: load.kv_usage,
            cached_blocks: load.cached.len(),
            last_load_age: load.updated_at.map(|t| t.elapsed()),
        }
    }
}

/// A request in flight on a group; dropping it releases the group's counters.
pub(crate) struct InFlight {
    group: Arc<Group>,
    work: u64,
}

impl InFlight {
    pub(crate) fn group(&self) -> &Arc<Group> {
        &self.group
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.group
            .outstanding_requests
            .fetch_sub(1, Ordering::Relaxed);
        self.group
            .outstanding_tokens
            .fetch_sub(self.work, Ordering::Relaxed);
    }
}

/// Settings the table needs to create groups.
#[derive(Debug, Clone)]
pub(crate) struct GroupSettings {
    pub(crate) model_name: String,
    pub(crate) poll_interval: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) max_cached_hashes: u32,
    pub(crate) worker_tls: Option<crate::WorkerClientTls>,
}

pub(crate) struct GroupTable {
    groups: Arc<RwLock<BTreeMap<String, Arc<Group>>>>,
    ready: Arc<watch::Sender<bool>>,
    settings: GroupSettings,
}

impl GroupTable {
    pub(crate) fn new(settings: GroupSettings) -> GroupTable {
        GroupTable {
            groups: Arc::new(RwLock::new(BTreeMap::new())),
            ready: Arc::new(watch::channel(false).0),
            settings,
        }
    }

    /// Groups sorted by name.
    pub(crate) fn snapshot(&self) -> Vec<Arc<Group>> {
        read(&self.groups).values().cloned().collect()
    }

    pub(crate) fn ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    pub(crate) fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Makes the table match `members`: new groups get a channel and a `Load` poller, groups
    /// that left are stopped, a group re-registered with different info is replaced (fresh
    /// channel, health unknown). Requests in flight keep their own `Arc<Group>`.
    pub(crate) fn reconcile(&self, members: &[WorkerGroupInfo]) {
        let mut added = Vec::new();
        {
            let mut groups = write(&self.groups);
            let wanted: BTreeMap<&str, &WorkerGroupInfo> =
                members.iter().map(|m| (m.group.as_str(), m)).collect();
            groups.retain(|name, group| {
                let keep = wanted.get(name.as_str()) == Some(&&group.info);
                if !keep {
                    tracing::info!(group = %name, "worker group removed from routing");
                    group.stop.cancel();
                }
                keep
            });
            for (name, info) in wanted {
                if groups.contains_key(name) {
                    continue;
                }
                match self.new_group(info) {
                    Ok(group) => {
                        tracing::info!(group = %name, addr = %info.grpc_addr, "worker group added to routing");
                        groups.insert(name.to_string(), Arc::clone(&group));
                        added.push(group);
                    }
                    Err(e) => {
                        tracing::warn!(group = %name, addr = %info.grpc_addr, error = %e, "ignoring worker group with an unusable address");
                    }
                }
            }
            metrics::gauge!(allam_telemetry::metric_names::WORKER_GROUPS).set(groups.len() as f64);
        }
        for group in added {
            tokio::spawn(poll_load(group, self.settings.clone()));
        }
        publish_ready(&self.groups, &self.ready);
    }

    fn new_group(&self, info: &WorkerGroupInfo) -> Result<Arc<Group>, tonic::transport::Error> {
        let mut endpoint = match &self.settings.worker_tls {
            // The registered address may say http://: with mutual TLS configured, every
            // worker is dialled over TLS, never in plaintext.
            Some(tls) => {
                let addr = with_scheme(&info.grpc_addr);
                let rest = addr
                    .strip_prefix("http://")
                    .or_else(|| addr.strip_prefix("https://"))
                    .unwrap_or(&addr);
                Endpoint::from_shared(format!("https://{rest}"))?.tls_config(
                    tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(&tls.ca_pem))
                        .identity(tonic::transport::Identity::from_pem(
                            &tls.cert_pem,
                            &tls.key_pem,
                        ))
                        .domain_name(tls.server_name.clone()),
                )?
            }
            None => Endpoint::from_shared(with_scheme(&info.grpc_addr))?,
        };
        endpoint = endpoint
            .connect_timeout(self.settings.connect_timeout)
            .tcp_nodelay(true)
            // Notice a silently dead group (no RST, e.g. a host crash) within seconds.
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        // Two `connect_lazy` channels are two connections.
        let load_channel = endpoint.clone().connect_lazy();
        let channel = endpoint
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .connect_lazy();
        Ok(Arc::new(Group {
            info: info.clone(),
            client: WorkerClient::new(channel),
            load_client: WorkerClient::new(load_channel),
            outstanding_requests: AtomicUsize::new(0),
            outstanding_tokens: AtomicU64::new(0),
            load: Mutex::new(GroupLoad {
                health: Health::Unknown,
                running: 0,
                waiting: 0,
                kv_usage: 0.0,
                block_size: DEFAULT_BLOCK_SIZE,
                cached: HashSet::new(),
                updated_at: None,
                model_mismatch_logged: false,
            }),
            stop: CancellationToken::new(),
            ready: Arc::clone(&self.ready),
            siblings: Arc::downgrade(&self.groups),
        }))
    }
}

impl Drop for GroupTable {
    fn drop(&mut self) {
        for group in read(&self.groups).values() {
            group.stop.cancel();
        }
    }
}

fn publish_ready(groups: &RwLock<BTreeMap<String, Arc<Group>>>, ready: &watch::Sender<bool>) {
    let any_healthy = read(groups).values().any(|g| g.health() == Health::Healthy);
    ready.send_if_modified(|current| {
        let changed = *current != any_healthy;
        *current = any_healthy;
        changed
    });
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Membership stores `host:port` or a URL; tonic needs a URL.
pub(crate) fn with_scheme(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// Polls the group's `Load` until the group is removed.
async fn poll_load(group: Arc<Group>, settings: GroupSettings) {
    loop {
        let mut client = group.load_client.clone();
        let mut request = tonic::Request::new(LoadRequest {
            max_cached_hashes: settings.max_cached_hashes,
        });
        request.set_timeout(settings.connect_timeout);
        let result = tokio::select! {
            () = group.stop.cancelled() => return,
            result = tokio::time::timeout(settings.connect_timeout, client.load(request)) => result,
        };
        match result {
            Ok(Ok(report)) => group.apply_load(report.get_ref(), &settings.model_name),
            Ok(Err(status)) => group.mark_unhealthy(&format!("Load failed: {}", status.message())),
            Err(_) => group.mark_unhealthy("Load timed out"),
        }
        tokio::select! {
            () = group.stop.cancelled() => return,
            () = tokio::time::sleep(settings.poll_interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_get_a_scheme_once() {
        assert_eq!(with_scheme("127.0.0.1:5"), "http://127.0.0.1:5");
        assert_eq!(with_scheme("http://h:5"), "http://h:5");
        assert_eq!(with_scheme("https://h:5"), "https://h:5");
    }
}
