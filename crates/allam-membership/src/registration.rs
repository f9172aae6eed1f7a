//! A worker group's registration: its key under a lease, kept alive from a dedicated thread.
//!
//! The thread (`allam-etcd-lease`) runs its own current-thread tokio runtime, so a worker whose
//! async runtime is saturated (or whose engine hogs CPUs) still renews on time: a missed
//! keepalive would drop a healthy group out of routing.
//!
//! Invariants:
//! - Renewals are scheduled from the lease's expiry (`expires_at - 2/3 TTL`, i.e. every TTL/3),
//!   where `expires_at` is measured from when the renewal was *sent*, never from when the reply
//!   came back; a slow reply therefore cannot push the next renewal past expiry.
//! - When the lease is gone (etcd says so, or our conservative expiry passed), a new lease is
//!   granted and the key written again, retrying with exponential backoff + jitter forever.
//! - `deregister` revokes the lease (the key disappears at once) and ends the thread; dropping the
//!   handle does the same, best effort.

use std::thread;
use std::time::Duration;

use etcd_client::{Client, LeaseKeepAliveStream, LeaseKeeper, PutOptions};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::info::{check_group_name, EtcdConfig, WorkerGroupInfo, DEFAULT_TTL};
use crate::Error;

/// How a group registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationConfig {
    pub etcd: EtcdConfig,
    /// Lease time-to-live, whole seconds, at least 2 s (etcd's minimum with default
    /// election timing). A dead group leaves routing within this time.
    pub ttl: Duration,
    /// First retry delay after a failure; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl RegistrationConfig {
    pub fn new(etcd: EtcdConfig) -> RegistrationConfig {
        RegistrationConfig {
            etcd,
            ttl: DEFAULT_TTL,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(3),
        }
    }

    fn ttl_secs(&self) -> Result<i64, Error> {
        let secs = self.ttl.as_secs() + u64::from(self.ttl.subsec_nanos() > 0);
        if !(2..=3600).contains(&secs) {
            return Err(Error::Config(format!(
                "`ttl` must be between 2 s and 3600 s, got {:?}",
                self.ttl
            )));
        }
        i64::try_from(secs).map_err(|_| Error::Config("`ttl` out of range".into()))
    }
}

/// What the registration thread last achieved; observe it through [`Registration::state`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistrationState {
    /// The key is written under a lease that we believe is alive.
    pub registered: bool,
    /// The current lease, if any.
    pub lease_id: Option<i64>,
    /// How many times the key was (re-)written under a new lease since start.
    pub n_registrations: u64,
    /// The last failure, for diagnostics.
    pub last_error: Option<String>,
}

enum Command {
    /// Revoke the lease, reply, exit.
    Deregister(oneshot::Sender<Result<(), Error>>),
    /// Stop renewing without revoking: the key lives until the lease expires.
    Abandon,
}

/// Handle to a running registration. Dropping it revokes the lease (best effort, without
/// waiting); call [`Registration::deregister`] to wait for the revoke.
pub struct Registration {
    commands: mpsc::UnboundedSender<Command>,
    state: watch::Receiver<RegistrationState>,
    info: WorkerGroupInfo,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("info", &self.info)
            .field("state", &*self.state.borrow())
            .finish()
    }
}

impl Registration {
    /// Starts the keepalive thread, which registers `info` and keeps it registered. Returns at
    /// once; registration proceeds (and retries) in the background: see [`Self::wait_registered`].
    pub fn start(config: RegistrationConfig, info: WorkerGroupInfo) -> Result<Registration, Error> {
        config.etcd.check()?;
        check_group_name(&info.group)?;
        let ttl_secs = config.ttl_secs()?;
        let value = serde_json::to_string(&info).map_err(|e| Error::BadValue {
            key: info.key(),
            message: e.to_string(),
        })?;
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (state_tx, state) = watch::channel(RegistrationState::default());
        let keeper = LeaseLoop {
            backoff: Backoff::new(config.initial_backoff, config.max_backoff),
            config,
            ttl_secs,
            key: info.key(),
            value,
            state: state_tx,
            client: None,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Thread(format!("cannot build the keepalive runtime: {e}")))?;
        thread::Builder::new()
            .name("allam-etcd-lease".into())
            .spawn(move || runtime.block_on(keeper.run(command_rx)))
            .map_err(|e| Error::Thread(format!("cannot spawn the keepalive thread: {e}")))?;
        Ok(Registration {
            commands,
            state,
            info,
        })
    }

