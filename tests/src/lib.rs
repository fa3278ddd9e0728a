//! End-to-end test support for Carapace.
//!
//! The end-to-end tests under `tests/tests/` need a `/dev/kvm` that can boot Linux guests.
//! [`lab`] finds one: the host itself when its KVM has hardware virtualization, otherwise
//! the lab machine (QEMU-TCG with emulated AMD SVM) driven by `tests/lab/run`. Tests are
//! written with [`kvm_test!`]; on a host that cannot boot guests the test re-runs its own,
//! already built, executable inside the lab, so cargo never runs under emulation.

pub mod containerd;
pub mod fixtures;
pub mod lab;
