//! The control channel's message format: what rank 0 sends followers (`Init`, `Step`,
//! `Shutdown`) and what followers answer at start-up (`Ready`, `Failed`). A small
//! little-endian binary format: `[tag u8]` then fixed fields, arrays as `[count u32][u32...]`,
//! strings as `[len u32][utf-8]`.
//!
//! Invariant: decoding never trusts the bytes: every count is checked against what is left
//! before anything is allocated, and trailing bytes are an error. A decoded `StepBatch` is
//! still re-validated by the follower against its own KV cache.

use allam_backend::{SeqInBatch, StepBatch};

const TAG_INIT: u8 = 1;
const TAG_STEP: u8 = 2;
const TAG_SHUTDOWN: u8 = 3;
const TAG_READY: u8 = 11;
const TAG_FAILED: u8 = 12;

/// Leader → followers.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Command {
    /// Allocate the KV cache (`num_blocks` × `block_size` tokens) and report ready.
    /// `model_summary` must equal the follower's own, so ranks cannot run different models.
    Init {
        num_blocks: u64,
        block_size: u64,
        model_summary: String,
    },
    /// Run the forward pass over this batch.
    Step(StepBatch),
    /// Exit cleanly.
    Shutdown,
}

/// Follower → leader, answering `Init` (or volunteering `Failed` when start-up failed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    Ready { weight_bytes: u64 },
    Failed { message: String },
}

struct Writer(Vec<u8>);

impl Writer {
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32s(&mut self, values: &[u32]) {
        self.u32(values.len() as u32);
        for v in values {
            self.u32(*v);
        }
    }
    fn str(&mut self, s: &str) {
        self.u32(s.len() as u32);
        self.0.extend_from_slice(s.as_bytes());
    }
}

pub(crate) fn encode_command(command: &Command) -> Vec<u8> {
    let mut w = Writer(Vec::new());
    match command {
        Command::Init {
            num_blocks,
            block_size,
            model_summary,
        } => {
            w.0.push(TAG_INIT);
            w.u64(*num_blocks);
            w.u64(*block_size);
            w.str(model_summary);
        }
        Command::Step(batch) => return encode_step(batch),
        Command::Shutdown => w.0.push(TAG_SHUTDOWN),
    }
    w.0
}

/// `encode_command(&Command::Step(batch))` without cloning the batch.
pub(crate) fn encode_step(batch: &StepBatch) -> Vec<u8> {
    let mut w = Writer(vec![TAG_STEP]);
    w.u32(batch.block_size);
    w.u32s(&batch.token_ids);
    w.u32s(&batch.positions);
    w.u32s(&batch.slot_mapping);
    w.u32(batch.seqs.len() as u32);
    for seq in &batch.seqs {
        w.u32(seq.query_start);
        w.u32(seq.query_len);
        w.u32(seq.context_len);
        w.u32s(&seq.block_table);
    }
    w.u32s(&batch.logits_rows);
    w.0
}

pub(crate) fn encode_reply(reply: &Reply) -> Vec<u8> {
    let mut w = Writer(Vec::new());
    match reply {
        Reply::Ready { weight_bytes } => {
            w.0.push(TAG_READY);
            w.u64(*weight_bytes);
        }
        Reply::Failed { message } => {
            w.0.push(TAG_FAILED);
            w.str(message);
        }
    }
    w.0
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if self.bytes.len() < n {
            return Err(format!(
                "truncated at {what}: {n} bytes needed, {} left",
                self.bytes.len()
            ));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }
    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64, String> {
        let b = self.take(8, what)?;
        let mut word = [0u8; 8];
        word.copy_from_slice(b);
        Ok(u64::from_le_bytes(word))
    }
    fn u32s(&mut self, what: &str) -> Result<Vec<u32>, String> {
        let n = self.u32(what)? as usize;
        let bytes = self.take(n.saturating_mul(4), what)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
    fn str(&mut self, what: &str) -> Result<String, String> {
        let n = self.u32(what)? as usize;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }
    fn finish(self) -> Result<(), String> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(format!("{} trailing bytes", self.bytes.len()))
        }
    }
}