    pub fn info(&self) -> &WorkerGroupInfo {
        &self.info
    }

    /// Current state; `changed()` on the receiver wakes on every transition.
    pub fn state(&self) -> watch::Receiver<RegistrationState> {
        self.state.clone()
    }

    pub fn is_registered(&self) -> bool {
        self.state.borrow().registered
    }

    /// Waits until the key is registered, or `timeout` passes.
    pub async fn wait_registered(&self, timeout: Duration) -> Result<(), Error> {
        let mut state = self.state.clone();
        let waited = tokio::time::timeout(timeout, state.wait_for(|s| s.registered)).await;
        match waited.map(|r| r.map(|_| ())) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Error::Thread("the keepalive thread has stopped".into())),
            Err(_) => Err(Error::NotRegistered {
                waited_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                last_error: self
                    .state
                    .borrow()
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "none".into()),
            }),
        }
    }

    /// Revokes the lease, so routers drop this group at once, and stops the thread. The first
    /// step of a graceful shutdown. If etcd is unreachable, returns the error after the
    /// request timeout; the key then disappears when the lease expires.
    pub async fn deregister(self) -> Result<(), Error> {
        let (reply, reply_rx) = oneshot::channel();
        self.commands
            .send(Command::Deregister(reply))
            .map_err(|_| Error::Thread("the keepalive thread has stopped".into()))?;
        reply_rx
            .await
            .map_err(|_| Error::Thread("the keepalive thread exited without replying".into()))?
    }

    /// Stops renewing without revoking, as if the process had died: the key stays until the
    /// lease expires. For failure drills and tests.
    pub fn abandon(self) {
        // An Err means the thread is already gone, which is what we want.
        let _ = self.commands.send(Command::Abandon);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // After `deregister`/`abandon` the thread has gone and this send fails harmlessly.
        let (reply, _) = oneshot::channel();
        let _ = self.commands.send(Command::Deregister(reply));
    }
}

/// An alive lease and its keepalive stream (reopened when etcd drops it).
struct Lease {
    id: i64,
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    /// Conservative expiry: send time of the last acknowledged renewal + TTL.
    expires_at: Instant,
    next_renewal: Instant,
}

/// Renew when a third of the TTL has passed since the last acknowledged send: two more tries
/// fit before expiry even if one is lost.
fn renewal_time(expires_at: Instant, ttl: Duration) -> Instant {
    expires_at - ttl * 2 / 3
}

/// After a failed renewal: a backoff step, but no later than halfway to expiry (so several
/// tries fit), and no sooner than 50 ms (no spinning right before expiry).
fn retry_delay(backoff: Duration, until_expiry: Duration) -> Duration {
    backoff.min(until_expiry / 2).max(Duration::from_millis(50))
}

enum Step {
    Continue,
    Exit,
}

struct LeaseLoop {
    config: RegistrationConfig,
    ttl_secs: i64,
    key: String,
    value: String,
    state: watch::Sender<RegistrationState>,
    backoff: Backoff,
    client: Option<Client>,
}

