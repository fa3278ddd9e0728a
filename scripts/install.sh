#!/usr/bin/env bash
# scripts/install.sh: install Carapace on this node (`make install`), remove it again
# (`make uninstall`), or build a Debian package of the same files (`make deb`).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/install.sh install   [options]
       scripts/install.sh uninstall [options]
       scripts/install.sh deb       [options]

install    puts the binaries, the guest image, the configuration and containerd's CRI
           drop-in in place; running it again changes only what differs. It prints one
           line per file (new, updated, unchanged, kept) and ends with `carapace check`.
uninstall  removes what install recorded in its manifest ($PREFIX/lib/carapace/installed),
           keeping a configuration changed since, and takes the containerd drop-in out.
deb        builds target/deb/carapace_<version>_amd64.deb holding the same files
           (prefix /usr); its postinst registers the CRI handler, its prerm removes it.

Options (also read from the environment variables in brackets, as make passes them):
  --prefix DIR             binaries go to DIR/bin (PREFIX, default /usr/local)
  --sysconfdir DIR         configuration in DIR/carapace (SYSCONFDIR, default /etc)
  --image-dir DIR          guest kernel and initramfs (IMAGEDIR, default /var/lib/carapace/guest)
  --destdir DIR            stage everything under DIR, touch nothing else (DESTDIR)
  --bin-dir DIR            install these built binaries instead of building them
                           (cargo build --release) (BINDIR)
  --image-from DIR         the built guest image (default /var/lib/carapace/guest, where
                           `make image` puts it)
  --containerd-config FILE containerd's main file (CONTAINERD_CONFIG, default
                           /etc/containerd/config.toml); the drop-in goes to conf.d/ beside it
  --no-containerd          leave containerd's configuration alone
  DEB_COMPRESSION=xz|gzip|zstd|none   the package's compression (default xz)
  -h, --help               this text
EOF
}

die() { echo "install: $*" >&2; exit 1; }
say() { echo "install: $*"; }

cmd=${1:-}
[[ $cmd == install || $cmd == uninstall || $cmd == deb ]] || { usage >&2; exit 2; }
shift
PREFIX=${PREFIX:-/usr/local}
SYSCONFDIR=${SYSCONFDIR:-/etc}
IMAGEDIR=${IMAGEDIR:-/var/lib/carapace/guest}
DESTDIR=${DESTDIR:-}
BINDIR=${BINDIR:-}
IMAGE_FROM=/var/lib/carapace/guest
CONTAINERD_CONFIG=${CONTAINERD_CONFIG:-/etc/containerd/config.toml}
CONTAINERD=1
while (($#)); do
  case $1 in
    --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
    --sysconfdir) SYSCONFDIR=${2:?--sysconfdir needs a directory}; shift 2 ;;
    --image-dir) IMAGEDIR=${2:?--image-dir needs a directory}; shift 2 ;;
    --destdir) DESTDIR=${2:?--destdir needs a directory}; shift 2 ;;
    --bin-dir) BINDIR=${2:?--bin-dir needs a directory}; shift 2 ;;
    --image-from) IMAGE_FROM=${2:?--image-from needs a directory}; shift 2 ;;
    --containerd-config) CONTAINERD_CONFIG=${2:?--containerd-config needs a file}; shift 2 ;;
    --no-containerd) CONTAINERD=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (--help lists them)" ;;
  esac