pub(crate) fn decode_command(bytes: &[u8]) -> Result<Command, String> {
    let mut r = Reader { bytes };
    let command = match r.u8("tag")? {
        TAG_INIT => Command::Init {
            num_blocks: r.u64("num_blocks")?,
            block_size: r.u64("block_size")?,
            model_summary: r.str("model_summary")?,
        },
        TAG_STEP => {
            let block_size = r.u32("block_size")?;
            let token_ids = r.u32s("token_ids")?;
            let positions = r.u32s("positions")?;
            let slot_mapping = r.u32s("slot_mapping")?;
            let num_seqs = r.u32("seqs")? as usize;
            // Each sequence takes at least 16 bytes: bound the allocation by what is left.
            if num_seqs > r.bytes.len() / 16 {
                return Err(format!(
                    "{num_seqs} sequences cannot fit in {} bytes",
                    r.bytes.len()
                ));
            }
            let mut seqs = Vec::with_capacity(num_seqs);
            for _ in 0..num_seqs {
                seqs.push(SeqInBatch {
                    query_start: r.u32("query_start")?,
                    query_len: r.u32("query_len")?,
                    context_len: r.u32("context_len")?,
                    block_table: r.u32s("block_table")?,
                });
            }
            Command::Step(StepBatch {
                token_ids,
                positions,
                slot_mapping,
                seqs,
                logits_rows: r.u32s("logits_rows")?,
                block_size,
            })
        }
        TAG_SHUTDOWN => Command::Shutdown,
        other => return Err(format!("unknown command tag {other}")),
    };
    r.finish()?;
    Ok(command)
}

pub(crate) fn decode_reply(bytes: &[u8]) -> Result<Reply, String> {
    let mut r = Reader { bytes };
    let reply = match r.u8("tag")? {
        TAG_READY => Reply::Ready {
            weight_bytes: r.u64("weight_bytes")?,
        },
        TAG_FAILED => Reply::Failed {
            message: r.str("message")?,
        },
        other => return Err(format!("unknown reply tag {other}")),
    };
    r.finish()?;
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> StepBatch {
        let mut batch = StepBatch {
            block_size: 4,
            ..StepBatch::default()
        };
        batch.push_seq(&[1, 2, 3, 4, 5], 5, vec![7, 2]);
        batch.push_seq(&[9], 12, vec![0, 1, 3]);
        batch.logits_rows = vec![4, 5];
        batch
    }

    #[test]
    fn every_message_round_trips() {
        let commands = [
            Command::Init {
                num_blocks: 257,
                block_size: 16,
                model_summary: "layers 4".to_owned(),
            },
            Command::Step(batch()),
            Command::Step(StepBatch::default()),
            Command::Shutdown,
        ];
        for command in commands {
            assert_eq!(decode_command(&encode_command(&command)), Ok(command));
        }
        for reply in [
            Reply::Ready {
                weight_bytes: 1 << 40,
            },
            Reply::Failed {
                message: "tensor `x` missing".to_owned(),
            },
        ] {
            assert_eq!(decode_reply(&encode_reply(&reply)), Ok(reply));
        }
    }

    #[test]
    fn garbage_is_an_error_never_a_panic_or_a_huge_allocation() {
        let good = encode_command(&Command::Step(batch()));
        for cut in 0..good.len() {
            assert!(
                decode_command(&good[..cut]).is_err(),
                "prefix of {cut} bytes"
            );
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(decode_command(&trailing)
            .expect_err("rejected")
            .contains("trailing"));
        let mut huge = vec![TAG_STEP];
        huge.extend_from_slice(&4u32.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_command(&huge)
            .expect_err("rejected")
            .contains("token_ids"));
        assert!(decode_reply(&[99])
            .expect_err("rejected")
            .contains("tag 99"));
    }
}
