//! One worker group: its engine (on rank 0) served to routers over the internal
//! `allam.worker.v1.Worker` gRPC API, plus gRPC health.
//!
//! Invariant: the worker never trusts the wire: every request is validated again
//! (`allam_request::validate` over the token ids) before it reaches the engine.

mod error;
pub mod group;
mod service;
pub mod tp;

pub use error::Error;
pub use service::{serve_worker, WorkerServerTls, WorkerService};
