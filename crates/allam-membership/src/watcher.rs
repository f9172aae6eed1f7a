//! The router's view of the cluster: get + watch on the workers prefix, published as
//! snapshots through a `tokio::sync::watch` channel.
//!
//! Invariants:
//! - A snapshot is the full list of groups whose key exists, sorted by group name; it changes
//!   only when etcd says so. While etcd is unreachable the last snapshot stays published
//!   (routing continues on the last known membership) and the loop keeps retrying with
//!   backoff + jitter.
//! - Every (re)connection starts with a full `get` and watches from the revision after it, so
//!   no event falls between the two and a reconnect cannot leave a departed group behind.
//! - A group leaves when its key is deleted: revoked on shutdown or expired with its lease.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::backoff::Backoff;
use crate::info::{EtcdConfig, WorkerGroupInfo, WORKERS_PREFIX};
use crate::Error;

/// Watches the workers prefix until dropped. Must be started inside a tokio runtime.
pub struct MembershipWatcher {
    groups: watch::Receiver<Vec<WorkerGroupInfo>>,
    synced: watch::Receiver<bool>,
    _stop: DropGuard,
}

impl std::fmt::Debug for MembershipWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MembershipWatcher")
            .field("groups", &*self.groups.borrow())
            .field("synced", &*self.synced.borrow())
            .finish()
    }
}

impl MembershipWatcher {
    /// Spawns the watch loop on the current tokio runtime. The first snapshot is empty until
    /// the first successful `get`; see [`Self::wait_synced`].
    pub fn start(config: EtcdConfig) -> Result<MembershipWatcher, Error> {
        config.check()?;
        let (groups_tx, groups) = watch::channel(Vec::new());
        let (synced_tx, synced) = watch::channel(false);
        let stop = CancellationToken::new();
        let watch_loop = WatchLoop {
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(3)),
            config,
            groups: groups_tx,
            synced: synced_tx,
            by_key: BTreeMap::new(),
        };
        let cancelled = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = cancelled.cancelled() => {}
                () = watch_loop.run() => {}
            }
        });
        Ok(MembershipWatcher {
            groups,
            synced,
            _stop: stop.drop_guard(),
        })
    }

    /// Membership snapshots; `changed()` wakes on every change.
    pub fn subscribe(&self) -> watch::Receiver<Vec<WorkerGroupInfo>> {
        self.groups.clone()
    }

    /// The latest snapshot.
    pub fn current(&self) -> Vec<WorkerGroupInfo> {
        self.groups.borrow().clone()
    }

    /// True while a watch on etcd is established (the snapshot is live, not just last known).
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Waits for the first (or next) successful sync with etcd.
    pub async fn wait_synced(&self, timeout: Duration) -> Result<(), Error> {
        let mut synced = self.synced.clone();
        let waited = tokio::time::timeout(timeout, synced.wait_for(|s| *s)).await;
        match waited.map(|r| r.map(|_| ())) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Error::Thread(
                "the membership watch loop has stopped".into(),
            )),
            Err(_) => Err(Error::Timeout {
                op: format!("watch {WORKERS_PREFIX}"),
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            }),
        }
    }
}

struct WatchLoop {
    config: EtcdConfig,
    groups: watch::Sender<Vec<WorkerGroupInfo>>,
    synced: watch::Sender<bool>,
    backoff: Backoff,
    by_key: BTreeMap<String, WorkerGroupInfo>,
}

impl WatchLoop {
    async fn run(mut self) {
        let mut client: Option<etcd_client::Client> = None;
        loop {
            if client.is_none() {
                match self.config.connect().await {
                    Ok(connected) => client = Some(connected),
                    Err(e) => {
                        self.retry_later(&e).await;
                        continue;
                    }
                }
            }
            if let Some(connected) = client.as_mut() {
                // `sync_and_watch` returns only on failure; the client's channel reconnects
                // by itself, so it is kept across failures.
                let e = self.sync_and_watch(connected).await;
                self.synced.send_replace(false);
                self.retry_later(&e).await;
            }
        }
    }

