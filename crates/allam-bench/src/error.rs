//! The crate's one error type: everything that stops a benchmark before or instead of running
//! it (bad configuration, an unreadable dataset, an unreachable gRPC endpoint).
//!
//! A request that fails while the benchmark runs is *not* an `Error`: it is counted in the
//! report under its failure kind, because failures under load are a measurement.

use std::path::PathBuf;

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration field is out of range or contradicts another.
    #[error("invalid benchmark setting `{field}`: {reason}")]
    InvalidConfig {
        /// The `BenchConfig` field (CLI flags use the same words).
        field: &'static str,
        /// What is wrong with it, with the value given.
        reason: String,
    },
    /// The JSONL dataset file could not be read.
    #[error("cannot read dataset {}: {source}", path.display())]
    DatasetRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// One line of the JSONL dataset is not a valid entry.
    #[error("dataset {}, line {line}: {reason}", path.display())]
    DatasetLine {
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        reason: String,
    },
    /// The JSONL dataset holds no entries.
    #[error("dataset {} holds no prompts", path.display())]
    DatasetEmpty { path: PathBuf },
    /// The gRPC endpoint is not a valid URI.
    #[error("invalid gRPC endpoint `{endpoint}`: {source}")]
    InvalidEndpoint {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The gRPC endpoint did not accept a connection.
    #[error("cannot connect to gRPC endpoint `{endpoint}`: {source}")]
    Connect {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The API key cannot be sent as a header / metadata value.
    #[error("the API key is not a valid header value (it must be visible ASCII)")]
    InvalidApiKey,
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {source}")]
    HttpClient {
        #[source]
        source: reqwest::Error,
    },
}
