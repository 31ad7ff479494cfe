#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine with only the Rust toolchain.
# Installs what the tests need (Xen's C headers, 32-bit gcc for the x86_32 ABI
# cross-check, qemu-img/qemu-io for qcow2, qemu-nbd and nbdkit for the NBD backend)
# instead of skipping the tests that need them. The qcow2 tests also mount small tmpfs
# file systems (root).
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
if ! echo 'int main(void){return 0;}' | gcc -m32 -x c - -o /dev/null 2>/dev/null; then
    missing+=(gcc-multilib)
fi
if ((${#missing[@]})); then
    echo "test.sh: installing ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
