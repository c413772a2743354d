#!/bin/bash
# The performance report: runs weft's benchmarks side by side on this machine
# (datapath, L7 paths against TPROXY and sidecars, the flow pipeline, the
# control plane) and writes benches/results/REPORT.md with PNG charts.
# Takes a while (about half an hour on 2 cores). Usage: sudo ./benches/report.sh
set -euo pipefail
cd "$(dirname "$0")/.."
./tests/setup.sh
./benches/setup.sh
. ./tests/env.sh
# Charts: matplotlib, pinned, in the project's venv.
.venv/bin/python3 -c "import matplotlib" 2>/dev/null \
    || .venv/bin/pip install -q --disable-pip-version-check "matplotlib==3.11.2"
cargo build -q --release --workspace --bins
OUT=benches/results
mkdir -p "$OUT/raw"
export WEFT_BENCH_OUT="$PWD/$OUT/raw"
export WEFT_LAB_BIN="${CARGO_TARGET_DIR:-target}/release/weft-lab"
for bench in ${WEFT_BENCHES:-datapath l7_paths flows control_plane}; do
    echo "weft report: running $bench"
    cargo bench -q -p weft-benches --bench "$bench" | tee "$OUT/raw/$bench.md"
done
.venv/bin/python3 benches/report.py "$OUT"
