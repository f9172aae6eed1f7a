//! `TcpCommunicator`: the CPU implementation of [`Communicator`] for ranks in separate
//! processes, as a star over loopback (or any) TCP: rank 0 holds one connection per
//! follower; a follower holds one connection, to rank 0.
//!
//! Every collective is "followers send to rank 0, rank 0 combines in rank order and sends the
//! result back". Rank 0 reads all contributions before it writes any result, and followers
//! write before they read, so there is no wait cycle whatever the payload size. The star
//! costs rank 0 `2 (N - 1)` transfers per collective: fine for the small groups and small
//! activations of CPU serving, and the sums are the same bits on every rank by construction.
//!
//! Invariant: once any call fails, the streams may sit mid-frame, so the communicator is
//! broken for good ([`Error::Broken`]) and closes its connections at once: peers blocked in
//! the same collective see [`Error::PeerClosed`] immediately instead of waiting out their
//! timeouts, and the failure spreads through the group. The group must be rebuilt.

#[cfg(test)]
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use half::bf16;

use crate::wire::{OpCode, Peer};
use crate::{Communicator, Error};

struct Inner {
    /// Rank 0: followers 1..N in rank order. A follower: rank 0 alone.
    peers: Vec<Peer>,
    /// Collectives completed so far (frames carry it to catch ranks out of step).
    seq: u64,
    broken: Option<String>,
}

/// One rank's end of a TCP star (built by [`crate::Rendezvous::accept`] or [`crate::join`]).
pub struct TcpCommunicator {
    rank: usize,
    world_size: usize,
    timeout: Duration,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for TcpCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TcpCommunicator(rank {} of {}, timeout {:?})",
            self.rank, self.world_size, self.timeout
        )
    }
}

impl TcpCommunicator {
    pub(crate) fn new(
        rank: usize,
        world_size: usize,
        timeout: Duration,
        peers: Vec<Peer>,
    ) -> TcpCommunicator {
        TcpCommunicator {
            rank,
            world_size,
            timeout,
            inner: Mutex::new(Inner {
                peers,
                seq: 0,
                broken: None,
            }),
        }
    }

    /// Runs one collective under the lock, with the deadline, poisoning on failure.
    fn run<T>(
        &self,
        code: OpCode,
        body: impl FnOnce(&mut Inner, &Ctx) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let op = code.name();
        let mut inner = match self.inner.lock() {
            Ok(inner) => inner,
            Err(_) => {
                return Err(Error::Broken {
                    op,
                    first_failure: "a thread panicked inside a collective".to_owned(),
                })
            }
        };
        if let Some(first_failure) = &inner.broken {
            return Err(Error::Broken {
                op,
                first_failure: first_failure.clone(),
            });
        }
        let ctx = Ctx {
            code,
            seq: inner.seq,
            deadline: Instant::now() + self.timeout,
            budget: self.timeout,
        };
        match body(&mut inner, &ctx) {
            Ok(value) => {
                inner.seq += 1;
                Ok(value)
            }
            Err(error) => {
                inner.broken = Some(error.to_string());
                for peer in &inner.peers {
                    peer.shutdown();
                }
                Err(error)
            }
        }
    }

    fn is_leader(&self) -> bool {
        self.rank == 0
    }
}

/// What every frame of one collective shares.
struct Ctx {
    code: OpCode,
    seq: u64,
    deadline: Instant,
    budget: Duration,
}

