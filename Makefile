# Carapace: the two commands a new machine needs are `make demo` and `make test`.
# Every target runs `make setup` first, which installs what is missing and is quiet otherwise.
SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never
# CI builds once in a fresh clone: incremental state would only fill the disk
ifdef CI
export CARGO_INCREMENTAL ?= 0
endif

.PHONY: setup build lint unit image fuzz lab-test test demo bench soak install uninstall deb

setup:
	@bash scripts/setup.sh

build: setup
	$(CARGO) build --workspace --all-targets

lint: setup
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# unit tests: everything that needs no bootable KVM
unit: setup
	$(CARGO) test --workspace --exclude carapace-tests

# the guest kernel and initramfs (cached by content outside the clone; a warm run is a few
# hash checks, a cold kernel build about 5 minutes on 2 cores)
image: setup
	$(CARGO) run -p carapace-image -- build

# end-to-end tests: run on the host when its KVM can boot guests, otherwise inside the lab.
# They run the workspace's binaries, so those are built first.
lab-test: setup image
	$(CARGO) build --workspace --bins
	$(CARGO) test -p carapace-tests -- --test-threads=1

# the soak at full size (tests/tests/soak_kvm.rs: 5 rounds of 5 containers in parallel,
# counts before and after); `make test` runs it reduced (2 x 3) with the other lab tests
soak: setup image
	$(CARGO) build --workspace --bins
	CARAPACE_SOAK_ROUNDS=$${CARAPACE_SOAK_ROUNDS:-5} CARAPACE_SOAK_PARALLEL=$${CARAPACE_SOAK_PARALLEL:-5} \
		$(CARGO) test -p carapace-tests --test soak_kvm -- --include-ignored --nocapture --test-threads=1

# the cargo-fuzz targets of guest-facing device code: built and run briefly
fuzz: setup
	@bash scripts/fuzz-smoke.sh

test: setup lint unit fuzz lab-test

demo: setup image
	@bash scripts/demo.sh


# install on this node (PREFIX=/usr/local, SYSCONFDIR=/etc, DESTDIR= for staging): binaries,
# guest image, /etc/carapace/configuration.toml, containerd's CRI drop-in; prints what it did
install: setup image
	@bash scripts/install.sh install

# remove what `make install` recorded (a configuration changed since is kept)
uninstall:
	@bash scripts/install.sh uninstall

# a Debian package of the same files: target/deb/carapace_<version>_amd64.deb
deb: setup image
	@bash scripts/install.sh deb

# benchmarks side by side with the peers, written to bench/results/ (see bench/README.md);
# `bash scripts/bench.sh --quick` is a short smoke run
bench: setup image
	@bash scripts/bench.sh
