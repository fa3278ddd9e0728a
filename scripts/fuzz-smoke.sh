#!/usr/bin/env bash
# Builds the cargo-fuzz targets (fuzz/) with libFuzzer's coverage instrumentation on stable
# Rust (sanitizer-coverage is a stable codegen option; only ASan would need nightly) and runs
# each target for a bounded number of inputs. A crash or panic fails the run.
# More: `fuzz/target/x86_64-unknown-linux-gnu/release/<target> -max_total_time=600 corpus/`.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
RUNS=${FUZZ_RUNS:-20000}
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# An explicit --target keeps the instrumentation off build scripts and proc-macros.
cargo build --release --bins --target x86_64-unknown-linux-gnu
targets=$(sed -n 's/^name = "\(.*\)"/\1/p' Cargo.toml | grep -v '^carapace-fuzz$')
for t in $targets; do
  echo "fuzz: $t ($RUNS inputs)"
  rc=0
  ./target/x86_64-unknown-linux-gnu/release/"$t" -runs="$RUNS" -max_len=4096 -max_total_time=120 \
    >"target/$t.log" 2>&1 || rc=$?
  grep -E "^Done|panicked|ERROR|SUMMARY" "target/$t.log" || true
  if [[ $rc -ne 0 ]]; then
    echo "fuzz: $t failed (status $rc); log: fuzz/target/$t.log" >&2
    tail -n 30 "target/$t.log" >&2
    exit 1
  fi
done
