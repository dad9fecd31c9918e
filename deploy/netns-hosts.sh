#!/usr/bin/env bash
# Create or remove two test hosts on this machine: network namespaces joined by a veth pair,
# so MPI runs cross a real network link without a cluster.
#
#   deploy/netns-hosts.sh up PREFIX     creates PREFIX-h1 (10.231.0.1) and PREFIX-h2 (10.231.0.2)
#   deploy/netns-hosts.sh down PREFIX   removes them
#
# The addresses exist only inside the namespaces; they are reached only from inside them
# (start mpiexec in PREFIX-h1, see deploy/netns-launcher.sh). Needs root and iproute2.
set -euo pipefail

action=${1:?usage: netns-hosts.sh up|down PREFIX}
prefix=${2:?usage: netns-hosts.sh up|down PREFIX}

case "$action" in
up)
    ip netns add "$prefix-h1"
    ip netns add "$prefix-h2"
    ip link add "$prefix-v1" type veth peer name "$prefix-v2"
    ip link set "$prefix-v1" netns "$prefix-h1"
    ip link set "$prefix-v2" netns "$prefix-h2"
    ip -n "$prefix-h1" addr add 10.231.0.1/24 dev "$prefix-v1"
    ip -n "$prefix-h2" addr add 10.231.0.2/24 dev "$prefix-v2"
    for host in h1 h2; do
        ip -n "$prefix-$host" link set lo up
    done
    ip -n "$prefix-h1" link set "$prefix-v1" up
    ip -n "$prefix-h2" link set "$prefix-v2" up
    ;;
down)
    ip netns del "$prefix-h1" 2>/dev/null || true
    ip netns del "$prefix-h2" 2>/dev/null || true
    ;;
*)
    echo "netns-hosts.sh: action must be 'up' or 'down'; got '$action'" >&2
    exit 2
    ;;
esac
