//! Assembling a TCP group from an explicit rank-0 address (`--peers`): rank 0 binds and
//! accepts, every other rank connects twice (collectives, then control) and introduces
//! itself with its group name, rank and world size.
//!
//! Invariants: a group is returned only once every rank `1..world_size` has both connections
//! up; a connection that names another group is refused and waiting goes on (a stale process
//! from an earlier run must not join), while a member of this group with a wrong world size,
//! a rank outside the group or a duplicate rank fails the rendezvous at once with a message
//! naming it. Waiting is bounded by `rendezvous_timeout` on both sides.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::control::{FollowerControl, LeaderControl};
use crate::tcp::TcpCommunicator;
use crate::wire::Peer;
use crate::Error;

const MAGIC: &[u8; 8] = b"ALLAMTP\x01";
/// Longest group name (it travels in a u16-prefixed hello).
pub const MAX_GROUP_NAME_BYTES: usize = 256;
/// How long an accepted connection may take to introduce itself.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between connection attempts while rank 0 is not listening yet.
const CONNECT_RETRY: Duration = Duration::from_millis(50);

/// Timeouts of a TCP group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupOptions {
    /// Bound on every collective and control message.
    pub collective_timeout: Duration,
    /// Bound on assembling the group, and on start-up exchanges that wait for peers to load
    /// their weights.
    pub rendezvous_timeout: Duration,
}

impl Default for GroupOptions {
    fn default() -> Self {
        GroupOptions {
            collective_timeout: Duration::from_secs(60),
            rendezvous_timeout: Duration::from_secs(600),
        }
    }
}

/// Which of a follower's two connections a hello opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Channel {
    Collectives = 0,
    Control = 1,
}

/// Rank 0's side of a group: the communicator and the control channel.
#[derive(Debug)]
pub struct LeaderGroup {
    pub communicator: Arc<TcpCommunicator>,
    pub control: LeaderControl,
    pub options: GroupOptions,
}

/// A follower's side of a group.
#[derive(Debug)]
pub struct FollowerGroup {
    pub communicator: Arc<TcpCommunicator>,
    pub control: FollowerControl,
    pub options: GroupOptions,
}

/// Rank 0's listening socket, bound before followers are started so they can be told the
/// real port (bind `127.0.0.1:0` for a free one).
#[derive(Debug)]
pub struct Rendezvous {
    listener: TcpListener,
    group: String,
    world_size: usize,
    options: GroupOptions,
}

fn check_group(group: &str, world_size: usize, op: &'static str) -> Result<(), Error> {
    if world_size == 0 {
        return Err(Error::InvalidArgument {
            op,
            detail: "world size must be at least 1".to_owned(),
        });
    }
    if group.len() > MAX_GROUP_NAME_BYTES {
        return Err(Error::InvalidArgument {
            op,
            detail: format!(
                "group name of {} bytes; at most {MAX_GROUP_NAME_BYTES}",
                group.len()
            ),
        });
    }
    Ok(())
}

impl Rendezvous {
    /// Binds `addr` (e.g. `127.0.0.1:0`) for group `group` of `world_size` ranks.
    pub fn bind(
        addr: &str,
        group: &str,
        world_size: usize,
        options: GroupOptions,
    ) -> Result<Rendezvous, Error> {
        check_group(group, world_size, "rendezvous bind")?;
        let bind_err = |source| Error::Bind {
            addr: addr.to_owned(),
            source,
        };
        let listener = TcpListener::bind(addr).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(Rendezvous {
            listener,
            group: group.to_owned(),
            world_size,
            options,
        })
    }

