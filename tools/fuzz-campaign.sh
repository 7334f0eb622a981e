#!/usr/bin/env bash
# A fuzzing campaign, not for CI:
#   tools/fuzz-campaign.sh [-n RUNS] [-t SECONDS] [-s address|none] [-u SECONDS] [TARGET...]
# Runs each target (default: all in vmm/fuzz) until RUNS executions (default 10 M) or SECONDS
# (default 3600) have passed, whichever comes first, then prints one line per target:
# executions, exec/s, crashes, timeouts and slow units of this run, corpus size. Crashing
# inputs stay under vmm/fuzz/artifacts/TARGET/; logs under vmm/fuzz/campaign/.
#
# -s picks the sanitizer (cargo fuzz --sanitizer): address (the default, as in tools/fuzz.sh)
# or none. The decoders fuzzed here are safe Rust, so AddressSanitizer finds little that Rust's
# own checks do not; with none, bounds checks, panics and debug assertions (integer overflow
# included) still crash the target, and coverage and comparison tracing still guide the
# fuzzer, at several times the executions per second. A campaign with -s none is a real one;
# unsafe code reached from a target still wants an address run now and then.
#
# -u is libFuzzer's -timeout for one input (default 1200 s, libFuzzer's own). It is wall-clock
# time: a fuzzer stopped (SIGSTOP, a suspended shell) for longer reports the input it was on as
# a timeout and ends. On a host where others pause background work, raise it.
set -euo pipefail

usage="usage: $0 [-n RUNS] [-t SECONDS] [-s address|none] [-u SECONDS] [TARGET...]"
runs=10000000
secs=3600
sanitizer=address
unit_timeout=1200
while getopts "n:t:s:u:" o; do
    case $o in
        n) runs=$OPTARG ;;
        t) secs=$OPTARG ;;
        s) sanitizer=$OPTARG ;;
        u) unit_timeout=$OPTARG ;;
        *) echo "$usage" >&2; exit 2 ;;
    esac
done
case $sanitizer in
    address|none) ;;
    *)
        echo "fuzz-campaign.sh: -s takes address or none, not '$sanitizer'" >&2
        echo "$usage" >&2
        exit 2
        ;;
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
    # Artifacts newer than this are this run's.
    stamp="campaign/$t.start"
    touch "$stamp"
    rc=0
    cargo ${toolchain[@]+"${toolchain[@]}"} fuzz run --sanitizer "$sanitizer" --debug-assertions \
        "$t" "corpus/$t" -- \
        -runs="$runs" -max_total_time="$secs" -timeout="$unit_timeout" -print_final_stats=1 \
        >"$log" 2>&1 || rc=$?
    took=$(( $(date +%s) - start ))
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    found() { find "artifacts/$t" -type f -newer "$stamp" -name "$1" 2>/dev/null | wc -l; }
    crashes=$(( $(found 'crash-*') + $(found 'leak-*') + $(found 'oom-*') ))
    timeouts=$(found 'timeout-*')
    slow=$(found 'slow-unit-*')
    corpus=$(find "corpus/$t" -type f | wc -l)
    (( rc == 0 )) || status=1
    summary+=("$(printf '%-14s %12s execs %8s exec/s %5s s  crashes %s  timeouts %s  slow %s' \
        "$t" "${execs:-?}" "${rate:-?}" "$took" "$crashes" "$timeouts" "$slow")$(printf \
        '  corpus %s  exit %s  sanitizer %s' "$corpus" "$rc" "$sanitizer")")
done
printf '%s\n' "${summary[@]}"
exit $status
