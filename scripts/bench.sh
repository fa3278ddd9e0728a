#!/usr/bin/env bash
# `make bench`: Carapace side by side with its peers (QEMU microvm, runc, Kata's published
# footprint), written to bench/results/ (latest.json, <date>.json, latest.md, latest.svg).
# Builds on the host, then runs carapace-bench where KVM boots guests (inside the lab when
# this host's KVM cannot), one lab machine per phase group, each writing a partial report
# under target/bench/; a group whose lab machine fails (exit 124/125, no partial report, or
# a phase not measured while a nested guest triple-faulted) runs once more in a new machine.
# Then the partial reports are merged on the host.
# Arguments go to every carapace-bench run, e.g. `bash scripts/bench.sh --quick`; `--skip
# PHASE` leaves phases out (a group whose phases are all skipped does not run).
# Exits non-zero only when carapace-bench reports a usage error (2) or the merge fails.
# See bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "bench: $*" >&2; }

# carapace-bench refuses --only with --skip: take the --skip values out of the arguments
# and drop the skipped phases from each group's --only list instead.
args=() skips=()
while (($#)); do
  case "$1" in
    --skip)
      (($# >= 2)) || { say "--skip needs a phase"; exit 2; }
      skips+=("$2"); shift 2 ;;
    --skip=*) skips+=("${1#--skip=}"); shift ;;
    --only | --only=* | --partial | --partial=* | --merge | --merge=* | --out | --out=*)
      say "$1: this script picks the phases, partial files and output itself (use --skip PHASE)"
      exit 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
for s in "${skips[@]}"; do
  case "$s" in
    boot | container | sandbox | pod | fs | net | timeline) ;;
    *) say "--skip $s: no such phase (boot, container, sandbox, pod, fs, net, timeline)"; exit 2 ;;
  esac
done
skipped() { local s; for s in "${skips[@]}"; do [[ $s == "$1" ]] && return 0; done; return 1; }

say "building release binaries (cargo build --release --workspace --bins)"
cargo build --release --quiet --workspace --bins

# The boot comparison boots the same kernel and initramfs with both VMMs; its /init is the
# VMM's test guest (prints a ready line, echoes on vsock), built static.
target=x86_64-unknown-linux-gnu
say "building the boot-benchmark guest (carapace-vmm-guest-test as /init) and carapace-fsio"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --quiet --target "$target" \
  -p carapace-test-programs --bin carapace-vmm-guest-test --bin carapace-fsio
boot_image=target/bench/boot-image
target/release/carapace-image build --out-dir "$boot_image" -j 2 \
  --agent "target/$target/release/carapace-vmm-guest-test" >&2

# Phase groups: name, lab timeout (s), phases. Boot runs last: the lab machine's own kernel
# panics were seen there. Container and sandbox share one private containerd.
groups=(
  "container-sandbox 2400 container sandbox"
  "pod 1800 pod"
  "fs 1800 fs"
  "net 1800 net"
  "timeline 1200 timeline"
  "boot 1800 boot"
)
# The merged report lists the groups in the order a whole run measures them.
merge_order=(boot container-sandbox pod fs net timeline)
partials=target/bench
mkdir -p "$partials" bench/results
rm -f "$partials"/partial-*.json

# Runs carapace-bench for one group in a new lab machine; returns its exit status, 3
# when it exited 0 without writing the partial report, or 4 when a phase or a row of
# Carapace's was not measured while a nested guest triple-faulted in the lab machine (the lab's emulated CPU:
# tests/README.md, "The lab"; such a phase failed for the lab, not for what it measures).
run_group() { # name timeout --only args...
  local name=$1 timeout=$2 rc=0 log=$partials/lab-$1.log
  shift 2
  rm -f "$partials/partial-$name.json"
  bash tests/lab/run --mem 8192 --timeout "$timeout" -- target/release/carapace-bench \
    "$@" --partial "$partials/partial-$name.json" \
    --boot-kernel "$boot_image/vmlinux" --boot-initrd "$boot_image/initramfs.cpio.gz" \
    "${args[@]}" 2> >(tee "$log" >&2) || rc=$?
  if ((rc == 0)) && [[ ! -f $partials/partial-$name.json ]]; then rc=3; fi
  if ((rc == 0)) && grep -q '^lab: a nested guest triple-faulted' "$log" &&
    grep -v 'gVisor not measured' "$partials/partial-$name.json" | grep -q 'not measured'; then
    rc=4
  fi
  return "$rc"
}

ran=()
for group in "${groups[@]}"; do
  read -r name timeout phases <<<"$group"
  only=()
  for p in $phases; do skipped "$p" || only+=(--only "$p"); done
  if ((${#only[@]} == 0)); then
    say "$name: skipped (--skip)"
    continue
  fi
  ran+=("$name")
  for attempt in 1 2; do
    say "$name: running carapace-bench ${only[*]} in a lab machine (timeout ${timeout} s, attempt $attempt)"
    rc=0
    run_group "$name" "$timeout" "${only[@]}" || rc=$?
    if ((rc == 0)); then
      break
    elif ((rc == 2)); then
      say "$name: carapace-bench reported a usage error (exit 2); fix it and run again"
      exit 2
    fi
    what="exit $rc"
    case $rc in
      3) what="exit 0 but no partial report" ;;
      4) what="a phase not measured while a nested guest triple-faulted" ;;
      124) what="exit 124, timed out after ${timeout} s" ;;
      125) what="exit 125, the lab machine failed" ;;
    esac
    if ((attempt == 1)); then
      say "$name: lab run failed ($what); running $name once more in a new lab machine"
    else
      say "$name: lab run failed again ($what); the report notes $name as not measured"
      # the merge would only say the file is missing: leave the reason instead
      [[ -f $partials/partial-$name.json ]] ||
        printf '{"rows": [], "samples": [], "notes": ["%s: not measured: its lab run failed twice (%s), see the bench log"]}\n' \
          "$name" "$what" >"$partials/partial-$name.json"
    fi
  done
done

if ((${#ran[@]} == 0)); then
  say "every phase is skipped: nothing to run, no report written"
  exit 0
fi
files=()
for name in "${merge_order[@]}"; do
  for r in "${ran[@]}"; do [[ $r == "$name" ]] && files+=("$partials/partial-$name.json"); done
done
skip_args=()
for s in "${skips[@]}"; do skip_args+=(--skip "$s"); done
say "merging ${#files[@]} partial report(s) into bench/results (carapace-bench --merge, on the host)"
target/release/carapace-bench --out bench/results "${skip_args[@]}" --merge "${files[@]}"
