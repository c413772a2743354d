#!/bin/sh
# What the benchmarks need beyond tests/setup.sh: the open-loop load
# generator `oha` (pinned, from crates.io, built against the system's
# OpenSSL: no cmake), installed with cargo into ~/.cargo/bin. Safe to run
# again: it only installs what is missing. Usage: sudo ./benches/setup.sh
set -eu
OHA_VERSION=1.16.0
OHA="${WEFT_OHA:-$HOME/.cargo/bin/oha}"
if ! dpkg-query -W -f='${Status}' libssl-dev 2>/dev/null | grep -q "install ok installed"; then
    echo "weft bench setup: installing libssl-dev (oha's TLS)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libssl-dev
fi
if ! "$OHA" --version 2>/dev/null | grep -q " $OHA_VERSION"; then
    echo "weft bench setup: building oha $OHA_VERSION with cargo install (a few minutes; progress below)"
    cargo install --locked --version "$OHA_VERSION" --no-default-features --features native-tls oha
fi
