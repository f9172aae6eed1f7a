//! `out = x W^T` through cuBLAS (bf16 inputs, f32 accumulation, bf16 or f32 output).
//!
//! cuBLAS is column-major. A row-major `[rows, cols]` matrix is the column-major
//! `[cols, rows]` one, so `out^T = W x^T` is computed as `C = op(A) B` with A = W read
//! transposed (`[in, out]` column-major, lda = in), B = x (lda = in) and C = out (ldc = out).
//! `gemm_dims` is the one place this mapping lives; its test replays it through a
//! column-major reference GEMM.

use std::ffi::c_void;

use cudarc::cublas::sys::{cublasComputeType_t, cublasOperation_t, cudaDataType};

/// Arguments of one `cublasGemmEx` call for `out[rows, n] = x[rows, k] W[n, k]^T`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GemmDims {
    pub(crate) transa: bool,
    pub(crate) transb: bool,
    pub(crate) m: i32,
    pub(crate) n: i32,
    pub(crate) k: i32,
    pub(crate) lda: i32,
    pub(crate) ldb: i32,
    pub(crate) ldc: i32,
}

/// The mapping, or a message when a dimension does not fit cuBLAS' `int`.
pub(crate) fn gemm_dims(rows: usize, k: usize, n: usize) -> Result<GemmDims, String> {
    let int = |v: usize, what: &str| {
        i32::try_from(v).map_err(|_| format!("{what} = {v} exceeds cuBLAS' int range"))
    };
    Ok(GemmDims {
        transa: true,
        transb: false,
        m: int(n, "out features")?,
        n: int(rows, "rows")?,
        k: int(k, "in features")?,
        lda: int(k, "in features")?,
        ldb: int(k, "in features")?,
        ldc: int(n, "out features")?,
    })
}

/// Output element type of a GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GemmOut {
    Bf16,
    F32,
}

/// Enqueues the GEMM on the handle's stream.
///
/// # Safety
/// `w`, `x`, `out` are device pointers to at least `n*k`, `rows*k` bf16 and `rows*n`
/// elements of `out_type`, valid until the stream reaches this call.
pub(crate) unsafe fn gemm_bf16(
    handle: cudarc::cublas::sys::cublasHandle_t,
    dims: GemmDims,
    w: u64,
    x: u64,
    out: u64,
    out_type: GemmOut,
) -> Result<(), cudarc::cublas::result::CublasError> {
    let op = |t: bool| {
        if t {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    };
    let alpha = 1.0f32;
    let beta = 0.0f32;
    let c_type = match out_type {
        GemmOut::Bf16 => cudaDataType::CUDA_R_16BF,
        GemmOut::F32 => cudaDataType::CUDA_R_32F,
    };
    // SAFETY: forwarded from the caller; alpha/beta live on this stack frame for the call
    // (host pointer mode: cuBLAS reads them before returning).
    unsafe {
        cudarc::cublas::result::gemm_ex(
            handle,
            op(dims.transa),
            op(dims.transb),
            dims.m,
            dims.n,
            dims.k,
            (&alpha as *const f32).cast::<c_void>(),
            w as *const c_void,
            cudaDataType::CUDA_R_16BF,
            dims.lda,
            x as *const c_void,
            cudaDataType::CUDA_R_16BF,
            dims.ldb,
            (&beta as *const f32).cast::<c_void>(),
            out as *mut c_void,
            c_type,
            dims.ldc,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cudarc::cublas::sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Column-major `C[m, n] = op(A) op(B)` exactly as the BLAS reference defines it.
    fn colmajor_gemm(d: GemmDims, a: &[f32], b: &[f32], c: &mut [f32]) {
        let (m, n, k) = (d.m as usize, d.n as usize, d.k as usize);
        let (lda, ldb, ldc) = (d.lda as usize, d.ldb as usize, d.ldc as usize);
        for j in 0..n {
            for i in 0..m {
                let mut acc = 0.0f32;
                for p in 0..k {
                    let av = if d.transa {
                        a[p + i * lda]
                    } else {
                        a[i + p * lda]
                    };
                    let bv = if d.transb {
                        b[j + p * ldb]
                    } else {
                        b[p + j * ldb]
                    };
                    acc += av * bv;
                }
                c[i + j * ldc] = acc;
            }
        }
    }

    #[test]
    fn mapping_computes_x_times_w_transposed() {
        let (rows, k, n) = (3usize, 5usize, 4usize);
        let x: Vec<f32> = (0..rows * k).map(|i| (i as f32 * 0.7).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.3).cos()).collect();
        let d = gemm_dims(rows, k, n).expect("fits");
        let mut out = vec![0.0; rows * n];
        colmajor_gemm(d, &w, &x, &mut out);
        for r in 0..rows {
            for c in 0..n {
                let want: f32 = (0..k).map(|i| x[r * k + i] * w[c * k + i]).sum();
                assert!((out[r * n + c] - want).abs() < 1e-5, "out[{r},{c}]");
            }
        }
    }

    #[test]
    fn oversized_dimensions_are_reported() {
        let err = gemm_dims(1, 1 << 31, 4).expect_err("too big");
        assert!(err.contains("in features"), "{err}");
    }
}
