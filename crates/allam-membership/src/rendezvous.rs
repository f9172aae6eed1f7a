//! Tensor-parallel rendezvous through etcd: rank 0 of a worker group publishes the address
//! its ranks must dial under `/allam/v1/rendezvous/<group>`, and the other ranks wait for it,
//! so a multi-rank group needs no `--peers` list.
//!
//! Invariant: the key lives under a lease of `ttl`; a rank 0 that dies before its group is
//! assembled leaves no address behind for longer than that, and [`RendezvousKey::remove`]
//! revokes it as soon as the group is complete.

use std::time::{Duration, Instant};

use crate::info::{check_group_name, EtcdConfig};
use crate::Error;

/// Prefix of rendezvous keys (versioned like the worker keys).
pub const RENDEZVOUS_PREFIX: &str = "/allam/v1/rendezvous/";

fn rendezvous_key(group: &str) -> String {
    format!("{RENDEZVOUS_PREFIX}{group}")
}

fn etcd_err(op: String) -> impl FnOnce(etcd_client::Error) -> Error {
    move |source| Error::Etcd { op, source }
}

/// A published rendezvous address; revoke it with [`RendezvousKey::remove`].
pub struct RendezvousKey {
    config: EtcdConfig,
    lease_id: i64,
}

impl RendezvousKey {
    /// Rank 0: publishes `addr` for `group` under a lease of `ttl`.
    pub async fn publish(
        config: &EtcdConfig,
        group: &str,
        addr: &str,
        ttl: Duration,
    ) -> Result<RendezvousKey, Error> {
        check_group_name(group)?;
        let mut client = config.connect().await?;
        let key = rendezvous_key(group);
        let ttl_s = i64::try_from(ttl.as_secs().max(2)).unwrap_or(i64::MAX);
        let lease = client
            .lease_grant(ttl_s, None)
            .await
            .map_err(etcd_err(format!("lease_grant for {key}")))?;
        client
            .put(
                key.clone(),
                addr,
                Some(etcd_client::PutOptions::new().with_lease(lease.id())),
            )
            .await
            .map_err(etcd_err(format!("put {key}")))?;
        Ok(RendezvousKey {
            config: config.clone(),
            lease_id: lease.id(),
        })
    }

    /// Revokes the key (the group is assembled, or rank 0 gives up).
    pub async fn remove(self) -> Result<(), Error> {
        let mut client = self.config.connect().await?;
        client
            .lease_revoke(self.lease_id)
            .await
            .map_err(etcd_err(format!("lease_revoke {}", self.lease_id)))?;
        Ok(())
    }
}

/// Ranks >= 1: polls for `group`'s rendezvous address until `timeout`.
pub async fn wait_for_rendezvous(
    config: &EtcdConfig,
    group: &str,
    timeout: Duration,
) -> Result<String, Error> {
    check_group_name(group)?;
    let key = rendezvous_key(group);
    let deadline = Instant::now() + timeout;
    let mut last_error = String::from("the key does not exist yet");
    loop {
        match config.connect().await {
            Ok(mut client) => match client.get(key.clone(), None).await {
                Ok(response) => {
                    if let Some(kv) = response.kvs().first() {
                        if let Ok(addr) = kv.value_str() {
                            return Ok(addr.to_owned());
                        }
                        last_error = format!("`{key}` holds a value that is not UTF-8");
                    }
                }
                Err(e) => last_error = e.to_string(),
            },
            Err(e) => last_error = e.to_string(),
        }
        if Instant::now() >= deadline {
            return Err(Error::NotRegistered {
                waited_ms: timeout.as_millis() as u64,
                last_error: format!("no rendezvous for group `{group}`: {last_error}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
