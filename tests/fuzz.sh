#!/usr/bin/env bash
# Runs one fuzz target (tests/tests/fuzz.rs) for as long as asked:
#   tests/fuzz.sh TARGET SECONDS [SEED]
# e.g. tests/fuzz.sh envoyconfig 600. Inputs that fail are saved under
# $WEFT_FUZZ_OUT/TARGET (default: /tmp/weft-fuzz/TARGET); add each to
# tests/fuzz/TARGET/regressions/ once fixed. FUZZ_PROFILE=release builds optimized.
set -euo pipefail
cd "$(dirname "$0")/.."
. ./tests/env.sh
target=${1:?usage: tests/fuzz.sh TARGET SECONDS [SEED]}
seconds=${2:?usage: tests/fuzz.sh TARGET SECONDS [SEED]}
[ -d "tests/fuzz/$target" ] || { echo "no fuzz target $target (tests/fuzz/*)" >&2; exit 2; }
profile=()
[ "${FUZZ_PROFILE:-}" = release ] && profile=(--release)
export WEFT_FUZZ_SECONDS=$seconds
[ -n "${3:-}" ] && export WEFT_FUZZ_SEED=$3
echo "building the fuzz targets..." >&2
cargo test "${profile[@]}" -p weft-tests --test fuzz --no-run
exec cargo test "${profile[@]}" -p weft-tests --test fuzz -- --exact "fuzz_$target" --nocapture
