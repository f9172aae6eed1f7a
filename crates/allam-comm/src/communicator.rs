//! The `Communicator` trait: the collectives a tensor-parallel group needs, over host memory.
//!
//! Contract of every implementation:
//! - every rank of the group makes the same calls in the same order (same op, same length);
//! - every call is bounded by the communicator's timeout: a dead or hung peer is a typed
//!   [`Error`] naming its rank, never a hang;
//! - results are identical on every rank and do not depend on timing: sums are taken in rank
//!   order `((x_0 + x_1) + x_2) + ...`, so a rerun gives the same bits;
//! - after any failure the group's streams may be out of step, so the communicator stays
//!   broken: every later call fails fast with [`Error::Broken`].

use std::fmt;
use std::time::Duration;

use half::bf16;

use crate::Error;

/// Collectives over the ranks of one group.
pub trait Communicator: Send + Sync + fmt::Debug {
    /// This process's rank, `0..world_size`.
    fn rank(&self) -> usize;

    /// Ranks in the group (1 = no parallelism).
    fn world_size(&self) -> usize;

    /// The bound on each call.
    fn timeout(&self) -> Duration;

    /// `Ok` while the group is usable; the first failure otherwise.
    fn check_healthy(&self) -> Result<(), Error>;

    /// Sums `data` elementwise over all ranks, in place, in rank order.
    fn all_reduce_sum_f32(&self, data: &mut [f32]) -> Result<(), Error>;

    /// Sums bf16 `data` elementwise over all ranks, in place: accumulated in f32 in rank
    /// order, rounded to bf16 once.
    fn all_reduce_sum_bf16(&self, data: &mut [bf16]) -> Result<(), Error>;

    /// Every rank's `data` (lengths may differ), indexed by rank.
    fn all_gather_bytes(&self, data: &[u8]) -> Result<Vec<Vec<u8>>, Error>;

    /// Replaces `data` on every rank with `root`'s `data`.
    fn broadcast_bytes(&self, root: usize, data: &mut Vec<u8>) -> Result<(), Error>;

    /// Every rank's f32 `data`, indexed by rank.
    fn all_gather_f32(&self, data: &[f32]) -> Result<Vec<Vec<f32>>, Error> {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        let gathered = self.all_gather_bytes(&bytes)?;
        gathered
            .into_iter()
            .enumerate()
            .map(|(rank, part)| {
                if part.len() % 4 != 0 {
                    return Err(Error::Protocol {
                        op: "all_gather_f32",
                        rank,
                        detail: format!("sent {} bytes, not whole f32 values", part.len()),
                    });
                }
                Ok(part
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect())
            })
            .collect()
    }
}

/// The group of one: every collective is the identity. Lets TP-aware code run unchanged at
/// world size 1.
#[derive(Debug, Clone, Default)]
pub struct SoloCommunicator {
    timeout: Duration,
}

impl SoloCommunicator {
    pub fn new() -> SoloCommunicator {
        SoloCommunicator {
            timeout: Duration::from_secs(60),
        }
    }
}

impl Communicator for SoloCommunicator {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }
    fn check_healthy(&self) -> Result<(), Error> {
        Ok(())
    }
    fn all_reduce_sum_f32(&self, _data: &mut [f32]) -> Result<(), Error> {
        Ok(())
    }
    fn all_reduce_sum_bf16(&self, _data: &mut [bf16]) -> Result<(), Error> {
        Ok(())
    }
    fn all_gather_bytes(&self, data: &[u8]) -> Result<Vec<Vec<u8>>, Error> {
        Ok(vec![data.to_vec()])
    }
    fn broadcast_bytes(&self, root: usize, _data: &mut Vec<u8>) -> Result<(), Error> {
        if root == 0 {
            Ok(())
        } else {
            Err(Error::InvalidArgument {
                op: "broadcast",
                detail: format!("root {root} outside a group of 1"),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solo_collectives_are_identities() {
        let comm = SoloCommunicator::new();
        let mut data = vec![1.5f32, -2.0];
        comm.all_reduce_sum_f32(&mut data).expect("reduce");
        assert_eq!(data, [1.5, -2.0]);
        let gathered = comm.all_gather_f32(&[3.0, 4.0]).expect("gather");
        assert_eq!(gathered, vec![vec![3.0, 4.0]]);
        let mut bytes = vec![7u8];
        comm.broadcast_bytes(0, &mut bytes).expect("broadcast");
        assert_eq!(bytes, [7]);
        let err = comm
            .broadcast_bytes(1, &mut bytes)
            .expect_err("root 1 of 1");
        assert!(err.to_string().contains("root 1"), "{err}");
    }
}
