#!/usr/bin/env bash
# What passing a real PCI device (a GPU) through to a vmm guest needs, checked on this host.
#
#   tools/host-check.sh                    report: IOMMU, VFIO, every NVIDIA device, host limits
#   tools/host-check.sh --device BDF       ... and this PCI device too (repeatable)
#   tools/host-check.sh --bind BDF         unbind BDF from its driver and bind it to vfio-pci
#                                          (driver_override; every sysfs write is printed)
#   tools/host-check.sh --boot BDF         boot the test guest with BDF passed through and check
#                                          what the guest sees (ids, BAR sizes, MSI-X)
#   options: --json (the report as one JSON object), --mem SIZE (guest RAM for the memlock and
#   window checks, and --boot; default 128M), --root DIR (or $HOST_CHECK_ROOT: read /sys, /proc
#   and /dev under DIR, for tests), --vmm PATH, --probe PATH (vmm-probe), --guest-bdf BDF (where
#   the device sits in the guest; default 0000:00:01.0), --msix-count N, --timeout-s N
#
# Only --bind and --boot change anything. Exit 0 when the report was printed (whatever it found:
# on a host without an IOMMU it says "no IOMMU/VFIO on this host" and what it looked for);
# 1 when --bind or --boot failed or a device named does not exist; 2 on a usage error.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT="${HOST_CHECK_ROOT:-}"
JSON=0
MEM="128M"
VMM="${VMM_BIN:-}"
PROBE="${VMM_PROBE:-}"
GUEST_BDF="0000:00:01.0"
MSIX_COUNT=""
TIMEOUT_S=600
DEVICES=()
BINDS=()
BOOTS=()

# The VMM's own limits (vmm/src/vstate/resources/addresses.rs): guest physical address bits are
# capped at MAX_PHYS_BITS; the 64-bit window runs from max(RAM end, 4 GiB) to 2^bits, less AMD's
# HyperTransport hole; the 32-bit window is [MMIO32_START, PLATFORM_START) less the boot timer.
MAX_PHYS_BITS=46
MMIO32_START=$((0xc0000000))
PLATFORM_START=$((0xfec00000))
BOOT_TIMER_GPA=$((0xd0000000))
HT_HOLE_START=$((0xfd00000000))
HT_HOLE_END=$((1 << 40))
FOUR_GIB=$((1 << 32))
GIB=$((1 << 30))

die() { echo "host-check: $*" >&2; exit 1; }
usage() { echo "host-check: $*" >&2; echo "usage: tools/host-check.sh [--json] [--root DIR] [--mem SIZE] [--device BDF]... [--bind BDF] [--boot BDF] [--vmm PATH] [--probe PATH] [--guest-bdf BDF] [--msix-count N] [--timeout-s N]" >&2; exit 2; }

# A PCI address as sysfs spells it (domain:bus:slot.function, lowercase); BB:SS.F gets domain 0.
norm_bdf() {
    local b="${1,,}"
    [[ $b =~ ^[0-9a-f]{2}:[0-1][0-9a-f]\.[0-7]$ ]] && b="0000:$b"
    [[ $b =~ ^[0-9a-f]{4}:[0-9a-f]{2}:[0-1][0-9a-f]\.[0-7]$ ]] || return 1
    echo "$b"
}

need_arg() { [[ $# -ge 2 && -n $2 ]] || usage "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
    case $1 in
    --json) JSON=1 ;;
    --root) need_arg "$@"; ROOT=$2; shift ;;
    --mem) need_arg "$@"; MEM=$2; shift ;;
    --vmm) need_arg "$@"; VMM=$2; shift ;;
    --probe) need_arg "$@"; PROBE=$2; shift ;;
    --timeout-s) need_arg "$@"; TIMEOUT_S=$2; shift
        [[ $TIMEOUT_S =~ ^[1-9][0-9]*$ ]] || usage "--timeout-s: '$2' is not a positive number" ;;
    --msix-count) need_arg "$@"; MSIX_COUNT=$2; shift
        [[ $MSIX_COUNT =~ ^[1-9][0-9]*$ ]] || usage "--msix-count: '$2' is not a positive number" ;;
    --guest-bdf) need_arg "$@"
        GUEST_BDF=$(norm_bdf "$2") || usage "--guest-bdf: '$2' is not a PCI address (DDDD:BB:SS.F, e.g. 0000:00:01.0)"
        shift ;;
    --device | --bind | --boot)
        need_arg "$@"
        b=$(norm_bdf "$2") || usage "$1: '$2' is not a PCI address (DDDD:BB:SS.F or BB:SS.F, hex, e.g. 0000:01:00.0)"
        case $1 in
        --device) DEVICES+=("$b") ;;
        --bind) BINDS+=("$b") ;;
        --boot) BOOTS+=("$b") ;;
        esac
        shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) usage "unknown option '$1'" ;;
    esac
    shift
done