impl Ctx {
    fn send(&self, peer: &mut Peer, payload: &[u8]) -> Result<(), Error> {
        peer.send_frame(self.code, self.seq, payload, self.deadline, self.budget)
    }
    fn recv(&self, peer: &mut Peer, expected_len: Option<usize>) -> Result<Vec<u8>, Error> {
        peer.recv_frame(
            self.code,
            self.seq,
            expected_len,
            self.deadline,
            self.budget,
        )
    }
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn bf16_bytes(values: &[bf16]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Rank 0 side of a reduction: every follower's contribution, in rank order.
fn leader_collect(inner: &mut Inner, ctx: &Ctx, len: usize) -> Result<Vec<Vec<u8>>, Error> {
    inner
        .peers
        .iter_mut()
        .map(|peer| ctx.recv(peer, Some(len)))
        .collect()
}

/// Rank 0 side of a reduction: the result to every follower.
fn leader_send_all(inner: &mut Inner, ctx: &Ctx, result: &[u8]) -> Result<(), Error> {
    for peer in inner.peers.iter_mut() {
        ctx.send(peer, result)?;
    }
    Ok(())
}

/// A follower's side of a reduction: contribution up, result down.
fn follower_exchange(inner: &mut Inner, ctx: &Ctx, own: &[u8]) -> Result<Vec<u8>, Error> {
    let leader = &mut inner.peers[0];
    ctx.send(leader, own)?;
    ctx.recv(leader, Some(own.len()))
}

impl Communicator for TcpCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn check_healthy(&self) -> Result<(), Error> {
        match self.inner.lock() {
            Ok(inner) => match &inner.broken {
                None => Ok(()),
                Some(first_failure) => Err(Error::Broken {
                    op: "check_healthy",
                    first_failure: first_failure.clone(),
                }),
            },
            Err(_) => Err(Error::Broken {
                op: "check_healthy",
                first_failure: "a thread panicked inside a collective".to_owned(),
            }),
        }
    }

    fn all_reduce_sum_f32(&self, data: &mut [f32]) -> Result<(), Error> {
        if self.world_size == 1 {
            return Ok(());
        }
        let leader = self.is_leader();
        let result = self.run(OpCode::AllReduceF32, |inner, ctx| {
            let own = f32_bytes(data);
            if leader {
                let mut acc: Vec<f32> = data.to_vec();
                for part in leader_collect(inner, ctx, own.len())? {
                    for (a, c) in acc.iter_mut().zip(part.chunks_exact(4)) {
                        *a += f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    }
                }
                let result = f32_bytes(&acc);
                leader_send_all(inner, ctx, &result)?;
                Ok(result)
            } else {
                follower_exchange(inner, ctx, &own)
            }
        })?;
        for (d, c) in data.iter_mut().zip(result.chunks_exact(4)) {
            *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(())
    }

    fn all_reduce_sum_bf16(&self, data: &mut [bf16]) -> Result<(), Error> {
        if self.world_size == 1 {
            return Ok(());
        }
        let leader = self.is_leader();
        let result = self.run(OpCode::AllReduceBf16, |inner, ctx| {
            let own = bf16_bytes(data);
            if leader {
                let mut acc: Vec<f32> = data.iter().map(|v| v.to_f32()).collect();
                for part in leader_collect(inner, ctx, own.len())? {
                    for (a, c) in acc.iter_mut().zip(part.chunks_exact(2)) {
                        *a += bf16::from_le_bytes([c[0], c[1]]).to_f32();
                    }
                }
                let rounded: Vec<bf16> = acc.iter().map(|v| bf16::from_f32(*v)).collect();
                let result = bf16_bytes(&rounded);
                leader_send_all(inner, ctx, &result)?;
                Ok(result)
            } else {
                follower_exchange(inner, ctx, &own)
            }
        })?;
        for (d, c) in data.iter_mut().zip(result.chunks_exact(2)) {
            *d = bf16::from_le_bytes([c[0], c[1]]);
        }
        Ok(())
    }

    fn all_gather_bytes(&self, data: &[u8]) -> Result<Vec<Vec<u8>>, Error> {
        if self.world_size == 1 {
            return Ok(vec![data.to_vec()]);
        }
        let leader = self.is_leader();
        let world_size = self.world_size;
        self.run(OpCode::AllGather, |inner, ctx| {
            if leader {
                let mut parts = vec![data.to_vec()];
                for peer in inner.peers.iter_mut() {
                    parts.push(ctx.recv(peer, None)?);
                }
                let packed = pack_parts(&parts);
                for peer in inner.peers.iter_mut() {
                    ctx.send(peer, &packed)?;
                }
                Ok(parts)
            } else {
                let leader_peer = &mut inner.peers[0];
                ctx.send(leader_peer, data)?;
                let packed = ctx.recv(leader_peer, None)?;
                unpack_parts(&packed, world_size).ok_or_else(|| Error::Protocol {
                    op: ctx.code.name(),
                    rank: 0,
                    detail: format!(
                        "sent {} bytes that are not {world_size} length-prefixed parts",
                        packed.len()
                    ),
                })
            }
        })
    }

    fn broadcast_bytes(&self, root: usize, data: &mut Vec<u8>) -> Result<(), Error> {
        if root >= self.world_size {
            return Err(Error::InvalidArgument {
                op: "broadcast",
                detail: format!("root {root} outside a group of {}", self.world_size),
            });
        }
        if self.world_size == 1 {
            return Ok(());
        }
        let rank = self.rank;
        self.run(OpCode::Broadcast, |inner, ctx| {
            if rank == 0 {
                if root != 0 {
                    let from = inner
                        .peers
                        .iter_mut()
                        .find(|p| p.rank == root)
                        .expect("rank 0 holds a peer for every rank 1..world_size");
                    *data = ctx.recv(from, None)?;
                }
                for peer in inner.peers.iter_mut().filter(|p| p.rank != root) {
                    ctx.send(peer, data)?;
                }
            } else if rank == root {
                ctx.send(&mut inner.peers[0], data)?;
            } else {
                *data = ctx.recv(&mut inner.peers[0], None)?;
            }
            Ok(())
        })
    }
}

/// `[len u64][bytes]` per part, in rank order.
fn pack_parts(parts: &[Vec<u8>]) -> Vec<u8> {
    let total: usize = parts.iter().map(|p| 8 + p.len()).sum();
    let mut out = Vec::with_capacity(total);
    for part in parts {
        out.extend_from_slice(&(part.len() as u64).to_le_bytes());
        out.extend_from_slice(part);
    }
    out
}

fn unpack_parts(mut bytes: &[u8], count: usize) -> Option<Vec<Vec<u8>>> {
    let mut parts = Vec::with_capacity(count);
    for _ in 0..count {
        let (len, rest) = bytes.split_first_chunk::<8>()?;
        let len = usize::try_from(u64::from_le_bytes(*len)).ok()?;
        if rest.len() < len {
            return None;
        }
        let (part, rest) = rest.split_at(len);
        parts.push(part.to_vec());
        bytes = rest;
    }
    bytes.is_empty().then_some(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rendezvous::tests::{options, thread_group};

    /// Runs `body(rank, communicator)` on every rank of a fresh group of `n` (rank 0 on
    /// this thread) and returns the results by rank.
    fn on_every_rank<T: Send + 'static>(
        n: usize,
        timeout_ms: u64,
        body: impl Fn(usize, &dyn Communicator) -> T + Send + Sync + Clone + 'static,
    ) -> Vec<T> {
        let (leader, followers) = thread_group(n, options(timeout_ms));
        let handles: Vec<_> = followers
            .into_iter()
            .map(|f| {
                let body = body.clone();
                std::thread::spawn(move || body(f.communicator.rank(), f.communicator.as_ref()))
            })
            .collect();
        let mut out = vec![body(0, leader.communicator.as_ref())];
        out.extend(handles.into_iter().map(|h| h.join().expect("rank thread")));
        out
    }

    fn values(rank: usize, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| {
                ((rank * 7919 + i * 104_729) as f32 * 0.001).sin() * 10f32.powi(i as i32 % 5 - 2)
            })
            .collect()
    }

    #[test]
    fn all_reduce_f32_sums_in_rank_order_with_identical_bits_everywhere() {
        let n = 4;
        let len = 10_000;
        let results = on_every_rank(n, 5000, move |rank, comm| {
            let mut data = values(rank, len);
            comm.all_reduce_sum_f32(&mut data).expect("reduce");
            data
        });
        let mut want = values(0, len);
        for rank in 1..n {
            for (w, v) in want.iter_mut().zip(values(rank, len)) {
                *w += v;
            }
        }
        for (rank, got) in results.iter().enumerate() {
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "rank {rank} differs from the rank-order sum"
            );
        }
    }

