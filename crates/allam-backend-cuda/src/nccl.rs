//! NCCL for the CUDA backend's tensor parallelism: the group's unique id, one rank's
//! communicator, its two collectives, and the watchdog that bounds them.
//!
//! Loading: cudarc loads libnccl lazily and panics when it (or one symbol) is missing, so
//! [`check_nccl`] probes the library and every symbol used here before the first call.
//!
//! Asynchrony: the communicator is created non-blocking (`ncclConfig_t.blocking = 0`), so
//! neither joining nor enqueuing a collective can hang the calling thread; a call that answers
//! `ncclInProgress` is polled to completion. Collectives run on the backend's stream and a dead
//! peer shows up as a stream that never drains, so every point where the host waits for the
//! device goes through [`NcclGroup::wait_stream`]: it polls the stream and
//! `ncclCommGetAsyncError` until the group's timeout ([`watch_verdict`] decides), then aborts
//! the communicator.
//!
//! Invariant: after any failure the communicator is aborted and the group stays broken: every
//! later call fails at once with the first failure (the `allam_comm::Communicator` contract),
//! since the ranks' streams may be out of step.

use std::ffi::{c_void, CStr};
use std::fmt;
use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use allam_backend::Error as OpError;
use cudarc::driver::CudaStream;
use cudarc::nccl::sys;

use crate::Error;

/// Bytes of an NCCL unique id (`ncclUniqueId`).
pub const NCCL_ID_BYTES: usize = 128;

/// `NCCL_VERSION(2, 14, 0)`: the first NCCL with `ncclConfig_t` (and its `blocking` field).
const CONFIG_VERSION: u32 = 21_400;
/// `NCCL_API_MAGIC`, which NCCL checks in every `ncclConfig_t`.
const CONFIG_MAGIC: u32 = 0xcafe_beef;

/// Every NCCL entry point this module calls; cudarc panics on a missing one.
const REQUIRED_SYMBOLS: [&str; 9] = [
    "ncclGetVersion",
    "ncclGetUniqueId",
    "ncclCommInitRankConfig",
    "ncclCommGetAsyncError",
    "ncclCommAbort",
    "ncclAllReduce",
    "ncclAllGather",
    "ncclGetErrorString",
    "ncclGetLastError",
];

/// Checks that libnccl loads and has every symbol this backend calls; returns its version
/// code (e.g. 22703 for 2.27.3). Never panics.
pub fn check_nccl() -> Result<i32, Error> {
    // SAFETY: the probe only dlopens candidate names and closes them again.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::NcclMissing {
            cuda_major: allam_kernels::CUDA_MAJOR,
        });
    }
    // SAFETY: the probe above found a loadable candidate, and `culib` tries the same names in
    // the same order, so it loads instead of panicking.
    let lib = unsafe { sys::culib() };
    for symbol in REQUIRED_SYMBOLS {
        // SAFETY: only looks the symbol up; the pointer type is never called through.
        if unsafe { lib.get::<unsafe extern "C" fn()>(symbol.as_bytes()) }.is_err() {
            return Err(Error::NcclTooOld { symbol });
        }
    }
    let mut version = 0;
    // SAFETY: `version` is a valid out pointer; the symbol exists (checked above).
    let rc = unsafe { sys::ncclGetVersion(&mut version) };
    if rc != sys::ncclResult_t::ncclSuccess {
        return Err(Error::Nccl {
            what: "reading the NCCL version".to_owned(),
            message: describe(rc),
        });
    }
    Ok(version)
}

/// `ncclResult_t` as text: NCCL's own string and the code's name.
fn describe(rc: sys::ncclResult_t) -> String {
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code (or
    // null, handled); the symbol exists (every caller ran `check_nccl`).
    let text = unsafe { sys::ncclGetErrorString(rc) };
    if text.is_null() {
        return format!("{rc:?}");
    }
    // SAFETY: non-null and NUL-terminated per NCCL's API.
    let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    format!("{text} ({rc:?})")
}

/// The rendezvous token of one NCCL group: rank 0 makes it ([`NcclId::new`]), the other ranks
/// receive its bytes by any channel and rebuild it ([`NcclId::from_bytes`]).
#[derive(Clone, PartialEq, Eq)]
pub struct NcclId([u8; NCCL_ID_BYTES]);

impl fmt::Debug for NcclId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The bytes hold rank 0's bootstrap address; nothing a log needs.
        f.write_str("NcclId(..)")
    }
}

