//! The worker crate's one error type: starting a group (device, weights, engine), serving its
//! internal gRPC API, and registering it in etcd.

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--device` is not `cpu`, `cuda` or `cuda:N`.
    #[error("`--device` must be `cpu`, `cuda` or `cuda:N`, got {given:?}")]
    InvalidDevice { given: String },
    /// The tokenizer has ids the model's embedding table lacks.
    #[error(
        "the model's vocabulary has {model_vocab} entries but the tokenizer's has {tokenizer_vocab}; \
         the tokenizer does not belong to this model"
    )]
    TokenizerMismatch {
        model_vocab: usize,
        tokenizer_vocab: usize,
    },
    #[error(transparent)]
    CpuBackend(#[from] allam_backend_cpu::Error),
    #[error(transparent)]
    CudaBackend(#[from] allam_backend_cuda::Error),
    #[error(transparent)]
    Model(#[from] allam_model::Error),
    #[error(transparent)]
    Engine(#[from] allam_engine::Error),
    #[error(transparent)]
    Membership(#[from] allam_membership::Error),
    #[error(transparent)]
    Tp(#[from] crate::tp::TpError),
    /// The internal gRPC server failed (bind, TLS, transport).
    #[error("worker gRPC server: {0}")]
    Serve(String),
}

impl Error {
    /// A short fixed label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidDevice { .. } => "invalid_device",
            Error::TokenizerMismatch { .. } => "tokenizer_mismatch",
            Error::CpuBackend(_) | Error::CudaBackend(_) => "backend",
            Error::Model(_) => "model",
            Error::Engine(e) => e.reason(),
            Error::Membership(e) => e.reason(),
            Error::Tp(e) => e.reason(),
            Error::Serve(_) => "serve",
        }
    }
}
