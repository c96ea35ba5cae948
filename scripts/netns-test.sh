#!/usr/bin/env bash
# Run wireguard-go's own tests/netns.sh against a userspace WireGuard program and report
# which of its sections pass. Nothing is downloaded: fetch netns.sh yourself (README).
#
#   scripts/netns-test.sh [--iperf-size SIZE] NETNS_SH PROGRAM
#
# --iperf-size runs a temporary copy with every `iperf3 -n 1G` replaced by SIZE (e.g. 50M),
# for slow implementations; without it the script runs unmodified. Needs root, ip, wg,
# iperf3, ncat, iptables. netns.sh names its interfaces wg0/wg1/wg2: nothing else may be
# using those names (their UAPI sockets in /var/run/wireguard are shared by all namespaces).
set -euo pipefail

usage() {
    echo "usage: $0 [--iperf-size SIZE] NETNS_SH PROGRAM" >&2
    exit 2
}

size=""
while [[ $# -gt 0 && $1 == --* ]]; do
    case $1 in
        --iperf-size) [[ $# -ge 2 ]] || usage; size=$2; shift 2 ;;
        *) usage ;;
    esac
done
[[ $# -eq 2 ]] || usage
netns_sh=$1
program=$(command -v -- "$2" || true)

[[ -f $netns_sh ]] || { echo "$0: $netns_sh: no such file" >&2; exit 2; }
[[ -n $program && -x $program ]] || { echo "$0: $2: not an executable" >&2; exit 2; }
program=$(realpath -- "$program")
[[ $EUID -eq 0 ]] || { echo "$0: must run as root" >&2; exit 2; }
for name in wg0 wg1 wg2; do
    if [[ -e /var/run/wireguard/$name.sock ]]; then
        echo "$0: /var/run/wireguard/$name.sock exists; netns.sh needs that name" >&2
        exit 2
    fi
done
if [[ -n $size && ! $size =~ ^[0-9]+[KMG]?$ ]]; then
    echo "$0: --iperf-size: '$size' is not like 50M" >&2
    exit 2
fi

work=$(mktemp -d /tmp/netns-test.XXXXXX)
log=$work/netns.log
script=$netns_sh
if [[ -n $size ]]; then
    script=$work/netns.sh
    sed "s/ -n 1G / -n $size /g" "$netns_sh" >"$script"
    echo "running a copy with iperf3 -n $size instead of 1G"
fi

echo "running $netns_sh against $program (log: $log)"
start=$SECONDS
rc=0
bash "$script" "$program" >"$log" 2>&1 </dev/null || rc=$?
elapsed=$((SECONDS - start))

# The sections of netns.sh in the order they run, and a command that starts each one.
names=(
    "topology, stats counters, IPv4 outer transport (ping, TCP, UDP; normal and big MTU)"
    "IPv6 outer transport (ping, TCP, UDP; normal and big MTU)"
    "roaming (IPv4, IPv6)"
    "crypto-RP filter"
    "NAT and persistent keepalive"
    "sticky source address: falls over to new addresses"
    "reply-to-sender source routing"
    "UAPI: large configurations (split responses)"
    "all objects destroyed"
)
markers=(
    ""
    "wg set wg1 peer .* endpoint \\[::1\\]:20000"
    "ip -4 addr del 127.0.0.1/8 dev lo"
    "ncat -l -u -p 1111"
    "iptables -t nat -A POSTROUTING"
    "ip link add veth1 type veth"
    "ip addr flush dev veth1"
    "$program wg0"
    "wg show doesnotexist"
)
plain=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -a '^\[+\] ' || true)
reached=0  # the section that ran last
for ((i = 1; i < ${#markers[@]}; i++)); do
    if grep -qaE -- "${markers[$i]}" <<<"$plain"; then reached=$i; fi
done

echo
for i in "${!names[@]}"; do
    if [[ $rc -eq 0 || $i -lt $reached ]]; then
        status="pass"
    elif [[ $i -eq $reached ]]; then
        status="FAIL"
    else
        status="not reached"
    fi
    printf '  %-12s %s\n' "$status" "${names[$i]}"
done
echo
if [[ $rc -eq 0 ]]; then
    echo "netns.sh: PASS in ${elapsed}s ($program)"
else
    echo "netns.sh: FAIL (exit $rc) in ${elapsed}s ($program); the failing command:"
    # The command just before netns.sh's cleanup trap, which starts with this one.
    sed -n '/^\[+\] NS0: ip link del dev wg1$/{x;p;q};h' <<<"$plain"
    echo "full log: $log"
fi
exit "$rc"
