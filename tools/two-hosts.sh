#!/usr/bin/env bash
# Two "hosts" on one machine: network namespaces NAME-a and NAME-b joined by a veth pair, for
# live-migration tests and benchmarks (PLATFORM.md §9: namespaces and veth work on these hosts).
#
#   tools/two-hosts.sh up NAME [--subnet X] [--json]   create; prints the two addresses
#   tools/two-hosts.sh exec NAME a|b CMD [ARGS...]     run CMD inside NAME-a or NAME-b
#   tools/two-hosts.sh down NAME                       remove (idempotent; kills what runs inside)
#   tools/two-hosts.sh list                            pairs that exist now
#
# Addresses are 10.213.X.1/24 (a) and 10.213.X.2/24 (b), X in 1..254 derived from NAME (or
# --subnet X). Both veth ends are created directly inside their namespaces, so nothing is left in
# the root namespace and pairs with the same X cannot collide: each namespace has its own routes.
set -euo pipefail

prog=$(basename "$0")
die() { echo "$prog: $*" >&2; exit 1; }
usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

need_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (network namespaces need CAP_SYS_ADMIN); try sudo"
}

need_ip() {
    command -v ip >/dev/null 2>&1 && return 0
    echo "$prog: 'ip' missing: installing iproute2 with apt-get" >&2
    command -v apt-get >/dev/null 2>&1 || die "'ip' missing and no apt-get: install iproute2"
    apt-get update -qq >&2 || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >&2 \
        || die "apt-get install iproute2 failed"
    command -v ip >/dev/null 2>&1 || die "iproute2 installed but 'ip' still missing"
}

# A namespace name is a file name under /run/netns; keep it short and plain.
check_name() {
    local name=$1
    [[ $name =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,40}$ ]] \
        || die "bad NAME '$name': use 1-41 characters from [A-Za-z0-9_.-], not starting with . or -"
}

ns_exists() { [[ -e /run/netns/$1 ]]; }

subnet_of() {
    local sum
    sum=$(printf '%s' "$1" | cksum | cut -d' ' -f1)
    echo $((sum % 254 + 1))
}

cmd_up() {
    local name="" subnet="" json=0
    while [[ $# -gt 0 ]]; do
        case $1 in
            --json) json=1 ;;
            --subnet) [[ $# -ge 2 ]] || die "--subnet needs a value"; subnet=$2; shift ;;
            --subnet=*) subnet=${1#--subnet=} ;;
            -*) die "up: unknown option $1" ;;
            *) [[ -z $name ]] || die "up: one NAME only"; name=$1 ;;
        esac
        shift
    done
    [[ -n $name ]] || usage
    check_name "$name"
    need_root
    need_ip
    [[ -n $subnet ]] || subnet=$(subnet_of "$name")
    [[ $subnet =~ ^[0-9]+$ ]] && ((subnet >= 1 && subnet <= 254)) \
        || die "--subnet must be 1..254, not '$subnet'"
    local a="$name-a" b="$name-b"
    if ns_exists "$a" || ns_exists "$b"; then
        die "namespaces for '$name' already exist: run '$prog down $name' first"
    fi
    local addr_a="10.213.$subnet.1" addr_b="10.213.$subnet.2"
    # On any failure below, leave nothing half-made behind.
    trap 'cmd_down "$name" >/dev/null 2>&1 || true' ERR
    ip netns add "$a"
    ip netns add "$b"
    ip link add veth0 netns "$a" type veth peer name veth0 netns "$b"
    ip -n "$a" addr add "$addr_a/24" dev veth0
    ip -n "$b" addr add "$addr_b/24" dev veth0
    local ns
    for ns in "$a" "$b"; do
        ip -n "$ns" link set lo up
        ip -n "$ns" link set veth0 up
    done
    trap - ERR
    if ((json)); then
        printf '{"name":"%s","ns_a":"%s","ns_b":"%s","addr_a":"%s","addr_b":"%s","subnet":%d}\n' \
            "$name" "$a" "$b" "$addr_a" "$addr_b" "$subnet"
    else
        echo "$a $addr_a"
        echo "$b $addr_b"
    fi
}

# Ends every process inside a namespace (a process keeps a deleted namespace alive).
kill_inside() {
    local ns=$1 pids
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    [[ -n $pids ]] || return 0
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        [[ -n $pids ]] || return 0
        sleep 0.2
    done
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
}

cmd_down() {
    [[ $# -eq 1 ]] || usage
    local name=$1 ns
    check_name "$name"
    need_root
    need_ip
    for ns in "$name-a" "$name-b"; do
        if ns_exists "$ns"; then
            kill_inside "$ns"
            # Deleting a namespace also deletes its veth end, and so the whole pair.
            ip netns del "$ns" || die "could not delete namespace $ns"
        fi
    done
}

cmd_exec() {
    [[ $# -ge 3 ]] || usage
    local name=$1 side=$2
    shift 2
    check_name "$name"
    [[ $side == a || $side == b ]] || die "exec: side must be a or b, not '$side'"
    need_root
    need_ip
    ns_exists "$name-$side" || die "namespace $name-$side does not exist: run '$prog up $name'"
    exec ip netns exec "$name-$side" "$@"
}

cmd_list() {
    need_ip
    local ns
    ip netns list 2>/dev/null | awk '{print $1}' | while read -r ns; do
        [[ $ns == *-a ]] || continue
        local name=${ns%-a}
        ns_exists "$name-b" || continue
        local addr
        addr=$(ip -n "$ns" -4 -o addr show dev veth0 2>/dev/null | awk '{print $4}' | head -n1)
        echo "$name ${addr:-?}"
    done
}

[[ $# -ge 1 ]] || usage
sub=$1
shift
case $sub in
    up) cmd_up "$@" ;;
    down) cmd_down "$@" ;;
    exec) cmd_exec "$@" ;;
    list) cmd_list "$@" ;;
    -h | --help | help) usage ;;
    *) die "unknown command '$sub' (up, down, exec, list)" ;;
esac