    #[test]
    fn all_reduce_bf16_accumulates_in_f32_and_rounds_once() {
        let n = 3;
        let results = on_every_rank(n, 5000, move |rank, comm| {
            let mut data: Vec<bf16> = values(rank, 64)
                .iter()
                .map(|v| bf16::from_f32(*v))
                .collect();
            comm.all_reduce_sum_bf16(&mut data).expect("reduce");
            data
        });
        let want: Vec<bf16> = (0..64)
            .map(|i| {
                let sum: f32 = (0..n)
                    .map(|r| bf16::from_f32(values(r, 64)[i]).to_f32())
                    .sum();
                bf16::from_f32(sum)
            })
            .collect();
        for got in &results {
            assert_eq!(got, &want);
        }
    }

    #[test]
    fn all_gather_and_broadcast_carry_uneven_payloads() {
        let results = on_every_rank(3, 5000, |rank, comm| {
            let mine = vec![rank as u8; rank * 3];
            let gathered = comm.all_gather_bytes(&mine).expect("gather");
            let mut from_root_2 = if rank == 2 {
                b"hello from 2".to_vec()
            } else {
                Vec::new()
            };
            comm.broadcast_bytes(2, &mut from_root_2)
                .expect("broadcast 2");
            let mut from_root_0 = if rank == 0 { vec![9; 100_000] } else { vec![1] };
            comm.broadcast_bytes(0, &mut from_root_0)
                .expect("broadcast 0");
            let floats = comm
                .all_gather_f32(&[rank as f32 + 0.5])
                .expect("gather f32");
            (gathered, from_root_2, from_root_0, floats)
        });
        for (gathered, from_root_2, from_root_0, floats) in results {
            assert_eq!(gathered, vec![vec![], vec![1; 3], vec![2; 6]]);
            assert_eq!(from_root_2, b"hello from 2");
            assert_eq!(from_root_0, vec![9; 100_000]);
            assert_eq!(floats, vec![vec![0.5], vec![1.5], vec![2.5]]);
        }
    }

