//! The one error type of the backend layer. Every variant names the op (or weight) it came
//! from, so a failure deep inside a forward pass still says which call and which shapes.

/// A failed backend operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operand's shape does not fit the op.
    #[error("{op}: operand `{operand}` has shape {actual:?}, expected {expected}")]
    ShapeMismatch {
        op: &'static str,
        operand: &'static str,
        expected: String,
        actual: Vec<usize>,
    },
    /// An operand has a dtype the op does not accept.
    #[error("{op}: operand `{operand}` has dtype {actual}, expected {expected}")]
    DTypeMismatch {
        op: &'static str,
        operand: &'static str,
        expected: String,
        actual: crate::DType,
    },
    /// A handle made by another backend (or a different handle kind) was passed in.
    #[error("{op}: operand `{operand}` was not created by backend `{backend}`")]
    ForeignHandle {
        op: &'static str,
        operand: &'static str,
        backend: &'static str,
    },
    /// Raw weight bytes do not match the declared dtype and shape.
    #[error(
        "uploading weight `{name}`: got {actual_bytes} bytes, expected {expected_bytes} for {dtype} {shape:?}"
    )]
    WeightBytes {
        name: String,
        dtype: crate::DType,
        shape: Vec<usize>,
        expected_bytes: usize,
        actual_bytes: usize,
    },
    /// A `StepBatch` breaks one of its documented invariants.
    #[error("{op}: invalid step batch: {detail}")]
    InvalidBatch { op: &'static str, detail: String },
    /// The device (or the configured CPU budget) cannot hold an allocation.
    #[error(
        "out of memory allocating {what}: {requested_bytes} bytes requested, {free_bytes} free"
    )]
    OutOfMemory {
        what: String,
        requested_bytes: u64,
        free_bytes: u64,
    },
    /// The backend does not implement this op or mode (yet).
    #[error("{op} is not supported by backend `{backend}`: {detail}")]
    Unsupported {
        op: &'static str,
        backend: &'static str,
        detail: String,
    },
    /// A collective with the other ranks of a tensor-parallel group failed (a peer died,
    /// hung or fell out of step); the group is unusable from then on.
    #[error("{op}: collective with the tensor-parallel group failed: {message}")]
    Collective { op: &'static str, message: String },
    /// The device or its driver reported a failure.
    #[error("device error in {op} on backend `{backend}`: {message}")]
    Device {
        op: &'static str,
        backend: &'static str,
        message: String,
    },
}

impl Error {
    /// A short stable label for metrics (`reason` of `allam_request_failures_total`).
    pub fn reason(&self) -> &'static str {
        match self {
            Error::ShapeMismatch { .. } => "shape_mismatch",
            Error::DTypeMismatch { .. } => "dtype_mismatch",
            Error::ForeignHandle { .. } => "foreign_handle",
            Error::WeightBytes { .. } => "weight_bytes",
            Error::InvalidBatch { .. } => "invalid_batch",
            Error::OutOfMemory { .. } => "out_of_memory",
            Error::Unsupported { .. } => "unsupported",
            Error::Collective { .. } => "collective",
            Error::Device { .. } => "device_error",
        }
    }

    /// Builds a [`Error::ShapeMismatch`]; `expected` is free text such as `"[n, 256]"`.
    pub fn shape(
        op: &'static str,
        operand: &'static str,
        expected: impl Into<String>,
        actual: &[usize],
    ) -> Error {
        Error::ShapeMismatch {
            op,
            operand,
            expected: expected.into(),
            actual: actual.to_vec(),
        }
    }
}
