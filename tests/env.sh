# Sourced by the demo and test scripts: the toolchain on PATH, and one shared
# build directory kept outside the clone when /var/cache is writable (faster
# repeated runs; a machine without it builds from scratch just the same).
PATH="$HOME/.cargo/bin:$PATH"
if [ -z "${CARGO_TARGET_DIR:-}" ] && mkdir -p /var/cache/weft/target 2>/dev/null; then
    CARGO_TARGET_DIR=/var/cache/weft/target
fi
export PATH CARGO_TARGET_DIR
# The Kubernetes control plane the tests run against (envtest's convention:
# KUBEBUILDER_ASSETS names a folder with etcd, kube-apiserver, kubectl and
# kube-controller-manager): ../shared/k8s beside the repository when it is
# there and the variable is unset. Without either, those tests skip.
if [ -z "${KUBEBUILDER_ASSETS:-}" ] && [ -d ../shared/k8s/bin ]; then
    KUBEBUILDER_ASSETS=$(../shared/tools/unpack.sh ../shared/k8s/bin)
    export KUBEBUILDER_ASSETS
fi
# Other projects' tools the compatibility tests run (otelcol, hubble,
# hubble-relay): ../shared/bin's, unpacked once, on PATH when it is there.
# Without them, those tests skip.
if [ -d ../shared/bin ] && WEFT_SHARED_TOOLS=$(../shared/tools/unpack.sh ../shared/bin 2>/dev/null); then
    PATH="$WEFT_SHARED_TOOLS:$PATH"
    export PATH
fi
