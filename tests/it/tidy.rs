//! Checks the codebase rules that a machine can check: the crate dependency graph follows
//! ARCHITECTURE.md, every Rust file opens with a `//!` doc, `anyhow` stays in the root
//! package, and the public proto's fingerprint changes only together with its docs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::support::repo_root;

/// The allowed `allam-*` dependencies of each crate; ARCHITECTURE.md's crate map in code.
/// A new edge is an API change: update ARCHITECTURE.md in the same commit.
const ALLOWED_EDGES: &[(&str, &[&str])] = &[
    ("allam-types", &[]),
    ("allam-telemetry", &[]),
    ("allam-tokenizer", &["allam-types"]),
    ("allam-request", &["allam-types", "allam-tokenizer"]),
    ("allam-backend", &["allam-types"]),
    ("allam-comm", &["allam-types"]),
    ("allam-kernels", &[]),
    (
        "allam-backend-cpu",
        &["allam-types", "allam-backend", "allam-comm"],
    ),
    (
        "allam-backend-cuda",
        &[
            "allam-types",
            "allam-backend",
            "allam-comm",
            "allam-kernels",
            "allam-backend-cpu",
        ],
    ),
    (
        "allam-model",
        &[
            "allam-types",
            "allam-backend",
            "allam-comm",
            "allam-backend-cpu",
        ],
    ),
    (
        "allam-engine",
        &[
            "allam-types",
            "allam-request",
            "allam-tokenizer",
            "allam-model",
            "allam-backend",
            "allam-telemetry",
            "allam-backend-cpu",
        ],
    ),
    ("allam-proto", &["allam-types"]),
    ("allam-membership", &["allam-types", "allam-telemetry"]),
    (
        "allam-worker",
        &[
            "allam-types",
            "allam-engine",
            "allam-request",
            "allam-tokenizer",
            "allam-model",
            "allam-backend",
            "allam-backend-cpu",
            "allam-backend-cuda",
            "allam-comm",
            "allam-proto",
            "allam-membership",
            "allam-telemetry",
        ],
    ),
    (
        "allam-router",
        &[
            "allam-types",
            "allam-proto",
            "allam-request",
            "allam-tokenizer",
            "allam-membership",
            "allam-telemetry",
        ],
    ),
    (
        "allam-http",
        &[
            "allam-types",
            "allam-router",
            "allam-request",
            "allam-telemetry",
            "allam-tokenizer",
        ],
    ),
    ("allam-bench", &["allam-types", "allam-proto"]),
];

fn crate_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(repo_root().join("crates"))
        .expect("crates/ exists")
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.join("Cargo.toml").exists())
        .collect();
    dirs.sort();
    dirs
}

/// `allam-*` names in one dependency table of a Cargo.toml (a small line-based reader is
/// enough: our manifests only use `name.workspace = true` or `name = {...}` lines).
fn allam_deps(manifest: &str, table: &str) -> Vec<String> {
    let mut in_table = false;
    let mut deps = Vec::new();
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_table = line == format!("[{table}]");
            continue;
        }
        if in_table && line.starts_with("allam-") {
            let name: String = line
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            deps.push(name);
        }
    }
    deps
}

#[test]
fn crate_graph_follows_architecture() {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED_EDGES.iter().copied().collect();
    let mut problems = Vec::new();
    for dir in crate_dirs() {
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).expect("readable manifest");
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let Some(allowed_deps) = allowed.get(name.as_str()) else {
            problems.push(format!(
                "{name}: not in the crate map (tests/it/tidy.rs, ARCHITECTURE.md)"
            ));
            continue;
        };
        // Only the shipped graph is checked: tests may reach lower crates (the HTTP tests
        // start a real worker behind the router), which never ends up in a binary's image.
        for dep in allam_deps(&manifest, "dependencies") {
            if !allowed_deps.contains(&dep.as_str()) {
                problems.push(format!("{name} -> {dep} is not an allowed edge"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "crate graph problems:\n{}",
        problems.join("\n")
    );
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path
                .file_name()
                .is_some_and(|n| n == "target" || n == "fuzz_target")
            {
                continue;
            }
            rust_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_module_opens_with_a_doc_comment() {
    let root = repo_root();
    let mut files = Vec::new();
    rust_files(&root.join("crates"), &mut files);
    rust_files(&root.join("tests"), &mut files);
    let missing: Vec<String> = files
        .iter()
        .filter(|path| path.file_name().is_none_or(|n| n != "build.rs"))
        .filter(|path| {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            !first.starts_with("//!")
        })
        .map(|path| {
            path.strip_prefix(&root)
                .unwrap_or(path)
                .display()
                .to_string()
        })
        .collect();
    assert!(
        missing.is_empty(),
        "files without a `//!` header:\n{}",
        missing.join("\n")
    );
}

#[test]
fn anyhow_only_in_the_root_package() {
    let offenders: Vec<String> = crate_dirs()
        .into_iter()
        .filter(|dir| {
            let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap_or_default();
            manifest
                .lines()
                .any(|l| l.trim_start().starts_with("anyhow"))
                && !manifest.contains("[dev-dependencies]\nanyhow")
        })
        .map(|dir| dir.display().to_string())
        .collect();
    assert!(
        offenders.is_empty(),
        "library crates must use typed errors, not anyhow: {offenders:?}"
    );
}

/// FNV-1a: enough to notice an edit; not a security hash.
fn fingerprint(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[test]
fn public_proto_changes_come_with_doc_changes() {
    let root = repo_root();
    let mut protos: Vec<PathBuf> = std::fs::read_dir(root.join("proto/allam/v1"))
        .expect("proto/allam/v1 exists")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "proto"))
        .collect();
    protos.sort();
    let mut all = Vec::new();
    for proto in &protos {
        all.extend(std::fs::read(proto).expect("readable proto"));
    }
    let actual = format!("{:016x}", fingerprint(&all));
    let recorded_path = root.join("proto/allam/v1/FINGERPRINT");
    let recorded = std::fs::read_to_string(&recorded_path).unwrap_or_default();
    assert_eq!(
        recorded.trim(),
        actual,
        "proto/allam/v1 changed: v1 may only grow (never reuse field numbers). Update the API \
         section of README.md/ARCHITECTURE.md, then write {actual} into {}",
        recorded_path.display()
    );
}