impl NcclId {
    /// A fresh id (`ncclGetUniqueId`); rank 0 calls it once per group. Starts NCCL's
    /// bootstrap listener in this process.
    pub fn new() -> Result<NcclId, Error> {
        check_nccl()?;
        let mut id = MaybeUninit::<sys::ncclUniqueId>::uninit();
        // SAFETY: `id` is a valid out pointer; the symbol exists (checked above).
        let rc = unsafe { sys::ncclGetUniqueId(id.as_mut_ptr()) };
        if rc != sys::ncclResult_t::ncclSuccess {
            return Err(Error::Nccl {
                what: "creating the group's unique id (ncclGetUniqueId)".to_owned(),
                message: describe(rc),
            });
        }
        // SAFETY: ncclGetUniqueId succeeded, so it wrote the whole id.
        let id = unsafe { id.assume_init() };
        Ok(NcclId(id.internal.map(|c| c as u8)))
    }

    /// Rebuilds an id from the bytes of [`NcclId::as_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<NcclId, Error> {
        let array: [u8; NCCL_ID_BYTES] = bytes.try_into().map_err(|_| Error::NcclId {
            expected: NCCL_ID_BYTES,
            actual: bytes.len(),
        })?;
        Ok(NcclId(array))
    }

    pub fn as_bytes(&self) -> &[u8; NCCL_ID_BYTES] {
        &self.0
    }

    fn to_sys(&self) -> sys::ncclUniqueId {
        sys::ncclUniqueId {
            internal: self.0.map(|b| b as ::core::ffi::c_char),
        }
    }
}

/// What `ncclCommGetAsyncError` says about the communicator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AsyncState {
    Ready,
    /// A non-blocking init or enqueue is still running on NCCL's threads.
    InProgress,
    /// NCCL saw an error (a peer closed, a network failure); the text describes it.
    Failed(String),
}

/// Why a wait gave up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stall {
    /// Nothing finished within the group's timeout.
    Timeout,
    /// NCCL reported an asynchronous error.
    Nccl(String),
}

/// One poll's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    Done,
    /// Poll again after this pause (zero: just yield the thread).
    Wait(Duration),
    /// Abort the communicator and fail.
    Fail(Stall),
}

/// The watchdog's rule for one poll: an NCCL error fails at once; finished device work with
/// NCCL idle is done; past `timeout` it fails; otherwise it waits, yielding for the first
/// 20 ms (a step's collectives usually finish well within that) and sleeping after, so a
/// long wait does not spin a core.
pub(crate) fn watch_verdict(
    nccl: &AsyncState,
    work_done: bool,
    elapsed: Duration,
    timeout: Duration,
) -> Verdict {
    match nccl {
        AsyncState::Failed(message) => return Verdict::Fail(Stall::Nccl(message.clone())),
        AsyncState::Ready if work_done => return Verdict::Done,
        _ => {}
    }
    if elapsed >= timeout {
        return Verdict::Fail(Stall::Timeout);
    }
    Verdict::Wait(if elapsed < Duration::from_millis(20) {
        Duration::ZERO
    } else if elapsed < Duration::from_secs(1) {
        Duration::from_micros(200)
    } else {
        Duration::from_millis(2)
    })
}

/// One rank's NCCL communicator.
pub(crate) struct NcclGroup {
    /// Null once aborted.
    comm: sys::ncclComm_t,
    rank: usize,
    world_size: usize,
    timeout: Duration,
    /// The first failure; every call after it fails fast with it.
    broken: Option<String>,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not
// concurrent; `NcclGroup` is owned by one backend and every call takes `&mut self`.
unsafe impl Send for NcclGroup {}

impl fmt::Debug for NcclGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NcclGroup")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("timeout", &self.timeout)
            .field("broken", &self.broken)
            .finish()
    }
}

/// What went wrong in a group call, before it is given the caller's error type.
enum Failure {
    Stall(Stall),
    /// A driver call (event record or query) failed.
    Device(String),
    /// An NCCL call returned an error code.
    Call(String),
}

