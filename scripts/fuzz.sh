#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 600: the reliability issue's
# 10 minutes) and prints one summary line per target; exits 1 if any target crashed.
#
#   scripts/fuzz.sh [SECONDS]
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`) and a C++ compiler. On a stable toolchain,
# RUSTC_BOOTSTRAP=1 lets rustc accept the -Z flags cargo-fuzz passes (sanitizer coverage).
# The committed seeds in fuzz/corpus/<target> are only read; what the fuzzer finds goes to
# $FUZZ_WORK/corpus/<target> (kept between runs), crashes to fuzz/artifacts/<target>/.
# Env: ALLAM_FIXTURES (default <repo>/../shared/fixtures), CARGO_TARGET_DIR (default
# ~/.cache/allam-serve/fuzz-target), FUZZ_WORK (default ~/.cache/allam-serve/fuzz-work),
# FUZZ_TARGETS (default: all), FUZZ_JOBS (libFuzzer -fork workers, default 1).
set -euo pipefail

seconds="${1:-600}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/allam-serve/fuzz-target}"
export ALLAM_FIXTURES="${ALLAM_FIXTURES:-$repo/../shared/fixtures}"
work="${FUZZ_WORK:-$HOME/.cache/allam-serve/fuzz-work}"
jobs="${FUZZ_JOBS:-1}"

cd "$repo/fuzz"
targets="${FUZZ_TARGETS:-$(cargo fuzz list)}"
for target in $targets; do
    cargo fuzz build -O "$target" 2>&1 | tail -n 3 || { echo "fuzz build of $target failed" >&2; exit 2; }
done

summary=()
failed=0
for target in $targets; do
    mkdir -p "$work/corpus/$target" "$work/logs"
    log="$work/logs/$target.log"
    echo "== $target: ${seconds}s (log: $log)"
    status=ok
    fork=()
    [ "$jobs" -gt 1 ] && fork=(-fork="$jobs" -ignore_crashes=0)
    # -rss_limit_mb: the tokenizer plus ASan stays well below; a leak or blow-up does not.
    if ! cargo fuzz run -O "$target" "$work/corpus/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=4096 -timeout=30 -print_final_stats=1 \
        "${fork[@]}" >"$log" 2>&1; then
        status=CRASH
        failed=1
    fi
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | awk '{s+=$2} END {print s+0}')
    [ "$runs" = 0 ] && runs=$(grep -oE '^#[0-9]+' "$log" | tail -n 1 | tr -d '#')
    cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -n 1 || true)
    corpus=$(find "$work/corpus/$target" -type f | wc -l)
    summary+=("$(printf '%-14s %-5s %10s execs  %-9s corpus %s' "$target" "$status" "${runs:-?}" "${cov:-cov: ?}" "$corpus")")
    if [ "$status" != ok ]; then
        grep -E 'panicked at|ERROR: libFuzzer|SUMMARY|Test unit written' "$log" | head -n 8 || true
    fi
done

echo
echo "fuzz summary (${seconds}s per target, $(date -u +%Y-%m-%dT%H:%MZ)):"
printf '  %s\n' "${summary[@]}"
exit "$failed"
