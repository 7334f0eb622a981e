#!/usr/bin/env bash
# A fuzzing campaign, not for CI: tools/fuzz-campaign.sh [-n RUNS] [-t SECONDS] [TARGET...]
# Runs each target (default: all in vmm/fuzz) until RUNS executions (default 10 M) or SECONDS
# (default 3600) have passed, whichever comes first, then prints one line per target:
# executions, exec/s, crashes, corpus size. Crashing inputs stay under
# vmm/fuzz/artifacts/TARGET/; logs under vmm/fuzz/campaign/.
set -euo pipefail

runs=10000000
secs=3600
while getopts "n:t:" o; do
    case $o in
        n) runs=$OPTARG ;;
        t) secs=$OPTARG ;;
        *) echo "usage: $0 [-n RUNS] [-t SECONDS] [TARGET...]" >&2; exit 2 ;;
    esac
done
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
cargo ${toolchain[@]+"${toolchain[@]}"} fuzz build --debug-assertions
mkdir -p campaign
summary=()
status=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    log="campaign/$t.log"
    start=$(date +%s)
    rc=0
    # -fork keeps going after a crash so one finding does not end the campaign; with one job
    # the execution count is that of a plain run.
    cargo ${toolchain[@]+"${toolchain[@]}"} fuzz run --debug-assertions "$t" "corpus/$t" -- \
        -runs="$runs" -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1 || rc=$?
    took=$(( $(date +%s) - start ))
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    crashes=$(find "artifacts/$t" -type f 2>/dev/null | wc -l)
    corpus=$(find "corpus/$t" -type f | wc -l)
    (( rc == 0 )) || status=1
    summary+=("$(printf '%-14s %12s execs %8s exec/s %4s s  crashes %s  corpus %s  exit %s' \
        "$t" "${execs:-?}" "${rate:-?}" "$took" "$crashes" "$corpus" "$rc")")
done
printf '%s\n' "${summary[@]}"
exit $status
