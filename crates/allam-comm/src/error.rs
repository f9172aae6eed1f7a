//! The communication crate's one error type. Every variant that concerns a peer names its
//! rank, so "the group failed" always says which member to look at.

use std::time::Duration;

/// A collective, the control channel or the rendezvous failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A peer did not answer within the timeout (it is hung, overloaded or gone without
    /// closing its socket).
    #[error("{op}: rank {rank} did not respond within {timeout_ms} ms")]
    Timeout {
        op: &'static str,
        rank: usize,
        timeout_ms: u64,
    },
    /// A peer closed its connection (its process ended, or it gave up on a failed group).
    #[error("{op}: rank {rank} closed its connection (it exited, was killed, or gave up on a failed group)")]
    PeerClosed { op: &'static str, rank: usize },
    /// Reading from or writing to a peer failed for another reason.
    #[error("{op}: I/O with rank {rank}: {source}")]
    PeerIo {
        op: &'static str,
        rank: usize,
        #[source]
        source: std::io::Error,
    },
    /// A peer sent something other than what this collective expects: the ranks called
    /// different collectives, or with different sizes.
    #[error("{op}: rank {rank} is out of step: {detail}")]
    Protocol {
        op: &'static str,
        rank: usize,
        detail: String,
    },
    /// The arguments of a call are unusable (e.g. a broadcast root outside the group).
    #[error("{op}: {detail}")]
    InvalidArgument { op: &'static str, detail: String },
    /// An earlier failure left the group's streams out of step; every later call fails fast.
    #[error("{op}: the group is broken since an earlier failure: {first_failure}")]
    Broken {
        op: &'static str,
        first_failure: String,
    },
    /// Binding rank 0's rendezvous address failed.
    #[error("binding the rendezvous address {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The group did not assemble in time, or a member was refused.
    #[error("rendezvous of group `{group}`: {detail}")]
    Rendezvous { group: String, detail: String },
    /// The waiting budget of the rendezvous ran out.
    #[error("rendezvous of group `{group}` timed out after {waited:?}: {detail}")]
    RendezvousTimeout {
        group: String,
        waited: Duration,
        detail: String,
    },
}

impl Error {
    /// A short stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Timeout { .. } => "peer_timeout",
            Error::PeerClosed { .. } => "peer_closed",
            Error::PeerIo { .. } => "peer_io",
            Error::Protocol { .. } => "protocol",
            Error::InvalidArgument { .. } => "invalid_argument",
            Error::Broken { .. } => "group_broken",
            Error::Bind { .. } => "bind",
            Error::Rendezvous { .. } => "rendezvous",
            Error::RendezvousTimeout { .. } => "rendezvous_timeout",
        }
    }

    /// The peer this error blames, when it blames one.
    pub fn rank(&self) -> Option<usize> {
        match self {
            Error::Timeout { rank, .. }
            | Error::PeerClosed { rank, .. }
            | Error::PeerIo { rank, .. }
            | Error::Protocol { rank, .. } => Some(*rank),
            _ => None,
        }
    }
}
