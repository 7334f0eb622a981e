#!/usr/bin/env bash
# Regenerates the committed probe reports (tools/probe/reports/README.md): the host's and the
# lab guest's, each as JSON and Markdown. Run from anywhere; needs target/debug/{vmm,vmm-probe}
# (cargo build -p vmm-cli -p vmm-probe) and, for the lab guest, root and /dev/kvm.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
vmm=${VMM_BIN:-$repo/target/debug/vmm}
cd "$repo"
"$vmm" probe --json > "$here/host-pvm.json.tmp"
mv "$here/host-pvm.json.tmp" "$here/host-pvm.json"
"$vmm" probe --in-guest --json > "$here/lab-guest.json.tmp"
mv "$here/lab-guest.json.tmp" "$here/lab-guest.json"
for r in host-pvm lab-guest; do
    "$vmm" probe --from-json "$here/$r.json" --markdown "$here/$r.md" > /dev/null
done
echo "regenerated: $(cd "$here" && ls host-pvm.* lab-guest.*)"
