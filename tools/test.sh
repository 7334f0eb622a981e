#!/usr/bin/env bash
# Every test: formatting, lints, unit tests and the integration tests that boot real guests on
# /dev/kvm. Installs missing Debian packages and builds (or reuses cached) guest images first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash guest-images/build.sh
# The lab guest (6.12 + test_hmm + soft-dirty, vmm-probe as init): its test checks the probe's
# HMM rows in a real guest, so it must not be skipped here.
bash guest-images/build.sh --lab
export VMM_REQUIRE_LAB=1
echo "test: cargo fmt --check"
cargo fmt --all -- --check
echo "test: shellcheck tools/host-check.sh"
if ! command -v shellcheck >/dev/null; then
    sudo=(); [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends shellcheck
fi
shellcheck tools/host-check.sh
echo "test: cargo clippy"
cargo clippy --workspace --all-targets -q -- -D warnings
# The vendored vfio_user crate is outside the workspace (it stays the upstream crate, patched):
# its own lints and tests run here too.
cargo clippy -p vfio_user --all-targets -q -- -D warnings
echo "test: building binaries"
cargo build --workspace --bins -q
echo "test: cargo test"
cargo test --workspace --no-fail-fast
cargo test -p vfio_user --no-fail-fast
echo "test: fuzzing every decoder target (frame, Hello, state restore, API, page server) for 90 s in all"
bash tools/fuzz.sh 90