    /// The bound address: what followers pass to [`join`].
    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.listener.local_addr().map_err(|source| Error::Bind {
            addr: "<bound listener>".to_owned(),
            source,
        })
    }

    /// Waits until every rank `1..world_size` has both connections up.
    pub fn accept(self) -> Result<LeaderGroup, Error> {
        let started = Instant::now();
        let deadline = started + self.options.rendezvous_timeout;
        let n = self.world_size;
        let mut collectives: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
        let mut control: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
        let mut refused: Vec<String> = Vec::new();
        let missing = |c: &[Option<TcpStream>], k: &[Option<TcpStream>]| -> Vec<usize> {
            (1..n)
                .filter(|r| c[*r].is_none() || k[*r].is_none())
                .collect()
        };
        while !missing(&collectives, &control).is_empty() {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                let mut detail = format!(
                    "ranks {:?} of {n} did not connect",
                    missing(&collectives, &control)
                );
                if !refused.is_empty() {
                    detail.push_str(&format!("; refused: {}", refused.join("; ")));
                }
                return Err(Error::RendezvousTimeout {
                    group: self.group.clone(),
                    waited: started.elapsed(),
                    detail,
                });
            };
            if !wait_readable(&self.listener, left) {
                continue;
            }
            let (mut stream, from) = match self.listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                    continue
                }
                Err(e) => {
                    return Err(Error::Rendezvous {
                        group: self.group.clone(),
                        detail: format!("accepting a connection: {e}"),
                    })
                }
            };
            if stream.set_nonblocking(false).is_err() {
                continue;
            }
            let hello = match read_hello(&mut stream) {
                Ok(hello) => hello,
                Err(detail) => {
                    refused.push(format!("{from}: {detail}"));
                    continue;
                }
            };
            if hello.group != self.group {
                let why = format!(
                    "{from} asked for group `{}`, this is group `{}`",
                    hello.group, self.group
                );
                let _ = reply(&mut stream, Err(&why));
                refused.push(why);
                continue;
            }
            let slot = match hello.channel {
                Channel::Collectives => &mut collectives,
                Channel::Control => &mut control,
            };
            let fatal = if hello.world_size != n {
                Some(format!(
                    "rank {} from {from} says the world size is {}, rank 0 says {n}",
                    hello.rank, hello.world_size
                ))
            } else if hello.rank == 0 || hello.rank >= n {
                Some(format!("{from} claims rank {}, outside 1..{n}", hello.rank))
            } else if slot[hello.rank].is_some() {
                Some(format!(
                    "rank {} connected twice (second time from {from})",
                    hello.rank
                ))
            } else {
                None
            };
            if let Some(detail) = fatal {
                let _ = reply(&mut stream, Err(&detail));
                return Err(Error::Rendezvous {
                    group: self.group.clone(),
                    detail,
                });
            }
            if reply(&mut stream, Ok(())).is_ok() {
                slot[hello.rank] = Some(stream);
            }
        }
        let timeout = self.options.collective_timeout;
        let peers = |streams: Vec<Option<TcpStream>>| -> Vec<Peer> {
            streams
                .into_iter()
                .enumerate()
                .filter_map(|(rank, s)| s.map(|s| Peer::new(rank, s)))
                .collect()
        };
        Ok(LeaderGroup {
            communicator: Arc::new(TcpCommunicator::new(0, n, timeout, peers(collectives))),
            control: LeaderControl::new(peers(control), timeout),
            options: self.options,
        })
    }
}

/// Joins group `group` as `rank` (1..world_size) through rank 0 at `leader_addr`, retrying
/// while rank 0 is not listening yet, for up to `rendezvous_timeout`.
pub fn join(
    leader_addr: &str,
    group: &str,
    rank: usize,
    world_size: usize,
    options: GroupOptions,
) -> Result<FollowerGroup, Error> {
    check_group(group, world_size, "rendezvous join")?;
    if rank == 0 || rank >= world_size {
        return Err(Error::InvalidArgument {
            op: "rendezvous join",
            detail: format!(
                "rank {rank} cannot join a group of {world_size}: rank 0 binds with `Rendezvous::bind`, followers are 1..{world_size}"
            ),
        });
    }
    let started = Instant::now();
    let deadline = started + options.rendezvous_timeout;
    let open = |channel: Channel| -> Result<TcpStream, Error> {
        let mut stream = connect_retrying(leader_addr, group, started, deadline)?;
        write_hello(&mut stream, channel, rank, world_size, group).map_err(|e| {
            Error::Rendezvous {
                group: group.to_owned(),
                detail: format!("introducing rank {rank} to rank 0 at {leader_addr}: {e}"),
            }
        })?;
        match read_reply(&mut stream) {
            Ok(None) => Ok(stream),
            Ok(Some(why)) => Err(Error::Rendezvous {
                group: group.to_owned(),
                detail: format!("rank 0 at {leader_addr} refused rank {rank}: {why}"),
            }),
            Err(e) => Err(Error::Rendezvous {
                group: group.to_owned(),
                detail: format!("waiting for rank 0 at {leader_addr} to accept rank {rank}: {e}"),
            }),
        }
    };
    let collectives = open(Channel::Collectives)?;
    let control = open(Channel::Control)?;
    let timeout = options.collective_timeout;
    Ok(FollowerGroup {
        communicator: Arc::new(TcpCommunicator::new(
            rank,
            world_size,
            timeout,
            vec![Peer::new(0, collectives)],
        )),
        control: FollowerControl::new(rank, Peer::new(0, control), timeout),
        options,
    })
}

