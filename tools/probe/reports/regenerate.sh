#!/usr/bin/env bash
# Regenerates the committed probe reports (tools/probe/reports/README.md): the host's and the
# lab guest's, each as JSON and Markdown. Run from anywhere; needs target/debug/{vmm,vmm-probe}
# (cargo build -p vmm-cli -p vmm-probe), target/debug/vmm-gpu-test-device (cargo build -p
# gpu-test-device) and, for the lab guest, root and /dev/kvm.
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
# The GPU test device under vfio-pci no-IOMMU in the lab guest (its own boot, ~100 s): the
# device is started here and killed afterwards.
gpu=${VMM_GPU_TEST_DEVICE:-$(dirname "$vmm")/vmm-gpu-test-device}
sock=$(mktemp -u /tmp/vmm-probe-gpu-XXXXXX.sock)
"$gpu" --socket "$sock" --vram-size 16M --json > "$sock.ready" &
gpu_pid=$!
trap 'kill "$gpu_pid" 2>/dev/null; rm -f "$sock" "$sock.ready"' EXIT
for _ in $(seq 100); do grep -q '"ready":true' "$sock.ready" 2>/dev/null && break; sleep 0.1; done
"$vmm" probe --in-guest --gpu-device "$sock" --json \
    --markdown "$here/lab-guest-gpu-noiommu.md" > "$here/lab-guest-gpu-noiommu.json.tmp"
mv "$here/lab-guest-gpu-noiommu.json.tmp" "$here/lab-guest-gpu-noiommu.json"
echo "regenerated: $(cd "$here" && ls host-pvm.* lab-guest.*)"