impl NcclGroup {
    /// Joins rank `rank` of `world_size` with `id`, on the device whose context is current on
    /// this thread. Blocks until every rank has joined, at most `timeout`.
    pub(crate) fn join(
        id: &NcclId,
        rank: usize,
        world_size: usize,
        timeout: Duration,
    ) -> Result<NcclGroup, Error> {
        let version = check_nccl()?;
        let what = format!("joining as rank {rank} of {world_size}");
        let (Ok(n), Ok(r)) = (i32::try_from(world_size), i32::try_from(rank)) else {
            return Err(Error::Nccl {
                what,
                message: "rank or world size out of range".to_owned(),
            });
        };
        if world_size == 0 || rank >= world_size {
            return Err(Error::Nccl {
                what,
                message: "the rank must be below the world size".to_owned(),
            });
        }
        // Only the fields up to `blocking` are ours: NCCL copies `size` bytes over its own
        // defaults, so every later field keeps NCCL's default whatever its version.
        // SAFETY: the config is plain old data (integers and nullable pointers), for which
        // all-zero bytes are a valid value.
        let mut config: sys::ncclConfig_t = unsafe { MaybeUninit::zeroed().assume_init() };
        config.size = std::mem::offset_of!(sys::ncclConfig_t, cgaClusterSize);
        config.magic = CONFIG_MAGIC;
        config.version = CONFIG_VERSION;
        config.blocking = 0;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: valid out pointer and config; the symbols exist (check_nccl).
        let rc = unsafe { sys::ncclCommInitRankConfig(&mut comm, n, id.to_sys(), r, &mut config) };
        let mut group = NcclGroup {
            comm,
            rank,
            world_size,
            timeout,
            broken: None,
        };
        let joined = match rc {
            _ if comm.is_null() => Err(Failure::Call(format!(
                "no communicator returned ({})",
                describe(rc)
            ))),
            sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => group.settle(),
            other => Err(Failure::Call(describe(other))),
        };
        match joined {
            Ok(()) => {
                tracing::info!(
                    rank,
                    world_size,
                    nccl_version = version,
                    "NCCL communicator ready"
                );
                Ok(group)
            }
            Err(failure) => {
                let message = group.fail(failure);
                Err(Error::Nccl { what, message })
            }
        }
    }

    pub(crate) fn rank(&self) -> usize {
        self.rank
    }

    pub(crate) fn world_size(&self) -> usize {
        self.world_size
    }

    /// In-place sum of `count` elements at device address `buf` over the group, enqueued on
    /// `stream`.
    pub(crate) fn all_reduce_sum(
        &mut self,
        op: &'static str,
        buf: u64,
        count: usize,
        dtype: sys::ncclDataType_t,
        stream: &CudaStream,
    ) -> Result<(), OpError> {
        self.usable(op)?;
        // SAFETY: the caller passes a live device buffer of `count` elements of `dtype`,
        // ordered on `stream`; the communicator is live (checked by `usable`).
        let rc = unsafe {
            sys::ncclAllReduce(
                buf as *const c_void,
                buf as *mut c_void,
                count,
                dtype,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                stream.cu_stream() as sys::cudaStream_t,
            )
        };
        self.enqueued(op, rc)
    }

    /// Gathers `count` elements at `send` from every rank into `recv` (`world_size * count`
    /// elements, rank-major), enqueued on `stream`.
    pub(crate) fn all_gather(
        &mut self,
        op: &'static str,
        send: u64,
        recv: u64,
        count: usize,
        dtype: sys::ncclDataType_t,
        stream: &CudaStream,
    ) -> Result<(), OpError> {
        self.usable(op)?;
        // SAFETY: the caller passes live device buffers of `count` and `world_size * count`
        // elements of `dtype`, ordered on `stream`; the communicator is live.
        let rc = unsafe {
            sys::ncclAllGather(
                send as *const c_void,
                recv as *mut c_void,
                count,
                dtype,
                self.comm,
                stream.cu_stream() as sys::cudaStream_t,
            )
        };
        self.enqueued(op, rc)
    }

    /// Waits until everything queued on `stream` so far has run, under the watchdog.
    pub(crate) fn wait_stream(
        &mut self,
        op: &'static str,
        stream: &CudaStream,
    ) -> Result<(), OpError> {
        self.usable(op)?;
        let event = match stream.record_event(None) {
            Ok(event) => event,
            Err(e) => {
                let message = self.fail(Failure::Device(format!("{e:?}")));
                return Err(self.op_error(op, message));
            }
        };
        let result = self.watch(|| {
            event
                .try_is_complete()
                .map_err(|e| Failure::Device(format!("{e:?}")))
        });
        result.map_err(|failure| {
            let message = self.fail(failure);
            self.op_error(op, message)
        })
    }

    fn op_error(&self, op: &'static str, message: String) -> OpError {
        OpError::Collective { op, message }
    }

