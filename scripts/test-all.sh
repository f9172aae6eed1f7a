#!/usr/bin/env bash
# Runs every check and test of the project: the README's test command, and what .ci/run runs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# Build outside the clone so that CI and fresh clones build incrementally.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/allam-serve/target}"
eval "$(scripts/install-nvrtc.sh --print-env)"
export ALLAM_PYTHON="${ALLAM_PYTHON:-${ALLAM_CACHE:-$HOME/.cache/allam-serve}/pyclients/bin/python}"
# Tests find the fixtures at <workspace>/../shared/fixtures through a path compiled into them;
# a test binary reused from a build cache another clone filled would look in that clone, so
# name this clone's fixtures at run time.
if [[ -z ${ALLAM_FIXTURES:-} && -d ../shared/fixtures ]]; then
    export ALLAM_FIXTURES="$(cd ../shared/fixtures && pwd)"
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked --no-fail-fast
scripts/check-helm.sh