    #[test]
    fn a_silent_peer_is_a_timeout_naming_it_then_the_group_stays_broken() {
        let (leader, followers) = thread_group(3, options(300));
        let started = Instant::now();
        // Rank 1 takes part; rank 2 is alive but never calls.
        let rank1 = &followers[0].communicator;
        let comm1 = Arc::clone(rank1);
        let helper = std::thread::spawn(move || comm1.all_reduce_sum_f32(&mut [1.0]));
        let err = leader
            .communicator
            .all_reduce_sum_f32(&mut [1.0])
            .expect_err("rank 2 is silent");
        assert!(matches!(err, Error::Timeout { rank: 2, .. }), "{err:?}");
        assert!(err.to_string().contains("rank 2"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "bounded by the timeout"
        );
        let rank1_result = helper.join().expect("thread");
        assert!(rank1_result.is_err(), "rank 1 never gets a result");
        let again = leader
            .communicator
            .all_gather_bytes(&[])
            .expect_err("broken");
        assert!(matches!(again, Error::Broken { .. }), "{again:?}");
        assert!(leader.communicator.check_healthy().is_err());
        drop(followers);
    }

    #[test]
    fn a_closed_peer_is_reported_at_once_by_rank() {
        let (leader, mut followers) = thread_group(3, options(20_000));
        drop(followers.remove(1)); // rank 2 exits
        let started = Instant::now();
        let comm1 = Arc::clone(&followers[0].communicator);
        let helper = std::thread::spawn(move || comm1.all_reduce_sum_f32(&mut [1.0]));
        let err = leader
            .communicator
            .all_reduce_sum_f32(&mut [1.0])
            .expect_err("rank 2 is gone");
        assert!(matches!(err, Error::PeerClosed { rank: 2, .. }), "{err:?}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "seen without waiting for the 20 s timeout"
        );
        drop(leader);
        let err = helper.join().expect("thread").expect_err("leader gone");
        assert!(err.rank() == Some(0), "{err:?}");
    }

    #[test]
    fn ranks_in_different_collectives_are_out_of_step() {
        let (leader, followers) = thread_group(2, options(2000));
        let comm1 = Arc::clone(&followers[0].communicator);
        let helper = std::thread::spawn(move || comm1.all_gather_bytes(&[1, 2, 3]).map(|_| ()));
        let err = leader
            .communicator
            .all_reduce_sum_f32(&mut [1.0])
            .expect_err("mismatch");
        assert!(matches!(err, Error::Protocol { rank: 1, .. }), "{err:?}");
        drop(leader);
        assert!(helper.join().expect("thread").is_err());
    }

    #[test]
    fn packed_parts_round_trip_and_reject_garbage() {
        let parts = vec![vec![1u8, 2], vec![], vec![3]];
        let packed = pack_parts(&parts);
        assert_eq!(unpack_parts(&packed, 3), Some(parts));
        assert_eq!(unpack_parts(&packed, 2), None, "trailing part");
        assert_eq!(unpack_parts(&packed[..packed.len() - 1], 3), None);
    }
}
