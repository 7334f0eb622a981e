#!/usr/bin/env bash
# Fuzzes every target in vmm/fuzz for a bounded time in all: tools/fuzz.sh [SECONDS] [libFuzzer
# args] (default 60 s, split evenly; the frame decoder gets twice a share). Exits non-zero if a
# target crashes; the crashing input is left under vmm/fuzz/artifacts/TARGET/. Corpora grow in
# vmm/fuzz/corpus/ (not in git) and are reused by later runs. A long campaign is
# tools/fuzz-campaign.sh, not this.
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
targets=(frame_decoder hello state_restore api_request page_proto)
# One build for all (the first run would otherwise build each target in turn).
cargo ${toolchain[@]+"${toolchain[@]}"} fuzz build --debug-assertions
share=$(( secs / (${#targets[@]} + 1) ))
(( share >= 5 )) || share=5
for t in "${targets[@]}"; do
    t_secs=$share
    [[ $t == frame_decoder ]] && t_secs=$(( 2 * share ))
    mkdir -p "corpus/$t"
    echo "fuzz.sh: $t for $t_secs s" >&2
    # Debug assertions on, so an integer overflow on hostile input counts as a crash.
    cargo ${toolchain[@]+"${toolchain[@]}"} fuzz run --debug-assertions "$t" "corpus/$t" -- \
        -max_total_time="$t_secs" -print_final_stats=1 "$@"
done