done
for v in PREFIX SYSCONFDIR IMAGEDIR CONTAINERD_CONFIG; do
  [[ ${!v} == /* ]] || die "$v must be an absolute path, got '${!v}'"
done
[[ -z $DESTDIR || $DESTDIR == /* ]] || DESTDIR=$(realpath -m "$DESTDIR")
cd "$(dirname "$0")/.."

BINARIES=(carapace carapace-vmm carapace-fsd containerd-shim-carapace-v2)
IMAGE_FILES=(vmlinux initramfs.cpio.gz image.json)
MANIFEST=$PREFIX/lib/carapace/installed
DROP_IN=$(dirname "$CONTAINERD_CONFIG")/conf.d/carapace.toml
CONF=$SYSCONFDIR/carapace/configuration.toml

# The configuration shipped (config/configuration.toml) with this installation's paths.
shipped_config() {
  sed -e "s|\"/usr/local/bin/|\"$PREFIX/bin/|" -e "s|\"/var/lib/carapace/guest/|\"$IMAGEDIR/|" \
    config/configuration.toml
}

# Recorded checksum of an installed file (the manifest line "<sha256>  <path>").
recorded_sum() {
  [[ -f $DESTDIR$MANIFEST ]] && awk -v p="$1" '$2 == p {print $1}' "$DESTDIR$MANIFEST" || true
}

# put SRC DEST MODE: install SRC at $DESTDIR$DEST, saying what it did; records it.
put() {
  local src=$1 dest=$2 mode=$3 target=$DESTDIR$2 what=new
  if [[ -e $target ]]; then
    if cmp -s "$src" "$target"; then what=unchanged; else what=updated; fi
  fi
  if [[ $what != unchanged ]]; then
    install -D -m "$mode" "$src" "$target.carapace-new"
    mv -f "$target.carapace-new" "$target"
  fi
  say "$dest ($what)"
  record "$dest"
}

record() {
  echo "$(sha256sum "$DESTDIR$1" | cut -d' ' -f1)  $1" >>"$NEW_MANIFEST"
}

do_install() {
  if [[ -z $BINDIR ]]; then
    say "building the binaries (cargo build --release; a few minutes the first time)"
    cargo build --release --quiet -p carapace-runtime -p carapace-vmm -p carapace-fsd \
      -p containerd-shim-carapace-v2 --bins
    BINDIR=target/release
  fi
  for b in "${BINARIES[@]}"; do
    [[ -x $BINDIR/$b ]] || die "$BINDIR/$b is missing: build it first (cargo build --release --bins)"
  done
  for f in vmlinux initramfs.cpio.gz; do
    [[ -f $IMAGE_FROM/$f ]] || die "the guest image is missing ($IMAGE_FROM/$f): run 'make image' first"
  done
  NEW_MANIFEST=$(mktemp)
  trap 'rm -f "$NEW_MANIFEST" "${TMP_CONF:-}"' EXIT
  for b in "${BINARIES[@]}"; do
    put "$BINDIR/$b" "$PREFIX/bin/$b" 0755
  done
  for f in "${IMAGE_FILES[@]}"; do
    [[ -f $IMAGE_FROM/$f ]] || continue
    if [[ $(realpath -m "$IMAGE_FROM/$f") == "$(realpath -m "$DESTDIR$IMAGEDIR/$f")" ]]; then
      say "$IMAGEDIR/$f (in place: make image put it there)"
      record "$IMAGEDIR/$f"
    else
      put "$IMAGE_FROM/$f" "$IMAGEDIR/$f" 0644
    fi
  done
  # The configuration: a file the admin changed since it was installed is kept, and the
  # new one is put beside it as configuration.toml.new.
  TMP_CONF=$(mktemp)
  shipped_config >"$TMP_CONF"
  local target=$DESTDIR$CONF old_sum
  old_sum=$(recorded_sum "$CONF")
  if [[ -f $target ]] && ! cmp -s "$TMP_CONF" "$target" &&
     [[ $(sha256sum "$target" | cut -d' ' -f1) != "$old_sum" ]]; then
    install -D -m 0644 "$TMP_CONF" "$target.new"
    say "$CONF (kept: changed here since it was installed; the new default is $CONF.new)"
    echo "$old_sum  $CONF" >>"$NEW_MANIFEST"
  else
    put "$TMP_CONF" "$CONF" 0644
  fi
  if [[ $CONTAINERD == 1 && -z $DESTDIR ]]; then
    if [[ -d $(dirname "$CONTAINERD_CONFIG") ]] || command -v containerd >/dev/null; then
      "$PREFIX/bin/carapace" --config "$CONF" containerd-config \
        --containerd-config "$CONTAINERD_CONFIG" --drop-in "$DROP_IN" | sed 's/^/install: /'
      echo "drop-in  $DROP_IN  $CONTAINERD_CONFIG" >>"$NEW_MANIFEST"
    else
      say "containerd is not installed here: no CRI drop-in (run '$PREFIX/bin/carapace containerd-config' after installing it)"
    fi
  fi
  install -D -m 0644 "$NEW_MANIFEST" "$DESTDIR$MANIFEST"
  say "manifest $MANIFEST"
  if [[ -z $DESTDIR ]]; then
    say "carapace check:"
    "$PREFIX/bin/carapace" --config "$CONF" check | sed 's/^/  /' ||
      say "some checks failed (above): this host cannot run sandboxes until they pass"
  fi
}

do_uninstall() {
  local manifest=$DESTDIR$MANIFEST
  [[ -f $manifest ]] || die "nothing to uninstall: no manifest $MANIFEST (installed with another --prefix?)"
  local carapace=$DESTDIR$PREFIX/bin/carapace
  while read -r kind path main; do
    [[ $kind == drop-in ]] || continue
    if [[ -x $carapace ]]; then
      "$carapace" containerd-config --remove --containerd-config "$main" --drop-in "$path" |
        sed 's/^/uninstall: /'
    else
      rm -f "$path" && echo "uninstall: removed $path"
    fi
  done <"$manifest"
  while read -r sum path _; do
    [[ $sum == drop-in ]] && continue
    local target=$DESTDIR$path
    if [[ ! -e $target ]]; then
      echo "uninstall: $path (already gone)"
    elif [[ $path == "$CONF" && $(sha256sum "$target" | cut -d' ' -f1) != "$sum" ]]; then
      echo "uninstall: $path (kept: changed since it was installed)"
    else
      rm -f "$target" && echo "uninstall: $path (removed)"
    fi
  done <"$manifest"
  rm -f "$manifest" "$DESTDIR$CONF.new"
  for d in "$PREFIX/lib/carapace" "$SYSCONFDIR/carapace" "$IMAGEDIR"; do
    rmdir "$DESTDIR$d" 2>/dev/null || true
  done
  echo "uninstall: done"
}

do_deb() {
  command -v dpkg-deb >/dev/null || die "dpkg-deb is missing (Debian package dpkg)"
  local version root out
  version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
  [[ -n $version ]] || die "cannot read the workspace version from Cargo.toml"
  root=target/deb/root
  rm -rf "$root"
  mkdir -p "$root/DEBIAN"
  PREFIX=/usr DESTDIR=$(realpath -m "$root") CONTAINERD=0 CONF=$SYSCONFDIR/carapace/configuration.toml
  MANIFEST=$PREFIX/lib/carapace/installed
  do_install
  # dpkg owns the files: no install manifest in the package
  rm -f "$DESTDIR$MANIFEST"
  local size
  size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
  cat >"$root/DEBIAN/control" <<EOF
Package: carapace
Version: $version
Architecture: amd64
Maintainer: Carapace developers <carapace@localhost>
Installed-Size: $size
Depends: libc6
Recommends: containerd
Section: admin
Priority: optional
Description: VM-isolated container runtime (containerd shim v2, KVM microVMs)
 Carapace runs every container, or every Kubernetes pod, in its own lightweight
 KVM virtual machine: a containerd shim v2, a runc-compatible CLI, its own VMM and
 virtio-fs daemon, and a minimal guest kernel with its agent.
EOF
  echo "$CONF" >"$root/DEBIAN/conffiles"
  cat >"$root/DEBIAN/postinst" <<EOF
#!/bin/sh
set -e
if [ "\$1" = configure ] && [ -d "$(dirname "$CONTAINERD_CONFIG")" ]; then
  /usr/bin/carapace --config $CONF containerd-config --containerd-config $CONTAINERD_CONFIG --drop-in $DROP_IN || true
fi
EOF
  cat >"$root/DEBIAN/prerm" <<EOF
#!/bin/sh
set -e
if [ "\$1" = remove ] && [ -f $DROP_IN ]; then
  /usr/bin/carapace containerd-config --remove --containerd-config $CONTAINERD_CONFIG --drop-in $DROP_IN || true
fi
EOF
  chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm"
  out=target/deb/carapace_${version}_amd64.deb
  dpkg-deb --root-owner-group -Z"${DEB_COMPRESSION:-xz}" --build "$root" "$out" >/dev/null
  say "built $out ($(du -h "$out" | cut -f1))"
}

case $cmd in
  install) do_install ;;
  uninstall) do_uninstall ;;
  deb) do_deb ;;
esac
