#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine with only the Rust toolchain.
# Installs what the tests need (Xen's C headers, 32-bit gcc for the x86_32 ABI
# cross-check, qemu-img/qemu-io for qcow2, qemu-nbd and nbdkit for the NBD backend, a
# Ceph monitor and OSD for the RBD backend, Prometheus for the metrics endpoint) instead of skipping the tests that need them.
# The qcow2 tests also mount small tmpfs file systems (root); the RBD tests start their
# own single-node cluster per test binary with scripts/ceph-cluster.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
[ -f /usr/include/xen/io/blkif.h ] || missing+=(libxen-dev)
# Real NBD servers for the NBD backend's tests; qemu-img and qemu-io make and check the
# qcow2 images of the qcow2 tests.
command -v qemu-nbd >/dev/null && command -v qemu-img >/dev/null && command -v qemu-io >/dev/null ||
    missing+=(qemu-utils)
command -v nbdkit >/dev/null || missing+=(nbdkit)
# An independent validator for `xenblkd status --json` against docs/status-schema.json.
python3 -c 'import jsonschema' 2>/dev/null || missing+=(python3-jsonschema)
if ! echo 'int main(void){return 0;}' | gcc -m32 -x c - -o /dev/null 2>/dev/null; then
    missing+=(gcc-multilib)
fi
# A real single-node Ceph cluster for the RBD backend's tests (librbd1 and librados2,
# which xenblkd loads at run time, come with ceph-common). Without recommends: ~51 MB
# instead of a full Ceph install.
ceph_missing=()
command -v ceph-mon >/dev/null || ceph_missing+=(ceph-mon)
command -v ceph-osd >/dev/null || ceph_missing+=(ceph-osd)
command -v rbd >/dev/null && /sbin/ldconfig -p | grep -q "librbd.so.1 " || ceph_missing+=(ceph-common)
# A real Prometheus server and promtool for the metrics endpoint's tests (tests/metrics.rs),
# also without recommends (no node exporter).
command -v prometheus >/dev/null && command -v promtool >/dev/null || ceph_missing+=(prometheus)
if ((${#missing[@]} + ${#ceph_missing[@]})); then
    as_root apt-get update -qq
fi
if ((${#missing[@]})); then
    echo "test.sh: installing ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
if ((${#ceph_missing[@]})); then
    echo "test.sh: installing ${ceph_missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${ceph_missing[@]}"
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The fuzz targets (their own workspace, run by scripts/fuzz-all) must keep compiling
# against the crates they drive: checked here, not run.
cargo check --manifest-path fuzz/Cargo.toml --bins
cargo test --workspace
# A real `serve` whose ring panics (issue 14): only with the test-only fault hook, which
# no daemon build has.
cargo clippy -p xenblkd --features fault-injection --all-targets -- -D warnings
cargo test -p xenblkd --features fault-injection --test fault
# The Debian package (from the debug build the tests made): contents, conffile, maintainer
# scripts; installs cargo-deb from crates.io the first time.
scripts/build-deb --profile dev