fn connect_retrying(
    leader_addr: &str,
    group: &str,
    started: Instant,
    deadline: Instant,
) -> Result<TcpStream, Error> {
    let mut last_error = String::from("no attempt");
    loop {
        let left = deadline.checked_duration_since(Instant::now());
        let Some(left) = left.filter(|d| !d.is_zero()) else {
            return Err(Error::RendezvousTimeout {
                group: group.to_owned(),
                waited: started.elapsed(),
                detail: format!("rank 0 at {leader_addr} unreachable: {last_error}"),
            });
        };
        let addrs: Vec<SocketAddr> = match leader_addr.to_socket_addrs() {
            Ok(addrs) => addrs.collect(),
            Err(e) => {
                return Err(Error::InvalidArgument {
                    op: "rendezvous join",
                    detail: format!("rank 0 address `{leader_addr}`: {e}"),
                })
            }
        };
        for addr in &addrs {
            match TcpStream::connect_timeout(addr, left.min(Duration::from_secs(5))) {
                Ok(stream) => return Ok(stream),
                Err(e) => last_error = e.to_string(),
            }
        }
        // Rank 0 may still be starting; retrying is the rendezvous, not a race.
        std::thread::sleep(CONNECT_RETRY.min(left));
    }
}

struct Hello {
    channel: Channel,
    rank: usize,
    world_size: usize,
    group: String,
}

fn write_hello(
    stream: &mut TcpStream,
    channel: Channel,
    rank: usize,
    world_size: usize,
    group: &str,
) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(19 + group.len());
    bytes.extend_from_slice(MAGIC);
    bytes.push(channel as u8);
    bytes.extend_from_slice(&(rank as u32).to_le_bytes());
    bytes.extend_from_slice(&(world_size as u32).to_le_bytes());
    bytes.extend_from_slice(&(group.len() as u16).to_le_bytes());
    bytes.extend_from_slice(group.as_bytes());
    stream.set_write_timeout(Some(HELLO_TIMEOUT))?;
    stream.write_all(&bytes)
}

