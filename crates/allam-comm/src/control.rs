//! The control channel of a group: rank 0 sends each step's plan to the followers, and
//! followers answer the few messages that need an answer (start-up). A second TCP
//! connection per follower, apart from the collectives, so a follower can wait for the next
//! step as long as the leader stays idle while collectives keep their short timeouts.
//!
//! Frames are `[len u64 little-endian][payload]`; the payload format belongs to the caller
//! (`allam-worker`'s `tp` module). Leader death is seen by a waiting follower at once: the
//! kernel closes the socket and the read ends with [`Error::PeerClosed`] naming rank 0.

use std::time::{Duration, Instant};

use crate::wire::Peer;
use crate::Error;

/// Rank 0's end: one connection per follower, in rank order.
#[derive(Debug)]
pub struct LeaderControl {
    followers: Vec<Peer>,
    timeout: Duration,
    broken: Option<String>,
}

/// A follower's end: its connection to rank 0.
#[derive(Debug)]
pub struct FollowerControl {
    rank: usize,
    leader: Peer,
    timeout: Duration,
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + payload.len());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

impl LeaderControl {
    pub(crate) fn new(followers: Vec<Peer>, timeout: Duration) -> LeaderControl {
        LeaderControl {
            followers,
            timeout,
            broken: None,
        }
    }

    /// Followers reached by [`LeaderControl::send_all`] (world size - 1).
    pub fn num_followers(&self) -> usize {
        self.followers.len()
    }

    /// Sends `payload` to every follower, each write bounded by the timeout. A failure
    /// leaves a stream mid-frame, so the channel is broken from then on.
    pub fn send_all(&mut self, payload: &[u8]) -> Result<(), Error> {
        const OP: &str = "control send";
        if let Some(first_failure) = &self.broken {
            return Err(Error::Broken {
                op: OP,
                first_failure: first_failure.clone(),
            });
        }
        let bytes = frame(payload);
        let deadline = Instant::now() + self.timeout;
        let mut result = Ok(());
        for peer in self.followers.iter_mut() {
            result = peer.write_all(OP, &bytes, deadline, self.timeout);
            if result.is_err() {
                break;
            }
        }
        if let Err(error) = &result {
            self.close(error.to_string());
        }
        result
    }

    /// Breaks the channel for good and closes every follower's connection, so followers
    /// waiting for the next message stop at once (the group failed elsewhere, e.g. in a
    /// collective).
    pub fn close(&mut self, reason: String) {
        self.broken.get_or_insert(reason);
        for peer in &self.followers {
            peer.shutdown();
        }
    }

    /// Waits up to `timeout` for one message from follower `rank`.
    pub fn recv_from(&mut self, rank: usize, timeout: Duration) -> Result<Vec<u8>, Error> {
        const OP: &str = "control receive";
        if let Some(first_failure) = &self.broken {
            return Err(Error::Broken {
                op: OP,
                first_failure: first_failure.clone(),
            });
        }
        let peer = self
            .followers
            .iter_mut()
            .find(|p| p.rank == rank)
            .ok_or_else(|| Error::InvalidArgument {
                op: OP,
                detail: format!("rank {rank} is not a follower of this group"),
            })?;
        let deadline = Some((Instant::now() + timeout, timeout));
        let result = peer.read_len(OP, deadline).and_then(|len| {
            let mut payload = vec![0u8; len];
            peer.read_exact(OP, &mut payload, deadline)?;
            Ok(payload)
        });
        if let Err(error) = &result {
            self.close(error.to_string());
        }
        result
    }
}

impl FollowerControl {
    pub(crate) fn new(rank: usize, leader: Peer, timeout: Duration) -> FollowerControl {
        FollowerControl {
            rank,
            leader,
            timeout,
        }
    }

    /// This follower's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Waits, without a time limit, for the leader's next message. The leader's process
    /// ending is [`Error::PeerClosed`] for rank 0.
    pub fn recv(&mut self) -> Result<Vec<u8>, Error> {
        const OP: &str = "control receive";
        let len = self.leader.read_len(OP, None)?;
        let mut payload = vec![0u8; len];
        // The rest of a frame whose length arrived follows at once: bound it.
        let deadline = Some((Instant::now() + self.timeout, self.timeout));
        self.leader.read_exact(OP, &mut payload, deadline)?;
        Ok(payload)
    }

    /// Sends one message to the leader, bounded by the timeout.
    pub fn send(&mut self, payload: &[u8]) -> Result<(), Error> {
        let deadline = Instant::now() + self.timeout;
        self.leader
            .write_all("control send", &frame(payload), deadline, self.timeout)
    }
}
