#!/bin/sh
# Every test: unit tests, the C datapath tests (BPF_PROG_TEST_RUN), and the
# lab tests on real packets in network namespaces. Needs root for the latter;
# as another user they print SKIPPED and pass.
# Every test binary runs even when one fails (--no-fail-fast), so a run
# reports all failures at once.
# Usage: sudo ./tests/run-tests.sh [cargo test filters...]
set -eu
cd "$(dirname "$0")/.."
./tests/setup.sh
. ./tests/env.sh
cargo build --workspace --bins --tests
cargo test --workspace --no-fail-fast "$@"
