#!/usr/bin/env bash
# Builds the Linux test guest: a patched 6.1 kernel (ELF vmlinux + bzImage) and an initramfs
# (busybox + /init + the static vmm-agent). Each artefact is cached by a content hash of its
# inputs, so a second run with unchanged inputs is a cache hit and takes seconds.
# See guest-images/README.md. Usage: guest-images/build.sh   (no arguments: the default guest)
#   guest-images/build.sh --lab         the lab guest (6.12 + test_hmm + vmm-probe; lab.sh)
#   guest-images/build.sh --lab-kernel  only the lab kernel
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
CACHE=${VMM_IMAGE_CACHE:-$HOME/.cache/vmm-images}
OUT=$HERE/out
KERNEL_TARBALL=/usr/src/linux-source-6.1.tar.xz
KERNEL_FRAGMENT=$HERE/kernel/config-6.1.fragment
KERNEL_PATCH=$HERE/kernel/pvm-6.1.patch
INIT_SCRIPT=$HERE/initramfs/init
FSTAB=$HERE/initramfs/fstab
BUSYBOX=/bin/busybox
AGENT_TARGET_DIR=${CARGO_TARGET_DIR_AGENT:-$REPO/target/agent-static}
AGENT_TRIPLE=x86_64-unknown-linux-gnu
# Uncompressed: the kernel unpacks the initramfs in ring 0, which PVM emulates. Measured with
# QEMU 7.2 on a PVM host, a 2.7 MB busybox archive: ~10-19 s to unpack plain, 265 s gzip'd
# (1.3 MB); inflate costs far more emulated instructions than copying the extra bytes.
INITRAMFS_NAME=initramfs.cpio
PACKAGES=(linux-source-6.1 busybox-static flex bison bc libelf-dev libssl-dev cpio xz-utils
          gcc make libc6-dev binutils libclang-dev qemu-system-x86 iproute2)

say() { echo "guest-images: $*"; }
die() { echo "guest-images: error: $*" >&2; exit 1; }

# --- packages ------------------------------------------------------------------------------
ensure_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    say "installing missing packages: ${missing[*]}"
    local sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    "${sudo[@]}" apt-get update
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends \
        "${missing[@]}"
}

pkg_version() { dpkg-query -W -f='${Version}' "$1"; }

# sha256 of the named files and of every file under the named directories (paths included,
# so renames count), in a stable order. Missing paths are hashed as absent.
hash_paths() {
    local p
    for p in "$@"; do
        if [[ -d $p ]]; then
            find "$p" -type f -not -path '*/target/*' -print0 | LC_ALL=C sort -z |
                xargs -0 -r sha256sum | sed "s|  $REPO/|  |"
        elif [[ -f $p ]]; then
            sha256sum "$p" | sed "s|  $REPO/|  |"
        else
            echo "absent $p"
        fi
    done
}

short_hash() { sha256sum | cut -c1-16; }

# Runs a long command with its output in a log file, printing a line every 15 s; on failure
# prints the log's tail and exits.
run_logged() {
    local log=$1; shift
    echo "+ $*" >>"$log"
    "$@" >>"$log" 2>&1 &
    local pid=$! start=$SECONDS next=15 rc=0
    trap 'kill "$pid" 2>/dev/null || true' INT TERM
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        if (( SECONDS - start >= next )); then
            say "  still building, $(( SECONDS - start )) s"
            next=$(( next + 15 ))
        fi
    done
    wait "$pid" || rc=$?
    trap - INT TERM
    if [[ $rc -ne 0 ]]; then
        echo "guest-images: command failed (exit $rc): $*" >&2
        echo "guest-images: last 40 lines of $log:" >&2
        tail -n 40 "$log" >&2
        exit 1
    fi
}