    async fn retry_later(&mut self, e: &Error) {
        let delay = self.backoff.next_delay();
        tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "etcd membership watch failed; keeping the last known membership");
        tokio::time::sleep(delay).await;
    }

    /// Full get, then watch from the next revision. Returns the error that ended it.
    async fn sync_and_watch(&mut self, client: &mut etcd_client::Client) -> Error {
        let get_op = format!("get {WORKERS_PREFIX}");
        let get = self.config.call(
            &get_op,
            client.get(WORKERS_PREFIX, Some(GetOptions::new().with_prefix())),
        );
        let response = match get.await {
            Ok(response) => response,
            Err(e) => return e,
        };
        let revision = response.header().map(|h| h.revision()).unwrap_or(0);
        self.by_key.clear();
        for kv in response.kvs() {
            self.apply_put(kv.key(), kv.value());
        }
        let watch_op = format!("watch {WORKERS_PREFIX}");
        let watch = self.config.call(
            &watch_op,
            client.watch(
                WORKERS_PREFIX,
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            ),
        );
        let mut stream = match watch.await {
            Ok(stream) => stream,
            Err(e) => return e,
        };
        // Publish only once the watch exists, so "synced" means "live".
        self.publish();
        self.synced.send_replace(true);
        self.backoff.reset();
        tracing::info!(
            n_groups = self.by_key.len(),
            revision,
            "membership synced with etcd"
        );
        loop {
            let message = match stream.message().await {
                Ok(Some(message)) => message,
                Ok(None) => return Error::Thread("etcd closed the watch stream".into()),
                Err(source) => {
                    return Error::Etcd {
                        op: format!("watch {WORKERS_PREFIX}"),
                        source,
                    }
                }
            };
            if message.canceled() {
                // Compaction past our revision, or etcd cancelled the watch: resync.
                return Error::Thread(format!(
                    "etcd cancelled the watch (compact revision {}): {}",
                    message.compact_revision(),
                    message.cancel_reason()
                ));
            }
            let mut changed = false;
            for event in message.events() {
                let Some(kv) = event.kv() else { continue };
                changed = true;
                match event.event_type() {
                    EventType::Put => self.apply_put(kv.key(), kv.value()),
                    EventType::Delete => {
                        let key = String::from_utf8_lossy(kv.key()).into_owned();
                        if let Some(info) = self.by_key.remove(&key) {
                            tracing::info!(group = %info.group, "worker group left");
                        }
                    }
                }
            }
            if changed {
                self.publish();
            }
        }
    }

    fn apply_put(&mut self, key: &[u8], value: &[u8]) {
        let key = String::from_utf8_lossy(key).into_owned();
        match decode_info(&key, value) {
            Ok(info) => {
                if self.by_key.get(&key) != Some(&info) {
                    tracing::info!(group = %info.group, addr = %info.grpc_addr, "worker group registered");
                }
                self.by_key.insert(key, info);
            }
            Err(e) => {
                // One bad value must not hide the other groups.
                tracing::warn!(error = %e, "ignoring membership entry");
                self.by_key.remove(&key);
            }
        }
    }

    fn publish(&self) {
        let snapshot: Vec<WorkerGroupInfo> = self.by_key.values().cloned().collect();
        self.groups.send_if_modified(|current| {
            if *current == snapshot {
                false
            } else {
                *current = snapshot;
                true
            }
        });
    }
}

/// Parses one value; the key's last segment must name the same group as the value.
pub(crate) fn decode_info(key: &str, value: &[u8]) -> Result<WorkerGroupInfo, Error> {
    let info: WorkerGroupInfo = serde_json::from_slice(value).map_err(|e| Error::BadValue {
        key: key.to_string(),
        message: e.to_string(),
    })?;
    let expected = key.strip_prefix(WORKERS_PREFIX).unwrap_or(key);
    if info.group != expected {
        return Err(Error::BadValue {
            key: key.to_string(),
            message: format!("`group` is {:?} but the key names {expected:?}", info.group),
        });
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_must_match_their_key() {
        let info = WorkerGroupInfo {
            group: "g1".into(),
            grpc_addr: "http://127.0.0.1:1".into(),
            tp: 1,
            model: "m".into(),
            started_at_ms: 5,
        };
        let json = serde_json::to_vec(&info).expect("serializes");
        assert_eq!(
            decode_info("/allam/v1/workers/g1", &json).expect("matches"),
            info
        );
        let err = decode_info("/allam/v1/workers/g2", &json).expect_err("wrong key");
        assert!(err.to_string().contains("`group`"), "{err}");
        let err = decode_info("/allam/v1/workers/g1", b"{not json").expect_err("bad json");
        assert!(err.to_string().contains("/allam/v1/workers/g1"), "{err}");
    }
}
