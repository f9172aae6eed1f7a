//! One connection to a peer, with every read and write bounded by a deadline, and the frame
//! header the collectives exchange.
//!
//! Invariant: an I/O error is classified once, here, into the typed [`Error`] that names the
//! peer's rank: end of stream or reset = [`Error::PeerClosed`], deadline passed =
//! [`Error::Timeout`].

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use crate::Error;

/// Largest payload a peer may announce (guards allocations against a corrupt stream).
pub(crate) const MAX_PAYLOAD_BYTES: u64 = 1 << 34;

/// Bytes of a collective frame header: op (1), sequence number (8), payload length (8).
pub(crate) const HEADER_BYTES: usize = 17;

/// The collective a frame belongs to; both ends check it so mismatched calls are caught.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpCode {
    AllReduceF32 = 1,
    AllReduceBf16 = 2,
    AllGather = 3,
    Broadcast = 4,
}

impl OpCode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            OpCode::AllReduceF32 => "all_reduce_sum_f32",
            OpCode::AllReduceBf16 => "all_reduce_sum_bf16",
            OpCode::AllGather => "all_gather",
            OpCode::Broadcast => "broadcast",
        }
    }
}

/// A connected peer.
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) rank: usize,
    stream: TcpStream,
}

/// Time left until `deadline`, at least 1 ms (a zero socket timeout means "block forever").
fn remaining(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .map(|d| d.max(Duration::from_millis(1)))
}

fn is_closed(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::NotConnected
    )
}

impl Peer {
    pub(crate) fn new(rank: usize, stream: TcpStream) -> Peer {
        // Collectives are latency bound; Nagle would hold back every small frame.
        let _ = stream.set_nodelay(true);
        Peer { rank, stream }
    }

    /// Closes the connection both ways, so the peer's pending and later reads end at once
    /// instead of waiting out their timeouts.
    pub(crate) fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    fn timeout_error(&self, op: &'static str, budget: Duration) -> Error {
        Error::Timeout {
            op,
            rank: self.rank,
            timeout_ms: budget.as_millis() as u64,
        }
    }

    fn io_error(&self, op: &'static str, source: std::io::Error) -> Error {
        if is_closed(source.kind()) {
            Error::PeerClosed {
                op,
                rank: self.rank,
            }
        } else {
            Error::PeerIo {
                op,
                rank: self.rank,
                source,
            }
        }
    }

    /// Writes all of `bytes` before `deadline` (`budget` is only for the message).
    pub(crate) fn write_all(
        &mut self,
        op: &'static str,
        bytes: &[u8],
        deadline: Instant,
        budget: Duration,
    ) -> Result<(), Error> {
        let mut written = 0;
        while written < bytes.len() {
            let left = remaining(deadline).ok_or_else(|| self.timeout_error(op, budget))?;
            self.stream
                .set_write_timeout(Some(left))
                .map_err(|e| self.io_error(op, e))?;
            match self.stream.write(&bytes[written..]) {
                Ok(0) => {
                    return Err(Error::PeerClosed {
                        op,
                        rank: self.rank,
                    })
                }
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(self.io_error(op, e)),
            }
        }
        Ok(())
    }

    /// Fills `buf` before `deadline`, or waits as long as it takes when `deadline` is `None`.
    pub(crate) fn read_exact(
        &mut self,
        op: &'static str,
        buf: &mut [u8],
        deadline: Option<(Instant, Duration)>,
    ) -> Result<(), Error> {
        let mut filled = 0;
        while filled < buf.len() {
            let left = match deadline {
                Some((at, budget)) => {
                    Some(remaining(at).ok_or_else(|| self.timeout_error(op, budget))?)
                }
                None => None,
            };
            self.stream
                .set_read_timeout(left)
                .map_err(|e| self.io_error(op, e))?;
            match self.stream.read(&mut buf[filled..]) {
                Ok(0) => {
                    return Err(Error::PeerClosed {
                        op,
                        rank: self.rank,
                    })
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(self.io_error(op, e)),
            }
        }
        Ok(())
    }

    /// Reads a little-endian u64 length and checks it against [`MAX_PAYLOAD_BYTES`].
    pub(crate) fn read_len(
        &mut self,
        op: &'static str,
        deadline: Option<(Instant, Duration)>,
    ) -> Result<usize, Error> {
        let mut len = [0u8; 8];
        self.read_exact(op, &mut len, deadline)?;
        let len = u64::from_le_bytes(len);
        if len > MAX_PAYLOAD_BYTES {
            return Err(Error::Protocol {
                op,
                rank: self.rank,
                detail: format!("announced {len} bytes, more than the {MAX_PAYLOAD_BYTES} limit"),
            });
        }
        Ok(len as usize)
    }

    /// Sends one collective frame: header then payload.
    pub(crate) fn send_frame(
        &mut self,
        code: OpCode,
        seq: u64,
        payload: &[u8],
        deadline: Instant,
        budget: Duration,
    ) -> Result<(), Error> {
        let mut header = [0u8; HEADER_BYTES];
        header[0] = code as u8;
        header[1..9].copy_from_slice(&seq.to_le_bytes());
        header[9..17].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        self.write_all(code.name(), &header, deadline, budget)?;
        self.write_all(code.name(), payload, deadline, budget)
    }

    /// Receives one collective frame, checking op and sequence number, and the payload
    /// length when `expected_len` is given.
    pub(crate) fn recv_frame(
        &mut self,
        code: OpCode,
        seq: u64,
        expected_len: Option<usize>,
        deadline: Instant,
        budget: Duration,
    ) -> Result<Vec<u8>, Error> {
        let op = code.name();
        let mut header = [0u8; HEADER_BYTES];
        self.read_exact(op, &mut header, Some((deadline, budget)))?;
        let out_of_step = |detail: String| Error::Protocol {
            op,
            rank: self.rank,
            detail,
        };
        if header[0] != code as u8 {
            return Err(out_of_step(format!(
                "sent op code {}, this rank is in {op} (code {})",
                header[0], code as u8
            )));
        }
        let mut word = [0u8; 8];
        word.copy_from_slice(&header[1..9]);
        let their_seq = u64::from_le_bytes(word);
        if their_seq != seq {
            return Err(out_of_step(format!(
                "is at collective #{their_seq}, this rank at #{seq}"
            )));
        }
        word.copy_from_slice(&header[9..17]);
        let len = u64::from_le_bytes(word);
        if len > MAX_PAYLOAD_BYTES {
            return Err(out_of_step(format!(
                "announced {len} bytes, more than the {MAX_PAYLOAD_BYTES} limit"
            )));
        }
        let len = len as usize;
        if let Some(expected) = expected_len {
            if len != expected {
                return Err(out_of_step(format!(
                    "sent {len} bytes, this rank expects {expected}"
                )));
            }
        }
        let mut payload = vec![0u8; len];
        self.read_exact(op, &mut payload, Some((deadline, budget)))?;
        Ok(payload)
    }
}
