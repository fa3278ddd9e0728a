//! End-to-end test support for Carapace.
//!
//! The end-to-end tests under `tests/tests/` need a `/dev/kvm` that can boot Linux guests.
//! [`lab`] finds one: the host itself when its KVM has hardware virtualization, otherwise
//! the lab machine (QEMU-TCG with emulated AMD SVM) driven by `tests/lab/run`. Tests are
//! written with [`kvm_test!`]; on a host that cannot boot guests the test re-runs its own,
//! already built, executable inside the lab, so cargo never runs under emulation.

pub mod bench;
pub mod containerd;
pub mod cri;
pub mod faults;
pub mod fixtures;
pub mod hostile;
pub mod jail;
pub mod lab;
pub mod net;
pub mod terminal;

use std::path::PathBuf;

/// The path of a binary built from this workspace (e.g. `carapace-vmm`), next to the
/// running test executable's profile directory (`target/<profile>/`). Integration tests in
/// this crate cannot use `CARGO_BIN_EXE_*` for other packages' binaries, so `make test`
/// builds them first (`cargo build --workspace --bins`).
///
/// # Panics
/// When the binary is not built, with the command that builds it.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps");
    let bin = profile_dir.join(name);
    assert!(
        bin.is_file(),
        "{} is not built: run `cargo build --workspace --bins` first",
        bin.display()
    );
    bin
}

/// Whether this process runs as root (effective uid 0), which most end-to-end tests need.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0")
}

/// The directory holding the running binary: for `carapace-demo` and `carapace-bench`,
/// built next to the workspace's other binaries, the place to find them.
pub fn own_bin_dir() -> std::io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.parent()
        .map(std::path::Path::to_path_buf)
        .ok_or_else(|| std::io::Error::other(format!("{} has no directory", exe.display())))
}
