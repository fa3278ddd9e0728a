#!/usr/bin/env bash
# `make bench`: Carapace side by side with its peers (QEMU microvm, runc, Kata's published
# footprint), written to bench/results/ (latest.json, <date>.json, latest.md, latest.svg).
# Builds on the host, then runs carapace-bench where KVM boots guests (inside the lab when
# this host's KVM cannot). Arguments go to carapace-bench, e.g. `bash scripts/bench.sh --quick`.
# See bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "bench: $*" >&2; }

say "building release binaries (cargo build --release --workspace --bins)"
cargo build --release --quiet --workspace --bins

# The boot comparison boots the same kernel and initramfs with both VMMs; its /init is the
# VMM's test guest (prints a ready line, echoes on vsock), built static.
target=x86_64-unknown-linux-gnu
say "building the boot-benchmark guest (carapace-vmm-guest-test as /init)"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --quiet --target "$target" \
  -p carapace-vmm --bin carapace-vmm-guest-test
boot_image=target/bench/boot-image
target/release/carapace-image build --out-dir "$boot_image" -j 2 \
  --agent "target/$target/release/carapace-vmm-guest-test" >&2

mkdir -p bench/results
say "running carapace-bench (inside the lab when this host cannot boot guests)"
bash tests/lab/run --mem 8192 --timeout 5400 -- target/release/carapace-bench \
  --out bench/results \
  --boot-kernel "$boot_image/vmlinux" --boot-initrd "$boot_image/initramfs.cpio.gz" "$@"