# --- kernel ------------------------------------------------------------------------------
# Every CONFIG_X=v line of the fragment must be in .config, and no "# CONFIG_X is not set"
# option may be enabled: Kconfig silently drops options whose dependencies are missing.
kernel_verify_config() {
    local config=$1 line sym bad=0
    while IFS= read -r line; do
        if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
            sym=${BASH_REMATCH[1]}
            grep -qxF -- "$line" "$config" || {
                echo "guest-images: option not in .config: $line (got: $(grep -E "^(# )?$sym[= ]" "$config" || echo absent))" >&2
                bad=1
            }
        elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
            sym=${BASH_REMATCH[1]}
            if grep -qE "^$sym=[ym]" "$config"; then
                echo "guest-images: option should be off but is on: $(grep -E "^$sym=" "$config")" >&2
                bad=1
            fi
        fi
    done <"$KERNEL_FRAGMENT"
    [[ $bad -eq 0 ]] || die "kernel .config does not match $KERNEL_FRAGMENT (see above)"
}

kernel_build() {
    local dest=$1 log=$2 work=$3
    local src=$work/linux
    rm -rf "$work"
    mkdir -p "$src"
    say "  [1/6] extracting $KERNEL_TARBALL"
    run_logged "$log" tar -xf "$KERNEL_TARBALL" -C "$src" --strip-components=1
    say "  [2/6] applying $(basename "$KERNEL_PATCH")"
    run_logged "$log" patch -d "$src" -p1 --batch --forward -i "$KERNEL_PATCH"
    say "  [3/6] make tinyconfig + $(basename "$KERNEL_FRAGMENT")"
    run_logged "$log" make -C "$src" tinyconfig
    # merge_config.sh makes its temporary files in the current directory.
    run_logged "$log" env -C "$src" scripts/kconfig/merge_config.sh -m .config "$KERNEL_FRAGMENT"
    run_logged "$log" make -C "$src" olddefconfig
    kernel_verify_config "$src/.config"
    say "  [4/6] make -j$(nproc) vmlinux (log: $log)"
    run_logged "$log" make -C "$src" -j"$(nproc)" vmlinux
    say "  [5/6] make bzImage"
    run_logged "$log" make -C "$src" -j"$(nproc)" bzImage
    say "  [6/6] storing artefacts"
    cp "$src/vmlinux" "$dest/vmlinux"
    cp "$src/arch/x86/boot/bzImage" "$dest/bzImage"
    cp "$src/.config" "$dest/config"
    cp "$src/System.map" "$dest/System.map"
}

kernel_hash() {
    {
        echo "kernel-recipe-v1"
        hash_paths "$KERNEL_FRAGMENT" "$KERNEL_PATCH"
        declare -f kernel_build kernel_verify_config
        echo "linux-source-6.1 $(pkg_version linux-source-6.1)"
        echo "gcc $(gcc -dumpfullversion)"
    } | short_hash
}

# --- initramfs ---------------------------------------------------------------------------
# Busybox applets linked in the initramfs (the guest agent does the real work).
BUSYBOX_APPLETS=(sh ash cat echo ls mkdir mount umount sleep dmesg uname poweroff reboot)

# Packs one static Rust binary (cargo package PKG, binary BIN, built in TARGET_DIR) with
# busybox and its applets, INIT as /init and the fstab, as $dest/$INITRAMFS_NAME. Shared by the
# default initramfs (vmm-agent) and the lab one (vmm-probe, lab.sh).
static_initramfs_build() {
    local dest=$1 log=$2 work=$3 pkg=$4 bin=$5 target_dir=$6 init=$7
    shift 7
    local root=$work/root exe=$target_dir/$AGENT_TRIPLE/release/$bin a
    rm -rf "$work"
    mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,etc,root,var/tmp}
    say "  [1/3] cargo build --release -p $pkg (static, target dir $target_dir)"
    (cd "$REPO" && export RUSTFLAGS="-C target-feature=+crt-static" && run_logged "$log" \
        cargo build --release --locked -p "$pkg" --bin "$bin" --target "$AGENT_TRIPLE" \
        --target-dir "$target_dir")
    local headers
    headers=$(readelf -l "$exe")
    if [[ $headers == *"Requesting program interpreter"* ]]; then
        die "$exe is dynamically linked (expected a static binary)"
    fi
    say "  [2/3] assembling the tree"
    cp "$BUSYBOX" "$root/bin/busybox"
    for a in "$@"; do ln -s busybox "$root/bin/$a"; done
    strip -o "$root/sbin/$bin" "$exe"
    install -m 0755 "$init" "$root/init"
    install -m 0644 "$FSTAB" "$root/etc/fstab"
    mknod -m 0600 "$root/dev/console" c 5 1
    mknod -m 0666 "$root/dev/null" c 1 3
    say "  [3/3] packing $INITRAMFS_NAME (newc)"
    find "$root" -exec touch -h -d @0 {} +
    (cd "$root" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
        cpio --null -o -H newc -R 0:0 --reproducible --quiet >"$dest/$INITRAMFS_NAME")
}

