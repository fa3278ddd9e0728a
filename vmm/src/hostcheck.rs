//! Can this host's `/dev/kvm` run a Linux guest?
//!
//! Some machines expose a *software* KVM (module `kvm_pvm`, no `vmx`/`svm` CPU flag): the KVM
//! API works for tiny code snippets, but it emulates CPL0 code thousands of times slower than
//! hardware and lacks instructions Linux uses, so a Linux guest never boots. We refuse to
//! start there with an error that says so, instead of hanging or dying with an obscure
//! `KVM internal error`.

use std::path::{Path, PathBuf};

/// Why KVM cannot run a Linux guest here.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// `/dev/kvm` does not exist.
    #[error(
        "{path} does not exist: load the kvm_intel or kvm_amd module on a host with hardware \
         virtualization (VT-x/AMD-V), or run inside the lab (tests/lab/run)"
    )]
    KvmMissing {
        /// Device path.
        path: PathBuf,
    },
    /// `/dev/kvm` cannot be opened.
    #[error("cannot open {path} (is this user in the kvm group?)")]
    KvmOpen {
        /// Device path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// KVM is a software implementation that cannot boot Linux.
    #[error(
        "{path} is a software KVM ({detail}); it cannot run a Linux guest. Use a host with \
         hardware virtualization (VT-x/AMD-V, `vmx`/`svm` in /proc/cpuinfo) or run inside the \
         lab (tests/lab/run)"
    )]
    SoftwareKvm {
        /// Device path.
        path: PathBuf,
        /// What gave it away.
        detail: String,
    },
    /// KVM lacks a capability the VMM needs.
    #[error("KVM lacks the required capability {0}")]
    MissingCapability(&'static str),
    /// KVM API error.
    #[error("KVM ioctl failed: {what}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// What the host looks like, gathered from /proc and /sys (a seam for tests).
#[derive(Debug, Clone, Default)]
pub struct HostFacts {
    /// `/proc/cpuinfo` contents.
    pub cpuinfo: String,
    /// Whether `/sys/module/kvm_pvm` exists.
    pub kvm_pvm_loaded: bool,
}

impl HostFacts {
    /// Reads the facts of this host.
    pub fn read() -> Self {
        HostFacts {
            cpuinfo: std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default(),
            kvm_pvm_loaded: Path::new("/sys/module/kvm_pvm").exists(),
        }
    }

    /// `Some(reason)` when KVM here is a software implementation.
    pub fn software_kvm(&self) -> Option<String> {
        if self.kvm_pvm_loaded {
            return Some("module kvm_pvm is loaded".into());
        }
        let has_hw = self
            .cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        if !has_hw && !self.cpuinfo.is_empty() {
            return Some("no vmx or svm flag in /proc/cpuinfo".into());
        }
        None
    }
}

/// Checks that `/dev/kvm` (or `path`) exists, is a hardware KVM and has what we need.
pub fn check_kvm(path: &Path, facts: &HostFacts) -> Result<(), HostError> {
    if !path.exists() {
        return Err(HostError::KvmMissing {
            path: path.to_owned(),
        });
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| HostError::KvmOpen {
            path: path.to_owned(),
            source,
        })?;
    if let Some(detail) = facts.software_kvm() {
        return Err(HostError::SoftwareKvm {
            path: path.to_owned(),
            detail,
        });
    }
    Ok(())
}

/// Checks the capabilities the VMM relies on.
pub fn check_capabilities(kvm: &kvm_ioctls::Kvm) -> Result<(), HostError> {
    use kvm_ioctls::Cap;
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(HostError::MissingCapability(name));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_software_kvm() {
        let pvm = HostFacts {
            cpuinfo: "flags\t: fpu sse2\n".into(),
            kvm_pvm_loaded: true,
        };
        assert!(pvm.software_kvm().unwrap().contains("kvm_pvm"));
        let noflags = HostFacts {
            cpuinfo: "flags\t: fpu sse2 hypervisor\n".into(),
            kvm_pvm_loaded: false,
        };
        assert!(noflags.software_kvm().unwrap().contains("vmx"));
        let hw = HostFacts {
            cpuinfo: "flags\t: fpu svm npt\n".into(),
            kvm_pvm_loaded: false,
        };
        assert!(hw.software_kvm().is_none());
    }

    #[test]
    fn missing_device_is_named() {
        let e = check_kvm(Path::new("/nonexistent/kvm"), &HostFacts::default()).unwrap_err();
        assert!(
            e.to_string().contains("/nonexistent/kvm does not exist"),
            "{e}"
        );
    }

    #[test]
    fn software_kvm_error_says_why() {
        if !Path::new("/dev/kvm").exists() {
            return;
        }
        let facts = HostFacts {
            cpuinfo: "flags\t: fpu\n".into(),
            kvm_pvm_loaded: true,
        };
        match check_kvm(Path::new("/dev/kvm"), &facts) {
            Err(HostError::SoftwareKvm { detail, .. }) => assert!(detail.contains("kvm_pvm")),
            Err(HostError::KvmOpen { .. }) => {} // unprivileged test runner
            other => panic!("unexpected {other:?}"),
        }
    }
}
