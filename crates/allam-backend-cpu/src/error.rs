//! Errors of constructing a CPU backend. Op failures use `allam_backend::Error`, the type the
//! `Backend` trait returns.

/// A CPU backend could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("building a rayon pool of {threads} threads for the CPU backend: {message}")]
    ThreadPool { threads: usize, message: String },
}

impl Error {
    /// A short stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::ThreadPool { .. } => "thread_pool",
        }
    }
}
