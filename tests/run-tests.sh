#!/bin/sh
# Every test: unit tests, the C datapath tests (BPF_PROG_TEST_RUN), and the
# lab tests on real packets in network namespaces. Needs root for the latter;
# as another user they print SKIPPED and pass.
# Every test binary runs even when one fails (--no-fail-fast), so a run
# reports all failures at once.
# Usage: ./tests/run-tests.sh [cargo test filters...]
set -eu
# Root is needed (packages, network namespaces, BPF): without it, run again
# through sudo when there is one.
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
    exec sudo -E "$0" "$@"
fi
cd "$(dirname "$0")/.."
./tests/setup.sh
. ./tests/env.sh
cargo build --workspace --bins --tests
cargo test --workspace --no-fail-fast "$@"