    /// `Ok` while the group has not failed.
    fn usable(&self, op: &'static str) -> Result<(), OpError> {
        match &self.broken {
            None => Ok(()),
            Some(first) => Err(self.op_error(
                op,
                format!("the NCCL group failed earlier and must be restarted ({first})"),
            )),
        }
    }

    /// Handles the return code of an enqueue: polls an `ncclInProgress` to completion.
    fn enqueued(&mut self, op: &'static str, rc: sys::ncclResult_t) -> Result<(), OpError> {
        let result = match rc {
            sys::ncclResult_t::ncclSuccess => Ok(()),
            sys::ncclResult_t::ncclInProgress => self.settle(),
            other => Err(Failure::Call(describe(other))),
        };
        result.map_err(|failure| {
            let message = self.fail(failure);
            self.op_error(op, message)
        })
    }

    /// Polls until NCCL's own asynchronous work (init, enqueue) is finished.
    fn settle(&mut self) -> Result<(), Failure> {
        self.watch(|| Ok(true))
    }

    fn async_state(&self) -> AsyncState {
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: the communicator is live (never called after `abort`); valid out pointer.
        let rc = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
        if rc != sys::ncclResult_t::ncclSuccess {
            return AsyncState::Failed(format!("ncclCommGetAsyncError failed: {}", describe(rc)));
        }
        match state {
            sys::ncclResult_t::ncclSuccess => AsyncState::Ready,
            sys::ncclResult_t::ncclInProgress => AsyncState::InProgress,
            other => AsyncState::Failed(self.last_error(other)),
        }
    }

    /// `rc` described, with NCCL's last message for this communicator when it has one.
    fn last_error(&self, rc: sys::ncclResult_t) -> String {
        // SAFETY: the communicator is live; NCCL returns a NUL-terminated string it owns
        // (or null, handled).
        let last = unsafe { sys::ncclGetLastError(self.comm) };
        let detail = if last.is_null() {
            String::new()
        } else {
            // SAFETY: non-null and NUL-terminated per NCCL's API.
            unsafe { CStr::from_ptr(last) }
                .to_string_lossy()
                .trim()
                .to_owned()
        };
        if detail.is_empty() {
            describe(rc)
        } else {
            format!("{} ({detail})", describe(rc))
        }
    }

    /// The watchdog loop; `work_done` polls the device work being waited for.
    fn watch(
        &mut self,
        mut work_done: impl FnMut() -> Result<bool, Failure>,
    ) -> Result<(), Failure> {
        let start = Instant::now();
        loop {
            let nccl = self.async_state();
            let done = work_done()?;
            match watch_verdict(&nccl, done, start.elapsed(), self.timeout) {
                Verdict::Done => return Ok(()),
                Verdict::Wait(pause) if pause.is_zero() => std::thread::yield_now(),
                Verdict::Wait(pause) => std::thread::sleep(pause),
                Verdict::Fail(stall) => return Err(Failure::Stall(stall)),
            }
        }
    }

    /// Aborts the communicator, marks the group broken and returns the message of `failure`.
    fn fail(&mut self, failure: Failure) -> String {
        let (rank, n) = (self.rank, self.world_size);
        let message = match failure {
            Failure::Stall(Stall::Timeout) => format!(
                "NCCL rank {rank} of {n} made no progress within the {:?} collective timeout (a peer rank died, hung or fell out of step); the communicator was aborted",
                self.timeout
            ),
            Failure::Stall(Stall::Nccl(text)) => format!(
                "NCCL rank {rank} of {n} reported {text}; the communicator was aborted"
            ),
            Failure::Device(text) => format!(
                "the GPU of NCCL rank {rank} of {n} failed while waiting ({text}); the communicator was aborted"
            ),
            Failure::Call(text) => format!(
                "an NCCL call on rank {rank} of {n} failed: {text}; the communicator was aborted"
            ),
        };
        tracing::error!(rank, world_size = n, "{message}");
        self.abort();
        self.broken.get_or_insert_with(|| message.clone());
        message
    }