fn read_hello(stream: &mut TcpStream) -> Result<Hello, String> {
    stream
        .set_read_timeout(Some(HELLO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut fixed = [0u8; 19];
    stream
        .read_exact(&mut fixed)
        .map_err(|e| format!("no hello: {e}"))?;
    if &fixed[..8] != MAGIC {
        return Err("not an allam group member (bad magic)".to_owned());
    }
    let channel = match fixed[8] {
        0 => Channel::Collectives,
        1 => Channel::Control,
        other => return Err(format!("unknown channel {other}")),
    };
    let word =
        |at: usize| u32::from_le_bytes([fixed[at], fixed[at + 1], fixed[at + 2], fixed[at + 3]]);
    let (rank, world_size) = (word(9) as usize, word(13) as usize);
    let name_len = u16::from_le_bytes([fixed[17], fixed[18]]) as usize;
    if name_len > MAX_GROUP_NAME_BYTES {
        return Err(format!("group name of {name_len} bytes"));
    }
    let mut name = vec![0u8; name_len];
    stream
        .read_exact(&mut name)
        .map_err(|e| format!("truncated hello: {e}"))?;
    let group = String::from_utf8(name).map_err(|_| "group name is not UTF-8".to_owned())?;
    Ok(Hello {
        channel,
        rank,
        world_size,
        group,
    })
}

fn reply(stream: &mut TcpStream, outcome: Result<(), &str>) -> std::io::Result<()> {
    let mut bytes = Vec::new();
    match outcome {
        Ok(()) => bytes.extend_from_slice(&[0, 0, 0]),
        Err(why) => {
            let why = &why.as_bytes()[..why.len().min(u16::MAX as usize)];
            bytes.push(1);
            bytes.extend_from_slice(&(why.len() as u16).to_le_bytes());
            bytes.extend_from_slice(why);
        }
    }
    stream.set_write_timeout(Some(HELLO_TIMEOUT))?;
    stream.write_all(&bytes)
}

/// `None` when accepted, the reason when refused.
fn read_reply(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    stream.set_read_timeout(Some(HELLO_TIMEOUT))?;
    let mut head = [0u8; 3];
    stream.read_exact(&mut head)?;
    if head[0] == 0 {
        return Ok(None);
    }
    let mut why = vec![0u8; u16::from_le_bytes([head[1], head[2]]) as usize];
    stream.read_exact(&mut why)?;
    Ok(Some(String::from_utf8_lossy(&why).into_owned()))
}

/// Waits up to `timeout` for a pending connection on the (non-blocking) listener.
fn wait_readable(listener: &TcpListener, timeout: Duration) -> bool {
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
    // SAFETY: `fd` is one valid pollfd that outlives the call, and the count passed is 1.
    let ready = unsafe { libc::poll(&mut fd, 1, ms) };
    ready > 0
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn options(collective_ms: u64) -> GroupOptions {
        GroupOptions {
            collective_timeout: Duration::from_millis(collective_ms),
            rendezvous_timeout: Duration::from_secs(20),
        }
    }

    /// A group of `n` in this process: rank 0 here, followers joined from threads.
    pub(crate) fn thread_group(n: usize, opts: GroupOptions) -> (LeaderGroup, Vec<FollowerGroup>) {
        let rendezvous = Rendezvous::bind("127.0.0.1:0", "test", n, opts).expect("bind");
        let addr = rendezvous.local_addr().expect("addr").to_string();
        let joiners: Vec<_> = (1..n)
            .map(|rank| {
                let addr = addr.clone();
                std::thread::spawn(move || join(&addr, "test", rank, n, opts).expect("join"))
            })
            .collect();
        let leader = rendezvous.accept().expect("accept");
        let followers = joiners
            .into_iter()
            .map(|j| j.join().expect("joiner thread"))
            .collect();
        (leader, followers)
    }

    #[test]
    fn a_group_of_one_needs_no_peers() {
        let rendezvous = Rendezvous::bind("127.0.0.1:0", "solo", 1, options(1000)).expect("bind");
        let group = rendezvous.accept().expect("accept");
        assert_eq!(group.control.num_followers(), 0);
        let mut data = vec![2.0f32];
        use crate::Communicator;
        group
            .communicator
            .all_reduce_sum_f32(&mut data)
            .expect("reduce");
        assert_eq!(data, [2.0]);
    }

    #[test]
    fn other_groups_are_refused_and_the_rendezvous_waits_on() {
        let opts = options(1000);
        let rendezvous = Rendezvous::bind("127.0.0.1:0", "mine", 2, opts).expect("bind");
        let addr = rendezvous.local_addr().expect("addr").to_string();
        let accepting = std::thread::spawn(move || rendezvous.accept());
        let err = join(&addr, "theirs", 1, 2, opts).expect_err("other group refused");
        assert!(
            err.to_string().contains("`theirs`") && err.to_string().contains("`mine`"),
            "{err}"
        );
        let member = join(&addr, "mine", 1, 2, opts);
        let group = accepting
            .join()
            .expect("thread")
            .expect("the real member still joins");
        assert_eq!(group.control.num_followers(), 1);
        member.expect("member joined");
    }

    #[test]
    fn a_wrong_world_size_fails_both_sides_with_the_numbers() {
        let opts = options(1000);
        let rendezvous = Rendezvous::bind("127.0.0.1:0", "g", 3, opts).expect("bind");
        let addr = rendezvous.local_addr().expect("addr").to_string();
        let member = std::thread::spawn(move || join(&addr, "g", 1, 2, opts).map(|_| ()));
        let err = rendezvous.accept().expect_err("world size mismatch");
        let msg = err.to_string();
        assert!(
            msg.contains("world size is 2") && msg.contains("says 3"),
            "{msg}"
        );
        let err = member.join().expect("thread").expect_err("refused");
        assert!(err.to_string().contains("refused rank 1"), "{err}");
    }

    #[test]
    fn rendezvous_timeout_names_the_missing_ranks() {
        let opts = GroupOptions {
            collective_timeout: Duration::from_secs(1),
            rendezvous_timeout: Duration::from_millis(300),
        };
        let started = Instant::now();
        let err = Rendezvous::bind("127.0.0.1:0", "g", 3, opts)
            .expect("bind")
            .accept()
            .expect_err("nobody joins");
        assert!(matches!(err, Error::RendezvousTimeout { .. }), "{err:?}");
        assert!(err.to_string().contains("[1, 2]"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let err = join("127.0.0.1:1", "g", 0, 2, opts).expect_err("rank 0 cannot join");
        assert!(err.to_string().contains("rank 0"), "{err}");
    }

    #[test]
    fn control_messages_flow_both_ways_and_leader_exit_ends_the_follower_wait() {
        let (mut leader, mut followers) = thread_group(3, options(2000));
        leader.control.send_all(b"step 1").expect("send");
        for f in followers.iter_mut() {
            assert_eq!(f.control.recv().expect("recv"), b"step 1");
            let reply = format!("ready {}", f.control.rank());
            f.control.send(reply.as_bytes()).expect("reply");
        }
        for rank in 1..3 {
            let got = leader
                .control
                .recv_from(rank, Duration::from_secs(2))
                .expect("reply");
            assert_eq!(got, format!("ready {rank}").as_bytes());
        }
        drop(leader);
        for f in followers.iter_mut() {
            let err = f.control.recv().expect_err("leader gone");
            assert!(matches!(err, Error::PeerClosed { rank: 0, .. }), "{err:?}");
        }
    }
}
