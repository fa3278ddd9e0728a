# Carapace: the two commands a new machine needs are `make demo` and `make test`.
# Every target runs `make setup` first, which installs what is missing and is quiet otherwise.
SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: setup build lint unit lab-test test demo

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

# end-to-end tests: run on the host when its KVM can boot guests, otherwise inside the lab
lab-test: setup
	$(CARGO) test -p carapace-tests -- --test-threads=1

test: setup lint unit lab-test

demo: setup
	@bash scripts/demo.sh