if [[ -n $ROOT ]]; then
    [[ -d $ROOT ]] || usage "--root: '$ROOT' is not a directory"
    ROOT="$(cd "$ROOT" && pwd)"
fi
SYS="$ROOT/sys"
PROC="$ROOT/proc"
DEV="$ROOT/dev"
pci_dev() { echo "$SYS/bus/pci/devices/$1"; }
for b in "${DEVICES[@]}" "${BINDS[@]}" "${BOOTS[@]}"; do
    [[ -e $(pci_dev "$b") ]] || die "no PCI device $b: $(pci_dev "$b") does not exist"
done

# Guest RAM in bytes: N, NK, NM, NG (as vmm run --mem takes it).
mem_bytes() {
    local m="${1^^}"
    m="${m%IB}"; m="${m%B}"
    case $m in
    *[0-9]K) echo $((${m%K} << 10)) ;;
    *[0-9]M) echo $((${m%M} << 20)) ;;
    *[0-9]G) echo $((${m%G} << 30)) ;;
    *[0-9]) echo $((m)) ;;
    *) return 1 ;;
    esac
}
[[ $MEM =~ ^[0-9]+([KkMmGg]([iI]?[bB])?)?$ ]] || usage "--mem: '$MEM' is not a size (e.g. 128M, 4G)"
MEM_BYTES=$(mem_bytes "$MEM")

