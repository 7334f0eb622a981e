#!/usr/bin/env bash
# Soak and fault campaigns, not for CI: tools/soak.sh [-n HOPS] [-c CUTS] [-s SEED] [hops|cuts...]
# Builds release binaries and runs the ignored tests of tests/tests/soak.rs:
#   hops  one writing micro guest migrated HOPS times in a row (default 100; precopy with every
#         tracker offered here, postcopy, hybrid): 0 bytes may differ, per hop and at the end;
#   cuts  CUTS migrations (default 60; precopy and postcopy alternately) through a proxy that
#         cuts the link at a random byte: each must end with the documented outcome.
# Summaries (JSON) go to target/soak/<campaign>.json; one line each is printed at the end.
set -euo pipefail

hops=100
cuts=60
seed=""
while getopts "n:c:s:" o; do
    case $o in
        n) hops=$OPTARG ;;
        c) cuts=$OPTARG ;;
        s) seed=$OPTARG ;;
        *) echo "usage: $0 [-n HOPS] [-c CUTS] [-s SEED] [hops|cuts...]" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
campaigns=("$@")
(( ${#campaigns[@]} )) || campaigns=(hops cuts)

bash guest-images/build.sh >/dev/null
cargo build --release --workspace --bins -q
out="$root/target/soak"
mkdir -p "$out"
export VMM_SOAK_HOPS=$hops VMM_SOAK_CUTS=$cuts
[[ -z $seed ]] || export VMM_SOAK_SEED=$seed
for c in "${campaigns[@]}"; do
    case $c in
        hops|cuts) ;;
        *) echo "unknown campaign '$c' (hops, cuts)" >&2; exit 2 ;;
    esac
    echo "soak: $c"
    VMM_SOAK_OUT="$out/$c.json" cargo test --release -q -p vmm-tests --test soak -- \
        --ignored --exact "$c" --nocapture
done
for c in "${campaigns[@]}"; do
    python3 - "$out/$c.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
if s["campaign"] == "hops":
    print(f"hops: {s['hops']} migrations in {s['seconds']:.0f} s; bytes differing: "
          f"received vs paused {s['received_vs_paused_differing_bytes']}, "
          f"final vs never migrated {s['final_vs_never_migrated_differing_bytes']}")
else:
    print(f"cuts: {s['cuts']} cuts (seed {s['seed']}) in {s['seconds']:.0f} s; outcomes: "
          + "; ".join(f"{k} x{v}" for k, v in s["outcomes"].items())
          + f"; source finished intact: {s['source_finished_intact']}")
PY
done
