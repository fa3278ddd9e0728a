#!/usr/bin/env bash
# One idempotent set-up step for Carapace on Debian 12 (bookworm).
# Installs every Debian package and cargo tool the build, the tests, the lab and the
# benchmarks need. Prints what it installs; prints nothing when all is present.
set -euo pipefail

# Debian packages, grouped by what needs them.
PACKAGES=(
  # the KVM lab (tests/lab): QEMU with TCG + emulated SVM, busybox initramfs, its kernel
  qemu-system-x86 busybox-static cpio kmod
  # guest kernel build (guest-image): Debian's kernel source and its build dependencies
  linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev xz-utils python3
  # virtiofsd (reference virtio-fs daemon) and carapace-fsd's sandbox
  libseccomp-dev libcap-ng-dev pkg-config
  # agent protocol code generation
  protobuf-compiler
  # container peers and tooling for end-to-end tests and benchmarks (pgrep: procps)
  containerd runc iproute2 e2fsprogs procps
  # the Debian-root test image (tests: fixtures::debian_rootfs) and setsid (util-linux)
  debootstrap util-linux
  # pod networking: CNI plugins for the tests' and benchmarks' containerd (bridge,
  # host-local, loopback, portmap in /usr/lib/cni; portmap and ipMasq drive iptables),
  # iperf3 for the throughput rows
  containernetworking-plugins iptables iperf3
  # gVisor, the benchmarks' second peer (runsc driven by containerd's runc shim)
  runsc
  # podman and docker, real callers of the runc-compatible CLI (tests/tests/clients_kvm.rs;
  # the test starts a dockerd of its own)
  podman docker.io
)

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "setup: need root (or sudo) to install Debian packages" >&2; exit 1; }
  SUDO=sudo
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# cargo tools
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust (https://rustup.rs) first" >&2; exit 1; }
CARGO_BIN=${CARGO_HOME:-$HOME/.cargo}/bin
VIRTIOFSD_VERSION=1.14.0
if ! "$CARGO_BIN/virtiofsd" --version 2>/dev/null | grep -q "$VIRTIOFSD_VERSION"; then
  echo "setup: installing virtiofsd $VIRTIOFSD_VERSION (cargo install, a few minutes)"
  cargo install --quiet --locked virtiofsd --version "$VIRTIOFSD_VERSION"
fi

# The KVM lab's kernel and initramfs (tests/lab/run), cached outside the clone.
# Only on a host that needs the lab; quiet when the cache already holds the lab's QEMU and kernel.
bash "$(dirname "$0")/../tests/lab/run" --prepare
