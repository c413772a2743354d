#!/bin/sh
# The demo: a two-node lab in network namespaces, weft agents, Services from
# Kubernetes YAML, traffic, and the datapath's records live. Stops after
# SECONDS (default 60) or on Ctrl-C, and removes everything it made.
# Usage: sudo ./tests/demo.sh [SECONDS]
set -eu
cd "$(dirname "$0")/.."
./tests/setup.sh
. ./tests/env.sh
cargo build -q --workspace --bins
exec cargo run -q -p weft-tests --bin weft-lab -- demo "${1:-60}"
