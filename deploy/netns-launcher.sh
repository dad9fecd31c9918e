#!/usr/bin/env bash
# Launcher for MPICH's hydra (mpiexec -launcher-exec): hydra calls it like ssh,
# "[options] HOST COMMAND...", and it runs COMMAND inside the namespace that owns HOST.
# PCM_NETNS_PREFIX names the namespaces made by deploy/netns-hosts.sh.
set -euo pipefail

while [[ $# -gt 0 && "$1" == -* ]]; do
    shift
done
host=${1:?netns-launcher.sh: missing host}
shift
prefix=${PCM_NETNS_PREFIX:?netns-launcher.sh: set PCM_NETNS_PREFIX}

case "$host" in
10.231.0.1) namespace="$prefix-h1" ;;
10.231.0.2) namespace="$prefix-h2" ;;
*)
    echo "netns-launcher.sh: unknown host '$host'; expected 10.231.0.1 or 10.231.0.2" >&2
    exit 1
    ;;
esac
exec ip netns exec "$namespace" sh -c "$*"
