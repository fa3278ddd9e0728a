#!/usr/bin/env bash
# `make demo`: a container in a Carapace microVM, end to end (ctr -> containerd ->
# containerd-shim-carapace-v2 -> carapace-vmm + carapace-fsd -> guest agent), printing the
# container's output and the time from `ctr run` to it. `make demo` has already run setup
# and built the guest image; this builds the binaries and runs the demo, inside the lab when
# this host's KVM cannot boot guests.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "demo: building Carapace (cargo build --release; a few minutes the first time)" >&2
cargo build --release --quiet --workspace --bins
exec bash tests/lab/run --timeout 1800 -- target/release/carapace-demo
