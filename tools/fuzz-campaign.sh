#!/usr/bin/env bash
# A fuzzing campaign, not for CI:
#   tools/fuzz-campaign.sh [-n RUNS] [-t SECONDS] [-s address|none] [TARGET...]
# Runs each target (default: all in vmm/fuzz) until RUNS executions (default 10 M) or SECONDS
# (default 3600) have passed, whichever comes first, then prints one line per target:
# executions, exec/s, crashes, corpus size. Crashing inputs stay under
# vmm/fuzz/artifacts/TARGET/; logs under vmm/fuzz/campaign/.
#
# -s picks the sanitizer (cargo fuzz --sanitizer): address (the default, as in tools/fuzz.sh)
# or none. The decoders fuzzed here are safe Rust, so AddressSanitizer finds little that Rust's
# own checks do not; with none, bounds checks, panics and debug assertions (integer overflow
# included) still crash the target, and coverage and comparison tracing still guide the
# fuzzer, at several times the executions per second. A campaign with -s none is a real one;
# unsafe code reached from a target still wants an address run now and then.
set -euo pipefail

usage="usage: $0 [-n RUNS] [-t SECONDS] [-s address|none] [TARGET...]"
runs=10000000
secs=3600
sanitizer=address
while getopts "n:t:s:" o; do
    case $o in
        n) runs=$OPTARG ;;
        t) secs=$OPTARG ;;
        s) sanitizer=$OPTARG ;;
        *) echo "$usage" >&2; exit 2 ;;
    esac
done
case $sanitizer in
    address|none) ;;
    *) echo "fuzz-campaign.sh: -s takes address or none, not '$sanitizer'" >&2; echo "$usage" >&2; exit 2 ;;
esac
shift $((OPTIND - 1))
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root/vmm/fuzz"
targets=("$@")
(( ${#targets[@]} )) || targets=(frame_decoder hello state_restore api_request page_proto)

toolchain=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    toolchain=(+nightly)
else
    export RUSTC_BOOTSTRAP=1
fi
cargo ${toolchain[@]+"${toolchain[@]}"} fuzz build --sanitizer "$sanitizer" --debug-assertions
mkdir -p campaign
summary=()
status=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    log="campaign/$t.log"
    start=$(date +%s)
    rc=0
    cargo ${toolchain[@]+"${toolchain[@]}"} fuzz run --sanitizer "$sanitizer" --debug-assertions \
        "$t" "corpus/$t" -- \
        -runs="$runs" -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1 || rc=$?
    took=$(( $(date +%s) - start ))
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    crashes=$(find "artifacts/$t" -type f 2>/dev/null | wc -l)
    corpus=$(find "corpus/$t" -type f | wc -l)
    (( rc == 0 )) || status=1
    summary+=("$(printf '%-14s %12s execs %8s exec/s %4s s  crashes %s  corpus %s  exit %s  sanitizer %s' \
        "$t" "${execs:-?}" "${rate:-?}" "$took" "$crashes" "$corpus" "$rc" "$sanitizer")")
done
printf '%s\n' "${summary[@]}"
exit $status
