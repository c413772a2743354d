# Sourced by the demo and test scripts: the toolchain on PATH, and one shared
# build directory kept outside the clone when /var/cache is writable (faster
# repeated runs; a machine without it builds from scratch just the same).
PATH="$HOME/.cargo/bin:$PATH"
if [ -z "${CARGO_TARGET_DIR:-}" ] && mkdir -p /var/cache/weft/target 2>/dev/null; then
    CARGO_TARGET_DIR=/var/cache/weft/target
fi
export PATH CARGO_TARGET_DIR
