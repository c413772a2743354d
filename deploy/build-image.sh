#!/usr/bin/env bash
# Builds weft's image as an OCI archive, without a container engine:
#
#   deploy/build-image.sh OUT.tar
#
# The image holds what deploy/image-contents lists (the workspace's release binaries, the Envoy
# tests/setup.sh pins, files of Debian packages installed here) and the shared libraries each of
# those binaries needs, as this machine has them (ldd). One layer, made and tagged with umoci
# (Debian package `umoci`, OCI's own image tool); the tag is the image deploy/agent.yaml names, and the archive's index
# carries it as `io.containerd.image.name`, so `ctr images import OUT.tar` (or `docker load`-less
# registries' tools: `skopeo copy oci-archive:OUT.tar docker://REGISTRY/weft:TAG`) need no more.
#
# Environment: CARGO_TARGET_DIR (where the binaries are built), WEFT_IMAGE_PROFILE (cargo
# profile, default release; the tests use dev), WEFT_IMAGE_NO_BUILD=1 (use the binaries already
# built), WEFT_ENVOY (the Envoy to ship; default .venv's).
set -euo pipefail

die() { echo "build-image: $*" >&2; exit 1; }
[ $# -eq 1 ] || die "usage: $0 OUT.tar"
OUT=$1
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
PROFILE=${WEFT_IMAGE_PROFILE:-release}
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
case $PROFILE in dev) PROFILE_DIR=debug ;; *) PROFILE_DIR=$PROFILE ;; esac
command -v umoci >/dev/null || die "needs umoci (Debian: apt-get install umoci)"
[ "$(id -u)" = 0 ] || die "needs root (files in the image are owned by root; umoci keeps owners)"

# The image deploy/agent.yaml runs, as the container runtime names it.
IMAGE=$(sed -n 's/^ *image: *\([^ #]*\).*/\1/p' "$REPO/deploy/agent.yaml" | sort -u)
[ "$(echo "$IMAGE" | wc -l)" = 1 ] && [ -n "$IMAGE" ] || die "deploy/agent.yaml names more or less than one image: $IMAGE"
case $IMAGE in
  */*/*) FULL=$IMAGE ;;
  */*) FULL=docker.io/$IMAGE ;;
  *) FULL=docker.io/library/$IMAGE ;;
esac
TAG=${IMAGE##*:}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/weft-image.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/rootfs
mkdir -p "$ROOT"/{tmp,etc,usr/local/bin,usr/bin}
chmod 1777 "$ROOT/tmp"

if [ -z "${WEFT_IMAGE_NO_BUILD:-}" ]; then
  echo "build-image: cargo build --profile $PROFILE (weft-agent, weft-cli, weft-cni)" >&2
  (cd "$REPO" && cargo build --profile "$PROFILE" --locked -p weft-agent -p weft-cli -p weft-cni --bins)
fi

# Copies a file into the image at DEST, with the libraries it loads (if it is a dynamic binary).
put() {
  local src=$1 dest=$2
  [ -f "$src" ] || die "$src is missing"
  mkdir -p "$ROOT$(dirname "$dest")"
  cp -L "$src" "$ROOT$dest"
  if ldd "$src" >/dev/null 2>&1; then
    ldd "$src" | awk '/=> \//{print $3} /^\t\/[^ ]+ \(/{print $1}' | while read -r lib; do
      [ -e "$ROOT$lib" ] && continue
      mkdir -p "$ROOT$(dirname "$lib")"
      cp -L "$lib" "$ROOT$lib"
    done
  fi
}

while read -r kind src dest; do
  case $kind in
    ''|'#'*) continue ;;
    cargo) put "$TARGET/$PROFILE_DIR/$src" "$dest" ;;
    envoy)
      envoy=${WEFT_ENVOY:-}
      if [ -z "$envoy" ]; then
        envoy=$(find "$REPO/.venv/lib" -path '*/envoy/_bin/envoy' -type f 2>/dev/null | head -1)
      fi
      [ -n "$envoy" ] || die "no Envoy: run tests/setup.sh (it pins one in .venv) or set WEFT_ENVOY"
      [ "$(head -c 4 "$envoy" | tr -d '\177')" = ELF ] \
        || die "$envoy is not an executable binary (the venv's bin/envoy is a Python wrapper; its binary is under lib/)"
      put "$envoy" "$dest" ;;
    debian)
      dpkg-query -W -f='${Status}' "$src" 2>/dev/null | grep -q "install ok installed" \
        || die "Debian package $src is not installed here (apt-get install $src)"
      put "$dest" "$dest" ;;
    *) die "deploy/image-contents: unknown kind '$kind'" ;;
  esac
done < "$REPO/deploy/image-contents"
# No loader cache: the libraries sit where ldd found them, on the loader's default paths.
printf 'root:x:0:0:root:/root:/bin/false\n' > "$ROOT/etc/passwd"
printf 'root:x:0:\n' > "$ROOT/etc/group"

OCI=$WORK/oci
umoci init --layout "$OCI"
umoci new --image "$OCI:$TAG"
# unpack + repack, not `umoci insert`: Debian's umoci 0.4.7 does not close the tar stream insert
# writes (umoci#436, fixed upstream in 2024), leaving a layer GNU tar and Python call truncated.
umoci unpack --image "$OCI:$TAG" "$WORK/bundle" >/dev/null
cp -a "$ROOT/." "$WORK/bundle/rootfs/"
umoci repack --image "$OCI:$TAG" --history.created_by "deploy/build-image.sh" "$WORK/bundle"
umoci config --image "$OCI:$TAG" --os linux --architecture amd64 \
  --config.env PATH=/usr/local/bin:/usr/bin:/bin \
  --config.entrypoint /usr/local/bin/weft-agent \
  --config.label org.opencontainers.image.title=weft \
  --config.label "org.opencontainers.image.version=$TAG"
umoci gc --layout "$OCI"
# The name a runtime looks the image up by.
python3 - "$OCI/index.json" "$FULL" <<'PY'
import json, sys
path, name = sys.argv[1:3]
index = json.load(open(path))
for m in index["manifests"]:
    m.setdefault("annotations", {})["io.containerd.image.name"] = name
json.dump(index, open(path, "w"))
PY
chmod -R a+rX "$OCI"
tar -C "$OCI" --sort=name --owner=0 --group=0 --numeric-owner -cf "$OUT" .
echo "build-image: $OUT ($FULL, $(du -h "$OUT" | cut -f1))" >&2
