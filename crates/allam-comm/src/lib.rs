//! Collectives for tensor-parallel worker groups.
//!
//! [`Communicator`] is the trait the CPU backend (and anything else that combines partial
//! results across ranks) is written against: all-reduce sum (f32, bf16), all-gather and
//! broadcast, each bounded by a timeout. [`TcpCommunicator`] implements it for ranks in
//! separate processes, over a TCP star rooted at rank 0; [`SoloCommunicator`] is the group of
//! one. A group is assembled by [`Rendezvous`] (rank 0, given its address explicitly) and
//! [`join`] (ranks 1..N), which also open the group's control channel
//! ([`LeaderControl`] / [`FollowerControl`]) used to broadcast step plans.
//!
//! Invariants: a dead or hung peer is an [`Error`] naming its rank within the timeout, never a
//! hang; results are identical on every rank and independent of timing; a failed group stays
//! failed.

mod communicator;
mod control;
mod error;
mod rendezvous;
mod tcp;
mod wire;

pub use communicator::{Communicator, SoloCommunicator};
pub use control::{FollowerControl, LeaderControl};
pub use error::Error;
pub use rendezvous::{
    join, FollowerGroup, GroupOptions, LeaderGroup, Rendezvous, MAX_GROUP_NAME_BYTES,
};
pub use tcp::TcpCommunicator;
