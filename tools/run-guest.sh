#!/usr/bin/env bash
# The main job: boot the Linux test guest on /dev/kvm with its console on this terminal.
# Builds (and caches) the guest images and installs missing Debian packages first.
#
#   tools/run-guest.sh                 boot with 2 vCPUs, print the agent's report, power off
#   tools/run-guest.sh --interactive   boot and keep the console (agent commands or `sh`;
#                                      Ctrl-A x quits)
#   tools/run-guest.sh [vmm run options...]   e.g. --vcpus 1 --mem 256M --disk disk.img
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

agent="cpus;meminfo;poweroff"
if [[ ${1:-} == --interactive ]]; then
    agent="cpus;meminfo"
    shift
fi

bash guest-images/build.sh
echo "run-guest: building vmm (release)"
cargo build --release -q -p vmm-cli
# shellcheck disable=SC1091
source guest-images/out/images.env
echo "run-guest: booting $VMM_KERNEL (guest ring 0 is emulated on PVM hosts: ~30 s to the agent)"
exec target/release/vmm run --kernel "$VMM_KERNEL" --initrd "$VMM_INITRAMFS" \
    --vcpus 2 --mem 128M --agent "$agent" "$@"
