//! Generated gRPC code for allam-serve's two APIs, and nothing else.
//!
//! - [`v1`]: the public `allam.v1.Generation` service (a reviewed, append-only boundary).
//! - [`worker::v1`]: the internal `allam.worker.v1.Worker` service between router and worker
//!   groups; it reuses `allam.v1` messages for parameters, logprobs and usage.
//!
//! Conversions to and from `allam_types` live at the edges (router, worker), not here, so this
//! crate stays a thin mirror of the `.proto` files.

/// `allam.v1`: the public API.
#[allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]
pub mod v1 {
    tonic::include_proto!("allam.v1");
}

/// `allam.worker.v1`: the internal router → worker API.
pub mod worker {
    #[allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]
    pub mod v1 {
        tonic::include_proto!("allam.worker.v1");
    }
}

/// Encoded `FileDescriptorSet` of both packages, for `tonic_reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/allam_descriptor.bin"));

/// Fully qualified name of the public service, as gRPC health and reflection name it.
pub const GENERATION_SERVICE_NAME: &str = "allam.v1.Generation";
/// Fully qualified name of the internal worker service.
pub const WORKER_SERVICE_NAME: &str = "allam.worker.v1.Worker";

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn descriptor_set_holds_both_packages() {
        let set = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET)
            .expect("the build script wrote a valid descriptor set");
        let services: Vec<String> = set
            .file
            .iter()
            .flat_map(|f| {
                let package = f.package.clone().unwrap_or_default();
                f.service
                    .iter()
                    .map(move |s| format!("{package}.{}", s.name.clone().unwrap_or_default()))
            })
            .collect();
        assert!(
            services.iter().any(|s| s == GENERATION_SERVICE_NAME),
            "{services:?}"
        );
        assert!(
            services.iter().any(|s| s == WORKER_SERVICE_NAME),
            "{services:?}"
        );
    }

    #[test]
    fn absent_optional_params_decode_as_none() {
        // proto3 `optional` is what lets "absent" mean "server default"; a plain scalar would
        // decode an absent temperature as 0.0 (greedy).
        let params = v1::SamplingParams {
            top_p: Some(0.9),
            ..Default::default()
        };
        let decoded = v1::SamplingParams::decode(params.encode_to_vec().as_slice())
            .expect("round trip of a message we just encoded");
        assert_eq!(decoded.temperature, None);
        assert_eq!(decoded.top_p, Some(0.9));
        let explicit_zero = v1::SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        };
        let decoded = v1::SamplingParams::decode(explicit_zero.encode_to_vec().as_slice())
            .expect("round trip of a message we just encoded");
        assert_eq!(decoded.temperature, Some(0.0));
    }
}