impl LeaseLoop {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut lease: Option<Lease> = None;
        loop {
            let step = match lease.take() {
                None => match self.register().await {
                    Ok(new_lease) => {
                        self.backoff.reset();
                        lease = Some(new_lease);
                        Step::Continue
                    }
                    Err(e) => {
                        self.note_error(&e);
                        let delay = self.backoff.next_delay();
                        tracing::warn!(key = %self.key, error = %e, retry_in_ms = delay.as_millis() as u64, "etcd registration failed");
                        self.sleep_or_command_until(Instant::now() + delay, None, &mut commands)
                            .await
                    }
                },
                Some(mut current) => {
                    let step = self
                        .sleep_or_command_until(
                            current.next_renewal,
                            Some(current.id),
                            &mut commands,
                        )
                        .await;
                    if let Step::Continue = step {
                        if self.renew(&mut current).await {
                            lease = Some(current);
                        }
                    }
                    step
                }
            };
            if let Step::Exit = step {
                return;
            }
        }
    }

    /// Grants a lease, writes the key under it and opens the keepalive stream.
    async fn register(&mut self) -> Result<Lease, Error> {
        let mut client = self.client().await?;
        let sent_at = Instant::now();
        let grant = self
            .config
            .etcd
            .call("lease_grant", client.lease_grant(self.ttl_secs, None))
            .await?;
        let id = grant.id();
        let granted = Duration::from_secs(grant.ttl().unsigned_abs());
        let put_op = format!("put {}", self.key);
        self.config
            .etcd
            .call(
                &put_op,
                client.put(
                    self.key.clone(),
                    self.value.clone(),
                    Some(PutOptions::new().with_lease(id)),
                ),
            )
            .await?;
        // The stream is opened lazily at the first renewal; the grant itself counts as one.
        self.state.send_modify(|s| {
            s.registered = true;
            s.lease_id = Some(id);
            s.n_registrations += 1;
            s.last_error = None;
        });
        tracing::info!(key = %self.key, lease_id = id, ttl_s = granted.as_secs(), "registered in etcd");
        let expires_at = sent_at + granted;
        Ok(Lease {
            id,
            stream: None,
            expires_at,
            next_renewal: renewal_time(expires_at, granted),
        })
    }

    /// One renewal. Returns false when the lease is gone and the key must be registered anew.
    async fn renew(&mut self, lease: &mut Lease) -> bool {
        let sent_at = Instant::now();
        match self.keep_alive_once(lease).await {
            Ok(ttl_secs) if ttl_secs > 0 => {
                let ttl = Duration::from_secs(ttl_secs.unsigned_abs());
                lease.expires_at = sent_at + ttl;
                lease.next_renewal = renewal_time(lease.expires_at, ttl);
                self.backoff.reset();
                return true;
            }
            Ok(_) => {
                tracing::warn!(key = %self.key, lease_id = lease.id, "etcd lease expired; registering again");
                self.mark_lost("lease expired".into());
                return false;
            }
            Err(e) => {
                lease.stream = None;
                self.note_error(&e);
                tracing::warn!(key = %self.key, lease_id = lease.id, error = %e, "etcd keepalive failed");
            }
        }
        // The renewal failed without a verdict (etcd down, stream reset). Ask etcd whether the
        // lease still exists; if it cannot say, keep trying until our conservative expiry.
        if let Ok(remaining) = self.time_to_live(lease.id).await {
            if remaining <= 0 {
                self.mark_lost("lease not found".into());
                return false;
            }
        }
        let now = Instant::now();
        if now >= lease.expires_at {
            self.mark_lost("lease expired while etcd was unreachable".into());
            return false;
        }
        lease.next_renewal = now + retry_delay(self.backoff.next_delay(), lease.expires_at - now);
        true
    }

    async fn keep_alive_once(&mut self, lease: &mut Lease) -> Result<i64, Error> {
        let mut client = self.client().await?;
        if lease.stream.is_none() {
            let (keeper, stream) = self
                .config
                .etcd
                .call("lease_keep_alive", client.lease_keep_alive(lease.id))
                .await?;
            lease.stream = Some((keeper, stream));
            // Opening the stream sends a renewal and waits for its (positive) reply.
            return Ok(self.ttl_secs);
        }
        let Some((keeper, stream)) = lease.stream.as_mut() else {
            return Err(Error::Thread("keepalive stream vanished".into()));
        };
        let etcd = &self.config.etcd;
        etcd.call("lease_keep_alive", keeper.keep_alive()).await?;
        match etcd.call("lease_keep_alive", stream.message()).await? {
            Some(reply) => Ok(reply.ttl()),
            None => Err(Error::Thread("etcd closed the keepalive stream".into())),
        }
    }

    async fn time_to_live(&mut self, id: i64) -> Result<i64, Error> {
        let mut client = self.client().await?;
        let reply = self
            .config
            .etcd
            .call("lease_time_to_live", client.lease_time_to_live(id, None))
            .await?;
        Ok(reply.ttl())
    }

    async fn revoke(&mut self, id: i64) -> Result<(), Error> {
        let mut client = self.client().await?;
        self.config
            .etcd
            .call("lease_revoke", client.lease_revoke(id))
            .await?;
        self.state.send_modify(|s| {
            s.registered = false;
            s.lease_id = None;
        });
        tracing::info!(key = %self.key, lease_id = id, "deregistered from etcd");
        Ok(())
    }

    /// The etcd client, connecting on first use. Clones share one channel, which reconnects
    /// by itself after etcd restarts.
    async fn client(&mut self) -> Result<Client, Error> {
        if let Some(client) = &self.client {
            return Ok(client.clone());
        }
        let client = self.config.etcd.connect().await?;
        self.client = Some(client.clone());
        Ok(client)
    }

    fn mark_lost(&mut self, why: String) {
        self.state.send_modify(|s| {
            s.registered = false;
            s.lease_id = None;
            s.last_error = Some(why);
        });
    }

    fn note_error(&mut self, e: &Error) {
        self.state
            .send_modify(|s| s.last_error = Some(e.to_string()));
    }

    /// Sleeps until `until` unless a command arrives first; handles the command.
    async fn sleep_or_command_until(
        &mut self,
        until: Instant,
        lease_id: Option<i64>,
        commands: &mut mpsc::UnboundedReceiver<Command>,
    ) -> Step {
        tokio::select! {
            () = tokio::time::sleep_until(until) => Step::Continue,
            command = commands.recv() => {
                match command {
                    Some(Command::Deregister(reply)) => {
                        let result = match lease_id {
                            Some(id) => self.revoke(id).await,
                            None => Ok(()),
                        };
                        // The caller may have stopped waiting (Drop); nothing to do then.
                        let _ = reply.send(result);
                    }
                    Some(Command::Abandon) => {
                        tracing::warn!(key = %self.key, "keepalive abandoned; the key lives until its lease expires");
                    }
                    // Every handle is gone without a command: treat as drop.
                    None => {
                        if let Some(id) = lease_id {
                            let _ = self.revoke(id).await;
                        }
                    }
                }
                Step::Exit
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_a_third_of_the_ttl_after_the_send() {
        let ttl = Duration::from_secs(9);
        let sent = Instant::now();
        assert_eq!(renewal_time(sent + ttl, ttl), sent + Duration::from_secs(3));
    }

    #[test]
    fn retries_fit_before_expiry() {
        let backoff = Duration::from_secs(3);
        assert_eq!(
            retry_delay(backoff, Duration::from_secs(2)),
            Duration::from_secs(1)
        );
        assert_eq!(
            retry_delay(Duration::from_millis(200), Duration::from_secs(2)),
            Duration::from_millis(200)
        );
        assert_eq!(
            retry_delay(backoff, Duration::from_millis(10)),
            Duration::from_millis(50)
        );
    }

    #[test]
    fn ttl_bounds_are_checked_and_rounded_up() {
        let mut config =
            RegistrationConfig::new(EtcdConfig::new(vec!["http://127.0.0.1:1".into()]));
        assert_eq!(config.ttl_secs().expect("default is valid"), 10);
        config.ttl = Duration::from_millis(2500);
        assert_eq!(config.ttl_secs().expect("2.5 s rounds up"), 3);
        config.ttl = Duration::from_secs(1);
        let err = config.ttl_secs().expect_err("1 s is below etcd's minimum");
        assert!(err.to_string().contains("`ttl`"), "{err}");
    }
}
