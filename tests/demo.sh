#!/bin/sh
# The demo: a two-node lab in network namespaces, weft agents, Services from
# Kubernetes YAML, traffic, and the datapath's records live. Stops after
# SECONDS (default 60) or on Ctrl-C, and removes everything it made.
# Usage: ./tests/demo.sh [SECONDS]
set -eu
# Root is needed (packages, network namespaces, BPF): without it, run again
# through sudo when there is one.
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
    exec sudo -E "$0" "$@"
fi
cd "$(dirname "$0")/.."
./tests/setup.sh
. ./tests/env.sh
cargo build --workspace --bins
exec cargo run -q -p weft-tests --bin weft-lab -- demo "${1:-60}"
