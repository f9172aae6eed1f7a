//! Cluster membership through etcd.
//!
//! - A worker group registers `/allam/v1/workers/<group>` → JSON [`WorkerGroupInfo`] under a
//!   lease with [`Registration::start`]. The lease is renewed from a dedicated OS thread with
//!   its own runtime (a busy worker never misses a keepalive), re-granted after any loss with
//!   backoff + jitter, and revoked by [`Registration::deregister`] (first step of SIGTERM).
//! - A router follows the prefix with [`MembershipWatcher`], which publishes sorted snapshots
//!   and keeps the last known one while etcd is unreachable.
//! - A tensor-parallel group's rank 0 publishes its rendezvous address with
//!   [`RendezvousKey::publish`]; the other ranks find it with [`wait_for_rendezvous`].
//! - `testing` (feature): a real etcd member for tests.
//!
//! Invariant: a group is a member exactly while its key exists; nothing but the lease decides.

mod backoff;
mod error;
mod info;
mod registration;
mod rendezvous;
#[cfg(feature = "testing")]
pub mod testing;
mod watcher;

pub use error::Error;
pub use info::{group_key, EtcdConfig, WorkerGroupInfo, DEFAULT_TTL, WORKERS_PREFIX};
pub use registration::{Registration, RegistrationConfig, RegistrationState};
pub use rendezvous::{wait_for_rendezvous, RendezvousKey, RENDEZVOUS_PREFIX};
pub use watcher::MembershipWatcher;