# ---- output: text as we go, or JSON at the end -------------------------------------------------
say() { [[ $JSON == 1 ]] || printf '%s\n' "$*"; }
# Progress of --bind/--boot: on stdout in text mode, on stderr with --json.
act() { if [[ $JSON == 1 ]]; then printf 'host-check: %s\n' "$*" >&2; else printf '%s\n' "$*"; fi; }
jstr() {
    local s=$1
    s=${s//\\/\\\\}; s=${s//\"/\\\"}; s=${s//$'\n'/\\n}; s=${s//$'\t'/\\t}
    printf '"%s"' "$s"
}
# A JSON array of strings from the arguments.
jarr() {
    local out="" x
    for x in "$@"; do out+="${out:+,}$(jstr "$x")"; done
    printf '[%s]' "$out"
}
jbool() { if [[ $1 == 1 ]]; then echo true; else echo false; fi; }

human() {
    local n=$1
    if ((n >= GIB && n % GIB == 0)); then echo "$((n / GIB)) GiB"
    elif ((n >= (1 << 20) && n % (1 << 20) == 0)); then echo "$((n >> 20)) MiB"
    elif ((n >= 1024 && n % 1024 == 0)); then echo "$((n >> 10)) KiB"
    else echo "$n B"; fi
}

names() { [[ -d $1 ]] || return 0; find "$1" -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort; }
link_name() { local t; t=$(readlink "$1" 2>/dev/null) || return 1; echo "${t##*/}"; }
read_first() { [[ -r $1 ]] && head -n1 "$1" 2>/dev/null | tr -d '\n'; }
hex_id() { local s; s=$(read_first "$1") || return 1; s=${s#0x}; echo "${s,,}"; }

# ---- IOMMU ----------------------------------------------------------------------------------------
say "== IOMMU"
CMDLINE=$(read_first "$PROC/cmdline" || true)
IOMMU_OPTS=()
read -ra CMDWORDS <<<"$CMDLINE"
for w in "${CMDWORDS[@]}"; do
    case $w in intel_iommu=* | amd_iommu=* | iommu=* | iommu.*=*) IOMMU_OPTS+=("$w") ;; esac
done
say "  $PROC/cmdline: ${IOMMU_OPTS[*]:-no intel_iommu=/amd_iommu=/iommu= options}"
mapfile -t IOMMU_UNITS < <(names "$SYS/class/iommu")
say "  $SYS/class/iommu: ${IOMMU_UNITS[*]:-none (no IOMMU driver active)}"
mapfile -t GROUPS_ALL < <(names "$SYS/kernel/iommu_groups")
say "  $SYS/kernel/iommu_groups: ${#GROUPS_ALL[@]} group(s)"
DMESG_LINES=()
if [[ -z $ROOT ]]; then
    if out=$(dmesg 2>/dev/null); then
        mapfile -t DMESG_LINES < <(grep -iE 'DMAR|AMD-Vi|IOMMU' <<<"$out" | tail -n 5 || true)
        say "  dmesg (DMAR|AMD-Vi|IOMMU, last 5): ${#DMESG_LINES[@]} line(s)"
        for l in "${DMESG_LINES[@]}"; do say "    $l"; done
    else
        say "  dmesg: not readable (needs root or kernel.dmesg_restrict=0)"
    fi
else
    say "  dmesg: not read (--root)"
fi

# ---- VFIO -----------------------------------------------------------------------------------------
say "== VFIO"
VFIO_DIR=0; [[ -d $DEV/vfio ]] && VFIO_DIR=1
VFIO_GROUPS=()
if [[ $VFIO_DIR == 1 ]]; then
    while read -r n; do
        [[ -n $n && $n != vfio && $n != devices ]] && VFIO_GROUPS+=("$n")
    done < <(names "$DEV/vfio")
fi
mapfile -t VFIO_CDEVS < <(names "$DEV/vfio/devices")
CONTAINER=0; [[ -e $DEV/vfio/vfio ]] && CONTAINER=1
IOMMUFD=0; [[ -e $DEV/iommu ]] && IOMMUFD=1
if [[ $VFIO_DIR == 1 ]]; then
    say "  $DEV/vfio: container $([[ $CONTAINER == 1 ]] && echo present || echo absent), groups: ${VFIO_GROUPS[*]:-none}"
else
    say "  $DEV/vfio: absent (vfio not loaded)"
fi
say "  $DEV/vfio/devices (vfio cdevs): ${VFIO_CDEVS[*]:-none}"
say "  $DEV/iommu (iommufd): $([[ $IOMMUFD == 1 ]] && echo present || echo absent)"
MODULES=(vfio vfio_pci vfio_pci_core vfio_iommu_type1 iommufd)
MODS_LOADED=()
for m in "${MODULES[@]}"; do [[ -d $SYS/module/$m ]] && MODS_LOADED+=("$m"); done
say "  $SYS/module (loaded or built in): ${MODS_LOADED[*]:-none} (looked for ${MODULES[*]})"
VFIO_PCI_DRIVER=0; [[ -d $SYS/bus/pci/drivers/vfio-pci ]] && VFIO_PCI_DRIVER=1
say "  $SYS/bus/pci/drivers/vfio-pci: $([[ $VFIO_PCI_DRIVER == 1 ]] && echo present || echo absent)"

# vmm-probe's discovery (tools/probe/src/vfio/discover.rs): how each bound device would be opened.
if [[ -z $PROBE ]]; then
    for p in "$REPO/target/release/vmm-probe" "$REPO/target/debug/vmm-probe"; do
        [[ -x $p ]] && { PROBE=$p; break; }
    done
fi
PROBE_JSON=null
if [[ -n $PROBE && -x $PROBE ]]; then
    if PROBE_JSON=$("$PROBE" --discover-vfio --json --dev-dir "$DEV" --sys-dir "$SYS" 2>/dev/null); then
        say "  vmm-probe --discover-vfio (how vmm would open each bound device):"
        while IFS= read -r l; do say "    $l"; done < <("$PROBE" --discover-vfio --dev-dir "$DEV" --sys-dir "$SYS" 2>&1)
    else
        say "  vmm-probe --discover-vfio: failed ($PROBE)"
        PROBE_JSON=null
    fi
else
    say "  vmm-probe: not built (cargo build -p vmm-probe): its view of the bound devices is left out"
fi

# ---- host limits ----------------------------------------------------------------------------------
say "== Host"
PHYS_BITS=""
if [[ -r $PROC/cpuinfo ]]; then
    PHYS_BITS=$(sed -n 's/^address sizes[[:space:]]*:[[:space:]]*\([0-9]\+\) bits physical.*/\1/p' "$PROC/cpuinfo" | head -n1)
fi
if [[ -n $PHYS_BITS ]]; then
    GUEST_BITS=$((PHYS_BITS < MAX_PHYS_BITS ? PHYS_BITS : MAX_PHYS_BITS))
    say "  $PROC/cpuinfo address sizes: $PHYS_BITS bits physical; the guest gets $GUEST_BITS (vmm caps at $MAX_PHYS_BITS; KVM may report fewer)"
else
    GUEST_BITS=36
    say "  $PROC/cpuinfo: no 'address sizes' line; assuming 36 bits (the architectural default)"
fi
# Guest RAM above 3 GiB moves to 4 GiB (the 32-bit hole), so RAM ends at 4 GiB + the rest.
if ((MEM_BYTES > MMIO32_START)); then RAM_END=$((FOUR_GIB + MEM_BYTES - MMIO32_START)); else RAM_END=$MEM_BYTES; fi
WIN64_START=$((RAM_END > FOUR_GIB ? RAM_END : FOUR_GIB))
WIN64_END=$((1 << GUEST_BITS))
if ((WIN64_START < WIN64_END)); then
    say "  vmm's 64-bit MMIO window for a $MEM guest: [$(printf '%#x' "$WIN64_START"), $(printf '%#x' "$WIN64_END")) ($(human $((WIN64_END - WIN64_START))))"
else
    say "  vmm's 64-bit MMIO window for a $MEM guest: none (RAM reaches 2^$GUEST_BITS)"
fi
HP_TOTAL=""; HP_FREE=""; HP_SIZE_KIB=""
if [[ -r $PROC/meminfo ]]; then
    HP_TOTAL=$(awk '/^HugePages_Total:/ {print $2}' "$PROC/meminfo")
    HP_FREE=$(awk '/^HugePages_Free:/ {print $2}' "$PROC/meminfo")
    HP_SIZE_KIB=$(awk '/^Hugepagesize:/ {print $2}' "$PROC/meminfo")
fi
say "  $PROC/meminfo hugepages: total ${HP_TOTAL:-?}, free ${HP_FREE:-?}, size ${HP_SIZE_KIB:-?} KiB"
HP_POOLS=()
for d in "$SYS"/kernel/mm/hugepages/hugepages-*; do
    [[ -d $d ]] || continue
    HP_POOLS+=("${d##*/}: nr $(read_first "$d/nr_hugepages" || echo ?), free $(read_first "$d/free_hugepages" || echo ?)")
done
HP_JOINED=$(printf '%s; ' "${HP_POOLS[@]}")
say "  $SYS/kernel/mm/hugepages: $([[ ${#HP_POOLS[@]} -gt 0 ]] && echo "${HP_JOINED%; }" || echo "no pools")"
say "    (vmm backs guest RAM with a 4 KiB-page memfd today; VFIO pins it page by page)"
MEMLOCK=""
MEMLOCK_FROM="ulimit -l"
if [[ -n $ROOT && -r $PROC/self/limits ]]; then
    MEMLOCK_FROM="$PROC/self/limits, Max locked memory"
    MEMLOCK=$(awk '/^Max locked memory/ {print $4}' "$PROC/self/limits")
    [[ $MEMLOCK =~ ^[0-9]+$ ]] && MEMLOCK=$((MEMLOCK / 1024))
else
    MEMLOCK=$(ulimit -l)
fi
MEMLOCK_OK=0
if [[ $MEMLOCK == unlimited ]]; then
    MEMLOCK_OK=1
    say "  $MEMLOCK_FROM: unlimited (VFIO pins all $MEM of guest RAM for device DMA: fine)"
elif [[ $MEMLOCK =~ ^[0-9]+$ ]] && ((MEMLOCK * 1024 >= MEM_BYTES)); then
    MEMLOCK_OK=1
    say "  $MEMLOCK_FROM: $MEMLOCK KiB >= the $MEM a guest pins for device DMA"
elif [[ $(id -u) == 0 ]]; then
    MEMLOCK_OK=1
    say "  $MEMLOCK_FROM: ${MEMLOCK:-?} KiB < $MEM of guest RAM, but root (CAP_IPC_LOCK) is not held to it"
else
    say "  $MEMLOCK_FROM: ${MEMLOCK:-?} KiB < the $MEM a guest pins for device DMA: raise it (limits.conf, ulimit -l) or run as root"
fi

# ---- devices --------------------------------------------------------------------------------------
# Drivers that leave a group's DMA to VFIO (the kernel's driver_managed_dma): a group is viable
# when every member is unbound or on one of these (or a vfio variant driver, *vfio*).
viable_driver() { [[ -z $1 || $1 == vfio-pci || $1 == *vfio* || $1 == pci-stub || $1 == pcieport ]]; }

# Naturally aligned, largest first, first fit from the window's start: what AddressMap does for
# one device's 64-bit BARs in an empty window. Echoes "" when they fit, else the BAR that did not.
fit64() {
    local pos=$WIN64_START sz
    for sz in "$@"; do
        pos=$(((pos + sz - 1) / sz * sz))
        if ((pos < HT_HOLE_END && pos + sz > HT_HOLE_START)); then
            pos=$(((HT_HOLE_END + sz - 1) / sz * sz))
        fi
        if ((pos + sz > WIN64_END)); then echo "$sz"; return; fi
        pos=$((pos + sz))
    done
}
fit32() {
    local pos=$MMIO32_START sz
    for sz in "$@"; do
        pos=$(((pos + sz - 1) / sz * sz))
        if ((pos <= BOOT_TIMER_GPA && pos + sz > BOOT_TIMER_GPA)); then
            pos=$(((BOOT_TIMER_GPA + 4096 + sz - 1) / sz * sz))
        fi
        if ((pos + sz > PLATFORM_START)); then echo "$sz"; return; fi
        pos=$((pos + sz))
    done
}

# MSI-X table size from the config space's capability list: a number, "none" (no MSI-X
# capability), or why it is unknown. Past the first 64 bytes sysfs shows config space to root only.
msix_vectors() {
    local cfg=$1 b p id ctrl n=0
    [[ -r $cfg ]] || { echo "unknown ($cfg not readable)"; return; }
    mapfile -t b < <(od -An -v -tx1 -w1 "$cfg" 2>/dev/null | tr -d ' ')
    ((${#b[@]} > 64)) || { echo "unknown (only ${#b[@]} bytes of config space readable: the capabilities need root)"; return; }
    ((16#${b[6]} & 0x10)) || { echo none; return; }
    p=$((16#${b[0x34]} & 0xfc))
    while ((p >= 0x40 && p + 3 < ${#b[@]} && n < 48)); do
        id=$((16#${b[p]}))
        if ((id == 0x11)); then
            ctrl=$((16#${b[p + 2]} | (16#${b[p + 3]} << 8)))
            echo $(((ctrl & 0x7ff) + 1))
            return
        fi
        p=$((16#${b[p + 1]} & 0xfc)); n=$((n + 1))
    done
    echo none
}

# The devices to look at: every NVIDIA function, and every BDF named.
CANDIDATES=()
for d in "$SYS"/bus/pci/devices/*; do
    [[ -e $d ]] || continue
    [[ $(hex_id "$d/vendor" || true) == 10de ]] && CANDIDATES+=("${d##*/}")
done
for b in "${DEVICES[@]}" "${BINDS[@]}" "${BOOTS[@]}"; do
    [[ " ${CANDIDATES[*]} " == *" $b "* ]] || CANDIDATES+=("$b")
done

declare -A D_VIABLE D_BARS D_VENDOR D_DEVICE D_MSIX D_JSON
READY=()
say "== Devices (vendor 10de, and --device/--bind/--boot)"
[[ ${#CANDIDATES[@]} -gt 0 ]] || say "  none: no NVIDIA function under $SYS/bus/pci/devices and none named"
check_device() {
    local bdf=$1 d vendor device class driver group members=() m mdrv viable=1 blockers=()
    d=$(pci_dev "$bdf")
    vendor=$(hex_id "$d/vendor" || echo "?"); device=$(hex_id "$d/device" || echo "?")
    class=$(hex_id "$d/class" || echo "?")
    driver=$(link_name "$d/driver" || true)
    say "  $bdf [$vendor:$device] class $class"
    say "    driver: ${driver:-none}"
    group=$(link_name "$d/iommu_group" || true)
    local mjson=""
    if [[ -n $group ]]; then
        mapfile -t members < <(names "$SYS/kernel/iommu_groups/$group/devices")
        say "    IOMMU group $group: ${#members[@]} member(s)"
        for m in "${members[@]}"; do
            mdrv=$(link_name "$SYS/kernel/iommu_groups/$group/devices/$m/driver" || true)
            local ok=1
            viable_driver "$mdrv" || { ok=0; viable=0; blockers+=("$m ($mdrv)"); }
            say "      $m: driver ${mdrv:-none}$([[ $ok == 0 ]] && echo " (keeps the group from VFIO)")"
            mjson+="${mjson:+,}{\"bdf\":$(jstr "$m"),\"driver\":$(if [[ -n $mdrv ]]; then jstr "$mdrv"; else echo null; fi),\"ok\":$(jbool $ok)}"
        done
        if [[ $viable == 1 ]]; then
            say "    group viable: every member unbound or on vfio-pci/a vfio driver/pci-stub/pcieport"
        else
            local joined
            joined=$(printf '%s, ' "${blockers[@]}")
            say "    group NOT viable: ${joined%, } must be unbound or bound to vfio-pci (--bind BDF)"
        fi
    else
        viable=0
        say "    IOMMU group: none ($d/iommu_group absent: no IOMMU translates for it)"
    fi

    # BARs: lines 0-5 of `resource` are BAR0-5, line 6 the ROM; start end flags.
    local i=0 start end flags size kind bars=() bjson="" s64=() s32=() bad64="" bad32=""
    if [[ -r $d/resource ]]; then
        while read -r start end flags; do
            if ((i <= 6)) && [[ -n $flags ]] && ((start != 0 || end != 0)); then
                size=$((end - start + 1))
                local mem64=0 pf=0 io=0 name="BAR$i"
                ((i == 6)) && name="ROM"
                ((flags & 0x100)) && io=1
                ((flags & 0x100000)) && mem64=1
                ((flags & 0x2000)) && pf=1
                if ((io)); then kind="I/O"; elif ((mem64)); then kind="64-bit"; else kind="32-bit"; fi
                ((pf)) && kind+=" prefetchable"
                say "    $name: $(human "$size") ($size bytes), $kind"
                bars+=("$i:$size")
                bjson+="${bjson:+,}{\"index\":$i,\"name\":\"$name\",\"size\":$size,\"mem64\":$(jbool $mem64),\"prefetchable\":$(jbool $pf),\"io\":$(jbool $io)}"
                if ((i < 6 && mem64)); then s64+=("$size"); elif ((i == 6 || !io)); then s32+=("$size"); fi
            fi
            i=$((i + 1))
        done <"$d/resource"
    fi
    [[ ${#bars[@]} -gt 0 ]] || say "    BARs: none readable in $d/resource"
    local fits=1
    if [[ ${#s64[@]} -gt 0 ]]; then
        mapfile -t s64 < <(printf '%s\n' "${s64[@]}" | sort -rn)
        bad64=$(fit64 "${s64[@]}")
        if [[ -z $bad64 ]]; then
            say "    64-bit BARs fit vmm's 64-bit window ($GUEST_BITS guest physical address bits)"
        else
            fits=0
            say "    64-bit BARs do NOT fit: a $(human "$bad64") BAR needs a naturally aligned slot below 2^$GUEST_BITS"
        fi
    fi
    if [[ ${#s32[@]} -gt 0 ]]; then
        mapfile -t s32 < <(printf '%s\n' "${s32[@]}" | sort -rn)
        bad32=$(fit32 "${s32[@]}")
        [[ -z $bad32 ]] || { fits=0; say "    32-bit BARs do NOT fit vmm's 32-bit window: $(human "$bad32")"; }
    fi
    local msix
    msix=$(msix_vectors "$d/config")
    say "    MSI-X: $([[ $msix =~ ^[0-9]+$ ]] && echo "$msix vectors" || echo "$msix")"

    local ready=0 why=()
    [[ $viable == 1 ]] || why+=("group not viable")
    [[ $driver == vfio-pci || $driver == *vfio* ]] || why+=("not on vfio-pci (--bind $bdf)")
    [[ $fits == 1 ]] || why+=("BARs do not fit")
    [[ $MEMLOCK_OK == 1 ]] || why+=("memlock limit")
    if [[ ${#why[@]} -eq 0 ]]; then
        ready=1; READY+=("$bdf")
        say "    ready for passthrough: tools/host-check.sh --boot $bdf"
    else
        local joined
        joined=$(printf '%s; ' "${why[@]}")
        say "    not ready: ${joined%; }"
    fi
    D_VENDOR[$bdf]=$vendor; D_DEVICE[$bdf]=$device; D_VIABLE[$bdf]=$viable
    D_BARS[$bdf]="${bars[*]}"; D_MSIX[$bdf]=$msix
    D_JSON[$bdf]="{\"bdf\":$(jstr "$bdf"),\"vendor\":$(jstr "$vendor"),\"device\":$(jstr "$device"),\"class\":$(jstr "$class"),\"driver\":$(if [[ -n $driver ]]; then jstr "$driver"; else echo null; fi),\"iommu_group\":$(if [[ -n $group ]]; then echo "$group"; else echo null; fi),\"group_members\":[$mjson],\"viable\":$(jbool $viable),\"bars\":[$bjson],\"bars_fit\":$(jbool $fits),\"msix_vectors\":$(if [[ $msix =~ ^[0-9]+$ ]]; then echo "$msix"; else echo null; fi),\"ready\":$(jbool $ready),\"not_ready\":$(jarr "${why[@]}")}"
}
for b in "${CANDIDATES[@]}"; do check_device "$b"; done

# ---- verdict --------------------------------------------------------------------------------------
NO_IOMMU=0
if [[ ${#GROUPS_ALL[@]} -eq 0 && ${#VFIO_GROUPS[@]} -eq 0 && ${#VFIO_CDEVS[@]} -eq 0 ]]; then
    NO_IOMMU=1
    VERDICT="no IOMMU/VFIO on this host"
elif [[ ${#GROUPS_ALL[@]} -eq 0 ]]; then
    VERDICT="VFIO without IOMMU groups (no-IOMMU mode at most): no DMA isolation for passthrough"
elif [[ ${#READY[@]} -gt 0 ]]; then
    VERDICT="IOMMU present; ready for passthrough: ${READY[*]}"
else
    VERDICT="IOMMU present; no device ready for passthrough yet (see above)"
fi
say "== Verdict: $VERDICT"
if [[ $NO_IOMMU == 1 ]]; then
    say "  looked for: IOMMU units in $SYS/class/iommu, groups in $SYS/kernel/iommu_groups, groups and cdevs in $DEV/vfio"
    say "  to get one: enable VT-d/AMD-Vi in firmware, boot with intel_iommu=on (Intel) or amd_iommu=on, modprobe vfio-pci"
fi

if [[ $JSON == 1 ]]; then
    djson=""
    for b in "${CANDIDATES[@]}"; do djson+="${djson:+,}${D_JSON[$b]}"; done
    printf '{"verdict":%s,"no_iommu_vfio":%s,"root":%s,' "$(jstr "$VERDICT")" "$(jbool $NO_IOMMU)" "$(jstr "${ROOT:-/}")"
    printf '"iommu":{"cmdline_options":%s,"units":%s,"groups":%s},' "$(jarr "${IOMMU_OPTS[@]}")" "$(jarr "${IOMMU_UNITS[@]}")" "$(jarr "${GROUPS_ALL[@]}")"
    printf '"vfio":{"dev_vfio":%s,"container":%s,"groups":%s,"cdevs":%s,"iommufd":%s,"modules":%s,"vfio_pci_driver":%s,"probe":%s},' \
        "$(jbool $VFIO_DIR)" "$(jbool $CONTAINER)" "$(jarr "${VFIO_GROUPS[@]}")" "$(jarr "${VFIO_CDEVS[@]}")" \
        "$(jbool $IOMMUFD)" "$(jarr "${MODS_LOADED[@]}")" "$(jbool $VFIO_PCI_DRIVER)" "$PROBE_JSON"
    printf '"host":{"phys_bits":%s,"guest_phys_bits":%s,"guest_mem_bytes":%s,"window64":[%s,%s],"hugepages_total":%s,"hugepages_free":%s,"hugepage_kib":%s,"memlock_kib":%s,"memlock_ok":%s},' \
        "${PHYS_BITS:-null}" "$GUEST_BITS" "$MEM_BYTES" "$WIN64_START" "$WIN64_END" "${HP_TOTAL:-null}" "${HP_FREE:-null}" \
        "${HP_SIZE_KIB:-null}" "$(if [[ $MEMLOCK =~ ^[0-9]+$ ]]; then echo "$MEMLOCK"; else jstr "$MEMLOCK"; fi)" "$(jbool $MEMLOCK_OK)"
    printf '"devices":[%s]}\n' "$djson"
fi

# ---- --bind ---------------------------------------------------------------------------------------
swrite() {
    act "  write '$1' > $2"
    printf '%s' "$1" >"$2" || die "writing '$1' to $2 failed"
}
bind_vfio() {
    local bdf=$1 d drv
    d=$(pci_dev "$bdf")
    act "== Binding $bdf to vfio-pci"
    drv=$(link_name "$d/driver" || true)
    if [[ $drv == vfio-pci ]]; then act "  already on vfio-pci: nothing written"; return 0; fi
    [[ -e $d/iommu_group ]] || die "$bdf has no IOMMU group ($d/iommu_group): vfio-pci cannot take it; enable the IOMMU first (see the IOMMU section)"
    if [[ ! -d $SYS/bus/pci/drivers/vfio-pci ]]; then
        [[ -z $ROOT ]] || die "$SYS/bus/pci/drivers/vfio-pci is absent (vfio-pci not loaded; not loading it under --root)"
        act "  modprobe vfio-pci"
        modprobe vfio-pci || die "modprobe vfio-pci failed"
    fi
    swrite vfio-pci "$d/driver_override"
    [[ -z $drv ]] || swrite "$bdf" "$d/driver/unbind"
    swrite "$bdf" "$SYS/bus/pci/drivers_probe"
    drv=$(link_name "$d/driver" || true)
    [[ $drv == vfio-pci ]] || die "$bdf is on '${drv:-no driver}' after drivers_probe, not vfio-pci (dmesg says why)"
    act "  $bdf is on vfio-pci; group $(link_name "$d/iommu_group") needs every other member unbound or on vfio-pci too"
}
for b in "${BINDS[@]}"; do bind_vfio "$b"; done

# ---- --boot ---------------------------------------------------------------------------------------
# The size the guest reports for BAR i, from the agent's pci-list line (guest-images/agent,
# pci.rs): `barI=0xADDR+0xSIZE:KIND[:pf]`; a plain `barI=SIZE` is read as the size.
guest_bar_size() {
    local line=$1 i=$2 tok v
    tok=$(grep -oiE "bar${i}=[^ ,;]+" <<<"$line" | head -n1) || return 1
    v=${tok#*=}
    [[ $v == *+* ]] && v=${v#*+}
    v=$(grep -oE '^(0x[0-9a-fA-F]+|[0-9]+)' <<<"$v") || return 1
    echo $((v))
}
# The ids in a pci-list line: `vendor=0x10de device=0x2330` (or `10de:2330`).
guest_ids() {
    local line=$1 v d
    if ! v=$(grep -oiE 'vendor=(0x)?[0-9a-f]{4}' <<<"$line" | head -n1) ||
        ! d=$(grep -oiE 'device=(0x)?[0-9a-f]{4}' <<<"$line" | head -n1); then
        grep -oiE '\b[0-9a-f]{4}:[0-9a-f]{4}\b' <<<"$line" | head -n1 | tr 'A-F' 'a-f'
        return
    fi
    v=${v#*=}; d=${d#*=}; v=${v#0x}; d=${d#0x}
    echo "${v,,}:${d,,}"
}
boot_guest() {
    local bdf=$1 d drv group images kernel initrd log count agent line fails=0
    d=$(pci_dev "$bdf")
    act "== Booting the test guest with $bdf passed through"
    drv=$(link_name "$d/driver" || true)
    [[ $drv == vfio-pci ]] || die "$bdf is on '${drv:-no driver}', not vfio-pci: bind it first (--bind $bdf)"
    group=$(link_name "$d/iommu_group" || true)
    [[ -n $group ]] || die "$bdf has no IOMMU group"
    [[ ${D_VIABLE[$bdf]} == 1 ]] || die "IOMMU group $group of $bdf is not viable (see its members above)"
    [[ -e $DEV/vfio/$group || -d $DEV/vfio/devices ]] || die "neither $DEV/vfio/$group nor $DEV/vfio/devices exists"
    if [[ -z $VMM ]]; then
        for p in "$REPO/target/release/vmm" "$REPO/target/debug/vmm"; do [[ -x $p ]] && { VMM=$p; break; }; done
    fi
    [[ -n $VMM && -x $VMM ]] || die "no vmm binary (cargo build --release -p vmm-cli, or --vmm PATH)"
    "$VMM" run --help 2>/dev/null | grep -q -- '--device' || die "$VMM run has no --device option: this vmm cannot pass a device through yet (issue 14)"
    kernel=${VMM_KERNEL:-}; initrd=${VMM_INITRAMFS:-}
    images="$REPO/guest-images/out/images.env"
    if [[ (-z $kernel || -z $initrd) && -r $images ]]; then
        # shellcheck disable=SC1090
        source "$images"
        kernel=${VMM_KERNEL:-}; initrd=${VMM_INITRAMFS:-}
    fi
    [[ -r $kernel && -r $initrd ]] || die "no guest images: run bash guest-images/build.sh (or set VMM_KERNEL and VMM_INITRAMFS)"
    count=${MSIX_COUNT:-${D_MSIX[$bdf]}}
    [[ $count =~ ^[0-9]+$ ]] || count=1
    [[ -n $MSIX_COUNT ]] || ((count <= 4)) || count=4
    agent="pci-list;vfio-bind,$GUEST_BDF;vfio-msix,$GUEST_BDF,$count;poweroff"
    log=$(mktemp "${TMPDIR:-/tmp}/host-check-console.XXXXXX")
    act "  $VMM run --kernel $kernel --initrd $initrd --vcpus 2 --mem $MEM --device vfio:$d --agent \"$agent\" --console file:$log"
    local rc=0
    timeout "$TIMEOUT_S" "$VMM" run --kernel "$kernel" --initrd "$initrd" --vcpus 2 --mem "$MEM" \
        --device "vfio:$d" --agent "$agent" --console "file:$log" || rc=$?
    act "  vmm exited $rc; console: $log"
    grep -h '^AGENT:' "$log" | sed 's/^/    /' | while IFS= read -r l; do act "$l"; done
    ((rc == 0)) || die "vmm run failed (exit $rc; 124 = timed out after $TIMEOUT_S s): see $log"
    # pci-list: the device at GUEST_BDF with the host's ids and BAR sizes.
    line=$(grep -a "^AGENT: pci" "$log" | grep -ai -- "$GUEST_BDF" | head -n1 || true)
    if [[ -z $line ]]; then
        act "  FAIL pci-list: no line for $GUEST_BDF"; fails=$((fails + 1))
    else
        local ids
        ids=$(guest_ids "$line" || true)
        if [[ $ids == "${D_VENDOR[$bdf]}:${D_DEVICE[$bdf]}" ]]; then
            act "  ok   pci-list: ids $ids"
        else
            act "  FAIL pci-list: expected ids ${D_VENDOR[$bdf]}:${D_DEVICE[$bdf]}, guest says ${ids:-none} in: $line"; fails=$((fails + 1))
        fi
        local gm
        gm=$(grep -oE 'msix=[0-9a-z]+' <<<"$line" | head -n1 || true)
        gm=${gm#msix=}
        if [[ ${D_MSIX[$bdf]} =~ ^[0-9]+$ && -n $gm ]]; then
            if [[ $gm == "${D_MSIX[$bdf]}" ]]; then
                act "  ok   pci-list: MSI-X $gm vectors"
            else
                act "  FAIL pci-list: MSI-X expected ${D_MSIX[$bdf]} vectors, guest says $gm"; fails=$((fails + 1))
            fi
        fi
        local bs i size got
        for bs in ${D_BARS[$bdf]}; do
            i=${bs%%:*}; size=${bs#*:}
            ((i < 6)) || continue
            got=$(guest_bar_size "$line" "$i" || echo none)
            if [[ $got == "$size" ]]; then
                act "  ok   pci-list: BAR$i $(human "$size")"
            else
                act "  FAIL pci-list: BAR$i expected $size bytes, guest says $got"; fails=$((fails + 1))
            fi
        done
    fi
    if grep -aq "^AGENT: error vfio-bind" "$log" || ! grep -aq "^AGENT: vfio-bind" "$log"; then
        act "  FAIL vfio-bind: $(grep -a '^AGENT: .*vfio-bind' "$log" | head -n1 || echo 'no result line')"; fails=$((fails + 1))
    else
        act "  ok   vfio-bind"
    fi
    # vfio-msix's result line carries ok=true when all COUNT interrupts arrived
    # (guest-images/agent/README.md). On a device other than the gpu-test-device it says
    # source=loopback: the guest's vfio-pci signalled the eventfds itself, which shows the guest
    # could enable the vectors, not that the device's interrupts reach it.
    line=$(grep -a "^AGENT: .*vfio-msix" "$log" | head -n1 || true)
    if [[ -n $line && $line != *error* && $line =~ ok=true ]]; then
        act "  ok   vfio-msix: $line"
    else
        act "  FAIL vfio-msix: ${line:-no result line}"; fails=$((fails + 1))
    fi
    ((fails == 0)) || die "$fails check(s) failed in the guest (console: $log)"
    act "  $bdf: the guest sees it as the host does, and its MSI-X interrupts arrive"
}
for b in "${BOOTS[@]}"; do boot_guest "$b"; done
exit 0