initramfs_build() {
    static_initramfs_build "$1" "$2" "$3" vmm-agent vmm-agent "$AGENT_TARGET_DIR" \
        "$INIT_SCRIPT" "${BUSYBOX_APPLETS[@]}"
}

initramfs_hash() {
    {
        echo "initramfs-recipe-v1 $INITRAMFS_NAME ${BUSYBOX_APPLETS[*]}"
        hash_paths "$INIT_SCRIPT" "$FSTAB" "$HERE/agent" "$HERE/abi" "$REPO/Cargo.lock" "$REPO/Cargo.toml"
        declare -f initramfs_build static_initramfs_build
        echo "busybox-static $(pkg_version busybox-static)"
        (cd "$REPO" && rustc -Vv)
    } | short_hash
}

# --- cache driver ------------------------------------------------------------------------
# ensure_artefact NAME HASH BUILD_FN: builds into a temporary directory and renames it into
# place, so a cache entry is either complete or absent.
ensure_artefact() {
    local name=$1 hash=$2 build_fn=$3
    local dir=$CACHE/$name-$hash
    if [[ -d $dir ]]; then
        say "$name cache hit ($hash)"
        return 0
    fi
    say "building $name ($hash) ..."
    local tmp=$CACHE/.tmp-$name-$hash work=$CACHE/.work-$name-$hash start=$SECONDS
    rm -rf "$tmp"
    mkdir -p "$tmp"
    "$build_fn" "$tmp" "$tmp/build.log" "$work"
    mv "$tmp" "$dir"
    rm -rf "$work"
    say "$name built in $(( SECONDS - start )) s: $dir"
}

link_out() { ln -sfn "$1" "$OUT/$2"; }

main() {
    # The lab guest (issue 5; guest-images/lab.sh): only on request, never on the default path.
    case ${1:-} in
        --lab|--lab-kernel)
            [[ $# -eq 1 ]] || die "usage: $0 [--lab | --lab-kernel]"
            # shellcheck source=lab.sh
            source "$HERE/lab.sh"
            if [[ $1 == --lab-kernel ]]; then lab_main kernel-only; else lab_main; fi
            return
            ;;
    esac
    [[ $# -eq 0 ]] || die "usage: $0 [--lab | --lab-kernel] (no arguments: the default guest; set VMM_IMAGE_CACHE to move the cache)"
    ensure_packages
    mkdir -p "$CACHE" "$OUT"
    # One build at a time per cache; a waiting run then sees the other's result as a hit.
    exec 9>"$CACHE/.lock"
    flock 9

    local kh ih
    kh=$(kernel_hash)
    ih=$(initramfs_hash)
    ensure_artefact kernel "$kh" kernel_build
    ensure_artefact initramfs "$ih" initramfs_build

    local kdir=$CACHE/kernel-$kh idir=$CACHE/initramfs-$ih
    rm -f "$OUT/initramfs.cpio.gz"   # left over if the format ever changes back
    link_out "$kdir/vmlinux" vmlinux
    link_out "$kdir/bzImage" bzImage
    link_out "$idir/$INITRAMFS_NAME" "$INITRAMFS_NAME"
    cat >"$OUT/images.env.tmp" <<EOF
VMM_KERNEL=$kdir/vmlinux
VMM_KERNEL_BZIMAGE=$kdir/bzImage
VMM_INITRAMFS=$idir/$INITRAMFS_NAME
VMM_KERNEL_HASH=$kh
VMM_INITRAMFS_HASH=$ih
EOF
    mv "$OUT/images.env.tmp" "$OUT/images.env"
    say "outputs in $OUT (images.env, vmlinux, bzImage, $INITRAMFS_NAME)"
}

main "$@"; exit  # one line: bash must not read past it if this file changes mid-run
