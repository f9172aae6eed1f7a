//! Sampling on the device (`kernels/sampling.cu`): one launch picks every row's token and
//! computes its raw logprob and the top-n raw logprobs, so only ids and a few floats cross to
//! the host. The rules, and their host statement that the self-check compares against, are
//! `allam_backend::sampling`.

use allam_backend::sampling::MAX_TOP_LOGPROBS;
use allam_backend::{checks, DType, Error as OpError, RowSampling, SampledToken, Tensor};
use allam_kernels::geometry::{self, SAMPLE_MAX_TOP};
use allam_kernels::Kernel;

use crate::storage::{self, raw, DevBuf};
use crate::{device_err, Arg, CudaBackend};

// The kernel's per-row buffer is what the trait promises callers.
const _: () = assert!(SAMPLE_MAX_TOP == MAX_TOP_LOGPROBS);

impl CudaBackend {
    /// `Backend::sample` on the device: `logits` is an f32 `[rows.len(), vocab]` tensor (from
    /// `alloc_logits` + `linear`).
    pub(crate) fn sample_on_device(
        &mut self,
        logits: &Tensor,
        rows: &[RowSampling],
        logprobs: Option<usize>,
    ) -> Result<Vec<SampledToken>, OpError> {
        const OP: &str = "sample";
        self.bind(OP)?;
        let vocab = checks::sample_args(
            OP,
            storage::BACKEND_NAME,
            logits.shape(),
            rows.len(),
            logprobs,
        )?;
        // The kernel computes the chosen logprob anyway (one more pass over a row it has read).
        let n_top = logprobs.unwrap_or(0);
        let n_rows = rows.len();
        if n_rows == 0 {
            return Ok(Vec::new());
        }
        let stream = self.dev.stream.clone();
        let logits_ptr = match storage::tensor(OP, "logits", logits)? {
            DevBuf::F32(s) => raw(s, &stream),
            DevBuf::Bf16(_) => {
                return Err(OpError::DTypeMismatch {
                    op: OP,
                    operand: "logits",
                    expected: "f32 (allocate with alloc_logits)".to_owned(),
                    actual: DType::BF16,
                })
            }
        };
        // Parameters packed as one u32 upload: temperature, top_k, top_p, uniform (f32 bits).
        let mut params: Vec<u32> = Vec::with_capacity(4 * n_rows);
        params.extend(rows.iter().map(|r| r.temperature.to_bits()));
        params.extend(rows.iter().map(|r| r.top_k));
        params.extend(rows.iter().map(|r| r.top_p.to_bits()));
        params.extend(rows.iter().map(|r| r.clamped_uniform().to_bits()));
        let params_buf = stream.clone_htod(&params).map_err(|e| device_err(OP, e))?;
        let ids_buf = stream
            .alloc_zeros::<u32>(n_rows * (1 + SAMPLE_MAX_TOP))
            .map_err(|e| device_err(OP, e))?;
        let lp_buf = stream
            .alloc_zeros::<f32>(n_rows * (1 + SAMPLE_MAX_TOP))
            .map_err(|e| device_err(OP, e))?;
        let p = raw(&params_buf, &stream);
        let (ids, lps) = (raw(&ids_buf, &stream), raw(&lp_buf, &stream));
        let n = n_rows as u64;
        let vocab32 = u32::try_from(vocab).map_err(|_| device_err(OP, "vocab exceeds u32"))?;
        let args = [
            Arg::Ptr(logits_ptr),
            Arg::U32(vocab32),
            Arg::U32(vocab32),
            Arg::Ptr(p),
            Arg::Ptr(p + 4 * n),
            Arg::Ptr(p + 8 * n),
            Arg::Ptr(p + 12 * n),
            Arg::U32(n_top as u32),
            Arg::Ptr(ids),
            Arg::Ptr(lps),
            Arg::Ptr(ids + 4 * n),
            Arg::Ptr(lps + 4 * n),
        ];
        self.launch(
            OP,
            Kernel::SampleRows,
            geometry::sample_launch(n_rows as u32),
            &args,
        )?;
        let ids_host = stream.clone_dtoh(&ids_buf).map_err(|e| device_err(OP, e))?;
        let lps_host = stream.clone_dtoh(&lp_buf).map_err(|e| device_err(OP, e))?;
        stream.synchronize().map_err(|e| device_err(OP, e))?;
        let top_base = n_rows;
        Ok((0..n_rows)
            .map(|r| SampledToken {
                token: ids_host[r],
                logprob: if logprobs.is_some() {
                    lps_host[r]
                } else {
                    f32::NAN
                },
                top: (0..n_top)
                    .map(|j| {
                        let at = top_base + r * SAMPLE_MAX_TOP + j;
                        (ids_host[at], lps_host[at])
                    })
                    .collect(),
            })
            .collect())
    }
}
