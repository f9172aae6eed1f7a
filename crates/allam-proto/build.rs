//! Generates the tonic/prost code for `proto/allam/v1` (public) and `proto/allam/worker/v1`
//! (internal), plus one encoded file descriptor set that the servers hand to gRPC reflection.
//!
//! protoc comes from `PROTOC` when set, else the `protoc` on PATH (Debian `protobuf-compiler`;
//! `libprotobuf-dev` is not needed here because our files import no well-known types).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest_dir.join("../../proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        proto_root.join("allam/v1/generation.proto"),
        proto_root.join("allam/worker/v1/worker.proto"),
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", proto.display());
    }
    println!("cargo:rerun-if-env-changed=PROTOC");
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("allam_descriptor.bin"))
        .compile_protos(&protos, &[proto_root])?;
    Ok(())
}
