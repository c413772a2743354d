#!/bin/sh
# Builds release binaries and runs one benchmark: sudo ./benches/run.sh NAME
set -eu
cd "$(dirname "$0")/.."
./tests/setup.sh
./benches/setup.sh
. ./tests/env.sh
cargo build -q --release --workspace --bins
WEFT_LAB_BIN="${CARGO_TARGET_DIR:-target}/release/weft-lab" exec cargo bench -q -p weft-benches --bench "${1:-datapath}"
