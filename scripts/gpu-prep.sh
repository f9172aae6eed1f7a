#!/usr/bin/env bash
# scripts/gpu-prep.sh: run on the BUILD machine (Rust, no GPU) before a GPU session. Fills the
# git-ignored folder .gpu/ with what scripts/gpu-check.sh needs on a GPU machine that has no
# Rust and no internet:
#     .gpu/allam.gz         release `allam` binary, debug info stripped, gzipped
#     .gpu/fixtures/        tiny-allam + tiny-allam-gqa (weights, tokenizer, goldens)
#     .gpu/hf_baseline.py   the transformers baseline of the benchmark
# The whole folder stays well under the 64 MiB a device run may carry (it prints the size).
# Usage: scripts/gpu-prep.sh   (env: CARGO_TARGET_DIR, ALLAM_SHARED=path of ../shared)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SHARED=${ALLAM_SHARED:-$ROOT/../shared}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/root/.cache/allam-serve/target}
GPU_DIR=$ROOT/.gpu

echo "gpu-prep: building the release binary" >&2
cargo build --release -p allam-serve --bin allam
mkdir -p "$GPU_DIR"
rm -f "$GPU_DIR/allam" "$GPU_DIR/allam.gz"
cp "$CARGO_TARGET_DIR/release/allam" "$GPU_DIR/allam"
# Line tables make panics readable but triple the size; the GPU run needs the code only.
if command -v objcopy >/dev/null; then objcopy --strip-debug "$GPU_DIR/allam"; fi
gzip -9 "$GPU_DIR/allam"

echo "gpu-prep: copying fixtures and the transformers baseline" >&2
rm -rf "$GPU_DIR/fixtures"
mkdir -p "$GPU_DIR/fixtures"
for model in tiny-allam tiny-allam-gqa; do
    cp -r "$SHARED/fixtures/$model" "$GPU_DIR/fixtures/$model"
done
cp "$SHARED/fixtures/README.md" "$GPU_DIR/fixtures/README.md"
cp "$SHARED/bench/hf_baseline.py" "$GPU_DIR/hf_baseline.py"
rm -rf "$GPU_DIR/out"

size_kib=$(du -sk "$GPU_DIR" | cut -f1)
echo "gpu-prep: .gpu/ is $((size_kib / 1024)) MiB" >&2
if (( size_kib > 60 * 1024 )); then
    echo "gpu-prep: WARNING: over 60 MiB; a device run carries at most 64 MiB" >&2
fi
echo "gpu-prep: on the GPU machine run: bash scripts/gpu-check.sh   (carry: .gpu)" >&2