    fn abort(&mut self) {
        if self.comm.is_null() {
            return;
        }
        // SAFETY: the communicator is live and never used again (nulled below). The result
        // is ignored: there is nothing left to do with a group being torn down.
        let _ = unsafe { sys::ncclCommAbort(self.comm) };
        self.comm = std::ptr::null_mut();
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        // Abort rather than destroy: destroying waits for the peers, which may be gone.
        self.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(60);

    #[test]
    fn finished_work_with_nccl_idle_is_done() {
        let v = watch_verdict(&AsyncState::Ready, true, Duration::from_secs(5), T);
        assert_eq!(v, Verdict::Done);
        // Done wins even past the timeout: the work did finish.
        let v = watch_verdict(&AsyncState::Ready, true, Duration::from_secs(100), T);
        assert_eq!(v, Verdict::Done);
    }

    #[test]
    fn an_nccl_error_fails_at_once_even_with_the_work_done() {
        let failed = AsyncState::Failed("remote process exited".to_owned());
        for done in [false, true] {
            let v = watch_verdict(&failed, done, Duration::ZERO, T);
            assert_eq!(
                v,
                Verdict::Fail(Stall::Nccl("remote process exited".to_owned()))
            );
        }
    }

    #[test]
    fn unfinished_work_or_nccl_in_progress_waits_until_the_timeout() {
        for (state, done) in [
            (AsyncState::Ready, false),
            (AsyncState::InProgress, true),
            (AsyncState::InProgress, false),
        ] {
            let early = watch_verdict(&state, done, Duration::from_millis(1), T);
            assert_eq!(early, Verdict::Wait(Duration::ZERO), "{state:?} {done}");
            let at = watch_verdict(&state, done, T, T);
            assert_eq!(at, Verdict::Fail(Stall::Timeout), "{state:?} {done}");
        }
    }

    #[test]
    fn the_pause_grows_with_the_wait_and_stays_short() {
        let pause = |ms: u64| match watch_verdict(
            &AsyncState::Ready,
            false,
            Duration::from_millis(ms),
            T,
        ) {
            Verdict::Wait(p) => p,
            other => panic!("expected a wait at {ms} ms, got {other:?}"),
        };
        let pauses: Vec<Duration> = [0, 19, 20, 999, 1000, 59_999].map(pause).to_vec();
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]), "{pauses:?}");
        assert_eq!(pauses[0], Duration::ZERO);
        assert!(pauses[2] > Duration::ZERO);
        // The timeout is noticed within a few ms of passing.
        assert!(
            pauses.iter().all(|p| *p <= Duration::from_millis(5)),
            "{pauses:?}"
        );
    }

    #[test]
    fn ids_round_trip_through_bytes() {
        let bytes: Vec<u8> = (0..NCCL_ID_BYTES).map(|i| (i * 37 % 256) as u8).collect();
        let id = NcclId::from_bytes(&bytes).expect("128 bytes");
        assert_eq!(id.as_bytes().as_slice(), bytes.as_slice());
        // Through NCCL's `c_char` array and back, high bytes included.
        let back: Vec<u8> = id.to_sys().internal.iter().map(|c| *c as u8).collect();
        assert_eq!(back, bytes);
        assert_eq!(NcclId::from_bytes(id.as_bytes()).expect("again"), id);
        assert!(
            !format!("{id:?}").contains("37"),
            "the bytes stay out of logs"
        );
    }

    #[test]
    fn ids_of_the_wrong_length_are_refused() {
        for len in [0, 127, 129] {
            let err = NcclId::from_bytes(&vec![0; len]).expect_err("wrong length");
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("got {len}")) && msg.contains("128"),
                "{msg}"
            );
        }
    }

    /// This machine (CI) has no NCCL: the probe and the id must fail with the one-sentence
    /// error, not panic. Where NCCL is installed the same calls must succeed, so the test
    /// checks whichever holds.
    #[test]
    fn missing_nccl_is_one_clean_sentence() {
        // SAFETY: the probe only dlopens and closes candidate names.
        let present = unsafe { sys::is_culib_present() };
        match (check_nccl(), NcclId::new()) {
            (Err(Error::NcclMissing { .. }), Err(Error::NcclMissing { .. })) => {
                assert!(!present);
                let msg = Error::NcclMissing { cuda_major: 13 }.to_string();
                assert!(
                    msg.contains("libnccl.so") && msg.contains("LD_LIBRARY_PATH"),
                    "{msg}"
                );
                assert!(
                    msg.contains("nvidia-nccl-cu13") && msg.contains("--tp 1"),
                    "{msg}"
                );
                assert_eq!(msg.matches(". ").count(), 0, "one sentence: {msg}");
                assert!(!msg.ends_with('.'), "{msg}");
            }
            (Ok(version), _) => assert!(present && version > 0),
            (Err(other), _) => assert!(present, "NCCL absent but got {other}"),
        }
    }
}
