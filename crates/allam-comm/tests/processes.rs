//! The TCP communicator across real processes: this test binary re-runs itself (through
//! `std::env::current_exe`) as ranks 1..N, selected by environment variables, so every byte
//! crosses a process boundary as it does in a worker group.

use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use allam_comm::{join, Communicator, Error, GroupOptions, Rendezvous};

const RANK_ENV: &str = "ALLAM_COMM_TEST_RANK";
const WORLD_ENV: &str = "ALLAM_COMM_TEST_WORLD";
const ADDR_ENV: &str = "ALLAM_COMM_TEST_ADDR";
const SCENARIO_ENV: &str = "ALLAM_COMM_TEST_SCENARIO";
const ENTRY: &str = "rank_process_entry";

fn options(collective: Duration) -> GroupOptions {
    GroupOptions {
        collective_timeout: collective,
        rendezvous_timeout: Duration::from_secs(60),
    }
}

/// Distinct, rank-dependent values with a spread of magnitudes (so summation order shows).
fn values(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((rank * 31 + i * 17) as f32 * 0.37).sin() * 10f32.powi((i % 7) as i32 - 3))
        .collect()
}

fn rank_order_sum(world: usize, len: usize) -> Vec<f32> {
    let mut sum = values(0, len);
    for rank in 1..world {
        for (s, v) in sum.iter_mut().zip(values(rank, len)) {
            *s += v;
        }
    }
    sum
}

/// Every collective once, checked against values computed here independently.
fn exercise(comm: &dyn Communicator) {
    let (rank, world) = (comm.rank(), comm.world_size());
    let mut data = values(rank, 4096);
    comm.all_reduce_sum_f32(&mut data).expect("all-reduce");
    let want = rank_order_sum(world, 4096);
    assert!(
        data.iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "rank {rank}: all-reduce differs from the rank-order sum"
    );
    let gathered = comm
        .all_gather_bytes(&vec![rank as u8; rank + 1])
        .expect("all-gather");
    let want: Vec<Vec<u8>> = (0..world).map(|r| vec![r as u8; r + 1]).collect();
    assert_eq!(gathered, want, "rank {rank}: all-gather");
    let mut message = if rank == world - 1 {
        b"from the last rank".to_vec()
    } else {
        Vec::new()
    };
    comm.broadcast_bytes(world - 1, &mut message)
        .expect("broadcast");
    assert_eq!(message, b"from the last rank", "rank {rank}: broadcast");
}

fn child() {
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} unset"));
    let rank: usize = var(RANK_ENV).parse().expect("rank");
    let world: usize = var(WORLD_ENV).parse().expect("world");
    let group = join(
        &var(ADDR_ENV),
        "processes",
        rank,
        world,
        options(Duration::from_secs(20)),
    )
    .expect("join");
    match var(SCENARIO_ENV).as_str() {
        "exercise" => exercise(group.communicator.as_ref()),
        "until_error" => {
            // Reduce until the group fails (rank 0 kills a member, then goes away).
            let mut data = vec![1.0f32; 256];
            while group.communicator.all_reduce_sum_f32(&mut data).is_ok() {}
        }
        other => panic!("unknown scenario {other}"),
    }
}

/// Ranks 1..world as processes; killed on drop so a failing test leaves nothing behind.
struct Ranks(Vec<Child>);

impl Ranks {
    fn spawn(world: usize, addr: &str, scenario: &str) -> Ranks {
        let exe = std::env::current_exe().expect("test binary path");
        Ranks(
            (1..world)
                .map(|rank| {
                    Command::new(&exe)
                        .args(["--exact", ENTRY, "--nocapture", "--test-threads=1"])
                        .env(RANK_ENV, rank.to_string())
                        .env(WORLD_ENV, world.to_string())
                        .env(ADDR_ENV, addr)
                        .env(SCENARIO_ENV, scenario)
                        .stdout(std::process::Stdio::null())
                        .spawn()
                        .expect("spawn rank process")
                })
                .collect(),
        )
    }

    /// Waits for every process to exit, up to `timeout` in all.
    fn wait_all(&mut self, timeout: Duration) -> Vec<ExitStatus> {
        let deadline = Instant::now() + timeout;
        self.0
            .iter_mut()
            .map(|child| loop {
                if let Some(status) = child.try_wait().expect("try_wait") {
                    break status;
                }
                assert!(Instant::now() < deadline, "rank process did not exit");
                std::thread::sleep(Duration::from_millis(20));
            })
            .collect()
    }
}

impl Drop for Ranks {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Rank 0 of a 4-process group: every collective agrees on every rank. Re-run with
/// `ALLAM_COMM_TEST_RANK` set, this is the entry point of ranks 1..3.
#[test]
fn rank_process_entry() {
    if std::env::var_os(RANK_ENV).is_some() {
        child();
        return;
    }
    let world = 4;
    let rendezvous = Rendezvous::bind(
        "127.0.0.1:0",
        "processes",
        world,
        options(Duration::from_secs(20)),
    )
    .expect("bind");
    let addr = rendezvous.local_addr().expect("addr").to_string();
    let mut ranks = Ranks::spawn(world, &addr, "exercise");
    let group = rendezvous.accept().expect("group assembles");
    exercise(group.communicator.as_ref());
    for (i, status) in ranks.wait_all(Duration::from_secs(60)).iter().enumerate() {
        assert!(status.success(), "rank {} failed: {status}", i + 1);
    }
}

#[test]
fn killing_a_rank_process_fails_the_next_collective_naming_it() {
    let world = 3;
    let timeout = Duration::from_secs(10);
    let rendezvous =
        Rendezvous::bind("127.0.0.1:0", "processes", world, options(timeout)).expect("bind");
    let addr = rendezvous.local_addr().expect("addr").to_string();
    let mut ranks = Ranks::spawn(world, &addr, "until_error");
    let group = rendezvous.accept().expect("group assembles");
    let comm = group.communicator.as_ref();
    let mut data = vec![1.0f32; 256];
    comm.all_reduce_sum_f32(&mut data).expect("healthy group");
    assert_eq!(data[0], 3.0);
    ranks.0[1].kill().expect("kill rank 2");
    ranks.0[1].wait().expect("reap rank 2");
    let started = Instant::now();
    let err = loop {
        // Rank 2 may have had its last contribution in flight; the group fails at the latest
        // on the next collective.
        match comm.all_reduce_sum_f32(&mut data) {
            Ok(()) => assert!(started.elapsed() < timeout, "collectives keep succeeding"),
            Err(err) => break err,
        }
    };
    assert!(
        started.elapsed() <= timeout + Duration::from_secs(2),
        "failure took {:?}",
        started.elapsed()
    );
    assert_eq!(err.rank(), Some(2), "{err}");
    assert!(
        matches!(err, Error::PeerClosed { .. } | Error::PeerIo { .. }),
        "{err:?}"
    );
    assert!(matches!(comm.check_healthy(), Err(Error::Broken { .. })));
    drop(group);
    let status = ranks.wait_all(Duration::from_secs(30))[0];
    assert!(
        status.success(),
        "rank 1 ends cleanly once rank 0 is gone: {status}"
    );
}
