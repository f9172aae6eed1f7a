//! The router: the public gRPC API and the routing of requests over worker groups.
//!
//! [`Router`] validates a request (through `allam_request::validate`, off the async workers),
//! picks a worker group by least outstanding work with prefix-cache affinity (the `policy`
//! module's docs give the cost function), runs it there over the internal `allam.worker.v1` API, and
//! retries once on another group if the first fails before its first token. Membership is a
//! static list or an etcd watch. [`serve_grpc`] exposes it as `allam.v1.Generation` with gRPC
//! health and reflection; `allam-http` puts the OpenAI API on the same `Router`.
//!
//! Invariants: the router never touches engine, model or backend (it ships without CUDA);
//! nothing is queued without bound (a full cluster answers RESOURCE_EXHAUSTED at once); after a
//! request's first token reached the client it is never re-run.

mod attempt;
mod config;
mod convert;
mod error;
mod groups;
mod grpc;
mod metrics;
mod policy;
mod router;

pub use attempt::GenerationStream;
pub use config::{
    GroupStatus, Membership, ModelInfo, RequestContext, RouterConfig, TlsConfig, WorkerClientTls,
};
pub use error::Error;
pub use grpc::serve_grpc;
pub use policy::Health;
pub use router::Router;
