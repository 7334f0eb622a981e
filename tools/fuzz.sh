#!/usr/bin/env bash
# Fuzzes the migration frame decoder for a bounded time: tools/fuzz.sh [SECONDS] [libFuzzer args]
# (default 60 s). Exits non-zero if the target crashes; the crashing input is left under
# vmm/fuzz/artifacts/frame_decoder/. The corpus grows in vmm/fuzz/corpus/ (not in git) and is
# reused by later runs.
set -euo pipefail

secs="${1:-60}"
shift || true
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fuzz_dir="$root/vmm/fuzz"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

# cargo fuzz passes nightly-only flags (-Zsanitizer=address); on a stable-only machine
# RUSTC_BOOTSTRAP lets the stable compiler accept them.
toolchain=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    toolchain=(+nightly)
else
    echo "fuzz.sh: no nightly toolchain; using stable with RUSTC_BOOTSTRAP=1" >&2
    export RUSTC_BOOTSTRAP=1
fi

cd "$fuzz_dir"
mkdir -p corpus/frame_decoder
# Debug assertions on, so an integer overflow on hostile input counts as a crash.
exec cargo ${toolchain[@]+"${toolchain[@]}"} fuzz run --debug-assertions frame_decoder \
    corpus/frame_decoder -- -max_total_time="$secs" -print_final_stats=1 "$@"
