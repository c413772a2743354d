#!/bin/sh
# Regenerates src/<kind>.rs from the Gateway API's standard-channel CRDs with
# kopium (`cargo install kopium --version 0.24.1`), then gives every enum a
# catch-all `Unknown` variant: a value that a newer API version or another
# channel allows (a new filter type, say) must not make a whole object
# unreadable, or one route could stop the operator from reading any.
#
#   agent/gateway-api/generate.sh [CRD directory]
#
# The directory defaults to ../shared/conformance/gateway-api/crds beside
# the repository (the v1.6.1 CRDs).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
crds=${1:-$repo/../shared/conformance/gateway-api/crds}
KOPIUM=${KOPIUM:-kopium}
cd "$crds"
for kind in gatewayclasses gateways httproutes grpcroutes referencegrants; do
    out="$here/src/$kind.rs"
    echo "generating $out from $crds/gateway.networking.k8s.io_$kind.yaml"
    "$KOPIUM" --schema=disabled --derive=Default --derive=PartialEq --api-version v1 \
        -f "gateway.networking.k8s.io_$kind.yaml" >"$out.tmp"
    python3 "$here/unknown_variants.py" <"$out.tmp" >"$out"
    rm "$out.tmp"
done
