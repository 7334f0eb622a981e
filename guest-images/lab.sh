# The lab guest (issue 5): a Linux 6.12 kernel with test_hmm (/dev/hmm_dmirror*), device-private
# memory, soft-dirty and userfaultfd WP markers, and an initramfs whose init runs the static
# vmm-probe. Sourced by build.sh for `build.sh --lab` (or `--lab-kernel`) only: nothing here runs
# on the default path, and nothing here changes the default images or their cache hashes (the
# default recipe functions are reused unchanged; the lab has its own recipe functions and hashes).
# Outputs: guest-images/out/lab/{vmlinux,initramfs.cpio,images.env}. See guest-images/README.md.

LAB_KERNEL_TARBALL=/usr/src/linux-source-6.12.tar.xz
LAB_KERNEL_PACKAGE=linux-source-6.12
# The default guest's options first, then the lab's (both are verified against .config).
LAB_KERNEL_FRAGMENTS=("$HERE/kernel/config-6.1.fragment" "$HERE/kernel/config-lab-6.12.fragment")
# Applied in this order.
LAB_KERNEL_PATCHES=("$HERE/kernel/pvm-6.12.patch"
                    "$HERE/kernel/test_hmm-backing-page-6.12.patch"
                    "$HERE/kernel/test_hmm-chunk-16m-6.12.patch")
LAB_INIT_SCRIPT=$HERE/lab/init
LAB_OUT=$OUT/lab
LAB_PROBE_TARGET_DIR=${CARGO_TARGET_DIR_PROBE:-$AGENT_TARGET_DIR}
# Busybox applets for the lab init script (the probe does the work, as PID 1).
LAB_BUSYBOX_APPLETS=(sh mount echo cat ls dmesg)

lab_kernel_build() {
    local dest=$1 log=$2 work=$3
    local src=$work/linux p f
    rm -rf "$work"
    mkdir -p "$src"
    say "  [1/5] extracting $LAB_KERNEL_TARBALL"
    run_logged "$log" tar -xf "$LAB_KERNEL_TARBALL" -C "$src" --strip-components=1
    for p in "${LAB_KERNEL_PATCHES[@]}"; do
        say "  [2/5] applying $(basename "$p")"
        run_logged "$log" patch -d "$src" -p1 --batch --forward -i "$p"
    done
    say "  [3/5] make tinyconfig + ${LAB_KERNEL_FRAGMENTS[*]##*/}"
    run_logged "$log" make -C "$src" tinyconfig
    run_logged "$log" env -C "$src" scripts/kconfig/merge_config.sh -m .config \
        "${LAB_KERNEL_FRAGMENTS[@]}"
    run_logged "$log" make -C "$src" olddefconfig
    for f in "${LAB_KERNEL_FRAGMENTS[@]}"; do
        KERNEL_FRAGMENT=$f kernel_verify_config "$src/.config"
    done
    # Only the ELF vmlinux: vmm boots it directly (a bzImage's emulated decompressor is slow).
    say "  [4/5] make -j$(nproc) vmlinux (log: $log)"
    run_logged "$log" make -C "$src" -j"$(nproc)" vmlinux
    say "  [5/5] storing artefacts"
    cp "$src/vmlinux" "$dest/vmlinux"
    cp "$src/.config" "$dest/config"
    cp "$src/System.map" "$dest/System.map"
}

lab_kernel_hash() {
    {
        echo "lab-kernel-recipe-v1"
        hash_paths "${LAB_KERNEL_FRAGMENTS[@]}" "${LAB_KERNEL_PATCHES[@]}"
        declare -f lab_kernel_build kernel_verify_config
        echo "$LAB_KERNEL_PACKAGE $(pkg_version "$LAB_KERNEL_PACKAGE")"
        echo "gcc $(gcc -dumpfullversion)"
    } | short_hash
}

lab_initramfs_build() {
    static_initramfs_build "$1" "$2" "$3" vmm-probe vmm-probe "$LAB_PROBE_TARGET_DIR" \
        "$LAB_INIT_SCRIPT" "${LAB_BUSYBOX_APPLETS[@]}"
}

lab_initramfs_hash() {
    {
        echo "lab-initramfs-recipe-v1 $INITRAMFS_NAME ${LAB_BUSYBOX_APPLETS[*]}"
        # vmm-probe and every workspace crate it builds on.
        hash_paths "$LAB_INIT_SCRIPT" "$FSTAB" "$REPO/tools/probe" "$REPO/vmm" "$REPO/devices" \
            "$HERE/abi" "$HERE/micro" "$REPO/Cargo.lock" "$REPO/Cargo.toml"
        declare -f lab_initramfs_build static_initramfs_build
        echo "busybox-static $(pkg_version busybox-static)"
        (cd "$REPO" && rustc -Vv)
    } | short_hash
}

# lab_main [kernel-only]
lab_main() {
    local kernel_only=${1:-}
    PACKAGES+=("$LAB_KERNEL_PACKAGE")
    ensure_packages
    mkdir -p "$CACHE" "$LAB_OUT"
    exec 9>"$CACHE/.lock"
    flock 9

    local kh ih kdir idir
    kh=$(lab_kernel_hash)
    ensure_artefact lab-kernel "$kh" lab_kernel_build
    kdir=$CACHE/lab-kernel-$kh
    ln -sfn "$kdir/vmlinux" "$LAB_OUT/vmlinux"
    if [[ -n $kernel_only ]]; then
        say "lab kernel in $LAB_OUT/vmlinux (initramfs not built: --lab-kernel)"
        return 0
    fi
    ih=$(lab_initramfs_hash)
    ensure_artefact lab-initramfs "$ih" lab_initramfs_build
    idir=$CACHE/lab-initramfs-$ih
    ln -sfn "$idir/$INITRAMFS_NAME" "$LAB_OUT/$INITRAMFS_NAME"
    cat >"$LAB_OUT/images.env.tmp" <<EOF
VMM_LAB_KERNEL=$kdir/vmlinux
VMM_LAB_INITRAMFS=$idir/$INITRAMFS_NAME
VMM_LAB_KERNEL_HASH=$kh
VMM_LAB_INITRAMFS_HASH=$ih
EOF
    mv "$LAB_OUT/images.env.tmp" "$LAB_OUT/images.env"
    say "lab outputs in $LAB_OUT (images.env, vmlinux, $INITRAMFS_NAME)"
}
